"""An independent reference of the official Long-VITA inference, for end-to-end parity tests.

Written from the official semantics (InternVL `dynamic_preprocess` tiling, Long-VITA's tag
expansion, InternVL's pixel shuffle) without importing anything from `longvita`: it reads the
checkpoint directory with `json` + `safetensors` and the tokenizer with `AutoTokenizer`, and runs
transformers' `InternVLVisionModel` and `Qwen2ForCausalLM`. Decoding is greedy and uses no KV
cache: every step is a full forward over the whole, growing sequence, as the official context
parallel inference does. CPU, float32.

Not supported on purpose: a `<video>` tag before an `<image>` tag (the official code misplaces
the features then, see LONGVITA.md "Known defects"); the reference refuses such prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import InternVLVisionModel

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MAX_NUM = 12
LONG_VITA_TOKENS = [
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<vid>",
    "</vid>",
    "<VID_CONTEXT>",
    "<patch>",
    "</patch>",
    "<PATCH_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<image>",
    "<video>",
]


# ----------------------------------------------------------------------------- pixels


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:  # noqa: SIM102 (the official code's structure)
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, image_size, min_num=1, max_num=MAX_NUM):
    """InternVL's dynamic tiling; Long-VITA puts the thumbnail first. Returns (tiles, (i, j))."""
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size
    )
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    if len(processed_images) != 1:
        processed_images = [image.resize((image_size, image_size))] + processed_images
    return processed_images, target_aspect_ratio


def expand2square(pil_img, background_color):
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def process_tile(image, image_size):
    """expand2square with int(mean*255), bicubic resize, /255, normalize, CHW: [3, S, S]."""
    image = expand2square(image, tuple(int(x * 255) for x in MEAN))
    image = image.resize((image_size, image_size), resample=Image.BICUBIC)
    image = np.array(image, dtype=np.float32)
    image = image * 1.0 / 255.0
    mean = np.array(MEAN, dtype=np.float32)
    std = np.array(STD, dtype=np.float32)
    image = (image - mean) / std
    return torch.tensor(image).permute(2, 0, 1)


def image_pixels(path_or_image, image_size):
    """One image -> ([tiles, 3, S, S], (cols, rows))."""
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    if image.has_transparency_data:
        # Our documented difference: transparency is composited on white (the official code's
        # .convert("RGB") drops the alpha channel). Opaque images are unchanged.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")
    tiles, grid = dynamic_preprocess(image, image_size)
    return torch.stack([process_tile(t, image_size) for t in tiles]), grid


