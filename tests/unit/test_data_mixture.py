"""Mixture YAML: ratio / num semantics per file, seeded selection and epoch order, sharding."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from longvita.data.mixture import Mixture, MixtureConfig, MixtureGroup, shard
from longvita.testing import write_jsonl, write_mixture

# The shape of the official stage configs: extra top-level keys, commented paths, an inactive
# group whose files do not exist, a path with a trailing space, `num` caps.
OFFICIAL_STYLE = """
xlsx_sample_num: 5

dataset:

  LLaVA:
    ratio: 0
    data_paths:
      #- datasets/jsonl/liuhaotian/LLaVA-Pretrain/blip_laion_cc_sbu_558k.jsonl
      - datasets/jsonl/liuhaotian/LLaVA-Instruct-150K/llava_v1_5_mix665k.jsonl

  ShareGPT4V:
    ratio: 1.0
    data_paths:
      - a.jsonl
      - b.jsonl 

  OpenHermes:
    ratio: 2.5
    num: 12
    data_paths:
      - c.jsonl
"""  # noqa: W291


def _files(directory, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        write_jsonl(directory / name, [{"name": name, "i": i} for i in range(size)])


def _selected(mixture: Mixture) -> Counter:
    """(file name, record index) -> times selected."""
    out = Counter()
    for record_id in mixture.plan:
        file_index, index = mixture.locate(int(record_id))
        out[(mixture.files[file_index].file.path.name, index)] += 1
    return out


def test_official_style_config_ratio_and_num_per_file(tmp_path):
    _files(tmp_path, {"a.jsonl": 10, "b.jsonl": 4, "c.jsonl": 7})
    (tmp_path / "mix.yaml").write_text(OFFICIAL_STYLE)
    mixture = Mixture.from_yaml(tmp_path / "mix.yaml", data_root=tmp_path, seed=3)
    counts = _selected(mixture)
    per_file = Counter()
    for (name, _), times in counts.items():
        per_file[name] += times
    # ratio 1: every record once; ratio 2.5 on 7 records = 17, capped by num 12 per file.
    assert per_file == {"a.jsonl": 10, "b.jsonl": 4, "c.jsonl": 12}
    assert all(times == 1 for (name, _), times in counts.items() if name != "c.jsonl")
    c_times = sorted(times for (name, _), times in counts.items() if name == "c.jsonl")
    assert c_times == [1, 1, 2, 2, 2, 2, 2]  # 12 = one full pass + 5 repeats, no triple
    summary = mixture.group_summary()
    assert summary["OpenHermes"] == {"files": 1, "records": 7, "selected": 12}
    assert "LLaVA" not in summary  # inactive: not even opened


@pytest.mark.parametrize(("size", "ratio", "num"), [(10, 0.35, None), (10, 3, None), (5, 1.0, 2)])
def test_used_is_min_of_int_ratio_and_num(tmp_path, size, ratio, num):
    _files(tmp_path, {"a.jsonl": size})
    group = {"ratio": ratio, "data_paths": ["a.jsonl"]} | ({"num": num} if num else {})
    mixture = Mixture.from_yaml(
        write_mixture(tmp_path / "m.yaml", {"g": group}), data_root=tmp_path
    )
    expected = min(int(size * ratio), num or 10**9)
    assert len(mixture) == expected
    times = Counter(_selected(mixture).values())
    assert max(times) - min(times) <= 1 and len(_selected(mixture)) == min(size, expected)


def test_selection_and_order_are_seeded(tmp_path):
    _files(tmp_path, {"a.jsonl": 50, "b.jsonl": 30})
    path = write_mixture(
        tmp_path / "m.yaml",
        {"A": {"ratio": 0.5, "data_paths": ["a.jsonl"]}, "B": {"data_paths": ["b.jsonl"]}},
    )
    one, same, other = (Mixture.from_yaml(path, data_root=tmp_path, seed=s) for s in (1, 1, 2))
    assert np.array_equal(one.plan, same.plan) and not np.array_equal(one.plan, other.plan)
    assert np.array_equal(one.epoch_order(4), same.epoch_order(4))
    assert not np.array_equal(one.epoch_order(0), one.epoch_order(1))
    assert sorted(one.epoch_order(1).tolist()) == sorted(one.plan.tolist())


def test_missing_files_error_or_warn(tmp_path, caplog):
    _files(tmp_path, {"a.jsonl": 3})
    groups = {"A": {"data_paths": ["a.jsonl", "gone.jsonl"]}}
    path = write_mixture(tmp_path / "m.yaml", groups)
    with pytest.raises(ValueError, match="gone.jsonl"):
        Mixture.from_yaml(path, data_root=tmp_path)
    with caplog.at_level(logging.WARNING):
        mixture = Mixture.from_yaml(path, data_root=tmp_path, allow_missing_files=True)
    assert len(mixture) == 3 and "gone.jsonl" in caplog.text


def test_choices_that_change_the_data_quietly_are_warned_about(tmp_path, caplog):
    _files(tmp_path, {"a.jsonl": 8, "b.jsonl": 3})
    groups = {
        "A": {"ratio": 0.5, "data_paths": ["a.jsonl", "a.jsonl"]},  # the same file twice
        "B": {"ratio": 0.1, "data_paths": ["b.jsonl"]},  # 0.1 x 3 records rounds to none
    }
    with caplog.at_level(logging.WARNING, logger="longvita.data.mixture"):
        mixture = Mixture.from_yaml(write_mixture(tmp_path / "m.yaml", groups), data_root=tmp_path)
    assert len(mixture) == 8 and len(set(_selected(mixture))) == 4  # the same half, twice
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "group 'A' lists" in warnings[0] and "2 times ('a.jsonl', 'a.jsonl')" in warnings[0]
    assert "group 'B'" in warnings[1] and "ratio 0.1 of its 3 records rounds to none" in warnings[1]


@pytest.mark.parametrize("allow_missing_files", [False, True])
def test_a_directory_as_data_path_says_so(tmp_path, allow_missing_files):
    _files(tmp_path, {"a.jsonl": 3})
    (tmp_path / "shards").mkdir()
    path = write_mixture(tmp_path / "m.yaml", {"A": {"data_paths": ["a.jsonl", "shards"]}})
    with pytest.raises(ValueError, match="1 data path\\(s\\) are directories") as err:
        Mixture.from_yaml(path, data_root=tmp_path, allow_missing_files=allow_missing_files)
    assert f"A: {tmp_path / 'shards'}" in str(err.value) and "JSONL or JSON-list" in str(err.value)


def test_a_directory_or_non_utf8_text_as_mixture_file_says_so(tmp_path):
    with pytest.raises(ValueError, match="is a directory; expected a mixture YAML file"):
        MixtureConfig.from_yaml(tmp_path)
    (tmp_path / "m.yaml").write_bytes(b"dataset:\n  caf\xe9: {}\n")
    with pytest.raises(ValueError, match="m.yaml' is not valid YAML"):
        MixtureConfig.from_yaml(tmp_path / "m.yaml")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"datasets": {}}, "'dataset'"),
        (  # `data inspect` given the stage file instead of its mixture
            {"stage": "s1", "data": {"mixture": "data/s1.yaml", "seq_len": 64}},
            r"is a stage file, not a mixture: give its data.mixture \('data/s1.yaml'\)",
        ),
        ({"dataset": {}}, "at least one group"),
        ({"dataset": {"g": {"ratio": -1, "data_paths": ["a"]}}}, "ratio must be a finite number"),
        ({"dataset": {"g": {"ratio": float("inf"), "data_paths": ["a"]}}}, "got inf"),
        ({"dataset": {"g": {"ratio": float("nan"), "data_paths": ["a"]}}}, "got nan"),
        ({"dataset": {"g": {"ratio": "x", "data_paths": ["a"]}}}, "ratio must be a number"),
        ({"dataset": {"g": {"num": 1.5, "data_paths": ["a"]}}}, "num must be an integer"),
        ({"dataset": {"g": {"ratio": 1}}}, "no paths"),
        ({"dataset": {"g": {"data_paths": "a.jsonl"}}}, "must be a list"),
    ],
)
def test_bad_mixture_configs_name_the_problem(data, match):
    with pytest.raises(ValueError, match=match):
        MixtureConfig.from_dict(data)


def test_group_errors_name_the_mixture_file(tmp_path):
    path = write_mixture(tmp_path / "m.yaml", {"g": {"ratio": -1, "data_paths": ["a.jsonl"]}})
    with pytest.raises(ValueError, match=r"m\.yaml: group 'g': ratio"):
        MixtureConfig.from_yaml(path)


def test_a_mixture_that_selects_nothing_or_too_much_says_why(tmp_path):
    _files(tmp_path, {"a.jsonl": 3})
    few = write_mixture(tmp_path / "few.yaml", {"g": {"ratio": 0.1, "data_paths": ["a.jsonl"]}})
    with pytest.raises(ValueError, match=r"selects no sample .*a\.jsonl \(3 records, 0 taken\)"):
        Mixture.from_yaml(few)
    huge = write_mixture(tmp_path / "huge.yaml", {"g": {"ratio": 1e300, "data_paths": ["a.jsonl"]}})
    with pytest.raises(ValueError, match="group 'g': ratio 1e\\+300 takes"):
        Mixture.from_yaml(huge)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_seeds_out_of_range_are_refused(tmp_path, seed):
    _files(tmp_path, {"a.jsonl": 3})
    path = write_mixture(tmp_path / "m.yaml", {"g": {"data_paths": ["a.jsonl"]}})
    with pytest.raises(ValueError, match=r"mixture seed must be an integer in \[0, 2\*\*63\)"):
        Mixture.from_yaml(path, seed=seed)


def test_relative_paths_start_at_the_mixture_file_unless_a_root_is_given(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    _files(data, {"a.jsonl": 3})
    path = write_mixture(data / "m.yaml", {"g": {"data_paths": ["a.jsonl"]}})
    monkeypatch.chdir(tmp_path)  # the current directory plays no part
    assert len(Mixture.from_yaml(path)) == 3
    with pytest.raises(ValueError, match="resolved against"):
        Mixture.from_yaml(path, data_root=tmp_path)


def test_a_ratio_in_exponent_form_is_a_number():
    """PyYAML reads `1e-1` (no dot) as a string; the stage files take such numbers too."""
    config = MixtureConfig.from_dict({"dataset": {"g": {"ratio": "1e-1", "data_paths": ["a"]}}})
    assert config.groups[0].ratio == 0.1


def test_inactive_group_may_have_no_paths():
    config = MixtureConfig.from_dict({"dataset": {"g": {"ratio": 0, "data_paths": None}}})
    assert config.groups == (MixtureGroup(name="g", ratio=0),)


@given(
    n=st.integers(0, 60),
    dp_size=st.integers(1, 4),
    num_workers=st.integers(1, 3),
)
def test_shards_are_disjoint_and_complete(n, dp_size, num_workers):
    order = np.random.default_rng(n).permutation(n)
    parts = [
        shard(order, dp_rank=r, dp_size=dp_size, worker=w, num_workers=num_workers)
        for r in range(dp_size)
        for w in range(num_workers)
    ]
    flat = np.concatenate(parts)
    assert len(flat) == n and sorted(flat.tolist()) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
