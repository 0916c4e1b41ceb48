"""`longvita export`: a training checkpoint as an official `Long-VITA-*_HF` directory.

Owns finding the checkpoint a path names (a run directory: its latest complete checkpoint; a
`checkpoints/step-N` directory: that one), rebuilding the model from the run's own
config.json, reading only the model's weights out of the distributed checkpoint in this one
process (`parallel.dcp.load_model_weights`, no process group) and writing config.json,
safetensors and the tokenizer with `Pipeline.save` (atomic, the layout `longvita.load` and the
official code read).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from longvita.config import LongVITAConfig
from longvita.infer.pipeline import Pipeline
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.parallel.dcp import checkpoint_damage, load_model_weights
from longvita.processing.processor import Processor
from longvita.processing.tokens import load_tokenizer
from longvita.runtime import dtype_name, resolve_dtype
from longvita.train.run_dir import CHECKPOINTS, RunDirectory

logger = logging.getLogger(__name__)

READ_ATTEMPTS = 3
"""Checkpoints tried when the one being read is deleted by the running job."""


def find_checkpoint(path: str | Path) -> tuple[RunDirectory, Path]:
    """(run, checkpoint directory) of a run directory or one of its `checkpoints/step-N`."""
    path = Path(path)
    if path.parent.name == CHECKPOINTS and path.name.startswith("step-"):
        run = RunDirectory(path.parent.parent)
        if not path.exists() and not path.name.endswith(".partial"):
            steps = sorted(p.name for p in path.parent.glob("step-*") if "." not in p.name)
            raise ValueError(f"{path} does not exist; the run's checkpoints: {steps or 'none'}")
        if path.name.endswith(".partial") or not (path / ".metadata").is_file():
            raise ValueError(f"{path} is not a complete checkpoint (a run stopped while writing)")
        if (damage := checkpoint_damage(path)) is not None:
            raise ValueError(f"{path} is damaged: {damage}")
        return run, path
    if not path.is_dir():
        raise ValueError(f"{path} is neither a run directory nor a checkpoint directory")
    run = RunDirectory(path)
    latest = run.latest_checkpoint()
    if latest is None:
        raise ValueError(f"{path} has no complete checkpoint under {CHECKPOINTS}/")
    return run, latest


def load_checkpoint_model(path: str | Path) -> tuple[LongVITAForCausalLM, object, Path]:
    """(model, tokenizer, checkpoint) of a run directory or one of its checkpoints: the model
    rebuilt from the run's config.json with only its weights read (as trained, on the CPU).

    A run still training deletes all but its latest checkpoints (`checkpoint.keep_latest`):
    one deleted while being read is replaced by the newest of a run directory (a few times),
    and named when it was asked for by its path."""
    run, checkpoint = find_checkpoint(path)
    if not (run.model_dir / "config.json").is_file():
        raise ValueError(f"{run.path} has no {run.model_dir.name}/config.json: not a run directory")
    config = LongVITAConfig.from_pretrained(run.model_dir)
    with torch.device("meta"):
        model = LongVITAForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            load_model_weights(checkpoint, model)  # every weight, or it raises
            break
        except Exception:
            if checkpoint.is_dir():
                raise  # not a deletion: the error says what is wrong
            if Path(path).resolve() == checkpoint.resolve() or attempt == READ_ATTEMPTS:
                raise ValueError(
                    f"{checkpoint} was deleted while being read (the run is still training "
                    "and keeps only its latest checkpoints): export the run directory"
                ) from None
            logger.info("%s was deleted while being read: taking the newest", checkpoint)
            run, checkpoint = find_checkpoint(path)
    return model, load_tokenizer(run.model_dir), checkpoint


def export_checkpoint(
    path: str | Path, out: str | Path, *, dtype: str | torch.dtype | None = None
) -> Path:
    """Write the model of a training checkpoint to `out` in the official layout; returns out.

    dtype: of the written weights (default: as trained).
    """
    model, tokenizer, checkpoint = load_checkpoint_model(path)
    if dtype is not None:
        model.to(resolve_dtype(dtype, torch.device("cpu")))
    Pipeline(model.eval(), Processor(tokenizer, model.config.vision)).save(out)
    weights_dtype = dtype_name(next(model.parameters()).dtype)
    logger.info("exported %s (%s) to %s", checkpoint, weights_dtype, out)
    return Path(out)