def video_pixels(path, image_size, max_frames, max_fps):
    """Decode every frame; take idx = int(k * step) (decord-style indexing of all frames)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    total = len(frames)
    step = max(fps / max_fps, total / (max_frames + 1))
    idx = [int(k * step) for k in range(max_frames)]
    idx = [i for i in idx if i < total]
    images = [Image.fromarray(frames[i]) for i in idx]
    return torch.stack([process_tile(im, image_size) for im in images]), len(idx)


# ----------------------------------------------------------------------------- tokens


def load_reference_tokenizer(directory):
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    vocab = tokenizer.get_vocab()
    missing = [t for t in LONG_VITA_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer


def chatml(text, system=None):
    prompt = ""
    if system is not None:
        prompt += f"<|im_start|>system\n{system}<|im_end|>\n"
    prompt += f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return prompt


def tid(tokenizer, token):
    return tokenizer.convert_tokens_to_ids(token)


def expand_prompt(tokenizer, input_ids, image_grids, num_frames, tokens_per_tile):
    """The official order: replace every <image> tag first, then every <video> tag."""
    nl_tokens = tokenizer("\n", add_special_tokens=False).input_ids
    input_ids = list(input_ids)

    image_tag = tid(tokenizer, "<image>")
    positions = [i for i, x in enumerate(input_ids) if x == image_tag]
    assert len(positions) == len(image_grids), "one image per <image> tag"
    for position, (cols, rows) in reversed(list(zip(positions, image_grids, strict=True))):
        image_ids = (
            [tid(tokenizer, "<img>")]
            + [tid(tokenizer, "<IMG_CONTEXT>")] * tokens_per_tile
            + [tid(tokenizer, "</img>")]
        )
        if cols * rows > 1:
            for _ in range(rows):
                image_ids += nl_tokens
                for _ in range(cols):
                    image_ids += (
                        [tid(tokenizer, "<patch>")]
                        + [tid(tokenizer, "<PATCH_CONTEXT>")] * tokens_per_tile
                        + [tid(tokenizer, "</patch>")]
                    )
        input_ids = input_ids[:position] + image_ids + input_ids[position + 1 :]

    video_tag = tid(tokenizer, "<video>")
    positions = [i for i, x in enumerate(input_ids) if x == video_tag]
    assert len(positions) == len(num_frames), "one video per <video> tag"
    for position, frames in reversed(list(zip(positions, num_frames, strict=True))):
        frame_ids = (
            [tid(tokenizer, "<vid>")]
            + [tid(tokenizer, "<VID_CONTEXT>")] * tokens_per_tile
            + [tid(tokenizer, "</vid>")]
        )
        input_ids = input_ids[:position] + frame_ids * frames + input_ids[position + 1 :]
    return input_ids


# ----------------------------------------------------------------------------- model


def read_checkpoint(directory):
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                state[key] = handle.get_tensor(key).float()
    return state


def build_vision(visual, state):
    config = InternVLVisionConfig(
        hidden_size=visual["hidden_size"],
        intermediate_size=visual["intermediate_size"],
        num_hidden_layers=visual["num_hidden_layers"],
        num_attention_heads=visual["num_attention_heads"],
        image_size=visual["image_size"],
        patch_size=visual["patch_size"],
        layer_norm_eps=visual.get("layer_norm_eps", 1e-6),
        attention_bias=visual.get("qkv_bias", True),
        use_qk_norm=False,
        hidden_act="gelu",
        norm_type="layer_norm",
        use_absolute_position_embeddings=True,
        use_mean_pooling=True,  # the final layernorm becomes an Identity: no final norm
    )
    config._attn_implementation = "eager"
    model = InternVLVisionModel(config).eval()
    assert isinstance(model.layernorm, torch.nn.Identity)
    p = "model.vision_model."
    sd = {
        "embeddings.cls_token": state[p + "embeddings.class_embedding"],
        "embeddings.position_embeddings": state[p + "embeddings.position_embedding"],
        "embeddings.patch_embeddings.projection.weight": state[
            p + "embeddings.patch_embedding.weight"
        ],
        "embeddings.patch_embeddings.projection.bias": state[p + "embeddings.patch_embedding.bias"],
    }
    for n in range(visual["num_hidden_layers"]):
        src, dst = f"{p}encoder.layers.{n}.", f"encoder.layer.{n}."
        for suffix in ("weight", "bias"):
            key = f"{src}attn.qkv.{suffix}"
            if key in state:
                q, k, v = state[key].chunk(3, dim=0)
                sd[f"{dst}attention.q_proj.{suffix}"] = q
                sd[f"{dst}attention.k_proj.{suffix}"] = k
                sd[f"{dst}attention.v_proj.{suffix}"] = v
            sd[f"{dst}attention.projection_layer.{suffix}"] = state[f"{src}attn.proj.{suffix}"]
            sd[f"{dst}mlp.fc1.{suffix}"] = state[f"{src}mlp.fc1.{suffix}"]
            sd[f"{dst}mlp.fc2.{suffix}"] = state[f"{src}mlp.fc2.{suffix}"]
            sd[f"{dst}layernorm_before.{suffix}"] = state[f"{src}norm1.{suffix}"]
            sd[f"{dst}layernorm_after.{suffix}"] = state[f"{src}norm2.{suffix}"]
        sd[f"{dst}lambda_1"] = state[f"{src}ls1"]
        sd[f"{dst}lambda_2"] = state[f"{src}ls2"]
    model.load_state_dict(sd, strict=True)
    return model


def build_llm(config, state):
    hf_config = transformers.Qwen2Config(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=config["rope_theta"],
        max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        use_sliding_window=False,
        attn_implementation="eager",
    )
    model = transformers.Qwen2ForCausalLM(hf_config).to(torch.float32).eval()
    sd = {
        k: v
        for k, v in state.items()
        if k == "lm_head.weight" or (k.startswith("model.") and not k.startswith("model.vision"))
    }
    model.load_state_dict(sd, strict=True)
    return model


def pixel_shuffle(x, scale_factor=0.5):
    """InternVL's pixel shuffle (ps_version v2), written the official way."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor**2)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    scores: torch.Tensor  # [len(token_ids), vocab] last-position logits of each step
    prompt_tokens: int
    input_ids: list[int]
    min_top2_gap: (
        float  # smallest top-1 minus top-2 logit over the steps (ties make greedy fragile)
    )


