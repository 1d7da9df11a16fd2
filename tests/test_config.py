"""TurboSConfig: layout grammar, validation, JSON round-trip, presets and parameter accounting."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from turbos.config import ConfigError, TurboSConfig, layout_counts, parse_layout
from turbos.model import TurboSForCausalLM
from turbos.params import count_parameters
from turbos.presets import PRESETS, get_preset


def test_layout_expands_blocks_repeats_and_groups() -> None:
    assert parse_layout("AMF MF MF") == ["AMF", "MF", "MF"]
    assert parse_layout("(AMF MF*2)*2 F") == ["AMF", "MF", "MF", "AMF", "MF", "MF", "F"]
    assert parse_layout("  AMF  *2 ") == ["AMF", "AMF"]


@pytest.mark.parametrize(
    "layout, message",
    [
        ("AMX", "unknown layer letter"),
        ("", "empty"),
        ("(AMF MF", "unclosed"),
        ("AMF)", "unmatched"),
        ("*2", "must follow"),
        ("AMF*0", ">= 1"),
        ("AMF, MF", "unexpected character"),
    ],
)
def test_bad_layout_is_rejected_with_a_clear_message(layout: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TurboSConfig(layout=layout)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "not divisible by num_key_value_heads"),
        (dict(hidden_size=130, num_attention_heads=4), "hidden_size=130 is not divisible"),
        (dict(num_experts=2, num_experts_per_tok=3), "exceeds num_experts"),
        (dict(mamba_num_heads=6, mamba_n_groups=4), "not divisible by mamba_n_groups"),
        (dict(ffn_type="sparse"), "ffn_type"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(eos_token_id=600), r"eos_token_id=600 must be a token id in \[0, "),
        (dict(pad_token_id=None), "pad_token_id=None must be a token id"),
        (dict(head_dim=2), "head_dim=2 must be even"),
        (dict(head_dim=0), "head_dim must be a positive integer"),
        (dict(head_dim=-4), "head_dim must be a positive integer"),
        (dict(shared_expert_intermediate_size=-8), "shared_expert_intermediate_size must be a positive"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(rope_alpha=0.5), "rope_alpha"),
    ],
)
def test_invalid_hyperparameters_are_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TurboSConfig(**changes)


def test_checks_apply_only_to_layer_kinds_present() -> None:
    TurboSConfig(layout="MF", num_attention_heads=3, num_key_value_heads=2)  # no attention layer
    config = TurboSConfig(
        layout="MF", hidden_size=64, num_attention_heads=0, mamba_num_heads=4, mamba_head_dim=16
    )
    model = TurboSForCausalLM(config).eval()
    assert model.model.rotary_emb is None, "no attention, no rotary table"
    assert model(torch.randint(0, config.vocab_size, (1, 5))).logits.shape == (1, 5, config.vocab_size)


def test_config_json_round_trip(tmp_path) -> None:
    config = get_preset("small", rope_alpha=50.0)
    config.save_pretrained(tmp_path)
    assert TurboSConfig.from_pretrained(tmp_path) == config
    assert TurboSConfig.from_pretrained(tmp_path / "config.json").layer_types == config.layer_types


def test_config_file_with_unknown_key_is_rejected(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "hiden_layers": 3}')
    with pytest.raises(ConfigError, match="hiden_layers"):
        TurboSConfig.from_pretrained(tmp_path)


def test_560b_preset_has_the_reports_architecture() -> None:
    c = get_preset("turbos-560b")
    assert layout_counts(c.layout) == {"A": 7, "M": 57, "F": 64, "D": 0}
    assert c.num_hidden_layers == 128
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (5120, 64, 8)
    assert (c.mamba_num_heads, c.mamba_n_groups, c.mamba_state_size, c.mamba_chunk_size) == (64, 16, 128, 128)
    assert (c.num_shared_experts, c.num_experts, c.num_experts_per_tok) == (1, 32, 2)
    assert c.expert_intermediate_size == 17024 and c.capacity_factor == 1.5
    assert c.blocks[0] == "AMF" and set(c.blocks) <= {"AMF", "MF", "F"}


def test_560b_parameter_count_lands_near_the_report() -> None:
    total = count_parameters(get_preset("turbos-560b"))["total"]
    assert abs(total["total"] / 560e9 - 1) < 0.01, f"total {total['total']:.4g} not within 1% of 560B"
    assert abs(total["activated"] / 56e9 - 1) < 0.02, (
        f"activated {total['activated']:.4g} not within 2% of 56B"
    )


def component_of(parameter_name: str) -> str:
    """The accounting row of ``count_parameters`` a parameter of TurboSForCausalLM belongs to."""
    if parameter_name.startswith("model.embed_tokens"):
        return "embeddings"
    if parameter_name.startswith("lm_head"):
        return "lm_head"
    if parameter_name.endswith("norm.weight") and ".mixer." not in parameter_name:
        return "norms"
    if (
        ".mixer.q_proj" in parameter_name
        or "layernorm" in parameter_name
        or ".mixer.k_proj" in parameter_name
    ):
        return "attention"
    if ".mixer.v_proj" in parameter_name or ".mixer.o_proj" in parameter_name:
        return "attention"
    if ".mixer.shared_mlp." in parameter_name:
        return "shared_experts"
    if ".mixer.experts." in parameter_name:
        return "routed_experts"
    if ".mixer.gate." in parameter_name:
        return "router"
    if any(
        k in parameter_name
        for k in (".in_proj", ".conv1d", ".dt_bias", ".A_log", ".D", ".out_proj", ".norm.")
    ):
        return "mamba2"
    return "dense_ffn"


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_parameter_accounting_matches_the_built_model(preset: str) -> None:
    config = get_preset(preset)
    model = TurboSForCausalLM(config)
    built = Counter()
    for name, p in model.named_parameters():
        built[component_of(name)] += p.numel()
    expected = {k: v["total"] for k, v in count_parameters(config).items() if k != "total"}
    assert dict(built) == expected


def test_small_preset_is_in_the_promised_range() -> None:
    total = count_parameters(get_preset("small"))["total"]["total"]
    assert 20e6 <= total <= 40e6, total
    assert count_parameters(get_preset("tiny"))["total"]["total"] < 5e6


def test_every_preset_validates() -> None:
    for name in PRESETS:
        get_preset(name)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")
