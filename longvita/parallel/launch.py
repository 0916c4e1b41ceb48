"""Start the processes of a job (dp x cp ranks) on this machine, or join the job torchrun
started.

Owns process start-up, the rendezvous and the propagation of one rank's failure to the job.
`launch(fn, cp=C, world_size=N)` runs `fn(state, *args)` on every rank (N = C by default: one
context-parallel group) and returns global rank 0's result:

- under torchrun (WORLD_SIZE in the environment) this process is one rank: it joins the job
  with `ParallelState.init` (env:// rendezvous) and returns its result on global rank 0, None
  on the others, which print nothing;
- otherwise, with N > 1, it spawns N local processes (gloo on CPU; NCCL on CUDA with device
  `cuda:r` for rank r) that meet over a file:// rendezvous in a temporary directory, waits for
  them and returns rank 0's result; with N = 1 it calls `fn` in this process.

Failures: every collective has the `timeout_s` of `ParallelState`, so a rank whose peer died or
stalled raises instead of hanging. Here, the first rank to fail ends the job: the others get
`FAILED_JOB_GRACE_S` to end on their own, then SIGTERM, and are killed as long after that (a
rank stopped or stuck in native code answers nothing else), and this process raises. A user
error (a ValueError such as a missing image) is re-raised as itself, so the command line
reports it as it would at --cp 1; anything else becomes `RankFailedError` naming the rank, with
its traceback. Under torchrun the elastic agent stops the other ranks when one fails.

Ctrl-C: the spawned ranks ignore SIGINT (they inherit that from the moment they are started),
so a terminal's interrupt reaches only this process, which stops them all and raises
KeyboardInterrupt once; no rank prints a traceback of its own. The ranks then get SIGTERM and
`grace_s` seconds to end (a trainer writes its checkpoint on SIGTERM) before they are killed.
SIGTERM to this process (a scheduler ending the job) is passed on the same way, and more
SIGTERMs are ignored meanwhile: ranks that then end on their own (a trainer, after its
checkpoint) return rank 0's result as usual; otherwise this process ends as it would have
without ranks. When this process dies without a word (SIGKILL), Linux sends each spawned rank
SIGTERM (`PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from longvita.errors import RunError
from longvita.logs import LogSettings, configure_logging
from longvita.parallel.state import ParallelState

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
"""How long a rank waits in a collective for its peers before it raises."""
FAILED_JOB_GRACE_S = 3.0
"""Once a rank has failed, how long the others get to end on their own, then after SIGTERM
before SIGKILL (torch's default: none, then 30 s)."""
PR_SET_PDEATHSIG = 1
"""prctl(2)'s option: the signal a process gets when its parent ends."""


class RankFailedError(RunError):
    """A rank of a launched job failed: the message names it and its last error line;
    `traceback` holds the rank's whole traceback (empty when the rank died without one)."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


def launch(
    fn: Callable[..., Any],
    *,
    cp: int,
    world_size: int | None = None,
    args: tuple = (),
    device: str | torch.device = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    grace_s: float = 0.0,
) -> Any:
    """Run `fn(state: ParallelState, *args)` on every rank of a (dp x cp) job.

    world_size: processes to start here (default `cp`: one context-parallel group); under
    torchrun the job's own size is used. Returns global rank 0's result (None on the other
    ranks under torchrun). `fn` and `args` must be picklable when processes are spawned (a
    module-level function).
    device: "cpu" (gloo) or an accelerator type such as "cuda" (NCCL, one device per rank,
        cuda:0 .. cuda:N-1 when spawned, cuda:LOCAL_RANK under torchrun).
    timeout_s: the collective timeout of every process group.
    grace_s: on Ctrl-C, how long spawned ranks may take to end after SIGTERM (a trainer saves
        a checkpoint) before they are killed.
    """
    world_size = cp if world_size is None else world_size
    if cp < 1:
        raise ValueError(f"--cp must be >= 1, got {cp}")
    if world_size < 1 or world_size % cp:
        raise ValueError(f"{world_size} processes do not split into groups of --cp {cp}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    device = torch.device(device)
    if "WORLD_SIZE" in os.environ:
        return _join_torchrun(fn, cp, args, device, timeout_s)
    if world_size == 1:
        return fn(ParallelState.single(device), *args)
    if device.type != "cpu" and torch.accelerator.device_count() < world_size:
        raise ValueError(
            f"{world_size} processes on {device.type} need {world_size} devices (one per rank) "
            f"but {torch.accelerator.device_count()} are visible"
        )
    if device.index is not None:
        logger.warning("device %s: the index is ignored, rank r runs on %s:r", device, device.type)
    return _spawn(fn, world_size, cp, args, device, timeout_s, grace_s)


def _join_torchrun(fn, cp, args, device, timeout_s) -> Any:
    """This process is one rank of a torchrun job."""
    state = ParallelState.init(
        cp, timeout_s=timeout_s, device=None if device.type != "cpu" else device
    )
    result = fn(state, *args)
    state.destroy()
    return result if state.is_main else None


def _spawn(fn, world_size, cp, args, device: torch.device, timeout_s: float, grace_s: float):
    """Spawn `world_size` local ranks, wait for all of them, return rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="longvita-cp-") as tmp:
        workdir = Path(tmp)
        held = _hold_sigint()
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the ranks
        try:
            context = mp.start_processes(
                _rank_main,
                args=(
                    world_size,
                    cp,
                    str(workdir),
                    device.type,
                    timeout_s,
                    LogSettings.current(),
                    fn,
                    args,
                ),
                nprocs=world_size,
                join=False,
                start_method="spawn",
            )
        except BaseException:
            signal.signal(signal.SIGINT, handler)
            _release_sigint(held)
            raise
        signal.signal(signal.SIGINT, handler)
        previous_sigterm = _raise_on_sigterm()
        try:
            _release_sigint(held)  # a Ctrl-C during the start arrives now: the ranks are stopped
            while not context.join(grace_period=FAILED_JOB_GRACE_S):
                pass
        except _Terminated:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # another SIGTERM: still stopping
            _terminate(context.processes, grace_s)  # a trainer checkpoints after its step
            if not all(process.exitcode == 0 for process in context.processes):
                _kill_remaining(context.processes)  # before this process may end below
                _restore_sigterm(previous_sigterm)  # the ranks did not end on their own: end
                signal.raise_signal(signal.SIGTERM)  # as this process would have without them
                raise RankFailedError(  # the handler before ours returned: the job still ended
                    f"SIGTERM: the {world_size} ranks were stopped"
                ) from None
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            raise _job_error(workdir, context, _first_cause(context, err.error_index)) from None
        except KeyboardInterrupt:
            _terminate(context.processes, grace_s)
            raise
        finally:
            _restore_sigterm(previous_sigterm)
            _kill_remaining(context.processes)  # ours, e.g. after KeyboardInterrupt
        result_file = workdir / "result.pt"
        if not result_file.is_file():
            raise RankFailedError(f"rank 0 of {world_size} exited without a result")
        # A file our own rank 0 has just written: full unpickling allows any result type.
        return torch.load(result_file, weights_only=False)


