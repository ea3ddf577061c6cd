"""Where weights live and how they reach the compute device: the weight-source contract (source.py),
packed pinned host items (host_memory.py), the copy engines (copy_engine.py), the prefetch ring
(prefetch.py) and the weight source of a placement (placed.py)."""
