"""INT8 weight-only quantization for inference (report §5: sampling supports INT8 weights).

Each output channel of a weight matrix is stored as int8 with one scale, symmetric:
``w ~ q * scale``, ``scale = max|w_row| / 127``. Activations stay in the model dtype and the
matmul dequantizes on the fly (``torch._weight_int8pack_mm`` on CPU, which reads a quarter of
the fp32 bytes: decoding at batch 1 is bound by reading weights). Other devices, dtypes the
kernel lacks, and bf16 inputs whose width is not a multiple of 16 (there the kernel gives wrong
results or crashes on CPUs with AVX512-BF16) use the plain reference path: dequantize, then
``F.linear``.

What is quantized: every ``nn.Linear`` and the routed experts. What is not: embeddings, norms,
Mamba2's conv and SSM parameters, and the MoE router (tiny, and routing decisions are sensitive).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbos.model.moe import RoutedExperts, Router

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANTIZATIONS = (None, "int8")
"""Values of ``quantization`` the engine and CLI accept (None: weights as stored)."""


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N, K) float -> (int8 of the same shape, scales (..., N) in the weight's dtype, the
    activations' dtype at inference, so no cast per call)."""
    w = weight.detach().float()
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8), scale.to(weight.dtype)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, reference: bool = False
) -> torch.Tensor:
    """x (..., K) @ (qweight (N, K) int8 * scale (N,)).T in x's dtype."""
    scale = scale.to(x.dtype)
    if (
        reference
        or x.device.type != "cpu"
        or x.dtype not in _FAST_DTYPES
        or (x.dtype == torch.bfloat16 and x.shape[-1] % 16)  # the bf16 kernel needs K % 16 == 0
    ):
        return F.linear(x, qweight.to(x.dtype)) * scale
    out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), qweight, scale)
    return out.view(*x.shape[:-1], qweight.shape[0])


class Int8Linear(nn.Module):
    """Drop-in inference replacement for ``nn.Linear`` holding int8 weights."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qweight, scale = quantize_rows(linear.weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_linear(x, self.qweight, self.scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8RoutedExperts(RoutedExperts):
    """Routed experts with int8 stacked weights, one scale per row."""

    def __init__(self, experts: RoutedExperts) -> None:
        nn.Module.__init__(self)
        self.num_experts, self.intermediate_size = experts.num_experts, experts.intermediate_size
        self.gated, self.in_proj_name = experts.gated, experts.in_proj_name
        for name in (experts.in_proj_name, "down_proj"):
            qweight, scale = quantize_rows(getattr(experts, name))
            self.register_buffer(f"{name}_q", qweight)
            self.register_buffer(f"{name}_scale", scale)

    def project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        return int8_linear(x, getattr(self, f"{name}_q")[expert], getattr(self, f"{name}_scale")[expert])

    def stacked(self, name: str, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q, scale = getattr(self, f"{name}_q")[idx], getattr(self, f"{name}_scale")[idx]
        return q.to(dtype) * scale.to(dtype)[..., None]


def quantize_int8_(model: nn.Module) -> nn.Module:
    """Replace the model's linear layers and routed experts by int8 versions, in place.

    For inference only (the int8 weights take no gradient). Returns the model, in eval mode.
    """
    for parent in list(model.modules()):
        if isinstance(parent, Router):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
            elif isinstance(child, RoutedExperts) and not isinstance(child, Int8RoutedExperts):
                setattr(parent, name, Int8RoutedExperts(child))
    return model.eval()
