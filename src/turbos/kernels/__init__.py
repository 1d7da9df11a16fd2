"""Numerical kernels: a readable reference and a fast path for each, tested against each other."""

from turbos.kernels.ssd import ssd_chunk_scan, ssd_sequential_scan, ssd_step

__all__ = ["ssd_chunk_scan", "ssd_sequential_scan", "ssd_step"]
