"""turbos vs transformers on identical weights: a NemotronH sized like `small`, converted into
turbos (``turbos.interop.nemotron_h``), so both run the same network with the same numbers.

In one process, alternating the two models:
- prefill (one forward filling the cache, last logits) at 512 / 2K / 8K / 32K tokens, batch 1;
- decode at batch 1 and 16, fp32 and bf16: our engine vs ``generate()``, and at batch 1 the
  weight-streaming floor measured in the same run (``decode.weight_floor_s``);
- one training step (forward with labels + backward + AdamW), fp32, train mode;
- then profiles (torch.profiler, top operators by self CPU time) of both models in a 2K prefill
  and a training step: where the time goes.

First it checks that the two give the same logits (fp32, <= 1e-4), so the timings compare the
same computation.

    python benchmarks/identical_weights.py [--lengths 512 2048 8192 32768] [--repeats 2]

Writes benchmarks/results/identical_weights.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, identical_pair, machine, time_call, write_json  # noqa: E402
from decode import engine_decode_s, hf_decode_s, weight_floor_s  # noqa: E402
from train_step import make_step  # noqa: E402
from turbos.data.tasks import generate_problems, render_document  # noqa: E402
from turbos.data.tokenizer import train_tokenizer  # noqa: E402
from turbos.presets import get_preset  # noqa: E402
from turbos.serve import LLMEngine  # noqa: E402
from turbos.train.plots import pyplot, save_figure  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"prefill": 1.5, "decode_floor_ratio": 1.25, "train_step": 1.5}


def alternate(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Best wall seconds of each function over ``repeats`` rounds, taking turns."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, 1, warmup=0))
    return {name: min(t) for name, t in times.items()}


@torch.no_grad()
def prefill(ours, theirs, lengths: list[int], repeats: int, vocab: int) -> list[dict]:
    rows = []
    for T in lengths:
        ids = torch.randint(3, vocab, (1, T))
        fns = {
            "turbos": partial(ours, ids, use_cache=True, logits_to_keep=1),
            "nemotron_h": partial(theirs, ids, use_cache=True, logits_to_keep=1),
        }
        for fn in fns.values():  # warm-up (allocator, oneDNN primitives)
            fn()
        best = alternate(fns, repeats)
        row = {
            "tokens": T,
            **{f"{k}_s": v for k, v in best.items()},
            "speedup": best["nemotron_h"] / best["turbos"],
        }
        rows.append(row)
        print(
            f"prefill {T:>6}: turbos {T / best['turbos']:8.0f} tok/s  "
            f"NemotronH {T / best['nemotron_h']:8.0f} tok/s  {row['speedup']:.2f}x",
            flush=True,
        )
    return rows


def decode(ours, theirs, tokenizer, args: argparse.Namespace) -> list[dict]:
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        ours_d, theirs_d = ours.to(dtype), theirs.to(dtype)
        floor = weight_floor_s(ours_d)
        for batch in args.batches:
            engine = LLMEngine(ours_d, tokenizer, max_running=batch, prefill_chunk=args.prompt_len)
            prompts = torch.randint(9, ours.config.vocab_size, (batch, args.prompt_len)).tolist()
            engine_decode_s(engine, prompts, 3)  # warm-up
            hf_decode_s(theirs_d, prompts, 3)
            t_ours, t_hf = [], []
            for _ in range(args.repeats):
                t_ours.append(engine_decode_s(engine, prompts, args.new_tokens))
                t_hf.append(hf_decode_s(theirs_d, prompts, args.new_tokens))
            steps = args.new_tokens - 1
            row = {
                "dtype": dtype_name,
                "batch": batch,
                "turbos_ms_per_step": 1e3 * min(t_ours) / steps,
                "nemotron_h_ms_per_step": 1e3 * min(t_hf) / steps,
            }
            row["speedup"] = row["nemotron_h_ms_per_step"] / row["turbos_ms_per_step"]
            if batch == 1:
                row["weight_floor_ms"] = floor * 1e3
                row["turbos_over_floor"] = row["turbos_ms_per_step"] / row["weight_floor_ms"]
            rows.append(row)
            print(
                f"decode {dtype_name} batch {batch:>2}: turbos {row['turbos_ms_per_step']:.2f} ms/step  "
                f"NemotronH {row['nemotron_h_ms_per_step']:.2f} ms/step  {row['speedup']:.2f}x"
                + (
                    f"  (floor {row['weight_floor_ms']:.2f} ms: {row['turbos_over_floor']:.2f}x)"
                    if batch == 1
                    else ""
                ),
                flush=True,
            )
    ours.float(), theirs.float()
    return rows


def train_step(ours, theirs, args: argparse.Namespace) -> dict:
    ours.train(), theirs.train()
    ids = torch.randint(3, ours.config.vocab_size, (args.train_batch, args.train_len))
    fns = {"turbos": make_step(ours, ids), "nemotron_h": make_step(theirs, ids)}
    for fn in fns.values():  # warm-up: optimizer state, oneDNN primitives
        fn()
    best = alternate(fns, args.repeats)
    row = {f"{k}_s": v for k, v in best.items()} | {"speedup": best["nemotron_h"] / best["turbos"]}
    print(f"train step {args.train_batch} x {args.train_len}: {row['speedup']:.2f}x", flush=True)
    return row


def top_ops(fn, rows: int = 12) -> list[dict]:
    """Where fn's time goes: the operators with the most self CPU time in one run (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:rows]
    ]


