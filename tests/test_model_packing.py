"""Packed sequences: a row holding several documents (seq_idx) gives every document the logits it
gets alone (fp32, <= 1e-5), with padding too and with a cache that continues each row's last
document; the helpers that build seq_idx and positions; the causal conv with seq_idx."""

from __future__ import annotations

import pytest
import torch

from conftest import small_config
from turbos.kernels.conv import causal_conv1d
from turbos.model import HybridCache, TurboSForCausalLM
from turbos.model.context import packed_position_ids, seq_idx_from_lengths

TOL = 1e-5  # fp32 single-pass round-off; the packed pass does the same math per document
CONFIGS = {"moe": {}, "dense": {"ffn_type": "dense", "intermediate_size": 48}}
# With mamba_chunk_size 8 and 24 columns, [8, 8, 8] has its boundaries on chunk edges, [5, 11, 8]
# inside chunks, [1, 22, 1] one-token documents at both ends.
LENGTHS = [[5, 11, 8], [8, 8, 8], [1, 22, 1]]


def model_for(name: str) -> TurboSForCausalLM:
    """A tiny hybrid with A, M and F layers ("AMF MF AMF"); eval mode, so MoE routing is per token
    (no capacity) and packing cannot change it."""
    return TurboSForCausalLM(small_config(**CONFIGS[name])).eval()


def spans(row: list[int]) -> list[slice]:
    ends = torch.tensor(row).cumsum(0).tolist()
    return [slice(end - length, end) for length, end in zip(row, ends, strict=True)]


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_batch_gives_each_document_its_solo_logits(name: str) -> None:
    model = model_for(name)
    ids = torch.randint(3, 97, (3, 24))
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx_from_lengths(LENGTHS)).logits
        for r, row in enumerate(LENGTHS):
            for k, span in enumerate(spans(row)):
                alone = model(ids[r : r + 1, span]).logits[0]
                diff = (packed[r, span] - alone).abs().max().item()
                assert diff <= TOL, f"row {r} document {k} ({row}): max |diff| {diff:.2e} > {TOL}"


@pytest.mark.parametrize("name", CONFIGS)
def test_packing_with_right_padding_matches_each_document_alone(name: str) -> None:
    """Rows of 24 and 17 real tokens padded to 24: padding (attention_mask 0) at a row's end."""
    model = model_for(name)
    lengths = [[5, 11, 8], [9, 8]]
    ids = torch.randint(3, 97, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, seq_idx=seq_idx_from_lengths(lengths, 24)).logits
        for r, row in enumerate(lengths):
            for span in spans(row):
                alone = model(ids[r : r + 1, span]).logits[0]
                assert (packed[r, span] - alone).abs().max().item() <= TOL, f"row {r} {span}"
    assert torch.isfinite(packed).all(), "padding rows stay finite"


