"""The MoE as router -> dispatch -> grouped experts -> combine, against the pre-split implementation
(tests/moe_reference.py): same outputs, losses, counts and gradients; recycle routing by the same
rules with no host synchronisation."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import moe_reference as reference
from conftest import small_config
from test_moe_routing import check_invariants
from turbos.model import moe as moe_module
from turbos.model.moe import MoE, RoutedExperts, dispatch, recycle_overflow_tokens

TOL = 1e-6
"""fp32, same weights and the same arithmetic up to summation order: differences are rounding."""


def pair(**overrides) -> tuple[MoE, reference.MoE]:
    """Our MoE and the reference with the same random weights."""
    config = small_config(**overrides)
    ours = MoE(config)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ref = reference.MoE(config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"{what}: max |new - reference| = {diff:.1e} > {TOL} (fp32 rounding only)"


def assert_same_forward(
    ours: MoE, ref: reference.MoE, x: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Output, router loss and counts equal. Returns (output, loss, reference output, reference
    loss, the reference's copy of x) for gradient checks: each side gets its own input gradient."""
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    got_out, got_loss, got = ours(x, mask)
    ref_out, ref_loss, expected = ref(x_ref, mask)
    assert_close(got_out, ref_out, "MoE output")
    assert_close(got_loss, ref_loss, "router loss")
    assert torch.equal(got.expert_load, expected.expert_load), "assignments per expert"
    assert (int(got.assignments), int(got.recycled), int(got.dropped)) == (
        expected.assignments,
        expected.recycled,
        expected.dropped,
    ), "requested, recycled and dropped counts"
    return got_out, got_loss, ref_out, ref_loss, x_ref


def assert_same_gradients(ours: MoE, ref: reference.MoE, x: torch.Tensor, mask: torch.Tensor | None = None):
    x = x.clone().requires_grad_()
    out, loss, ref_out, ref_loss, x_ref = assert_same_forward(ours, ref, x, mask)
    weight = torch.randn_like(out)
    ((out * weight).sum() + loss).backward()
    ((ref_out * weight).sum() + ref_loss).backward()
    assert_close(x.grad, x_ref.grad, "gradient of the input")
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref_params[name].grad, f"gradient of {name}")


def padding_mask(b: int, T: int) -> torch.Tensor:
    mask = torch.ones(b, T)
    mask[0, :5] = 0  # left padding
    mask[-1, -3:] = 0  # right padding
    return mask


def test_eval_forward_equals_the_reference() -> None:
    ours, ref = pair(router_z_loss_coef=1e-3)
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        assert_same_forward(ours.eval(), ref.eval(), x)


def test_training_without_overflow_equals_the_reference() -> None:
    ours, ref = pair(capacity_factor=100.0, router_z_loss_coef=1e-3)
    with torch.no_grad():
        assert_same_forward(ours.train(), ref.train(), torch.randn(2, 24, 64))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_token_mask_equals_the_reference(training: bool) -> None:
    ours, ref = pair(capacity_factor=100.0, router_z_loss_coef=1e-3)
    ours.train(training), ref.train(training)
    with torch.no_grad():
        assert_same_forward(ours, ref, torch.randn(2, 20, 64), padding_mask(2, 20))


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_gradients_equal_the_reference(padded: bool) -> None:
    ours, ref = pair(capacity_factor=100.0, router_z_loss_coef=1e-3)
    mask = padding_mask(2, 16) if padded else None
    assert_same_gradients(ours.train(), ref.train(), torch.randn(2, 16, 64), mask)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_forced_overflow_equals_the_reference(padded: bool) -> None:
    """Every token ranks experts 0 > 1 > 2 and capacity is 8 for 12 tokens: tokens 8-11 overflow
    both choices, and the only expert with room is 2, so each recycles its first choice there and
    drops its second (it already uses 2) while 2 still has room. The outcome is forced, so outputs
    and gradients must equal the reference whatever the random draws (padding: the capacity comes
    from a device count of the 12 valid tokens)."""
    ours, ref = pair(num_experts=3, capacity_factor=1.0)
    with torch.no_grad():
        ours.gate.wg.weight.copy_(torch.tensor([[0.1], [0.05], [0.0]]).expand(3, 64))
        ref.gate.wg.weight.copy_(ours.gate.wg.weight)
    x = torch.rand(1, 14 if padded else 12, 64) + 0.1  # positive: logits ordered 0 > 1 > 2
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 2)], 1) if padded else None
    ours.train(), ref.train()
    assert_same_gradients(ours, ref, x, mask)
    _, _, stats = ours(x, mask)
    assert (int(stats.recycled), int(stats.dropped)) == (4, 4), "the forced outcome"


