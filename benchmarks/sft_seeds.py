"""How much the demo's figures depend on the adaptive SFT's seed.

Takes a finished `turbos demo` run and retrains only its adaptive SFT (stage 4) with other seeds:
the same pre-trained model, fused data, recipe and steps; only the seed, which draws the batches,
changes. Each seed's model is evaluated as stage 5 does (same held-out problems, greedy) and
checked against the demo's three targets, and, from its answers, the best accuracy a router
that knows where the direct answer fails (what fusion's labels carry) could reach at 60% of
think's tokens (``routing_analysis.informed_frontier``). The demo's own seed is read from its
stage 5 instead of being trained again.

    python benchmarks/sft_seeds.py [--run runs/demo] [--seeds 0 1 2] [--name sft_seeds]

Seed runs live under <run>/sft-seeds/seed-<n>/ and are reused when finished with the same recipe
(an interrupted one resumes from its checkpoint). About 7 minutes per seed on 2 CPU cores (demo defaults).
Writes benchmarks/results/<name>.json and <name>.png (one panel per target, a point per seed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_json  # noqa: E402
from routing_analysis import frontier_summary, target_think_bounds  # noqa: E402
from turbos.post.demo import (  # noqa: E402
    MAX_DROP,
    MAX_TOKEN_RATIO,
    DemoSettings,
    adaptive_sft_recipe,
    check_targets,
    evaluate_adaptive,
)
from turbos.post.routing import paired  # noqa: E402
from turbos.post.sft import RESUMABLE_CHANGES, run_sft  # noqa: E402
from turbos.train.checkpoint import latest_checkpoint, recipe_state  # noqa: E402
from turbos.train.plots import pyplot, save_figure  # noqa: E402

COLUMNS = (  # (key in the targets' values, header, scale)
    ("think_gain_hardest", "think-no_think hardest", 100),
    ("auto_minus_think", "auto-think", 100),
    ("token_ratio", "tokens % of think", 100),
    ("think_rate_hardest", "auto thinks hardest %", 100),
    ("think_rate_easiest", "auto thinks easiest %", 100),
    ("informed_minus_think", "informed router-think", 100),
)


def seed_result(run: Path, settings: DemoSettings, seed: int, progress: bool) -> tuple[dict, Path]:
    """Evaluation results (by mode) of the adaptive SFT with this seed, and the file of its
    answers; trains it if needed."""
    if seed == settings.seed:
        demo_eval = run / "eval" / "done.json"
        if not demo_eval.is_file():
            raise SystemExit(f"{demo_eval} not found: finish `turbos demo --out {run}` first")
        return json.loads(demo_eval.read_text())["results"], run / "eval" / "answers.jsonl"
    folder = run / "sft-seeds" / f"seed-{seed}"
    recipe = replace(adaptive_sft_recipe(settings, run), seed=seed, output_dir=str(folder))
    saved = folder / "eval.json"
    key = recipe_state(asdict(recipe), RESUMABLE_CHANGES)
    if saved.is_file() and (done := json.loads(saved.read_text())).get("recipe") == key:
        print(f"seed {seed}: reusing {folder}")
        return done["results"], folder / "answers.jsonl"
    print(f"seed {seed}: adaptive SFT ({recipe.steps} steps) -> {folder}", flush=True)
    run_sft(recipe, progress, resume=latest_checkpoint(folder) if folder.is_dir() else None, overwrite=True)
    result = evaluate_adaptive(folder / "model", settings, folder)
    result["recipe"] = key
    saved.write_text(json.dumps(result, indent=2) + "\n")
    return result["results"], folder / "answers.jsonl"


def informed_minus_think(answers: Path) -> float:
    """Best accuracy of the informed router (held to the thinking-rate target) at 60% of think's
    tokens, minus think's accuracy (nan if that many tokens are out of its reach)."""
    choices = paired(json.loads(line) for line in answers.read_text().splitlines())
    summary = frontier_summary(
        choices, MAX_DROP, target_think_bounds(c.level for c in choices), MAX_TOKEN_RATIO
    )
    informed = summary["informed_accuracy"]
    return math.nan if informed is None else informed - summary["think_accuracy"]


def values(targets: dict) -> dict[str, float]:
    merged: dict[str, float] = {}
    for target in targets.values():
        merged.update(target["values"])
    return merged