def profiles(ours, theirs, args: argparse.Namespace) -> dict:
    """Top operators of each model in a prefill of --profile-len tokens and in a training step."""
    ids = torch.randint(3, ours.config.vocab_size, (1, args.profile_len))
    out = {}
    with torch.no_grad():
        for name, model in (("turbos", ours), ("nemotron_h", theirs)):
            model.eval()
            out[f"prefill_{name}"] = top_ops(partial(model, ids, use_cache=True, logits_to_keep=1))
    batch = torch.randint(3, ours.config.vocab_size, (args.train_batch, args.train_len))
    for name, model in (("turbos", ours), ("nemotron_h", theirs)):
        model.train()
        step = make_step(model, batch)
        step()  # optimizer state first
        out[f"train_step_{name}"] = top_ops(step)
    for key, rows in out.items():
        print(f"{key}: " + ", ".join(f"{r['op']} {100 * r['share']:.0f}%" for r in rows[:6]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile-len", type=int, default=2048, help="prefill length of the profiles")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)

    ours, theirs = identical_pair(get_preset(args.preset))
    check = torch.randint(3, ours.config.vocab_size, (2, 200))
    with torch.no_grad():
        parity = (ours(check).logits - theirs(check).logits).abs().max().item()
    print(f"same weights: max |turbos - NemotronH| logits = {parity:.2e}", flush=True)
    if parity > 1e-4:
        raise SystemExit("the two models disagree: timings would compare different computations")

    texts = [render_document(p) for p in generate_problems(400)]
    tokenizer = train_tokenizer(texts, vocab_size=min(1024, ours.config.vocab_size))
    pre = prefill(ours, theirs, args.lengths, args.repeats, ours.config.vocab_size)
    dec = decode(ours, theirs, tokenizer, args)
    train = train_step(ours, theirs, args)
    profile = profiles(ours, theirs, args)

    first, last = pre[0], pre[-1]
    growth = (last["turbos_s"] / last["tokens"]) / (first["turbos_s"] / first["tokens"])
    met = {
        "prefill": all(r["speedup"] >= TARGETS["prefill"] for r in pre),
        "decode_floor_ratio": all(
            r["turbos_over_floor"] <= TARGETS["decode_floor_ratio"] for r in dec if r["batch"] == 1
        ),
        "train_step": train["speedup"] >= TARGETS["train_step"],
    }
    payload = {
        "benchmark": "identical_weights",
        "preset": args.preset,
        "baseline": "transformers NemotronHForCausalLM (PyTorch path, sdpa), the same weights converted",
        "logits_parity_max_abs": parity,
        "parameters": ours.num_parameters(),
        "machine": machine(),
        "prefill": pre,
        "prefill_time_per_token_growth": {"from": first["tokens"], "to": last["tokens"], "ratio": growth},
        "decode": dec,
        "train_step": {"batch": args.train_batch, "seq_len": args.train_len, **train},
        "targets": TARGETS,
        "met": met,
        "profiles": profile,
        "wall_s": time.perf_counter() - started,
    }
    path = write_json("identical_weights.json", payload)
    plot(pre, dec, train, RESULTS / "identical_weights.png")
    print(f"time per prefill token, {last['tokens']} vs {first['tokens']}: {growth:.2f}x; targets met: {met}")
    print(f"wrote {path} and identical_weights.png ({payload['wall_s']:.0f} s)")


def plot(pre: list[dict], dec: list[dict], train: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["tokens"] for r in pre], [r["speedup"] for r in pre], "o-", label="prefill")
    left.axhline(TARGETS["prefill"], ls="--", c="grey", label="target 1.5x")
    left.axhline(1.0, c="black", lw=0.5)
    left.set(xscale="log", xlabel="prompt tokens", ylabel="speed-up over transformers (x)")
    left.set_title("Prefill, identical NemotronH weights")
    left.legend()
    labels = [f"{r['dtype']} b{r['batch']}" for r in dec] + ["train step"]
    values = [r["speedup"] for r in dec] + [train["speedup"]]
    right.bar(labels, values, color=["C0"] * len(dec) + ["C2"])
    right.axhline(1.0, c="black", lw=0.5)
    right.set(ylabel="speed-up over transformers (x)", title="Decode and training")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
