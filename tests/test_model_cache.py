"""Prefill and decode are the same math: whole sequence, chunks, or one token at a time with the
HybridCache give the same logits (fp32, <= 1e-4), also for left-padded batches."""

from __future__ import annotations

import pytest
import torch

from conftest import small_config
from turbos.model import HybridCache, TurboSForCausalLM

TOL = 1e-4


def model_and_ids(T: int = 30, batch: int = 3, **overrides):
    config = small_config(**overrides)
    model = TurboSForCausalLM(config).eval()
    return model, torch.randint(3, config.vocab_size, (batch, T))


@torch.no_grad()
def feed_in_pieces(model, ids, sizes, attention_mask=None):
    cache = HybridCache(model.config, ids.shape[0])
    outs, start = [], 0
    for size in sizes:
        end = start + size
        mask = None if attention_mask is None else attention_mask[:, :end]
        outs.append(model(ids[:, start:end], attention_mask=mask, past_key_values=cache).logits)
        start = end
    assert start == ids.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("sizes", [[1] * 30, [12, 5, 13], [7, 1, 1, 21], [29, 1]])
def test_pieces_with_cache_equal_the_whole_sequence(sizes) -> None:
    model, ids = model_and_ids()
    with torch.no_grad():
        whole = model(ids).logits
    pieces, cache = feed_in_pieces(model, ids, sizes)
    diff = (pieces - whole).abs().max().item()
    assert diff <= TOL, f"sizes {sizes}: max |diff| {diff:.2e}"
    assert cache.get_seq_length() == 30


def left_pad(seqs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return ids, mask


@pytest.mark.parametrize("sizes", [[26], [10, 16], [20] + [1] * 6])
def test_left_padded_batch_matches_each_sequence_alone(sizes) -> None:
    """Prompts of 26, 17 and 9 tokens in one batch: every real position has its solo logits."""
    model, ids = model_and_ids(T=26)
    seqs = [ids[0], ids[1, :17], ids[2, :9]]
    batch_ids, mask = left_pad(seqs)
    batched, _ = feed_in_pieces(model, batch_ids, sizes, attention_mask=mask)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            alone = model(s[None]).logits[0]
        diff = (batched[i, -len(s) :] - alone).abs().max().item()
        assert diff <= TOL, f"row {i} ({len(s)} tokens): max |diff| {diff:.2e}"
        assert torch.isfinite(batched[i]).all(), "padding rows must stay finite"


def test_decoding_after_padded_prefill_matches_solo_decoding() -> None:
    """Different prompt lengths, then 5 generated tokens appended one at a time."""
    model, ids = model_and_ids(T=20)
    seqs = [ids[0, :20], ids[1, :8]]
    batch_ids, mask = left_pad(seqs)
    steps = torch.randint(3, model.config.vocab_size, (2, 5))
    full_ids = torch.cat([batch_ids, steps], 1)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], 1)
    batched, _ = feed_in_pieces(model, full_ids, [20] + [1] * 5, attention_mask=full_mask)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            alone = model(torch.cat([s, steps[i]])[None]).logits[0, -5:]
        assert (batched[i, -5:] - alone).abs().max().item() <= TOL


def test_cache_is_fp32_and_attention_cache_only_grows_in_attention_layers() -> None:
    model, ids = model_and_ids(T=16)
    model.to(torch.bfloat16)
    cache = HybridCache(model.config, ids.shape[0])
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids[:, :1], past_key_values=cache)
    kinds = model.config.layer_types
    for kind, layer in zip(kinds, cache.layers, strict=True):
        if kind == "M":
            assert layer.ssm_state.dtype == torch.float32 and layer.conv_state.dtype == torch.float32
        elif kind == "A":
            assert layer.key.shape[2] == 17
        else:
            assert layer is None


def test_index_select_keeps_only_the_chosen_rows() -> None:
    model, ids = model_and_ids(T=12)
    _, cache = feed_in_pieces(model, ids, [12])
    kept = cache.index_select(torch.tensor([2, 0]))
    nxt = torch.randint(3, model.config.vocab_size, (3, 1))
    with torch.no_grad():
        full = model(nxt, past_key_values=cache).logits
        sub = model(nxt[[2, 0]], past_key_values=kept).logits
    assert (full[[2, 0]] - sub).abs().max().item() <= TOL


def test_nothing_depends_on_the_chunk_size_but_round_off() -> None:
    torch.manual_seed(1)
    a = TurboSForCausalLM(small_config(mamba_chunk_size=4)).eval()
    b = TurboSForCausalLM(small_config(mamba_chunk_size=64)).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max().item() <= TOL


def test_decode_state_is_updated_in_place_and_survives_a_mode_change() -> None:
    """Decode writes the Mamba2 state in place; a cache filled under inference_mode keeps working
    under no_grad (the state is copied once rather than written as an inference tensor)."""
    model, ids = model_and_ids(T=8, batch=2)
    with torch.no_grad():
        whole = model(ids).logits[:, -1]
    cache = HybridCache(model.config, 2)
    with torch.inference_mode():
        model(ids[:, :6], past_key_values=cache)
        mamba = next(layer for layer in cache.layers if hasattr(layer, "ssm_state"))
        before = mamba.ssm_state
        model(ids[:, 6:7], past_key_values=cache)
        assert mamba.ssm_state is before, "decode updates the state tensor in place"
    with torch.no_grad():
        last = model(ids[:, 7:8], past_key_values=cache).logits[:, -1]
    assert (last - whole).abs().max().item() <= TOL


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float16"])
def test_a_lower_precision_state_is_rounded_after_every_update(state_dtype: str) -> None:
    """mamba_state_dtype (the precision study): the cached SSM state holds values of that dtype
    after prefill and after each decode step, and the logits move off fp32's; fp32 keeps them."""
    torch.manual_seed(0)
    exact = TurboSForCausalLM(small_config()).eval()
    rounded = TurboSForCausalLM(small_config(mamba_state_dtype=state_dtype)).eval()
    rounded.load_state_dict(exact.state_dict())
    dtype = getattr(torch, state_dtype)
    ids = torch.randint(0, 97, (2, 20))
    states = {}
    with torch.no_grad():
        for name, model in (("exact", exact), ("rounded", rounded)):
            cache = HybridCache(model.config, 2)
            logits = [model(ids[:, :12], past_key_values=cache).logits[:, -1]]
            for t in range(12, 20):
                logits.append(model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
            mamba = [layer for layer in cache.layers if hasattr(layer, "ssm_state")]
            states[name] = (torch.stack(logits), [m.ssm_state for m in mamba])
    for state in states["rounded"][1]:
        assert state.dtype == torch.float32 and torch.equal(state, state.to(dtype).float())
    assert not all(torch.equal(s, s.to(dtype).float()) for s in states["exact"][1])
    diff = (states["rounded"][0] - states["exact"][0]).abs().max().item()
    assert 0 < diff < 0.05, diff
