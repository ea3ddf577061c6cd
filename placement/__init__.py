"""Decides what goes where: weights and KV cache per layer across GPU memory and CPU RAM."""
