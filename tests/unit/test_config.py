import json

import pytest

from longvita.config import LongVITAConfig, VisionConfig, long_vita_14b, tiny
from longvita.errors import CheckpointError

OFFICIAL = {
    "architectures": ["LongVITAForCausalLM"],
    "model_type": "long_vita",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "max_position_embeddings": 1310720,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "visual": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 448,
        "patch_size": 14,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "norm_type": "layer_norm",
        "qk_normalization": False,
        "drop_path_rate": 0.0,
        "hidden_act": "gelu",
        "use_flash_attn": True,
        "architectures": ["InternVisionModel"],
    },
}


def test_official_config_round_trip_keeps_every_field(tmp_path):
    config = LongVITAConfig.from_dict(OFFICIAL)
    assert config.head_dim == 128 and config.num_attention_heads // config.num_key_value_heads == 5
    assert config.vision.tokens_per_tile == 256 and config.vision.num_patches == 1024
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in OFFICIAL.items():
        assert written[key] == value, key
    assert LongVITAConfig.from_pretrained(tmp_path) == config


def test_presets():
    big = long_vita_14b()
    assert (big.hidden_size, big.num_hidden_layers, big.vision.image_size) == (5120, 48, 448)
    small = tiny()
    assert small.vision.tokens_per_tile == 4 and small.vision.image_size == 56


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 50}, "multiple of"),
        ({"image_size": 42}, "even"),
        ({"norm_type": "rms_norm"}, "norm_type"),
        ({"qk_normalization": True}, "qk_normalization"),
    ],
)
def test_vision_config_rejects_unsupported(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VisionConfig(**kwargs)


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LongVITAConfig(num_attention_heads=40, num_key_value_heads=7)


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        LongVITAConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        LongVITAConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "long_vita"}))
    with pytest.raises(CheckpointError, match="visual"):
        LongVITAConfig.from_pretrained(tmp_path)