@torch.no_grad()
def decode(model: TurboSForCausalLM, cache: HybridCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed tokens (b, n) one at a time; their logits (b, n, vocab)."""
    return torch.cat(
        [model(tokens[:, t : t + 1], past_key_values=cache).logits for t in range(tokens.shape[1])], 1
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_after_packed_prefill_continues_each_rows_last_document(name: str) -> None:
    """The cache of a packed prefill holds each row's last document: decoding with it gives the
    logits of that document prefilled and decoded alone."""
    model = model_for(name)
    ids = torch.randint(3, 97, (3, 24))
    steps = torch.randint(3, 97, (3, 4))
    cache = HybridCache(model.config, 3)
    with torch.no_grad():
        model(ids, seq_idx=seq_idx_from_lengths(LENGTHS), past_key_values=cache)
    packed = decode(model, cache, steps)
    for r, row in enumerate(LENGTHS):
        last = spans(row)[-1]
        alone_cache = HybridCache(model.config, 1)
        with torch.no_grad():
            model(ids[r : r + 1, last], past_key_values=alone_cache)
        alone = decode(model, alone_cache, steps[r : r + 1])[0]
        diff = (packed[r] - alone).abs().max().item()
        assert diff <= TOL, f"row {r} ({row}): decode after packed prefill differs by {diff:.2e}"


def test_packed_prefill_leaves_the_mamba_state_of_the_last_document() -> None:
    model = model_for("moe")
    ids = torch.randint(3, 97, (1, 24))
    packed, alone = HybridCache(model.config, 1), HybridCache(model.config, 1)
    with torch.no_grad():
        model(ids, seq_idx=seq_idx_from_lengths([[21, 3]]), past_key_values=packed)
        model(ids[:, 21:], past_key_values=alone)
    for mine, theirs in zip(packed.layers, alone.layers, strict=True):
        if hasattr(mine, "ssm_state"):
            # the 3-token document is shorter than the conv window: the rest of it is zeros
            assert torch.allclose(mine.conv_state, theirs.conv_state, atol=TOL), "conv window"
            assert torch.allclose(mine.ssm_state, theirs.ssm_state, atol=TOL), "SSM state"


def test_selecting_rows_of_a_packed_cache_keeps_their_documents() -> None:
    model = model_for("moe")
    ids, steps = torch.randint(3, 97, (3, 24)), torch.randint(3, 97, (3, 2))
    cache = HybridCache(model.config, 3)
    with torch.no_grad():
        model(ids, seq_idx=seq_idx_from_lengths(LENGTHS), past_key_values=cache)
    kept = cache.index_select(torch.tensor([2, 0]))
    full, sub = decode(model, cache, steps), decode(model, kept, steps[[2, 0]])
    assert (full[[2, 0]] - sub).abs().max().item() <= TOL


@pytest.mark.parametrize("split", [3, 5, 13, 16])
def test_packed_prefill_in_pieces_equals_one_call(split: int) -> None:
    """Feeding a packed row in two calls (split inside a document, or at a boundary: 5 and 16)
    gives the one-call logits: the second call continues or drops the cached state per row."""
    model = model_for("moe")
    ids = torch.randint(3, 97, (3, 24))
    seq_idx = seq_idx_from_lengths(LENGTHS)
    cache = HybridCache(model.config, 3)
    with torch.no_grad():
        whole = model(ids, seq_idx=seq_idx).logits
        first = model(ids[:, :split], seq_idx=seq_idx[:, :split], past_key_values=cache).logits
        second = model(ids[:, split:], seq_idx=seq_idx[:, split:], past_key_values=cache).logits
    diff = (torch.cat([first, second], 1) - whole).abs().max().item()
    assert diff <= TOL, f"split at {split}: max |diff| {diff:.2e}"


def test_gradients_of_a_packed_row_stay_inside_each_document() -> None:
    """A loss on one document's logits reaches no other document's input embeddings: later ones
    not at all (causal), earlier ones only by fp32 round-off (the SSD scan's cumulative decay
    sums run through the chunk, and their terms from an earlier document cancel exactly only in
    exact arithmetic): measured ~1e-11 of the document's own gradient."""
    model = model_for("moe")
    ids = torch.randint(3, 97, (1, 24))
    embeds: list[torch.Tensor] = []

    def keep_grad(_module, _inputs, out: torch.Tensor) -> None:
        out.retain_grad()
        embeds.append(out)

    model.model.embed_tokens.register_forward_hook(keep_grad)
    model(ids, seq_idx=seq_idx_from_lengths([[5, 11, 8]])).logits[0, 5:16].sum().backward()
    grad = embeds[0].grad[0].abs().sum(-1)  # (24,)
    own = grad[5:16].min().item()
    assert own > 0, "the document's own tokens get gradient"
    assert grad[16:].eq(0).all(), "no gradient reaches a later document"
    leak = grad[:5].max().item()
    assert leak <= 1e-8 * own, f"gradient on an earlier document {leak:.1e} vs own {own:.1e}: not round-off"


def test_packed_position_ids_restart_at_every_document_and_skip_padding() -> None:
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1]])
    mask = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 0, 0]])
    got = packed_position_ids(seq_idx, mask)
    assert got.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 0, 1, 0, 1, 1, 1]]
    assert packed_position_ids(seq_idx[:1]).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


def test_default_positions_of_a_packed_call_are_per_document() -> None:
    """Passing packed_position_ids explicitly changes nothing: the model computes them itself."""
    model = model_for("moe")
    ids = torch.randint(3, 97, (3, 24))
    seq_idx = seq_idx_from_lengths(LENGTHS)
    with torch.no_grad():
        implicit = model(ids, seq_idx=seq_idx).logits
        explicit = model(ids, seq_idx=seq_idx, position_ids=packed_position_ids(seq_idx)).logits
    assert torch.equal(implicit, explicit)


