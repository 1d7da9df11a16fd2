"""The GRPO terms and advantage rules against hand-computed values, and each term's effect on the
gradient (none may be silently zero)."""

from __future__ import annotations

import math

import pytest
import torch

from turbos.rl.advantages import group_advantages, informative_groups, unstable_prompts
from turbos.rl.losses import GRPOLossConfig, clipped_policy_loss, grpo_loss, k3_kl, positive_nll
from turbos.rl.rewards import AdaptiveShaping, adaptive_cot_rewards


def test_clipped_policy_loss_takes_the_pessimistic_branch_with_separate_low_and_high_clips() -> None:
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    logp = ratios.log().requires_grad_()
    loss, clipped = clipped_policy_loss(logp, torch.zeros(5), advantages, eps_low=0.2, eps_high=0.28)
    # r=1.5, A=+1: min(1.5, 1.28) -> 1.28 (clipped high); r=0.5, A=+1: min(0.5, 0.8) -> 0.5;
    # r=0.5, A=-1: min(-0.5, -0.8) -> -0.8 (clipped low); r=1.5, A=-1: min(-1.5, -1.28) -> -1.5
    assert loss.tolist() == pytest.approx([-1.28, -0.5, 0.8, 1.5, -2.2], abs=1e-6)
    assert clipped.tolist() == [True, False, True, False, False]
    loss.sum().backward()
    # d(-r A)/d logp = -r A where unclipped; 0 where the clipped branch is taken
    assert logp.grad.tolist() == pytest.approx([0.0, -0.5, 0.0, 1.5, -2.2], abs=1e-6)


def test_k3_kl_matches_its_formula_and_is_clipped_to_0_10() -> None:
    logp = torch.tensor([math.log(0.5), 0.0, -20.0], requires_grad=True)
    ref = torch.tensor([math.log(0.25), 0.0, 0.0])
    kl = k3_kl(logp, ref)
    # d = ref - logp: log(0.5) -> 0.5 + 0.6931 - 1 = 0.1931; 0 -> 0; 20 -> e^20 - 21, clipped to 10
    assert kl.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0, 10.0], abs=1e-6)
    kl.sum().backward()
    # d/d logp (e^d - d - 1) = 1 - e^d: 0.5 at the first token; 0 where clipped
    assert logp.grad.tolist() == pytest.approx([0.5, 0.0, 0.0], abs=1e-6)


def test_positive_nll_acts_only_on_positive_advantages() -> None:
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    nll = positive_nll(logp, torch.tensor([1.0, 0.0, -1.0]))
    assert nll.tolist() == [1.0, 0.0, 0.0]
    nll.sum().backward()
    assert logp.grad.tolist() == [-1.0, 0.0, 0.0]


def test_grpo_loss_is_a_token_level_mean_of_its_terms() -> None:
    logp = torch.tensor([math.log(0.5)] * 2)
    ref = torch.tensor([math.log(0.25), math.log(0.5)])
    advantages = torch.tensor([1.0, -1.0])
    config = GRPOLossConfig(kl_coef=0.1, nll_coef=0.5)
    loss, parts = grpo_loss(logp, logp, ref, advantages, config)
    # pg -1 + 1 = 0; kl 0.1 * 0.19315; nll 0.5 * 0.69315 (first token only); over 2 tokens
    k3 = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx((0.1 * k3 + 0.5 * math.log(2)) / 2, abs=1e-6)
    assert parts["kl"].item() == pytest.approx(k3 / 2, abs=1e-6)
    assert parts["nll_loss"].item() == pytest.approx(math.log(2) / 2, abs=1e-6)
    assert parts["pg_loss"].item() == pytest.approx(0.0, abs=1e-6)
    # a given divisor (the optimizer step's tokens over several micro-batches) replaces n
    loss4, _ = grpo_loss(logp, logp, ref, advantages, config, num_tokens=4)
    assert loss4.item() == pytest.approx(loss.item() / 2, abs=1e-7)


def test_every_token_weighs_alike_whatever_the_length_of_its_response() -> None:
    """Token-level: a 1-token response and a 3-token response with the same advantage put the
    same gradient on each of their tokens (a per-response mean would give the lone token 3x)."""
    logp = torch.zeros(4, requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, 1.0, 1.0])  # response A: token 0; response B: tokens 1-3
    loss, _ = grpo_loss(logp, logp.detach(), None, advantages, GRPOLossConfig(nll_coef=0))
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-0.25] * 4)


def _gradient(config: GRPOLossConfig, advantages: torch.Tensor) -> torch.Tensor:
    logp = torch.tensor([-0.7, -1.2, -0.3], requires_grad=True)
    old = torch.tensor([-0.9, -1.0, -0.3])
    ref = torch.tensor([-1.5, -0.4, -2.0])
    loss, _ = grpo_loss(logp, old, ref, advantages, config)
    loss.backward()
    return logp.grad


