"""Which device to run on and in which precision: shared by training, evaluation and serving."""

from __future__ import annotations

import contextlib

import torch

from turbos.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless precision is 'fp32'; on CPU only when precision is 'bf16'.

    Weights, gradients and optimizer state stay fp32 (mixed precision); the Mamba2 scan and the
    router run in fp32 whatever the autocast dtype.
    """
    enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
