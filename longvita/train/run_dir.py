"""A training run's directory: what is in it, which checkpoint to resume from, what to keep.

    RUN_DIR/
      run.json                 the stage as run (resolved), the world (dp x cp), versions
      model/                   config.json and tokenizer files: with a checkpoint's weights,
                               everything `longvita export` needs
      checkpoints/step-N/      complete DCP checkpoints (`parallel.dcp`); `step-N.partial/` are
                               incomplete ones, never read
      metrics.jsonl            one JSON object per optimizer step
      loss.png, tensorboard/   written by `train.metrics`
      .lock                    held by the job using the directory (its pid inside)

Owns the layout, the manifest, finding the latest complete and intact checkpoint, deleting all
but the latest `keep_latest`, and refusing to resume a run with a stage or world that does not match
(naming the keys that differ). File writes happen on global rank 0 only; the caller passes
whether it is that rank. No process group: checkpoints are only looked at (`parallel.dcp`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longvita.train.config import StageConfig

logger = logging.getLogger(__name__)

MANIFEST = "run.json"
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
LOCK = ".lock"
_STEP_DIR = re.compile(r"^step-(\d+)$")
RESUMABLE_CHANGES = ("checkpoint", "log", "description", "source", "schedule.steps")
"""Stage keys that may change between the run that wrote a checkpoint and the one resuming it."""


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (another stage, another world)."""


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} exists and is not a directory")

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    def check_usable(self) -> None:
        """RunDirError for an existing directory that is neither empty nor a run directory:
        a run would mix its files with the user's."""
        if self.path.is_dir() and self.manifest() is None:
            others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
            if others:
                raise RunDirError(
                    f"--out {self.path} is not empty and not a run directory (no {MANIFEST}; "
                    f"it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}): "
                    "give a new or empty directory"
                )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold RUN_DIR/.lock while in the block (the system releases it when the process
        ends, however it ends); RunDirError naming the holder when another job holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK, "a+")  # noqa: SIM115 (closed when the block ends)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise RunDirError(
                f"{self.path} is in use by another longvita train (pid {holder}): wait for it "
                "to end, or use another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.close()

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete checkpoint, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for entry in self.checkpoints.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir() and (entry / ".metadata").is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint that is intact (`parallel.dcp.checkpoint_damage`);
        a damaged newer one is skipped with a warning, so the run resumes from the one before."""
        from longvita.parallel.dcp import checkpoint_damage

        for _, directory in reversed(self.complete_checkpoints()):
            damage = checkpoint_damage(directory)
            if damage is None:
                return directory
            logger.warning("%s is damaged (%s): skipped, an older one is used", directory, damage)
        return None

    def manifest(self) -> dict[str, Any] | None:
        path = self.path / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunDirError(f"{path} is not valid JSON: {err}") from None

    def create(self, stage: StageConfig, world: dict[str, int]) -> None:
        """Write the manifest of a new run (global rank 0)."""
        from longvita import __version__

        self.path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "stage": stage.to_dict(),
            "world": world,
            "longvita": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    def check_resumable(self, stage: StageConfig, world: dict[str, int]) -> None:
        """RunDirError naming what differs when `stage` and `world` cannot resume this run."""
        manifest = self.manifest()
        if manifest is None:
            raise RunDirError(
                f"{self.path} holds checkpoints but no {MANIFEST}: not a longvita run directory"
            )
        if manifest["world"] != world:
            raise RunDirError(
                f"{self.path} was run with {manifest['world']} and this job is {world}: resume "
                "with the same number of processes and --set parallel.cp (or use a new --out)"
            )
        before = _flatten(manifest["stage"])
        now = _flatten(stage.to_dict())
        changed = sorted(
            key
            for key in set(before) | set(now)
            if before.get(key) != now.get(key)
            and not any(key == c or key.startswith(c + ".") for c in RESUMABLE_CHANGES)
        )
        if changed:
            details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
            raise RunDirError(
                f"{self.path} resumes only the stage it started with; changed: {details} "
                "(use a new --out for a new stage)"
            )

    def keep_latest(self, count: int) -> list[Path]:
        """Delete all but the latest `count` complete checkpoints and any partial one older than
        the latest; returns what was deleted (global rank 0)."""
        complete = self.complete_checkpoints()
        doomed = [path for _, path in complete[:-count]] if len(complete) > count else []
        latest = complete[-1][0] if complete else None
        for entry in self.checkpoints.glob("step-*.partial"):
            match = _STEP_DIR.match(entry.name.removesuffix(".partial"))
            if match and latest is not None and int(match.group(1)) <= latest:
                doomed.append(entry)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        return doomed


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "init":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
