"""Expert parallelism: every MoE layer's routed experts sharded over the ranks of a group, applied
to a built ``TurboSForCausalLM`` from outside.

``expert_parallel(model, mesh)`` gives rank r of EP ranks the experts [r E / EP, (r + 1) E / EP)
of every MoE layer (its slices of ``gate_up_proj`` / ``up_proj`` and ``down_proj``; the other
experts' weights are dropped) and replaces ``moe.experts`` by an ``ExpertParallelExperts``. The
expert parameters become DTensors sharded along the expert dimension over the EP mesh
(``Shard(0)``): their global shape and names are the unsharded model's, so distributed
checkpoints reshard them to another EP degree, and FSDP2 can shard them further over the ranks
that hold the same experts (``turbos.distributed.fsdp``). That module sits at the MoE's seam
between dispatch and combine (``RoutedExperts(x_sorted, tokens_per_expert)``, rows sorted by
global expert):

1. all-to-all of the per-expert row counts, so each rank knows what it will receive;
2. all-to-all of the rows to the ranks owning their experts (variable split sizes);
3. the received rows (grouped by source rank, then expert) regrouped by local expert and run by
   the ``RoutedExperts`` code on the local experts (grouped kernel or loop, as without EP);
4. all-to-all of the outputs back, in the original order.

The row exchanges are autograd functions (backward is the reverse all-to-all), so gradients are
exact: a local expert's gradient holds the contributions of every rank's tokens. The small-batch
no-grad paths (``gathered``, ``dense``, ``single``) are not taken (``holds_all_experts``): every
batch goes through the exchange, so every rank takes part in each layer's collectives whatever
its batch size. ``full_state_dict`` gathers the slices into plain tensors.

The ranks of the group are data parallel (each reads its own batch, as in torchtitan): routing,
capacity and recycle routing run on each rank's own tokens before the exchange, and so do the MoE
router losses (f_e and P_e of the load-balancing loss are this rank's); ``average_gradients``
averages gradients over the group (where no FSDP2 does) and ``all_reduce_moe_stats`` sums the
routing counts.
Limitations: the split sizes are read on the host (one synchronisation per layer on a GPU, so no
CUDA graph capture of decode steps); quantized experts are not supported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Function
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from turbos.model.moe import MoE, MoEStats, RoutedExperts


def _all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Rows x (sum(input_splits), ...) scattered to the ranks by input_splits; returns the rows
    received from each rank in rank order, (sum(output_splits), ...)."""
    out = x.new_empty(sum(output_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(Function):
    """``_all_to_all`` whose backward sends the gradients back along the same routes."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


class ExpertParallelExperts(RoutedExperts):
    """This rank's share of a layer's routed experts, exchanging rows with the other ranks (so
    ``apply_experts`` always takes dispatch -> experts -> combine: ``holds_all_experts`` False).

    ``num_experts`` stays the global count (what ``dispatch`` sorts by); the parameters are
    DTensors over ``mesh`` whose local parts hold the ``num_local_experts`` experts from
    ``first_expert`` on."""

    holds_all_experts = False

    def __init__(self, experts: RoutedExperts, mesh: DeviceMesh) -> None:
        if type(experts) is not RoutedExperts:
            raise TypeError(f"expert parallelism shards plain RoutedExperts, not {type(experts).__name__}")
        group = mesh.get_group()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if experts.num_experts % world:
            raise ValueError(
                f"expert parallelism over {world} ranks needs a number of experts divisible by {world}; "
                f"the model has {experts.num_experts}"
            )
        local = experts.num_experts // world
        hidden = experts.down_proj.shape[1]
        with torch.device("meta"):  # the parameters are replaced by the slices below
            super().__init__(local, hidden, experts.intermediate_size, "swiglu" if experts.gated else "relu2")
        self.group, self.world = group, world
        self.num_experts = experts.num_experts
        self.num_local_experts = local
        self.first_expert = rank * local
        for name in (self.in_proj_name, "down_proj"):
            full = getattr(experts, name)
            piece = full.detach()[self.first_expert : self.first_expert + local].clone()
            sharded = DTensor.from_local(piece, mesh, [Shard(0)], run_check=False)
            setattr(self, name, nn.Parameter(sharded, requires_grad=full.requires_grad))

    def weight(self, name: str) -> torch.Tensor:
        """This rank's experts of a parameter (differentiable: the gradient lands in the DTensor)."""
        param = getattr(self, name)
        return param.to_local() if isinstance(param, DTensor) else param

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``RoutedExperts.forward`` over the group: x (M, H) sorted by global expert (padding
        rows last), tokens_per_expert (E,) this rank's rows per global expert."""
        local = self.num_local_experts
        recv_counts = torch.empty_like(tokens_per_expert)  # (ranks x local experts): rows to receive
        dist.all_to_all_single(recv_counts, tokens_per_expert.contiguous(), group=self.group)
        recv_counts = recv_counts.view(self.world, local)
        # Split sizes on the host: on CPU the counts already lie in host memory; on a GPU this is
        # one synchronisation per layer (as RoutedExperts.looped's).
        send = tokens_per_expert.view(self.world, local).sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        routed = sum(send)
        received = _AllToAll.apply(x[:routed], recv, send, self.group)
        # Rows arrive by source rank, then by local expert: regroup them by local expert (stable).
        expert = torch.arange(local, device=x.device).repeat(self.world)
        expert = expert.repeat_interleave(recv_counts.reshape(-1), output_size=received.shape[0])
        order = torch.argsort(expert, stable=True)
        out = super().forward(received.index_select(0, order), recv_counts.sum(0))
        out = _AllToAll.apply(out.index_select(0, torch.argsort(order)), send, recv, self.group)
        return torch.cat([out, x.new_zeros(x.shape[0] - routed, x.shape[1])])


def expert_parallel(model: nn.Module, mesh: DeviceMesh | dist.ProcessGroup | None = None) -> nn.Module:
    """Shard every MoE layer's routed experts of ``model`` over a 1-D device ``mesh`` (or a
    process group; None: the default group), in place (module docstring); returns the model. The
    mesh's size must divide the number of experts. Build the optimizer afterwards (the expert
    parameters are new)."""
    layers = [module for module in model.modules() if isinstance(module, MoE)]
    if not layers:
        raise ValueError("expert parallelism needs an MoE model; this one has no MoE layers")
    if not isinstance(mesh, DeviceMesh):
        device = next(model.parameters()).device.type
        mesh = DeviceMesh.from_group(mesh or dist.group.WORLD, device)
    for moe in layers:
        moe.experts = ExpertParallelExperts(moe.experts, mesh)
    return model


def _sharded(model: nn.Module) -> list[tuple[str, ExpertParallelExperts]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)]


def average_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Gradients of the mean of the group's losses (one rank's loss per batch): replicated
    parameters' gradients averaged over the group; local experts' gradients, which already hold
    every rank's contributions (the exchange's backward), divided by the group's size."""
    world = dist.get_world_size(group)
    expert_ids = {id(p) for _, m in _sharded(model) for p in m.parameters()}
    for param in model.parameters():
        if param.grad is None:
            continue
        if id(param) not in expert_ids:
            dist.all_reduce(param.grad, group=group)
        param.grad /= world


def all_reduce_moe_stats(stats: list[MoEStats], group: dist.ProcessGroup | None = None) -> list[MoEStats]:
    """Routing counts (``CausalLMOutput.moe_stats``) summed over the group, in one all-reduce:
    the load of each expert over every rank's tokens. Each rank's own counts are per rank."""
    if not stats:
        return stats
    fields = ("expert_load", "assignments", "recycled", "dropped")
    parts = [getattr(s, f).reshape(-1).long() for s in stats for f in fields]
    flat = torch.cat(parts)
    dist.all_reduce(flat, group=group)
    values = iter(flat.split([p.numel() for p in parts]))
    return [
        MoEStats(**{f: next(values).view_as(getattr(s, f)).to(getattr(s, f).dtype) for f in fields})
        for s in stats
    ]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the unsharded model on every rank: each expert parameter all-gathered
    from its EP mesh's slices, the rest as it is. Every rank must call it; one of them writes the
    checkpoint."""
    return {
        name: value.full_tensor() if isinstance(value, DTensor) else value
        for name, value in model.state_dict().items()
    }