def skewed_routing(seed: int, N: int, k: int, E: int, padding: int = 0) -> torch.Tensor:
    """Top-k of scores biased towards the low experts, the first `padding` tokens unrouted."""
    g = torch.Generator().manual_seed(seed)
    idx = (torch.rand(N, E, generator=g) + torch.linspace(2, 0, E)).topk(k, dim=-1).indices
    idx[:padding] = -1
    return idx


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [2, 3])
def test_kept_assignments_equal_the_reference(seed: int, k: int) -> None:
    idx = skewed_routing(seed, N=50, k=k, E=6, padding=4)
    after, _, _ = recycle_overflow_tokens(idx, 15, 6)
    ref_after, _, _ = reference.recycle_overflow_tokens(idx, 15, 6)
    assert torch.equal(after == idx, ref_after == idx), "assignments kept in priority order"


FORCED = {
    # name: (routing, capacity, experts, recycled, dropped)
    "two experts full, two with room": (torch.tensor([[0, 1]] * 40), 15, 4, 30, 20),
    "the expert with room is the token's already": (torch.tensor([[0, 1]] * 12), 8, 3, 4, 4),
    "no room anywhere": (torch.tensor([[0, 1]] * 10), 4, 2, 0, 12),
    "room for every overflow": (torch.tensor([[0, 1]] * 16), 8, 8, 16, 0),
    "top-3, one expert with room": (torch.tensor([[0, 1, 2]] * 8), 6, 4, 2, 4),
}


@pytest.mark.parametrize("case", FORCED)
def test_forced_counts_equal_the_reference(case: str) -> None:
    idx, capacity, E, recycled, dropped = FORCED[case]
    after, got_recycled, got_dropped = recycle_overflow_tokens(idx, capacity, E)
    _, ref_recycled, ref_dropped = reference.recycle_overflow_tokens(idx, capacity, E)
    assert (ref_recycled, ref_dropped) == (recycled, dropped), "the reference's outcome is the forced one"
    assert (int(got_recycled), int(got_dropped)) == (recycled, dropped), "recycled and dropped"
    check_invariants(idx, after, capacity, E, got_recycled, got_dropped)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("k", "capacity"), [(1, 7), (2, 9), (2, 14), (3, 16)])
def test_recycling_obeys_the_rules(seed: int, k: int, capacity: int) -> None:
    """No expert over capacity, no token on one expert twice, kept + dropped = all, and an
    assignment dropped only when every expert with room is already its token's."""
    idx = skewed_routing(seed, N=40, k=k, E=6, padding=3)
    torch.manual_seed(seed)
    after, recycled, dropped = recycle_overflow_tokens(idx, capacity, 6)
    check_invariants(idx, after, capacity, 6, recycled, dropped)


def test_recycling_with_a_device_capacity_equals_an_int_capacity() -> None:
    idx = skewed_routing(0, N=40, k=2, E=6)
    torch.manual_seed(1)
    expected = recycle_overflow_tokens(idx, 10, 6)
    torch.manual_seed(1)
    got = recycle_overflow_tokens(idx, torch.tensor(10), 6)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_recycled_assignments_spread_uniformly_over_the_eligible_experts() -> None:
    """1000 tokens all on expert 0 with capacity 400: 600 overflow, and experts 1-4 have room for
    all of them, so each goes to one of the four uniformly: about 150 each (binomial sd 10.6)."""
    idx = torch.zeros(1000, 1, dtype=torch.long)
    after, recycled, dropped = recycle_overflow_tokens(idx, 400, 5)
    load = torch.bincount(after.flatten(), minlength=5)
    assert (int(recycled), int(dropped), int(load[0])) == (600, 0, 400)
    assert ((load[1:] - 150).abs() < 50).all(), f"loads {load.tolist()} are not uniform (> 4.7 sd off)"


@pytest.mark.parametrize("factor", [0.3, 1.0, 1.1, 1.5, 2.7])
def test_capacity_of_a_device_count_equals_the_python_formula(factor: float) -> None:
    moe = MoE(small_config(capacity_factor=factor, num_experts=7, num_experts_per_tok=3))
    counts = torch.arange(3000)
    assert moe.capacity(counts).tolist() == [moe.capacity(n) for n in range(3000)]


