"""Context parallelism (``turbos.distributed.context_parallel``) against one process on the whole
sequence: 2 and 4 gloo processes on CPU, fp32, a hybrid with A, M and F layers, both Mamba2 state
passing forms. Every check of one group size runs in one spawn (starting processes is the cost)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from conftest import small_config
from dist_helpers import run_ranks
from turbos.config import TurboSConfig
from turbos.distributed.context_parallel import (
    MODES,
    all_reduce_gradients,
    context_parallel,
    context_parallel_loss,
    shard_sequence,
)
from turbos.model import TurboSForCausalLM
from turbos.model.hybrid import IGNORE_INDEX

TOLERANCE = 1e-5
BATCH = 2


def _config() -> TurboSConfig:
    # No router loss and no capacity limit: MoE layers are then per token, and a shard routes its
    # tokens as the whole sequence does (the router loss is the shards' average under CP).
    return small_config(router_aux_loss_coef=0.0, capacity_factor=100.0)


def _batch(config: TurboSConfig, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (BATCH, T), generator=generator)
    labels = ids.clone()
    labels[0, : T // 3] = IGNORE_INDEX  # a prompt without loss, spanning a shard boundary
    return ids, labels


def _whole_sequence_grads(model: TurboSForCausalLM, ids: torch.Tensor, labels: torch.Tensor):
    model.zero_grad()
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _cp_grads(model: TurboSForCausalLM, ids: torch.Tensor, labels: torch.Tensor):
    model.zero_grad()
    local_ids, targets = shard_sequence(ids, labels)
    loss, total = context_parallel_loss(model, local_ids, targets)
    loss.backward()
    all_reduce_gradients(model)
    return total, {name: p.grad for name, p in model.named_parameters()}


def _check_parity(mode: str, T: int) -> None:
    """Loss and every parameter's gradient equal the whole sequence's."""
    torch.manual_seed(0)
    model = TurboSForCausalLM(_config()).train()
    ids, labels = _batch(model.config, T, seed=T)
    ref_loss, ref_grads = _whole_sequence_grads(model, ids, labels)
    cp = context_parallel(model, mode=mode)
    loss, grads = _cp_grads(model, ids, labels)
    cp.remove()
    where = f"mode={mode} T={T} rank={dist.get_rank()}"
    assert abs(loss - ref_loss) <= TOLERANCE, f"{where}: loss {loss} vs {ref_loss}"
    for name, ref in ref_grads.items():
        diff = (grads[name] - ref).abs().max().item()
        assert diff <= TOLERANCE, f"{where}: gradient of {name} differs by {diff}"


def _check_adamw_steps(mode: str, T: int, steps: int = 3) -> None:
    """A few AdamW steps under CP give the weights of the same steps on whole sequences."""
    torch.manual_seed(0)
    ref = TurboSForCausalLM(_config()).train()
    model = copy.deepcopy(ref)
    cp = context_parallel(model, mode=mode)
    # eps 1e-6: Adam's step g / (|g| + eps) turns rounding in gradients near zero (an expert with
    # few tokens) into updates up to the LR; the default 1e-8 made one CPU differ by 1.5e-5.
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    for step in range(steps):
        ids, labels = _batch(ref.config, T, seed=100 + step)
        _whole_sequence_grads(ref, ids, labels)
        ref_opt.step()
        _cp_grads(model, ids, labels)
        opt.step()
    cp.remove()
    for (name, a), b in zip(ref.named_parameters(), model.parameters(), strict=True):
        diff = (a - b).abs().max().item()
        assert diff <= TOLERANCE, f"mode={mode}: {name} differs by {diff} after {steps} steps"


def _state_bytes(mode: str, T: int) -> dict[tuple[int, str], int]:
    """Bytes this rank sent for Mamba2 layers in one forward and backward."""
    torch.manual_seed(0)
    model = TurboSForCausalLM(_config()).train()
    cp = context_parallel(model, mode=mode)
    _cp_grads(model, *_batch(model.config, T, seed=0))
    cp.remove()
    mamba = {i for i, kind in enumerate(model.config.layer_types) if kind == "M"}
    return {key: n for key, n in cp.sent.items() if key[0] in mamba}


def _check_state_bytes(mode: str) -> None:
    """Mamba2 state passing sends the same bytes for 256 and 1024 tokens: the conv window, the
    SSM state and (parallel) the decays, (b, heads, head_dim, state) at most."""
    config = _config()
    world, rank = dist.get_world_size(), dist.get_rank()
    conv = BATCH * (config.mamba_conv_kernel - 1) * config.mamba_conv_dim
    ssm = BATCH * config.mamba_num_heads * config.mamba_head_dim * config.mamba_state_size
    if mode == "sequential":
        state = 4 * (conv + ssm)  # to the next rank in forward, to the one before in backward
        expected = {"forward": state * (rank < world - 1), "backward": state * (rank > 0)}
    else:  # all-gathers of the conv windows and decays, a reduce-scatter of the states
        share = 4 * (world - 1) * (conv + BATCH * config.mamba_num_heads + ssm)
        expected = {"forward": share, "backward": share}
    short, long = _state_bytes(mode, 256), _state_bytes(mode, 1024)
    assert short == long, f"mode={mode}: {short} vs {long}"
    layers = sorted({layer for layer, _ in short})
    for layer in layers:
        for phase, n in expected.items():
            assert short.get((layer, phase), 0) == n, f"mode={mode} layer {layer} {phase}: {short}"


def _group_2() -> None:
    for mode in MODES:
        _check_parity(mode, 64)  # shards of 32 = 4 chunks of 8
        _check_parity(mode, 36)  # shards of 18: no multiple of the chunk
        _check_adamw_steps(mode, 32)
        _check_state_bytes(mode)


def _group_4() -> None:
    for mode in MODES:
        _check_parity(mode, 64)
        _check_parity(mode, 20)  # shards of 5 tokens


def test_context_parallel_on_2_ranks_matches_one_process() -> None:
    run_ranks(_group_2, 2)


def test_context_parallel_on_4_ranks_matches_one_process() -> None:
    run_ranks(_group_4, 4)


def test_context_parallel_refuses_what_it_does_not_support() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        context_parallel(TurboSForCausalLM(_config()), mode="ring")
