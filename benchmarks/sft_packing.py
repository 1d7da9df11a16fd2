"""SFT steps/s with a batch's conversations packed into rows (``packing: true``) vs one per row.

On a `turbos demo` run: the adaptive SFT (stage 4: the fused data and the general chats, the
demo's recipe ``turbos.post.demo.adaptive_sft_recipe``) and the short-CoT SFT (stage 2, its bare
answers), each trained ``--steps`` steps both ways from the run's pre-trained model, in this
process, taking turns; with the recipe's length grouping (``group_by_length``, batches of similar
lengths, little padding to remove) and without it (``--groups``). The two ways see the same
conversations in every step: packing only changes the rows they are laid out in. Without a demo
run, or with ``--builtin``, a small built-in stand-in is made first (a random `tiny` model; fused
and short data from built-in problems), so the benchmark can be smoke-tested anywhere.

    python benchmarks/sft_packing.py [--run runs/demo] [--steps 30] [--repeats 2] [--groups 8 1]

Writes benchmarks/results/<name>.json: per data set, grouping and layout the steps/s (step time
from the metrics log, the first step left out as warm-up), tokens/s, rows per batch and the padded
share of the token slots, and packing's speed-up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402
from turbos.data.tasks import generate_problems, render_short  # noqa: E402
from turbos.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402
from turbos.model import TurboSForCausalLM  # noqa: E402
from turbos.post.chat_data import general_records, short_cot_records, write_records  # noqa: E402
from turbos.post.cot_fusion import BuiltinTeacher, fuse_dataset, write_jsonl  # noqa: E402
from turbos.post.demo import DemoSettings, adaptive_sft_recipe, short_sft_recipe  # noqa: E402
from turbos.post.sft import ChatBatches, SFTRecipe, encode_datasets, run_sft  # noqa: E402
from turbos.presets import get_preset  # noqa: E402
from turbos.serve.chat_template import save_chat_template  # noqa: E402
from turbos.train.metrics import read_metrics  # noqa: E402


def builtin_run(out: Path, problems: int = 400) -> Path:
    """A stand-in demo run: a random `tiny` model, built-in problems answered directly (short
    CoT) and fused with the built-in teacher (a wrong answer on two in three, so most are long)."""
    items = generate_problems(problems, seed=0)
    records = short_cot_records(items)
    tokenizer = train_tokenizer((json.dumps(r["messages"]) for r in records), vocab_size=1024)
    model_dir = out / "pretrain" / "model"
    TurboSForCausalLM(get_preset("tiny", vocab_size=tokenizer.get_vocab_size())).save_pretrained(model_dir)
    save_tokenizer(tokenizer, model_dir)
    save_chat_template(model_dir)
    (out / "sft-short").mkdir(parents=True)
    write_records(records, out / "sft-short" / "short_cot.jsonl")
    replies = [render_short(p) if i % 3 == 0 else "Answer: 0" for i, p in enumerate(items)]
    examples, _ = fuse_dataset(items, replies, BuiltinTeacher())
    (out / "fusion").mkdir(parents=True)
    write_jsonl(examples, out / "fusion" / "fused.jsonl")
    write_records(general_records(problems // 8), out / "fusion" / "general.jsonl")
    (out / "settings.json").write_text(json.dumps(asdict(DemoSettings())))
    return out


def layout(recipe: SFTRecipe, steps: int) -> dict[str, float]:
    """Rows per batch and the padded share of the token slots over the first ``steps`` batches."""
    data = encode_datasets(recipe.data, load_tokenizer(recipe.model), recipe.max_len)
    batches = ChatBatches(data, recipe)
    rows = slots = tokens = 0
    for _ in range(steps):
        batch = next(batches)
        rows += batch.input_ids.shape[0]
        slots += batch.input_ids.numel()
        tokens += batch.num_tokens
    return {"rows_per_batch": rows / steps, "padded_share": 1 - tokens / slots}


def timed_run(recipe: SFTRecipe) -> dict[str, float]:
    """Train ``recipe``; steps/s and tokens/s from each step's time in the metrics log."""
    run_sft(recipe, progress=False, overwrite=True)
    records = read_metrics(recipe.output_dir)
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(records, records[1:], strict=False)]
    seconds = [n / r["tokens_per_s"] for n, r in zip(tokens, records[1:], strict=True)]
    return {
        "steps_per_s": len(seconds) / sum(seconds),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "final_lm_loss": records[-1]["lm_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a turbos demo folder")
    parser.add_argument(
        "--builtin", action="store_true", help="use the built-in stand-in even if --run exists"
    )
    parser.add_argument("--steps", type=int, default=30, help="SFT steps per timed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per data set and layout")
    parser.add_argument(
        "--groups", type=int, nargs="+", default=[8, 1], help="group_by_length values (8: the demo's)"
    )
    parser.add_argument("--name", default="sft_packing", help="results file name (no extension)")
    args = parser.parse_args()
    if args.steps < 3 or args.repeats < 1 or min(args.groups) < 1:
        raise SystemExit("need --steps >= 3 (the first is warm-up), --repeats >= 1 and --groups >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        builtin = args.builtin or not (args.run / "fusion" / "fused.jsonl").is_file()
        run = builtin_run(tmp / "builtin") if builtin else args.run
        if builtin:
            print(f"no demo run at {args.run} (or --builtin): using a built-in stand-in", flush=True)
        settings = DemoSettings.load(run / "settings.json")
        datasets = {"adaptive (fused + general)": adaptive_sft_recipe, "short-CoT": short_sft_recipe}
        rows = []
        for (name, make), group in itertools.product(datasets.items(), args.groups):
            base = replace(
                make(settings, run),
                steps=args.steps,
                warmup_steps=1,
                checkpoint_interval=0,
                group_by_length=group,
            )
            times: dict[bool, list[dict[str, float]]] = {True: [], False: []}
            for repeat in range(args.repeats):
                for packing in (True, False) if repeat % 2 == 0 else (False, True):  # take turns
                    out = tmp / "sft" / f"{name.split()[0]}-{group}-{packing}"
                    times[packing].append(timed_run(replace(base, packing=packing, output_dir=str(out))))
            row = {
                "data": name,
                "group_by_length": group,
                "batch_size": base.batch_size,
                "max_len": base.max_len,
            }
            for packing, label in ((True, "packed"), (False, "per_row")):
                row[label] = {
                    "steps_per_s": max(t["steps_per_s"] for t in times[packing]),
                    "tokens_per_s": max(t["tokens_per_s"] for t in times[packing]),
                    "final_lm_loss": statistics.mean(t["final_lm_loss"] for t in times[packing]),
                    **layout(replace(base, packing=packing), args.steps),
                }
            row["speedup"] = row["packed"]["steps_per_s"] / row["per_row"]["steps_per_s"]
            rows.append(row)
            print(
                f"{name}, group_by_length {group}: packed {row['packed']['steps_per_s']:.2f} steps/s "
                f"({row['packed']['rows_per_batch']:.1f} rows, {row['packed']['padded_share']:.0%} padding), "
                f"one per row {row['per_row']['steps_per_s']:.2f} steps/s "
                f"({row['per_row']['padded_share']:.0%} padding): {row['speedup']:.2f}x",
                flush=True,
            )
    path = write_json(
        f"{args.name}.json",
        {
            "benchmark": "sft_packing",
            "run": "built-in stand-in" if builtin else str(args.run),
            "steps": args.steps,
            "repeats": args.repeats,
            "timing": "best of the repeats; a step's time is its tokens / tokens_per_s (metrics.jsonl), "
            "step 1 left out",
            "machine": machine(),
            "results": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
