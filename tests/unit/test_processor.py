"""Prompt building and tag expansion, with the tiny and the real Qwen2.5 tokenizer."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from longvita.config import VisionConfig, tiny
from longvita.errors import MediaError, PromptError
from longvita.processing.chat import build_prompt
from longvita.processing.processor import Processor, expand_tags
from longvita.processing.tokens import LONG_VITA_TOKENS, SpecialTokenIds, load_tokenizer
from longvita.testing import make_image, make_video, write_tiny_tokenizer

OFFICIAL_VISION = VisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)


@pytest.fixture(scope="module")
def tiny_processor(tmp_path_factory) -> Processor:
    directory = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return Processor(load_tokenizer(directory), tiny().vision)


@pytest.fixture(scope="module")
def real_processor(qwen2_tokenizer_dir) -> Processor:
    return Processor(load_tokenizer(qwen2_tokenizer_dir), OFFICIAL_VISION)


def test_chatml_prompt_has_no_default_system_turn():
    assert build_prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with_system = build_prompt(
        [{"role": "system", "content": "S"}, {"role": "human", "content": "q"}]
    )
    assert with_system.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq")
    with pytest.raises(ValueError, match="role"):
        build_prompt([{"role": "robot", "content": "x"}])


def test_real_tokenizer_gets_official_ids(real_processor):
    tokenizer = real_processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(LONG_VITA_TOKENS))
    assert ids == list(range(151665, 151682))
    tokens = real_processor.tokens
    assert (tokens.im_start, tokens.im_end, tokens.pad) == (151644, 151645, 151643)
    assert tokens.newline == (198,)


def test_real_tokenizer_prompt_matches_official_ids(real_processor, tmp_path):
    """`<image>\\nWhat is this?` with a one-tile image, as the official code tokenizes it."""
    image = make_image(tmp_path / "square.png", (448, 448))
    out = real_processor("<image>\nWhat is this?", images=[image])
    expected = (
        [151644, 872, 198]  # <|im_start|> user \n
        + [151665]
        + [151667] * 256
        + [151666]  # <img> 256 x <IMG_CONTEXT> </img>
        + [198, 3838, 374, 419, 30]  # \n What is this ?
        + [151645, 198, 151644, 77091, 198]  # <|im_end|> \n <|im_start|> assistant \n
    )
    assert out.input_ids.tolist() == expected
    assert out.num_tiles == 1 and int(out.visual_mask.sum()) == 256


def test_multi_tile_image_costs_258_tokens_per_tile(real_processor, tmp_path):
    image = make_image(tmp_path / "wide.png", (1344, 448))  # grid (3, 1): thumbnail + 3 tiles
    out = real_processor("<image>", images=[image])
    text_only = real_processor("").num_tokens
    assert out.image_grids == [(3, 1)] and out.num_tiles == 4
    assert out.num_tokens - text_only == 4 * 258 + 1  # one "\n" before the single tile row
    ids = out.input_ids.tolist()
    tok = real_processor.tokens
    assert ids.count(tok.patch_start) == 3 and ids.count(tok.img_start) == 1


def test_expand_tags_layout():
    tokens = SpecialTokenIds(
        im_start=1,
        im_end=2,
        pad=0,
        img_start=10,
        img_end=11,
        img_context=12,
        vid_start=20,
        vid_end=21,
        vid_context=22,
        patch_start=30,
        patch_end=31,
        patch_context=32,
        image_tag=40,
        video_tag=41,
        newline=(9,),
    )
    ids, labels = expand_tags(
        [5, 40, 41, 6],
        tokens=tokens,
        tokens_per_tile=2,
        image_grids=[(2, 2)],
        video_frames=[2],
        labels=[-100, -100, -100, 6],
    )
    image = [10, 12, 12, 11] + ([9] + [30, 32, 32, 31] * 2) * 2
    video = [20, 22, 22, 21] * 2
    assert ids == [5, *image, *video, 6]
    assert labels == [-100] * (len(ids) - 1) + [6]


def test_training_labels_supervise_every_answer_with_im_end_and_newline(real_processor, tmp_path):
    image = make_image(tmp_path / "a.png", (448, 448))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A gradient."},
        {"role": "human", "content": "And the colours?"},
        {"role": "gpt", "content": "Red and blue."},
    ]
    out = real_processor.encode_conversation(messages, images=[image])
    ids, labels = out.input_ids.tolist(), out.labels.tolist()
    tokenizer = real_processor.tokenizer
    supervised = [i for i, label in enumerate(labels) if label != -100]
    assert all(labels[i] == ids[i] for i in supervised)
    spans = tokenizer.decode([ids[i] for i in supervised])
    assert spans == "A gradient.<|im_end|>\nRed and blue.<|im_end|>\n"
    # the same tokens as the inference prompt of the first turns (one tokenization)
    prompt = real_processor(messages[:2], images=[image]).input_ids.tolist()
    assert ids[: len(prompt)] == prompt
    assert not out.visual_mask[torch.tensor(supervised)].any()


def _official_preprocess(tokenizer, messages):
    """The official training code's text tokenization (its dataset_qwen2.py `preprocess`,
    before tag expansion): each turn's pieces tokenized on their own."""

    def tok(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    ids, labels = [], []
    for turn in messages:
        role = {"human": "user", "gpt": "assistant"}.get(turn["role"], turn["role"])
        header = tok("<|im_start|>") + tok(role) + tok("\n")
        body = tok(turn["content"]) + tok("<|im_end|>") + tok("\n")
        ids += header + body
        labels += [-100] * len(header) + (body if role == "assistant" else [-100] * len(body))
    return ids, labels


@pytest.mark.parametrize(
    "answer", ["\nYes", "\n\nTwo blank lines first.", "  spaced", "Plain.", "\r\nCRLF", ""]
)
def test_training_tokens_and_labels_are_the_official_ones(real_processor, answer):
    """A turn whose text starts with a newline would merge it with the header's in one
    tokenization (271 = "\\n\\n"): the official code tokenizes the turn's text alone."""
    messages = [
        {"role": "system", "content": "\nBe brief."},
        {"role": "user", "content": "\nHi"},
        {"role": "assistant", "content": answer},
        {"role": "human", "content": "More?"},
        {"role": "gpt", "content": answer + " more"},
    ]
    out = real_processor.encode_conversation(messages)
    ids, labels = _official_preprocess(real_processor.tokenizer, messages)
    assert out.input_ids.tolist() == ids and out.labels.tolist() == labels


def test_training_needs_an_assistant_turn(tiny_processor):
    with pytest.raises(ValueError, match="no assistant turn"):
        tiny_processor.encode_conversation([{"role": "user", "content": "hi"}])


def test_video_before_image_keeps_tiles_in_sequence_order(tiny_processor, tmp_path):
    image = make_image(tmp_path / "a.png", (56, 56))
    video = make_video(tmp_path / "v.mp4", num_frames=3, fps=1, size=(32, 32))
    out = tiny_processor("<video><image>", images=[image], videos=[video])
    assert out.video_frames == [3] and out.image_grids == [(1, 1)]
    ids = out.input_ids
    tok = tiny_processor.tokens
    first_vid = int((ids == tok.vid_context).nonzero()[0])
    first_img = int((ids == tok.img_context).nonzero()[0])
    assert first_vid < first_img
    alone = tiny_processor("<image>", images=[image]).pixel_values
    torch.testing.assert_close(out.pixel_values[-1:], alone, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("prompt", "num_images", "num_videos", "message"),
    [
        ("<image><image>", 1, 0, "2 <image> tag"),
        ("no tags", 1, 0, "0 <image> tag"),
        ("<video>", 0, 0, "1 <video> tag"),
    ],
)
def test_media_count_mismatch(tiny_processor, tmp_path, prompt, num_images, num_videos, message):
    image = make_image(tmp_path / "a.png", (20, 20))
    video = make_video(tmp_path / "v.mp4", num_frames=2, size=(32, 32))
    with pytest.raises(PromptError, match=message):
        tiny_processor(prompt, images=[image] * num_images, videos=[video] * num_videos)


def test_frame_limits_are_applied(tiny_processor, tmp_path):
    video = make_video(tmp_path / "v.mp4", num_frames=20, fps=4, size=(32, 32))
    assert tiny_processor("<video>", videos=[video]).video_frames == [5]  # 5 s at 1 fps
    assert tiny_processor("<video>", videos=[video], fps=2).video_frames == [10]
    assert tiny_processor("<video>", videos=[video], max_frames=3).video_frames == [3]


@pytest.mark.parametrize(
    ("prompt", "media", "error", "message"),
    [
        ("<image>", {"images": "a.png"}, ValueError, "images must be a list"),
        ("<video>", {"videos": "v.mp4"}, ValueError, "videos must be a list"),
        ("<image>", {"images": [b"\x89PNG"]}, MediaError, "got bytes"),
        ("<image>", {"images": [torch.zeros(3, 8, 8)]}, MediaError, "got Tensor"),
        ("<video>", {"videos": [b"\x00\x00"]}, MediaError, "got bytes"),
        ("<video>", {"videos": [[]]}, MediaError, "list of 0 item"),
        ("<video>", {"videos": [["a.png"]]}, MediaError, "(str)"),
    ],
)
def test_media_of_the_wrong_type_are_named(tiny_processor, prompt, media, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_processor(prompt, **media)


def test_frames_in_memory_are_converted_like_frame_files(tiny_processor, tmp_path):
    """Transparency on white, 16-bit greys scaled: the same tiles from memory and from disk."""
    import numpy as np
    from PIL import Image

    clear = Image.new("RGBA", (40, 30), (0, 255, 0, 0))
    deep = Image.fromarray(np.full((30, 40), 32896, dtype="<u2"))
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    clear.save(frames_dir / "0.png")
    deep.save(frames_dir / "1.png")
    in_memory = tiny_processor("<video>", videos=[[clear, deep]])
    on_disk = tiny_processor("<video>", videos=[frames_dir])
    assert torch.equal(in_memory.tiles.get_all(), on_disk.tiles.get_all())


def test_a_system_turn_anywhere_renders_as_qwen_s_chat_template_does(qwen2_tokenizer_dir):
    from transformers import Qwen2TokenizerFast

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "system", "content": "Now answer in French."},
        {"role": "user", "content": "Bye"},
    ]
    qwen = Qwen2TokenizerFast.from_pretrained(str(qwen2_tokenizer_dir))
    expected = qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert build_prompt(messages) == expected


