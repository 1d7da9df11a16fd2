"""The Mamba2 state-space duality (SSD) scan: one entry point, ``ssd_scan``, over a sequential
reference, a chunked torch form and mamba_ssm's CUDA kernel; ``ssd_step`` / ``ssd_update_`` are the
one-token state update (decode).

Per head h the recurrence is, for t = 1..T (report §2.2; Dao & Gu 2024)::

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t (outer) B_t      # (P, N)
    y_t     = state_t @ C_t + D_h * x_t

B and C are shared by the heads of a group. The chunked form splits time into chunks of Q steps:
inside a chunk the output is a masked (Q x Q) "attention" of C against B weighted by the decay
between positions; across chunks only the (P, N) state is carried, so cost is linear in T.
Everything here runs in fp32 whatever the input dtype (report §5: fp32 Mamba state).

Packed sequences: ``seq_idx`` (b, T), integer, non-decreasing along each row, gives every step's
document. The state restarts from zero where the document changes, as in mamba_ssm: an
``initial_state`` belongs to the row's first document, and the final state is that of the row's
last document.

Shapes: x (b, T, h, p); dt (b, T, h), already softplus'ed and clamped; A (h,), negative;
B, C (b, T, g, n); D (h,); state (b, h, p, n); seq_idx (b, T).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

SSD_IMPLS = ("auto", "reference", "chunked", "cuda")
"""``ssd_scan``'s implementations: the sequential recurrence, the chunked torch scan, mamba_ssm's
``mamba_chunk_scan_combined``; "auto" is "cuda" for CUDA inputs when mamba_ssm is importable, else
"chunked"."""

# exp() of inputs below about -87 produces subnormal floats, which CPUs handle on a slow path.
# Decays below exp(-60) ~ 1e-26 are zero at fp32 precision, so clamp there before exponentiating.
# Real decays are <= 1 (log <= 0); clamping at 0 too keeps the entries above the causal diagonal
# (positive logs, masked afterwards) finite, since exp overflow to inf times the mask 0 is NaN.
_MIN_LOG_DECAY = -60.0


def _decay(log_decay: torch.Tensor) -> torch.Tensor:
    return log_decay.clamp(min=_MIN_LOG_DECAY, max=0.0).exp()


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step. x (b, h, p); dt (b, h); B, C (b, g, n); state (b, h, p, n).

    Returns (y (b, h, p), new_state); both fp32.
    """
    heads, groups = x.shape[1], B.shape[1]
    x, dt = x.float(), dt.float()
    B = B.float().repeat_interleave(heads // groups, dim=1)  # (b, h, n)
    C = C.float().repeat_interleave(heads // groups, dim=1)
    decay = torch.exp(dt * A.float())[..., None, None]  # (b, h, 1, 1)
    state = state.float() * decay + (x * dt[..., None])[..., None] * B[:, :, None, :]
    y = (state @ C[..., None]).squeeze(-1)
    if D is not None:
        y = y + x * D.float()[:, None]
    return y, state


def ssd_update_(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ssd_step`` that updates ``state`` (fp32, contiguous) in place and returns y (b, h, p) fp32.

    The decode path (report §5: a selective-state-update kernel reads and writes the Mamba state
    in place). Heads are viewed as (groups, heads per group) so B and C broadcast per group
    without being repeated, and no state-sized temporary is allocated: on CPU a fresh state per
    step per layer costs more than the arithmetic.
    """
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("ssd_update_ needs a contiguous fp32 state")
    x, dt = x.float(), dt.float()
    s = state.view(b, g, h // g, p, n)
    s.mul_(torch.exp(dt * A.float()).view(b, g, h // g, 1, 1))
    s.addcmul_((x * dt[..., None]).view(b, g, h // g, p, 1), B.float().view(b, g, 1, 1, n))
    y = torch.linalg.vecdot(s, C.float().view(b, g, 1, 1, n)).view(b, h, p)
    if D is not None:
        y = y.addcmul_(x, D.float()[:, None])
    return y


def ssd_sequential_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the recurrence one step at a time, the state zeroed where ``seq_idx`` changes.

    Returns (y (b, T, h, p), final state (b, h, p, n)), fp32.
    """
    b, T, h, p = x.shape
    state = (
        initial_state.float()
        if initial_state is not None
        else x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32)
    )
    ys = []
    for t in range(T):
        if seq_idx is not None and t > 0:  # a new document starts from the zero state
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(state.dtype)[:, None, None, None]
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan for any T. ``chunk_size`` is the longest chunk: T is split into
    ceil(T / chunk_size) chunks of equal length (the last padded by fewer steps than there are
    chunks), so a short sequence is one chunk of its own length rather than padded to
    ``chunk_size``; any chunking gives the same result.

    With ``seq_idx`` (b, T), no decay crosses a document boundary: inside a chunk the (Q x Q)
    decays between steps of different documents are masked to zero, a chunk's contribution to
    the state at its end counts only steps of the document that ends it, and the state carried
    into a chunk reaches only the steps of the document it belongs to (and is dropped at the
    chunk's end if that document ended inside it). Masks multiply; the cumulative decays
    themselves are untouched, so fp32 precision is that of an unpacked scan.

    Returns (y (b, T, h, p) fp32, final state (b, h, p, n) fp32).
    """
    b, T, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    c = max(1, -(-T // chunk_size))  # chunks
    r, q = h // g, max(1, -(-T // c))
    pad = c * q - T
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    if pad:  # dt = 0 on padding: no decay and no input, so the final state is unaffected
        xf, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bf, Cf))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        if seq_idx is not None:  # padding belongs to the last document
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)

    # Heads split as (g, r): r heads share the group's B and C. Layout (b, c, g, r, q, ...).
    xdt = (xf * dtf[..., None]).view(b, c, q, g, r, p).permute(0, 1, 3, 4, 2, 5)
    a_cum = (dtf * A.float()).view(b, c, q, g, r).permute(0, 1, 3, 4, 2).cumsum(-1)  # (b,c,g,r,q)
    Bc = Bf.view(b, c, q, g, n).permute(0, 1, 3, 2, 4)  # (b, c, g, q, n)
    Cc = Cf.view(b, c, q, g, n).permute(0, 1, 3, 2, 4)
    if seq_idx is not None:
        doc = seq_idx.reshape(b, c, q)
        # The document of the state entering each chunk: the last step of the chunk before (the
        # row's first document for the initial state).
        doc_in = torch.cat([seq_idx[:, :1], doc[:, :-1, -1]], dim=1)  # (b, c)
        sees_start = (doc == doc_in[..., None]).float()[:, :, None, None]  # (b, c, 1, 1, q)
        in_last_doc = (doc == doc[..., -1:]).float()[:, :, None, None]  # (b, c, 1, 1, q)

    # 1. Within each chunk: y[l] = sum_{s<=l} (C_l . B_s) exp(a_cum[l] - a_cum[s]) xdt[s]
    causal = torch.ones(q, q, device=x.device).tril()
    decay = _decay(a_cum[..., :, None] - a_cum[..., None, :]) * causal  # (b, c, g, r, q, q)
    if seq_idx is not None:
        decay = decay * (doc[..., :, None] == doc[..., None, :]).float()[:, :, None, None]
    scores = decay * (Cc @ Bc.transpose(-1, -2))[:, :, :, None]
    y = scores @ xdt  # (b, c, g, r, q, p)

    # 2. Each chunk's own contribution to the state at its end.
    to_end = _decay(a_cum[..., -1:] - a_cum)  # (b, c, g, r, q)
    if seq_idx is not None:
        to_end = to_end * in_last_doc
    chunk_states = (xdt * to_end[..., None]).transpose(-1, -2) @ Bc[:, :, :, None]  # (b, c, g, r, p, n)

    # 3. Pass states across chunks (linear in the number of chunks).
    chunk_decay = _decay(a_cum[..., -1])  # (b, c, g, r)
    if seq_idx is not None:  # the carried state ends where its document ends
        chunk_decay = chunk_decay * sees_start[..., -1]
    chunk_decay = chunk_decay[..., None, None]
    if initial_state is None:
        state = xf.new_zeros(b, g, r, p, n)
    else:
        state = initial_state.float().reshape(b, g, r, p, n)
    starts = []
    for ci in range(c):
        starts.append(state)
        state = state * chunk_decay[:, ci] + chunk_states[:, ci]
    start_states = torch.stack(starts, dim=1)  # (b, c, g, r, p, n)

    # 4. What the state carried into each chunk adds to its outputs.
    from_start = _decay(a_cum)
    if seq_idx is not None:
        from_start = from_start * sees_start
    y = y + (Cc[:, :, :, None] @ start_states.transpose(-1, -2)) * from_start[..., None]

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * q, h, p)[:, :T]
    if D is not None:
        y = torch.addcmul(y, xf[:, :T], D.float()[:, None])
    return y, state.reshape(b, h, p, n)


@functools.cache
def cuda_scan_kernel() -> Callable | None:
    """mamba_ssm's ``mamba_chunk_scan_combined``, or None where it is not importable."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    chunk_size: int = 64,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan over a sequence (see the module docstring), by the implementation ``impl``
    names (``SSD_IMPLS``). ``chunk_size`` matters to "chunked" and "cuda" only, and to neither's
    result beyond round-off.

    x (b, T, h, p); dt (b, T, h); A (h,); B, C (b, T, g, n); D (h,) or None; initial_state
    (b, h, p, n) or None (zeros); seq_idx (b, T) or None (one document per row).
    Returns (y (b, T, h, p) fp32, final state (b, h, p, n) fp32).
    """
    if impl not in SSD_IMPLS:
        raise ValueError(f"ssd_scan impl must be one of {SSD_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "cuda" if x.is_cuda and cuda_scan_kernel() is not None else "chunked"
    if impl == "reference":
        return ssd_sequential_scan(x, dt, A, B, C, D, initial_state, seq_idx)
    if impl == "chunked":
        return ssd_chunk_scan(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx)
    kernel = cuda_scan_kernel()
    if kernel is None:
        raise ImportError(
            "ssd_scan(impl='cuda') needs mamba_ssm's mamba_chunk_scan_combined, which is not importable "
            "here: install mamba-ssm, or use impl='chunked'"
        )
    if not x.is_cuda:
        raise ValueError(f"ssd_scan(impl='cuda') needs CUDA tensors, got x on {x.device}")
    if seq_idx is not None:  # the kernel gives the initial state to document 0: number from there
        seq_idx = (seq_idx - seq_idx[:, :1]).to(torch.int32).contiguous()
    y, state = kernel(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        initial_states=initial_state,
        seq_idx=seq_idx,
        return_final_states=True,
    )
    return y.float(), state.float()
