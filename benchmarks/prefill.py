"""Prefill throughput of turbos `small` vs a Hugging Face NemotronH of the same dimensions.

Both run their PyTorch path on the same machine in the same process, alternating, batch 1, at
512 / 2048 / 8192 tokens: one forward that fills the cache and returns the last logits.
Also times the Mamba2 mixer alone at each length to check that its cost grows linearly.

    python benchmarks/prefill.py [--lengths 512 2048 8192] [--repeats 3]

Writes benchmarks/results/prefill.json and prefill.png.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, nemotron_h_like, time_call, write_json  # noqa: E402
from turbos.model import TurboSForCausalLM  # noqa: E402
from turbos.presets import get_preset  # noqa: E402
from turbos.train.plots import pyplot, save_figure  # noqa: E402


def best_of(fn, repeats: int) -> float:
    return min(time_call(fn, 1, warmup=0) for _ in range(repeats))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = get_preset(args.preset)
    ours = TurboSForCausalLM(config).eval()
    theirs = nemotron_h_like(config)
    mamba = next(layer.mixer for layer in ours.model.layers if layer.kind == "M")
    rows = []
    for T in args.lengths:
        ids = torch.randint(0, config.vocab_size, (1, T))
        x = torch.randn(1, T, config.hidden_size)
        ours(ids, use_cache=True, logits_to_keep=1)  # warm-up (allocator, oneDNN primitives)
        theirs(ids, use_cache=True, logits_to_keep=1)
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):  # alternate so background load hits both alike
            t_ours.append(best_of(partial(ours, ids, use_cache=True, logits_to_keep=1), 1))
            t_theirs.append(best_of(partial(theirs, ids, use_cache=True, logits_to_keep=1), 1))
        t_mamba = best_of(partial(mamba, x), args.repeats)
        row = {
            "tokens": T,
            "turbos_s": min(t_ours),
            "nemotron_h_s": min(t_theirs),
            "turbos_tok_s": T / min(t_ours),
            "nemotron_h_tok_s": T / min(t_theirs),
            "speedup": min(t_theirs) / min(t_ours),
            "mamba2_layer_s": t_mamba,
        }
        rows.append(row)
        print(
            f"{T:>6} tokens  turbos {row['turbos_tok_s']:>8.0f} tok/s  "
            f"NemotronH {row['nemotron_h_tok_s']:>8.0f} tok/s  ratio {row['speedup']:.2f}x  "
            f"(one Mamba2 layer {t_mamba * 1000:.1f} ms)"
        )
    by_len = {r["tokens"]: r for r in rows}
    growth = None
    if 2048 in by_len and 8192 in by_len:
        growth = by_len[8192]["mamba2_layer_s"] / by_len[2048]["mamba2_layer_s"]
        print(f"Mamba2 layer time 8192 vs 2048 tokens: {growth:.2f}x (linear = 4x; target <= 4.5x)")
    payload = {
        "benchmark": "prefill",
        "preset": args.preset,
        "baseline": "transformers NemotronHForCausalLM, same dimensions, PyTorch path, sdpa attention",
        "batch": 1,
        "machine": machine(),
        "parameters": {
            "turbos": ours.num_parameters(),
            "nemotron_h": sum(p.numel() for p in theirs.parameters()),
        },
        "rows": rows,
        "mamba2_growth_8192_vs_2048": growth,
        "targets": {"speedup_at_every_length": 1.0, "mamba2_growth_max": 4.5},
        "met": {
            "speedup": all(r["speedup"] >= 1.0 for r in rows),
            "linear_mamba2": growth is not None and growth <= 4.5,
        },
    }
    path = write_json("prefill.json", payload)
    plot(rows, RESULTS / "prefill.png")
    print(f"wrote {path} and {RESULTS / 'prefill.png'}")


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    lengths = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [r["turbos_tok_s"] for r in rows], "o-", label="turbos (ours)")
    ax.plot(lengths, [r["nemotron_h_tok_s"] for r in rows], "s--", label="HF NemotronH (same dims)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill tokens / s")
    ax.set_title("Prefill throughput, `small` preset, batch 1, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
