"""The routing analyses of benchmarks/routing.py and benchmarks/sft_seeds.py: the oracle and
informed frontiers are the true optima (against every routing of small random sets), and the skip
probability is auto's first token."""

from __future__ import annotations

import itertools
import math
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from serve_helpers import tiny_model
from turbos.data.tokenizer import END_THINK_TOKEN, THINK_TOKEN
from turbos.post.routing import Choice, paired, routed
from turbos.serve import LLMEngine, SamplingParams
from turbos.serve.chat_template import prepare_chat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from routing_analysis import (  # noqa: E402
    best_accuracy,
    fewest_tokens,
    frontier_summary,
    informed_frontier,
    oracle_frontier,
    skip_probabilities,
    target_think_bounds,
)


def random_choices(n: int, rng: random.Random, levels: int = 1) -> list[Choice]:
    return [
        Choice(
            f"p{i}",
            rng.randint(1, levels),
            f"q{i}",
            rng.random() < 0.4,
            rng.randint(3, 12),
            rng.random() < 0.6,
            rng.randint(2, 120),
        )
        for i in range(n)
    ]


def test_oracle_frontier_is_the_fewest_tokens_at_each_accuracy() -> None:
    rng = random.Random(0)
    for _ in range(30):
        choices = random_choices(8, rng)
        best: dict[float, float] = {}  # accuracy -> fewest mean tokens, over all 2^8 routings
        for think in itertools.product((False, True), repeat=len(choices)):
            accuracy, tokens = routed(choices, think)
            best[accuracy] = min(best.get(accuracy, math.inf), tokens)
        frontier = oracle_frontier(choices)
        for accuracy in best:
            fewest = min(t for a, t in best.items() if a >= accuracy - 1e-12)
            assert fewest_tokens(frontier, accuracy) == pytest.approx(fewest), (accuracy, choices)
        assert fewest_tokens(frontier, max(best) + 0.01) is None, "no routing beats every right answer"


def within_bounds(choices: list[Choice], think: tuple[bool, ...], bounds: dict) -> bool:
    for level, (lo, hi) in bounds.items():
        picks = [t for c, t in zip(choices, think, strict=True) if c.level == level]
        if not lo - 1e-9 <= sum(picks) / len(picks) <= hi + 1e-9:
            return False
    return True


def test_bounded_oracle_is_the_fewest_tokens_among_routings_within_the_thinking_rates() -> None:
    rng = random.Random(1)
    for trial in range(30):
        choices = random_choices(9, rng, levels=3)
        levels = sorted({c.level for c in choices})
        bounds = {levels[-1]: (0.8, 1.0), levels[0]: (0.0, 0.2)} if len(levels) > 1 else {1: (0.5, 1.0)}
        if trial % 3 == 0:  # the unbounded dynamic program must match the greedy frontier
            bounds = {levels[0]: (0.0, 1.0)}

        best: dict[float, float] = {}
        for think in itertools.product((False, True), repeat=len(choices)):
            if within_bounds(choices, think, bounds):
                accuracy, tokens = routed(choices, think)
                best[accuracy] = min(best.get(accuracy, math.inf), tokens)
        frontier = oracle_frontier(choices, bounds)
        assert [a for a, _ in frontier] == sorted(a for a, _ in frontier)
        for accuracy in best:
            fewest = min(t for a, t in best.items() if a >= accuracy - 1e-12)
            assert fewest_tokens(frontier, accuracy) == pytest.approx(fewest), (accuracy, bounds, choices)
        assert fewest_tokens(frontier, max(best) + 0.01) is None
        if trial % 3 == 0:
            greedy = oracle_frontier(choices)
            for accuracy in best:
                assert fewest_tokens(frontier, accuracy) == pytest.approx(fewest_tokens(greedy, accuracy))
    choices = random_choices(3, rng)
    assert oracle_frontier(choices, {1: (0.5, 0.6)}) == [], "no routing thinks on 50-60% of 3 problems"
    with pytest.raises(ValueError, match=r"levels with no problems: \[7\]"):
        oracle_frontier(choices, {7: (0.0, 1.0)})


