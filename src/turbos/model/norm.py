"""RMSNorm and the group-wise gated RMSNorm used inside Mamba2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * x / rms(x), computed in fp32 and cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.variance_epsilon).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba2's output norm: RMSNorm(x * silu(z)) over groups of channels (norm after the gate).

    Normalising per group (one group per B/C group) keeps the layer independent of how the inner
    width is split across tensor-parallel ranks.
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * F.silu(gate.float())
        *prefix, width = x.shape
        x = F.rms_norm(
            x.view(*prefix, width // self.group_size, self.group_size),
            (self.group_size,),
            eps=self.variance_epsilon,
        )
        return (self.weight.float() * x.view(*prefix, width)).to(dtype)
