"""Pre-training recipes with expert and context parallelism under FSDP2 (gloo ranks on CPU)
against one process on the same global batch, and resumed on another number of ranks.

The one-process run steps on ``data_parallel`` micro-batches of the same rows (``grad_accum``),
so "same" means within 1e-5 in fp32 (reductions sum in another order). The MoE load-balancing
loss is per sequence shard under context parallelism (``turbos.distributed.context_parallel``),
so the recipes that split sequences turn it off.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from conftest import small_config
from dist_helpers import max_diff, run_ranks
from test_distributed_fsdp import MICRO, TOL
from turbos.distributed.fsdp import parallelize, recipe_parallelism
from turbos.distributed.parallel import ParallelConfig, ParallelDims, ParallelError, world_size
from turbos.model import TurboSForCausalLM
from turbos.safetensors_io import load_state_dict
from turbos.train.metrics import read_metrics
from turbos.train.recipe import parse_recipe
from turbos.train.trainer import Trainer

FINAL = "checkpoints/step-00000004"


def _recipe(run_dir: Path, parallel: dict[str, Any], grad_accum: int = 1) -> dict[str, Any]:
    raw = copy.deepcopy(MICRO)
    raw["data"]["grad_accum"] = grad_accum
    raw["model"]["overrides"]["router_aux_loss_coef"] = 0.0
    return {**raw, "parallel": parallel, "output_dir": str(run_dir)}


def _pretrain(raw: dict[str, Any], resume: str | None = None) -> None:
    Trainer(parse_recipe(raw), resume=resume, progress=False).train()


def _steps(run_dir: Path) -> list[dict[str, Any]]:
    return [record for record in read_metrics(run_dir) if "lm_loss" in record]


def _assert_same_run(mine: Path, theirs: Path, first_step: int = 1) -> None:
    """Same losses, grad norms, validation losses (relative to their size) and tokens per step,
    and the same final weights."""
    ours, reference = _steps(mine), _steps(theirs)[first_step - 1 :]
    assert [r["step"] for r in ours] == [r["step"] for r in reference] == list(range(first_step, 5))
    for a, b in zip(ours, reference, strict=True):
        for key in ("lm_loss", "grad_norm", "val_loss"):
            assert (key in a) == (key in b), (a, b)
            if key in a:
                assert abs(a[key] - b[key]) < TOL * max(1.0, abs(b[key])), (key, a, b)
        assert a["tokens"] == b["tokens"]
    assert max_diff(load_state_dict(mine / FINAL), load_state_dict(theirs / FINAL)) < TOL


def test_ep_and_cp_on_four_ranks_match_one_process(tmp_path: Path) -> None:
    """dp 2 x cp 2 on 4 ranks, experts split over pairs of ranks and FSDP2-sharded over the other
    pair (2-D), Mamba2 states passed in the parallel form with activation checkpointing."""
    parallel = {"ep": 2, "cp": 2, "cp_mode": "parallel", "activation_checkpointing": True}
    run_ranks(_pretrain, 4, _recipe(tmp_path / "four", parallel), timeout=300)
    _pretrain(_recipe(tmp_path / "one", {}, grad_accum=2))
    _assert_same_run(tmp_path / "four", tmp_path / "one")


def test_sequential_cp_on_two_ranks_matches_one_process(tmp_path: Path) -> None:
    """One batch split along the sequence over 2 ranks, Mamba2 states sent rank to rank."""
    parallel = {"cp": 2, "cp_mode": "sequential", "activation_checkpointing": False}
    run_ranks(_pretrain, 2, _recipe(tmp_path / "two", parallel))
    _pretrain(_recipe(tmp_path / "one", {}))
    _assert_same_run(tmp_path / "two", tmp_path / "one")


def test_ep_on_two_ranks_resumes_on_one(tmp_path: Path) -> None:
    """Experts split over 2 ranks (EP 2, each expert's shard on one rank); the step-2 checkpoint
    resumes on one process (EP 1: DCP reshards the experts) and continues the same curve."""
    run_ranks(_pretrain, 2, _recipe(tmp_path / "two", {"ep": 2}))
    _pretrain(_recipe(tmp_path / "one", {}, grad_accum=2))
    _assert_same_run(tmp_path / "two", tmp_path / "one")
    _pretrain(
        _recipe(tmp_path / "resumed", {}), resume=str(tmp_path / "two" / "checkpoints" / "step-00000002")
    )
    _assert_same_run(tmp_path / "resumed", tmp_path / "two", first_step=3)


def _refusals(run_dir: Path) -> None:
    cases = [
        ({"data": {**MICRO["data"], "seq_len": 15}}, "seq_len 15 is not a multiple of parallel.cp=2"),
        ({"data": {**MICRO["data"], "seq_len": 4}}, "shards of 2 tokens are shorter than the Mamba2 conv"),
        ({"data": {**MICRO["data"], "reset_at_eos": True}}, "does not support data.reset_at_eos"),
    ]
    for i, (change, message) in enumerate(cases):
        raw = {**_recipe(run_dir / str(i), {"cp": 2}), **change}
        with pytest.raises(ParallelError, match=message):
            Trainer(parse_recipe(raw), progress=False)
    for kind in ("SFT", "GRPO"):  # padded or packed rows: context parallelism is pre-training's
        with pytest.raises(ParallelError, match=f"parallel.cp=2: {kind} does not split sequences"):
            recipe_parallelism(ParallelConfig(cp=2), small_config(), kind)


def test_recipes_that_cannot_split_their_sequences_are_refused(tmp_path: Path) -> None:
    run_ranks(_refusals, 2, tmp_path)


def _meta_build(overrides: dict[str, Any], parallel: dict[str, Any]) -> None:
    config = small_config(**overrides)
    torch.manual_seed(3)
    reference = TurboSForCausalLM(config)
    torch.manual_seed(3)
    with torch.device("meta"):
        model = TurboSForCausalLM(config)
    settings = ParallelConfig(**parallel)
    parallelize(model, ParallelDims.resolve(settings, world_size(), config), settings, torch.device("cpu"))
    assert all(isinstance(p, DTensor) and not p.is_meta for p in model.parameters())
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    expected = reference.state_dict()
    assert state.keys() == expected.keys()
    assert not [name for name in expected if not torch.equal(state[name], expected[name])], "not bitwise"
    for (name, a), b in zip(reference.named_buffers(), model.buffers(), strict=True):
        assert torch.equal(a, b), name
    marked = [n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)]
    assert marked == [n for n, p in reference.named_parameters() if getattr(p, "_no_weight_decay", False)]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == config.tie_word_embeddings


def _meta_builds() -> None:
    _meta_build({"tie_word_embeddings": True}, {})
    _meta_build({}, {"ep": 2})  # experts: 2-D (EP x FSDP over their replicas)


def test_meta_build_materialises_the_weights_of_one_process(tmp_path: Path) -> None:
    """Built on the meta device and sharded there, each rank draws every module's parameters whole
    and keeps its shards: bitwise the weights, buffers, ties and no-decay marks of one process."""
    run_ranks(_meta_builds, 4)
