"""Each TurboSLayer owns its forward (h + mixer(norm(h))) and the stack is a plain loop over the
layers, so per-layer hooks and activation checkpointing apply from outside and change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from conftest import small_config
from turbos.model import HybridCache, TurboSForCausalLM
from turbos.model.context import LayerContext
from turbos.model.hybrid import TurboSLayer


def test_a_hook_on_every_layer_fires_once_per_layer_per_forward() -> None:
    model = TurboSForCausalLM(small_config()).eval()
    calls: list[int] = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda module, _args, _out: calls.append(module.layer_idx))
    ids = torch.randint(0, 97, (2, 12))
    cache = HybridCache(model.config, 2)
    with torch.no_grad():
        model(ids[:, :11], past_key_values=cache)
        model(ids[:, 11:], past_key_values=cache)  # a decode step
    assert calls == list(range(len(model.model.layers))) * 2, f"layer calls {calls}"


def test_a_layer_is_its_pre_norm_residual() -> None:
    model = TurboSForCausalLM(small_config()).eval()
    h = torch.randn(2, 9, 64)
    ctx = model.model.layer_context(torch.arange(9).expand(2, 9))
    for layer in model.model.layers:
        if layer.kind == "F":
            expected = h + layer.mixer(layer.norm(h))[0]  # the MoE returns (out, loss, stats)
        else:
            expected = h + layer.mixer(layer.norm(h), ctx)
        assert torch.equal(layer(h, ctx), expected), f"layer {layer.layer_idx} ({layer.kind})"


def test_a_recomputed_moe_layer_records_its_router_loss_once() -> None:
    """Activation checkpointing runs a layer's forward again in backward: the second run replaces
    the layer's entry in the context instead of adding to the sum."""
    layer = TurboSLayer("F", small_config(), layer_idx=2).train()
    ctx = LayerContext(router_losses=True)
    h = torch.randn(2, 7, 64)
    torch.manual_seed(1)
    layer(h, ctx)
    once = ctx.total_router_loss(h.device).item()
    torch.manual_seed(1)
    layer(h, ctx)
    assert list(ctx.router_loss) == [2] and len(ctx.stats_in_layer_order()) == 1
    assert ctx.total_router_loss(h.device).item() == once


def loss_and_grads(model: TurboSForCausalLM, ids: torch.Tensor) -> tuple:
    """(loss, aux loss, gradients in parameter order, MoE stats) of one training step."""
    torch.manual_seed(3)  # MoE recycling draws random experts in training
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return out.loss.detach(), out.aux_loss.detach(), grads, out.moe_stats


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_activation_checkpointing_per_layer_gives_the_same_loss_and_gradients(ffn: str) -> None:
    """Every layer wrapped from outside with non-reentrant checkpointing (as torchtitan applies it):
    loss, MoE aux loss and every gradient agree within 1e-6 (fp32; the recomputation repeats the
    same operations, the gradient sums may associate differently) and the routing stats are the
    same, counted once."""
    overrides = {} if ffn == "moe" else {"ffn_type": "dense", "intermediate_size": 48}
    # capacity_factor 1: training capacity binds, so recycling (random) runs and must replay
    plain = TurboSForCausalLM(small_config(capacity_factor=1.0, **overrides)).train()
    wrapped = copy.deepcopy(plain)
    for i, layer in enumerate(wrapped.model.layers):
        wrapped.model.layers[i] = checkpoint_wrapper(layer)
    ids = torch.randint(0, 97, (3, 20))
    loss, aux, grads, stats = loss_and_grads(plain, ids)
    ck_loss, ck_aux, ck_grads, ck_stats = loss_and_grads(wrapped, ids)
    assert abs(loss.item() - ck_loss.item()) <= 1e-6, (loss.item(), ck_loss.item())
    assert abs(aux.item() - ck_aux.item()) <= 1e-6, (aux.item(), ck_aux.item())
    if ffn == "moe":
        assert aux.item() > 0, "the MoE aux loss is part of the comparison"
    worst = max((a - b).abs().max().item() for a, b in zip(grads, ck_grads, strict=True))
    assert worst <= 1e-6, f"max gradient difference {worst:.2e}"
    assert len(ck_stats) == len(stats) == (3 if ffn == "moe" else 0), "stats once per MoE layer"
    for a, b in zip(stats, ck_stats, strict=True):
        assert torch.equal(a.expert_load, b.expert_load) and (a.recycled, a.dropped) == (
            b.recycled,
            b.dropped,
        )
