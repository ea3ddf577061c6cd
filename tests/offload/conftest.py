"""Fixtures for the offload tests: tiny checkpoints of every variant, built once per test session."""
from __future__ import annotations

import pytest

from tests.offload.builders import DEEP_LAYERS, build_checkpoint


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """checkpoint_factory(variant, sharded=False) -> (path, transformers model), cached per session."""
    built = {}

    def make(variant: str, sharded: bool = False):
        key = (variant, sharded)
        if key not in built:
            path = tmp_path_factory.mktemp(f"{variant}{'_sharded' if sharded else ''}")
            built[key] = (path, build_checkpoint(path, variant, sharded=sharded))
        return built[key]

    return make


@pytest.fixture(scope="session")
def llama5(tmp_path_factory):
    """A 5-layer llama checkpoint: deep enough for every per-layer layout of the offloading tests."""
    path = tmp_path_factory.mktemp("llama5")
    build_checkpoint(path, "llama", num_hidden_layers=DEEP_LAYERS)
    return path