def _hold_sigint() -> bool:
    """Block SIGINT in this thread while the ranks start (with SIGINT ignored, so that they
    inherit "ignore"): on Linux a blocked signal stays pending even while ignored, so a Ctrl-C
    in that window is delivered by `_release_sigint` instead of lost. Whether it blocked."""
    if not hasattr(signal, "pthread_sigmask"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    # multiprocessing starts its resource tracker at the first spawn with SIGINT blocked, then
    # unblocks it: start it first, or it would undo this block
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    return True


def _release_sigint(held: bool) -> None:
    if held:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class _Terminated(Exception):
    """SIGTERM reached this process while its ranks ran."""


def _raise_on_sigterm():
    """While the ranks run, SIGTERM (a scheduler, `kill`) raises `_Terminated` here so that the
    ranks are stopped too rather than left running; returns the handler to restore (None
    outside the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handle(signum, frame):
        raise _Terminated

    return signal.signal(signal.SIGTERM, handle)


def _restore_sigterm(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def _terminate(processes, grace_s: float) -> None:
    """SIGTERM to every live rank, then wait up to grace_s for them to end (the caller kills
    what is left); a second Ctrl-C stops the wait."""
    alive = [process for process in processes if process.is_alive()]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(KeyboardInterrupt):
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))


def _kill_remaining(processes) -> None:
    """SIGKILL the ranks still alive and reap them."""
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def _rank_main(rank, world_size, cp, workdir, device_type, timeout_s, logs, fn, args) -> None:
    """Body of a spawned rank: join the group, run `fn`, leave rank 0's result or the error."""
    _terminate_with_parent()
    configure_logging(logs.verbose, route_transformers=logs.route_transformers)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if device_type == "cpu":  # the processes share the cores, unless the user said otherwise
        threads = os.environ.get("OMP_NUM_THREADS", "")
        share = max(1, (os.cpu_count() or 1) // world_size)
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else share)
    device = torch.device(device_type, rank) if device_type != "cpu" else torch.device("cpu")
    try:
        state = ParallelState.init(
            cp, timeout_s=timeout_s, device=device, init_method=f"file://{workdir}/rendezvous"
        )
        result = fn(state, *args)
    except (ValueError, RunError) as err:  # errors that explain themselves
        _save_user_error(Path(workdir) / f"rank{rank}.error", err)
        raise
    state.destroy()
    if rank == 0:
        torch.save(result, Path(workdir) / "result.pt")


def _terminate_with_parent() -> None:
    """Ask Linux to send this rank SIGTERM when the launcher dies (killed with SIGKILL, it
    cannot stop its ranks): a trainer then checkpoints and ends instead of running on
    unwatched. Elsewhere nothing is done."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _save_user_error(path: Path, err: Exception) -> None:
    """Leave an error for the parent to raise as itself, when it survives pickling."""
    try:
        payload = pickle.dumps(err)
        pickle.loads(payload)
    except Exception:  # an exception with unpicklable state: the parent shows the traceback
        return
    path.write_bytes(payload)


LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                   "Timed out", "timed out", "a peer died, stalled")  # fmt: skip
"""In a rank's traceback: it failed because another rank did (ours, gloo's, NCCL's words)."""


def _first_cause(context: mp.ProcessContext, reported: int) -> int:
    """The rank whose failure the others' follow from, once every rank has ended: the lowest
    that raised an error other than a lost peer, or exited with an error code of its own (not
    a signal: the launcher stops the others with SIGTERM); else `reported`, the one torch saw
    first (with several failed, the lowest: often one that only lost its peer)."""
    for rank, process in enumerate(context.processes):
        trace = _trace_of(context, rank)
        if trace is not None and not any(sign in trace for sign in LOST_PEER_SIGNS):
            return rank
        if trace is None and (process.exitcode or 0) > 0:
            return rank
    return reported


def _trace_of(context: mp.ProcessContext, rank: int) -> str | None:
    """The traceback a rank left when it raised (torch's error file), None if it did not."""
    try:
        with open(context.error_files[rank], "rb") as f:
            # Written by our own rank: unpickling it is safe.
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def _job_error(workdir: Path, context: mp.ProcessContext, rank: int) -> Exception:
    """What the parent raises for a job whose `rank` failed first: an error that explains itself
    (a user's ValueError, a RunError such as a diverged run) of any rank as itself, the lowest
    rank's first (the others may only have lost their peer), else RankFailedError with `rank`'s
    traceback or exit status."""
    world_size = len(context.processes)
    for candidate in range(world_size):
        error_file = workdir / f"rank{candidate}.error"
        if error_file.is_file():
            # Written by our own rank moments ago: unpickling it is safe.
            return pickle.loads(error_file.read_bytes())
    trace = _trace_of(context, rank)
    if trace is None:
        code = context.processes[rank].exitcode or 0
        how = f"exited with code {code}"
        if code < 0:
            with contextlib.suppress(ValueError):
                how = f"was killed by {signal.Signals(-code).name}"
        return RankFailedError(
            f"rank {rank} of {world_size} {how} before finishing (its error, if any, is on "
            "stderr above); the other ranks were stopped"
        )
    lines = [line for line in trace.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "no error message"
    message = f"rank {rank} of {world_size} failed ({last}); the other ranks were stopped"
    return RankFailedError(message, traceback=trace)
