"""Model configuration: the official Long-VITA `config.json`, read and written unchanged.

Owns the two keyword-only dataclasses (`VisionConfig`, `LongVITAConfig`), their validation, the
conversion from/to the official JSON (Qwen2 fields at the top level plus a nested `visual`
dict), and presets for the official 14B shapes and a tiny model for tests. Fields the official
file carries that we do not use are kept in `extra` and written back, so a round trip through
`save` keeps the file loadable by the official code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longvita.errors import CheckpointError
from longvita.runtime import DTYPES

CONFIG_FILE = "config.json"
MODEL_TYPE = "long_vita"


@dataclass(kw_only=True)
class VisionConfig:
    """InternViT encoder (the official `visual` dict)."""

    hidden_size: int = 1024
    """Width of the ViT residual stream."""
    intermediate_size: int = 4096
    """Hidden size of the ViT MLP."""
    num_hidden_layers: int = 24
    """Number of ViT blocks."""
    num_attention_heads: int = 16
    """ViT attention heads (bidirectional attention)."""
    image_size: int = 448
    """Side of a tile in pixels; every tile and video frame is resized to it."""
    patch_size: int = 14
    """Side of a ViT patch in pixels."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the ViT LayerNorms."""
    qkv_bias: bool = True
    """Whether the fused qkv projection has a bias."""
    norm_type: str = "layer_norm"
    """Only "layer_norm" (InternViT-300M) is supported."""
    qk_normalization: bool = False
    """Only False (InternViT-300M) is supported."""
    drop_path_rate: float = 0.0
    """Stochastic depth in training; ignored at inference."""
    hidden_act: str = "gelu"
    """Only exact GELU is supported."""
    use_flash_attn: bool = False
    """Recorded for the official code; our attention backend is chosen at run time."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other fields of the official file, written back unchanged."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"visual.image_size ({self.image_size}) must be a multiple of "
                f"visual.patch_size ({self.patch_size})"
            )
        if self.grid_size % 2:
            raise ValueError(
                f"the patch grid ({self.grid_size}x{self.grid_size}) must be even for the 2x2 "
                f"pixel shuffle; got image_size={self.image_size}, patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"visual.hidden_size ({self.hidden_size}) must be divisible by "
                f"visual.num_attention_heads ({self.num_attention_heads})"
            )
        if self.norm_type != "layer_norm":
            raise ValueError(f"visual.norm_type={self.norm_type!r} is not supported (layer_norm)")
        if self.qk_normalization:
            raise ValueError("visual.qk_normalization=True is not supported (InternViT-300M)")
        if self.hidden_act != "gelu":
            raise ValueError(f"visual.hidden_act={self.hidden_act!r} is not supported (gelu)")

    @property
    def grid_size(self) -> int:
        """Patches per tile side (32 for 448 px / 14 px)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per tile, without the CLS token (1024 for the official model)."""
        return self.grid_size**2

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per tile after the 2x2 pixel shuffle (256 for the official model)."""
        return (self.grid_size // 2) ** 2

    @property
    def projector_input_size(self) -> int:
        """Channels after the pixel shuffle (4 x hidden)."""
        return 4 * self.hidden_size


@dataclass(kw_only=True)
class LongVITAConfig:
    """The whole model: Qwen2 decoder fields plus the vision encoder."""

    vocab_size: int = 152064
    """Rows of the embedding and LM head (may exceed the tokenizer's size)."""
    hidden_size: int = 5120
    """Width of the LLM residual stream."""
    intermediate_size: int = 13824
    """Hidden size of the SwiGLU MLP."""
    num_hidden_layers: int = 48
    """Number of decoder layers."""
    num_attention_heads: int = 40
    """Query heads."""
    num_key_value_heads: int = 8
    """Key/value heads (grouped-query attention)."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the RMSNorms."""
    rope_theta: float = 1_000_000.0
    """RoPE base, applied to the full head dimension."""
    tie_word_embeddings: bool = False
    """Whether the LM head shares the embedding matrix."""
    max_position_embeddings: int = 1_310_720
    """Longest sequence (prompt + generated tokens) the model accepts."""
    torch_dtype: str = "bfloat16"
    """Dtype of the stored weights."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The InternViT encoder (official key: `visual`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other fields of the official file, written back unchanged."""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by "
                    f"num_attention_heads ({self.num_attention_heads}) unless head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype={self.torch_dtype!r}; expected one of {list(DTYPES)}")
        if isinstance(self.vision, dict):
            self.vision = vision_config_from_dict(self.vision)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongVITAConfig:
        """Build from the official config.json content."""
        data = dict(data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config.json has model_type={model_type!r}; expected {MODEL_TYPE!r}")
        if "visual" not in data:
            raise ValueError("config.json has no 'visual' dict: not a Long-VITA checkpoint")
        vision = vision_config_from_dict(data.pop("visual"))
        if data.get("torch_dtype") is None:
            data["torch_dtype"] = "bfloat16"
        return cls(vision=vision, **_split_known(cls, data, exclude={"vision", "extra"}))

    def to_dict(self) -> dict[str, Any]:
        """The official config.json content (`model_type`, Qwen2 fields, nested `visual`)."""
        out: dict[str, Any] = {**self.extra, "model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name not in ("vision", "extra"):
                out[f.name] = getattr(self, f.name)
        out["visual"] = vision_config_to_dict(self.vision)
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LongVITAConfig:
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} not found: a checkpoint directory needs config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from err
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: {err}") from err

    def save_pretrained(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def vision_config_from_dict(data: dict[str, Any]) -> VisionConfig:
    return VisionConfig(**_split_known(VisionConfig, dict(data), exclude={"extra"}))


def vision_config_to_dict(config: VisionConfig) -> dict[str, Any]:
    out = dict(config.extra)
    for f in dataclasses.fields(config):
        if f.name != "extra":
            out[f.name] = getattr(config, f.name)
    return out


def _split_known(cls: type, data: dict[str, Any], exclude: set[str]) -> dict[str, Any]:
    """Keyword arguments for `cls`: known fields by name, everything else under `extra`."""
    known = {f.name for f in dataclasses.fields(cls)} - exclude
    kwargs = {k: data.pop(k) for k in list(data) if k in known}
    kwargs["extra"] = data
    return kwargs


def long_vita_14b() -> LongVITAConfig:
    """The official Long-VITA-16K/128K/1M shapes (Qwen2.5-14B + InternViT-300M-448px)."""
    return LongVITAConfig()


def tiny(*, image_size: int = 56, vocab_size: int = 512) -> LongVITAConfig:
    """A few-MB model for tests and the demo: 56-px tiles of 4 tokens, 2 layers each side."""
    return LongVITAConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32_768,
        torch_dtype="float32",
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=14,
        ),
    )


def demo(*, vocab_size: int = 384) -> LongVITAConfig:
    """The demo model (`longvita demo`): a 64-wide, 2-layer LLM and a 64-wide, 2-layer ViT on
    28-px tiles of one token each (258 -> 3 tokens a frame with its delimiters), so 4,096 video
    frames are 12,288 tokens: small enough to train through the four stages on a laptop CPU."""
    return LongVITAConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16_384,
        torch_dtype="float32",
        vision=VisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
    )


PRESETS = {"14b": long_vita_14b, "tiny": tiny, "demo": demo}
