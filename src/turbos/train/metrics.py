"""The per-step training log, ``RUN_DIR/metrics.jsonl``: one JSON object per line.

Training records carry ``step`` (optimizer updates done), ``stage``, ``seq_len``, ``loss``,
``lm_loss``, ``aux_loss``, ``lr`` ({param group: LR}), ``grad_norm``, ``tokens`` (seen so far),
``tokens_per_s``, ``expert_load`` (per MoE layer, the fraction of assignments each routed expert
processed), ``recycled_frac`` and ``dropped_frac`` (of all token-expert assignments). Records
of evaluated steps add ``val_loss`` and ``val_ppl``; the step-0 evaluation is a record of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from turbos.model.moe import MoEStats

METRICS_FILE = "metrics.jsonl"


def summarize_moe(stats: Sequence[Sequence[MoEStats]]) -> dict[str, Any]:
    """Routing statistics of one step from the per-micro-batch, per-layer MoEStats."""
    if not stats or not stats[0]:
        return {}
    num_layers = len(stats[0])
    loads = [
        torch.stack([micro[i].expert_load for micro in stats]).sum(0).double() for i in range(num_layers)
    ]
    assignments = sum(layer.assignments for micro in stats for layer in micro)
    recycled = sum(layer.recycled for micro in stats for layer in micro)
    dropped = sum(layer.dropped for micro in stats for layer in micro)
    return {
        "expert_load": [(load / load.sum().clamp(min=1)).tolist() for load in loads],
        "recycled_frac": recycled / max(assignments, 1),
        "dropped_frac": dropped / max(assignments, 1),
    }


class MetricsLog:
    """Appends records to ``metrics.jsonl``; resuming at step N first drops records after N."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [record for record in read_metrics(self.path) if record["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (or of RUN_DIR/metrics.jsonl)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} at {path}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
            # a run killed while writing leaves its last line cut short; nothing after it is lost
    return records
