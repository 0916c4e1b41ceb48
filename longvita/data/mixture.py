"""Mixtures: the official mixture YAML, the samples it selects, and their order per epoch.

    dataset:
      LLaVA-ReCap:
        ratio: 1.0          # fraction of each file; > 1 repeats; 0 disables the group
        num: 300000         # optional cap, per file (as the official code applies it)
        data_paths:
          - datasets/jsonl/lmms-lab/LLaVA-ReCap-558K/data.jsonl

Semantics, per data file of an active group (the official `dataset_base.load_data`):
`used = min(int(len(file) * ratio), num)`; the file's records are permuted with a seed derived
from the mixture seed and the file's group and path, and record `perm[k % len(file)]` is taken
for k < used, so ratio 2 takes every record twice and ratio 0.5 a seeded half. The selection
is fixed for the run; the selected entries (the "plan") are then shuffled again each epoch with
(seed, epoch). Relative data paths are resolved against `data_root`: by default the mixture
file's directory when it is read from a file (`Mixture.from_yaml`, hence `longvita train` and
`longvita data inspect`: `data_root_of`), the current directory for a `MixtureConfig` built in
code. Groups with ratio 0 or num 0 are skipped unread.

Owns the plan and its order, and the split of an epoch's order over data-parallel ranks and
loader workers. Knows nothing of tokens or packing; never imports torch.distributed.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from longvita.data.samples import SampleFile

logger = logging.getLogger(__name__)

GROUP_KEYS = ("ratio", "num", "data_paths")
MAX_SEED = 2**63 - 1
"""The largest seed (torch's and numpy's generators both take 0..2**63 - 1)."""
MAX_SELECTED = 2**40
"""The most samples a mixture may select from one file (ratio x records): more is a typo."""


@dataclass(frozen=True, kw_only=True)
class MixtureGroup:
    """One group of the mixture YAML."""

    name: str
    """The group's key under `dataset`."""
    ratio: float = 1.0
    """Fraction of each file to use; above 1 repeats records; 0 disables the group."""
    num: int | None = None
    """Cap on the records used from each file; None = no cap; 0 disables the group."""
    data_paths: tuple[str, ...] = ()
    """JSONL / JSON-list files, as written in the YAML."""

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float):
            raise ValueError(f"group {self.name!r}: ratio must be a number, got {self.ratio!r}")
        if not (self.ratio >= 0 and math.isfinite(self.ratio)):
            raise ValueError(
                f"group {self.name!r}: ratio must be a finite number >= 0, got {self.ratio}"
            )
        if self.num is not None and (
            isinstance(self.num, bool) or not isinstance(self.num, int) or self.num < 0
        ):
            raise ValueError(f"group {self.name!r}: num must be an integer >= 0, got {self.num!r}")
        if self.active and not self.data_paths:
            raise ValueError(f"group {self.name!r} is active (ratio {self.ratio}) but has no paths")
        bad = [p for p in self.data_paths if not isinstance(p, str) or not p]
        if bad:
            raise ValueError(f"group {self.name!r}: data_paths must be strings, got {bad!r}")

    @property
    def active(self) -> bool:
        return self.ratio > 0 and self.num != 0

    def num_used(self, num_records: int) -> int:
        """Records taken from a file of num_records records."""
        used = int(num_records * self.ratio)
        return used if self.num is None else min(used, self.num)


