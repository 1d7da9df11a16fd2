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
from turbos.kernels.conv import causal_conv1d
from turbos.kernels.ssd import ssd_scan, ssd_step, ssd_update_
from turbos.model.cache import MambaCache
from turbos.model.context import LayerContext
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
        self.state_dtype = getattr(torch, config.mamba_state_dtype)
        self.time_step_init = (config.time_step_min, config.time_step_max, config.time_step_floor)

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
        # SSM parameters (initialised by reset_parameters, no weight decay).
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.mamba_proj_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba2's SSM init: A ~ U[1, 16]; dt log-uniform in [time_step_min, time_step_max]; D = 1.

        Also marks the three for no weight decay (the optimizer reads the mark), here so that a
        meta-built model, whose parameters ``to_empty`` replaces, is marked again."""
        device = self.A_log.device
        self.A_log.copy_(torch.empty(self.num_heads, device=device).uniform_(1, 16).log())
        t_min, t_max, t_floor = self.time_step_init
        lo, hi = math.log(t_min), math.log(t_max)
        dt = torch.exp(torch.rand(self.num_heads, device=device) * (hi - lo) + lo).clamp(min=t_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.D.fill_(1.0)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def forward(
        self, hidden_states: torch.Tensor, ctx: LayerContext | None = None, cache: MambaCache | None = None
    ) -> torch.Tensor:
        """hidden_states (b, T, hidden) -> (b, T, hidden). From ``ctx`` (None: one unpadded document
        per row): token_mask (b, T), 0 on padding; seq_idx (b, T), the documents, which neither the
        conv nor the state crosses; new_document (b,), rows whose cached state is dropped first.
        Updates ``cache`` in place to the state of each row's last document."""
        b, T, _ = hidden_states.shape
        dtype = hidden_states.dtype
        token_mask = seq_idx = None
        if ctx is not None:
            token_mask, seq_idx = ctx.token_mask, ctx.seq_idx
            if cache is not None and ctx.new_document is not None:
                keep = (~ctx.new_document).to(torch.float32)
                cache.conv_state = cache.conv_state * keep[:, None, None]
                cache.ssm_state = cache.ssm_state * keep[:, None, None, None]
        mask = None if token_mask is None else token_mask[..., None].to(dtype)
        if mask is not None:  # padding must not reach the state (zeros leave it untouched)
            hidden_states = hidden_states * mask
        z, xbc, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        if mask is not None:
            xbc = xbc * mask
        conv_in = None if cache is None else cache.conv_state
        xbc, conv_state = causal_conv1d(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, conv_in, seq_idx)
        if cache is not None:
            cache.conv_state = conv_state.to(torch.float32, copy=True)
        xbc = F.silu(xbc)
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
            scan = ssd_scan if ctx is None or ctx.ssd_scan is None else ctx.ssd_scan
            y, state = scan(x, dt, A, B, C, self.D, initial, seq_idx, self.chunk_size)
            if cache is not None:
                cache.ssm_state = state
        if cache is not None and self.state_dtype != torch.float32:  # the precision study only
            rounded = cache.ssm_state.to(self.state_dtype)
            if T == 1 and not torch.is_grad_enabled():
                cache.ssm_state.copy_(rounded)  # the decode step's state is updated in place
            else:
                cache.ssm_state = rounded.float()
        y = self.norm(y.reshape(b, T, self.d_inner), z)  # fp32 in, fp32 out
        return self.out_proj(y.to(dtype))
