"""Pre-train the `tiny` recipe end to end on the built-in data and check that it learns.

Runs recipes/tiny.yaml (tokenizer training, all four stages, evaluations, checkpoints) and
records the wall time and the validation loss before the first step and at the end. The end
loss is measured on the very batches of the step-0 evaluation (first stage, 128 tokens), so
the two numbers compare like with like; the last stage's own validation loss is reported too.
Passes when the end loss is at most half the step-0 loss.

    python benchmarks/train_tiny.py [--recipe recipes/tiny.yaml] [--threads N] [key.sub=value ...]

Writes benchmarks/results/train_tiny.json and train_tiny.png (loss curves); the run itself
(metrics.jsonl, checkpoints, plots/) goes to runs/bench-tiny unless output_dir is overridden.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On a shared machine whose cores are taken by
# other jobs, spinning threads made each step 30-50x slower (14 s instead of 0.3 s for tiny on
# 2 cores); passive waiting costs little on an idle machine. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402
from turbos.train.metrics import read_metrics  # noqa: E402
from turbos.train.plots import plot_losses, plot_run  # noqa: E402
from turbos.train.recipe import load_recipe  # noqa: E402
from turbos.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"output_dir={ROOT / 'runs' / 'bench-tiny'}", *args.overrides]

    load_before = os.getloadavg()
    started = time.perf_counter()
    recipe = load_recipe(args.recipe, overrides)
    trainer = Trainer(recipe, overwrite=True)
    summary = trainer.train()
    wall = time.perf_counter() - started
    end_same_batches = trainer.evaluate(trainer.plans[0])

    records = read_metrics(trainer.run_dir)
    start_loss = records[0]["val_loss"]
    train = [r for r in records if "tokens_per_s" in r]
    passed = end_same_batches <= 0.5 * start_loss
    result = {
        "recipe": str(Path(args.recipe).resolve().relative_to(ROOT)),
        "overrides": args.overrides,
        "machine": machine(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": wall,
        "train_loop_s": summary["wall_s"],
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in train)[len(train) // 2],
        "stages": [
            {"name": p.name, "steps": p.steps, "seq_len": p.seq_len, "rope_alpha": p.rope_alpha}
            for p in trainer.plans
        ],
        "val_loss_step0": start_loss,
        "val_loss_end": end_same_batches,
        "val_loss_end_last_stage": summary["val_loss"],
        "end_over_start": end_same_batches / start_loss,
        "passed_half_loss": passed,
    }
    path = write_json("train_tiny.json", result)
    plot_losses(records, RESULTS / "train_tiny.png")
    plot_run(trainer.run_dir)
    print(
        f"\n{summary['steps']} steps, {summary['tokens']:,} tokens in {wall:.0f} s "
        f"(training loop {summary['wall_s']:.0f} s, median {result['tokens_per_s_median']:,.0f} tokens/s)"
    )
    print(
        f"val loss {start_loss:.3f} at step 0 -> {end_same_batches:.3f} at the end on the same batches "
        f"({result['end_over_start']:.0%}); last stage ({trainer.plans[-1].seq_len} tokens): "
        f"{summary['val_loss']:.3f}"
    )
    print(f"end loss <= half the step-0 loss: {'yes' if passed else 'NO'}")
    print(f"wrote {path} and {RESULTS / 'train_tiny.png'}")


if __name__ == "__main__":
    main()
