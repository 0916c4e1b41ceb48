"""Checkpoint weights: the official `Long-VITA-*_HF` safetensors layout, loaded and saved.

Owns reading one `model.safetensors` or shards listed by `model.safetensors.index.json`,
checking the keys and shapes against the model (errors list what is missing or unexpected), and
writing the same layout back. Loading builds the model on the meta device and assigns each
tensor as it is read and converted, so the weights are never held twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from longvita.config import LongVITAConfig
from longvita.errors import CheckpointError
from longvita.model.long_vita import LongVITAForCausalLM

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3
_LISTED = 20  # keys named in an error message before "... and N more"


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are not in {directory}: {missing}")
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def iter_tensors(files: list[Path], device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=device) as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, handle.get_tensor(key)
        except (OSError, RuntimeError, SafetensorError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err


def _key_report(kind: str, keys: set[str]) -> str:
    names = sorted(keys)
    listed = ", ".join(names[:_LISTED])
    more = f" ... and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f"{len(names)} {kind} key(s): {listed}{more}"


def check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Size]) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    problems = []
    if missing := set(expected) - set(found):
        problems.append(_key_report("missing", missing))
    if unexpected := set(found) - set(expected):
        problems.append(_key_report("unexpected", unexpected))
    wrong = [
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(wrong[:_LISTED]))
    if problems:
        raise CheckpointError("checkpoint does not match config.json: " + " | ".join(problems))


def expected_shapes(model: LongVITAForCausalLM) -> dict[str, torch.Size]:
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def load_model(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: LongVITAConfig | None = None,
) -> LongVITAForCausalLM:
    """Build the model of `directory` on the meta device and fill it from its safetensors."""
    config = config or LongVITAConfig.from_pretrained(directory)
    files = weight_files(directory)
    with torch.device("meta"):
        model = LongVITAForCausalLM(config)
    expected = expected_shapes(model)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in iter_tensors(files):
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue  # tied: the embedding matrix is the head
        state[key] = tensor.to(device=device, dtype=dtype)
        del tensor
    check_keys(expected, {k: v.shape for k, v in state.items()})
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()
    logger.info("loaded %d tensors from %d file(s) in %s", len(state), len(files), directory)
    return model.eval()


def save_model(
    model: LongVITAForCausalLM,
    directory: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write config.json and the weights (one file, or shards + index past max_shard_bytes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config
    dtypes = {v.dtype for v in state.values()}
    if len(dtypes) == 1:  # record the dtype actually written
        config = dataclasses.replace(config, torch_dtype=str(dtypes.pop()).removeprefix("torch."))
    config.save_pretrained(directory)
    shards = _plan_shards(state, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        path = directory / SINGLE_FILE
        save_file(state, str(path), metadata=metadata)
        return [path]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        save_file({k: state[k] for k in keys}, str(directory / name), metadata=metadata)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [directory / n for n in names]


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy, in key order: a shard closes when the next tensor would pass max_bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards
