"""`launch` and `generate_cp`: local ranks started by the library itself, a torchrun job
joined, a rank that raises, dies or stalls ending the job with an error, not a hang, and
Ctrl-C ending every rank quietly."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import longvita
from longvita.errors import MediaError, PromptError
from longvita.infer.cp_launch import generate_cp
from longvita.infer.request import GenerationRequest
from longvita.parallel.launch import RankFailedError, _first_cause, _job_error, launch
from longvita.parallel.state import ParallelState

pytestmark = pytest.mark.distributed

TIMEOUT_S = 5  # collective timeout in the failure tests
DEADLINE_S = 40  # a failure must end the job within this, spawn included


# -- rank functions: module level, the spawned ranks import them --------------------------------


def _sum_of_ranks(state: ParallelState, offset: int) -> dict:
    total = torch.tensor([float(state.cp_rank + offset)])
    if state.cp_group is not None:
        dist.all_reduce(total, group=state.cp_group)
    return {"cp_rank": state.cp_rank, "cp_size": state.cp_size, "sum": total.item()}


def _rank_one_fails(state: ParallelState, how: str) -> None:
    if state.cp_rank == 1:
        if how == "raises_value_error":
            raise ValueError("rank 1 cannot read photo.png")
        if how == "raises":
            raise RuntimeError("rank 1 ran out of memory")
        if how == "dies":
            os._exit(3)
        if how == "vanishes":
            os._exit(0)  # no error code: only its peer's timeout can tell
        if how == "stalls":
            time.sleep(10 * DEADLINE_S)
        if how == "is_stopped":  # answers no SIGTERM: only SIGKILL ends it
            os.kill(os.getpid(), signal.SIGSTOP)
    dist.barrier(group=state.cp_group)


def _sleeps(state: ParallelState, marker: str) -> None:
    staged = Path(f"{marker}.{state.cp_rank}.tmp")
    staged.write_text(str(os.getpid()))
    staged.replace(f"{marker}.{state.cp_rank}")  # the reader never sees it half-written
    time.sleep(10 * DEADLINE_S)


# -- launching ----------------------------------------------------------------------------------


def test_spawned_ranks_return_rank_zeros_result():
    assert launch(_sum_of_ranks, cp=3, args=(10,), timeout_s=60) == {
        "cp_rank": 0,
        "cp_size": 3,
        "sum": 33.0,  # 10 + 11 + 12: every rank took part
    }


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs signal masks")
def test_a_ctrl_c_while_the_ranks_start_stops_them(monkeypatch):
    """The parent ignores SIGINT while it starts the ranks (they inherit "ignore"); a Ctrl-C
    in that window must still stop the job, not be lost."""
    launching = importlib.import_module("longvita.parallel.launch")  # the module, not launch()
    real_start = launching.mp.start_processes
    started = []

    def start_then_ctrl_c(*args, **kwargs):
        context = real_start(*args, **kwargs)
        started.extend(context.processes)
        signal.raise_signal(signal.SIGINT)  # arrives while SIGINT is still ignored here
        return context

    monkeypatch.setattr(launching.mp, "start_processes", start_then_ctrl_c)
    begin = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launch(_sum_of_ranks, cp=2, args=(0,), timeout_s=60)  # would return: it is quick
    assert time.monotonic() - begin < DEADLINE_S
    assert len(started) == 2 and not any(process.is_alive() for process in started)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cp_one_runs_in_this_process():
    assert launch(_sum_of_ranks, cp=1, args=(7,)) == {"cp_rank": 0, "cp_size": 1, "sum": 7.0}
    assert not dist.is_initialized()


def test_bad_arguments_fail_before_any_process_starts():
    with pytest.raises(ValueError, match="--cp must be >= 1"):
        launch(_sum_of_ranks, cp=0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        launch(_sum_of_ranks, cp=2, timeout_s=0)


@pytest.mark.parametrize(
    ("how", "error", "message"),
    [
        ("raises_value_error", ValueError, "rank 1 cannot read photo.png"),
        ("raises", RankFailedError, r"rank 1 of 2 failed \(RuntimeError: rank 1 ran out of memory"),
        ("dies", RankFailedError, "rank 1 of 2 exited with code 3"),
        ("vanishes", RankFailedError, "rank 0 of 2 failed"),  # its barrier loses the peer
        ("stalls", RankFailedError, "rank 0 of 2 failed"),  # its barrier times out
        ("is_stopped", RankFailedError, "rank 0 of 2 failed"),
    ],
)
def test_a_failing_rank_ends_the_job_with_an_error(how, error, message):
    start = time.monotonic()
    with pytest.raises(error, match=message) as failure:
        launch(_rank_one_fails, cp=2, args=(how,), timeout_s=TIMEOUT_S)
    # A stopped rank is killed 2 x FAILED_JOB_GRACE_S after rank 0 fails, not torch's 30 s.
    assert time.monotonic() - start < (DEADLINE_S if how != "is_stopped" else 30)
    if how == "raises":  # one line for the user, the whole traceback kept for -v
        assert "\n" not in str(failure.value) and "Traceback" in failure.value.traceback


# -- generate --cp N ----------------------------------------------------------------------------


def test_generate_cp_equals_the_pipeline(tiny_checkpoint, media):
    prompt, images, videos = "<video>\nWhat happens?", [], [media["video"]]
    reference = longvita.load(tiny_checkpoint).generate(
        prompt, images, videos, max_new_tokens=6, return_scores=True
    )
    request = GenerationRequest.create(
        prompt,
        images,
        videos,
        max_new_tokens=6,
        return_scores=True,
        prefill_chunk=8,  # 46 tokens in rounds of 16: frames decoded lazily, rank by rank
    )
    output = generate_cp(tiny_checkpoint, request, cp=2)
    assert output.token_ids == reference.token_ids and output.text == reference.text
    torch.testing.assert_close(output.scores, reference.scores)
    assert output.prompt_tokens == reference.prompt_tokens
    assert output.num_tiles == reference.num_tiles and output.cp == 2
    assert output.video_frames == reference.video_frames
    assert output.stop_reason == reference.stop_reason and output.prefill_rounds == 3
    cached = output.kv_cache_tokens_per_rank
    assert sum(cached) == reference.prompt_tokens + 5 and max(cached) - min(cached) <= 4
    kv_bytes = output.kv_cache_bytes_per_rank
    assert kv_bytes[0] * cached[1] == kv_bytes[1] * cached[0] > 0  # sized to the tokens it holds
    assert sum(output.tiles_encoded_per_rank) >= reference.num_tiles
    single, sharded = reference.to_record(), output.to_record()
    assert sharded.keys() == single.keys()  # `--json` prints the same fields at any --cp
    json.dumps(sharded)


@pytest.mark.parametrize("mistake", ["missing_image", "too_long_for_positions"])
def test_generate_cp_reports_user_errors_as_the_pipeline_does(tiny_checkpoint, tmp_path, mistake):
    checkpoint, images = tiny_checkpoint, []
    if mistake == "missing_image":
        images = [tmp_path / "missing.png"]
    else:  # a copy of the checkpoint that accepts 20 positions
        checkpoint = tmp_path / "short"
        shutil.copytree(tiny_checkpoint, checkpoint)
        config = json.loads((checkpoint / "config.json").read_text())
        config["max_position_embeddings"] = 20
        (checkpoint / "config.json").write_text(json.dumps(config))
    prompt = "<image>\nWhat?" if images else "Describe a quiet morning."
    error = MediaError if images else PromptError
    with pytest.raises(error) as single:
        longvita.load(checkpoint).generate(prompt, images)
    with pytest.raises(error) as sharded:
        generate_cp(checkpoint, GenerationRequest.create(prompt, images), cp=2, timeout_s=30)
    assert str(sharded.value) == str(single.value)


def test_generate_cp_checks_its_arguments_before_starting_processes(tiny_checkpoint):
    request = GenerationRequest.create("Hi")
    with pytest.raises(ValueError, match="device 'cuda:7' is not available"):
        generate_cp(tiny_checkpoint, request, cp=2, device="cuda:7")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        generate_cp(tiny_checkpoint, request, cp=2, dtype="int8")


def test_generate_cp_refuses_a_torchrun_world_of_another_size(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="torchrun started 4 processes but --cp is 2"):
        generate_cp(tiny_checkpoint, GenerationRequest.create("Hi"), cp=2)


_TORCHRUN_SCRIPT = """
import json, sys
from longvita.infer.cp_launch import generate_cp
from longvita.infer.request import GenerationRequest
request = GenerationRequest.create("Describe a quiet morning.", max_new_tokens=5)
output = generate_cp(sys.argv[1], request, cp=2)
if output is not None:
    print("RECORD " + json.dumps(output.to_record()))
