"""Distributed tests: gloo ranks spawned on this machine (see spawn.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.distributed.spawn import run_on_ranks


@pytest.fixture
def ranks():
    """`run_on_ranks` from tests.distributed.spawn; skips the test where gloo is missing."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    return run_on_ranks