@dataclass(frozen=True, kw_only=True)
class MixtureConfig:
    """The groups of a mixture YAML, in file order."""

    groups: tuple[MixtureGroup, ...]
    """At least one group."""

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a mixture needs at least one group under 'dataset'")

    @classmethod
    def from_dict(cls, data: object, *, source: str = "mixture") -> MixtureConfig:
        """From the parsed YAML: a mapping with a `dataset` mapping of groups."""
        if not isinstance(data, Mapping) or not isinstance(data.get("dataset"), Mapping):
            stage_mixture = data.get("data") if isinstance(data, Mapping) else None
            if isinstance(stage_mixture, Mapping) and "mixture" in stage_mixture:
                raise ValueError(
                    f"{source} is a stage file, not a mixture: give its data.mixture "
                    f"({stage_mixture['mixture']!r})"
                )
            raise ValueError(f"{source}: expected a mapping with a 'dataset' mapping of groups")
        ignored = sorted(k for k in data if k != "dataset")
        if ignored:
            logger.info("%s: ignoring top-level keys %s", source, ignored)
        groups = []
        for name, body in data["dataset"].items():
            if not isinstance(body, Mapping):
                raise ValueError(f"{source}: group {name!r} must be a mapping, got {body!r}")
            unknown = sorted(set(body) - set(GROUP_KEYS))
            if unknown:
                logger.warning("%s: group %r: ignoring keys %s", source, name, unknown)
            paths = body.get("data_paths") or []
            if isinstance(paths, str) or not isinstance(paths, list):
                raise ValueError(f"{source}: group {name!r}: data_paths must be a list")
            try:
                group = MixtureGroup(
                    name=str(name),
                    ratio=_number(body.get("ratio", 1.0)),
                    num=body.get("num"),
                    data_paths=tuple(p.strip() if isinstance(p, str) else p for p in paths),
                )
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from None
            groups.append(group)
        return cls(groups=tuple(groups))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MixtureConfig:
        path = Path(path)
        if path.is_dir():
            raise ValueError(
                f"mixture file {str(path)!r} is a directory; expected a mixture YAML file "
                "(dataset: {group: {ratio, data_paths}})"
            )
        if not path.is_file():
            raise ValueError(f"mixture file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"mixture file {str(path)!r} is not valid YAML: {err}") from err
        return cls.from_dict(data, source=str(path))


@dataclass(frozen=True)
class MixtureFile:
    """One data file of the mixture and what it contributes."""

    group: str
    path_as_written: str
    file: SampleFile
    num_used: int


class Mixture:
    """The selected samples of a mixture (the plan) and their seeded order per epoch.

    Plan entries are global record ids: record r of file f has id `file_offsets[f] + r`.
    """

    def __init__(
        self,
        config: MixtureConfig,
        *,
        data_root: str | os.PathLike | None = None,
        seed: int = 0,
        allow_missing_files: bool = False,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"the mixture seed must be an integer in [0, 2**63), got {seed!r}")
        self.config = config
        self.seed = seed
        self.files = _index_files(config, Path(data_root or os.getcwd()), allow_missing_files)
        if not self.files:
            raise ValueError("the mixture selects no data file (every group inactive or missing)")
        sizes = np.array([len(f.file) for f in self.files], dtype=np.int64)
        self.file_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.plan = np.concatenate([self._select(i) for i in range(len(self.files))])  # [N]
        if len(self.plan) == 0:
            taken = "; ".join(
                f"{f.group}: {f.file.path} ({len(f.file)} records, {f.num_used} taken)"
                for f in self.files[:5]
            )
            raise ValueError(
                "the mixture selects no sample (ratio x records rounds down to 0, or the files "
                f"are empty): {taken}"
            )
        logger.info("mixture: %d samples selected from %d files", len(self.plan), len(sizes))

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike, *, data_root: str | os.PathLike | None = None, **kwargs
    ) -> Mixture:
        """The mixture of a YAML file, its relative data paths from `data_root_of`."""
        return cls(MixtureConfig.from_yaml(path), data_root=data_root_of(path, data_root), **kwargs)

    def __len__(self) -> int:
        return self.plan.shape[0]

    def _select(self, i: int) -> np.ndarray:
        entry = self.files[i]
        num_records = len(entry.file)
        if num_records == 0 or entry.num_used == 0:
            return np.zeros(0, dtype=np.int64)
        key = zlib.crc32(f"{entry.group}\0{entry.path_as_written}".encode())
        perm = np.random.default_rng([self.seed, key]).permutation(num_records)
        picked = perm[np.arange(entry.num_used) % num_records]  # [num_used]
        return picked.astype(np.int64) + self.file_offsets[i]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[N] plan entries (global record ids) in the order of `epoch`."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self.plan[np.random.default_rng([self.seed, epoch, 1]).permutation(len(self))]

    def locate(self, record_id: int) -> tuple[int, int]:
        """(file index, record index in that file) of a global record id."""
        file_index = int(np.searchsorted(self.file_offsets, record_id, side="right")) - 1
        return file_index, int(record_id - self.file_offsets[file_index])

    def group_summary(self) -> dict[str, dict[str, int]]:
        """Per group: files, records in them, and samples selected."""
        out: dict[str, dict[str, int]] = {}
        for entry in self.files:
            row = out.setdefault(entry.group, {"files": 0, "records": 0, "selected": 0})
            row["files"] += 1
            row["records"] += len(entry.file)
            row["selected"] += entry.num_used
        return out


def data_root_of(mixture_path: str | os.PathLike, data_root: str | os.PathLike | None) -> Path:
    """Where a mixture file's relative data paths are resolved: `data_root` when given, else
    the mixture file's directory (the rule of `longvita train` and `longvita data inspect`)."""
    return Path(data_root) if data_root is not None else Path(mixture_path).parent