"""


def test_generate_cp_joins_a_torchrun_job(tiny_checkpoint, tmp_path):
    script = tmp_path / "generate.py"
    script.write_text(_TORCHRUN_SCRIPT)
    command = [  # --standalone: torchrun picks a free port itself (no port to race for)
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script), str(tiny_checkpoint),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [line for line in done.stdout.splitlines() if line.startswith("RECORD ")]
    assert len(records) == 1  # printed by global rank 0 only
    record = json.loads(records[0].removeprefix("RECORD "))
    reference = longvita.load(tiny_checkpoint).generate(
        "Describe a quiet morning.", max_new_tokens=5
    )
    assert record["token_ids"] == reference.token_ids and record["cp"] == 2


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_sigterm_to_the_launcher_stops_its_ranks(tmp_path):
    """A scheduler's SIGTERM to the launching process (not its group) reaches the ranks too."""
    marker = tmp_path / "rank"
    script = (
        "from longvita.parallel.launch import launch\n"
        "from tests.distributed.test_launch import _sleeps\n"
        f"launch(_sleeps, cp=2, world_size=2, args=({str(marker)!r},), grace_s=5)\n"
    )
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen([sys.executable, "-c", script], cwd=root, stderr=subprocess.PIPE)
    deadline = time.monotonic() + DEADLINE_S
    ranks = [Path(f"{marker}.{rank}") for rank in (0, 1)]
    while not all(r.is_file() for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(r.is_file() for r in ranks), "the ranks never started"
    pids = [int(r.read_text()) for r in ranks]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == -signal.SIGTERM, err.decode()
    deadline = time.monotonic() + 20  # exiting processes may take a moment to be reaped
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in pids), "a rank outlived its launcher"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class _EndedRank:
    def __init__(self, exitcode: int) -> None:
        self.exitcode = exitcode


