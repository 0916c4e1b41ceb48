"""`train.init`: the three `init:` modes of a stage, their reproducibility and their errors.

Stage 1 starts from a tiny Hugging Face Qwen2 saved by transformers itself (every weight random,
norms and biases included) and a tiny InternViT directory in the public layout; the LLM must
come out unchanged (logits equal transformers' in fp32), the ViT tensors equal the saved ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from longvita.config import LongVITAConfig, tiny, vision_config_to_dict
from longvita.errors import CheckpointError
from longvita.model.checkpoint import load_model, save_model
from longvita.model.vision import InternVisionModel
from longvita.processing.tokens import LONG_VITA_TOKENS, special_token_ids
from longvita.testing import make_tiny_checkpoint, write_tiny_tokenizer
from longvita.train.init import (
    PROJECTOR_INIT_STD,
    RUN_MANIFEST,
    SOURCE_EXPORT,
    SOURCE_RUN,
    InitSpec,
    initialize,
    qwen2_config_fields,
    resolve_init_source,
)

VISION = tiny().vision  # 56-px tiles of 4 LLM tokens, 2 layers
QWEN2 = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=4096,
)
WEIGHT_STD = 0.1  # large enough that attention is far from uniform


def randomize(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * WEIGHT_STD
            param.copy_(1.0 + noise if "norm" in name else noise)


def write_qwen2(directory: Path, *, seed: int = 0, **overrides) -> transformers.Qwen2ForCausalLM:
    """A Qwen2 checkpoint as transformers writes it, plus the tiny tokenizer."""
    shard = overrides.pop("max_shard_size", None)
    config = transformers.Qwen2Config(**{**QWEN2, "tie_word_embeddings": False, **overrides})
    model = transformers.Qwen2ForCausalLM(config).to(torch.float32).eval()
    randomize(model, seed)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    write_tiny_tokenizer(directory)
    return model


def write_intern_vit(directory: Path, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """A public-layout InternViT directory: keys without `model.vision_model.`."""
    model = InternVisionModel(VISION)
    randomize(model, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {
        **vision_config_to_dict(VISION),
        "architectures": ["InternVisionModel"],
        "auto_map": {"AutoModel": "modeling_intern_vit.InternVisionModel"},
        "model_type": "intern_vit_6b",
        "torch_dtype": "bfloat16",
        "num_channels": 3,
        "attention_dropout": 0.0,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return state


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("init")
    hf = write_qwen2(root / "qwen2")
    vit_state = write_intern_vit(root / "vit")
    return {"root": root, "llm": root / "qwen2", "vision": root / "vit", "hf": hf, "vit": vit_state}


@pytest.fixture(scope="module")
def stage1(dirs):
    spec = InitSpec(llm=str(dirs["llm"]), vision=str(dirs["vision"]))
    return initialize(spec, seed=0)


def stage1_spec(dirs, llm=None, vision=None) -> InitSpec:
    return InitSpec(llm=str(llm or dirs["llm"]), vision=str(vision or dirs["vision"]))


def all_positions_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(ids, logit_positions=torch.arange(ids.shape[1]), **kwargs)  # [1, seq, vocab]


# -- stage 1 ---------------------------------------------------------------------------------


def test_stage1_llm_tensors_equal_the_qwen2_checkpoint(dirs, stage1):
    model, _ = stage1
    ours = model.state_dict()
    for key, value in dirs["hf"].state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)


def test_stage1_vit_tensors_equal_the_intern_vit_checkpoint(dirs, stage1):
    model, _ = stage1
    ours = model.model.vision_model.state_dict()
    assert set(ours) == set(dirs["vit"])
    for key, value in dirs["vit"].items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)


def test_stage1_projector_is_initialized_as_specified_and_reproducible(dirs, stage1):
    projector = stage1[0].model.vision_projection
    assert torch.equal(projector.pre_proj_layernorm.weight, torch.ones(4 * VISION.hidden_size))
    assert torch.equal(projector.pre_proj_layernorm.bias, torch.zeros(4 * VISION.hidden_size))
    for linear in (projector.mlp[0], projector.mlp[2]):
        assert linear.bias is None
        assert abs(linear.weight.std().item() - PROJECTOR_INIT_STD) < 0.15 * PROJECTOR_INIT_STD
        assert abs(linear.weight.mean().item()) < 0.1 * PROJECTOR_INIT_STD
    again = initialize(stage1_spec(dirs), seed=0)[0].model.vision_projection.state_dict()
    other = initialize(stage1_spec(dirs), seed=1)[0].model.vision_projection.state_dict()
    for key, value in projector.state_dict().items():
        assert torch.equal(again[key], value), key
    assert not torch.equal(other["mlp.0.weight"], projector.mlp[0].weight)


def test_stage1_config_tokenizer_and_trainable_state(dirs, stage1):
    model, tokenizer = stage1
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_key_value_heads) == (512, 64, 2)
    assert (config.rope_theta, config.max_position_embeddings) == (1e6, 4096)
    assert config.torch_dtype == "float32" and not config.tie_word_embeddings
    assert vision_config_to_dict(config.vision)["hidden_size"] == VISION.hidden_size
    assert config.vision.extra == {"num_channels": 3, "attention_dropout": 0.0}
    assert "architectures" not in config.extra and "rope_parameters" not in config.extra
    assert config.extra["hidden_act"] == "silu"  # the Qwen2 config's other model fields
    assert all(t in tokenizer.get_vocab() for t in LONG_VITA_TOKENS)
    assert model.training
    for name, param in model.named_parameters():
        assert param.requires_grad and param.device.type == "cpu", name
        assert param.dtype == torch.float32, name


def test_stage1_text_logits_equal_transformers_qwen2(dirs, stage1):
    model, tokenizer = stage1
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        expected = dirs["hf"](input_ids=ids).logits  # [1, seq, vocab]
        got = all_positions_logits(model, ids)
    torch.testing.assert_close(got, expected)


def test_stage1_forward_and_backward_with_an_image_tile(stage1):
    model, tokenizer = stage1
    special = special_token_ids(tokenizer)
    text = tokenizer.encode("What is in this image?")
    visual = [special.img_start, *[special.img_context] * VISION.tokens_per_tile, special.img_end]
    ids = torch.tensor([[special.im_start, *visual, *text]])
    mask = ids == special.img_context
    pixels = torch.randn(2, 3, VISION.image_size, VISION.image_size)
    logits = all_positions_logits(model, ids, pixel_values=pixels[:1], visual_mask=mask)
    assert logits.shape == (1, ids.shape[1], 512) and torch.isfinite(logits).all()
    with torch.no_grad():
        other = all_positions_logits(model, ids, pixel_values=pixels[1:], visual_mask=mask)
    assert not torch.allclose(logits[0, -1], other[0, -1])  # the tile reaches the answer
    logits[0, -1].logsumexp(-1).backward()
    projector = model.model.vision_projection
    assert projector.mlp[0].weight.grad is not None and projector.mlp[0].weight.grad.any()
    model.zero_grad(set_to_none=True)


def test_stage1_dtype_and_max_position_override(dirs):
    model, _ = initialize(
        stage1_spec(dirs), seed=0, dtype=torch.bfloat16, max_position_embeddings=131072
    )
    assert model.config.torch_dtype == "bfloat16"
    assert model.config.max_position_embeddings == 131072
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    hf_embed = dirs["hf"].model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, hf_embed.to(torch.bfloat16))


def test_stage1_tied_and_sharded_qwen2(dirs, tmp_path):
    hf = write_qwen2(tmp_path / "tied", seed=5, tie_word_embeddings=True, max_shard_size="40KB")
    assert (tmp_path / "tied" / "model.safetensors.index.json").is_file()
    model, tokenizer = initialize(stage1_spec(dirs, llm=tmp_path / "tied"), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([tokenizer.encode("A red square, a blue circle.")])
    with torch.no_grad():
        torch.testing.assert_close(all_positions_logits(model, ids), hf(input_ids=ids).logits)


def test_stage1_model_saved_then_restarted_from(dirs, stage1, tmp_path):
    model, tokenizer = stage1
    save_model(model, tmp_path / "export", write_extra=tokenizer.save_pretrained)
    again, _ = initialize(InitSpec(from_=str(tmp_path / "export")), seed=9)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_known_to_ignore_vit_keys_are_skipped(dirs, tmp_path):
    vit = copy(dirs["vision"], tmp_path / "vit")
    state = load_file(vit / "model.safetensors")
    state["clip_projector.norm1_q.weight"] = torch.ones(VISION.hidden_size)
    save_file(state, str(vit / "model.safetensors"))
    model, _ = initialize(stage1_spec(dirs, vision=vit), seed=0)
    assert "clip_projector" not in " ".join(model.state_dict())


# -- stages 2-4 and random weights -------------------------------------------------------------


def test_from_export_dir_equals_load_model(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "export", seed=3)
    assert resolve_init_source(directory).kind == SOURCE_EXPORT
    model, tokenizer = initialize(InitSpec.from_dict({"from": str(directory)}), seed=0)
    expected = load_model(directory)
    assert model.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert len(tokenizer) == len(write_and_load_tokenizer(tmp_path / "tok"))


def write_and_load_tokenizer(directory: Path):
    from longvita.processing.tokens import load_tokenizer

    return load_tokenizer(write_tiny_tokenizer(directory))


def test_a_run_directory_is_a_source_of_its_own_kind(tmp_path):
    """Run directories (and their step-N checkpoints) load through `train.export`; one without
    a complete checkpoint is refused (tests/train/ train and load real ones)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    (run / RUN_MANIFEST).write_text("{}")
    for path in (run, run / "checkpoints" / "step-10"):
        assert resolve_init_source(path).kind == SOURCE_RUN
    with pytest.raises(ValueError, match="has no complete checkpoint"):
        initialize(InitSpec(from_=str(run)), seed=0)


def test_from_a_qwen2_dir_says_to_use_stage1(dirs):
    with pytest.raises(CheckpointError, match="Qwen2 checkpoint.*init: {llm: DIR"):
        initialize(InitSpec(from_=str(dirs["llm"])), seed=0)


def test_random_init_is_reproducible_and_leaves_the_global_rng_alone(dirs):
    spec = InitSpec.from_dict({"model": "tiny", "tokenizer": str(dirs["llm"])})
    rng = torch.get_rng_state()
    first, tokenizer = initialize(spec, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    second = initialize(spec, seed=3)[0].state_dict()
    other = initialize(spec, seed=4)[0].state_dict()
    for key, value in first.state_dict().items():
        assert torch.equal(second[key], value), key
        if "norm" not in key and "bias" not in key and not key.endswith(("ls1", "ls2")):
            assert not torch.equal(other[key], value), key
    embed = first.model.embed_tokens.weight
    assert abs(embed.std().item() - 0.02) < 0.002
    assert not first.model.layers[0].self_attn.q_proj.bias.any()
    assert torch.equal(first.model.vision_projection.pre_proj_layernorm.weight, torch.ones(128))
    assert first.config.torch_dtype == "float32" and len(tokenizer) <= first.config.vocab_size


@pytest.mark.parametrize("as_directory", [False, True])
def test_random_init_from_a_config_json(tmp_path, dirs, as_directory):
    config = LongVITAConfig.from_dict({**tiny().to_dict(), "hidden_size": 32})
    path = config.save_pretrained(tmp_path)
    spec = InitSpec(model=str(tmp_path if as_directory else path), tokenizer=str(dirs["llm"]))
    model, _ = initialize(spec, seed=0)
    assert model.config.hidden_size == 32


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"llm": "a", "vision": "b", "from": "c"}, "exactly one of .*got init.llm, init.vision, "),
        ({"from": "a", "model": "tiny", "tokenizer": "t"}, "exactly one of"),
        ({}, "got nothing"),
        ({"llm": None}, "got nothing"),
        ({"llm": "a"}, "init.llm: needs init.vision"),
        ({"vision": "a"}, "init.vision: needs init.llm"),
        ({"model": "tiny"}, "init.model: needs init.tokenizer"),
        ({"from": "a", "tokenizer": "t"}, "init.tokenizer: only used with init.model"),
        ({"llm": "a", "vision": "b", "vison": "c"}, r"unknown key\(s\) \['vison'\]"),
        ({"llm": 3, "vision": "b"}, "init.llm: must be a non-empty path string, got 3"),
        ({"from": ""}, "init.from: must be a non-empty path string"),
        (["from", "a"], "init: must be a mapping"),
    ],
)
def test_bad_init_sections(data, message):
    with pytest.raises(ValueError, match=message):
        InitSpec.from_dict(data)


