"""Recycle routing, the MoE layer's training-time capacity (Hunyuan-Large), and the experts' paths."""

from __future__ import annotations

import pytest
import torch

from conftest import small_config
from turbos.model.moe import MoE, RoutedExperts, apply_experts, recycle_overflow_tokens
from turbos.model.quant import Int8RoutedExperts


def check_invariants(
    before: torch.Tensor,
    after: torch.Tensor,
    capacity: int,
    experts: int,
    recycled: torch.Tensor,
    dropped: torch.Tensor,
) -> torch.Tensor:
    """The recycle-routing rules on one outcome; returns the load per expert."""
    recycled, dropped = int(recycled), int(dropped)
    load = torch.bincount(after[after >= 0], minlength=experts)
    assert (load <= capacity).all(), f"capacity {capacity} exceeded: {load.tolist()}"
    changed = (before != after) & (before >= 0)
    n_dropped = int(((after < 0) & (before >= 0)).sum())
    n_recycled = int((changed & (after >= 0)).sum())
    assert (n_recycled, n_dropped) == (recycled, dropped), "reported counts must add up"
    assert int((before >= 0).sum()) == int((after >= 0).sum()) + dropped, (
        "every assignment is kept or dropped"
    )
    for row in after:  # a token never takes the same expert twice
        chosen = row[row >= 0]
        assert len(chosen.unique()) == len(chosen)
    for token in torch.nonzero(((after < 0) & (before >= 0)).any(1)).flatten().tolist():
        room = [e for e in range(experts) if load[e] < capacity and e not in after[token].tolist()]
        assert not room, f"token {token} dropped an assignment while experts {room} had room for it"
    return load


@pytest.mark.parametrize("seed", range(5))
def test_no_assignment_is_lost_while_an_expert_has_room(seed: int) -> None:
    torch.manual_seed(seed)
    N, k, E = 64, 2, 8
    # Skewed routing: most tokens want experts 0 and 1.
    first = torch.where(torch.rand(N) < 0.8, torch.zeros(N, dtype=torch.long), torch.randint(0, E, (N,)))
    second = (first + 1 + torch.randint(0, 2, (N,))) % E
    idx = torch.stack([first, second], 1)
    capacity = 20  # total room 160 >= 128 assignments: nothing may be dropped
    after, recycled, dropped = recycle_overflow_tokens(idx, capacity, E)
    load = check_invariants(idx, after, capacity, E, recycled, dropped)
    assert dropped == 0 and recycled > 0
    assert int(load.sum()) == N * k


def test_drops_only_when_experts_are_full() -> None:
    N, E = 40, 4
    idx = torch.stack([torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)], 1)
    capacity = 15  # room 60 < 80 assignments
    after, recycled, dropped = recycle_overflow_tokens(idx, capacity, E)
    load = check_invariants(idx, after, capacity, E, recycled, dropped)
    assert dropped == 80 - 60 and (load == capacity).all(), load


def test_first_choices_claim_capacity_before_second_choices() -> None:
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])
    after, _, _ = recycle_overflow_tokens(idx, capacity=2, num_experts=3)
    assert after[:, 0].tolist() == [0, 1, 0], "every first choice fits and must be kept"


def test_nothing_changes_when_under_capacity() -> None:
    idx = torch.tensor([[0, 1], [2, 3], [1, 2]])
    after, recycled, dropped = recycle_overflow_tokens(idx, capacity=2, num_experts=4)
    assert torch.equal(after, idx) and recycled == dropped == 0


def test_padding_assignments_are_ignored() -> None:
    idx = torch.tensor([[0, 1], [-1, -1], [0, 1], [0, 1]])
    after, recycled, dropped = recycle_overflow_tokens(idx, capacity=2, num_experts=4)
    assert after[1].tolist() == [-1, -1] and dropped == 0 and recycled == 2


def test_moe_applies_capacity_only_in_training() -> None:
    config = small_config(num_experts=4, capacity_factor=0.5)
    moe = MoE(config)
    with torch.no_grad():
        moe.gate.wg.weight.zero_()
        moe.gate.wg.weight[0] = 1.0  # route everything to expert 0 (and one more)
    x = torch.rand(2, 32, config.hidden_size) + 0.1
    moe.train()
    _, _, stats = moe(x)
    cap = moe.capacity(64)
    assert int(stats.expert_load.max()) <= cap
    assert stats.recycled + stats.dropped > 0 and stats.assignments == 128
    assert int(stats.expert_load.sum()) + stats.dropped == 128
    moe.eval()
    _, _, stats = moe(x)
    assert stats.recycled == stats.dropped == 0 and int(stats.expert_load.sum()) == 128


def test_load_balancing_loss_is_minimal_for_uniform_routing() -> None:
    config = small_config(num_experts=4, router_aux_loss_coef=1.0)
    moe = MoE(config).eval()
    x = torch.randn(4, 64, config.hidden_size)
    with torch.no_grad():
        moe.gate.wg.weight.zero_()
        _, balanced, _ = moe(x)
        moe.gate.wg.weight[0] = 5.0
        _, skewed, _ = moe(x.abs())
    assert balanced.item() == pytest.approx(1.0, abs=0.05), "E * sum f P = 1 at perfect balance"
    assert skewed.item() > 1.3 * balanced.item()


def test_router_z_loss_is_added_when_enabled() -> None:
    x = torch.randn(2, 8, 64)
    base = MoE(small_config(router_aux_loss_coef=0.0)).eval()
    with_z = MoE(small_config(router_aux_loss_coef=0.0, router_z_loss_coef=1e-3)).eval()
    with_z.load_state_dict(base.state_dict())
    assert base(x)[1].item() == 0 and with_z(x)[1].item() > 0


@pytest.mark.parametrize("idx", [[2, 0], [3, -1]])
def test_single_token_decode_path_matches_grouped_experts(idx: list[int]) -> None:
    torch.manual_seed(0)
    experts = RoutedExperts(num_experts=4, hidden_size=16, intermediate_size=24)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x, expert_idx, weights = torch.randn(1, 16), torch.tensor([idx]), torch.tensor([[0.7, 0.3]])
    grouped = apply_experts(experts, x, expert_idx, weights)  # grad enabled: dispatch -> experts -> combine
    with torch.no_grad():
        single = apply_experts(experts, x, expert_idx, weights)  # the batch-1 decode loop over k experts
        batched = apply_experts(experts, x.repeat(3, 1), expert_idx.repeat(3, 1), weights.repeat(3, 1))
    torch.testing.assert_close(single, grouped.detach())
    torch.testing.assert_close(batched, grouped.detach().repeat(3, 1))
    assert single.abs().sum() > 0


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_gathered_experts_match_grouped_experts(quantized: bool) -> None:
    """The sync-free GPU decode paths (one bmm per projection on gathered weights; every expert on
    every token) equal the grouped path, routing weights and 'no expert' (-1) choices included."""
    experts = RoutedExperts(num_experts=4, hidden_size=16, intermediate_size=24)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    if quantized:
        experts = Int8RoutedExperts(experts)
    x = torch.randn(5, 16)
    expert_idx = torch.tensor([[2, 0], [3, -1], [1, 2], [0, 0], [3, 1]])
    weights = torch.rand(5, 2)
    with torch.no_grad():
        grouped = apply_experts(experts, x, expert_idx, weights)
        for path in (experts.gathered, experts.dense):
            torch.testing.assert_close(path(x, expert_idx, weights), grouped)
            moved = path(x, expert_idx.roll(1, dims=1), weights)
            assert not torch.allclose(moved, grouped), "each choice keeps its own routing weight"
