"""FSDP2, DCP checkpoints and data-parallel pre-training on CPU: ranks are processes talking gloo.

Each multi-rank check spawns its ranks (``run_ranks``: a free port on 127.0.0.1, a bounded wait)
and asserts on rank 0 or on files the ranks wrote. "Same" means within 1e-5 in fp32: sharded
reductions sum in another order than one process.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from conftest import small_config
from dist_helpers import max_diff, run_ranks
from test_train_loop import MICRO as LOOP_MICRO
from turbos.distributed.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from turbos.distributed.fsdp import parallelize
from turbos.distributed.parallel import (
    ParallelConfig,
    ParallelDims,
    ParallelError,
    mean_over_ranks,
    rank,
    world_size,
)
from turbos.model import TurboSForCausalLM
from turbos.safetensors_io import load_state_dict
from turbos.train.checkpoint import rng_state
from turbos.train.data import PackedBatch
from turbos.train.metrics import read_metrics
from turbos.train.optim import build_optimizer
from turbos.train.recipe import RecipeError, parse_recipe
from turbos.train.trainer import Trainer, lm_loss_fn

TOL = 1e-5
# Capacity factor num_experts / top_k: no expert overflows, so recycle routing's random draws
# (torch's global generator, which differs between ranks and micro-batches) change nothing.
CONFIG = {"capacity_factor": 2.0, "tie_word_embeddings": True}


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------- (a) parity
def _parity(steps: int) -> None:
    """FSDP2 on the ranks vs one process running the global batch as one micro-batch per rank."""
    world, me = world_size(), rank()
    torch.manual_seed(0)
    config = small_config(**CONFIG)
    reference = TurboSForCausalLM(config).train()
    model = copy.deepcopy(reference)
    parallelize(model, ParallelDims.resolve(ParallelConfig(), world, config), ParallelConfig())
    opts = [build_optimizer(m, lr=1e-2) for m in (reference, model)]
    loss_fn = lm_loss_fn()
    rows = torch.randint(
        0, config.vocab_size, (steps, world, 2, 17), generator=torch.Generator().manual_seed(1)
    )
    for step in range(steps):
        loss, _ = loss_fn(model, PackedBatch(rows[step, me]))
        loss.backward()
        loss = mean_over_ranks({"loss": loss.detach()})["loss"]
        ref_loss = 0.0
        for r in range(world):
            part, _ = loss_fn(reference, PackedBatch(rows[step, r]))
            (part / world).backward()
            ref_loss += part.item() / world
        for m in (reference, model):
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        assert abs(loss.item() - ref_loss) < TOL, (step, loss.item(), ref_loss)
        assert max_diff(grads, ref_grads) < TOL, step
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert max_diff(_full_state(model), reference.state_dict()) < TOL


def test_fsdp_matches_one_process_loss_grads_and_adamw_steps() -> None:
    run_ranks(_parity, 2, 3)


# ---------------------------------------------------------------------------------- (b) DCP
def _save(run_dir: Path) -> None:
    """Two AdamW steps on the ranks, then a sharded checkpoint (and the full optimizer state)."""
    torch.manual_seed(0)
    config = small_config(**CONFIG)
    model = TurboSForCausalLM(config).train()
    parallelize(model, ParallelDims.resolve(ParallelConfig(), world_size(), config), ParallelConfig())
    optimizer = build_optimizer(model, lr=1e-2)
    generator = torch.Generator().manual_seed(1 + rank())
    for _ in range(2):
        rows = torch.randint(0, config.vocab_size, (2, 17), generator=generator)
        lm_loss_fn()(model, PackedBatch(rows))[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_sharded_checkpoint(run_dir, 2, model, optimizer, {"step": 2}, None, 0, rng_state())


def _load_and_compare(checkpoint: Path) -> None:
    """Load the sharded checkpoint on these ranks; its weights are the exported single file's."""
    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    config = small_config(**CONFIG)
    model = TurboSForCausalLM(config).train()
    parallelize(model, ParallelDims.resolve(ParallelConfig(), world_size(), config), ParallelConfig())
    load_sharded_checkpoint(checkpoint, model, build_optimizer(model, lr=1e-2))
    state = _full_state(model)
    assert (
        max_diff({k: v for k, v in state.items() if k != "lm_head.weight"}, load_state_dict(checkpoint)) == 0
    )


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("dcp")
    run_ranks(_save, 2, run_dir)
    return run_dir / "checkpoints" / "step-00000002"


def test_dcp_saved_on_two_ranks_loads_on_one(saved_on_two: Path) -> None:
    assert (saved_on_two / "dcp").is_dir() and (saved_on_two / "model.safetensors").is_file()
    exported = TurboSForCausalLM.from_pretrained(saved_on_two)  # the single-file model serves as is
    torch.manual_seed(1)
    model = TurboSForCausalLM(small_config(**CONFIG)).train()
    optimizer = build_optimizer(model, lr=1e-2)
    assert load_sharded_checkpoint(saved_on_two, model, optimizer) == {"step": 2}
    assert max_diff(model.state_dict(), exported.state_dict()) == 0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    steps = {state["step"].item() for state in optimizer.state.values()}
    assert steps == {2.0} and len(optimizer.state) == len(list(model.parameters()))


