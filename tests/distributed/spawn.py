"""Run a function on N gloo ranks spawned on this machine and collect what each returns.

Generic on purpose (ring attention, the model under CP, the loss all use it):

    results = run_on_ranks(my_fn, world_size=2, args=(seed,))   # my_fn(rank, world_size, seed)

`my_fn` must be picklable (a module-level function of an importable module). Each rank:
one CPU thread, `init_process_group("gloo")` over a `file://` rendezvous in a fresh temporary
directory, with `timeout_s` as the group timeout, then a barrier so that every rank has joined
before any runs `my_fn`; its return value is `torch.save`d to that
directory and loaded by the parent (tensors, dicts, lists...). A rank that raises makes the
parent raise `RankFailed` with that rank's traceback (the other ranks are terminated); ranks that
do not finish within `timeout_s` are killed and the parent raises `TimeoutError`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A spawned rank raised; the message carries its traceback."""


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout_s: float = 60.0,
    group_timeout_s: float | None = None,
) -> list[Any]:
    """`fn(rank, world_size, *args)` on `world_size` gloo ranks -> the ranks' results, in order.

    timeout_s: wall-clock limit for the whole run (spawn included).
    group_timeout_s: the process group's timeout (collectives that wait longer raise); defaults
        to timeout_s.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    group_timeout_s = timeout_s if group_timeout_s is None else group_timeout_s
    with tempfile.TemporaryDirectory(prefix="longvita-dist-") as tmp:
        workdir = Path(tmp)
        context = mp.spawn(
            _rank_main,
            args=(world_size, str(workdir), group_timeout_s, fn, args),
            nprocs=world_size,
            join=False,
        )
        _join(context, timeout_s)
        return [_load(workdir / f"rank{rank}.pt") for rank in range(world_size)]


def _join(context: mp.ProcessContext, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"distributed ranks did not finish within {timeout_s:.0f} s")
    except mp.ProcessRaisedException as err:
        raise RankFailed(f"rank {err.error_index} failed:\n{err}") from None
    except mp.ProcessExitedException as err:
        raise RankFailed(f"rank {err.error_index} exited with code {err.exit_code}") from None
    finally:
        for process in context.processes:  # only the ranks spawned above
            if process.is_alive():
                process.kill()
                process.join()


def _load(path: Path) -> Any:
    # Files this test run just wrote: full unpickling is safe and allows any result type.
    return torch.load(path, weights_only=False)


def _rank_main(rank, world_size, workdir, group_timeout_s, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=group_timeout_s),
    )
    # Gloo connects the ranks pair by pair and init returns without waiting for the others: a
    # rank whose fn returns at once (an early ValueError) could tear its group down while a
    # slower rank is still connecting, which fails there as "Connection closed by peer".
    dist.barrier()
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(workdir) / f"rank{rank}.pt")