def _ended_job(tmp_path, ranks: list[tuple[int, str | None]]):
    """A job whose ranks ended with (exit code, traceback or None), as torch leaves it."""
    processes, error_files = [], []
    for rank, (exitcode, trace) in enumerate(ranks):
        processes.append(_EndedRank(exitcode))
        error_files.append(str(tmp_path / f"torch-error-{rank}"))
        if trace is not None:
            Path(error_files[-1]).write_bytes(pickle.dumps(trace))
    return types.SimpleNamespace(processes=processes, error_files=error_files)


LOST = "Traceback (most recent call last):\nRuntimeError: [pair.cc:553] Connection closed by peer"


@pytest.mark.parametrize(
    ("ranks", "reported", "message"),
    [
        ([(1, LOST), (3, None)], 0, "rank 1 of 2 exited with code 3"),
        ([(1, LOST), (1, "Traceback ...\nRuntimeError: out of memory")], 0,
         r"rank 1 of 2 failed \(RuntimeError: out of memory\)"),
        ([(1, LOST), (-15, None)], 0, r"rank 0 of 2 failed \(RuntimeError: .*closed by peer\)"),
        ([(-9, None), (1, LOST)], 0, "rank 0 of 2 was killed by SIGKILL"),
    ],
)  # fmt: skip
def test_the_job_error_names_the_rank_that_failed_first(tmp_path, ranks, reported, message):
    """torch reports the lowest failed rank when several have ended: one that only lost its
    peer must not take the blame from the rank that caused it."""

    job = _ended_job(tmp_path, ranks)
    error = _job_error(tmp_path, job, _first_cause(job, reported))
    assert isinstance(error, RankFailedError) and re.match(message, str(error)), str(error)
