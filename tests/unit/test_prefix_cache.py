"""The prefix cache's parts without a model: prompt keys and media identity, the in-memory
store's budget, the disk store's files (format, refusals, size limit), the layout after a
cached prefix."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from longvita.config import tiny
from longvita.infer.layout import PromptLayout, shard_round
from longvita.infer.prefix_cache import (
    INDEX_BYTES_PER_HASH,
    MAX_CANDIDATES,
    CachedPrefix,
    MemoryPrefixStore,
    PrefixCache,
    PromptPrefix,
    longest,
)
from longvita.infer.prefix_disk import DiskPrefixStore, checkpoint_identity, file_name
from longvita.infer.prefix_key import PREFIX_BLOCK, PromptKey, prefix_levels
from longvita.model.kv_cache import KVCache
from longvita.processing.processor import Processor
from longvita.processing.tokens import load_tokenizer
from longvita.testing import make_image, make_video, write_tiny_tokenizer

KV_SHAPE = (2, 2, 8)  # layers, kv_heads, head_dim


def key(ids, media=None) -> PromptKey:
    ids = torch.tensor(ids, dtype=torch.int64)
    media = torch.zeros_like(ids) if media is None else torch.tensor(media, dtype=torch.int64)
    return PromptKey(ids, media)


def entry(prompt: PromptKey, *, dtype=torch.float32, cp=1, cp_rank=0, positions=None):
    positions = torch.arange(prompt.num_tokens) if positions is None else positions
    layers, heads, dim = KV_SHAPE
    gen = torch.Generator().manual_seed(prompt.num_tokens)
    keys = torch.randn(layers, heads, len(positions), dim, generator=gen).to(dtype)
    values = torch.randn(layers, heads, len(positions), dim, generator=gen).to(dtype)
    size = 2 * keys.numel() * keys.element_size()
    return CachedPrefix(prompt, keys, values, positions, cp=cp, cp_rank=cp_rank, num_bytes=size)


def test_shared_prefix_compares_tokens_and_media():
    a = key([1, 2, 3, 4, 5], [0, 7, 7, 0, 0])
    assert a.shared_prefix(key([1, 2, 3, 4, 5], [0, 7, 7, 0, 0])) == 5
    assert a.shared_prefix(key([1, 2, 3, 9], [0, 7, 7, 0])) == 3
    assert a.shared_prefix(key([1, 2, 3, 4, 5], [0, 7, 8, 0, 0])) == 2  # another medium
    assert a.shared_prefix(key([1, 2])) == 1 and a.shared_prefix(key([5])) == 0
    assert a.digest == key([1, 2, 3, 4, 5], [0, 7, 7, 0, 0]).digest != key([1, 2]).digest
    long = key(list(range(160)))
    assert long.covers(key([*range(150), 1000])) and not long.covers(key([*range(10), 1000]))


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    directory = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return Processor(load_tokenizer(directory), tiny().vision)


def prompt_key(processor, text, images=(), videos=(), **options) -> PromptKey:
    prompt = processor(text, list(images), list(videos), **options)
    tokens_per_tile = processor.tokens_per_tile
    return PromptKey.of_prompt(
        prompt.input_ids, prompt.visual_mask, prompt.tiles, tokens_per_tile=tokens_per_tile
    )


def test_media_identity_is_the_content_not_the_path(processor, tmp_path):
    first = make_image(tmp_path / "a.png", (320, 200))
    copy = shutil.copy(first, tmp_path / "copy.png")
    other = make_image(tmp_path / "b.png", (320, 200), seed=5)
    base = prompt_key(processor, "<image>\nWhat?", [first])
    assert base.shared_prefix(prompt_key(processor, "<image>\nWhat?", [copy])) == base.num_tokens
    slots = base.media_ids.nonzero()
    assert len(slots) > 0 and base.media_ids[: int(slots[0])].eq(0).all()
    changed = prompt_key(processor, "<image>\nWhat?", [other])
    assert changed.shared_prefix(base) == int(slots[0])  # differs at the first visual slot
    as_pil = prompt_key(processor, "<image>\nWhat?", [Image.open(first)])
    assert as_pil.shared_prefix(base) == int(slots[0])  # pixels, not file bytes
    pixels = prompt_key(processor, "<image>\nWhat?", [Image.open(first).convert("RGB")])
    assert as_pil.shared_prefix(pixels) == base.num_tokens


def test_pil_images_are_told_apart_by_what_they_show(processor):
    """A palette image's bytes are indices: two palettes, same indices, different pictures.
    Likewise a transparent colour. Frames in memory are hashed the same way."""
    red, blue = Image.new("P", (64, 48), 0), Image.new("P", (64, 48), 0)
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    grey = Image.new("L", (64, 48), 7)
    keyed = grey.copy()
    keyed.info["transparency"] = 7  # every pixel transparent: white
    for first, second in [(red, blue), (grey, keyed)]:
        one = prompt_key(processor, "<image>\nWhat?", [first])
        two = prompt_key(processor, "<image>\nWhat?", [second])
        assert one.shared_prefix(two) == int(one.media_ids.nonzero()[0])
        one = prompt_key(processor, "<video>\nWhat?", videos=[[first] * 2])
        two = prompt_key(processor, "<video>\nWhat?", videos=[[second] * 2])
        assert one.shared_prefix(two) == int(one.media_ids.nonzero()[0])
    same = prompt_key(processor, "<image>\nWhat?", [red.convert("RGB")])
    assert same.shared_prefix(prompt_key(processor, "<image>\nWhat?", [red])) == same.num_tokens


def test_a_rewritten_file_and_other_sampling_are_other_media(processor, tmp_path):
    video = make_video(tmp_path / "v.mp4", num_frames=8, fps=2)
    before = prompt_key(processor, "<video>\nWhat?", videos=[video])
    again = prompt_key(processor, "<video>\nWhat?", videos=[video])
    assert before.shared_prefix(again) == before.num_tokens
    first_slot = int(before.media_ids.nonzero()[0])
    fewer = prompt_key(processor, "<video>\nWhat?", videos=[video], max_frames=2)
    assert fewer.shared_prefix(before) <= first_slot
    make_video(video, num_frames=8, fps=2, size=(64, 96))  # same path, same frame count
    after = prompt_key(processor, "<video>\nWhat?", videos=[video])
    assert after.num_tokens == before.num_tokens
    assert after.shared_prefix(before) == first_slot


def test_frame_directory_identity_follows_its_files(processor, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(4):
        make_image(frames / f"{k:03d}.png", (64, 48), seed=k)
    before = prompt_key(processor, "<video>\nWhat?", videos=[frames])
    make_image(frames / "002.png", (64, 48), seed=9)
    after = prompt_key(processor, "<video>\nWhat?", videos=[frames])
    assert after.shared_prefix(before) == int(before.media_ids.nonzero()[0])


def test_memory_store_keeps_the_budget_least_recently_used_first():
    a, b, c = (entry(key([k, *range(100, 100 + n)])) for k, n in ((1, 9), (2, 9), (3, 9)))
    cost = MemoryPrefixStore.cost(a)
    assert cost == a.num_bytes + 16 * 10 + INDEX_BYTES_PER_HASH * 10  # 10 tokens, 10 hashes
    store = MemoryPrefixStore(max_bytes=2 * cost)
    assert store.add(a) and store.add(b)
    store.touch(a)  # b is now the least recently used
    assert store.add(c)
    ids = {m.entry.entry_id for m in store.matches(key([1, 100]), cp=1, cp_rank=0)}
    assert ids == {a.entry_id} and len(store) == 2 and store.num_bytes == 2 * cost
    assert store.matches(key([2, 100]), cp=1, cp_rank=0) == []  # b was dropped
    assert not store.add(entry(key(list(range(40)))))  # alone over the budget
    assert store.matches(key([1, 100]), cp=2, cp_rank=0) == []  # another cp size
    assert longest({"b": 5, "a": 5, "c": 2}) == ("a", 5) and longest({}) is None


def test_a_newer_prompt_replaces_the_ones_it_covers():
    video = list(range(200))
    first, second = entry(key([*video, 1, 2])), entry(key([*video, 3, 4, 5]))
    store = MemoryPrefixStore(max_bytes=10 * MemoryPrefixStore.cost(first))
    store.add(first)
    store.add(second)
    assert len(store) == 1  # the second question serves all the first did
    match = store.matches(key([*video, 1, 2]), cp=1, cp_rank=0)[0]
    assert match.entry is second and match.length == 200


def test_prefix_levels_and_hashes():
    assert prefix_levels(3, block=4) == [1, 2, 3]
    assert prefix_levels(9, block=4) == [1, 2, 3, 4, 8] and prefix_levels(0) == []
    assert len(prefix_levels(1_000_000)) == PREFIX_BLOCK - 1 + 1_000_000 // PREFIX_BLOCK
    a = key(list(range(40)))
    b = key([*range(35), 99, 98])
    image = key(list(range(40)), [0] * 20 + [7] * 20)
    levels = prefix_levels(40)
    assert len(a.prefix_hashes) == len(levels)
    shared = [x == y for x, y in zip(a.prefix_hashes, b.prefix_hashes, strict=False)]
    assert shared == [length <= 35 for length in levels[: len(shared)]]
    assert a.prefix_hashes[:16] == image.prefix_hashes[:16]  # levels 1-16, before the image
    assert a.prefix_hashes[16] != image.prefix_hashes[16]  # level 32 holds its first 12 slots


def test_a_lookup_compares_a_few_entries_whatever_the_store_holds(monkeypatch):
    """1,000 chats after one system prompt: the lookup finds the one a prompt continues (added
    first, so the least recent) and compares at most MAX_CANDIDATES entries token by token."""
    system = list(range(1000, 1040))
    chats = [entry(key([*system, k, *range(2000, 2030)])) for k in range(1000)]
    store = MemoryPrefixStore(max_bytes=sum(MemoryPrefixStore.cost(e) for e in chats))
    for chat in chats:
        assert store.add(chat)
    compared = []
    original = PromptKey.shared_prefix
    monkeypatch.setattr(
        PromptKey, "shared_prefix", lambda k, other: compared.append(1) or original(k, other)
    )
    turn = key([*system, 0, *range(2000, 2030), 5, 6, 7])  # the next turn of chat 0
    (match,) = store.matches(turn, cp=1, cp_rank=0)
    assert match.entry is chats[0] and match.length == 71 and len(compared) == 1
    compared.clear()
    new_chat = store.matches(key([*system, 5000, 1, 2]), cp=1, cp_rank=0)
    assert len(new_chat) == MAX_CANDIDATES == len(compared)
    assert {m.length for m in new_chat} == {40}
    assert {m.entry.entry_id for m in new_chat} == {c.entry_id for c in chats[-MAX_CANDIDATES:]}


def test_dropped_entries_leave_the_index():
    a, b = entry(key(list(range(50)))), entry(key([*range(30), 7, 7]))
    cost = MemoryPrefixStore.cost
    store = MemoryPrefixStore(max_bytes=cost(a))
    assert store.add(a) and store.add(b)  # b pushes a out of the budget
    assert [m.entry for m in store.matches(key(list(range(50))), cp=1, cp_rank=0)] == [b]
    assert len(store) == 1 and store.num_bytes == cost(b)
    store.clear()
    assert store.matches(key(list(range(50))), cp=1, cp_rank=0) == [] and store.num_bytes == 0
    assert store.add(a) and store.add(entry(key(list(range(50)))))  # the same prompt again
    assert len(store) == 1 and store.num_bytes == cost(a)


def store(directory, *, dtype=torch.float32, model="model-a", max_bytes=2**30):
    return DiskPrefixStore(
        directory, max_bytes=max_bytes, model_identity=model, dtype=dtype, kv_shape=KV_SHAPE
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_round_trip_is_a_plain_safetensors_file(tmp_path, dtype):
    written = entry(key([5, 6, 7, 8]), dtype=dtype)
    disk = store(tmp_path, dtype=dtype)
    disk.write(written)
    path = tmp_path / file_name(written.entry_id, 1, 0)
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left
    plain = load_file(path)
    assert torch.equal(plain["keys"], written.keys) and plain["keys"].dtype == dtype
    (match,) = disk.matches(key([5, 6, 7, 9]), cp=1, cp_rank=0)
    assert match.length == 3 and match.entry.path == path
    assert torch.equal(match.entry.values, written.values)
    assert torch.equal(match.entry.positions, torch.arange(4))


def test_corrupt_and_foreign_files_are_ignored_with_a_warning(tmp_path, caplog):
    prompt = key([1, 2, 3, 4, 5])
    store(tmp_path, model="model-b").write(entry(prompt))
    foreign = tmp_path / file_name(prompt.digest, 1, 0)
    store(tmp_path / "bf16", dtype=torch.bfloat16).write(entry(prompt, dtype=torch.bfloat16))
    truncated = tmp_path / file_name(key([1, 2, 3]).digest, 1, 0)
    truncated.write_bytes(foreign.read_bytes()[:100])
    garbage = tmp_path / file_name(key([1, 2]).digest, 1, 0)
    garbage.write_bytes(b"not safetensors at all")
    disk = store(tmp_path)
    with caplog.at_level(logging.WARNING, logger="longvita.infer.prefix_disk"):
        assert disk.matches(prompt, cp=1, cp_rank=0) == []
        disk.matches(prompt, cp=1, cp_rank=0)  # warned once per file
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert any("another model" in m and foreign.name in m for m in messages)
    assert sum("does not read" in m for m in messages) == 2
    bf16 = store(tmp_path / "bf16")  # float32 model, bfloat16 file
    with caplog.at_level(logging.WARNING, logger="longvita.infer.prefix_disk"):
        assert bf16.matches(prompt, cp=1, cp_rank=0) == []
    assert "bfloat16" in caplog.records[-1].getMessage()
    disk.write(entry(prompt))  # the foreign file is replaced by ours
    assert [m.length for m in disk.matches(prompt, cp=1, cp_rank=0)] == [5]


def test_a_file_of_another_cp_size_is_named_in_a_warning(tmp_path, caplog):
    prompt = key(list(range(10)))
    positions = [torch.tensor([0, 1, 2, 7, 8, 9]), torch.tensor([3, 4, 5, 6])]
    for rank in range(2):
        store(tmp_path).write(entry(prompt, cp=2, cp_rank=rank, positions=positions[rank]))
    with caplog.at_level(logging.WARNING, logger="longvita.infer.prefix_disk"):
        assert store(tmp_path).matches(prompt, cp=1, cp_rank=0) == []
    assert "--cp 2" in caplog.text and "--cp 1" in caplog.text
    (match,) = store(tmp_path).matches(prompt, cp=2, cp_rank=1)
    assert match.entry.tokens_before(5) == 2 and match.entry.tokens_before(10) == 4


def test_disk_size_limit_drops_the_least_recently_used(tmp_path):
    prompts = [key([k, *range(100, 130)]) for k in range(3)]
    first = store(tmp_path)
    first.write(entry(prompts[0]))
    size = (tmp_path / file_name(prompts[0].digest, 1, 0)).stat().st_size
    disk = store(tmp_path, max_bytes=2 * size + size // 2)
    disk.write(entry(prompts[1]))
    past = (tmp_path / file_name(prompts[1].digest, 1, 0)).stat().st_mtime - 100
    os.utime(tmp_path / file_name(prompts[1].digest, 1, 0), (past, past))  # used long ago
    disk.write(entry(prompts[2]))
    left = sorted(os.listdir(tmp_path))
    assert left == sorted(file_name(p.digest, 1, 0) for p in (prompts[0], prompts[2]))


def test_a_newer_file_replaces_the_files_it_covers(tmp_path):
    video = list(range(200))
    older, unrelated = key([*video, 1, 2]), key([7, *video])
    for rank in range(2):  # every rank's file of the covered prompt goes
        disk = store(tmp_path)
        disk.write(entry(older, cp=2, cp_rank=rank, positions=torch.arange(rank, 202, 2)))
    disk.write(entry(unrelated, cp=2, positions=torch.arange(0, 201, 2)))
    newer = key([*video, 3, 4, 5])
    disk.write(entry(newer, cp=2, positions=torch.arange(0, 203, 2)))  # rank 0's file
    names = {file_name(p.digest, 2, 0) for p in (unrelated, newer)}
    assert set(os.listdir(tmp_path)) == names


def test_checkpoint_identity_changes_with_config_or_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    before = checkpoint_identity(tmp_path)
    assert checkpoint_identity(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"y" * 11)
    assert checkpoint_identity(tmp_path) != before


def test_load_copies_only_the_shared_prefix(tmp_path):
    video = list(range(20))
    cache = PrefixCache(max_bytes=2**30, tokens_per_tile=4)
    held = entry(key([*video, 1]))
    cache.memory.add(held)
    prefix = PromptPrefix(cache, key([*video, 2, 3]))
    assert prefix.matches() == {held.entry_id: 20}
    kv = KVCache(
        num_layers=2, batch_size=1, num_kv_heads=2, head_dim=8, capacity=30,
        dtype=torch.float32, device="cpu",
    )  # fmt: skip
    positions = prefix.load(held.entry_id, 20, kv)
    assert kv.length == 20 and torch.equal(positions, torch.arange(20))
    assert torch.equal(kv.keys[:, 0, :, :20], held.keys[:, :, :20])
    same = PromptPrefix(cache, key([*video, 1]))
    assert same.matches() == {held.entry_id: 20}  # the last token is always prefilled


@pytest.mark.parametrize(("cp", "cached"), [(2, (5, 4)), (3, (1, 2, 3)), (2, (0, 1))])
def test_layout_after_a_cached_prefix_covers_the_rest_once(cp, cached):
    num_tokens = sum(cached) + 23
    layout = PromptLayout.build(num_tokens, cp, 6, cached=cached)
    assert (layout.start, layout.end, layout.num_tokens) == (sum(cached), num_tokens, 23)
    ids = torch.arange(num_tokens)
    seen = []
    for rank in range(cp):
        positions = layout.prefilled_positions(rank)
        assert torch.equal(positions, positions.sort().values)
        for round_idx in range(layout.num_rounds):
            shard = shard_round(ids, None, layout, rank=rank, round_idx=round_idx, pad_id=-1)
            seen += shard.input_ids[: shard.num_real].tolist()
        assert layout.prompt_tokens_on(rank) == cached[rank] + len(positions)
    assert sorted(seen) == list(range(sum(cached), num_tokens))
    owners = layout.decode_owners(9)
    assert sum(layout.kv_capacity(rank, owners) for rank in range(cp)) == num_tokens + 9
