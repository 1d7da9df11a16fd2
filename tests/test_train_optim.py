"""AdamW parameter groups (which parameters get weight decay) and the routed-expert LR rule."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import small_config
from turbos.model import TurboSForCausalLM
from turbos.train.optim import build_optimizer, expert_lr_scale, param_groups, set_lr


def group_names(model: TurboSForCausalLM, **kwargs) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1, **kwargs)}


def test_norms_biases_ssm_parameters_and_embeddings_get_no_weight_decay() -> None:
    groups = group_names(TurboSForCausalLM(small_config()))
    no_decay = groups["no_decay"]
    for suffix in ("A_log", "D", "dt_bias", "norm.weight", "conv1d.bias", "query_layernorm.weight"):
        assert any(n.endswith(suffix) for n in no_decay), f"{suffix} must not be decayed"
    assert "model.embed_tokens.weight" in no_decay
    assert not any(n.endswith(("A_log", "norm.weight", "conv1d.bias")) for n in groups["decay"])


def test_matrices_are_decayed_and_routed_experts_have_their_own_group() -> None:
    groups = group_names(TurboSForCausalLM(small_config()))
    decay, experts = groups["decay"], groups["experts"]
    assert "lm_head.weight" in decay
    assert any(n.endswith("q_proj.weight") for n in decay) and any(
        n.endswith("in_proj.weight") for n in decay
    )
    assert any(n.endswith("shared_mlp.gate_proj.weight") for n in decay), (
        "the shared expert takes the base LR"
    )
    assert experts and all(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in experts)


def test_every_trainable_parameter_is_in_exactly_one_group() -> None:
    model = TurboSForCausalLM(small_config(tie_word_embeddings=True))
    grouped = [id(p) for g in param_groups(model, 0.1) for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_embeddings_are_decayed_when_configured() -> None:
    groups = group_names(TurboSForCausalLM(small_config()), decay_embeddings=True)
    assert "model.embed_tokens.weight" in groups["decay"]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("sqrt", math.sqrt(2 / 32)), ("linear", 2 / 32), ("none", 1.0)],
)
def test_expert_lr_scale_follows_the_rule(rule: str, expected: float) -> None:
    assert expert_lr_scale(rule, top_k=2, num_experts=32) == pytest.approx(expected)
    assert expert_lr_scale("sqrt", 2, 32) == 0.25, "the report's top-2 of 32 experts: a quarter of the LR"


def test_unknown_expert_lr_rule_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown expert LR rule 'cubic'"):
        expert_lr_scale("cubic", 2, 4)
    with pytest.raises(ValueError, match="unknown expert LR rule 'cubic'"):
        expert_lr_scale("cubic", 2, 0)


@pytest.mark.parametrize("rule", ["sqrt", "linear", "none"])
def test_a_dense_model_without_routed_experts_gets_the_base_lr(rule: str) -> None:
    assert expert_lr_scale(rule, top_k=2, num_experts=0) == 1.0


def test_groups_get_scaled_lrs_and_weight_decay() -> None:
    model = TurboSForCausalLM(small_config())
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, expert_scale=0.5)
    lrs = set_lr(optimizer, 2e-3)
    assert lrs == pytest.approx({"decay": 2e-3, "no_decay": 2e-3, "experts": 1e-3})
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {"decay": 0.1, "no_decay": 0.0, "experts": 0.1}
    assert isinstance(optimizer, torch.optim.AdamW)


def test_fused_adamw_matches_the_per_tensor_loop() -> None:
    """build_optimizer asks for the fused update (not PyTorch's CPU default); the values must
    match the per-tensor loop to fp32 round-off (the fused kernel orders the arithmetic
    differently, so not bit for bit)."""
    torch.manual_seed(0)
    models = [TurboSForCausalLM(small_config()) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    before = {name: p.detach().clone() for name, p in models[0].named_parameters()}
    fast, plain = (build_optimizer(model, lr=1e-2, expert_scale=0.5) for model in models)
    assert all(group["fused"] for group in fast.param_groups)
    for group in plain.param_groups:
        group["fused"], group["foreach"] = False, False
    ids = torch.randint(0, models[0].config.vocab_size, (2, 16))
    for step in range(3):
        for model, optimizer in zip(models, (fast, plain), strict=True):
            torch.manual_seed(step)  # the same draws for both (a training forward may use the RNG)
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True)
    ]
    assert max(moved) < 1e-5, max(moved)
    assert min((p - before[n]).abs().max() for n, p in models[0].named_parameters()) > 1e-3  # moved
