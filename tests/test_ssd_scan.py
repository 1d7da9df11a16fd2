"""The chunked SSD scan against the plain sequential recurrence, written out here; packed
sequences (seq_idx) against each document scanned alone; the ``ssd_scan`` entry point."""

from __future__ import annotations

import sys

import pytest
import torch

from turbos.kernels import ssd
from turbos.kernels.ssd import ssd_chunk_scan, ssd_scan, ssd_sequential_scan, ssd_step, ssd_update_


def naive_recurrence(x, dt, A, B, C, D, state):
    """state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T ; y_t = state_t C_t + D x_t, head by head."""
    b, T, h, p = x.shape
    g = B.shape[2]
    state = state.clone()
    y = torch.zeros(b, T, h, p, dtype=torch.float64)
    for t in range(T):
        for head in range(h):
            grp = head // (h // g)
            decay = torch.exp(dt[:, t, head] * A[head])[:, None, None]
            state[:, head] = decay * state[:, head] + dt[:, t, head, None, None] * (
                x[:, t, head, :, None] * B[:, t, grp, None, :]
            )
            y[:, t, head] = (state[:, head] @ C[:, t, grp, :, None]).squeeze(-1) + D[head] * x[:, t, head]
    return y, state


def random_inputs(b=2, T=37, h=4, p=8, g=2, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, h, p, generator=gen, dtype=torch.float64)
    dt = torch.rand(b, T, h, generator=gen, dtype=torch.float64) * 0.5 + 0.01
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 3
    B = torch.randn(b, T, g, n, generator=gen, dtype=torch.float64)
    C = torch.randn(b, T, g, n, generator=gen, dtype=torch.float64)
    D = torch.randn(h, generator=gen, dtype=torch.float64)
    state = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    return x, dt, A, B, C, D, state


@pytest.mark.parametrize("chunk", [1, 5, 8, 16, 64])
@pytest.mark.parametrize("T", [1, 16, 37, 65])
def test_chunked_scan_matches_the_recurrence(chunk: int, T: int) -> None:
    # chunk_size is the longest chunk: 37 steps with chunk 16 are 3 chunks of 13 (2 padded), and
    # 65 with 64 are 2 of 33 (1 padded); fewer steps than chunk_size are one chunk of their own.
    x, dt, A, B, C, D, s0 = random_inputs(T=T, seed=chunk + T)
    y_ref, s_ref = naive_recurrence(x, dt, A, B, C, D, s0)
    y, s = ssd_chunk_scan(x, dt, A, B, C, chunk, D, s0)
    # fp32 inside the scan: 1e-4 absolute on O(1)-O(10) values is fp32 round-off, not a math error.
    assert torch.allclose(y.double(), y_ref, atol=1e-4, rtol=1e-5), (y.double() - y_ref).abs().max()
    assert torch.allclose(s.double(), s_ref, atol=1e-4, rtol=1e-5), (s.double() - s_ref).abs().max()


def test_scan_without_initial_state_starts_from_zero() -> None:
    x, dt, A, B, C, D, s0 = random_inputs(T=20)
    y_ref, s_ref = naive_recurrence(x, dt, A, B, C, D, torch.zeros_like(s0))
    y, s = ssd_chunk_scan(x, dt, A, B, C, 8, D)
    assert torch.allclose(y.double(), y_ref, atol=1e-4), (y.double() - y_ref).abs().max()
    assert torch.allclose(s.double(), s_ref, atol=1e-4)


def test_splitting_a_sequence_and_passing_the_state_is_exact() -> None:
    x, dt, A, B, C, D, s0 = random_inputs(T=40)
    y_all, s_all = ssd_chunk_scan(x, dt, A, B, C, 16, D, s0)
    y1, s1 = ssd_chunk_scan(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 16, D, s0)
    y2, s2 = ssd_chunk_scan(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 16, D, s1)
    assert torch.allclose(torch.cat([y1, y2], 1), y_all, atol=1e-5)
    assert torch.allclose(s2, s_all, atol=1e-5)


