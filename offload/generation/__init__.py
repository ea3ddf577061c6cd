"""Running a placed model: the layer loop (engine.py), the prefill/decode steps (steps.py), sampling,
stats, the public `Model` (model.py) and multi-turn `Session`s (session.py)."""
