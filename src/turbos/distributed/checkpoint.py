"""Training checkpoints of a sharded model: ``torch.distributed.checkpoint`` (DCP) in ``dcp/``.

Layout of ``RUN_DIR/checkpoints/step-00000100/`` written by N ranks (every rank calls):

    dcp/                                 model + optimizer state, one file per rank (DCP), read
                                         back on any number of ranks (DCP reshards on load)
    config.json, model.safetensors       the whole model, gathered and written by rank 0, so the
                                         directory loads with TurboSForCausalLM.from_pretrained
    tokenizer.json, rng.pt, trainer_state.json   as in ``turbos.train.checkpoint``

Rank 0 prepares the temporary directory and renames it into place after every rank has written
its part, so the checkpoint appears whole or not at all (the run directory must be on a file
system every rank sees). ``load_sharded_checkpoint`` also runs in a single process, without a
process group, into a plain model: a run saved on N ranks resumes on one.

``copy_full_weights`` fills an unsharded copy of the model (GRPO's rollout engine) from the
sharded one, parameter by parameter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from turbos.distributed.parallel import barrier, broadcast_object, is_main
from turbos.safetensors_io import save_state_dict
from turbos.train.checkpoint import (
    begin_checkpoint,
    check_model_config,
    publish_checkpoint,
    read_trainer_state,
    set_rng_state,
    write_run_files,
)

DCP_DIR = "dcp"


def is_sharded_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint holds its model and optimizer in DCP form (written by several ranks)."""
    return (Path(directory) / DCP_DIR).is_dir()


def export_full_model(model: nn.Module, directory: Path) -> None:
    """config.json + model.safetensors of the whole model in ``directory``, written by rank 0 (every
    rank calls: the shards are gathered), as ``TurboSForCausalLM.save_pretrained`` writes them."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return
    config = model.config
    config.save_pretrained(directory)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_state_dict(state, directory, metadata={"turbos_config": json.dumps(config.to_dict())})


@torch.no_grad()
def copy_full_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy every parameter of ``source`` (sharded by FSDP2: each gathered whole in turn, so at
    most one extra parameter's memory; or not sharded) into the same-named parameter of the
    unsharded ``target``, in place (its storage stays, as CUDA graphs need). Every rank calls."""
    into = dict(target.named_parameters())
    for name, param in source.named_parameters():
        into[name].copy_(param.full_tensor() if isinstance(param, DTensor) else param)


def save_sharded_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    tokenizer_dir: Path | None,
    keep_last: int,
    rng: dict[str, Any],
) -> Path:
    """Atomically write the checkpoint of ``step`` from every rank (rank 0's ``rng`` and
    ``trainer_state``); keep the newest ``keep_last`` (0: all). Returns its path on every rank."""
    tmp = broadcast_object(begin_checkpoint(run_dir, step) if is_main() else None)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / DCP_DIR)
    export_full_model(model, tmp)
    final = tmp.parent / f"step-{step:08d}"
    if is_main():
        write_run_files(tmp, trainer_state, tokenizer_dir, rng)
        final = publish_checkpoint(tmp, keep_last)
    barrier()
    return final


def load_sharded_checkpoint(
    directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load a DCP checkpoint's weights (and optimizer state) into ``model`` as it is sharded now
    (or not at all), restore the RNGs (rank 0's) and return the trainer state."""
    directory = Path(directory)
    check_model_config(directory, model)
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=directory / DCP_DIR, no_dist=not dist.is_initialized())
        set_model_state_dict(model, state["model"])
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=directory / DCP_DIR, no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    set_rng_state(torch.load(directory / "rng.pt", weights_only=True))
    return read_trainer_state(directory)
