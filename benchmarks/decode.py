"""Decode speed of the turbos engine: vs Hugging Face generate(), and hybrid vs pure attention.

1. `small` preset in our engine vs `transformers` NemotronH of the same dimensions with
   `generate()`: greedy, same prompt length, fixed number of new tokens, batch 1 and 16. Decode
   time = time(N new tokens) - time(1 new token), so prefill cancels out; both alternate in one
   process and the best of `--repeats` runs counts.
2. The `small` hybrid vs a pure-attention layout of about the same parameter count (Mamba2 layers
   replaced by enough attention layers, same hidden size and FFN layers) in the same engine, batch
   1, at 2K / 8K / 32K tokens of context: prefill time (one forward, `prefill_chunk` = context),
   decode tokens/s (steps after the prefill) and the decoding state held (KV + Mamba state).

    python benchmarks/decode.py [--threads 1] [--contexts 2048 8192 32768] [--device cuda]

The comparison with HF runs in fp32 and bf16 (both sides in the same dtype; our Mamba state stays
fp32), and with our weights in int8 (bf16 activations) against HF in bf16. It also measures the
time to stream one token's weights from memory once, the floor of any batch-1 decode step on this
machine; ``speedup_ceiling`` = HF's step time / that floor.

Writes benchmarks/results/decode.json and decode.png (decode_cuda.* with ``--device cuda``, where
the int8 row is left out by default: int8 has no CUDA kernel here, only the dequantizing reference
path). The hybrid-vs-attention part is fp32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, nemotron_h_like, write_json  # noqa: E402
from turbos.config import TurboSConfig  # noqa: E402
from turbos.data.tasks import generate_problems, render_document  # noqa: E402
from turbos.data.tokenizer import train_tokenizer  # noqa: E402
from turbos.model import TurboSForCausalLM  # noqa: E402
from turbos.model.moe import RoutedExperts  # noqa: E402
from turbos.model.quant import Int8Linear, Int8RoutedExperts, int8_linear, quantize_int8_  # noqa: E402
from turbos.presets import get_preset  # noqa: E402
from turbos.serve import LLMEngine, SamplingParams  # noqa: E402
from turbos.train.plots import pyplot, save_figure  # noqa: E402


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so host clocks time it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def engine_decode_s(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for new_tokens - 1 decode steps of the whole batch (prefill subtracted)."""

    def run(n: int) -> float:
        sync(engine.device)
        start = time.perf_counter()
        results = engine.generate(prompts, greedy(n))
        assert all(len(r.token_ids) == n for r in results)
        sync(engine.device)
        return time.perf_counter() - start

    return run(new_tokens) - run(1)


@torch.no_grad()
def hf_decode_s(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts, device=model.device)

    def run(n: int) -> float:
        sync(model.device)
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape[1] == ids.shape[1] + n
        sync(model.device)
        return time.perf_counter() - start

    return run(new_tokens) - run(1)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}
"""Row label -> activation dtype of both sides; "int8": our weights int8 (``--quantization int8``),
HF's bf16 (transformers has no int8 path of its own for NemotronH on CPU)."""


def token_weights(model: TurboSForCausalLM) -> list[torch.Tensor]:
    """The weight matrices one decode step of one token must read: every linear layer, the LM head
    and, per MoE layer, top_k of the routed experts (the embedding contributes one row only)."""
    weights = []
    k = model.config.num_experts_per_tok
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weights.append(module.weight)
        elif isinstance(module, Int8Linear):
            weights.append(module.qweight)
        elif isinstance(module, Int8RoutedExperts):
            weights += [*getattr(module, f"{module.in_proj_name}_q")[:k], *module.down_proj_q[:k]]
        elif isinstance(module, RoutedExperts):
            weights += [*getattr(module, module.in_proj_name)[:k], *module.down_proj[:k]]
    return weights


def weight_floor_s(model: TurboSForCausalLM, repeats: int = 20) -> float:
    """Seconds to stream one token's weights through F.linear: a memory-bandwidth floor for a
    batch-1 decode step in the model's dtype, whatever the implementation (on CUDA the products
    replay as one graph, so the floor holds their kernels' time, not Python's launches)."""
    weights = token_weights(model)
    dtype, device = model.model.embed_tokens.weight.dtype, model.model.embed_tokens.weight.device
    inputs = [torch.randn(1, w.shape[1], dtype=dtype, device=device) for w in weights]
    ones = {w.shape[0]: torch.ones(w.shape[0], dtype=dtype, device=device) for w in weights}  # int8 scales

    def run() -> None:
        for x, w in zip(inputs, weights, strict=True):
            if w.dtype == torch.int8:
                int8_linear(x, w, ones[w.shape[0]])
            else:
                torch.nn.functional.linear(x, w)

    run()
    step = run
    if device.type == "cuda":  # one graph: the kernels' own time, not their launches from Python
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        step = graph.replay
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def versus_hf(config: TurboSConfig, tokenizer, args: argparse.Namespace) -> list[dict]:
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        ours = TurboSForCausalLM(config).eval().to(args.device, dtype)
        if dtype_name == "int8":
            quantize_int8_(ours)
        theirs = nemotron_h_like(config).to(args.device, dtype)
        floor = weight_floor_s(ours)
        print(f"{dtype_name}: streaming one token's weights takes {floor * 1e3:.2f} ms", flush=True)
        rows += versus_hf_rows(ours, theirs, tokenizer, args, dtype_name, floor)
    return rows


