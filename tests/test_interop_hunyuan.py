"""The hunyuan_v1_moe converter against transformers' HunYuanMoEV1ForCausalLM (written by others).

Random HF checkpoints (weights re-drawn at std 0.2 so mistakes show) are saved as HF saves them,
converted with ``convert_from_hf`` and loaded as turbos models: logits (fp32, eval) agree within
1e-4 with and without left padding, greedy generations agree token for token, ``convert_to_hf``
gives the original weights back bitwise, and options turbos cannot express are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interop_helpers import check_trains_and_serves
from serve_helpers import greedy_alone, tiny_tokenizer
from turbos.config import TurboSConfig
from turbos.interop import convert
from turbos.interop.convert import UnsupportedCheckpointError, convert_from_hf, convert_to_hf
from turbos.model import TurboSForCausalLM
from turbos.safetensors_io import load_state_dict

transformers = pytest.importorskip("transformers")
from transformers import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM  # noqa: E402

TOL = 1e-4
VOCAB = 100
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=32,
    num_experts=4,
    moe_topk=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
CASES = {
    "moe-top2-gqa2": {},
    "one-expert-mha-tied": dict(num_experts=1, moe_topk=1, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa4-bias-alpha50": dict(
        num_hidden_layers=3,
        num_key_value_heads=1,
        num_experts=3,
        attention_bias=True,
        rope_parameters={"rope_type": "dynamic", "alpha": 50.0, "factor": 1.0, "rope_theta": 10000.0},
    ),
    "tied-alpha1000-wide-heads": dict(
        head_dim=32,
        moe_topk=1,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 5000.0},
    ),
}


def hf_model(case: str) -> HunYuanMoEV1ForCausalLM:
    """A random HunYuanMoEV1 model: linear weights N(0, 0.2), norms around 1."""
    torch.manual_seed(0)
    model = HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(**{**BASE, **CASES[case]}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.7, 1.3)
            else:
                p.normal_(0, 0.2)
    return model.eval()


def converted(case: str, tmp_path: Path) -> tuple[HunYuanMoEV1ForCausalLM, Path, TurboSForCausalLM]:
    """(HF model, its saved directory, the turbos model loaded from the converted directory)."""
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "turbos")
    return hf, tmp_path / "hf", TurboSForCausalLM.from_pretrained(tmp_path / "turbos")


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 20 tokens; the second is left-padded by 6."""
    ids = torch.randint(3, VOCAB, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    ids[1, :6] = 0
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(case: str, tmp_path: Path) -> None:
    hf, _, ours = converted(case, tmp_path)
    ids, mask = batch()
    with torch.no_grad():
        for m in (torch.ones_like(mask), mask):
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            expected = hf(ids, attention_mask=m, position_ids=pos).logits
            got = ours(ids, attention_mask=m).logits
            real = m.bool()
            diff = (got[real] - expected[real]).abs().max().item()
            assert diff <= TOL, f"{case}: max |turbos - HF| logits = {diff:.2e} (mask {m.tolist()})"


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_hf(case: str, tmp_path: Path) -> None:
    hf, _, ours = converted(case, tmp_path)
    prompt = torch.randint(3, VOCAB, (1, 9))
    hf.generation_config.eos_token_id = None  # generate all 12 tokens, as greedy_alone does
    with torch.no_grad():
        expected = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False
        )
    assert expected.shape[1] == 9 + 12
    assert greedy_alone(ours, prompt[0].tolist(), 12) == expected[0, 9:].tolist()


@pytest.mark.parametrize("case", ["moe-top2-gqa2", "gqa4-bias-alpha50", "tied-alpha1000-wide-heads"])
def test_convert_back_to_hf_is_exact(case: str, tmp_path: Path) -> None:
    hf, hf_dir, _ = converted(case, tmp_path)
    config = convert_to_hf(tmp_path / "turbos", tmp_path / "back", "hunyuan_v1_moe")
    assert config["model_type"] == "hunyuan_v1_moe"
    original, back = load_state_dict(hf_dir), load_state_dict(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    reloaded = HunYuanMoEV1ForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(3, VOCAB, (2, 17))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_config_fields_and_capacity() -> None:
    """Options map onto TurboSConfig; capacity lets every token through, as HF routes."""
    hf = HunYuanMoEV1Config(**{**BASE, **CASES["gqa4-bias-alpha50"]}).to_dict()
    config = convert.adapter("hunyuan_v1_moe").config_from_hf(hf)
    assert config.layer_types == list("AF" * 3)
    assert (config.num_key_value_heads, config.attention_bias, config.rope_alpha) == (1, True, 50.0)
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (3, 2, True)
    assert config.capacity_factor * config.num_experts_per_tok / config.num_experts == 1.0


def test_tencent_style_config_is_read() -> None:
    """Original configs: rope_scaling + rope_theta, uniform per-layer lists, flags at HF's values."""
    hf = {
        **BASE,
        "model_type": "hunyuan_v1_moe",
        "moe_topk": [2, 2],
        "num_shared_expert": [1, 1],
        "moe_intermediate_size": [32, 32],
        "use_cla": False,
        "cla_share_factor": 2,
        "use_qk_norm": True,
        "use_mixed_mlp_moe": True,
        "attention_head_dim": 16,
        "rope_theta": 20000.0,
        "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0, "mscale": 1.0},
        "eos_token_id": [2, 5],
    }
    config = convert.adapter("hunyuan_v1_moe").config_from_hf(hf)
    assert (config.num_experts_per_tok, config.rope_theta, config.rope_alpha) == (2, 20000.0, 1000.0)
    assert config.eos_token_id == 2


@pytest.mark.parametrize(
    "option, value",
    [
        ("hidden_act", "gelu"),
        ("moe_topk", [2, 1]),
        ("num_experts", [4, 2]),
        ("pretraining_tp", 2),
        ("use_cla", True),
        ("num_shared_expert", 2),
        ("moe_intermediate_size", [32, 64]),
        ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    ],
)
def test_unsupported_option_is_refused_by_name(option: str, value: object) -> None:
    with pytest.raises(UnsupportedCheckpointError, match=option):
        convert.adapter("hunyuan_v1_moe").config_from_hf({**BASE, option: value})


def test_convert_from_hf_refuses_gelu(tmp_path: Path) -> None:
    hf_model("moe-top2-gqa2").save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_act": "gelu"}))
    with pytest.raises(UnsupportedCheckpointError, match="hidden_act='gelu'"):
        convert_from_hf(tmp_path / "hf", tmp_path / "turbos")


@pytest.mark.parametrize(
    "change, option",
    [
        (dict(layout="AMF"), "layout"),
        (dict(ffn_type="dense"), "ffn_type"),
        (dict(num_shared_experts=2), "num_shared_experts"),
        (dict(shared_expert_intermediate_size=64), "shared_expert_intermediate_size"),
        (dict(use_qk_norm=False), "use_qk_norm"),
    ],
)
def test_turbos_options_hunyuan_cannot_express_are_refused(change: dict, option: str) -> None:
    config = TurboSConfig(**{"hidden_size": 64, "layout": "AF AF", "num_attention_heads": 4, **change})
    with pytest.raises(UnsupportedCheckpointError, match=option):
        convert.adapter("hunyuan_v1_moe").config_to_hf(config)


def test_converted_model_trains_a_step_and_serves(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = HunYuanMoEV1Config(
        **{**BASE, **CASES["gqa4-bias-alpha50"], "vocab_size": tokenizer.get_vocab_size()}
    )
    check_trains_and_serves(HunYuanMoEV1ForCausalLM(config), tokenizer, tmp_path)
