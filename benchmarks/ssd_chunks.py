"""The SSD scan with equal chunks vs padding up to a multiple of the chunk size.

`ssd_chunk_scan` splits T steps into ceil(T / chunk_size) chunks of equal length, so a sequence
shorter than the chunk is one chunk of its own length. The baseline is what the scan did before:
pad T up to a multiple of chunk_size (dt = 0 on the padding, which leaves the outputs and the
state unchanged) and scan chunks of exactly chunk_size. Both run forward + backward on the
`tiny` preset's Mamba2 shapes in the same process; their outputs are checked to agree.

    python benchmarks/ssd_chunks.py [--batch 32] [--lengths 25 40 70 130 160] [--repeats 20]

Writes benchmarks/results/ssd_chunks.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_call, write_json  # noqa: E402
from turbos.kernels.ssd import ssd_chunk_scan  # noqa: E402
from turbos.presets import get_preset  # noqa: E402


def inputs(batch: int, T: int, heads: int, head_dim: int, groups: int, state: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(batch, T, heads, head_dim, generator=gen)
    dt = F.softplus(torch.randn(batch, T, heads, generator=gen) - 2)
    A = -torch.rand(heads, generator=gen) * 4 - 0.5
    B = torch.randn(batch, T, groups, state, generator=gen)
    C = torch.randn(batch, T, groups, state, generator=gen)
    D = torch.ones(heads)
    return [x.requires_grad_(), dt.requires_grad_(), A, B.requires_grad_(), C.requires_grad_(), D]


def padded_scan(x, dt, A, B, C, D, chunk: int) -> torch.Tensor:
    """The previous behaviour: pad to a multiple of ``chunk``, scan, cut the padding off."""
    T = x.shape[1]
    pad = (-T) % chunk
    xp, Bp, Cp = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    y, _ = ssd_chunk_scan(xp, F.pad(dt, (0, 0, 0, pad)), A, Bp, Cp, chunk, D)
    return y[:, :T]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[25, 40, 70, 130, 160])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cfg = get_preset(args.preset)
    chunk = cfg.mamba_chunk_size
    shape = (cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_n_groups, cfg.mamba_state_size)
    rows = []
    print(f"{'T':>5} {'padded ms':>10} {'equal ms':>9} {'speed-up':>9}")
    for T in args.lengths:
        x, dt, A, B, C, D = inputs(args.batch, T, *shape)
        ours, _ = ssd_chunk_scan(x, dt, A, B, C, chunk, D)
        base = padded_scan(x, dt, A, B, C, D, chunk)
        if not torch.allclose(ours, base, atol=1e-4, rtol=1e-4):
            raise SystemExit(f"T={T}: the two scans disagree by {(ours - base).abs().max():.2e}")

        def padded(tensors=(x, dt, A, B, C, D)) -> None:
            padded_scan(*tensors, chunk).sum().backward()

        def equal(tensors=(x, dt, A, B, C, D)) -> None:
            x, dt, A, B, C, D = tensors
            ssd_chunk_scan(x, dt, A, B, C, chunk, D)[0].sum().backward()

        t_base = time_call(padded, args.repeats, 2)
        t_ours = time_call(equal, args.repeats, 2)
        rows.append({"T": T, "padded_ms": t_base * 1e3, "equal_ms": t_ours * 1e3, "speedup": t_base / t_ours})
        print(f"{T:5d} {t_base * 1e3:10.2f} {t_ours * 1e3:9.2f} {t_base / t_ours:8.2f}x")
    path = write_json(
        "ssd_chunks.json",
        {"preset": args.preset, "batch": args.batch, "chunk_size": chunk, "machine": machine(), "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
