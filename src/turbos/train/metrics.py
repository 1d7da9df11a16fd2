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

from turbos.data.jsonl import read_jsonl
from turbos.model.moe import MoEStats

METRICS_FILE = "metrics.jsonl"


MOE_COUNTS = ("expert_load", "moe_assignments", "moe_recycled", "moe_dropped")
"""The routing counts ``moe_counts`` reports and ``summarize_moe`` turns into logged fractions."""


def moe_counts(stats: Sequence[MoEStats]) -> dict[str, torch.Tensor]:
    """Routing counts of one forward pass, left on the device (a loss function's metrics):
    ``expert_load`` (layers, E) and the assignments, recycled and dropped ones over all MoE layers;
    empty without MoE layers."""
    if not stats:
        return {}
    counts = torch.stack([torch.stack([s.assignments, s.recycled, s.dropped]) for s in stats]).sum(0)
    return {
        "expert_load": torch.stack([s.expert_load for s in stats]),
        **dict(zip(MOE_COUNTS[1:], counts, strict=True)),
    }


def summarize_moe(values: dict[str, Any]) -> dict[str, Any]:
    """The logged routing statistics of a step from its ``moe_counts`` read on the host (removed
    from ``values``): per MoE layer the fraction of assignments each routed expert processed,
    and the recycled and dropped fractions of all assignments."""
    if "expert_load" not in values:
        return {}
    loads, assignments, recycled, dropped = (values.pop(name) for name in MOE_COUNTS)
    return {
        "expert_load": [[count / max(sum(load), 1) for count in load] for load in loads],
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
    # A run killed while writing leaves its last line cut short; nothing after it is lost.
    return [record for _, record in read_jsonl(path, "metrics", cut_last_line=True)]