def _truncated_png(path):
    """A PNG cut short: its header reads, its pixels do not (opened lazily by PIL)."""
    make_image(path, (64, 48))
    path.write_bytes(path.read_bytes()[:-200])
    return Image.open(path)


def test_pil_inputs_that_cannot_be_read_are_media_errors(tiny_processor, tmp_path):
    closed = Image.new("RGB", (40, 30))
    closed.close()
    empty = Image.new("RGB", (0, 0))
    for image, message in [
        (_truncated_png(tmp_path / "cut.png"), r"cannot read image \(PIL\): image file is trunc"),
        (closed, r"cannot read image \(PIL\): Operation on closed image"),
        (empty, r"image \(PIL\) has no pixels \(0x0\)"),
    ]:  # at planning, not from PIL's depths in the middle of the work
        with pytest.raises(MediaError, match=message):
            tiny_processor("<image>", images=[image])
    frame = Image.new("RGB", (40, 30))
    with pytest.raises(MediaError, match=r"video frame 1 \(PIL\) has no pixels"):
        tiny_processor("<video>", videos=[[frame, empty]])
    prompt = tiny_processor("<video>", videos=[[frame, _truncated_png(tmp_path / "f.png")]])
    with pytest.raises(MediaError, match=r"cannot read video frame 1 \(PIL\): image file is"):
        prompt.pixel_values  # noqa: B018 (a frame list's frames are read when tiled)
