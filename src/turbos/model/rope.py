"""Rotary position embedding with NTK-aware alpha scaling (report §2.4).

Long-context extension stretches the rotary base: base' = base * alpha^(d / (d - 2)), with d the
head width (report: alpha 50 at 32K, 1000 at 256K). alpha = 1 is plain RoPE.
"""

from __future__ import annotations

import torch
from torch import nn


def ntk_alpha_base(theta: float, alpha: float, head_dim: int) -> float:
    """The rotary base after NTK-aware scaling by alpha."""
    return theta * alpha ** (head_dim / (head_dim - 2))


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for given positions; the half-split ('rotate_half') convention."""

    def __init__(self, head_dim: int, theta: float = 10000.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.set_alpha(theta, alpha)

    def set_alpha(self, theta: float, alpha: float) -> None:
        """Recompute the frequencies, e.g. when a long-context stage changes alpha.

        Computed on the CPU whatever the device, so the table is the same everywhere (and a meta
        build's ``reset_parameters`` gives bitwise the table of a normal build)."""
        self.theta, self.alpha = theta, alpha
        base = ntk_alpha_base(theta, alpha, self.head_dim)
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device="cpu") / self.head_dim
        device = self.inv_freq.device if hasattr(self, "inv_freq") else torch.get_default_device()
        self.register_buffer("inv_freq", (1.0 / base**exponent).to(device), persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) frequency table, e.g. after ``to_empty``."""
        self.set_alpha(self.theta, self.alpha)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """Moves follow the model, dtype casts do not: the frequencies stay float32. In bf16 they
        would be off by up to 0.4% each, which turns into radians of angle error at long range.
        A meta table has no values to keep (``to_empty`` then ``reset_parameters`` refills it)."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if not inv_freq.is_meta:
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, T) -> cos, sin: (B, T, head_dim)."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, d); cos/sin: (B, T, d)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
