"""The prefix cache on disk: prompts' keys and values kept across runs, one file per rank.

Owns the files of `--prefix-cache DIR` / `longvita.load(..., prefix_cache_dir=DIR)`: writing a
`prefix_cache.CachedPrefix` (atomically: a hidden temporary file, then `os.replace`), finding
the files that share a prefix with a prompt (memory-mapped: a lookup reads the headers and the
token ids, a hit reads the keys/values it copies), refusing what is not ours, and the size
limit (whole prompts dropped, least recently used first, by file modification time: a hit
touches its file). A new file replaces the files of the prompts it covers (`PromptKey.covers`:
the previous question about the same video), so a directory keeps one copy of a video.

One safetensors file per prompt and rank, `<prompt digest>.cp<N>-rank<r>.safetensors`:
  keys, values  [layers, kv_heads, T, head_dim] in the KV cache's dtype (T: the rank's tokens)
  key_scales, value_scales  float32 [layers, kv_heads, T], only when that dtype is int8
  positions     [T] int64, the prompt positions of those tokens, ascending
  token_ids     [N] int64, media_ids [N] int64: the whole prompt's `PromptKey`
and in the header's metadata the format, the model's identity (`checkpoint_identity`), the
dtype, cp and cp_rank. A file of another model or dtype, or one that does not read (truncated,
not safetensors, wrong shapes) is ignored with a warning (once per file and process); a file
written at another `--cp` is not used, with a warning saying which `--cp` would use it. Files
are written a layer and head at a time, so writing holds no second copy of the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from longvita.infer.prefix_cache import CachedPrefix, PrefixMatch
from longvita.infer.prefix_key import PromptKey
from longvita.runtime import dtype_name

logger = logging.getLogger(__name__)

FORMAT = "longvita-prefix-cache-1"
DEFAULT_DISK_BYTES = 64 * 2**30
"""The default size limit of a prefix cache directory."""
FILE_NAME = re.compile(r"^(?P<id>[0-9a-f]{32})\.cp(?P<cp>\d+)-rank(?P<rank>\d+)\.safetensors$")
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int8: "I8",
}
TENSOR_NAMES = ("keys", "values", "positions", "token_ids", "media_ids")
SCALE_NAMES = ("key_scales", "value_scales")


def checkpoint_identity(directory: str | Path) -> str:
    """A digest of a checkpoint: its config.json bytes and the name, size and modification
    time of each weight file (cheap: the weights are not read). Rewritten or other weights
    give another identity."""
    directory = Path(directory)
    hasher = hashlib.sha256((directory / "config.json").read_bytes())
    for path in sorted(directory.glob("*.safetensors*")):
        stat = path.stat()
        hasher.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return hasher.hexdigest()[:32]


def file_name(entry_id: str, cp: int, cp_rank: int) -> str:
    return f"{entry_id}.cp{cp}-rank{cp_rank}.safetensors"


class DiskPrefixStore:
    """The prefix cache files of one model and dtype in `directory`, within `max_bytes`."""

    def __init__(
        self,
        directory: str | Path,
        *,
        max_bytes: int = DEFAULT_DISK_BYTES,
        model_identity: str,
        dtype: torch.dtype,
        kv_shape: tuple[int, int, int],
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"a prefix cache directory's limit must be >= 1 byte, got {max_bytes}")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"prefix cache {self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.model_identity = model_identity
        self.dtype = dtype
        """The KV cache's storage dtype (torch.int8: quantized, with scales)."""
        self.kv_shape = kv_shape
        self._tensor_names = TENSOR_NAMES + (SCALE_NAMES if dtype == torch.int8 else ())
        """(layers, kv_heads, head_dim) of the model's keys and values."""
        self._warned: set[tuple[str, int]] = set()

    def matches(self, key: PromptKey, *, cp: int, cp_rank: int) -> list[PrefixMatch]:
        """The files of this model, cp size and rank that share a prefix with `key`, mapped."""
        found, elsewhere = [], []
        for path, entry_cp, entry_rank in self._files():
            if (entry_cp, entry_rank) == (cp, cp_rank):
                entry = self.open(path)
                if entry is not None and (length := key.shared_prefix(entry.key)) > 0:
                    found.append(PrefixMatch(entry, length))
            elif entry_cp != cp and entry_rank == 0:
                elsewhere.append((path, entry_cp))
        self._warn_other_cp(key, cp, elsewhere, max((m.length for m in found), default=0))
        return found

    def write(self, entry: CachedPrefix) -> None:
        """Write `entry` (unless its file is already here), then keep within the size limit.
        A failure to write (a full disk, no permission) is a warning: the answer stands."""
        try:
            self._write(entry)
        except OSError as err:
            logger.warning("prefix cache: could not write to %s: %s", self.directory, err)

    def _write(self, entry: CachedPrefix) -> None:
        target = self.directory / file_name(entry.entry_id, entry.cp, entry.cp_rank)
        if target.exists() and self.open(target, quiet=True) is not None:
            self.touch(target)
            return
        tensors = {
            **entry.tensors(),
            "positions": entry.positions,
            "token_ids": entry.key.token_ids,
            "media_ids": entry.key.media_ids,
        }
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.max_bytes:
            logger.warning(
                "prefix cache: a prompt of %d tokens needs %d bytes, over the limit of %s (%d "
                "bytes): not written",
                entry.key.num_tokens,
                size,
                self.directory,
                self.max_bytes,
            )
            return
        metadata = {
            "format": FORMAT,
            "model": self.model_identity,
            "dtype": dtype_name(self.dtype),
            "cp": str(entry.cp),
            "cp_rank": str(entry.cp_rank),
        }
        staged = self.directory / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            write_safetensors(staged, tensors, metadata)
            os.replace(staged, target)
        finally:
            staged.unlink(missing_ok=True)
        logger.info("prefix cache: wrote %s (%d bytes)", target, size)
        self._drop_covered(entry)
        self._evict(keep=entry.entry_id)

    def touch(self, path: Path) -> None:
        """Mark a file as just used (its modification time orders the eviction)."""
        with contextlib.suppress(OSError):  # evicted meanwhile by another process
            os.utime(path)

    def open(self, path: Path, *, quiet: bool = False) -> CachedPrefix | None:
        """The entry of a file, memory-mapped; None (with a warning) if it is not ours."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                problem = self._foreign(metadata)
                if problem is None:
                    tensors = {name: handle.get_tensor(name) for name in self._tensor_names}
        except (OSError, SafetensorError, RuntimeError, ValueError) as err:
            problem = f"it does not read as a prefix cache file ({err})"
        if problem is None:
            problem = self._bad_shapes(tensors, metadata)
        if problem is not None:
            if not quiet:
                self._warn(path, problem)
            return None
        return CachedPrefix.of_cache(
            PromptKey(tensors["token_ids"], tensors["media_ids"]),
            tensors,
            positions=tensors["positions"],
            cp=int(metadata["cp"]),
            cp_rank=int(metadata["cp_rank"]),
            path=path,
        )

    def _files(self) -> Iterator[tuple[Path, int, int]]:
        """(path, cp, cp_rank) of each prefix cache file here (none, with a warning, when the
        directory cannot be listed)."""
        try:
            paths = sorted(self.directory.iterdir())
        except OSError as err:
            logger.warning("prefix cache: cannot list %s: %s", self.directory, err)
            return
        for path in paths:
            if match := FILE_NAME.match(path.name):
                yield path, int(match["cp"]), int(match["rank"])

    def _foreign(self, metadata: dict[str, str]) -> str | None:
        if metadata.get("format") != FORMAT:
            return f"it is not a prefix cache file of this version ({FORMAT})"
        if metadata.get("model") != self.model_identity:
            return "it was written by another model (config.json or weight files differ)"
        if metadata.get("dtype") != dtype_name(self.dtype):
            return f"it holds {metadata.get('dtype')} keys/values, this KV cache stores " + (
                dtype_name(self.dtype)
            )
        return None

    def _bad_shapes(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
        layers, kv_heads, head_dim = self.kv_shape
        held, num_tokens = tensors["positions"].numel(), tensors["token_ids"].numel()
        expected = {
            "keys": (layers, kv_heads, held, head_dim),
            "values": (layers, kv_heads, held, head_dim),
            "positions": (held,),
            "token_ids": (num_tokens,),
            "media_ids": (num_tokens,),
        }
        if self.dtype == torch.int8:
            expected.update({name: (layers, kv_heads, held) for name in SCALE_NAMES})
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                return f"its {name} are {tuple(tensors[name].shape)}, expected {shape}"
        if tensors["keys"].dtype != self.dtype or tensors["values"].dtype != self.dtype:
            return f"its keys/values are {tensors['keys'].dtype}, expected {self.dtype}"
        if any(tensors[name].dtype != torch.float32 for name in SCALE_NAMES if name in tensors):
            return "its key/value scales are not float32"
        positions = tensors["positions"]
        ascending = not bool((positions[1:] <= positions[:-1]).any())
        if held and not (ascending and int(positions[0]) >= 0 and int(positions[-1]) < num_tokens):
            return "its positions are not ascending prompt positions"
        if not metadata.get("cp", "").isdigit() or not metadata.get("cp_rank", "").isdigit():
            return "its header has no cp / cp_rank"
        return None

    def _warn(self, path: Path, problem: str) -> None:
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = 0
        if (str(path), mtime) in self._warned:
            return
        self._warned.add((str(path), mtime))
        logger.warning("prefix cache: ignoring %s: %s", path, problem)

    def _warn_other_cp(
        self, key: PromptKey, cp: int, elsewhere: list[tuple[Path, int]], best: int
    ) -> None:
        """Warn when a file written at another cp size holds more of this prompt (the one
        that holds the most)."""
        longest = (best, None, 0)
        for path, entry_cp in elsewhere:
            entry = self.open(path, quiet=True)
            if entry is not None and (length := key.shared_prefix(entry.key)) > longest[0]:
                longest = (length, path, entry_cp)
        length, path, entry_cp = longest
        if path is not None:
            self._warn(
                path,
                f"it holds the first {length} tokens of this prompt but was written at "
                f"--cp {entry_cp}; this run uses --cp {cp}, so the prompt is prefilled in "
                f"full (run at --cp {entry_cp} to reuse it)",
            )

    def _drop_covered(self, entry: CachedPrefix) -> None:
        """Delete the prompts `entry` covers (`PromptKey.covers`), every rank's file."""
        for path, cp, cp_rank in list(self._files()):
            if (cp, cp_rank) != (entry.cp, entry.cp_rank) or path.name.startswith(entry.entry_id):
                continue
            held = self.open(path, quiet=True)
            if held is not None and entry.key.covers(held.key):
                self._delete(held.entry_id)

    def _delete(self, entry_id: str) -> None:
        for path in self.directory.glob(f"{entry_id}.cp*-rank*.safetensors"):
            path.unlink(missing_ok=True)

    def _evict(self, *, keep: str) -> None:
        """Delete whole prompts (every rank's file), least recently used first, until the
        directory's prefix cache files fit `max_bytes`; never the prompt `keep`."""
        groups: dict[str, list[tuple[Path, os.stat_result]]] = {}
        for path, _, _ in self._files():
            try:
                groups.setdefault(path.name[:32], []).append((path, path.stat()))
            except OSError:
                continue  # deleted meanwhile
        total = sum(stat.st_size for files in groups.values() for _, stat in files)
        by_age = sorted(groups, key=lambda g: max(stat.st_mtime_ns for _, stat in groups[g]))
        for entry_id in by_age:
            if total <= self.max_bytes:
                break
            if entry_id == keep:
                continue
            for path, stat in groups[entry_id]:
                path.unlink(missing_ok=True)
                total -= stat.st_size
            logger.info("prefix cache: evicted %s from %s", entry_id, self.directory)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """Write `tensors` (any device, views allowed) as a safetensors file, a [.., rows, cols]
    slice at a time: no contiguous copy of a whole tensor is made."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in tensors.values():
            for piece in _pieces(tensor):
                f.write(piece.detach().cpu().contiguous().view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())


def _pieces(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensor's last two dimensions, one [rows, cols] slice at a time, in memory order."""
    if tensor.dim() <= 2:
        yield tensor.reshape(-1)
        return
    for index in range(tensor.shape[0]):
        yield from _pieces(tensor[index])
