"""Mamba state precision study (report §5: bf16 state made long generations repetitive; fp32 cut
tokens by 35-45% on hard reasoning): the demo's model with its cached SSM state kept in fp32, bf16
or fp16 (``mamba_state_dtype``: the state is rounded to that dtype after every update).

1. Drift: the fp32 model samples a think-mode continuation of ``--drift-tokens`` tokens; every
   dtype then reads the same tokens one decode step at a time, and we record how far its logits
   are from fp32's (max |diff| and KL) along the sequence.
2. Generation: think-mode answers to held-out problems of the hardest levels with each dtype,
   greedy and sampled: accuracy, mean tokens, share that hit the token limit, and the repeated
   4-gram rate (the share of each answer's 4-grams that already occurred earlier in it).

    python benchmarks/mamba_state_dtype.py --model runs/demo/grpo/model

Writes benchmarks/results/mamba_state_dtype.json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402
from turbos.data.tokenizer import load_tokenizer  # noqa: E402
from turbos.model import HybridCache, TurboSForCausalLM  # noqa: E402
from turbos.post.evaluate import answer_problems, builtin_problems  # noqa: E402
from turbos.serve import LLMEngine, SamplingParams  # noqa: E402
from turbos.serve.chat_template import prepare_chat  # noqa: E402
from turbos.train.plots import pyplot, save_figure  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def with_state_dtype(model: TurboSForCausalLM, dtype: str, max_len: int) -> TurboSForCausalLM:
    """The same weights with the Mamba state kept in ``dtype``, allowed ``max_len`` tokens (the
    demo's model trained on 1024 at most: past that its text is noise, but the drift between state
    precisions is still what the report's claim is about)."""
    limit = max(max_len, model.config.max_position_embeddings)
    other = TurboSForCausalLM(model.config.replace(mamba_state_dtype=dtype, max_position_embeddings=limit))
    other.load_state_dict(model.state_dict())
    return other.eval()


def repeated_ngram_rate(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams of ``tokens`` that occurred earlier in it."""
    seen, repeated, grams = set(), 0, [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams) if grams else 0.0


@torch.no_grad()
def teacher_forced_logits(model: TurboSForCausalLM, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Logits (T - prompt_len, vocab) of every token after the prompt, one decode step at a time."""
    cache = HybridCache(model.config, 1)
    out = [model(torch.tensor([ids[:prompt_len]]), past_key_values=cache, logits_to_keep=1).logits[0, -1]]
    for token in ids[prompt_len:-1]:
        out.append(model(torch.tensor([[token]]), past_key_values=cache).logits[0, -1])
    return torch.stack(out)


def drift(models: dict[str, TurboSForCausalLM], tokenizer, args: argparse.Namespace) -> dict:
    question = builtin_problems(1, None, [max(args.levels)], seed=1)[0].question
    chat = prepare_chat([{"role": "user", "content": question}], "think")
    engine = LLMEngine(models["float32"], tokenizer, max_running=1, seed=0)
    params = SamplingParams(temperature=1.0, max_tokens=args.drift_tokens, ignore_eos=True, seed=0)
    prompt = tokenizer.encode(chat.text).ids
    sample = engine.generate([chat.text], [params])[0].token_ids  # no stop tokens: the full length
    ids = prompt + list(sample)
    ref = teacher_forced_logits(models["float32"], ids, len(prompt))
    out = {"prompt_tokens": len(prompt), "generated_tokens": len(sample)}
    for name, model in models.items():
        if name == "float32":
            continue
        logits = teacher_forced_logits(model, ids, len(prompt))
        max_abs = (logits - ref).abs().amax(-1)
        kl = torch.nn.functional.kl_div(
            logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
        )
        kl = kl.sum(-1)
        flips = (logits.argmax(-1) != ref.argmax(-1)).float()
        out[name] = {
            "max_abs_logit_diff": max_abs.tolist(),
            "kl_to_fp32": kl.tolist(),
            "argmax_changed_share": flips.mean().item(),
            "max_abs_logit_diff_overall": max_abs.max().item(),
            "mean_kl": kl.mean().item(),
        }
        print(
            f"drift {name}: max |logit diff| {max_abs.max().item():.3e}, mean KL {kl.mean().item():.3e}, "
            f"greedy choice changed at {100 * flips.mean().item():.2f}% of {len(sample)} positions",
            flush=True,
        )
    return out


def generation(models: dict[str, TurboSForCausalLM], tokenizer, args: argparse.Namespace) -> list[dict]:
    problems = builtin_problems(args.problems, None, args.levels, seed=0)
    rows = []
    for temperature in (0.0, 1.0):
        for name, model in models.items():
            engine = LLMEngine(model, tokenizer, max_running=32, seed=0)
            answers = answer_problems(engine, problems, "think", args.max_tokens, temperature, seed=0)
            ids = [tokenizer.encode(a.text).ids for a in answers]
            row = {
                "state_dtype": name,
                "temperature": temperature,
                "accuracy": statistics.mean(a.correct for a in answers),
                "mean_tokens": statistics.mean(a.tokens for a in answers),
                "hit_limit_share": statistics.mean(a.tokens >= args.max_tokens for a in answers),
                "repeated_4gram_rate": statistics.mean(repeated_ngram_rate(t) for t in ids),
            }
            rows.append(row)
            print(
                f"think, T={temperature}, {name:>8} state: accuracy {100 * row['accuracy']:.1f}%  "
                f"tokens {row['mean_tokens']:.1f}  at limit {100 * row['hit_limit_share']:.1f}%  "
                f"repeated 4-grams {100 * row['repeated_4gram_rate']:.1f}%",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo/grpo/model"))
    parser.add_argument("--drift-tokens", type=int, default=4096)
    parser.add_argument("--problems", type=int, default=240, help="held-out problems of --levels")
    parser.add_argument("--levels", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no model at {args.model}: run `turbos demo --out runs/demo` first")
    started = time.perf_counter()
    torch.manual_seed(0)
    base = TurboSForCausalLM.from_pretrained(args.model)
    tokenizer = load_tokenizer(args.model)
    models = {name: with_state_dtype(base, name, args.drift_tokens + 512) for name in DTYPES}
    drift_result = drift(models, tokenizer, args)
    rows = generation(models, tokenizer, args)
    payload = {
        "benchmark": "mamba_state_dtype",
        "model": str(args.model),
        "machine": machine(),
        "drift": drift_result,
        "generation": {
            "levels": args.levels,
            "problems": args.problems,
            "max_tokens": args.max_tokens,
            "rows": rows,
        },
        "wall_s": time.perf_counter() - started,
    }
    path = write_json("mamba_state_dtype.json", payload)
    plot(drift_result, rows, RESULTS / "mamba_state_dtype.png")
    print(f"wrote {path} and mamba_state_dtype.png ({payload['wall_s']:.0f} s)")


def plot(drift_result: dict, rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in DTYPES[1:]:
        left.plot(drift_result[name]["max_abs_logit_diff"], lw=0.6, label=f"{name} state")
    left.set(yscale="log", xlabel="generated token", ylabel="max |logit - fp32 logit|")
    left.set_title("Logit drift against an fp32 state")
    left.legend()
    for temperature, marker in ((0.0, "o"), (1.0, "s")):
        chosen = [r for r in rows if r["temperature"] == temperature]
        right.plot(
            [r["state_dtype"] for r in chosen],
            [100 * r["repeated_4gram_rate"] for r in chosen],
            marker=marker,
            label=f"repeated 4-grams, T={temperature}",
        )
        right.plot(
            [r["state_dtype"] for r in chosen],
            [100 * r["accuracy"] for r in chosen],
            marker=marker,
            ls="--",
            label=f"accuracy, T={temperature}",
        )
    right.set(ylabel="%", title="Think-mode answers, hardest levels")
    right.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
