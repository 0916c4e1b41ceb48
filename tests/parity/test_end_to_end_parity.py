"""End-to-end parity: `longvita.load(...).generate(...)` against an independent reference of the
official Long-VITA inference (tests/parity/reference.py), CPU fp32.

The reference re-implements the official preprocessing (dynamic tiling, tag expansion, frame
choice) and runs transformers' InternVLVisionModel and Qwen2ForCausalLM with the checkpoint's
weights, decoding greedily without a KV cache. Ours must give the same expanded prompt, the same
pixels, the same greedy tokens and the same per-step logits.

The checkpoints are random, with weights re-drawn large (std 0.2, norms and layer scales away
from their neutral values) so that every module matters and greedy choices are not near-ties:
the reference's smallest top-1/top-2 logit gap is checked to be far above the tolerance.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import longvita
from longvita.cli import main as cli_main
from longvita.config import LongVITAConfig, VisionConfig, tiny
from longvita.model.checkpoint import load_model, save_model
from longvita.testing import make_image, make_tiny_checkpoint, make_video
from tests.parity.reference import LongVITAReference

MAX_NEW_TOKENS = 8
WEIGHT_STD = 0.2
MIN_GAP = 1e-3  # greedy choices must be this far from a tie (10x the score tolerance)


def official_tile_config() -> LongVITAConfig:
    """tiny() with the official 448-px tile (32x32 patches -> 256 tokens per tile), tiny ViT."""
    vision = VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=448,
        patch_size=14,
    )
    return dataclasses.replace(tiny(), vision=vision)


CONFIGS = {"tile56": tiny, "tile448": official_tile_config}


def make_checkpoint(directory, config: LongVITAConfig, seed: int):
    """make_tiny_checkpoint, then every tensor re-drawn large and saved back with save_model."""
    make_tiny_checkpoint(directory, config=config, seed=seed)
    model = load_model(directory)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith((".ls1", ".ls2")):
                param.copy_(0.2 + torch.rand(param.shape, generator=generator))
            elif "norm" in name and name.endswith(".weight"):
                param.copy_(1.0 + WEIGHT_STD * noise)
            else:
                param.copy_(WEIGHT_STD * noise)
    save_model(model, directory)
    return directory


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-media")
    rgba = Image.open(make_image(root / "rgb.png", (320, 240), seed=3)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "rgba.png")
    palette = Image.open(make_image(root / "pal.png", (200, 150), seed=4)).convert("P")
    return {
        "scene": make_image(root / "scene.png", (640, 360)),
        "wide": make_image(root / "wide.png", (1000, 200), seed=1),
        "tall": make_image(root / "tall.jpg", (300, 700), seed=2),
        "rgba": root / "rgba.png",
        "tiny": make_image(root / "tiny.png", (10, 10), seed=5),
        "square": make_image(root / "square.png", (120, 120), seed=6),
        "palette": palette,  # a PIL image in mode P, passed as an object
        "clip": make_video(root / "clip.mp4", num_frames=16, fps=4),
    }


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Config name -> (our pipeline, the reference), each built once per module."""
    cache = {}

    def get(config_name):
        if config_name not in cache:
            directory = tmp_path_factory.mktemp(f"ckpt-{config_name}")
            make_checkpoint(directory, CONFIGS[config_name](), seed=1)
            cache[config_name] = (longvita.load(directory), LongVITAReference(directory))
        return cache[config_name]

    return get


@pytest.fixture
def setup(request, loaded):
    """(config name, our pipeline, the reference); the config name comes as an indirect param."""
    return (request.param, *loaded(request.param))


# name -> (prompt, images, videos, extra options); "system" is a system turn.
CASES = {
    "text": ("Describe a red square on a white background.", [], [], {}),
    "system": ("What is a fox?", [], [], {"system": "Answer using a single word."}),
    "image": ("<image>\nWhat is this?", ["scene"], [], {}),
    "wide": ("<image>\nWhat is this?", ["wide"], [], {}),
    "tall-jpeg": ("<image>\nWhat is this?", ["tall"], [], {}),
    "rgba-png": ("<image>\nWhat is this?", ["rgba"], [], {}),
    "tiny-10x10": ("<image>\nWhat is this?", ["tiny"], [], {}),
    "square-tie": ("<image>\nWhat is this?", ["square"], [], {}),
    "pil-palette": ("<image>\nWhat is this?", ["palette"], [], {}),
    "two-images": ("<image>\n<image>\nCompare the two images.", ["tall", "scene"], [], {}),
    "video": ("<video>\nDescribe the video in detail.", [], ["clip"], {}),
    "video-sampled": ("<video>\nDescribe the video.", [], ["clip"], {"max_frames": 5, "fps": 2.0}),
    "image-video": (
        "<image>\n<video>\nWhat is in the image and the video?",
        ["wide"],
        ["clip"],
        {},
    ),
}
# The official 448-px tile: 256 tokens per tile; a subset keeps the file fast.
CASES_448 = {"text", "image", "wide", "tiny-10x10", "two-images", "video-sampled"}
PAIRS = [
    pytest.param(config, name, id=f"{config}-{name}")
    for config in CONFIGS
    for name in CASES
    if config == "tile56" or name in CASES_448
]
# What some cases are there to exercise, checked so that they keep doing it.
GRIDS_56 = {
    "wide": [(5, 1)],  # aspect 5: five tiles and a thumbnail
    "tall-jpeg": [(2, 5)],
    "tiny-10x10": [(1, 1)],  # a single tile, no thumbnail, no rows
    "square-tie": [(3, 3)],  # 1x1, 2x2 and 3x3 tie; the area rule picks 3x3 at 56 px
}