def test_seq_idx_from_lengths_numbers_documents_and_pads_with_the_last() -> None:
    assert seq_idx_from_lengths([[2, 3], [1, 1, 1]], width=6).tolist() == [
        [0, 0, 1, 1, 1, 1],
        [0, 1, 2, 2, 2, 2],
    ]
    with pytest.raises(ValueError, match="does not fit"):
        seq_idx_from_lengths([[4, 4]], width=7)
    with pytest.raises(ValueError, match="at least one document"):
        seq_idx_from_lengths([[3, 0]])


@pytest.mark.parametrize(
    "seq_idx, message",
    [
        (torch.tensor([[0, 1, 0, 1]]), "non-decreasing"),
        (torch.zeros(1, 3, dtype=torch.long), "shape"),
        (torch.zeros(1, 4), "integer"),
    ],
)
def test_bad_seq_idx_is_rejected(seq_idx: torch.Tensor, message: str) -> None:
    model = model_for("moe")
    with pytest.raises(ValueError, match=message):
        model(torch.ones(1, 4, dtype=torch.long), seq_idx=seq_idx)


def test_seq_idx_may_not_go_back_across_calls_with_a_cache() -> None:
    model = model_for("moe")
    cache = HybridCache(model.config, 1)
    with torch.no_grad():
        model(torch.ones(1, 4, dtype=torch.long), seq_idx=torch.tensor([[0, 0, 1, 1]]), past_key_values=cache)
        with pytest.raises(ValueError, match="non-decreasing"):
            model(torch.ones(1, 2, dtype=torch.long), seq_idx=torch.tensor([[0, 0]]), past_key_values=cache)


# ------------------------------------------------------------------------------ causal conv kernel
def conv_inputs(T: int = 24, channels: int = 6, K: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, channels, generator=gen, dtype=torch.float64)
    weight = torch.randn(channels, K, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    state = torch.randn(2, K - 1, channels, generator=gen, dtype=torch.float64)
    return x, weight, bias, state


@pytest.mark.parametrize("lengths", [[5, 11, 8], [1, 2, 21], [24], [8, 1, 15]])
@pytest.mark.parametrize("with_state", [False, True])
def test_shifted_conv_equals_the_per_document_reference(lengths: list[int], with_state: bool) -> None:
    x, weight, bias, state = conv_inputs()
    seq_idx = seq_idx_from_lengths([lengths, [24]])
    state = state if with_state else None
    y, new_state = causal_conv1d(x, weight, bias, state, seq_idx, impl="shifted")
    y_ref, state_ref = causal_conv1d(x, weight, bias, state, seq_idx, impl="reference")
    assert torch.allclose(y, y_ref, atol=1e-12), (y - y_ref).abs().max()
    assert torch.allclose(new_state, state_ref, atol=1e-12)


@pytest.mark.parametrize("impl", ["shifted", "reference"])
def test_packed_conv_equals_each_document_alone(impl: str) -> None:
    """Taps from another document read zero; the state belongs to the first document; the new
    state is the last (2-step) document's, zero-padded to the K - 1 = 3 window."""
    x, weight, bias, state = conv_inputs()
    lengths = [5, 17, 2]
    y, new_state = causal_conv1d(x, weight, bias, state, seq_idx_from_lengths([lengths] * 2), impl=impl)
    for k, span in enumerate(spans(lengths)):
        alone, alone_state = causal_conv1d(
            x[:, span], weight, bias, state if k == 0 else None, impl="reference"
        )
        assert torch.allclose(y[:, span], alone, atol=1e-12), f"document {k}"
    assert torch.allclose(new_state, alone_state, atol=1e-12)
    assert new_state[:, 0].eq(0).all(), "the window before a 2-step document is empty"


def test_conv_without_documents_is_plain_conv1d() -> None:
    x, weight, bias, _ = conv_inputs()
    y, _ = causal_conv1d(x, weight, bias)
    conv = torch.nn.functional.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=3, groups=6)
    assert torch.allclose(y, conv[..., :24].transpose(1, 2), atol=1e-12)


def test_unknown_conv_implementation_is_rejected() -> None:
    x, weight, bias, _ = conv_inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        causal_conv1d(x, weight, bias, impl="cuda")