class LongVITAReference:
    """The official inference path on transformers modules; see the module docstring."""

    def __init__(self, directory):
        self.directory = directory = Path(directory)
        self.config = json.loads((directory / "config.json").read_text())
        self.visual = self.config["visual"]
        self.image_size = self.visual["image_size"]
        grid = self.image_size // self.visual["patch_size"]
        self.tokens_per_tile = (grid // 2) ** 2
        state = read_checkpoint(directory)
        self.tokenizer = load_reference_tokenizer(directory)
        self.vision = build_vision(self.visual, state)
        self.llm = build_llm(self.config, state)
        p = "model.vision_projection."
        self.ln_weight = state[p + "pre_proj_layernorm.weight"]
        self.ln_bias = state[p + "pre_proj_layernorm.bias"]
        self.fc1 = state[p + "mlp.0.weight"]
        self.fc2 = state[p + "mlp.2.weight"]
        self.stop_ids = {tid(self.tokenizer, "<|im_end|>"), tid(self.tokenizer, "<|endoftext|>")}

    @torch.no_grad()
    def encode_tiles(self, pixel_values):
        """[tiles, 3, S, S] -> [tiles * tokens_per_tile, llm_hidden]."""
        vit_embeds = self.vision(pixel_values=pixel_values).last_hidden_state[:, 1:, :]
        h = w = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
        vit_embeds = pixel_shuffle(vit_embeds, scale_factor=0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        x = F.layer_norm(vit_embeds, (vit_embeds.shape[-1],), self.ln_weight, self.ln_bias, 1e-5)
        x = F.linear(x, self.fc1)
        x = F.gelu(x)
        x = F.linear(x, self.fc2)
        return x.reshape(-1, x.shape[-1])

    def prepare(self, text, images=(), videos=(), *, system=None, max_frames=4096, max_fps=1.0):
        """(expanded input ids, [tiles, 3, S, S] pixels in official order: images, then videos)."""
        input_ids = self.tokenizer(chatml(text, system), add_special_tokens=False).input_ids
        image_tag, video_tag = tid(self.tokenizer, "<image>"), tid(self.tokenizer, "<video>")
        tags = [x for x in input_ids if x in (image_tag, video_tag)]
        if video_tag in tags and image_tag in tags[tags.index(video_tag) :]:
            raise NotImplementedError("<video> before <image>: the official code misplaces it")
        pixels, grids, frames = [], [], []
        for image in images:
            tiles, grid = image_pixels(image, self.image_size)
            pixels.append(tiles)
            grids.append(grid)
        for video in videos:
            tiles, count = video_pixels(video, self.image_size, max_frames, max_fps)
            pixels.append(tiles)
            frames.append(count)
        input_ids = expand_prompt(self.tokenizer, input_ids, grids, frames, self.tokens_per_tile)
        size = self.image_size
        pixel_values = torch.cat(pixels) if pixels else torch.zeros(0, 3, size, size)
        return input_ids, pixel_values

    @torch.no_grad()
    def generate(self, text, images=(), videos=(), *, max_new_tokens=8, **kwargs):
        input_ids, pixel_values = self.prepare(text, images, videos, **kwargs)
        ids = torch.tensor([input_ids])
        embeds = self.llm.get_input_embeddings()(ids)  # [1, seq, hidden]
        context = [tid(self.tokenizer, t) for t in ("<IMG_CONTEXT>", "<PATCH_CONTEXT>")]
        context.append(tid(self.tokenizer, "<VID_CONTEXT>"))
        positions = [i for i, x in enumerate(input_ids) if x in context]
        if pixel_values.shape[0]:
            features = self.encode_tiles(pixel_values)
            assert features.shape[0] == len(positions), (features.shape, len(positions))
            embeds[0, positions] = features
        else:
            assert not positions

        tokens, scores, gaps = [], [], []
        for _ in range(max_new_tokens):
            logits = self.llm(inputs_embeds=embeds, use_cache=False).logits[0, -1]  # [vocab]
            top2 = logits.topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            token = int(logits.argmax())
            if token in self.stop_ids:
                break
            tokens.append(token)
            scores.append(logits.float())
            new = self.llm.get_input_embeddings()(torch.tensor([[token]]))
            embeds = torch.cat([embeds, new], dim=1)
        vocab = self.config["vocab_size"]
        return ReferenceOutput(
            token_ids=tokens,
            scores=torch.stack(scores) if scores else torch.zeros(0, vocab),
            prompt_tokens=len(input_ids),
            input_ids=input_ids,
            min_top2_gap=min(gaps, default=float("inf")),
        )
