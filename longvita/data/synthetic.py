"""Writing small data sets in the official format: records, JSONL / JSON-list files, mixtures.

For tests, the demo and benchmarks on machines without real data. Owns nothing else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml


def conversation(
    question: str,
    answer: str | Sequence[str],
    *,
    images: Sequence[str] = (),
    videos: Sequence[str] = (),
    sharegpt: bool = False,
    system: str | None = None,
) -> dict:
    """One record. Several answers make a multi-turn conversation (the question repeated)."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    turns = [("system", system)] if system is not None else []
    for i, reply in enumerate(answers):
        turns += [("user", question if i == 0 else f"and {i}?"), ("assistant", reply)]
    if sharegpt:
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        record: dict = {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
    else:
        record = {"messages": [{"role": r, "content": c} for r, c in turns]}
    if images:
        record["images"] = list(images)
    if videos:
        record["videos"] = list(videos)
    return record


def write_jsonl(path: str | os.PathLike, records: Iterable[object | str]) -> Path:
    """One record per line; a str is written as is (to plant a malformed line)."""
    path = Path(path)
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def write_json_list(path: str | os.PathLike, records: Iterable[object], *, indent=2) -> Path:
    path = Path(path)
    path.write_text(json.dumps(list(records), indent=indent))
    return path


def write_mixture(path: str | os.PathLike, groups: Mapping[str, Mapping]) -> Path:
    """A mixture YAML: `dataset: {name: {ratio, num, data_paths}}`."""
    path = Path(path)
    path.write_text(yaml.safe_dump({"dataset": {k: dict(v) for k, v in groups.items()}}))
    return path
