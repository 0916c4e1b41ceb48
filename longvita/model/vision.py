"""InternViT-300M: the vision encoder that turns pixel tiles into ViT hidden states.

Owns the patch/CLS/position embeddings, the pre-LayerNorm blocks with layer scale, and the
bicubic interpolation of the position embedding for grids other than the stored one. Module
names equal the official state-dict keys under `model.vision_model.`, so a plain
`load_state_dict` loads the public InternViT-300M-448px / Long-VITA weights. Does not own the
pixel shuffle and projection into the LLM (`projector.py`) nor image preprocessing.

Holds parameters only (no buffers), so it can be built under `torch.device("meta")` and loaded
with `load_state_dict(sd, assign=True)`. `drop_path_rate` (stochastic depth) is not implemented:
it is ignored both at inference and in training.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from longvita.config import VisionConfig
from longvita.ops.attention import attention

logger = logging.getLogger(__name__)

NUM_CHANNELS = 3
INIT_STD = 0.02
LAYER_SCALE_INIT = 0.1


def interpolate_position_embedding(
    position_embedding: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Resize a [1, 1 + g*g, C] position embedding to a height x width patch grid (InternViT).

    The CLS position is kept; the patch positions are resized bicubically (align_corners=False)
    in float32 and cast back. Returns [1, 1 + height*width, C].
    """
    _, num_positions, dim = position_embedding.shape
    grid = int(round((num_positions - 1) ** 0.5))
    assert grid * grid == num_positions - 1, f"position embedding of {num_positions} is not 1+g*g"
    cls_pos = position_embedding[:, :1]  # [1, 1, C]
    patch_pos = position_embedding[:, 1:].float().reshape(1, grid, grid, dim)  # [1, g, g, C]
    patch_pos = patch_pos.permute(0, 3, 1, 2)  # [1, C, g, g]
    patch_pos = F.interpolate(patch_pos, size=(height, width), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, height * width, dim)  # [1, h*w, C]
    return torch.cat([cls_pos, patch_pos.to(position_embedding.dtype)], dim=1)  # [1, 1+h*w, C]


class InternVisionEmbeddings(nn.Module):
    """Conv2d patch embedding, a prepended CLS token and a learned absolute position embedding."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, dim))
        self.patch_embedding = nn.Conv2d(
            NUM_CHANNELS, dim, kernel_size=config.patch_size, stride=config.patch_size, bias=True
        )
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + config.num_patches, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.class_embedding, std=INIT_STD)
        nn.init.normal_(self.position_embedding, std=INIT_STD)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [T, 3, H, W] -> [T, 1 + (H/p)*(W/p), C], CLS first."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # [T, C, h, w]
        num_tiles, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # [T, h*w, C]
        cls = self.class_embedding.expand(num_tiles, -1, -1)  # [T, 1, C]
        embeddings = torch.cat([cls, patches], dim=1)  # [T, 1+h*w, C]
        if (height, width) == (self.grid_size, self.grid_size):
            position = self.position_embedding  # [1, 1+g*g, C]
        else:
            position = interpolate_position_embedding(self.position_embedding, height, width)
        return embeddings + position  # [T, 1+h*w, C]


class InternAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection (rows q, k, v)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tiles, num_tokens, dim = x.shape
        qkv = self.qkv(x).reshape(num_tiles, num_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [T, heads, N, head_dim]
        out = attention(q, k, v, causal=False, scale=self.head_dim**-0.5)  # [T, heads, N, hd]
        out = out.transpose(1, 2).reshape(num_tiles, num_tokens, dim)  # [T, N, C]
        return self.proj(out)  # [T, N, C]


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [T, N, I] -> [T, N, C]


class InternVisionEncoderLayer(nn.Module):
    """Pre-LayerNorm block with layer scale on both residual branches."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(torch.empty(dim))
        self.ls2 = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.ls1, LAYER_SCALE_INIT)
        nn.init.constant_(self.ls2, LAYER_SCALE_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))  # [T, N, C]
        return x + self.ls2 * self.mlp(self.norm2(x))  # [T, N, C]


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    """InternViT-300M: pixel tiles -> last-layer hidden states, CLS included, no final norm."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.drop_path_rate > 0:
            logger.info(
                "visual.drop_path_rate=%s is ignored: stochastic depth is not implemented",
                config.drop_path_rate,
            )
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def reset_parameters(self) -> None:
        """Re-initialize every parameter (e.g. after `to_empty`) to a reasonable random model."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_tiles, 3, S, S] -> [num_tiles, 1 + num_patches, C].

        S is normally `config.image_size`; another multiple of the patch size (or a non-square
        tile) interpolates the position embedding to the new grid. Zero tiles give [0, 1+P, C].
        """
        if pixel_values.dim() != 4 or pixel_values.shape[1] != NUM_CHANNELS:
            raise ValueError(
                f"pixel_values must be [num_tiles, {NUM_CHANNELS}, H, W]; "
                f"got shape {tuple(pixel_values.shape)}"
            )
        height, width = pixel_values.shape[-2:]
        if height % self.config.patch_size or width % self.config.patch_size:
            raise ValueError(
                f"tile size {height}x{width} is not a multiple of the patch size "
                f"{self.config.patch_size}"
            )
        x = self.embeddings(pixel_values)  # [T, 1+P, C]
        return self.encoder(x)  # [T, 1+P, C]