def check_data_files(config: MixtureConfig, root: str | os.PathLike) -> None:
    """ValueError naming the active groups' data paths that are missing or directories, as
    `Mixture` would raise it, without reading the files (a launcher's check)."""
    _resolve_paths(config, Path(root), allow_missing=False)


def shard(order: np.ndarray, *, dp_rank: int, dp_size: int, worker: int, num_workers: int):
    """The part of an epoch's order that one loader worker of one data-parallel rank reads.

    Rank r takes order[r::dp_size]; its worker w takes every num_workers-th of those:
    order[r + dp_size * w :: dp_size * num_workers]. Disjoint, and together complete.
    """
    if not (0 <= dp_rank < dp_size and 0 <= worker < num_workers):
        raise ValueError(
            f"need 0 <= dp_rank < dp_size and 0 <= worker < num_workers, got {dp_rank=}, "
            f"{dp_size=}, {worker=}, {num_workers=}"
        )
    return order[dp_rank + dp_size * worker :: dp_size * num_workers]


def _index_files(config: MixtureConfig, root: Path, allow_missing: bool) -> list[MixtureFile]:
    """Index the files of the active groups (`_resolve_paths`)."""
    files = []
    for group, written, path in _resolve_paths(config, root, allow_missing):
        sample_file = SampleFile.index(path)
        num_used = group.num_used(len(sample_file))
        if num_used > MAX_SELECTED:
            raise ValueError(
                f"group {group.name!r}: ratio {group.ratio} takes {num_used:,} samples from "
                f"{path} ({len(sample_file):,} records), more than {MAX_SELECTED:,}"
            )
        logger.info(
            "group %r: %s: %d records, %d used", group.name, path, len(sample_file), num_used
        )
        if num_used == 0 and len(sample_file) > 0:
            logger.warning(
                "group %r: %s: ratio %s of its %d records rounds to none: it is not used "
                "(raise the ratio to take some)",
                group.name,
                path,
                group.ratio,
                len(sample_file),
            )
        files.append(MixtureFile(group.name, written, sample_file, num_used))
    return files


def _resolve_paths(
    config: MixtureConfig, root: Path, allow_missing: bool
) -> list[tuple[MixtureGroup, str, Path]]:
    """(group, path as written, path) of the active groups' files. A directory is always an
    error; a missing file is one unless `allow_missing` (then a warning, and it is left out)."""
    found, missing, directories = [], [], []
    for group in config.groups:
        if not group.active:
            logger.info("group %r: inactive (ratio %s, num %s)", group.name, group.ratio, group.num)
            continue
        for written in group.data_paths:
            path = root / os.path.expanduser(written)
            if path.is_dir():
                directories.append(f"{group.name}: {path}")
            elif not path.is_file():
                missing.append(f"{group.name}: {path}")
            else:
                found.append((group, written, path))
    if directories:
        raise ValueError(
            f"{len(directories)} data path(s) are directories; data_paths lists JSONL or "
            f"JSON-list files: {_first_five(directories)}"
        )
    if missing and not allow_missing:
        raise ValueError(
            f"{len(missing)} data file(s) not found (relative paths are resolved against "
            f"{str(root)!r}): {_first_five(missing)}"
        )
    for entry in missing:
        logger.warning("data file not found, skipped: %s", entry)
    _warn_repeated(found)
    return found


def _warn_repeated(found: list[tuple[MixtureGroup, str, Path]]) -> None:
    """A file listed more than once in one group is sampled once per listing, and listings
    written the same way take the same records (the sample is seeded by group and path as
    written): say so, as a user who repeats a file may have meant something else."""
    listed: dict[tuple[str, Path], list[str]] = {}
    for group, written, path in found:
        listed.setdefault((group.name, path.resolve()), []).append(written)
    for (group_name, path), writings in listed.items():
        if len(writings) > 1:
            logger.warning(
                "group %r lists %s %d times (%s): each listing takes its records again, the "
                "same ones where written the same way; list it once and raise the ratio to "
                "repeat it",
                group_name,
                path,
                len(writings),
                ", ".join(map(repr, writings)),
            )


def _number(value: object) -> object:
    """A number written as YAML 1.1 reads it as a string (`1e-1`, `.5e1`) as a float; anything
    else as it is (MixtureGroup says what is wrong with it)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _first_five(entries: list[str]) -> str:
    return "; ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
