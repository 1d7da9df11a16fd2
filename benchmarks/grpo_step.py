"""One GRPO iteration, turbos vs TRL's `GRPOTrainer`, split into rollout / reference / update.

Same prompts (built-in questions in our chat format), group size, batch (every prompt's group in
one optimizer step), completion length, reward (the share of digits in the reply, a toy reward
both compute in microseconds), KL to a frozen reference, fp32 on CPU, random weights of the same
dimensions: turbos `tiny` (the demo's model) against a Hugging Face NemotronH of the same
dimensions (`common.nemotron_h_like`), on the same tokenizer. Random weights rarely stop, so both
generate about ``--max-new-tokens`` per completion. The two alternate in one process, ``--rounds``
times, each after ``--warmup`` untimed iterations (2: the first two forward passes of a process
touch fresh memory and run 4x slower on CPU, for both).

- ours: `turbos.rl.run_grpo` with `updates_per_rollout=1` (one rollout, one update), no prompt
  filter, no adaptive shaping; its metrics give `rollout_s` (engine generation of the whole
  group batch, plus scoring), `reference_s` and `update_s` (packing, forward + backward, AdamW);
- TRL: `benchmarks/grpo_trl.py` (`GRPOTrainer._generate` = rollout, reference log-probs, the
  rest of the step = scoring + update; its scoring, which our rollout includes, is counted with
  its update in the ratios and the plot).

    python benchmarks/grpo_step.py [--prompts 16] [--group 8] [--max-new-tokens 64] [--rounds 3]

Needs the bench extra (`pip install -e '.[bench]'`). Writes benchmarks/results/grpo_step.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, nemotron_h_like, write_json  # noqa: E402
from grpo_trl import digit_fraction_reward, hf_tokenizer, quick_tokenizer, trl_grpo_iteration  # noqa: E402
from turbos.data.tasks import generate_problems  # noqa: E402
from turbos.data.tokenizer import END_TOKEN, EOS_ID, save_tokenizer  # noqa: E402
from turbos.model import TurboSForCausalLM  # noqa: E402
from turbos.presets import get_preset  # noqa: E402
from turbos.rl import GRPORecipe, run_grpo  # noqa: E402
from turbos.serve.chat_template import render_chat, save_chat_template  # noqa: E402


def digits(prompts, completions, **meta) -> list[float]:
    return digit_fraction_reward(list(completions))


def ours_iteration(model_dir: Path, problems_file: Path, args: argparse.Namespace, work: Path) -> dict:
    """One timed GRPO iteration of turbos (after ``--warmup`` untimed ones), from its metrics."""
    recipe = GRPORecipe.from_dict(
        {
            "model": str(model_dir),
            "output_dir": str(work),
            "prompts": {"path": str(problems_file)},
            "adaptive": {"enabled": False},
            "filter_prompts": False,
            "max_refills": 0,  # one generation round, as TRL (no dynamic sampling)
            "group_size": args.group,
            "prompts_per_rollout": args.prompts,
            "updates_per_rollout": 1,
            "steps": args.warmup + 1,
            "max_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "kl_coef": 0.04,
            "lr": 1e-6,
            "success": 0.5,
            "device": "cpu",
            "max_running": args.prompts * args.group,
            "pack_len": args.pack_len,
            "seed": args.seed,
        }
    )
    run_grpo(recipe, reward_fn=digits, progress=False, overwrite=True)
    record = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    parts = {
        "rollout_s": record["rollout_s"],
        "reference_s": record["reference_s"],
        "update_s": record["update_s"],
    }
    return {
        **parts,
        "iteration_s": sum(parts.values()),
        "completion_tokens": record["rollout_tokens"],
        "rollout_tok_s": record["rollout_tokens_per_s"],
    }


def plot(result: dict, path: Path) -> None:
    from turbos.train.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = ["turbos", f"TRL {result['trl']['trl']}"]
    left = [0.0, 0.0]
    for part, color in (("rollout", "C0"), ("reference", "C1"), ("update", "C2")):
        values = [
            result["ours"][f"{part}_s"],
            result["trl"][f"{part}_s"] + (result["trl"]["scoring_s"] if part == "update" else 0),
        ]
        ax.barh(names, values, left=left, color=color, label=part)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlabel("seconds per GRPO iteration (median of rounds)")
    ax.set_title(
        f"{result['prompts']} prompts x {result['group']} samples, {result['max_new_tokens']} new tokens: "
        f"{result['ratio']['iteration']:.2f}x"
    )
    ax.legend()
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pack-len", type=int, default=1024, help="our update's packed row width")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations before the timed one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = get_preset(args.preset)
    torch.manual_seed(args.seed)
    tokenizer = quick_tokenizer(config.vocab_size)
    problems = generate_problems(args.prompts, seed=args.seed)
    prompts = [render_chat([{"role": "user", "content": p.question}], mode="auto") for p in problems]
    with tempfile.TemporaryDirectory(prefix="grpo_step_") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "turbos"
        TurboSForCausalLM(config).save_pretrained(model_dir)
        save_chat_template(save_tokenizer(tokenizer, model_dir))
        problems_file = tmp / "problems.jsonl"
        problems_file.write_text(
            "".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in problems)
        )
        hf_tok = hf_tokenizer(tokenizer, tmp / "hf-tokenizer")
        theirs = nemotron_h_like(config)
        eos = [hf_tok.convert_tokens_to_ids(END_TOKEN), EOS_ID]  # as our engine: <|end|> or <|eos|>
        ours_rows, trl_rows = [], []
        for r in range(args.rounds):
            ours_rows.append(ours_iteration(model_dir, problems_file, args, tmp / f"run-{r}"))
            trl_rows.append(
                trl_grpo_iteration(
                    theirs,
                    hf_tok,
                    prompts,
                    args.group,
                    args.max_new_tokens,
                    1,
                    args.seed,
                    warmup=args.warmup,
                    eos_token_ids=eos,
                )
            )
            print(
                f"round {r + 1}: turbos {ours_rows[-1]['iteration_s']:.2f} s, "
                f"TRL {trl_rows[-1]['iteration_s']:.2f} s",
                flush=True,
            )

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    ours = {k: median(ours_rows, k) for k in ours_rows[0]}
    trl_keys = (
        "iteration_s",
        "rollout_s",
        "reference_s",
        "scoring_s",
        "update_s",
        "completion_tokens",
        "rollout_tok_s",
    )
    trl = {k: median(trl_rows, k) for k in trl_keys} | {
        "trl": trl_rows[0]["trl"],
        "settings": trl_rows[0]["settings"],
    }
    ratio = {
        "iteration": trl["iteration_s"] / ours["iteration_s"],
        "rollout": trl["rollout_s"] / ours["rollout_s"],
        "reference": trl["reference_s"] / ours["reference_s"],
        "update": (trl["update_s"] + trl["scoring_s"]) / ours["update_s"],
        "rollout_tok_s": ours["rollout_tok_s"] / trl["rollout_tok_s"],
    }
    result = {
        "preset": args.preset,
        "prompts": args.prompts,
        "group": args.group,
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "pack_len": args.pack_len,
        "ours": ours,
        "trl": trl,
        "ratio": ratio,
        "target": {"iteration_ratio": 2.0, "met": ratio["iteration"] >= 2.0},
        "all": {"ours": ours_rows, "trl": [{k: row[k] for k in trl_keys} for row in trl_rows]},
        "machine": machine(),
    }
    path = write_json("grpo_step.json", result)
    plot(result, RESULTS / "grpo_step.png")
    for part in ("iteration", "rollout", "reference", "update"):
        print(
            f"{part:10s} turbos {ours[f'{part}_s']:7.2f} s   TRL {trl[f'{part}_s']:7.2f} s   "
            f"{ratio[part]:.2f}x"
        )
    print(f"rollout tokens/s: turbos {ours['rollout_tok_s']:.0f}, TRL {trl['rollout_tok_s']:.0f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
