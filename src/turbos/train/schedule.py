"""Learning-rate schedule over the stages of a recipe (report §2.3, §2.4).

Warm-up-stable-decay (WSD): a linear warm-up at the start of training, then each stage's policy:

- ``constant``: hold the stage's LR (the stable phase at the peak LR; the long-context stages at
  5e-6 in the report);
- ``cosine``: start from the LR the previous stage ended at and follow a half cosine down to the
  stage's LR, reached on its last step (the annealing stage: "fast cosine decay to 5e-6").

The schedule is a pure function of the global step, so resuming needs only the step.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from turbos.train.recipe import StagePlan


class LRSchedule:
    """``schedule(step)`` is the base LR of optimizer update number ``step`` (0-based)."""

    def __init__(self, peak_lr: float, warmup_steps: int, stages: Sequence[StagePlan]) -> None:
        if not stages:
            raise ValueError("a schedule needs at least one stage")
        self.warmup_steps = warmup_steps
        self.stages = list(stages)
        self._starts = [stage.start for stage in self.stages]
        self._start_lr = []  # the LR each stage starts from (cosine stages decay from it)
        previous = peak_lr
        for stage in self.stages:
            self._start_lr.append(previous)
            previous = stage.lr

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    def stage_at(self, step: int) -> StagePlan:
        """The stage that update number ``step`` belongs to (the last one past the end)."""
        return self.stages[max(0, bisect.bisect_right(self._starts, step) - 1)]

    def __call__(self, step: int) -> float:
        stage = self.stage_at(step)
        if stage.lr_policy == "cosine":
            start = self._start_lr[stage.index]
            progress = min(1.0, (step - stage.start + 1) / stage.steps)
            lr = stage.lr + (start - stage.lr) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            lr = stage.lr
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr
