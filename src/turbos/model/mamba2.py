"""Mamba2 mixer (report §2.2): linear-time sequence mixing with a fixed-size state.

Parameter names are the usual Mamba2 ones (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj),
so public Mamba2 / NemotronH checkpoints map by name. The fused input projection packs, in order:
z (gate, d_inner) | x (d_inner) | B (groups * N) | C (groups * N) | dt (heads).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from turbos.config import TurboSConfig
from turbos.kernels.ssd import ssd_chunk_scan, ssd_step, ssd_update_
from turbos.model.cache import MambaCache
from turbos.model.norm import GatedRMSNorm


class Mamba2Mixer(nn.Module):
    """in_proj -> causal depthwise conv on (x, B, C) -> SiLU -> SSD scan -> gated RMSNorm -> out_proj."""

    def __init__(self, config: TurboSConfig) -> None:
        super().__init__()
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.mamba_n_groups
        self.state_size = config.mamba_state_size
        self.chunk_size = config.mamba_chunk_size
        self.d_inner = config.mamba_intermediate_size
        self.conv_dim = config.mamba_conv_dim
        self.conv_kernel = config.mamba_conv_kernel
        self.time_step_limit = tuple(config.time_step_limit)

        self.in_proj = nn.Linear(
            config.hidden_size,
            2 * self.d_inner + 2 * self.n_groups * self.state_size + self.num_heads,
            bias=config.mamba_proj_bias,
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            self.conv_kernel,
            groups=self.conv_dim,
            padding=self.conv_kernel - 1,
            bias=config.mamba_conv_bias,
        )
        # SSM parameters: no weight decay on any of them (marked for the optimizer).
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.mamba_proj_bias)
        self.reset_ssm_parameters(config)

    @torch.no_grad()
    def reset_ssm_parameters(self, config: TurboSConfig) -> None:
        """Mamba2 init: A ~ U[1, 16]; dt log-uniform in [time_step_min, time_step_max]; D = 1."""
        self.A_log.copy_(torch.empty(self.num_heads).uniform_(1, 16).log())
        lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(self.num_heads) * (hi - lo) + lo).clamp(min=config.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.D.fill_(1.0)

    def _conv(self, xbc: torch.Tensor, cache: MambaCache | None) -> torch.Tensor:
        """Causal depthwise conv over time, before SiLU. xbc: (b, T, conv_dim) -> same shape.

        Written as K shifted multiply-adds in the (time, channel) layout: on CPU this is about twice
        as fast as a grouped conv1d plus the two transposes it needs, and prefill and decode share it.
        """
        T, K = xbc.shape[1], self.conv_kernel
        if cache is None:
            window = F.pad(xbc, (0, 0, K - 1, 0))
        else:
            window = torch.cat([cache.conv_state.to(xbc.dtype), xbc], dim=1)  # (b, K-1+T, conv_dim)
            cache.conv_state = window[:, window.shape[1] - (K - 1) :].to(torch.float32, copy=True)
        weight = self.conv1d.weight[:, 0].to(xbc.dtype)  # (conv_dim, K)
        if self.conv1d.bias is None:
            out = window[:, K - 1 :] * weight[:, K - 1]
        else:
            out = torch.addcmul(self.conv1d.bias.to(xbc.dtype), window[:, K - 1 :], weight[:, K - 1])
        for j in range(K - 1):
            out = out.addcmul(window[:, j : j + T], weight[:, j])
        return out

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: MambaCache | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (b, T, hidden); token_mask (b, T), 0 on padding. Updates ``cache`` in place."""
        b, T, _ = hidden_states.shape
        dtype = hidden_states.dtype
        mask = None if token_mask is None else token_mask[..., None].to(dtype)
        if mask is not None:  # padding must not reach the state (zeros leave it untouched)
            hidden_states = hidden_states * mask
        z, xbc, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        if mask is not None:
            xbc = xbc * mask
        xbc = F.silu(self._conv(xbc, cache))
        if mask is not None:
            xbc = xbc * mask
        x, B, C = xbc.split(
            [self.d_inner, self.n_groups * self.state_size, self.n_groups * self.state_size], -1
        )

        A = -torch.exp(self.A_log.float())
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)  # (b, T, heads)
        x = x.reshape(b, T, self.num_heads, self.head_dim)
        B = B.reshape(b, T, self.n_groups, self.state_size)
        C = C.reshape(b, T, self.n_groups, self.state_size)
        if cache is not None and T == 1 and not torch.is_grad_enabled():
            # Decode: the state is read and written in place (no new state per step).
            state = cache.ssm_state
            foreign = state.is_inference() and not torch.is_inference_mode_enabled()
            if foreign or state.dtype != torch.float32 or not state.is_contiguous():
                # An inference-mode tensor cannot be written outside inference mode: own a copy.
                cache.ssm_state = state = state.to(
                    torch.float32, memory_format=torch.contiguous_format, copy=True
                )
            y = ssd_update_(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D)[:, None]
        elif cache is not None and T == 1:
            y, cache.ssm_state = ssd_step(cache.ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D)
            y = y[:, None]
        else:
            initial = None if cache is None else cache.ssm_state
            y, state = ssd_chunk_scan(x, dt, A, B, C, self.chunk_size, self.D, initial)
            if cache is not None:
                cache.ssm_state = state
        y = self.norm(y.reshape(b, T, self.d_inner), z)  # fp32 in, fp32 out
        return self.out_proj(y.to(dtype))
