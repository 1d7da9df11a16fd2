"""The LR schedule: warm-up, constant (WSD stable phase), cosine annealing, per-stage constant LR."""

from __future__ import annotations

import math

import pytest

from turbos.train.recipe import parse_recipe, plan_stages
from turbos.train.schedule import LRPhase, LRSchedule

PEAK, MIN_LR, LONG_LR = 1e-3, 1e-4, 5e-5


@pytest.fixture
def schedule() -> LRSchedule:
    recipe = parse_recipe(
        {
            "data": {"sources": "builtin:reasoning", "tokenizer": {"vocab_size": 512}, "seq_len": 64},
            "optimizer": {"lr": PEAK},
            "schedule": {"warmup_steps": 10, "min_lr": MIN_LR},
            "stages": [
                {"name": "stable", "steps": 40},
                {"name": "anneal", "steps": 20, "lr_policy": "cosine"},
                {"name": "long", "steps": 10, "seq_len": 128, "rope_alpha": 4, "lr": LONG_LR},
            ],
        }
    )
    return LRSchedule(recipe.optimizer.lr, recipe.schedule.warmup_steps, plan_stages(recipe))


def test_warmup_rises_linearly_to_the_peak(schedule: LRSchedule) -> None:
    lrs = [schedule(step) for step in range(10)]
    assert lrs == pytest.approx([PEAK * (i + 1) / 10 for i in range(10)], rel=1e-12)


def test_stable_phase_holds_the_peak_lr(schedule: LRSchedule) -> None:
    assert {schedule(step) for step in range(10, 40)} == {PEAK}


def test_annealing_is_a_cosine_from_the_stable_lr_to_min_lr(schedule: LRSchedule) -> None:
    lrs = [schedule(step) for step in range(40, 60)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)), "strictly decreasing"
    assert lrs[-1] == pytest.approx(MIN_LR, rel=1e-12), "the last annealing step reaches min_lr"
    midpoint = MIN_LR + (PEAK - MIN_LR) * 0.5 * (1 + math.cos(math.pi * 10 / 20))
    assert lrs[9] == pytest.approx(midpoint, rel=1e-12), "half-cosine shape"
    assert lrs[0] > 0.99 * PEAK, "starts from the LR the stable phase ended at"


def test_long_context_stage_holds_its_own_constant_lr(schedule: LRSchedule) -> None:
    assert {schedule(step) for step in range(60, 70)} == {LONG_LR}
    assert schedule.total_steps == 70
    assert [schedule.stage_at(s).name for s in (0, 39, 40, 59, 60, 69)] == [
        "stable",
        "stable",
        "anneal",
        "anneal",
        "long",
        "long",
    ]


def test_sft_schedule_is_a_linear_warmup_then_a_cosine_from_the_peak_to_min_lr() -> None:
    lr, min_lr, warmup, steps = 2e-3, 2e-4, 50, 1000
    schedule = LRSchedule.warmup_cosine(lr, min_lr, warmup, steps)
    assert [schedule(s) for s in range(warmup)] == [lr * (s + 1) / warmup for s in range(warmup)], (
        "the warm-up's values exactly as SFT computed them"
    )
    decay = [schedule(s) for s in range(warmup, steps)]
    expected = [
        min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * ((s - warmup + 1) / (steps - warmup))))
        for s in range(warmup, steps)
    ]
    assert decay == expected, "the cosine's values exactly as SFT computed them"
    assert decay[-1] == pytest.approx(min_lr, rel=1e-12) and schedule.total_steps == steps
    assert LRSchedule.warmup_cosine(lr, min_lr, 0, 10)(0) < lr, "without warm-up the cosine starts at once"


def test_an_unknown_lr_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown LR policy 'cosin'"):
        LRSchedule(1e-3, 0, [LRPhase(0, 0, 10, "cosin", 1e-4)])
