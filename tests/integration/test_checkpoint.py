"""Checkpoint layout: round trips, shards, dtype conversion, and the errors of bad directories."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import longvita
from longvita.errors import CheckpointError
from longvita.model.checkpoint import INDEX_FILE, SINGLE_FILE, load_model, save_model
from longvita.testing import random_model


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_official_keys_and_meta_free_load(tiny_checkpoint):
    keys = set(load_file(str(tiny_checkpoint / SINGLE_FILE)))
    assert "model.vision_model.encoder.layers.0.attn.qkv.weight" in keys
    assert "model.vision_projection.mlp.2.weight" in keys
    assert "model.layers.1.self_attn.q_proj.bias" in keys and "lm_head.weight" in keys
    model = load_model(tiny_checkpoint)
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_is_bit_identical(tmp_path, dtype):
    model = random_model(seed=3).to(dtype)
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]
    _assert_same_state(model, load_model(tmp_path, dtype=dtype))


def test_sharded_checkpoint_loads_the_same(tmp_path):
    model = random_model(seed=4)
    shards = save_model(model, tmp_path, max_shard_bytes=100_000)
    assert len(shards) > 2 and (tmp_path / INDEX_FILE).is_file()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    _assert_same_state(model, load_model(tmp_path))


def test_dtype_conversion_on_load(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_pipeline_save_round_trip(tiny_checkpoint, tmp_path):
    pipe = longvita.load(tiny_checkpoint)
    pipe.save(tmp_path / "copy")
    again = longvita.load(tmp_path / "copy")
    _assert_same_state(pipe.model, again.model)
    assert again.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()


def test_saved_tokenizer_has_the_official_files_and_ids(qwen2_tokenizer_dir, tmp_path):
    """vocab.json + merges.txt (the slow tokenizer, which the official code may read) give the
    fast tokenizer's ids; the special tokens are a list under `additional_special_tokens`
    (transformers 4 fails on transformers 5's list-valued `extra_special_tokens`), and the chat
    template is in tokenizer_config.json, where transformers before 4.43 reads it."""
    from transformers import Qwen2Tokenizer

    from longvita.processing.tokens import load_tokenizer, save_tokenizer

    tokenizer = load_tokenizer(qwen2_tokenizer_dir)
    save_tokenizer(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (
        "extra_special_tokens" not in config
        and "<|im_start|>" in config["additional_special_tokens"]
    )
    assert "<|im_start|>" in config["chat_template"]
    added = {t["content"] for t in config["added_tokens_decoder"].values()}
    assert {"<IMG_CONTEXT>", "<video>", "<|endoftext|>"} <= added
    (tmp_path / "tokenizer.json").unlink()  # only what the slow tokenizer reads is left
    slow = Qwen2Tokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nHello wörld 你好 <img><IMG_CONTEXT></img><video> tá»<|im_end|>\n"
    assert slow.encode(text) == tokenizer.encode(text)
    assert load_tokenizer(tmp_path).get_vocab() == tokenizer.get_vocab()


def test_saving_over_a_sharded_checkpoint_replaces_it_whole(tiny_checkpoint, tmp_path):
    """A smaller checkpoint saved where a sharded one was: no stale shard or index survives,
    the tokenizer and the user's own files stay, and `load` returns the new weights."""
    target = tmp_path / "ckpt"
    old = random_model(seed=5)
    assert len(save_model(old, target, max_shard_bytes=100_000)) > 2
    (target / "README.md").write_text("my notes")
    pipe = longvita.load(tiny_checkpoint)  # other weights, one file
    pipe.save(target)
    names = sorted(p.name for p in target.iterdir())
    assert INDEX_FILE not in names and not any(n.startswith("model-0") for n in names)
    assert SINGLE_FILE in names and "README.md" in names and "tokenizer_config.json" in names
    _assert_same_state(pipe.model, longvita.load(target).model)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left


def test_saved_files_are_readable_by_all(tmp_path):
    umask = os.umask(0o022)
    try:
        save_model(random_model(seed=6), tmp_path / "ckpt", max_shard_bytes=100_000)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_a_failed_save_leaves_the_old_checkpoint_untouched(tiny_checkpoint, tmp_path):
    target = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(staged):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(random_model(seed=7), target, write_extra=fail)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_saving_onto_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        save_model(random_model(seed=8), tmp_path / "file")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_unexpected_keys_are_listed(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    state = load_file(str(ckpt / SINGLE_FILE))
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(ckpt / SINGLE_FILE))
    with pytest.raises(CheckpointError) as err:
        longvita.load(ckpt)
    assert "model.norm.weight" in str(err.value) and "model.extra.weight" in str(err.value)
    assert "1 missing" in str(err.value) and "1 unexpected" in str(err.value)


def test_shape_mismatch_names_the_key(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight: checkpoint \(128, 64\)"):
        longvita.load(ckpt)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_dir", "not a directory"),
        ("no_config", "config.json"),
        ("no_weights", "neither model.safetensors"),
        ("no_tokenizer", "no tokenizer files"),
        ("corrupt_weights", "cannot read"),
        ("missing_shard", "lists shard"),
    ],
)
def test_broken_directories_raise_checkpoint_error(tiny_checkpoint, tmp_path, breakage, message):
    ckpt = tmp_path / "missing" if breakage == "no_dir" else _copy(tiny_checkpoint, tmp_path / "c")
    if breakage == "no_config":
        (ckpt / "config.json").unlink()
    elif breakage == "no_weights":
        (ckpt / SINGLE_FILE).unlink()
    elif breakage == "no_tokenizer":
        (ckpt / "vocab.json").unlink()
    elif breakage == "corrupt_weights":
        (ckpt / SINGLE_FILE).write_bytes(b"\x00" * 64)
    elif breakage == "missing_shard":
        (ckpt / SINGLE_FILE).unlink()
        (ckpt / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match=message):
        longvita.load(ckpt)


def test_stored_rotary_frequencies_of_older_exports_are_skipped(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path / "old")
    weights = load_file(str(tmp_path / "old" / SINGLE_FILE))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(weights, str(tmp_path / "old" / SINGLE_FILE))
    _assert_same_state(load_model(tmp_path / "old"), load_model(tiny_checkpoint))
    weights["model.layers.0.self_attn.bogus"] = torch.ones(4)  # anything else still refused
    save_file(weights, str(tmp_path / "old" / SINGLE_FILE))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(tmp_path / "old")


def test_loading_demo_by_name_points_at_the_demo_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./demo here
    with pytest.raises(CheckpointError, match=r"demo is not a directory: .*longvita\.DEMO_MODEL"):
        longvita.load("demo")