def table(rows: dict[int, dict]) -> list[str]:
    header = f"{'seed':>6} | " + " | ".join(f"{h:>22}" for _, h, _ in COLUMNS) + " | targets met"
    lines = [header, "-" * len(header)]
    for seed, row in rows.items():
        cells = " | ".join(f"{row['values'][k] * s:>22.1f}" for k, _, s in COLUMNS)
        lines.append(f"{seed:>6} | {cells} | {''.join('Y' if m else '-' for m in row['met'])}")
    for name, stat in (("mean", statistics.fmean), ("min", min), ("max", max)):
        cells = " | ".join(f"{stat(r['values'][k] for r in rows.values()) * s:>22.1f}" for k, _, s in COLUMNS)
        lines.append(f"{name:>6} | {cells} |")
    return lines


def plot(rows: dict[int, dict], path: Path) -> None:
    plt = pyplot()
    fig, (gain_ax, gap_ax, rate_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    seeds = list(rows)
    v = {s: rows[s]["values"] for s in seeds}
    gain_ax.bar([str(s) for s in seeds], [v[s]["think_gain_hardest"] * 100 for s in seeds])
    gain_ax.axhline(20, color="tab:red", ls="--", label="target >= 20")
    gain_ax.set_xlabel("adaptive SFT seed")
    gain_ax.set_ylabel("think - no_think, hardest level (points)")
    gain_ax.set_title("1. the hardest level needs thinking")
    top = max(5.0, *(v[s]["auto_minus_think"] * 100 + 1 for s in seeds))
    gap_ax.fill_between([0, 60], -3, top, color="tab:green", alpha=0.12, label="target region")
    for i, s in enumerate(seeds):
        gap_ax.scatter(v[s]["token_ratio"] * 100, v[s]["auto_minus_think"] * 100, s=60, color=f"C{i}")
        gap_ax.scatter(
            MAX_TOKEN_RATIO * 100,
            v[s]["informed_minus_think"] * 100,
            s=60,
            facecolors="none",
            edgecolors=f"C{i}",
            label="best informed router" if i == 0 else None,
        )
        gap_ax.annotate(
            f"seed {s}",
            (v[s]["token_ratio"] * 100, v[s]["auto_minus_think"] * 100),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    gap_ax.set_xlim(0, 100)
    gap_ax.set_xlabel("auto's tokens (% of think's)")
    gap_ax.set_ylabel("auto - think, overall accuracy (points)")
    gap_ax.set_title("2. auto: think's accuracy at fewer tokens")
    width = 0.38
    xs = range(len(seeds))
    rate_ax.bar(
        [x - width / 2 for x in xs],
        [v[s]["think_rate_hardest"] * 100 for s in seeds],
        width,
        label="hardest level (target >= 80)",
    )
    rate_ax.bar(
        [x + width / 2 for x in xs],
        [v[s]["think_rate_easiest"] * 100 for s in seeds],
        width,
        label="easiest level (target <= 20)",
    )
    rate_ax.axhline(80, color="tab:blue", ls="--")
    rate_ax.axhline(20, color="tab:orange", ls="--")
    rate_ax.set_xticks(list(xs), [str(s) for s in seeds])
    rate_ax.set_ylim(0, 100)
    rate_ax.set_xlabel("adaptive SFT seed")
    rate_ax.set_ylabel("auto answers that thought (%)")
    rate_ax.set_title("3. auto thinks when it is hard")
    for ax in (gain_ax, gap_ax, rate_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right" if ax is rate_ax else "best")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a finished turbos demo output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="sft_seeds", help="results file name (no extension)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "settings.json").is_file():
        raise SystemExit(f"{run / 'settings.json'} not found: run `turbos demo --out {run}` first")
    settings = DemoSettings.load(run / "settings.json")
    rows = {}
    for seed in dict.fromkeys(args.seeds):
        results, answers = seed_result(run, settings, seed, not args.no_progress)
        targets = check_targets(results)
        rows[seed] = {
            "values": {**values(targets), "informed_minus_think": informed_minus_think(answers)},
            "met": [t["met"] for t in targets.values()],
            "targets": targets,
            "results": results,
        }
    lines = table(rows)
    print("\n".join(lines))
    summary = {
        "run": str(run),
        "settings": asdict(settings),
        "seeds": rows,
        "every_target_met_by_every_seed": all(all(r["met"]) for r in rows.values()),
        "table": lines,
    }
    write_json(f"{args.name}.json", summary)
    plot(rows, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.json and .png")


if __name__ == "__main__":
    main()
