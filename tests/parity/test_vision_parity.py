"""CPU fp32 parity of the InternViT encoder and the projector against transformers' InternVL.

The reference is `transformers.models.internvl.modeling_internvl.InternVLVisionModel`, configured
as InternViT-300M: LayerNorm (eps 1e-6), bias on q/k/v (`attention_bias=True`), no qk-norm, layer
scale, absolute position embeddings, exact GELU, and `use_mean_pooling=True`, which makes its
final `layernorm` an Identity, so its `last_hidden_state` is the last block's output before any
norm (CLS included), as ours is. Its separate q/k/v projections take the row blocks of our fused
qkv. Its eager attention is used, so the reference shares no attention code with ours.

Its projector (`InternVLMultiModalProjector`) maps 4C -> llm -> llm with biases, ours
4C -> C -> llm without: the two are compared with llm == C and the reference biases zeroed.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import (
    InternVLModel,
    InternVLMultiModalProjector,
    InternVLVisionModel,
)

from longvita.config import VisionConfig
from longvita.model.projector import VisionProjector, pixel_shuffle
from longvita.model.vision import InternVisionModel

SMALL = VisionConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56
)
OFFICIAL_GRID = VisionConfig(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=448
)
SMALL_NO_BIAS = VisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=56,
    qkv_bias=False,
)


def make_model(config: VisionConfig, seed: int = 0) -> InternVisionModel:
    """A random model whose norms and layer scales are not at their neutral values."""
    torch.manual_seed(seed)
    model = InternVisionModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".norm" in name:
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("weight") else 0))
            elif ".ls" in name:
                param.copy_(torch.rand_like(param) + 0.2)
    return model


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: VisionConfig) -> dict[str, torch.Tensor]:
    """Our (official InternViT) keys -> transformers InternVLVisionModel keys."""
    out = {
        "embeddings.cls_token": sd["embeddings.class_embedding"],
        "embeddings.position_embeddings": sd["embeddings.position_embedding"],
        "embeddings.patch_embeddings.projection.weight": sd["embeddings.patch_embedding.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["embeddings.patch_embedding.bias"],
    }
    renames = {
        "attn.proj": "attention.projection_layer",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
    }
    for n in range(config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{n}.", f"encoder.layer.{n}."
        for suffix in ("weight", "bias") if config.qkv_bias else ("weight",):
            q, k, v = sd[f"{ours}attn.qkv.{suffix}"].chunk(3, dim=0)  # rows: all q, all k, all v
            for proj, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{theirs}attention.{proj}.{suffix}"] = tensor
        for src, dst in renames.items():
            for suffix in ("weight", "bias"):
                out[f"{theirs}{dst}.{suffix}"] = sd[f"{ours}{src}.{suffix}"]
        out[f"{theirs}lambda_1"] = sd[f"{ours}ls1"]
        out[f"{theirs}lambda_2"] = sd[f"{ours}ls2"]
    return out


def make_reference(model: InternVisionModel) -> InternVLVisionModel:
    config = model.config
    hf_config = InternVLVisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        layer_norm_eps=config.layer_norm_eps,
        attention_bias=config.qkv_bias,
        use_qk_norm=False,
        hidden_act="gelu",
        norm_type="layer_norm",
        use_absolute_position_embeddings=True,
        use_mean_pooling=True,
    )
    hf_config._attn_implementation = "eager"
    reference = InternVLVisionModel(hf_config).eval()
    assert isinstance(reference.layernorm, nn.Identity), "reference must have no final norm"
    reference.load_state_dict(to_hf_state_dict(model.state_dict(), config), strict=True)
    return reference


def pixels(num_tiles: int, height: int, width: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(num_tiles, 3, height, width or height, generator=generator)


@pytest.mark.parametrize(
    ("config", "num_tiles"), [(SMALL, 3), (SMALL_NO_BIAS, 2), (OFFICIAL_GRID, 2)]
)
def test_matches_transformers(config: VisionConfig, num_tiles: int) -> None:
    model = make_model(config)
    reference = make_reference(model)
    x = pixels(num_tiles, config.image_size)
    with torch.no_grad():
        ours = model(x)
        theirs = reference(pixel_values=x).last_hidden_state
    assert ours.shape == (num_tiles, 1 + config.num_patches, config.hidden_size)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(("height", "width"), [(112, 112), (56, 112)])
def test_position_interpolation_matches_transformers(height: int, width: int) -> None:
    model = make_model(SMALL)
    reference = make_reference(model)
    x = pixels(2, height, width)
    with torch.no_grad():
        ours = model(x)
        theirs = reference(pixel_values=x).last_hidden_state
    num_patches = (height // SMALL.patch_size) * (width // SMALL.patch_size)
    assert ours.shape == (2, 1 + num_patches, SMALL.hidden_size)
    torch.testing.assert_close(ours, theirs)


def test_zero_tiles() -> None:
    model = make_model(SMALL)
    with torch.no_grad():
        out = model(pixels(0, SMALL.image_size))
    assert out.shape == (0, 1 + SMALL.num_patches, SMALL.hidden_size)


def test_rejects_bad_pixels() -> None:
    model = make_model(SMALL)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(pixels(1, 50))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.zeros(1, 1, 56, 56))


def test_meta_build_then_assign_load() -> None:
    model = make_model(SMALL)
    projector = VisionProjector(SMALL, llm_hidden_size=48)
    with torch.device("meta"):
        meta_model = InternVisionModel(SMALL)
        meta_projector = VisionProjector(SMALL, llm_hidden_size=48)
    assert list(meta_model.buffers()) == [] and list(meta_projector.buffers()) == []
    assert all(p.is_meta for p in meta_model.parameters())
    meta_model.load_state_dict(model.state_dict(), assign=True)
    meta_projector.load_state_dict(projector.state_dict(), assign=True)
    x = pixels(2, SMALL.image_size)
    with torch.no_grad():
        torch.testing.assert_close(meta_model(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(
            meta_projector(meta_model(x)), projector(model(x)), rtol=0, atol=0
        )


def test_state_dict_keys_are_official() -> None:
    keys = set(InternVisionModel(SMALL).state_dict())
    assert "embeddings.class_embedding" in keys
    assert "encoder.layers.1.attn.qkv.bias" in keys
    assert "encoder.layers.0.ls2" in keys
    proj_keys = set(VisionProjector(SMALL, 48).state_dict())
    assert proj_keys == {
        "pre_proj_layernorm.weight",
        "pre_proj_layernorm.bias",
        "mlp.0.weight",
        "mlp.2.weight",
    }


@pytest.mark.parametrize("config", [SMALL, OFFICIAL_GRID])
def test_projector_shape(config: VisionConfig) -> None:
    projector = VisionProjector(config, llm_hidden_size=48)
    vit_hidden = torch.randn(3, 1 + config.num_patches, config.hidden_size)
    assert projector(vit_hidden).shape == (3, config.tokens_per_tile, 48)
    with pytest.raises(ValueError, match="ViT tokens per tile"):
        projector(vit_hidden[:, 1:])


def test_projector_matches_transformers() -> None:
    """Ours vs InternVL's pixel_shuffle + InternVLMultiModalProjector (llm == C, zero biases)."""
    config = OFFICIAL_GRID
    dim, grid = config.hidden_size, config.grid_size
    torch.manual_seed(0)
    projector = VisionProjector(config, llm_hidden_size=dim)
    with torch.no_grad():
        projector.pre_proj_layernorm.weight.normal_(1.0, 0.2)
        projector.pre_proj_layernorm.bias.normal_(0.0, 0.2)
    hf_config = SimpleNamespace(
        vision_config=SimpleNamespace(hidden_size=dim),
        text_config=SimpleNamespace(hidden_size=dim),
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
    )
    reference = InternVLMultiModalProjector(hf_config)
    reference.load_state_dict(
        {
            "layer_norm.weight": projector.pre_proj_layernorm.weight,
            "layer_norm.bias": projector.pre_proj_layernorm.bias,
            "linear_1.weight": projector.mlp[0].weight,
            "linear_1.bias": torch.zeros(dim),
            "linear_2.weight": projector.mlp[2].weight,
            "linear_2.bias": torch.zeros(dim),
        }
    )
    vit_hidden = torch.randn(2, 1 + grid * grid, dim)
    # transformers' get_image_features: drop CLS, [T, g, g, C], pixel shuffle, flatten, project
    features = vit_hidden[:, 1:].reshape(2, grid, grid, dim)
    shuffled = InternVLModel.pixel_shuffle(None, features, scale_factor=0.5)  # self is unused
    torch.testing.assert_close(pixel_shuffle(features), shuffled.reshape(2, -1, 4 * dim))
    with torch.no_grad():
        theirs = reference(shuffled.reshape(2, -1, 4 * dim))
        torch.testing.assert_close(projector(vit_hidden), theirs)