def test_dcp_saved_on_two_ranks_loads_on_four(saved_on_two: Path) -> None:
    run_ranks(_load_and_compare, 4, saved_on_two)


# -------------------------------------------------------------------------- (c) pre-training
# test_train_loop's micro recipe: one stage of 4 steps, 2 rows a rank, capacity factor 2.0 (so that
# recycle routing's random draws never change a result), activation checkpointing.
MICRO = {
    **{k: copy.deepcopy(LOOP_MICRO[k]) for k in ("model", "optimizer", "schedule")},
    "data": {**{k: v for k, v in LOOP_MICRO["data"].items() if k != "grad_accum"}, "batch_size": 2},
    "stages": [{"name": "short", "steps": 4}],
    "eval": {"interval": 2, "batches": 1},
    "checkpoint": {"interval": 2, "keep_last": 0},
    "parallel": {"activation_checkpointing": True},
}
MICRO["model"]["overrides"]["capacity_factor"] = 2.0


def _pretrain(run_dir: Path) -> None:
    Trainer(parse_recipe({**copy.deepcopy(MICRO), "output_dir": str(run_dir)}), progress=False).train()


def test_pretrain_on_two_ranks_resumes_on_one(tmp_path: Path) -> None:
    """Four steps on two ranks; its step-2 checkpoint resumed by one process (two micro-batches a
    step: the same global batch) gives the same steps 3 and 4, and the same final weights."""
    run_ranks(_pretrain, 2, tmp_path / "two")
    two = read_metrics(tmp_path / "two")
    steps = [record for record in two if "lm_loss" in record]
    assert [record["step"] for record in steps] == [1, 2, 3, 4]
    assert all(record["tokens"] == record["step"] * 2 * 2 * 16 for record in steps)

    recipe = parse_recipe({**copy.deepcopy(MICRO), "output_dir": str(tmp_path / "one")})
    trainer = Trainer(recipe, resume=str(tmp_path / "two" / "checkpoints" / "step-00000002"), progress=False)
    assert trainer.grad_accum() == 2
    trainer.train()
    one = [record for record in read_metrics(tmp_path / "one") if "lm_loss" in record]
    assert [record["step"] for record in one] == [3, 4]
    for mine, theirs in zip(one, steps[2:], strict=True):
        assert abs(mine["lm_loss"] - theirs["lm_loss"]) < TOL
        assert abs(mine["grad_norm"] - theirs["grad_norm"]) < TOL
        assert mine["tokens"] == theirs["tokens"]
    final = "checkpoints/step-00000004"
    assert (
        max_diff(load_state_dict(tmp_path / "one" / final), load_state_dict(tmp_path / "two" / final)) < TOL
    )


# ------------------------------------------------------------------------------ (d) degrees
@pytest.mark.parametrize(
    ("settings", "world", "message"),
    [
        ({"dp_shard": 3}, 2, "dp_shard 3 x cp 1 = 3 ranks, but the world size is 2"),
        ({"dp_shard": 0}, 2, "dp_shard must be -1 (all ranks) or >= 1"),
        ({"ep": 3}, 6, "parallel.ep=3 must divide the model's num_experts (4)"),
        ({"ep": 2}, 3, "parallel.ep=2 does not divide the world size 3"),
        ({"cp": 3}, 4, "parallel.cp=3 does not divide the world size 4"),
        (
            {"cp": 2, "cp_mode": "sequential", "activation_checkpointing": True},
            4,
            "cp_mode=sequential cannot recompute layers",
        ),
    ],
)
def test_bad_degrees_are_refused_by_name(settings: dict[str, int], world: int, message: str) -> None:
    with pytest.raises(ParallelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelDims.resolve(ParallelConfig(**settings), world, small_config())


def test_degrees_resolve_and_recipe_section_is_checked(tmp_path: Path) -> None:
    assert ParallelDims.resolve(ParallelConfig(), 4, small_config()).dp_shard == 4
    dims = ParallelDims.resolve(ParallelConfig(ep=2, cp=2), 8, small_config())
    assert (dims.dp_shard, dims.data_parallel, dims.ep, dims.cp) == (4, 4, 2, 2)
    assert [(dims.data_rank(r), dims.cp_rank(r)) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    raw = {**copy.deepcopy(MICRO), "output_dir": str(tmp_path)}
    assert parse_recipe(raw).parallel.activation_checkpointing
    with pytest.raises(RecipeError, match="parallel.mixed_precision: expected one of"):
        parse_recipe({**raw, "parallel": {"mixed_precision": "fp16"}})
    with pytest.raises(RecipeError, match="parallel.ep must be >= 1"):
        parse_recipe({**raw, "parallel": {"ep": 0}})
