"""Grouped-query attention with RoPE (NTK-alpha) and QK-norm (report §2.2).

Order as in Hunyuan: project, rotate q and k, then RMSNorm each head of q and k. Uses torch's
scaled_dot_product_attention (fused kernels on CUDA) with native GQA broadcasting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbos.config import TurboSConfig
from turbos.model.cache import AttentionCache
from turbos.model.context import LayerContext
from turbos.model.norm import RMSNorm
from turbos.model.rope import apply_rotary


class Attention(nn.Module):
    """q/k/v projections -> RoPE (unless ``use_rope`` is off) -> QK-norm -> SDPA (GQA) -> o_proj."""

    def __init__(self, config: TurboSConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attn_head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.use_rope = config.use_rope
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, ctx: LayerContext, cache: AttentionCache | None = None
    ) -> torch.Tensor:
        """hidden_states (b, T, hidden) -> (b, T, hidden). From ``ctx``: rotary = (cos, sin), each
        (b, T, head_dim); attn_mask, None for plain causal attention, else bool
        (b, 1, T, T_past + T), True = attend (padding and documents folded in). ``cache`` gets the
        new keys and values appended."""
        if self.use_rope and ctx.rotary is None:
            raise ValueError("attention needs the rotary tables: ctx.rotary = (cos, sin)")
        b, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = ctx.rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        if cache is not None:
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=ctx.attn_mask,
            is_causal=ctx.attn_mask is None and T > 1,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, T, -1))
