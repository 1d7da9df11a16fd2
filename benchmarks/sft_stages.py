"""The demo's two SFT stages, this tree vs an earlier commit, back to back on one machine.

Each stage's recipe (``turbos.post.demo.short_sft_recipe`` / ``adaptive_sft_recipe`` with the
default demo settings) is run for ``--steps`` steps from a `turbos demo` run's pre-trained model
and data, once with this tree's code and once with ``--baseline`` (a git revision, exported with
``git archive`` into a temporary folder), each in its own process, taking turns ``--repeats``
times. The time is the wall time of ``run_sft`` (data encoding, model load and the steps, with
the checkpoint the stop writes), so the ratio is what a user waits, scaled to the steps run.

    python benchmarks/sft_stages.py --run runs/demo --baseline 92bb7a4 [--steps 150] [--repeats 2]

Writes benchmarks/results/sft_stages.json: per stage and code the seconds per step of each repeat,
the median, the steps a full stage has and the full stage's projected seconds, and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter whose turbos is the code under test (PYTHONPATH).
CHILD = """
import json, sys, tempfile, time
from dataclasses import replace
from pathlib import Path
from turbos.post.demo import DemoSettings, adaptive_sft_recipe, short_sft_recipe
from turbos.post.sft import run_sft
stage, run, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
make = short_sft_recipe if stage == "sft-short" else adaptive_sft_recipe
recipe = make(DemoSettings(), run)
with tempfile.TemporaryDirectory() as out:
    recipe = replace(recipe, output_dir=out)
    start = time.perf_counter()
    run_sft(recipe, progress=False, stop_at=steps)
    print(json.dumps({"seconds": time.perf_counter() - start, "full_steps": recipe.steps}))
"""


def export_revision(revision: str, into: Path) -> Path:
    """The ``src`` folder of ``revision`` (git archive), unpacked under ``into``."""
    archive = into / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", revision, "src"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def time_stage(src: Path, stage: str, run: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, stage, str(run), str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"{stage} with {src} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished `turbos demo` run")
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=["sft-short", "sft-adaptive"])
    parser.add_argument("--name", default="sft_stages")
    args = parser.parse_args()
    for need in ("pretrain/model", "sft-short/short_cot.jsonl", "fusion/fused.jsonl"):
        if not (args.run / need).exists():
            parser.error(f"{args.run} has no {need}: run `turbos demo --out {args.run}` first")
    results: dict = {"steps": args.steps, "baseline": args.baseline, "run": str(args.run), "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"baseline": export_revision(args.baseline, Path(tmp)), "ours": ROOT / "src"}
        for stage in args.stages:
            per_step: dict[str, list[float]] = {"baseline": [], "ours": []}
            full_steps = 0
            for _ in range(args.repeats):
                for code, src in sources.items():
                    timing = time_stage(src, stage, args.run, args.steps)
                    per_step[code].append(timing["seconds"] / args.steps)
                    full_steps = timing["full_steps"]
                    print(f"{stage} {code}: {timing['seconds']:.1f} s for {args.steps} steps", flush=True)
            row = {
                code: {"s_per_step": v, "median_s_per_step": statistics.median(v)}
                for code, v in per_step.items()
            }
            for code in per_step:
                row[code]["full_stage_s"] = round(row[code]["median_s_per_step"] * full_steps, 1)
            row["full_steps"] = full_steps
            row["speedup"] = row["baseline"]["median_s_per_step"] / row["ours"]["median_s_per_step"]
            results["stages"][stage] = row
            print(
                f"{stage}: baseline {row['baseline']['full_stage_s']} s, "
                f"ours {row['ours']['full_stage_s']} s for {full_steps} steps: {row['speedup']:.2f}x"
            )
    results["machine"] = machine()
    print(write_json(f"{args.name}.json", results))


if __name__ == "__main__":
    main()
