"""Mamba2's causal depthwise convolution over time, for packed sequences too.

    y_t = bias + sum_{j < K} weight[:, j] * x_{t - K + 1 + j}

over the inputs of y_t's own document only (``seq_idx``, as in ``turbos.kernels.ssd``): a tap
whose source step lies in another document reads zero, exactly as if the document ran alone. A
carried ``state`` (the K - 1 inputs before the sequence) belongs to the row's first document.

One entry point, ``causal_conv1d``: "reference" runs ``F.conv1d`` over each document in turn;
"shifted" is K shifted multiply-adds in the (time, channel) layout, the cross-document taps
masked. On CPU the shifted form is about twice as fast as a grouped conv1d plus the two
transposes it needs, and prefill and decode share it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_IMPLS = ("auto", "reference", "shifted")
"""``causal_conv1d``'s implementations; "auto" is "shifted"."""


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal depthwise conv (module docstring), before any activation, in x's dtype.

    x (b, T, c); weight (c, K); bias (c,) or None; state (b, K - 1, c) or None (zeros);
    seq_idx (b, T) or None (one document per row).
    Returns (y (b, T, c), new state (b, K - 1, c)): the new state is the last K - 1 inputs of
    the row's last document, zero where that document (with the state, if it is the first) is
    shorter, so it continues that document.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"causal_conv1d impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "reference":
        return _conv_per_document(x, weight, bias, state, seq_idx)
    return _conv_shifted(x, weight, bias, state, seq_idx)


def _conv_shifted(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K shifted multiply-adds over the state-prefixed window, cross-document taps masked."""
    b, T, _ = x.shape
    K = weight.shape[1]
    # (b, K - 1 + T, c): the K - 1 inputs before x, then x
    window = F.pad(x, (0, 0, K - 1, 0)) if state is None else torch.cat([state.to(x.dtype), x], dim=1)
    weight = weight.to(x.dtype)
    if seq_idx is not None:  # the document of every window step; the state's is the first one's
        window_doc = torch.cat([seq_idx[:, :1].expand(b, K - 1), seq_idx], dim=1)  # (b, K - 1 + T)
    if bias is None:
        out = window[:, K - 1 :] * weight[:, K - 1]
    else:
        out = torch.addcmul(bias.to(x.dtype), window[:, K - 1 :], weight[:, K - 1])
    for j in range(K - 1):
        tap = window[:, j : j + T]
        if seq_idx is not None:
            tap = tap * (window_doc[:, j : j + T] == seq_idx)[..., None].to(x.dtype)
        out = out.addcmul(tap, weight[:, j])
    start = window.shape[1] - (K - 1)
    new_state = window[:, start:]
    if seq_idx is not None:
        new_state = new_state * (window_doc[:, start:] == seq_idx[:, -1:])[..., None].to(x.dtype)
    return out, new_state


def _conv_per_document(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``F.conv1d`` over each document, zero-padded in front (the state in front of
    the row's first document)."""
    b, T, c = x.shape
    K = weight.shape[1]
    state = x.new_zeros(b, K - 1, c) if state is None else state.to(x.dtype)
    kernel = weight.to(x.dtype)[:, None, :]  # (c, 1, K)
    bias = None if bias is None else bias.to(x.dtype)
    ys, states = [], []
    for row in range(b):
        doc = [0] * T if seq_idx is None else seq_idx[row].tolist()
        starts = [0] + [t for t in range(1, T) if doc[t] != doc[t - 1]]
        pieces = []
        for start, end in zip(starts, [*starts[1:], T], strict=True):
            before = state[row] if start == 0 else x.new_zeros(K - 1, c)
            window = torch.cat([before, x[row, start:end]])  # (K - 1 + length, c)
            pieces.append(F.conv1d(window.T[None], kernel, bias, groups=c)[0].T)
        ys.append(torch.cat(pieces))
        states.append(window[window.shape[0] - (K - 1) :])
    return torch.stack(ys), torch.stack(states)
