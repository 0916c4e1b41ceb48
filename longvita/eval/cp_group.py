"""A context-parallel group of local processes that answers this process's generation requests.

The harness adapters (lmms-eval, VLMEvalKit) are model objects called inside the harness's own
process, so with `cp > 1` the ranks cannot be this process: a helper process runs
`parallel.launch` (which spawns the cp ranks, rank r on accelerator r, and stops them all when
one fails); every rank loads the checkpoint; cp rank 0 takes each `GenerationRequest` from a
queue, hands it to the other ranks the way `longvita serve --cp` does (`serve.worker`), and puts
the `GenerationOutput`, or the request's own error, on the answer queue. One request at a time;
between requests cp rank 0 sends heartbeats so that an idle group never reaches its collective
timeout. Generation only: the likelihood primitive runs in one process.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import weakref
from pathlib import Path

from longvita.infer.request import GenerationOutput, GenerationRequest
from longvita.parallel.launch import RankFailedError

logger = logging.getLogger(__name__)

GROUP_TIMEOUT_S = 24 * 3600.0
"""Collective timeout of the ranks: a long evaluation may leave them idle between requests."""


class ContextParallelGroup:
    """`cp` local ranks holding one model; `run(request)` is `Pipeline.run` split over them."""

    def __init__(
        self, model_dir: str | Path, *, cp: int, device: str = "cpu", dtype: str | None = None
    ) -> None:
        if cp < 2:
            raise ValueError(f"a context-parallel group needs cp >= 2, got {cp}")
        context = multiprocessing.get_context("spawn")
        self._requests = context.Queue()
        self._answers = context.Queue()
        self._helper = context.Process(  # not a daemon: it starts the ranks
            target=_run_group,
            args=(str(model_dir), cp, device, dtype, self._requests, self._answers),
            name="longvita-cp-group",
        )
        self._helper.start()
        self._closer = weakref.finalize(self, _shut_down, self._helper, self._requests)
        self._receive()  # "ready" once cp rank 0 has loaded the model, or the start-up error

    def run(self, request: GenerationRequest) -> GenerationOutput:
        """The request's output, from cp rank 0; its error (a missing file...) raised here."""
        self._requests.put(request)
        return self._receive()

    def close(self) -> None:
        """Stop the ranks (also done when the group is garbage-collected or at exit)."""
        self._closer()

    def _receive(self):
        while True:
            try:
                kind, value = self._answers.get(timeout=1.0)
            except queue.Empty:
                if not self._helper.is_alive():
                    raise RankFailedError(
                        f"the context-parallel group exited (code {self._helper.exitcode}) "
                        "without an answer; its error is on stderr above"
                    ) from None
                continue
            if kind == "error":
                raise value
            return value


def _shut_down(helper, requests) -> None:
    if helper.is_alive():
        requests.put(None)
        helper.join(timeout=60)
    if helper.is_alive():
        helper.terminate()
        helper.join()


def _run_group(model_dir: str, cp: int, device: str, dtype, requests, answers) -> None:
    """The helper process: the ranks, through `launch`; a failure becomes an answer."""
    from longvita.parallel.launch import launch

    try:
        launch(
            _serve_on_rank,
            cp=cp,
            args=(model_dir, dtype, requests, answers),
            device=device.split(":")[0],
            timeout_s=GROUP_TIMEOUT_S,
        )
    except BaseException as err:  # the parent is waiting for an answer: hand it the error
        answers.put(("error", _picklable(err)))


def _picklable(err: BaseException) -> BaseException:
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:  # an exception with unpicklable state: keep its message
        return RankFailedError(f"{type(err).__name__}: {err}")


def _serve_on_rank(state, model_dir: str, dtype, requests, answers) -> None:
    """Every rank: load; cp rank 0 takes the requests, the others follow it."""
    from longvita.infer.pipeline import load
    from longvita.parallel.collectives import broadcast_object
    from longvita.serve.worker import HEARTBEAT_S, USER_ERRORS, follow_requests

    pipe = load(model_dir, device=state.device, dtype=dtype)
    if state.cp_rank != 0:
        follow_requests(pipe, state)
        return
    answers.put(("ready", None))
    while True:
        try:
            request = requests.get(timeout=HEARTBEAT_S)
        except queue.Empty:
            broadcast_object("heartbeat", state, what="eval: heartbeat")
            continue
        broadcast_object(request, state, what="eval: sending a request")
        if request is None:
            return
        try:
            answers.put(("output", pipe.run(request, state=state)))
        except USER_ERRORS as err:  # every rank failed the same way and stays in step
            answers.put(("error", err))
