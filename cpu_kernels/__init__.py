"""Numba attention kernels for layers whose KV cache lives in CPU RAM."""