def test_relative_paths_are_taken_from_the_stage_file_directory(tmp_path):
    spec = InitSpec.from_dict({"model": "tiny", "tokenizer": "tok"}, base_dir=tmp_path)
    assert (spec.model, spec.tokenizer, spec.mode) == ("tiny", str(tmp_path / "tok"), "random")
    assert InitSpec.from_dict({"from": "~/x"}).from_ == str(Path.home() / "x")


def test_check_paths_names_the_key(dirs, tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    cases = [
        (InitSpec(llm=str(tmp_path / "nope"), vision=str(dirs["vision"])), "init.llm: .* does not"),
        (InitSpec(llm=str(dirs["llm"]), vision=str(tmp_path / "file")), "init.vision: .* not a"),
        (InitSpec(llm=str(tmp_path / "empty"), vision=str(dirs["vision"])), "has no config.json"),
        (InitSpec(from_=str(tmp_path / "nope")), "init.from: .* does not exist"),
        (InitSpec(model="tiny", tokenizer=str(tmp_path / "nope")), "init.tokenizer: .* does not"),
        (InitSpec(model="tinyy", tokenizer=str(dirs["llm"])), "neither a preset .*14b, tiny"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            spec.check_paths()
        with pytest.raises(ValueError, match=message):
            initialize(spec, seed=0)


def test_a_config_of_another_model_type(dirs, tmp_path):
    llm = copy(dirs["llm"], tmp_path / "llama")
    edit_json(llm / "config.json", model_type="llama")
    with pytest.raises(CheckpointError, match=r"llama/config.json: model_type is 'llama'; expe"):
        initialize(stage1_spec(dirs, llm=llm), seed=0)
    vit = copy(dirs["vision"], tmp_path / "chat")
    edit_json(vit / "config.json", model_type="internvl_chat")
    with pytest.raises(CheckpointError, match=r"chat/config.json: model_type is 'internvl_chat'"):
        initialize(stage1_spec(dirs, vision=vit), seed=0)


def test_vit_with_an_unexpected_key(dirs, tmp_path):
    vit = copy(dirs["vision"], tmp_path / "vit")
    state = load_file(vit / "model.safetensors")
    state["post_layernorm.weight"] = torch.ones(VISION.hidden_size)
    save_file(state, str(vit / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"vit: .*1 unexpected key\(s\): post_layernorm"):
        initialize(stage1_spec(dirs, vision=vit), seed=0)


def test_missing_and_misshaped_keys(dirs, tmp_path):
    vit = copy(dirs["vision"], tmp_path / "vit")
    state = load_file(vit / "model.safetensors")
    del state["encoder.layers.1.ls2"]
    save_file(state, str(vit / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): encoder.layers.1.ls2"):
        initialize(stage1_spec(dirs, vision=vit), seed=0)
    llm = copy(dirs["llm"], tmp_path / "llm")
    edit_json(llm / "config.json", intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"llm: .*shape mismatch.*mlp.down_proj.weight"):
        initialize(stage1_spec(dirs, llm=llm), seed=0)


def test_vit_with_only_pytorch_bin(dirs, tmp_path):
    vit = copy(dirs["vision"], tmp_path / "vit")
    torch.save(load_file(vit / "model.safetensors"), vit / "pytorch_model.bin")
    (vit / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only PyTorch pickle weights .*pytorch_model.bin"):
        initialize(stage1_spec(dirs, vision=vit), seed=0)


def test_vocab_too_small_for_the_tokenizer(dirs, tmp_path):
    size = len(write_and_load_tokenizer(tmp_path / "tok"))
    write_qwen2(tmp_path / "small", vocab_size=size - 1)
    message = f"has {size} tokens .*{len(LONG_VITA_TOKENS)} Long-VITA.*only {size - 1} embedding"
    with pytest.raises(CheckpointError, match=message):
        initialize(stage1_spec(dirs, llm=tmp_path / "small"), seed=0)


def test_random_init_without_tokenizer_files(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(CheckpointError, match="has no tokenizer files"):
        initialize(InitSpec(model="tiny", tokenizer=str(tmp_path / "tok")), seed=0)


def test_qwen2_configs_in_both_transformers_spellings():
    v4 = {"model_type": "qwen2", **QWEN2, "torch_dtype": "bfloat16", "rope_scaling": None}
    v5 = {**v4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    del v5["rope_theta"]
    assert qwen2_config_fields(v4)["rope_theta"] == 1e6
    assert qwen2_config_fields(v5)["rope_theta"] == 5e5
    assert qwen2_config_fields({**v4, "num_key_value_heads": None})["num_key_value_heads"] == 4
    yarn = {**v4, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope_scaling of type 'yarn' is not supported"):
        qwen2_config_fields(yarn)
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        qwen2_config_fields({**v4, "use_sliding_window": True})
    with pytest.raises(ValueError, match=r"missing field\(s\) \['vocab_size'\]"):
        qwen2_config_fields({k: v for k, v in v4.items() if k != "vocab_size"})


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_weights_that_do_not_fit_the_config_are_named(tmp_path, tie):
    """A checkpoint of a model with fewer layers (or other shapes) than its run's config.json:
    loading must refuse, not leave the missing weights as the empty model's memory."""
    import dataclasses

    import torch.distributed.checkpoint as dcp

    from longvita.model.long_vita import LongVITAForCausalLM
    from longvita.parallel.dcp import TRAINING_KEY, load_model_weights
    from longvita.testing import random_model

    config = dataclasses.replace(tiny(), tie_word_embeddings=tie)
    trained = random_model(config, seed=3)
    weights = trained.state_dict()
    if tie:
        weights.pop("lm_head.weight")  # a tied head need not be stored
    dcp.save({TRAINING_KEY: {"model": weights}}, checkpoint_id=str(tmp_path), no_dist=True)
    same = LongVITAForCausalLM(config)
    load_model_weights(tmp_path, same)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(same.state_dict()[name], tensor), name
    deeper = dataclasses.replace(config, num_hidden_layers=config.num_hidden_layers + 1)
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.2"):
        load_model_weights(tmp_path, LongVITAForCausalLM(deeper))
    wider = dataclasses.replace(config, intermediate_size=config.intermediate_size * 2)
    with pytest.raises(CheckpointError, match="of another shape"):
        load_model_weights(tmp_path, LongVITAForCausalLM(wider))