def test_informed_frontier_is_the_best_routing_blind_within_each_group() -> None:
    """Against every routing that thinks on k problems of each (family, level, direct right)
    group, scored by expectation since the router cannot tell the group's problems apart."""
    rng = random.Random(2)
    for trial in range(40):
        choices = [replace(c, family=rng.choice("ab")) for c in random_choices(10, rng, levels=2)]
        levels = sorted({c.level for c in choices})
        bounds = {} if trial % 4 == 0 else {levels[-1]: (0.6, 1.0), levels[0]: (0.0, 0.5)}
        groups: dict[tuple, list[Choice]] = {}
        for c in choices:
            groups.setdefault((c.family, c.level, c.direct_correct), []).append(c)
        points = []
        for counts in itertools.product(*(range(len(g) + 1) for g in groups.values())):
            thinking = dict.fromkeys(levels, 0)
            for (_, level, _), k in zip(groups, counts, strict=True):
                thinking[level] += k
            sizes = {level: sum(c.level == level for c in choices) for level in levels}
            if any(not lo - 1e-9 <= thinking[lv] / sizes[lv] <= hi + 1e-9 for lv, (lo, hi) in bounds.items()):
                continue
            right = tokens = 0.0
            for g, k in zip(groups.values(), counts, strict=True):
                for c in g:
                    for think, share in ((True, k / len(g)), (False, 1 - k / len(g))):
                        ok, t = c.routed(think)
                        right, tokens = right + share * ok, tokens + share * t
            points.append((right / len(choices), tokens / len(choices)))
        frontier = informed_frontier(choices, bounds)
        assert points and frontier
        for accuracy, tokens in frontier:  # every vertex is a routing
            assert any(abs(accuracy - a) < 1e-9 and abs(tokens - t) < 1e-9 for a, t in points)
        for accuracy, tokens in points:  # and none is above the frontier
            best = best_accuracy(frontier, tokens)
            assert best is not None and best >= accuracy - 1e-9, (accuracy, tokens, frontier)
    alone = [replace(c, family=str(i)) for i, c in enumerate(random_choices(6, rng))]  # groups of one
    oracle, informed = oracle_frontier(alone), informed_frontier(alone)
    for accuracy, tokens in oracle:  # knowing each problem's group is knowing its outcomes
        assert best_accuracy(informed, tokens) >= accuracy - 1e-9
    assert best_accuracy(informed, informed[0][1] - 1) is None
    assert informed_frontier(alone, {1: (0.55, 0.6)}) == [], "no routing thinks on 55-60% of 6 problems"


def test_frontier_summary_reads_the_frontiers_and_the_level_rules() -> None:
    rows = [
        {"uid": "a", "level": 1, "question": "1+1", "mode": "no_think", "correct": True, "tokens": 5},
        {"uid": "a", "level": 1, "question": "1+1", "mode": "think", "correct": False, "tokens": 50},
        {"uid": "b", "level": 4, "question": "9*9", "mode": "no_think", "correct": False, "tokens": 6},
        {"uid": "b", "level": 4, "question": "9*9", "mode": "think", "correct": True, "tokens": 90},
    ]
    summary = frontier_summary(paired(rows), max_drop=0.0)
    assert summary["think_accuracy"] == 0.5
    assert summary["oracle_token_ratio"] == pytest.approx((5 + 2 + 6 + 2) / 2 / 70), "direct on both"
    # informed: a is never worth thinking on; b's group thinks as far as 60% of think's 70 tokens go
    assert summary["informed_accuracy"] == pytest.approx((1 + (0.6 * 70 * 2 - 15) / (91 - 8)) / 2)
    every, hard = summary["level_rules"]  # think from level 1 (everywhere) / from level 4 (on b)
    assert (every["from_level"], every["accuracy"]) == (1, 0.5)
    assert every["token_ratio"] == pytest.approx((50 + 1 + 90 + 1) / 2 / 70)
    assert (hard["from_level"], hard["accuracy"]) == (4, 1.0)
    assert hard["token_ratio"] == pytest.approx((5 + 2 + 90 + 1) / 2 / 70)
    assert "bounded_oracle_frontier" not in summary, "no think_bounds given"


def test_the_thinking_rate_target_bounds_the_hardest_and_the_easiest_level() -> None:
    assert target_think_bounds([3, 1, 2, 1]) == {3: (0.8, 1.0), 1: (0.0, 0.2)}
    assert target_think_bounds([2, 2]) == {}, "one level: nothing to bound"


def test_the_skip_probability_reads_the_prompt_auto_has_after_opening_its_think_block(tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 7 + 70?"}]
    auto = tokenizer.encode(prepare_chat(messages, "auto").text).ids
    think = tokenizer.encode(prepare_chat(messages, "think").text).ids
    assert think == [*auto, tokenizer.token_to_id(THINK_TOKEN)]


@torch.no_grad()
def test_skip_probability_matches_the_engine_first_token(tokenizer) -> None:
    model = tiny_model(tokenizer.get_vocab_size())
    end_think = tokenizer.token_to_id(END_THINK_TOKEN)
    questions = [f"What is {a} + {b}?" for a, b in [(1, 2), (30, 4), (7, 70), (12, 9), (5, 5), (81, 18)]]
    prompts = [prepare_chat([{"role": "user", "content": q}], "think").text for q in questions]
    # Give </think> the logit row of the top token plus a direction that separates the prompts'
    # last hidden states, so that </think> wins after some prompts and loses after the others.
    hidden: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: hidden.append(args[0][0, -1]))
    logits = [model(torch.tensor([tokenizer.encode(t).ids])).logits[0, -1] for t in prompts]
    hook.remove()
    states = torch.stack(hidden)
    top = int(logits[0].argmax())
    model.lm_head.weight[end_think] = model.lm_head.weight[top] + 10 * (states[0] - states.mean(0))

    p_skip, skips = skip_probabilities(model, tokenizer, questions)
    engine = LLMEngine(model, tokenizer, max_running=4)
    results = engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, logprobs=20))
    assert any(skips) and not all(skips), "both branches exercised"
    for p, skip, result in zip(p_skip, skips, results, strict=True):
        assert skip == (result.token_ids[0] == end_think)
        top = dict(result.logprobs[0].top)
        if end_think in top:
            assert p == pytest.approx(math.exp(top[end_think]), rel=1e-4), "softmax vs engine logprob"
        else:
            assert p <= math.exp(result.logprobs[0].logprob)
