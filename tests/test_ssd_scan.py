"""The chunked SSD scan against the plain sequential recurrence, written out here."""

from __future__ import annotations

import pytest
import torch

from turbos.kernels.ssd import ssd_chunk_scan, ssd_sequential_scan, ssd_step, ssd_update_


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
