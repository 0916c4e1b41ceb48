"""ParallelState on spawned gloo ranks: mesh layout, bad world sizes, dead and stalled ranks."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from longvita.parallel.state import ParallelState
from tests.distributed.spawn import RankFailed

pytestmark = pytest.mark.distributed

TIMEOUT_S = 5  # ParallelState's collective timeout in the failure tests
DEADLINE_S = 30  # a lost rank must make the others raise within this (spawn included)


# -- rank functions (module level: the spawned ranks import them) -------------------------------


def _layout_rank(rank: int, world_size: int) -> dict:
    state = ParallelState.from_group(2, timeout_s=60)
    cp_sum, dp_sum = torch.tensor([float(rank)]), torch.tensor([float(rank)])
    dist.all_reduce(cp_sum, group=state.cp_group)
    dist.all_reduce(dp_sum, group=state.dp_group)
    return {
        "rank": state.rank,
        "cp": (state.cp_rank, state.cp_size),
        "dp": (state.dp_rank, state.dp_size),
        "axes": state.mesh.mesh_dim_names,
        "device": str(state.device),
        "is_distributed": state.is_distributed,
        "cp_sum": cp_sum.item(),
        "dp_sum": dp_sum.item(),
    }


def _mismatched_rank(rank: int, world_size: int) -> str:
    try:
        ParallelState.from_group(2)
    except ValueError as err:
        return str(err)
    return "no error"


def _lost_peer_rank(rank: int, world_size: int, peer_fate: str) -> None:
    """dp 2 x cp 2, so the cp groups are mesh sub-groups, not the (600 s) default group:
    rank 1 dies or stalls instead of joining the collective, the others all-reduce over cp."""
    state = ParallelState.from_group(2, timeout_s=TIMEOUT_S)
    if rank == 1 and peer_fate == "dies":
        os._exit(0)  # abrupt, no teardown; exit code 0 so the harness waits for rank 0's error
    if rank == 1:
        time.sleep(10 * DEADLINE_S)  # stalls; the harness kills it once rank 0 has failed
    dist.all_reduce(torch.ones(4), group=state.cp_group)


# -- tests --------------------------------------------------------------------------------------


def test_single_process_state():
    state = ParallelState.single()
    assert (state.world_size, state.rank, state.cp_size, state.dp_size) == (1, 0, 1, 1)
    assert state.cp_group is None and state.dp_group is None and not state.is_distributed
    state.destroy()  # a no-op


def test_mesh_layout_dp2_cp2(ranks):
    for rank, got in enumerate(ranks(_layout_rank, 4)):
        # row-major [dp, cp]: the ranks of one cp group are adjacent
        assert got["rank"] == rank and got["cp"] == (rank % 2, 2) and got["dp"] == (rank // 2, 2)
        assert got["axes"] == ("dp", "cp") and got["device"] == "cpu" and got["is_distributed"]
        assert got["cp_sum"] == 4 * (rank // 2) + 1  # ranks {0, 1} or {2, 3}
        assert got["dp_sum"] == 2 + 2 * (rank % 2)  # ranks {0, 2} or {1, 3}


def test_init_from_the_torchrun_environment(tmp_path, monkeypatch):
    """The env path entry points take under torchrun, in a world of one (file:// rendezvous)."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    state = ParallelState.init(1, init_method=f"file://{tmp_path}/rendezvous", timeout_s=30)
    try:
        assert state.is_distributed and state.mesh.mesh_dim_names == ("dp", "cp")
        assert dist.get_backend() == "gloo" and state.device == torch.device("cpu")
        assert ParallelState.init(1).mesh is not None  # reuses the initialized group
        ones = torch.ones(2)
        dist.all_reduce(ones, group=state.cp_group)
        assert ones.tolist() == [1.0, 1.0]
    finally:
        state.destroy()
    assert not dist.is_initialized()


def test_world_size_not_multiple_of_cp_fails_before_rendezvous(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="world size 3 does not match --cp 2"):
        ParallelState.init(2)  # would otherwise wait for a rendezvous that never completes
    with pytest.raises(ValueError, match="--cp must be >= 1"):
        ParallelState.init(0)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="world size 1 does not match --cp 2"):
        ParallelState.init(2)
    assert not ParallelState.init(1).is_distributed


def test_world_size_not_multiple_of_cp_on_a_live_group(ranks):
    for message in ranks(_mismatched_rank, 3):
        assert message.startswith("world size 3 does not match --cp 2: "), message


@pytest.mark.parametrize("peer_fate", ["dies", "stalls"])
def test_lost_rank_fails_its_group_within_the_timeout(ranks, peer_fate):
    start = time.monotonic()
    # timeout_s bounds the whole run: a hang would surface as TimeoutError, not RankFailed
    with pytest.raises(RankFailed, match="rank 0 failed") as failure:
        ranks(_lost_peer_rank, 4, args=(peer_fate,), timeout_s=120, group_timeout_s=600)
    elapsed = time.monotonic() - start
    message = str(failure.value)
    assert any(word in message for word in ("Timed out", "Connection", "Read error")), message
    assert elapsed < DEADLINE_S, f"rank 0 raised after {elapsed:.1f} s (spawn included)"


def test_each_mesh_axis_gets_its_own_backend_options(monkeypatch):
    """torch keeps and mutates the options object a process group is built with: sharing one
    between the dp and cp axes (as NCCL sub-groups once did) lets one group's settings leak."""
    seen = {}

    class FakeMesh:
        def get_local_rank(self, axis):
            return 0

    def fake_init_device_mesh(device_type, shape, *, mesh_dim_names, backend_override):
        seen.update(backend_override)
        return FakeMesh()

    monkeypatch.setattr("longvita.parallel.state.init_device_mesh", fake_init_device_mesh)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "barrier", lambda group=None: None)
    ParallelState._with_mesh(1, "gloo", 5.0, torch.device("cpu"))
    (dp_backend, dp_options), (cp_backend, cp_options) = seen["dp"], seen["cp"]
    assert dp_backend == cp_backend == "gloo"
    assert dp_options is not cp_options
    assert dp_options._timeout == cp_options._timeout  # both carry the job's timeout
