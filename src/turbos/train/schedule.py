"""Learning-rate schedules: a warm-up, then a policy per phase (report §2.3, §2.4).

A schedule is a list of phases on one step counter, each with a policy:

- ``constant``: hold the phase's LR (WSD's stable phase at the peak LR; the long-context stages
  at 5e-6 in the report);
- ``cosine``: start from the LR the previous phase ended at and follow a half cosine down to the
  phase's LR, reached on its last step (the annealing stage: "fast cosine decay to 5e-6");
- ``linear``: rise from 0 to the phase's LR, reached on its last step (a warm-up phase of its own).

Pre-training's phases are the recipe's stages (``StagePlan``), with ``warmup_steps`` scaling the
first steps linearly from 0 whatever policy runs (warm-up-stable-decay: the warm-up overlaps the
stable stage). SFT's schedule is ``LRSchedule.warmup_cosine``: a ``linear`` phase, then a
``cosine`` one down to ``min_lr``.

The schedule is a pure function of the step, so resuming needs only the step.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from turbos.train.recipe import StagePlan


@dataclass(frozen=True)
class LRPhase:
    """A phase of a schedule that is not a pre-training stage (``StagePlan`` has these fields too)."""

    index: int
    start: int
    """Step at which the phase begins."""
    steps: int
    lr_policy: str
    lr: float
    """Constant LR, the end value of a cosine phase, or the top of a linear one."""

    @property
    def end(self) -> int:
        return self.start + self.steps


class LRSchedule:
    """``schedule(step)`` is the base LR of optimizer update number ``step`` (0-based)."""

    def __init__(self, peak_lr: float, warmup_steps: int, stages: Sequence[StagePlan | LRPhase]) -> None:
        if not stages:
            raise ValueError("a schedule needs at least one stage")
        unknown = [
            stage.lr_policy for stage in stages if stage.lr_policy not in ("constant", "cosine", "linear")
        ]
        if unknown:
            raise ValueError(f"unknown LR policy {unknown[0]!r}; choose 'constant', 'cosine' or 'linear'")
        self.warmup_steps = warmup_steps
        self.stages = list(stages)
        self._starts = [stage.start for stage in self.stages]
        self._start_lr = []  # the LR each stage starts from (cosine stages decay from it)
        previous = peak_lr
        for stage in self.stages:
            self._start_lr.append(previous)
            previous = stage.lr

    @classmethod
    def warmup_cosine(cls, lr: float, min_lr: float, warmup_steps: int, steps: int) -> LRSchedule:
        """A linear rise to ``lr`` over ``warmup_steps``, then a half cosine from ``lr`` to ``min_lr``
        reached on step ``steps`` (SFT)."""
        if not 0 <= warmup_steps < steps:
            raise ValueError(f"warmup_steps must be in [0, steps={steps}), got {warmup_steps}")
        warmup = [LRPhase(0, 0, warmup_steps, "linear", lr)] if warmup_steps else []
        decay = LRPhase(len(warmup), warmup_steps, steps - warmup_steps, "cosine", min_lr)
        return cls(lr, 0, [*warmup, decay])

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    def stage_at(self, step: int) -> StagePlan | LRPhase:
        """The stage that update number ``step`` belongs to (the last one past the end)."""
        return self.stages[max(0, bisect.bisect_right(self._starts, step) - 1)]

    def __call__(self, step: int) -> float:
        stage = self.stage_at(step)
        if stage.lr_policy == "cosine":
            start = self._start_lr[stage.index]
            progress = min(1.0, (step - stage.start + 1) / stage.steps)
            lr = stage.lr + (start - stage.lr) * 0.5 * (1 + math.cos(math.pi * progress))
        elif stage.lr_policy == "linear":
            lr = stage.lr * min(step - stage.start + 1, stage.steps) / stage.steps
        else:
            lr = stage.lr
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr
