"""Our layers against Hugging Face transformers' implementations (written by others), same weights.

Mamba2 mixer vs NemotronHMamba2Mixer (its PyTorch path); attention (GQA, QK-norm, NTK-alpha RoPE)
vs HunYuanMoEV1Attention; MoE (shared + softmax top-k, no capacity) vs HunYuanMoEV1Moe.
Tolerance 1e-5 max abs in fp32 (docs/design.md: single-layer parity).
"""

from __future__ import annotations

import math

import pytest
import torch

from turbos.config import TurboSConfig
from turbos.model.attention import Attention
from turbos.model.cache import MambaCache
from turbos.model.context import LayerContext
from turbos.model.mamba2 import Mamba2Mixer
from turbos.model.moe import MoE
from turbos.model.rope import RotaryEmbedding

transformers = pytest.importorskip("transformers")
from transformers import HunYuanMoEV1Config, NemotronHConfig  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.hunyuan_v1_moe import modeling_hunyuan_v1_moe as hf_hunyuan  # noqa: E402
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer  # noqa: E402

TOL = 1e-5


def mamba_pair(chunk: int = 8, bias: bool = False) -> tuple[Mamba2Mixer, NemotronHMamba2Mixer]:
    hf_config = NemotronHConfig(
        hidden_size=64,
        layers_block_type=["linear_attention"],
        mamba_num_heads=4,
        mamba_head_dim=16,
        n_groups=2,
        ssm_state_size=8,
        chunk_size=chunk,
        conv_kernel=4,
        use_conv_bias=True,
        use_bias=bias,
        layer_norm_epsilon=1e-5,
        vocab_size=100,
        time_step_limit=(0.0, math.inf),
    )
    ours_config = TurboSConfig(
        hidden_size=64,
        layout="M",
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_n_groups=2,
        mamba_state_size=8,
        mamba_chunk_size=chunk,
        mamba_conv_kernel=4,
        mamba_proj_bias=bias,
        rms_norm_eps=1e-5,
        time_step_limit=tuple(hf_config.time_step_limit),  # the dt clamp, set alike on both sides
    )
    ours, ref = Mamba2Mixer(ours_config), NemotronHMamba2Mixer(hf_config, layer_idx=0)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
        ours.A_log.uniform_(-1, 2)
        ours.dt_bias.uniform_(0.5, 1.0)
        ours.norm.weight.uniform_(0.5, 1.5)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, ref


@pytest.mark.parametrize("chunk, T", [(8, 8), (8, 29), (16, 5), (4, 33)])
def test_mamba2_full_sequence_matches_nemotron_h(chunk: int, T: int) -> None:
    ours, ref = mamba_pair(chunk)
    x = torch.randn(2, T, 64)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff <= TOL, f"max |ours - NemotronH| = {diff:.2e} > {TOL}"


def test_mamba2_with_projection_bias_matches_nemotron_h() -> None:
    ours, ref = mamba_pair(bias=True)
    x = torch.randn(2, 19, 64)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff <= TOL, diff


def test_mamba2_decode_steps_match_nemotron_h() -> None:
    """Prefill 11 tokens, then decode 6 one at a time with the recurrent step, both sides."""
    ours, ref = mamba_pair()
    x = torch.randn(2, 17, 64)
    hf_cache = DynamicCache(config=ref.config)
    cache = MambaCache(torch.zeros(2, ours.conv_kernel - 1, ours.conv_dim), torch.zeros(2, 4, 16, 8))
    with torch.no_grad():
        outs = [(ours(x[:, :11], cache=cache), ref(x[:, :11], cache_params=hf_cache))]
        for t in range(11, 17):
            outs.append((ours(x[:, t : t + 1], cache=cache), ref(x[:, t : t + 1], cache_params=hf_cache)))
    for step, (a, b) in enumerate(outs):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"step {step}: max |ours - NemotronH| = {diff:.2e}"
    hf_state = hf_cache.get_recurrent_state(0, state_idx=0)
    assert torch.allclose(cache.ssm_state, hf_state.float(), atol=TOL), "final SSM states differ"


def hunyuan_config(alpha: float) -> HunYuanMoEV1Config:
    config = HunYuanMoEV1Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=32,
        num_experts=4,
        moe_topk=2,
        vocab_size=100,
        num_hidden_layers=1,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "dynamic", "alpha": alpha, "factor": 1.0, "rope_theta": 10000.0},
    )
    config._attn_implementation = "sdpa"
    return config


@pytest.mark.parametrize("alpha", [1.5, 50.0, 1000.0])
def test_attention_matches_hunyuan(alpha: float) -> None:
    hf_config = hunyuan_config(alpha)
    ref = hf_hunyuan.HunYuanMoEV1Attention(hf_config, layer_idx=0).eval()
    rope_ref = hf_hunyuan.HunYuanMoEV1RotaryEmbedding(hf_config)
    config = TurboSConfig(
        hidden_size=64, layout="A", num_attention_heads=4, num_key_value_heads=2, rope_alpha=alpha
    )
    ours = Attention(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    ref.load_state_dict(ours.state_dict(), strict=True)
    rope = RotaryEmbedding(16, config.rope_theta, alpha)
    assert torch.allclose(rope.inv_freq, rope_ref.inv_freq, rtol=1e-6), "NTK-alpha frequencies differ"

    T = 23
    x = torch.randn(2, T, 64)
    positions = torch.arange(100, 100 + T).expand(2, T)  # far positions make RoPE differences show
    with torch.no_grad():
        expected, _ = ref(x, rope_ref(x, positions), None)
        got = ours(x, LayerContext(rotary=rope(positions, x.dtype)))
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"max |ours - HunYuanMoEV1Attention| = {diff:.2e}"


def test_moe_matches_hunyuan_without_capacity() -> None:
    ref = hf_hunyuan.HunYuanMoEV1Moe(hunyuan_config(1.5), layer_idx=0).eval()
    config = TurboSConfig(
        hidden_size=64, layout="F", num_experts=4, num_experts_per_tok=2, expert_intermediate_size=32
    )
    ours = MoE(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 41, 64)
    with torch.no_grad():
        expected = ref(x)
        got, _, stats = ours(x)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"max |ours - HunYuanMoEV1Moe| = {diff:.2e}"
    assert stats.dropped == 0 and int(stats.expert_load.sum()) == 3 * 41 * 2
