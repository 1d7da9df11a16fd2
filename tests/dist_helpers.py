"""Running a check on several gloo ranks (spawned processes on 127.0.0.1) for the distributed tests."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from turbos.distributed.parallel import close_distributed, init_distributed
from turbos.model import TurboSForCausalLM


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(local_rank: int, fn: Callable[..., None], world: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"))
    try:
        fn(*args)
        dist.barrier()  # every rank done before any tears its connections down
    finally:
        close_distributed()


def run_ranks(fn: Callable[..., None], world: int, *args: Any, timeout: float = 180) -> None:
    """Run ``fn(*args)`` on ``world`` spawned ranks in one gloo process group; a rank's exception
    fails the test, and so does a run past ``timeout`` seconds."""
    ctx = mp.start_processes(
        _rank_entry,
        args=(fn, world, _free_port(), args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish in {timeout} s")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts of the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def exported_weights(run: Path) -> dict[str, torch.Tensor]:
    """The state dict of a run's final ``model/`` directory."""
    return TurboSForCausalLM.from_pretrained(run / "model").state_dict()
