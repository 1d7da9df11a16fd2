"""Parallel degrees and the process group.

A recipe's ``parallel:`` section (``ParallelConfig``) says how to spread training over the ranks
torchrun starts; ``ParallelDims.resolve`` checks it against the world size and the model. Only
data-parallel sharding (FSDP2 over ``dp_shard`` ranks) is implemented; expert parallelism
(``ep``) and context parallelism (``cp``) are validated and refused by name until they land.

``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and opens the
process group (gloo on CPU, nccl on CUDA); for a single process it does nothing, and every helper
here then acts as the only rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from turbos.config import ConfigError, TurboSConfig
from turbos.settings import setting


class ParallelError(ConfigError):
    """Parallel degrees that do not fit the world size or the model, or are not implemented yet."""


@dataclass
class ParallelConfig:
    """The recipe's ``parallel:`` section: how training spreads over torchrun's ranks."""

    dp_shard: int = setting(-1, ge=-1)
    """Ranks that shard parameters, gradients and optimizer state (FSDP2); -1: all of them."""
    ep: int = setting(1, ge=1)
    """Expert-parallel degree (not implemented yet: 1)."""
    cp: int = setting(1, ge=1)
    """Context-parallel degree (not implemented yet: 1)."""
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
            raise ParallelError(f"parallel.ep={config.ep}: expert parallelism is not implemented yet (use 1)")
        if config.cp > 1:
            raise ParallelError(
                f"parallel.cp={config.cp}: context parallelism is not implemented yet (use 1)"
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