def test_sequential_reference_and_step_agree_with_the_recurrence() -> None:
    x, dt, A, B, C, D, s0 = random_inputs(T=9)
    y_ref, s_ref = naive_recurrence(x, dt, A, B, C, D, s0)
    y, s = ssd_sequential_scan(x, dt, A, B, C, D, s0)
    assert torch.allclose(y.double(), y_ref, atol=1e-4) and torch.allclose(s.double(), s_ref, atol=1e-4)
    y0, _ = ssd_step(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    assert torch.allclose(y0.double(), y_ref[:, 0], atol=1e-5)


def test_in_place_update_matches_the_step() -> None:
    """The decode kernel (state updated in place) equals the functional step, over several steps."""
    x, dt, A, B, C, D, s0 = random_inputs(T=6)
    state, ref = s0.float().clone(), s0.float()
    for t in range(6):
        y_ref, ref = ssd_step(ref, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        y = ssd_update_(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert torch.allclose(y, y_ref, atol=1e-5), (y - y_ref).abs().max()
    assert torch.allclose(state, ref, atol=1e-5)
    with pytest.raises(ValueError, match="fp32"):
        ssd_update_(state.double(), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)


def test_scan_state_is_fp32_for_bf16_inputs() -> None:
    x, dt, A, B, C, D, s0 = (t.to(torch.bfloat16) for t in random_inputs(T=10))
    y, s = ssd_chunk_scan(x, dt, A.float(), B, C, 4, D)
    assert y.dtype == torch.float32 and s.dtype == torch.float32


def test_fast_decay_stays_finite_and_exact() -> None:
    """dt * A of -160 per step: decays underflow to 0 and the masked upper triangle would overflow."""
    x, dt, A, B, C, D, s0 = random_inputs(T=24)
    dt, A = dt * 0 + 10.0, A * 0 - 16.0
    y_ref, s_ref = naive_recurrence(x, dt, A, B, C, D, s0)
    y, s = ssd_chunk_scan(x, dt, A, B, C, 8, D, s0)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert torch.allclose(y.double(), y_ref, atol=1e-3, rtol=1e-4), (y.double() - y_ref).abs().max()


def documents(lengths: list[int]) -> torch.Tensor:
    """seq_idx (1, sum(lengths)) for one row of documents of these lengths."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


# chunk 8 over 24 steps: 3 chunks of 8. [8, 8, 8] puts the boundaries on the chunk edges, [5, 11, 8]
# inside chunks and on one edge, [1, 21, 2] a one-step document first and a document spanning
# all three chunks; chunk 5 over 24 steps is 5 chunks of 5 (1 padded step).
LAYOUTS = [[8, 8, 8], [5, 11, 8], [1, 21, 2], [3, 3, 3, 3, 3, 3, 3, 3], [24]]


@pytest.mark.parametrize("chunk", [5, 8, 64])
@pytest.mark.parametrize("lengths", LAYOUTS)
def test_packed_chunked_scan_equals_each_document_alone(lengths: list[int], chunk: int) -> None:
    """The initial state belongs to the first document; the final state is the last one's."""
    x, dt, A, B, C, D, s0 = random_inputs(b=1, T=sum(lengths), seed=len(lengths) + chunk)
    y, final = ssd_chunk_scan(x, dt, A, B, C, chunk, D, s0, seq_idx=documents(lengths))
    start = 0
    for k, length in enumerate(lengths):
        part = slice(start, start + length)
        initial = s0 if k == 0 else torch.zeros_like(s0)
        y_ref, s_ref = naive_recurrence(x[:, part], dt[:, part], A, B[:, part], C[:, part], D, initial)
        diff = (y[:, part].double() - y_ref).abs().max().item()
        assert diff <= 1e-4, f"document {k} ({length} steps): max |diff| {diff:.2e} (fp32 round-off 1e-4)"
        start += length
    assert torch.allclose(final.double(), s_ref, atol=1e-4), "final state is the last document's"


@pytest.mark.parametrize("lengths", LAYOUTS[:3])
def test_packed_sequential_reference_equals_each_document_alone(lengths: list[int]) -> None:
    x, dt, A, B, C, D, s0 = random_inputs(b=1, T=sum(lengths), seed=3)
    y, final = ssd_sequential_scan(x, dt, A, B, C, D, s0, seq_idx=documents(lengths))
    tail = slice(sum(lengths) - lengths[-1], None)
    y_ref, s_ref = naive_recurrence(x[:, tail], dt[:, tail], A, B[:, tail], C[:, tail], D, 0 * s0)
    assert torch.allclose(y[:, tail].double(), y_ref, atol=1e-4), "last document restarts from zero"
    assert torch.allclose(final.double(), s_ref, atol=1e-4)
    head = slice(0, lengths[0])
    y_ref, _ = naive_recurrence(x[:, head], dt[:, head], A, B[:, head], C[:, head], D, s0)
    assert torch.allclose(y[:, head].double(), y_ref, atol=1e-4), "first document sees the initial state"


def test_packed_scan_keeps_precision_of_fast_decays() -> None:
    """No huge-negative decay marks the boundaries: with dt * A of -40 per step the packed scan is as
    exact as the unpacked one (fp32, 1e-4 relative)."""
    x, dt, A, B, C, D, s0 = random_inputs(b=1, T=24, seed=5)
    dt, A = dt * 0 + 4.0, A * 0 - 10.0
    y, _ = ssd_chunk_scan(x, dt, A, B, C, 8, D, seq_idx=documents([5, 11, 8]))
    y_ref, _ = naive_recurrence(x[:, 5:16], dt[:, 5:16], A, B[:, 5:16], C[:, 5:16], D, 0 * s0)
    assert torch.allclose(y[:, 5:16].double(), y_ref, atol=1e-4, rtol=1e-4), (y[:, 5:16] - y_ref).abs().max()


def test_rows_of_a_batch_are_packed_independently() -> None:
    x, dt, A, B, C, D, s0 = random_inputs(b=2, T=24, seed=6)
    seq_idx = torch.cat([documents([5, 11, 8]), documents([24])])
    y, final = ssd_chunk_scan(x, dt, A, B, C, 8, D, s0, seq_idx=seq_idx)
    y1, s1 = ssd_chunk_scan(x[1:], dt[1:], A, B[1:], C[1:], 8, D, s0[1:])
    assert torch.allclose(y[1:], y1, atol=1e-5) and torch.allclose(final[1:], s1, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_ssd_scan_entry_point_dispatches_to_each_implementation(impl: str) -> None:
    x, dt, A, B, C, D, s0 = random_inputs(b=2, T=24, seed=7)
    seq_idx = torch.cat([documents([5, 11, 8]), documents([8, 8, 8])])
    y, final = ssd_scan(x, dt, A, B, C, D, s0, seq_idx, chunk_size=8, impl=impl)
    y_ref, s_ref = ssd_sequential_scan(x, dt, A, B, C, D, s0, seq_idx)
    assert torch.allclose(y, y_ref, atol=1e-4) and torch.allclose(final, s_ref, atol=1e-4)


def test_auto_scan_on_cpu_is_the_chunked_scan() -> None:
    x, dt, A, B, C, D, s0 = random_inputs(T=20)
    y, final = ssd_scan(x, dt, A, B, C, D, s0, chunk_size=8)
    y_ref, s_ref = ssd_chunk_scan(x, dt, A, B, C, 8, D, s0)
    assert torch.equal(y, y_ref) and torch.equal(final, s_ref)


def test_unknown_scan_implementation_is_rejected() -> None:
    x, dt, A, B, C, D, _ = random_inputs(T=4)
    with pytest.raises(ValueError, match="impl must be one of"):
        ssd_scan(x, dt, A, B, C, D, impl="triton")


def test_cuda_scan_without_mamba_ssm_fails_clearly(monkeypatch) -> None:
    """impl="cuda" never falls back silently: without mamba_ssm it names the missing package."""
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.ssd_combined", None)
    ssd.cuda_scan_kernel.cache_clear()
    x, dt, A, B, C, D, _ = random_inputs(T=4)
    try:
        with pytest.raises(ImportError, match="needs mamba_ssm"):
            ssd_scan(x, dt, A, B, C, D, impl="cuda")
    finally:
        ssd.cuda_scan_kernel.cache_clear()