def run_case(setup, media, name):
    _, pipe, reference = setup
    text, image_keys, video_keys, options = CASES[name]
    options = dict(options)
    system = options.pop("system", None)
    images = [media[k] for k in image_keys]
    videos = [media[k] for k in video_keys]
    messages = [{"role": "user", "content": text}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    video_kwargs = {"max_frames": options.get("max_frames"), "fps": options.get("fps")}
    ref_kwargs = {
        "system": system,
        "max_frames": options.get("max_frames", 4096),
        "max_fps": options.get("fps", 1.0),
    }
    return pipe, reference, messages, images, videos, video_kwargs, ref_kwargs


@pytest.mark.parametrize(("setup", "name"), PAIRS, indirect=["setup"])
def test_inputs_match_reference(setup, media, name):
    """Same expanded prompt and the same pixels, bit for bit, in the same order."""
    pipe, reference, messages, images, videos, video_kwargs, ref_kwargs = run_case(
        setup, media, name
    )
    ours = pipe.process(messages, images, videos, **video_kwargs)
    ref_ids, ref_pixels = reference.prepare(messages[-1]["content"], images, videos, **ref_kwargs)
    assert ours.input_ids.tolist() == ref_ids
    if setup[0] == "tile56" and name in GRIDS_56:
        assert ours.image_grids == GRIDS_56[name]
    torch.testing.assert_close(ours.pixel_values, ref_pixels, rtol=0, atol=0)


@pytest.mark.parametrize(("setup", "name"), PAIRS, indirect=["setup"])
def test_generate_matches_reference(setup, media, name):
    """Same greedy tokens and the same raw logits at every step as the cache-free reference."""
    pipe, reference, messages, images, videos, video_kwargs, ref_kwargs = run_case(
        setup, media, name
    )
    expected = reference.generate(
        messages[-1]["content"], images, videos, max_new_tokens=MAX_NEW_TOKENS, **ref_kwargs
    )
    assert expected.min_top2_gap > MIN_GAP, "near-tie in the reference: pick another seed"
    out = pipe.generate(
        messages,
        images=images,
        videos=videos,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=0.0,
        return_scores=True,
        **video_kwargs,
    )
    assert out.prompt_tokens == expected.prompt_tokens
    assert out.token_ids == expected.token_ids
    assert out.scores.shape == expected.scores.shape
    torch.testing.assert_close(out.scores, expected.scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("setup", list(CONFIGS), indirect=True)
def test_pixels_change_the_answer(setup, media):
    """The comparison is sensitive to the image: another image gives other logits."""
    _, pipe, _ = setup
    outs = [
        pipe.generate(
            "<image>\nWhat is this?", images=[media[k]], max_new_tokens=4, return_scores=True
        )
        for k in ("scene", "tall")
    ]
    steps = min(len(o.token_ids) for o in outs)
    assert steps > 0
    diff = (outs[0].scores[:steps] - outs[1].scores[:steps]).abs().max()
    assert diff > 0.1, f"the image barely changes the logits (max diff {diff:.3g})"


@pytest.mark.parametrize("setup", list(CONFIGS), indirect=True)
def test_cli_json_matches_reference(setup, media, capsys):
    _, pipe, reference = setup
    directory = str(reference.directory)
    path = str(media["wide"])
    expected = reference.generate("<image>\nWhat is this?", [path], max_new_tokens=MAX_NEW_TOKENS)
    argv = ["generate", "--model", directory, "--prompt", "<image>\\nWhat is this?"]
    argv += ["--image", path, "--json", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    assert cli_main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["token_ids"] == expected.token_ids
    assert record["prompt_tokens"] == expected.prompt_tokens
    assert record["text"] == pipe.tokenizer.decode(expected.token_ids, skip_special_tokens=True)
