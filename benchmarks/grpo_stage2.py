"""GRPO Stage II on the demo's Stage I model: instruction following up, reasoning kept?

Takes a finished `turbos demo` run, measures its RL model (stage 6) on held-out instruction
prompts (`turbos.rl.instructions`, test split: the share of prompts whose reply meets every
constraint, and of constraints met) and on the demo's reasoning evaluation, runs
`recipes/grpo-general.yaml` from it (90% instruction prompts, 10% reasoning, larger KL), and
measures again. Targets: instruction-following accuracy +10 points, reasoning accuracy within 2
points (each mode's overall accuracy).

    python benchmarks/grpo_stage2.py [--run runs/demo] [--prompts 200] [key=value ...]

Writes benchmarks/results/grpo_stage2.json (and the run under <run>/grpo-general/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402
from turbos.post.demo import DemoSettings, evaluate_adaptive, grpo_recipe  # noqa: E402
from turbos.post.evaluate import evaluate_instructions  # noqa: E402
from turbos.rl import run_grpo  # noqa: E402
from turbos.rl.instructions import generate_instructions  # noqa: E402
from turbos.serve import LLMEngine  # noqa: E402


def measure(model: Path, settings: DemoSettings, instructions: list, out: Path) -> dict:
    engine = LLMEngine.from_pretrained(model, max_running=64, seed=settings.seed)
    following = evaluate_instructions(engine, instructions, "auto", settings.max_tokens)
    reasoning = evaluate_adaptive(model, settings, out)["results"]
    return {
        "instructions": following,
        "reasoning": {mode: reasoning[mode]["overall"]["accuracy"] for mode in reasoning},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--prompts", type=int, default=200, help="held-out instruction prompts")
    parser.add_argument("overrides", nargs="*", help="key=value changes to recipes/grpo-general.yaml")
    args = parser.parse_args()
    start = args.run / "grpo" / "model"
    if not start.is_dir():
        raise SystemExit(f"{start} not found: run `turbos demo --out {args.run}` first")
    settings = DemoSettings.load(args.run / "settings.json")
    held_out = generate_instructions(args.prompts, seed=0, split="test")
    out = args.run / "grpo-general"
    before = measure(start, settings, held_out, out / "eval-before")
    print("before:", json.dumps(before), flush=True)
    recipe = grpo_recipe(settings.replaced({"stage2_overrides": args.overrides}), args.run, out, stage2=True)
    run_grpo(recipe, progress=True, overwrite=True)
    after = measure(out / "model", settings, held_out, out / "eval-after")
    print("after:", json.dumps(after), flush=True)
    gain = after["instructions"]["prompt_accuracy"] - before["instructions"]["prompt_accuracy"]
    drift = {m: after["reasoning"][m] - before["reasoning"][m] for m in before["reasoning"]}
    result = {
        "run": str(args.run),
        "overrides": args.overrides,
        "before": before,
        "after": after,
        "instruction_gain": gain,
        "reasoning_change": drift,
        "targets": {
            "instruction following +10 points": gain >= 0.10,
            "reasoning within 2 points": all(abs(d) <= 0.02 for d in drift.values()),
        },
    }
    path = write_json("grpo_stage2.json", result)
    print(
        f"instruction following {gain * 100:+.1f} points; reasoning change by mode: "
        + ", ".join(f"{m} {d * 100:+.1f}" for m, d in drift.items())
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
