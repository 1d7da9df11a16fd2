"""Named model sizes. Presets are data: each is a dict of TurboSConfig fields.

``turbos-560b`` carries the report's numbers (§2.2, Table 1). The report gives the layer counts
(128 layers = 57 Mamba2 + 7 attention + 64 FFN) but not their order. AMF and MF blocks each hold
one M and one F, so they alone cannot give 57 M with 64 F: seven FFN layers must stand on their
own. We put one after the seventh MF of each attention-led group:
``(AMF MF*7 F)*7 MF`` = 7 x (3 + 14 + 1) + 2 = 128 layers.
"""

from __future__ import annotations

from typing import Any

from turbos.config import ConfigError, TurboSConfig

PRESETS: dict[str, dict[str, Any]] = {
    # A few M parameters: unit tests and the CPU demo (minutes of training).
    "tiny": dict(
        vocab_size=1024,
        hidden_size=128,
        layout="AMF MF AMF MF",
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_num_heads=4,
        mamba_head_dim=64,
        mamba_n_groups=2,
        mamba_state_size=16,
        mamba_chunk_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        expert_intermediate_size=256,
        max_position_embeddings=1024,
    ),
    # ~30M parameters: CPU benchmarks and short real runs.
    "small": dict(
        vocab_size=8192,
        hidden_size=384,
        layout="AMF MF MF MF AMF MF MF MF",
        num_attention_heads=6,
        num_key_value_heads=2,
        mamba_num_heads=12,
        mamba_head_dim=64,
        mamba_n_groups=2,
        mamba_state_size=64,
        mamba_chunk_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        expert_intermediate_size=256,
        max_position_embeddings=8192,
    ),
    # ~1B parameters: a single-GPU model.
    "base-1b": dict(
        vocab_size=32768,
        hidden_size=1536,
        layout="(AMF MF*3)*4",
        num_attention_heads=12,
        num_key_value_heads=4,
        mamba_num_heads=24,
        mamba_head_dim=64,
        mamba_n_groups=4,
        mamba_state_size=128,
        mamba_chunk_size=128,
        num_experts=16,
        num_experts_per_tok=2,
        num_shared_experts=1,
        expert_intermediate_size=768,
        max_position_embeddings=4096,
    ),
    # The report's model (Table 1).
    "turbos-560b": dict(
        vocab_size=128000,
        hidden_size=5120,
        layout="(AMF MF*7 F)*7 MF",
        num_attention_heads=64,
        num_key_value_heads=8,
        mamba_num_heads=64,
        mamba_head_dim=64,
        mamba_n_groups=16,
        mamba_state_size=128,
        mamba_chunk_size=128,
        num_experts=32,
        num_experts_per_tok=2,
        num_shared_experts=1,
        expert_intermediate_size=17024,
        capacity_factor=1.5,
        max_position_embeddings=4096,
    ),
}


def get_preset(name: str, **overrides: Any) -> TurboSConfig:
    """The validated config of a preset, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return TurboSConfig.from_dict({**PRESETS[name], **overrides})
