"""The demo's RL stage over several seeds: how its figures and targets depend on the GRPO seed.

Takes a finished `turbos demo` run and reruns only stage 6 (GRPO from the same adaptive SFT
model, `recipes/grpo-reasoning.yaml` with the demo's settings) with each seed; the seed draws the
prompt pool, the stream order and every sample. Each RL model is evaluated as the demo does (the
same held-out problems, greedy) and checked against the demo's targets and against the SFT
model's think-mode accuracy. The demo's own seed is read from its stage 6 when it ran.

    python benchmarks/grpo_seeds.py [--run runs/demo] [--seeds 0 1 2 3 4] [--name grpo_seeds]

Seed runs live under <run>/grpo-seeds/seed-<n>/ and are reused when finished with the same recipe.
About 3 minutes per seed on 2 CPU cores. Writes benchmarks/results/<name>.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_json  # noqa: E402
from turbos.post.demo import (  # noqa: E402
    MAX_DROP,
    MAX_TOKEN_RATIO,
    DemoSettings,
    check_targets,
    evaluate_adaptive,
    grpo_recipe,
    rl_keeps_thinking,
)
from turbos.rl import run_grpo  # noqa: E402
from turbos.rl.trainer import RESUMABLE_CHANGES  # noqa: E402
from turbos.train.checkpoint import recipe_state  # noqa: E402
from turbos.train.plots import pyplot, save_figure  # noqa: E402


def seed_result(run: Path, settings: DemoSettings, seed: int) -> dict:
    """Evaluation results (by mode) of stage 6 with this seed; runs it if needed."""
    if seed == settings.seed and (done := run / "grpo" / "done.json").is_file():
        return json.loads(done.read_text())["results"]
    folder = run / "grpo-seeds" / f"seed-{seed}"
    recipe = grpo_recipe(settings, run, folder, seed)
    key = recipe_state(asdict(recipe), RESUMABLE_CHANGES)
    saved = folder / "eval.json"
    if saved.is_file() and (done := json.loads(saved.read_text())).get("recipe") == key:
        print(f"seed {seed}: reusing {folder}")
        return done["results"]
    print(f"seed {seed}: GRPO ({recipe.steps} steps) -> {folder}", flush=True)
    run_grpo(recipe, progress=False, overwrite=True)
    result = evaluate_adaptive(folder / "model", settings, folder)
    result["recipe"] = key
    saved.write_text(json.dumps(result, indent=2) + "\n")
    return result["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished turbos demo folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--name", default="grpo_seeds")
    args = parser.parse_args()
    sft_eval = args.run / "eval" / "done.json"
    if not sft_eval.is_file():
        raise SystemExit(f"{sft_eval} not found: run `turbos demo --out {args.run}` first")
    settings = DemoSettings.load(args.run / "settings.json")
    sft = json.loads(sft_eval.read_text())["results"]
    rows = []
    for seed in args.seeds:
        results = seed_result(args.run, settings, seed)
        targets = {**check_targets(results), **rl_keeps_thinking(sft, results)}
        values = {k: v for target in targets.values() for k, v in target["values"].items()}
        rows.append({"seed": seed, "values": values, "met": {k: t["met"] for k, t in targets.items()}})
        v = {k: x * 100 for k, x in values.items()}
        print(
            f"seed {seed}: auto-think {v['auto_minus_think']:+.1f} points at {v['token_ratio']:.0f}% of "
            f"think's tokens; think-no_think hardest {v['think_gain_hardest']:+.1f}; auto thinks "
            f"{v['think_rate_hardest']:.0f}% hardest / {v['think_rate_easiest']:.0f}% easiest; "
            f"think {v['think_rl']:.1f}% vs SFT {v['think_sft']:.1f}%",
            flush=True,
        )
    names = list(rows[0]["met"])
    summary = {name: sum(r["met"][name] for r in rows) for name in names}
    for name in names:
        print(f"{summary[name]}/{len(rows)} seeds: {name}")
    path = write_json(
        f"{args.name}.json",
        {"run": str(args.run), "sft": sft, "seeds": rows, "met_per_target": summary, "n": len(rows)},
    )
    plot(rows, sft, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")


def plot(rows: list[dict], sft: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        v = r["values"]
        left.scatter(v["token_ratio"] * 100, v["auto_minus_think"] * 100, s=60, color="C0")
        left.annotate(f"seed {r['seed']}", (v["token_ratio"] * 100, v["auto_minus_think"] * 100), fontsize=7)
    think, auto = sft["think"]["overall"], sft["auto"]["overall"]
    left.scatter(
        auto["mean_tokens"] / think["mean_tokens"] * 100,
        (auto["accuracy"] - think["accuracy"]) * 100,
        marker="x",
        s=80,
        color="grey",
        label="adaptive SFT",
    )
    left.axhline(-MAX_DROP * 100, color="C2", linestyle=":")
    left.axvline(MAX_TOKEN_RATIO * 100, color="C2", linestyle=":", label="target: above and left")
    left.set(
        xlabel="auto's tokens, % of think's", ylabel="auto - think (points)", title="auto vs think per seed"
    )
    left.legend(fontsize=7)
    seeds = [str(r["seed"]) for r in rows]
    right.bar(seeds, [r["values"]["think_gain_hardest"] * 100 for r in rows], color="C1")
    right.axhline(20, color="C2", linestyle=":", label="target 20")
    right.set(xlabel="seed", ylabel="points", title="think - no_think on the hardest level")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
