"""Parallel degrees and the process group.

A recipe's ``parallel:`` section (``ParallelConfig``) says how to spread training over the ranks
torchrun starts; ``ParallelDims.resolve`` checks it against the world size and the model. The
ranks form a ``dp_shard x cp`` grid (rank = dp index x cp + cp index): the ``cp`` ranks of a row
share each batch, split along the sequence (context parallelism); the rows read different
batches. FSDP2 shards parameters over all ranks. Expert parallelism groups ``ep`` consecutive
ranks, each holding 1/ep of the routed experts; the ranks holding the same experts shard them
further with FSDP2 (``turbos.distributed.fsdp``).

``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and opens the
process group (gloo on CPU, nccl on CUDA); for a single process it does nothing, and every helper
here then acts as the only rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from turbos.config import ConfigError, TurboSConfig
from turbos.settings import setting


class ParallelError(ConfigError):
    """Parallel degrees that do not fit the world size or the model, or are not implemented yet."""


@dataclass
class ParallelConfig:
    """The recipe's ``parallel:`` section: how training spreads over torchrun's ranks."""

    dp_shard: int = setting(-1, ge=-1)
    """Data-parallel degree: ranks reading different batches (-1: world / cp). FSDP2 shards
    parameters, gradients and optimizer state over all dp_shard x cp ranks."""
    ep: int = setting(1, ge=1)
    """Expert-parallel degree: consecutive ranks that split the routed experts between them; it
    must divide the world size and the number of experts."""
    cp: int = setting(1, ge=1)
    """Context-parallel degree: consecutive ranks that split each sequence between them."""
    cp_mode: Literal["parallel", "sequential"] = "parallel"
    """How Mamba2 layers pass their state across context-parallel ranks (report §4)."""
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Parameters in compute under FSDP: 'auto' is bf16 on CUDA and fp32 on CPU; gradients are
    reduced in fp32 either way. A single process follows ``precision`` (autocast) alone."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of keeping them."""


@dataclass(frozen=True)
class ParallelDims:
    """Degrees resolved against the world size: ``world == dp_shard * cp``."""

    world: int
    dp_shard: int
    ep: int = 1
    cp: int = 1

    @property
    def data_parallel(self) -> int:
        """Ranks that read different batches."""
        return self.dp_shard

    def data_rank(self, rank: int) -> int:
        """Which of the ``data_parallel`` batches global ``rank`` reads."""
        return rank // self.cp

    def cp_rank(self, rank: int) -> int:
        """Which shard of its sequences global ``rank`` runs."""
        return rank % self.cp

    @classmethod
    def resolve(cls, config: ParallelConfig, world: int, model: TurboSConfig) -> ParallelDims:
        """Check ``config`` against ``world`` ranks and the model; ParallelError says what does not fit."""
        if config.dp_shard == 0:
            raise ParallelError("parallel.dp_shard must be -1 (all ranks) or >= 1, got 0")
        if world % config.cp:
            raise ParallelError(f"parallel.cp={config.cp} does not divide the world size {world}")
        dp_shard = world // config.cp if config.dp_shard == -1 else config.dp_shard
        if dp_shard * config.cp != world:
            raise ParallelError(
                f"parallel: dp_shard {dp_shard} x cp {config.cp} = {dp_shard * config.cp} ranks, "
                f"but the world size is {world}"
            )
        if config.ep > 1:
            if model.num_experts == 0:
                raise ParallelError(f"parallel.ep={config.ep} needs an MoE model; this one has no experts")
            if model.num_experts % config.ep:
                raise ParallelError(
                    f"parallel.ep={config.ep} must divide the model's num_experts ({model.num_experts})"
                )
            if world % config.ep:
                raise ParallelError(f"parallel.ep={config.ep} does not divide the world size {world}")
        sequential_mamba = config.cp > 1 and config.cp_mode == "sequential" and "M" in model.layer_types
        if sequential_mamba and config.activation_checkpointing:
            raise ParallelError(
                "parallel.cp_mode=sequential cannot recompute layers (activation_checkpointing): "
                "the recomputation would receive the states again; use cp_mode=parallel"
            )
        return cls(world=world, dp_shard=dp_shard, ep=config.ep, cp=config.cp)


def init_distributed(device: torch.device) -> int:
    """Join torchrun's process group (nccl for a CUDA ``device``, gloo otherwise; on CUDA each
    rank takes GPU LOCAL_RANK); returns the world size. A single process (no WORLD_SIZE, or 1)
    does nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return world_size()
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE is set but RANK or MASTER_ADDR is not: launch with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")
    return world


@contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """torchrun's process group for the duration (``init_distributed``; nothing for one process);
    yields whether this process is rank 0, the one that reports."""
    init_distributed(device)
    try:
        yield is_main()
    finally:
        close_distributed()


def close_distributed() -> None:
    """Leave the process group, if one was opened."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs and writes shared files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor averaged over the ranks, in one all-reduce (float64; gloo has no AVG)."""
    if not dist.is_initialized() or not values:
        return values
    flat = torch.cat([value.reshape(-1).double() for value in values.values()])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, at = {}, 0
    for name, value in values.items():
        out[name] = flat[at : at + value.numel()].view(value.shape)
        at += value.numel()
    return out


def clip_grad_norm_(parameters: Iterator[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) for parameters that may be DTensors on
    different meshes (FSDP2 over all ranks, experts over their replicas): the norm of each mesh's
    gradients is made whole over its ranks, and the total is the same on every rank. Plain
    tensors alone: torch's computation, bit for bit."""
    groups: dict[Any, list[nn.Parameter]] = {}
    for param in parameters:
        if param.grad is not None:
            grad = param.grad
            key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
            groups.setdefault(key, []).append(param)
    if not groups:
        return torch.zeros(())
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum().sqrt()
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


Item = TypeVar("Item")
Result = TypeVar("Result")


def share_work(
    items: Sequence[Item], work: Callable[[list[Item]], list[Result]], rank: int = 0, ranks: int = 1
) -> list[Result]:
    """``work`` (one result per item) on this rank's share of ``items`` (every ranks-th, from
    ``rank``), every rank's results all-gathered (the default process group, of ``ranks`` ranks)
    into the order of ``items``: on every rank what ``work(items)`` gives in one process (up to
    how ``work`` batches its items)."""
    if ranks == 1:
        return work(list(items))
    share = list(items[rank::ranks])
    parts: list[list[Result]] = [[] for _ in range(ranks)]
    dist.all_gather_object(parts, work(share) if share else [])
    results: list[Any] = [None] * len(items)
    for r, part in enumerate(parts):
        results[r::ranks] = part
    return results
