"""The packed loader on a tiny mixture: determinism, exact resume (with workers), data-parallel
sharding, and bad samples skipped, counted and located."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from longvita.config import tiny
from longvita.data.loader import DataConfig, PackedLoader
from longvita.data.mixture import Mixture
from longvita.processing.processor import Processor
from longvita.processing.tokens import load_tokenizer
from longvita.testing import (
    conversation,
    make_image,
    make_video,
    write_json_list,
    write_jsonl,
    write_mixture,
    write_tiny_tokenizer,
)

SEQ_LEN = 160
NUM_TEXT = 30
# Bad lines planted in text.jsonl (1-based line -> reason) and in media.json (element index).
BAD_TEXT_LINES = {
    31: "malformed_json",
    32: "no_assistant_turn",
    33: "invalid_sample",
    34: "too_long",
}
EXPECTED_SKIPS = {
    "malformed_json": 1,
    "no_assistant_turn": 1,
    "invalid_sample": 1,
    "too_long": 1,
    "media_error": 2,
    "tag_media_mismatch": 1,
}


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    directory = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return Processor(load_tokenizer(directory), tiny().vision)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "media" / "frames").mkdir(parents=True)
    make_image(root / "media" / "wide.png", (112, 56))
    make_video(root / "media" / "clip.mp4", num_frames=8, fps=4, size=(64, 48))
    for k in range(3):
        make_image(root / "media" / "frames" / f"f{k}.png", (32, 32), seed=k)
    text = [
        conversation(f"sample {i}", ["The fox."] * (1 + i % 3), system="s" if i % 4 else None)
        for i in range(NUM_TEXT)
    ]
    text += [
        '{"messages": [',
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        conversation("sample 999", "The quick brown fox jumps over the lazy dog. " * 20),
    ]
    write_jsonl(root / "text.jsonl", text)
    media = [
        conversation(
            f"<image>\nimage {i}", "A red square.", images=["media/wide.png"], sharegpt=True
        )
        for i in range(8)
    ]
    media += [
        conversation(f"<video>\nvideo {i}", "A dog.", videos=["media/clip.mp4"]) for i in range(3)
    ]
    media += [
        conversation(
            "<video><image>\nboth", "Two.", images=["media/wide.png"], videos=["media/frames"]
        ),
        conversation("<image>\nmissing", "x", images=["media/none.png"]),
        conversation("<video>\nmissing", "x", videos=["media/none.mp4"]),
        conversation("<image><image>\nmismatch", "x", images=["media/wide.png"]),
    ]
    write_json_list(root / "media.json", media)
    write_mixture(
        root / "mix.yaml",
        {
            "text": {"ratio": 1.0, "data_paths": ["text.jsonl"]},
            "vision": {"ratio": 2, "data_paths": ["media.json"]},
        },
    )
    write_mixture(root / "text.yaml", {"text": {"data_paths": ["text.jsonl"]}})
    return root


def _loader(data_dir, processor, *, yaml="mix.yaml", seed=0, dp_rank=0, dp_size=1, **config):
    mixture = Mixture.from_yaml(data_dir / yaml, data_root=data_dir, seed=seed)
    config = {"seq_len": SEQ_LEN, "num_epochs": 2, "max_frames": 2} | config
    return PackedLoader(mixture, processor, DataConfig(**config), dp_rank=dp_rank, dp_size=dp_size)


def _same(a, b) -> bool:
    fields = ("input_ids", "targets", "position_ids", "cu_seqlens", "visual_mask")
    if a.tokens_per_tile != b.tokens_per_tile or (a.pixel_values is None) != (
        b.pixel_values is None
    ):
        return False
    tiles_equal = a.pixel_values is None or torch.equal(a.pixel_values, b.pixel_values)
    return tiles_equal and all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)


def _all_same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(_same(x, y) for x, y in zip(xs, ys, strict=True))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_order_is_deterministic_for_a_seed(data_dir, processor, num_workers):
    first = list(_loader(data_dir, processor, num_workers=num_workers))
    again = list(_loader(data_dir, processor, num_workers=num_workers))
    other_seed = list(_loader(data_dir, processor, num_workers=num_workers, seed=1))
    assert len(first) > 10 and _all_same(first, again)
    assert not _all_same(first, other_seed)


RESUME_CASES = [
    # (num_workers, packing, reset_per_sample, PoSE, points at which the run is interrupted)
    (0, "per_source", True, None, [1, 7]),
    (0, "cross_source", False, None, [5, 13]),  # 13: into the second epoch
    (2, "per_source", True, None, [1, 6, 12]),  # 1: the second worker has produced nothing yet
    (2, "cross_source", False, None, [3]),
    (2, "per_source", True, 4 * SEQ_LEN, [2, 9]),  # the resumed positions are the same draws
    (0, "cross_source", False, 4 * SEQ_LEN, [5, 13]),
]


@pytest.mark.parametrize(("num_workers", "packing", "reset", "pose", "stops"), RESUME_CASES)
def test_resume_restarts_at_the_next_unseen_sequence(
    data_dir, processor, num_workers, packing, reset, pose, stops
):
    config = {
        "num_workers": num_workers,
        "packing": packing,
        "reset_per_sample": reset,
        "pose_max_position": pose,
    }
    reference_loader = _loader(data_dir, processor, **config)
    reference = list(reference_loader)
    got, state, previous = [], None, 0
    for stop in [*stops, None]:  # a chain of interruptions, each in a fresh loader
        loader = _loader(data_dir, processor, **config)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))  # plain data
        for packed in loader:
            got.append(packed)
            if stop is not None and len(got) == stop:
                break
        assert len(got) == (stop or len(reference)) and len(got) > previous
        previous, state = len(got), loader.state_dict()
    assert _all_same(got, reference)
    summaries = {e: s.to_dict() for e, s in loader.epoch_summaries.items()}
    assert summaries == {e: s.to_dict() for e, s in reference_loader.epoch_summaries.items()}


def test_pose_stretches_positions_and_keeps_the_tokens(data_dir, processor):
    plain = list(_loader(data_dir, processor, num_epochs=1))
    stretched = list(_loader(data_dir, processor, num_epochs=1, pose_max_position=4 * SEQ_LEN))
    assert len(plain) == len(stretched)
    jumped = 0
    for a, b in zip(plain, stretched, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
        assert int(b.position_ids.max()) < 4 * SEQ_LEN
        jumped += int((b.position_ids - a.position_ids).max() > 0)
    assert jumped > len(plain) // 2


def test_resume_refuses_other_settings(data_dir, processor):
    loader = _loader(data_dir, processor, num_workers=0)
    next(iter(loader))
    other = _loader(data_dir, processor, num_workers=2)
    with pytest.raises(ValueError, match="num_workers: saved 1, now 2"):
        other.load_state_dict(loader.state_dict())


def _sample_numbers(packed, processor) -> list[int]:
    """The `sample N` of each segment of a reset-per-sample text sequence."""
    bounds = packed.cu_seqlens.tolist()
    numbers = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        text = processor.decode(packed.input_ids[lo:hi].tolist())
        numbers += [int(n) for n in re.findall(r"sample (\d+)", text)]
    return numbers


@pytest.mark.parametrize("num_workers", [0, 2])
def test_data_parallel_ranks_are_disjoint_and_complete(data_dir, processor, num_workers):
    seen = []
    for rank in range(2):
        loader = _loader(
            data_dir,
            processor,
            yaml="text.yaml",
            num_epochs=1,
            dp_rank=rank,
            dp_size=2,
            num_workers=num_workers,
        )
        numbers = [n for packed in loader for n in _sample_numbers(packed, processor)]
        assert loader.epoch_summaries[0].num_samples == len(numbers)
        seen.append(numbers)
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(NUM_TEXT))  # sample 999 is too long


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_located(data_dir, processor, num_workers, caplog):
    calls = []
    loader = _loader(data_dir, processor, num_workers=num_workers, num_epochs=1)
    loader.on_epoch_end = lambda epoch, stats: calls.append((epoch, stats))
    with caplog.at_level(logging.WARNING, logger="longvita.data"):
        sequences = list(loader)
    summary = loader.epoch_summaries[0]
    assert calls == [(0, summary)]
    # the vision file is taken twice (ratio 2): its bad records are skipped twice
    expected = {
        r: n * (1 if r in BAD_TEXT_LINES.values() else 2) for r, n in EXPECTED_SKIPS.items()
    }
    assert dict(summary.skipped) == expected
    for line, reason in BAD_TEXT_LINES.items():
        assert any(f"text.jsonl:{line}:" in e for e in summary.examples[reason])
    for reason in EXPECTED_SKIPS:  # media.json is a JSON list: its elements have lines too
        assert all(re.search(r"\.jsonl?:\d+: ", e) for e in summary.examples[reason])
    assert summary.num_samples == NUM_TEXT + 2 * 12
    assert summary.samples_per_group == {"text": NUM_TEXT, "vision": 24}
    assert summary.num_sequences == len(sequences)
    real = sum(int((s.input_ids != processor.tokens.pad).sum()) for s in sequences)
    assert summary.num_tokens == real and summary.num_pad_tokens == len(sequences) * SEQ_LEN - real
    if num_workers == 0:  # worker processes log in their own process
        assert "text.jsonl:31" in caplog.text and "malformed_json" in caplog.text


def test_packed_sequences_carry_tiles_and_valid_targets(data_dir, processor):
    sequences = list(_loader(data_dir, processor, num_epochs=1))
    tokens = processor.tokens
    with_tiles = [s for s in sequences if s.pixel_values is not None]
    assert with_tiles and any(s.pixel_values is None for s in sequences)
    for packed in sequences:
        assert packed.seq_len == SEQ_LEN and packed.tokens_per_tile == 4
        pad = packed.input_ids == tokens.pad
        assert bool((packed.targets[pad] == -100).all())
        # the target of a supervised position is the next input token of the same sample
        supervised = torch.nonzero(packed.targets != -100).flatten()
        assert torch.equal(packed.targets[supervised], packed.input_ids[supervised + 1])
        assert not bool(packed.visual_mask[packed.targets != -100].any())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_keeps_going_past_garbage_records(tmp_path, processor, num_workers, caplog):
    reserved = ["<IMG_CONTEXT>", "<VID_CONTEXT>", "<PATCH_CONTEXT>", "<img>", "</img>"]
    reserved += ["<vid>", "</vid>", "<patch>", "</patch>"]
    records = [conversation(f"sample {i}", "The fox.") for i in range(6)]
    records += [conversation(f"What is {token}?", "A.") for token in reserved]  # lines 7-15
    records += [conversation("q", f"It is {token}.") for token in reserved]  # lines 16-24
    records += [
        '{"messages": [{"role": "user", "content": "caf\\udce9"}, '
        '{"role": "assistant", "content": "a"}]}',  # decodes to a lone surrogate
        "[" * 100_000 + "]" * 100_000,
        '{"messages": ' + "7" * 5000 + "}",
    ]
    write_jsonl(tmp_path / "bad.jsonl", records)
    write_mixture(tmp_path / "mix.yaml", {"bad": {"data_paths": ["bad.jsonl"]}})
    mixture = Mixture.from_yaml(tmp_path / "mix.yaml", data_root=tmp_path)
    config = DataConfig(seq_len=SEQ_LEN, num_epochs=1, num_workers=num_workers)
    loader = PackedLoader(mixture, processor, config)
    with caplog.at_level(logging.WARNING, logger="longvita.data"):
        numbers = [n for packed in loader for n in _sample_numbers(packed, processor)]
    assert sorted(numbers) == list(range(6))
    summary = loader.epoch_summaries[0]
    assert dict(summary.skipped) == {"invalid_sample": 19, "malformed_json": 2}
    assert summary.num_samples + summary.num_skipped == len(records)
    if num_workers == 0:  # worker processes log in their own process
        for k, token in enumerate(reserved):  # each kind, in user and in assistant text
            for line in (7 + k, 16 + k):
                logged = f"(invalid_sample) {tmp_path / 'bad.jsonl'}:{line}: the text contains"
                assert f"{logged} {token!r}" in caplog.text
