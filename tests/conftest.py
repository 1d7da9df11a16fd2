"""Shared test fixtures: tiny configs built in code (tests never download anything)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

from turbos.config import TurboSConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_config(**overrides) -> TurboSConfig:
    """A few-layer hybrid with every layer kind, small enough for exhaustive checks."""
    base = dict(
        vocab_size=97,
        hidden_size=64,
        layout="AMF MF AMF",
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_n_groups=2,
        mamba_state_size=8,
        mamba_chunk_size=8,
        num_experts=4,
        num_experts_per_tok=2,
        expert_intermediate_size=32,
    )
    base.update(overrides)
    return TurboSConfig(**base)


@pytest.fixture(scope="module")
def tokenizer():
    """The serving tests' tiny byte-level BPE (`serve_helpers.tiny_tokenizer`), once per module."""
    from serve_helpers import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random TurboS model over that tokenizer, once per module."""
    from serve_helpers import tiny_model

    return tiny_model(tokenizer.get_vocab_size())
