"""Expert parallelism (``turbos.distributed.expert_parallel``) against one process on the whole
batch: 2 gloo processes on CPU, fp32, each rank taking half of the batch (data parallel over the
EP group). Every check runs in one spawn (starting processes is the cost)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from conftest import small_config
from dist_helpers import run_ranks
from turbos.config import TurboSConfig
from turbos.distributed.expert_parallel import (
    ExpertParallelExperts,
    all_reduce_moe_stats,
    average_gradients,
    expert_parallel,
    full_state_dict,
)
from turbos.model import TurboSForCausalLM
from turbos.model.moe import MoE, apply_experts

TOLERANCE = 1e-5
BATCH, T = 4, 24


def _config(**overrides) -> TurboSConfig:
    # No load-balancing loss and no capacity limit: routing is then per token, and a rank routes
    # its half of the batch as the whole batch does (the router loss is per rank under EP).
    return small_config(router_aux_loss_coef=0.0, capacity_factor=100.0, **overrides)


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, _config().vocab_size, (BATCH, T), generator=torch.Generator().manual_seed(seed))


def _local(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a batch."""
    n = x.shape[0] // dist.get_world_size()
    return x[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def _expert_slice(model: TurboSForCausalLM, name: str) -> slice | None:
    """The rows of the full parameter ``name`` this rank holds, for expert parameters."""
    module = model.get_submodule(name.rpartition(".")[0])
    if isinstance(module, ExpertParallelExperts):
        return slice(module.first_expert, module.first_expert + module.num_local_experts)
    return None


def _local_tensor(x: torch.Tensor) -> torch.Tensor:
    """A tensor, or this rank's part of a DTensor (an expert parameter or its gradient)."""
    return x.to_local() if isinstance(x, DTensor) else x


def _models() -> tuple[TurboSForCausalLM, TurboSForCausalLM]:
    torch.manual_seed(0)
    ref = TurboSForCausalLM(_config()).train()
    return ref, expert_parallel(copy.deepcopy(ref))


def _step(ref: TurboSForCausalLM, model: TurboSForCausalLM, ids: torch.Tensor):
    """Whole-batch loss and outputs on ref; this rank's half under EP, gradients averaged."""
    ref.zero_grad()
    ref_out = ref(ids, labels=ids)
    ref_out.loss.backward()
    model.zero_grad()
    out = model(_local(ids), labels=_local(ids))
    out.loss.backward()
    average_gradients(model)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    return ref_out, out, loss / dist.get_world_size()


def _check_parity() -> None:
    """(a) Loss, every gradient (experts slice by slice) and the summed expert load."""
    ref, model = _models()
    ref_out, out, loss = _step(ref, model, _batch(0))
    where = f"rank={dist.get_rank()}"
    assert abs(loss - ref_out.loss.detach()) <= TOLERANCE, f"{where}: loss {loss} vs {ref_out.loss}"
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        rows = _expert_slice(model, name)
        if rows is not None:
            expected = expected[rows]
            assert p.to_local().shape[0] == model.config.num_experts // dist.get_world_size(), name
            assert p.shape == ref_params[name].shape, name  # a DTensor: the global shape
        diff = (_local_tensor(p.grad) - expected).abs().max().item()
        assert diff <= TOLERANCE, f"{where}: gradient of {name} differs by {diff}"
    stats = all_reduce_moe_stats(out.moe_stats)
    assert len(stats) == len(ref_out.moe_stats) > 0
    for mine, theirs in zip(stats, ref_out.moe_stats, strict=True):
        assert torch.equal(mine.expert_load, theirs.expert_load), f"{where}: {mine} vs {theirs}"
        assert torch.equal(mine.assignments, theirs.assignments)


def _check_adamw_steps(steps: int = 3) -> None:
    """(b) AdamW steps under EP give the single process's weights (gathered into one state dict)."""
    ref, model = _models()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        _step(ref, model, _batch(100 + step))
        ref_opt.step()
        opt.step()
    state, ref_state = full_state_dict(model), ref.state_dict()
    assert state.keys() == ref_state.keys()
    for name, expected in ref_state.items():
        diff = (state[name] - expected).abs().max().item()
        assert diff <= TOLERANCE, f"{name} differs by {diff} after {steps} steps"


@torch.no_grad()
def _check_inference() -> None:
    """(c) Eval forwards of decode-size batches, a different size on each rank (one token would
    take the ``single`` path without EP), and ``apply_experts`` on small no-grad batches, match
    the single process's ``gathered`` / ``dense`` paths."""
    ref, model = _models()
    ref.eval(), model.eval()
    rank = dist.get_rank()
    ids = _batch(7)[rank : rank + 1, : 1 + 2 * rank]  # (1, 1) on rank 0, (1, 3) on rank 1
    diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= TOLERANCE, f"rank={rank}: logits differ by {diff}"
    x = torch.randn(3 + rank, ref.config.hidden_size, generator=torch.Generator().manual_seed(rank))
    for ref_moe, moe in zip(
        (m for m in ref.modules() if isinstance(m, MoE)),
        (m for m in model.modules() if isinstance(m, MoE)),
        strict=True,
    ):
        _, _, weights, idx = ref_moe.route(x, None)
        got = apply_experts(moe.experts, x, idx, weights)
        for path in ("gathered", "dense"):
            diff = (got - getattr(ref_moe.experts, path)(x, idx, weights)).abs().max().item()
            assert diff <= TOLERANCE, f"rank={rank} {path}: differs by {diff}"


def _check_refusals() -> None:
    """(d) A group size that does not divide the number of experts."""
    with pytest.raises(ValueError, match="divisible by 2; the model has 3"):
        expert_parallel(TurboSForCausalLM(_config(num_experts=3)))


def _all_checks() -> None:
    _check_parity()
    _check_adamw_steps()
    _check_inference()
    _check_refusals()


def test_expert_parallel_on_2_ranks_matches_one_process() -> None:
    run_ranks(_all_checks, 2)
