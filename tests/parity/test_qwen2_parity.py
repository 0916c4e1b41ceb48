"""Parity of `longvita.model.qwen2` with transformers' Qwen2 on CPU in fp32.

Both models get the same random weights (copied from transformers' by key name); logits must
match with `assert_close`'s default tolerances, for a full prompt and for cached decoding.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from torch import nn

from longvita.config import LongVITAConfig
from longvita.model import qwen2
from longvita.model.kv_cache import KVCache
from longvita.model.qwen2 import Qwen2Model, RMSNorm

CONFIGS = {
    "mha-groups-2": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "head-dim-32-gqa-8-2": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
    ),
}
SEQ_LEN = 17
WEIGHT_STD = 0.1  # larger than the usual 0.02 so attention is far from uniform


def our_config(name: str) -> LongVITAConfig:
    return LongVITAConfig(**CONFIGS[name], rms_norm_eps=1e-6, rope_theta=1e6, torch_dtype="float32")


class TinyLM(nn.Module):
    """Test-only wrapper: our decoder plus a plain LM head over every position."""

    def __init__(self, config: LongVITAConfig) -> None:
        super().__init__()
        self.decoder = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        hidden = self.decoder(self.decoder.embed_tokens(input_ids), position_ids, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
        return self.lm_head(hidden)  # [batch, seq, vocab]


def hf_model(config: LongVITAConfig, attn_implementation: str) -> transformers.Qwen2ForCausalLM:
    hf_config = transformers.Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=False,
        use_sliding_window=False,
        attn_implementation=attn_implementation,
    )
    model = transformers.Qwen2ForCausalLM(hf_config).to(torch.float32).eval()
    assert model.config._attn_implementation == attn_implementation
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random everything, norms and biases included, so all are tested
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * WEIGHT_STD
            param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model


def ours_from_hf(config: LongVITAConfig, hf: nn.Module) -> TinyLM:
    decoder_state, head_state, leftovers = {}, {}, []
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight":
            head_state["weight"] = value
        elif key.startswith("model."):
            decoder_state[key.removeprefix("model.")] = value
        else:
            leftovers.append(key)
    assert not leftovers, f"transformers keys with no counterpart: {leftovers}"
    ours = TinyLM(config).eval()
    ours.decoder.load_state_dict(decoder_state, strict=True)
    ours.lm_head.load_state_dict(head_state, strict=True)
    return ours


def hf_cache_kwarg() -> str:
    """Name of the cache argument: `cache` in recent transformers 5.x, `past_key_values` before."""
    params = inspect.signature(transformers.Qwen2ForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def positions(batch: int, start: int, end: int) -> torch.Tensor:
    return torch.arange(start, end).expand(batch, -1)  # [batch, end - start]


def new_cache(config: LongVITAConfig, batch: int, capacity: int) -> KVCache:
    return KVCache(
        num_layers=config.num_hidden_layers,
        batch_size=batch,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        capacity=capacity,
        dtype=torch.float32,
        device="cpu",
    )


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_rms_norm_matches_transformers_bitwise_in_bf16():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    theirs = Qwen2RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    ours = RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.normal_(1.0, 0.1)
        ours.weight.copy_(theirs.weight)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_logits_match_transformers(name, batch, attn_implementation):
    config = our_config(name)
    hf = hf_model(config, attn_implementation)
    ours = ours_from_hf(config, hf)
    ids = torch.randint(
        config.vocab_size, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(2)
    )
    pos = positions(batch, 0, SEQ_LEN)

    expected = hf(input_ids=ids, position_ids=pos, use_cache=False).logits  # [batch, seq, vocab]
    torch.testing.assert_close(ours(ids, pos), expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_matches_transformers_and_full_forward(name):
    config = our_config(name)
    hf = hf_model(config, "eager")
    ours = ours_from_hf(config, hf)
    batch, prompt_len, num_new = 2, 9, 6
    ids = torch.randint(
        config.vocab_size, (batch, prompt_len + num_new), generator=torch.Generator().manual_seed(3)
    )
    cache = new_cache(config, batch, prompt_len + num_new)
    hf_cache = transformers.DynamicCache(config=hf.config)
    cache_kwargs = {hf_cache_kwarg(): hf_cache, "use_cache": True}

    pos = positions(batch, 0, prompt_len)
    ours_prefill = ours(ids[:, :prompt_len], pos, cache)  # [batch, prompt, vocab]
    hf_prefill = hf(input_ids=ids[:, :prompt_len], position_ids=pos, **cache_kwargs).logits
    torch.testing.assert_close(ours_prefill, hf_prefill)
    assert cache.length == prompt_len == hf_cache.get_seq_length()

    for step in range(prompt_len, prompt_len + num_new):
        token, pos = ids[:, step : step + 1], positions(batch, cache.length, cache.length + 1)
        ours_step = ours(token, pos, cache)[:, -1]  # [batch, vocab]
        hf_step = hf(input_ids=token, position_ids=pos, **cache_kwargs).logits[:, -1]
        full = ours(ids[:, : step + 1], positions(batch, 0, step + 1))[:, -1]  # no cache
        torch.testing.assert_close(ours_step, hf_step)
        torch.testing.assert_close(ours_step, full)
        assert cache.length == step + 1 == hf_cache.get_seq_length()


@pytest.mark.parametrize("chunks", [(5, 12), (11, 1, 5)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_prefill_equals_full_forward(name, chunks):
    config = our_config(name)
    ours = ours_from_hf(config, hf_model(config, "eager"))
    batch = 2
    ids = torch.randint(
        config.vocab_size, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(4)
    )
    cache = new_cache(config, batch, SEQ_LEN)

    pieces, start = [], 0
    for size in chunks:
        pieces.append(
            ours(ids[:, start : start + size], positions(batch, start, start + size), cache)
        )
        start += size
    assert start == SEQ_LEN == cache.length
    full = ours(ids, positions(batch, 0, SEQ_LEN))  # [batch, seq, vocab]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_meta_build_then_assign_load_is_identical():
    config = our_config("head-dim-32-gqa-8-2")
    torch.manual_seed(5)
    reference = Qwen2Model(config)
    reference.init_weights(std=WEIGHT_STD)
    assert not list(reference.buffers()), "the model must hold parameters only"

    with torch.device("meta"):
        model = Qwen2Model(config)
    model.load_state_dict(reference.state_dict(), assign=True, strict=True)
    assert all(p.device.type == "cpu" for p in model.parameters())

    ids = torch.randint(config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(6))
    pos = positions(2, 0, SEQ_LEN)
    expected = reference(reference.embed_tokens(ids), pos)
    torch.testing.assert_close(model(model.embed_tokens(ids), pos), expected, rtol=0, atol=0)


def test_init_weights_values():
    model = Qwen2Model(our_config("mha-groups-2"))
    model.init_weights(std=0.02)
    layer = model.layers[0]
    assert torch.all(layer.input_layernorm.weight == 1) and torch.all(model.norm.weight == 1)
    assert torch.all(layer.self_attn.q_proj.bias == 0)
    assert 0.015 < model.embed_tokens.weight.std().item() < 0.025


def test_position_ids_shape_is_checked():
    config = our_config("mha-groups-2")
    model = Qwen2Model(config)
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(2, 4, config.hidden_size), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("batch", [1, 2])
def test_inference_mlp_in_row_blocks_matches_transformers(monkeypatch, batch):
    """Without autograd the MLP runs MLP_ROW_BLOCK rows at a time, in place: same logits."""
    monkeypatch.setattr(qwen2, "MLP_ROW_BLOCK", 5)  # 17 rows x batch: full and partial blocks
    config = our_config("mha-groups-2")
    hf = hf_model(config, "sdpa")
    ours = ours_from_hf(config, hf)
    ids = torch.randint(
        config.vocab_size, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(4)
    )
    pos = positions(batch, 0, SEQ_LEN)
    with torch.no_grad():
        expected = hf(input_ids=ids, position_ids=pos, use_cache=False).logits
        blocked = ours(ids, pos)
    torch.testing.assert_close(blocked, expected)
    torch.testing.assert_close(blocked, ours(ids, pos).detach())  # the autograd path
