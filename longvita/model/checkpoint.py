"""Checkpoint weights: the official `Long-VITA-*_HF` safetensors layout, loaded and saved.

Owns reading one `model.safetensors` or shards listed by `model.safetensors.index.json`,
checking the keys and shapes against the model (errors list what is missing or unexpected), and
writing the same layout back (a checkpoint directory is replaced as a whole, never mixed
with an older one). Loading builds the model on the meta device and assigns each
tensor as it is read and converted, so the weights are never held twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from longvita.config import LongVITAConfig
from longvita.errors import CheckpointError
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.runtime import dtype_name

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


RECOMPUTED_SUFFIX = ".rotary_emb.inv_freq"
"""A buffer older transformers exports stored with the weights (as transformers does, it is
skipped: the rotary frequencies come from the config's rope_theta)."""


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
    recomputed = 0
    for key, tensor in iter_tensors(files):
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue  # tied: the embedding matrix is the head
        if key.endswith(RECOMPUTED_SUFFIX) and key not in expected:
            recomputed += 1
            continue
        state[key] = tensor.to(device=device, dtype=dtype)
        del tensor
    if recomputed:
        logger.info("skipped %d stored *%s buffer(s): computed from rope_theta", recomputed,
                    RECOMPUTED_SUFFIX)  # fmt: skip
    check_keys(expected, {k: v.shape for k, v in state.items()})
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()
    logger.info("loaded %d tensors from %d file(s) in %s", len(state), len(files), directory)
    return model.eval()


def save_model(
    model: LongVITAForCausalLM,
    directory: str | Path,
    *,
    max_shard_bytes: int | None = None,
    write_extra: Callable[[Path], object] | None = None,
) -> list[Path]:
    """Write config.json and the weights (one file, or shards + index past max_shard_bytes,
    default 5 GiB) as the checkpoint at `directory`, replacing any checkpoint there as a whole.

    Everything is written into a fresh directory beside `directory` (same parent, hence the same
    file system) and swapped in by renames, so a reader sees the old checkpoint or the new one,
    never a mix, and stale shards or index of an earlier, larger checkpoint cannot survive.
    `write_extra(staged_dir)` may add files (the tokenizer) before the swap. Files of the old
    directory that are neither weights nor written anew (tokenizer files, a README) are carried
    over. What is written is readable by all, as the umask allows (like any file). Returns the
    weight files.
    """
    max_shard_bytes = DEFAULT_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    target = Path(os.path.realpath(directory))
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory: cannot save there")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        names = _write_weights(model, staged, max_shard_bytes)
        if write_extra is not None:
            write_extra(staged)
        _make_readable(staged)
        _swap_in(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return [target / name for name in names]


def _write_weights(model: LongVITAForCausalLM, directory: Path, max_bytes: int) -> list[str]:
    """config.json and the safetensors files into `directory`; returns the weight file names."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config
    dtypes = {v.dtype for v in state.values()}
    if len(dtypes) == 1:  # record the dtype actually written
        config = dataclasses.replace(config, torch_dtype=dtype_name(dtypes.pop()))
    config.save_pretrained(directory)
    shards = _plan_shards(state, max_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(state, str(directory / SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        save_file({k: state[k] for k in keys}, str(directory / name), metadata=metadata)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _is_weight_file(path: Path) -> bool:
    return path.name.endswith(".safetensors") or path.name == INDEX_FILE


def _make_readable(directory: Path) -> None:
    """The permissions of an ordinary new directory and files (mkdtemp makes 0700 and
    safetensors 0600): read for all, as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_in(staged: Path, target: Path) -> None:
    """Make `staged` the directory at `target`: the old one's files that are neither weights
    nor in `staged` are moved over first; the old directory is then renamed away, `staged`
    renamed in and the old one deleted. Between the two renames `target` does not exist (a
    reader fails loudly, never reads a mix); a crash there leaves both beside it."""
    if not target.exists():
        staged.rename(target)
        return
    for path in target.iterdir():
        if not _is_weight_file(path) and not (staged / path.name).exists():
            path.rename(staged / path.name)
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("replaced the checkpoint in %s", target)


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


def read_weights(
    directory: str | Path,
    expected: dict[str, torch.Size],
    *,
    prefix: str = "",
    ignore: Callable[[str], bool] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The safetensors weights of `directory` (one file or shards), checked and keyed for us.

    `expected` maps the keys as the files spell them to their shapes; every one must be there
    with its shape, and a key not in it is an error unless `ignore(key)` is true (then it is
    skipped and logged). Floating-point tensors are cast to `dtype`, all moved to `device`.
    Returns the tensors with `prefix` put before each key (e.g. "model.vision_model." for a
    bare InternViT checkpoint). Problems raise CheckpointError naming the directory and the
    keys; a directory with only PyTorch pickles (pytorch_model.bin) is refused by name.
    """
    directory = Path(directory)
    has_safetensors = (directory / SINGLE_FILE).is_file() or (directory / INDEX_FILE).is_file()
    pickles = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
    if not has_safetensors and pickles:
        raise CheckpointError(
            f"{directory} holds only PyTorch pickle weights ({', '.join(pickles)}); only "
            f"safetensors are read: convert them to {SINGLE_FILE} first"
        )
    state: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, tensor in iter_tensors(weight_files(directory)):
        if key not in expected and ignore is not None and ignore(key):
            skipped.append(key)
            continue
        cast = dtype if tensor.is_floating_point() else tensor.dtype
        state[key] = tensor.to(device=device, dtype=cast)
        del tensor
    try:
        check_keys(expected, {k: v.shape for k, v in state.items()})
    except CheckpointError as err:
        raise CheckpointError(f"{directory}: {err}") from None
    if skipped:
        logger.info("%s: skipped %s", directory, _key_report("ignored", set(skipped)))
    return {prefix + key: tensor for key, tensor in state.items()}