def versus_hf_rows(ours, theirs, tokenizer, args, dtype_name: str, floor: float) -> list[dict]:
    config = ours.config
    rows = []
    for batch in args.batches:
        engine = LLMEngine(ours, tokenizer, max_running=batch, prefill_chunk=args.prompt_len)
        # On CUDA the engine replays decode steps as CUDA graphs; the eager engine is timed too.
        eager = None
        if engine.runner.graphs is not None:
            eager = LLMEngine(
                ours, tokenizer, max_running=batch, prefill_chunk=args.prompt_len, cuda_graphs=False
            )
        prompts = torch.randint(9, config.vocab_size, (batch, args.prompt_len)).tolist()
        engine_decode_s(engine, prompts, 3)  # warm-up (and graph capture)
        hf_decode_s(theirs, prompts, 3)
        t_ours, t_hf, t_eager = [], [], []
        for _ in range(args.repeats):  # alternate so background load hits both alike
            t_ours.append(engine_decode_s(engine, prompts, args.new_tokens))
            t_hf.append(hf_decode_s(theirs, prompts, args.new_tokens))
            if eager is not None:
                t_eager.append(engine_decode_s(eager, prompts, args.new_tokens))
        tokens = batch * (args.new_tokens - 1)
        row = {
            "dtype": dtype_name,
            "batch": batch,
            "prompt_tokens": args.prompt_len,
            "new_tokens": args.new_tokens,
            "turbos_tok_s": tokens / min(t_ours),
            "hf_nemotron_h_tok_s": tokens / min(t_hf),
        }
        row["speedup"] = row["turbos_tok_s"] / row["hf_nemotron_h_tok_s"]
        if t_eager:
            row["turbos_eager_tok_s"] = tokens / min(t_eager)
            row["speedup_eager"] = row["turbos_eager_tok_s"] / row["hf_nemotron_h_tok_s"]
        if batch == 1:
            # No batch-1 step can beat the time to read its weights once.
            row["weight_floor_ms"] = floor * 1e3
            row["turbos_ms_per_token"] = 1e3 / row["turbos_tok_s"]
            row["hf_ms_per_token"] = 1e3 / row["hf_nemotron_h_tok_s"]
            row["speedup_ceiling"] = row["hf_ms_per_token"] / row["weight_floor_ms"]
        rows.append(row)
        print(
            f"{dtype_name} batch {batch:>2}: turbos engine {row['turbos_tok_s']:8.1f} tok/s   "
            f"HF NemotronH generate {row['hf_nemotron_h_tok_s']:8.1f} tok/s   ratio {row['speedup']:.2f}x"
            + (f" (weight-read ceiling {row['speedup_ceiling']:.2f}x)" if batch == 1 else "")
            + (f"; eager engine {row['speedup_eager']:.2f}x" if t_eager else ""),
            flush=True,
        )
    return rows


def pure_attention_layout(config: TurboSConfig) -> str:
    """Each Mamba2 layer replaced by attention layers of about the same parameter count, the
    attention layers spread evenly before the FFN layers."""
    per_layer = {}
    model = TurboSForCausalLM(config)
    for layer in model.model.layers:
        per_layer.setdefault(layer.kind, sum(p.numel() for p in layer.parameters()))
    kinds = config.layer_types
    attention = round(
        (kinds.count("A") * per_layer["A"] + kinds.count("M") * per_layer["M"]) / per_layer["A"]
    )
    ffn = kinds.count("F")
    blocks = ["A" * (attention // ffn + (i < attention % ffn)) + "F" for i in range(ffn)]
    return " ".join(blocks)


@torch.no_grad()
def long_context(config: TurboSConfig, tokenizer, args: argparse.Namespace) -> tuple[list[dict], dict]:
    longest = max(args.contexts) + args.long_new_tokens
    layouts = {"hybrid": config.layout, "attention": pure_attention_layout(config)}
    models, params = {}, {}
    for name, layout in layouts.items():
        torch.manual_seed(0)
        cfg = config.replace(layout=layout, max_position_embeddings=longest)
        models[name] = TurboSForCausalLM(cfg).eval().to(args.device)
        params[name] = {"layout": layout, "parameters": models[name].num_parameters()}
        print(f"{name:>9}: layout {layout!r}, {params[name]['parameters'] / 1e6:.1f}M parameters", flush=True)
    rows = []
    for context in args.contexts:
        prompt = torch.randint(9, config.vocab_size, (context,)).tolist()
        for name, model in models.items():
            engine = LLMEngine(model, tokenizer, max_running=1, prefill_chunk=context)
            request_id = engine.add_request(prompt, greedy(args.long_new_tokens))
            sync(engine.device)
            start = time.perf_counter()
            engine.step()  # the prefill, then the first decode step of the running batch
            sync(engine.device)
            first_step = time.perf_counter() - start
            cache_bytes = engine.cache.nbytes()
            start = time.perf_counter()
            steps = 0
            while engine.has_unfinished():
                engine.step()
                steps += 1
            sync(engine.device)
            decode = time.perf_counter() - start
            prefill = first_step - decode / steps
            row = {
                "layout": name,
                "context": context,
                "prefill_s": prefill,
                "decode_tok_s": steps / decode,
                "cache_bytes": cache_bytes,
            }
            rows.append(row)
            print(
                f"{context:>6} tokens {name:>9}: prefill {prefill:7.2f} s   decode "
                f"{row['decode_tok_s']:7.1f} tok/s   cache {cache_bytes / 2**20:8.1f} MiB   ({request_id})",
                flush=True,
            )
    return rows, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), help="default: all on CPU, fp32 and bf16 on CUDA"
    )
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument(
        "--long-new-tokens", type=int, default=9, help="tokens generated at each long context"
    )
    args = parser.parse_args()
    if args.dtypes is None:
        args.dtypes = ["fp32", "bf16"] if args.device.type == "cuda" else list(DTYPES)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    config = get_preset(args.preset)
    texts = [render_document(p) for p in generate_problems(400)]
    tokenizer = train_tokenizer(texts, vocab_size=min(1024, config.vocab_size))
    vs_hf = versus_hf(config, tokenizer, args)
    long_rows, layouts = long_context(config, tokenizer, args)

    at = {(r["layout"], r["context"]): r for r in long_rows}
    top = max(args.contexts)
    ratios = {
        "decode_speedup_at_longest": at[("hybrid", top)]["decode_tok_s"]
        / at[("attention", top)]["decode_tok_s"],
        "cache_fraction_at_longest": at[("hybrid", top)]["cache_bytes"]
        / at[("attention", top)]["cache_bytes"],
        "prefill_speedup_at_longest": at[("attention", top)]["prefill_s"] / at[("hybrid", top)]["prefill_s"],
    }
    batch1 = max((r["speedup"] for r in vs_hf if r["batch"] == 1), default=None)
    payload = {
        "benchmark": "decode",
        "preset": args.preset,
        "device": str(args.device),
        "dtype": "versus_hf: each row's dtype, both sides (Mamba state fp32); hybrid_vs_attention: fp32",
        "machine": machine(),
        "versus_hf": {
            "baseline": "transformers NemotronHForCausalLM.generate(), same dimensions and dtype, sdpa",
            "rows": vs_hf,
        },
        "hybrid_vs_attention": {"layouts": layouts, "rows": long_rows, "longest_context": top, **ratios},
        "targets": {"speedup_vs_hf_batch1": 3.0, "cache_fraction_max": 1 / 8, "decode_speedup_min": 2.0},
        "met": {
            "speedup_vs_hf_batch1": batch1 is not None and batch1 >= 3.0,
            "cache_fraction": ratios["cache_fraction_at_longest"] <= 1 / 8,
            "decode_speedup": ratios["decode_speedup_at_longest"] >= 2.0,
        },
        "wall_s": time.perf_counter() - started,
    }
    stem = "decode" if args.device.type == "cpu" else f"decode_{args.device.type}"
    path = write_json(f"{stem}.json", payload)
    plot(vs_hf, long_rows, RESULTS / f"{stem}.png")
    print(
        f"at {top} tokens: hybrid decode {ratios['decode_speedup_at_longest']:.2f}x, cache "
        f"{ratios['cache_fraction_at_longest']:.3f} of pure attention; wrote {path} and {stem}.png "
        f"({payload['wall_s']:.0f} s)"
    )


def plot(vs_hf: list[dict], rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    labels = [f"{r['dtype']}\nbatch {r['batch']}" for r in vs_hf]
    x = range(len(vs_hf))
    axes[0].bar([i - 0.2 for i in x], [r["turbos_tok_s"] for r in vs_hf], 0.4, label="turbos engine")
    axes[0].bar([i + 0.2 for i in x], [r["hf_nemotron_h_tok_s"] for r in vs_hf], 0.4, label="HF NemotronH")
    axes[0].set_xticks(list(x), labels)
    axes[0].set_ylabel("decode tokens / s")
    axes[0].set_title("`small`: engine vs HF generate()")
    axes[0].legend()
    for ax, key, ylabel, title in (
        (axes[1], "prefill_s", "seconds", "prefill time"),
        (axes[2], "decode_tok_s", "tokens / s", "decode speed (batch 1)"),
        (axes[3], "cache_bytes", "MiB", "decoding state (KV + Mamba)"),
    ):
        for layout, style in (("hybrid", "o-"), ("attention", "s--")):
            mine = [r for r in rows if r["layout"] == layout]
            scale = 2**20 if key == "cache_bytes" else 1
            ax.plot([r["context"] for r in mine], [r[key] / scale for r in mine], style, label=layout)
        ax.set_xscale("log", base=2)
        if key != "decode_tok_s":
            ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