def test_each_term_changes_the_gradient_where_it_should_act() -> None:
    advantages = torch.tensor([1.0, -0.5, 0.0])
    base = GRPOLossConfig(kl_coef=0.0, nll_coef=0.0)
    plain = _gradient(base, advantages)
    with_kl = _gradient(GRPOLossConfig(kl_coef=0.1, nll_coef=0.0), advantages)
    with_nll = _gradient(GRPOLossConfig(kl_coef=0.0, nll_coef=0.1), advantages)
    assert not torch.allclose(plain, with_kl), "the KL term moves the gradient"
    assert not torch.allclose(plain, with_nll), "the likelihood term moves the gradient"
    # the likelihood term touches only the positive-advantage token
    assert with_nll[1:].tolist() == pytest.approx(plain[1:].tolist())
    assert with_nll[0].item() == pytest.approx(plain[0].item() - 0.1 / 3)
    # and nothing when no advantage is positive
    negative = torch.tensor([-1.0, -0.5, 0.0])
    assert torch.equal(
        _gradient(base, negative), _gradient(GRPOLossConfig(kl_coef=0, nll_coef=0.1), negative)
    )
    # a clip: pushing a ratio already above 1 + eps_high further gives no gradient
    tight = GRPOLossConfig(eps_low=0.2, eps_high=0.1, kl_coef=0, nll_coef=0)
    assert _gradient(tight, advantages)[0].item() == 0.0, "r = e^0.2 > 1.1 with A > 0 is clipped"
    assert plain[0].item() != 0.0


def test_group_advantages_normalise_and_keep_good_answers_positive() -> None:
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([True, False, False, False]))
    std = math.sqrt(0.1875)  # population std of [1, 0, 0, 0]
    assert a.tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], rel=1e-5)
    # shaped rewards: the mean 1.22 is above the worst good reward 1.0, which plain GRPO would make
    # negative; the baseline is moved into [0 + 0.25, 1.0 - 0.25], to 0.75
    rewards = torch.tensor([1.7, 1.7, 1.7, 1.0, 0.0])
    good = torch.tensor([True, True, True, True, False])
    std = rewards.double().std(unbiased=False).item()
    plain = group_advantages(rewards)
    assert plain[3] < 0, "without the adjustment a correct answer gets a negative advantage"
    adjusted = group_advantages(rewards, good)
    assert adjusted.tolist() == pytest.approx([(r - 0.75) / std for r in rewards.tolist()], rel=1e-5)
    assert (adjusted[good] > 0).all() and (adjusted[~good] < 0).all()
    # all equal: no signal
    assert group_advantages(torch.ones(4), torch.ones(4, dtype=torch.bool)).tolist() == [0.0] * 4


def test_prompt_filter_and_dynamic_sampling_keep_only_what_teaches() -> None:
    assert unstable_prompts([0, 3, 8, 5], samples=8) == [False, True, False, True]
    assert informative_groups([torch.zeros(3), torch.tensor([0.0, 1.0, -1.0])]) == [False, True]


def test_adaptive_reward_prefers_short_answers_where_they_succeed_as_often() -> None:
    rewards, info = adaptive_cot_rewards(
        base=[1, 1, 0, 1, 0, 1],
        correct=[True, True, False, True, False, True],
        thought=[True, False, True, True, False, False],
        reasoning_tokens=[30, 0, 50, 10, 0, 0],
        shaping=AdaptiveShaping(depth_bonus=0.5, compression=0.2),
    )
    # p_long = 2/3 = p_short: short preferred, +0.5 to the correct short answers (1, 5);
    # compression among correct long ones (30 and 10 tokens): +0.2 to the shorter, 0 to the longer
    assert info == {"p_long": pytest.approx(2 / 3), "p_short": pytest.approx(2 / 3), "preferred": "short"}
    assert rewards == pytest.approx([1.0, 1.5, 0.0, 1.2, 0.0, 1.5])


def test_adaptive_reward_prefers_long_reasoning_where_only_it_solves() -> None:
    rewards, info = adaptive_cot_rewards(
        base=[1, 0, 1, 0],
        correct=[True, False, True, False],
        thought=[True, False, True, False],
        reasoning_tokens=[40, 0, 20, 0],
        shaping=AdaptiveShaping(depth_bonus=0.5, compression=0.2),
    )
    assert info["preferred"] == "long"
    assert rewards == pytest.approx([1.5, 0.0, 1.7, 0.0])
    # a margin asks long reasoning to win by more than it before it is preferred
    _, info = adaptive_cot_rewards(
        [1, 1, 1, 0],
        [True, True, True, False],
        [True, True, False, False],
        [5, 5, 0, 0],
        AdaptiveShaping(margin=0.6),
    )
    assert (info["p_long"], info["p_short"], info["preferred"]) == (1.0, 0.5, "short")
    # with no sample of one depth there is no preference: only compression acts
    rewards, info = adaptive_cot_rewards([1, 1], [True, True], [True, True], [10, 20], AdaptiveShaping())
    assert info["preferred"] is None and rewards == pytest.approx([1.2, 1.0])
