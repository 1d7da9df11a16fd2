"""Numerical kernels, one entry point per op (SSD scan, state update, causal conv): a readable
reference and fast paths for each, tested against each other."""

from turbos.kernels.conv import causal_conv1d
from turbos.kernels.ssd import ssd_chunk_scan, ssd_scan, ssd_sequential_scan, ssd_step, ssd_update_

__all__ = ["causal_conv1d", "ssd_chunk_scan", "ssd_scan", "ssd_sequential_scan", "ssd_step", "ssd_update_"]
