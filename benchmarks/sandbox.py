"""Code sandbox throughput: a trivial program (`print(1)`) through `turbos.rl.sandbox.Sandbox` (one
bwrap per run: namespaces, mounts, rlimits, output capture) against plain unisolated `subprocess`
runs of the same interpreter (`python -c`), at concurrency 1, 8 and 32.

Each level runs `--runs` programs per mode and round from a pool of that many threads, the two
modes alternating (which goes first swaps every round), after a few untimed runs of each. Reports
runs/s (median of rounds), p50/p99 latency of one run (spawn to exit, pooled over rounds) and the
cost of isolation (subprocess runs/s / sandbox runs/s). Targets: a cost of at most 2x, and at
least 30 sandboxed runs/s at concurrency 8.

    python benchmarks/sandbox.py [--runs 200] [--rounds 3] [--concurrency 1 8 32]

Writes benchmarks/results/sandbox.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402
from turbos.rl.sandbox import Limits, Program, Sandbox  # noqa: E402

PROGRAM = "print(1)"
TARGET_COST = 2.0
TARGET_RUNS_PER_S_AT_8 = 30.0


def sandboxed(box: Sandbox, runs: int) -> tuple[float, list[float]]:
    """Wall seconds of `runs` sandboxed programs, and each run's own seconds."""
    start = time.perf_counter()
    results = box.run_many([Program(PROGRAM)] * runs)
    wall = time.perf_counter() - start
    bad = [r for r in results if not r.ok or r.stdout != "1\n"]
    if bad:
        raise SystemExit(f"a sandboxed run failed: {bad[0]}")
    return wall, [r.wall_seconds for r in results]


def plain(python: str, pool: ThreadPoolExecutor, runs: int) -> tuple[float, list[float]]:
    """The same through plain `subprocess.run` (no isolation), timed the same way."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

    def one(_: int) -> float:
        start = time.perf_counter()
        done = subprocess.run([python, "-c", PROGRAM], capture_output=True, env=env, timeout=30)
        if done.returncode != 0 or done.stdout != b"1\n":
            raise SystemExit(f"a plain run failed: {done}")
        return time.perf_counter() - start

    start = time.perf_counter()
    latencies = list(pool.map(one, range(runs)))
    return time.perf_counter() - start, latencies


def summary(rows: list[tuple[float, list[float]]], runs: int) -> dict:
    latencies = sorted(s for _, lat in rows for s in lat)
    per_round = [runs / wall for wall, _ in rows]
    return {
        "runs_per_s": statistics.median(per_round),
        "rounds_runs_per_s": per_round,
        "p50_ms": 1e3 * latencies[len(latencies) // 2],
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def plot(result: dict, path: Path) -> None:
    from turbos.train.plots import pyplot, save_figure

    plt = pyplot()
    fig, (runs_ax, lat_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    levels = result["levels"]
    xs = range(len(levels))
    for offset, mode, color in ((-0.2, "sandbox", "C0"), (0.2, "subprocess", "C1")):
        runs_ax.bar(
            [x + offset for x in xs], [lv[mode]["runs_per_s"] for lv in levels], 0.4, label=mode, color=color
        )
        lat_ax.bar(
            [x + offset for x in xs],
            [lv[mode]["p50_ms"] for lv in levels],
            0.4,
            label=f"{mode} p50",
            color=color,
        )
        lat_ax.scatter(
            [x + offset for x in xs], [lv[mode]["p99_ms"] for lv in levels], color=color, marker="_", s=300
        )
    for x, level in zip(xs, levels, strict=True):
        top = max(level["sandbox"]["runs_per_s"], level["subprocess"]["runs_per_s"])
        runs_ax.annotate(f"{level['cost']:.2f}x", (x, top), ha="center", va="bottom")
    runs_ax.axhline(TARGET_RUNS_PER_S_AT_8, color="gray", linestyle=":", label="target at 8")
    for ax, label in ((runs_ax, "runs/s (print(1))"), (lat_ax, "ms per run (p50 bars, p99 ticks)")):
        ax.set_xticks(list(xs), [f"concurrency {lv['concurrency']}" for lv in levels])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    runs_ax.set_title("bwrap sandbox vs plain subprocess (labels: isolation cost)")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="programs per mode, level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--warmup", type=int, default=4, help="untimed runs of each mode per level")
    args = parser.parse_args()

    levels = []
    for concurrency in args.concurrency:
        with (
            Sandbox(Limits(timeout=30), max_workers=concurrency) as box,
            ThreadPoolExecutor(concurrency) as pool,
        ):
            sandboxed(box, args.warmup)
            plain(box.python, pool, args.warmup)
            rows: dict[str, list] = {"sandbox": [], "subprocess": []}
            for r in range(args.rounds):
                order = ["sandbox", "subprocess"] if r % 2 == 0 else ["subprocess", "sandbox"]
                for mode in order:
                    run = (
                        sandboxed(box, args.runs) if mode == "sandbox" else plain(box.python, pool, args.runs)
                    )
                    rows[mode].append(run)
        level = {"concurrency": concurrency, **{mode: summary(rows[mode], args.runs) for mode in rows}}
        level["cost"] = level["subprocess"]["runs_per_s"] / level["sandbox"]["runs_per_s"]
        levels.append(level)
        print(
            f"concurrency {concurrency:>2}: sandbox {level['sandbox']['runs_per_s']:6.1f} runs/s "
            f"(p50 {level['sandbox']['p50_ms']:.1f} ms, p99 {level['sandbox']['p99_ms']:.1f} ms), "
            f"subprocess {level['subprocess']['runs_per_s']:6.1f} runs/s "
            f"(p50 {level['subprocess']['p50_ms']:.1f} ms, p99 {level['subprocess']['p99_ms']:.1f} ms): "
            f"isolation costs {level['cost']:.2f}x",
            flush=True,
        )

    at_8 = next((lv for lv in levels if lv["concurrency"] == 8), None)
    bwrap = subprocess.run([box.bwrap, "--version"], capture_output=True, text=True).stdout.strip()
    result = {
        "program": PROGRAM,
        "runs": args.runs,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "python": box.python,
        "bwrap": bwrap,
        "as_root": os.geteuid() == 0,
        "isolation": box.isolation,
        "levels": levels,
        "target": {
            "cost_at_most": TARGET_COST,
            "runs_per_s_at_8": TARGET_RUNS_PER_S_AT_8,
            "cost_met": all(lv["cost"] <= TARGET_COST for lv in levels),
            "runs_per_s_met": None
            if at_8 is None
            else at_8["sandbox"]["runs_per_s"] >= TARGET_RUNS_PER_S_AT_8,
        },
        "machine": machine() | {"cpus": os.cpu_count()},
    }
    path = write_json("sandbox.json", result)
    plot(result, RESULTS / "sandbox.png")
    print(f"targets: cost <= {TARGET_COST}x {result['target']['cost_met']}, ", end="")
    print(f">= {TARGET_RUNS_PER_S_AT_8:.0f} runs/s at 8 {result['target']['runs_per_s_met']}")
    print(f"wrote {path} and {RESULTS / 'sandbox.png'}")


if __name__ == "__main__":
    main()
