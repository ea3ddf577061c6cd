"""Attention where the KV cache lives: the backend contract and the per-chunk positions (contract.py), KV
on the compute device (device.py), in host memory attended by the CPU (host.py), in host memory streamed
through the ring and attended on the device (streamed.py)."""
