"""Distributed checkpoints of a training run: complete or absent, resumable bit for bit.

Owns writing and reading one checkpoint directory with torch.distributed.checkpoint (DCP):
the model and optimizer (sharded as FSDP2 holds them, or whole in one process), the LR
scheduler and the loop's counters (`TrainingState`), each rank's random number generators
and each data-parallel rank's data-loader position (`RankLocal`, one key per rank: the
context-parallel ranks of one data-parallel group hold the same loader state and DCP keeps
it once). The trainer (`train.checkpoint`) decides when and which.

A checkpoint is written into `NAME.partial/` and renamed to `NAME/` by global rank 0 once every
rank has finished writing (a barrier on each side), so a directory without the suffix is
always complete: a job killed while writing leaves a `.partial` directory that is never read.

Reading a checkpoint into a plain (unsharded) model in one process, for `longvita export`:
`load_model_weights`, which takes only the model's entries.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from longvita.errors import CheckpointError
from longvita.parallel.state import ParallelState

PARTIAL_SUFFIX = ".partial"
TRAINING_KEY = "app"
"""The checkpoint entry of `TrainingState` (model weights under `app.model.*`)."""


class TrainingState(Stateful):
    """Model, optimizer, LR scheduler and the loop's own counters, as one DCP entry."""

    def __init__(self, model: nn.Module, optimizer, scheduler, counters: dict[str, Any]):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.counters = counters
        """Plain data (step, skipped steps...): updated in place by a load."""

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optim": optim_state,
            "lr_sched": self.scheduler.state_dict(),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        self.scheduler.load_state_dict(state["lr_sched"])
        self.counters.update(state["counters"])


class RankLocal(Stateful):
    """State that differs between ranks (RNG, loader position), stored under its own key."""

    def __init__(self, key: str, get: Callable[[], Any], set_: Callable[[Any], None]) -> None:
        self.key, self.get, self.set_ = key, get, set_

    def state_dict(self) -> dict[str, Any]:
        return {self.key: io.BytesIO(pickle.dumps(self.get()))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        payload = state[self.key]
        payload.seek(0)
        # Written by this run's own ranks: full unpickling restores any plain state.
        self.set_(pickle.loads(payload.read()))


def rng_state() -> dict[str, Any]:
    """This process's random number generators (CPU and the accelerator's, if any)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.accelerator.is_available():
        module = torch.get_device_module(torch.accelerator.current_accelerator().type)
        state["accelerator"] = module.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "accelerator" in state and torch.accelerator.is_available():
        module = torch.get_device_module(torch.accelerator.current_accelerator().type)
        module.set_rng_state_all(state["accelerator"])


def checkpoint_states(training: TrainingState, state: ParallelState, loader) -> dict[str, Stateful]:
    """Everything a checkpoint holds: the training state, this rank's RNG and its dp rank's
    data-loader position (`loader.state_dict` / `load_state_dict`)."""
    return {
        TRAINING_KEY: training,
        "rng": RankLocal(f"rank{state.rank}", rng_state, set_rng_state),
        "data": RankLocal(f"dp{state.dp_rank}", loader.state_dict, loader.load_state_dict),
    }


def barrier(state: ParallelState) -> None:
    if state.is_distributed:
        dist.barrier()


def save(directory: Path, states: dict[str, Stateful], state: ParallelState) -> Path:
    """Write `states` as the complete checkpoint `directory` (via `directory.partial`)."""
    partial = directory.with_name(directory.name + PARTIAL_SUFFIX)
    if state.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # a leftover of a killed job
        partial.mkdir(parents=True)
    barrier(state)
    with _single_process_is_intended(state):
        dcp.save(states, checkpoint_id=str(partial), no_dist=not state.is_distributed)
    barrier(state)
    if state.is_main:
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    barrier(state)
    return directory


def load(directory: Path, states: dict[str, Stateful], state: ParallelState) -> None:
    """Read the complete checkpoint `directory` into `states`, in place."""
    with _single_process_is_intended(state):
        dcp.load(states, checkpoint_id=str(directory), no_dist=not state.is_distributed)


def load_model_weights(directory: Path, model: nn.Module) -> None:
    """Only the model's entries of a training checkpoint, into a plain module, in this process
    (no process group: `longvita export`). CheckpointError naming the weights the checkpoint
    lacks or holds in another shape (a model built from another config.json): a partial load
    would leave them as they were, uninitialised memory after `to_empty`."""
    wanted = {TRAINING_KEY: {"model": model.state_dict()}}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    check_stored_weights(directory, wanted[TRAINING_KEY]["model"], tied=tied)
    with _single_process_is_intended(None):
        dcp.load(
            wanted,
            checkpoint_id=str(directory),
            planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
            no_dist=True,
        )
    model.load_state_dict(wanted[TRAINING_KEY]["model"])


def checkpoint_damage(directory: Path) -> str | None:
    """What is wrong with the saved checkpoint `directory`, None when its .metadata reads and
    every byte range it lists is in its file (a shard deleted or cut short, a cut .metadata)."""
    try:
        metadata = _read_metadata(directory)
    except CheckpointError as err:
        return str(err)
    for info in (metadata.storage_data or {}).values():
        file = Path(directory, info.relative_path)
        if not file.is_file():
            return f"{info.relative_path} is missing"
        if file.stat().st_size < info.offset + info.length:
            return f"{info.relative_path} is cut short"
    return None


def check_stored_weights(
    directory: Path, weights: dict[str, torch.Tensor], *, tied: bool = False
) -> None:
    """CheckpointError unless the checkpoint `directory` holds every one of the model's
    `weights` in its shape (from the checkpoint's metadata, nothing else read); with `tied`
    embeddings the LM head may be absent (it is the embedding)."""
    try:
        stored = _read_metadata(directory).state_dict_metadata
    except CheckpointError as err:
        raise CheckpointError(f"{directory}: {err}") from None
    missing, other_shape = [], []
    for name, tensor in weights.items():
        entry = stored.get(f"{TRAINING_KEY}.model.{name}")
        if entry is None:
            if not (tied and name == "lm_head.weight"):
                missing.append(name)
        elif tuple(getattr(entry, "size", ())) != tuple(tensor.shape):
            other_shape.append(f"{name} {tuple(entry.size)} vs {tuple(tensor.shape)}")
    if missing or other_shape:
        raise CheckpointError(
            f"{directory} does not hold the weights of the model its run's config.json describes: "
            f"{len(missing)} missing {missing[:3]}, {len(other_shape)} of another shape "
            f"{other_shape[:3]}"
        )


def _read_metadata(directory: Path):
    """The checkpoint's DCP metadata; CheckpointError when its .metadata cannot be read."""
    try:
        return dcp.FileSystemReader(str(directory)).read_metadata()
    except Exception as err:  # pickle, OS and assertion errors of a cut or missing file
        raise CheckpointError(f"its .metadata cannot be read: {type(err).__name__}") from None


@contextlib.contextmanager
def _single_process_is_intended(state: ParallelState | None):
    """Silence DCP's warning that it assumes one process, when that is what we run."""
    with warnings.catch_warnings():
        if state is None or not state.is_distributed:
            warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load)")
        yield