def test_dispatch_sorts_assignments_by_expert_with_unrouted_last() -> None:
    idx = torch.tensor([[2, 0], [-1, -1], [0, 1], [2, -1]])
    routing = dispatch(idx, num_experts=4)
    assert routing.tokens_per_expert.tolist() == [2, 1, 2, 0]
    assert idx.reshape(-1)[routing.order].tolist() == [0, 0, 1, 2, 2, -1, -1, -1]
    assert routing.token.tolist() == [0, 2, 2, 0, 3, 1, 1, 3], "token order within an expert"
    assert routing.routed.tolist() == [True] * 5 + [False] * 3


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm needs torch >= 2.8")
def test_grouped_kernel_path_equals_the_loop_over_experts() -> None:
    """``RoutedExperts.grouped`` (torch._grouped_mm; on CPU PyTorch's own loop) equals ``looped``
    on the routed rows, an empty expert and padding rows included, gradients too."""
    experts = RoutedExperts(num_experts=4, hidden_size=16, intermediate_size=24)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(13, 16)  # 10 routed rows, 3 padding
    weight = torch.randn(10, 16)
    grads = []
    for path in (lambda x: experts.looped(x, counts.tolist()), lambda x: experts.grouped(x, counts)):
        experts.zero_grad()
        xg = x.clone().requires_grad_()
        out = path(xg)
        assert torch.isfinite(out).all(), "padding rows must be finite (combine weights them 0)"
        (out[:10] * weight).sum().backward()
        grads.append(
            (out[:10].detach(), xg.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
        )
    for name, got, expected in zip(("output", "dx", "d gate_up", "d down"), grads[1], grads[0], strict=True):
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-5, f"grouped vs looped {name}: {diff:.1e} (fp32, different matmul kernels)"


SYNCING = frozenset(
    {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}  # read a value
    | {"nonzero", "argwhere", "bincount", "masked_select", "unique", "unique_consecutive"}  # size by one
)


class HostRead(AssertionError):
    pass


def _has_bool_index(index: object) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostReadGuard(TorchFunctionMode):
    """Fails on every tensor operation that reads device values on the host or sizes its result by
    them (each a synchronisation on CUDA), boolean-mask indexing included, unless ``allowed``."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        bool_index = name in ("__getitem__", "__setitem__") and _has_bool_index(args[1])
        if not self.allowed and (name in SYNCING or bool_index):
            raise HostRead(f"{name} reads device values on the host")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_training_step_reads_the_host_only_for_the_cpu_expert_loop(padded: bool, monkeypatch) -> None:
    ours, _ = pair(capacity_factor=0.5, router_z_loss_coef=1e-3)  # overflow: recycling runs
    x = torch.randn(2, 32, 64, requires_grad=True)
    mask = padding_mask(2, 32) if padded else None
    guard, calls = HostReadGuard(), []
    host_counts = moe_module._host_counts

    def allowed_host_counts(tokens_per_expert: torch.Tensor) -> list[int]:
        calls.append(tokens_per_expert)
        guard.allowed = True
        try:
            return host_counts(tokens_per_expert)
        finally:
            guard.allowed = False

    monkeypatch.setattr(moe_module, "_host_counts", allowed_host_counts)
    with guard:
        out, loss, stats = ours.train()(x, mask)
        (out.pow(2).mean() + loss).backward()
    assert len(calls) == 1, "the CPU loop over experts reads the counts once, through _host_counts"
    assert int(stats.recycled) + int(stats.dropped) > 0, "the test must exercise recycling"


def test_the_host_read_guard_catches_the_reference() -> None:
    """The guard above can fail: the pre-split MoE reads counts on the host while recycling."""
    _, ref = pair(capacity_factor=0.5)
    with pytest.raises(HostRead), HostReadGuard():
        ref.train()(torch.randn(2, 32, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_step_does_not_synchronise_on_cuda(monkeypatch) -> None:
    """bf16 autocast on a GPU where torch._grouped_mm has its kernel: forward and backward of a
    padded, overflowing batch run without one host synchronisation."""
    ours, _ = pair(num_experts=8, capacity_factor=0.5, router_z_loss_coef=1e-3)
    ours = ours.cuda().train()
    x = torch.randn(2, 64, 64, device="cuda", requires_grad=True)
    mask = padding_mask(2, 64).cuda()
    if not moe_module._grouped_kernel_runs(x, torch.bfloat16, ours.experts.intermediate_size):
        pytest.skip("torch._grouped_mm has its own kernel on sm90 / sm100 only")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, loss, _ = ours(x, mask)
        (out.float().pow(2).mean() + loss).backward()

    step()  # warm-up: library handles and allocator pools
    calls = []
    monkeypatch.setattr(moe_module, "_host_counts", lambda counts: calls.append(counts) or counts.tolist())
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not calls, "with the grouped kernel the expert counts stay on the device"
