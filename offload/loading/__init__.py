"""From a checkpoint folder to a placed model: checkpoint reading (checkpoint.py), which plan to run
(planning.py), allocating and filling it (build.py: `offload.load`), the "gpu"-tier ledger (memory.py)
and the memory report (report.py)."""
