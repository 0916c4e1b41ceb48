"""The few collectives the layers above call, over the context-parallel group of a
`ParallelState`, each failing with a message that says what was being done and by which rank.

Owns `peer_errors` (a failed or timed-out collective re-raised with its context), `broadcast`
from one cp rank (a tensor, or with `broadcast_object` a picklable object), `gather_ints`
(small per-rank counters, in cp rank order), `common_options` (what every rank can offer:
the prefix cache entries all ranks hold) and `raise_together` (one rank's user error raised on
every rank). Callers outside `parallel/` use these instead of
importing torch.distributed themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from longvita import errors
from longvita.parallel.state import ParallelState


@contextmanager
def peer_errors(what: str, cp_rank: int, cp: int) -> Iterator[None]:
    """Re-raise a failed collective saying what was being done and by which rank."""
    try:
        yield
    except RuntimeError as err:  # DistBackendError and gloo timeouts are RuntimeErrors
        raise RuntimeError(
            f"context-parallel generation: {what} failed on cp rank {cp_rank}/{cp}; a peer "
            f"died, stalled or the group timed out: {err}"
        ) from err


def broadcast(tensor: torch.Tensor, state: ParallelState, *, src_cp_rank: int, what: str) -> None:
    """Overwrite `tensor` on every rank of the cp group with cp rank `src_cp_rank`'s, in place."""
    if state.cp_size == 1:
        return
    src = dist.get_global_rank(state.cp_group, src_cp_rank)
    with peer_errors(what, state.cp_rank, state.cp_size):
        dist.broadcast(tensor, src=src, group=state.cp_group)


def broadcast_object(obj: object, state: ParallelState, *, what: str) -> object:
    """cp rank 0's picklable `obj` on every rank of the cp group (the others pass None)."""
    if state.cp_size == 1:
        return obj
    holder = [obj]
    src = dist.get_global_rank(state.cp_group, 0)
    with peer_errors(what, state.cp_rank, state.cp_size):
        dist.broadcast_object_list(holder, src=src, group=state.cp_group, device=state.device)
    return holder[0]


def gather_ints(values: list[int], state: ParallelState) -> list[list[int]]:
    """Every cp rank's `values` (the same length on every rank), as one list per value in cp
    rank order: [[v0 of rank 0, v0 of rank 1, ...], [v1 of rank 0, ...], ...]."""
    local = torch.tensor(values, dtype=torch.int64, device=state.device)  # [n]
    if state.cp_size == 1:
        return [[v] for v in values]
    parts = [torch.empty_like(local) for _ in range(state.cp_size)]
    with peer_errors("gathering per-rank statistics", state.cp_rank, state.cp_size):
        dist.all_gather(parts, local, group=state.cp_group)
    return torch.stack(parts).T.tolist()  # [n][cp]


def sum_over(values: list[float], state: ParallelState, *, group: str = "world") -> list[float]:
    """`values` summed over every rank of the job ("world") or of this rank's data-parallel
    group ("dp": the ranks that hold other sequences), in float64 (counts stay exact)."""
    local = torch.tensor(values, dtype=torch.float64, device=state.device)
    if state.is_distributed:
        target = None if group == "world" else state.dp_group
        if group not in ("world", "dp"):
            raise ValueError(f"group must be 'world' or 'dp', got {group!r}")
        dist.all_reduce(local, group=target)
    return local.tolist()


def any_rank(flag: bool, state: ParallelState) -> bool:
    """Whether `flag` is true on some rank of the job (every rank gets the same answer)."""
    return sum_over([float(flag)], state)[0] > 0


def raise_together(error: ValueError | None, state: ParallelState, *, what: str) -> None:
    """Raise on every cp rank when some rank has a user error (`error`, None where there is
    none): that rank raises its own, the others the lowest failing rank's message as a
    ValueError of the same class (a `longvita.errors` class, else ValueError), so no rank goes
    on to a collective that its failed peer will never join. A collective: every rank calls it
    at the same point."""
    if state.cp_size == 1:
        if error is not None:
            raise error
        return
    (failed,) = gather_ints([int(error is not None)], state)
    if not any(failed):
        return
    reports: list[tuple[str, str] | None] = [None] * state.cp_size
    mine = None if error is None else (type(error).__name__, str(error))  # always picklable
    with peer_errors(what, state.cp_rank, state.cp_size):
        dist.all_gather_object(reports, mine, group=state.cp_group)
    if error is not None:
        raise error
    first = failed.index(1)
    name, message = reports[first]
    raise _USER_ERRORS.get(name, ValueError)(f"{message} (cp rank {first}/{state.cp_size})")


_USER_ERRORS = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, ValueError)
}
"""The user errors of `longvita.errors` by name: a peer's is raised as its own class."""


def common_options(options: dict[str, int], state: ParallelState, *, what: str) -> dict[str, int]:
    """The entries of `options` that every cp rank offers (with this rank's values)."""
    if state.cp_size == 1:
        return dict(options)
    gathered: list[dict[str, int]] = [{} for _ in range(state.cp_size)]
    with peer_errors(what, state.cp_rank, state.cp_size):
        dist.all_gather_object(gathered, options, group=state.cp_group)
    return {key: value for key, value in options.items() if all(key in g for g in gathered)}
