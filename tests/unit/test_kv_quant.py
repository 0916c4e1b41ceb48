"""The 8-bit KV cache's math: quantizing rows, dequantizing into a buffer, and attention of a
few query rows straight over int8 keys/values against the float reference."""

from __future__ import annotations

import pytest
import torch

from longvita.model.kv_cache import KVCache, kv_bytes_per_token
from longvita.ops.kv_quant import INT8_MAX, dequantize_int8, int8_attention, quantize_int8
from longvita.runtime import resolve_kv_cache_dtype
from longvita.testing import reference_attention


def _rows(*shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 20  # one outlier channel, as real keys have
    return x


def test_quantize_round_trip_is_within_half_a_step_of_each_row():
    x = _rows(2, 3, 17, 16)
    x[0, 0, 5] = 0.0  # a zero row: scale 0, exactly zero back
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == x.shape[:-1]
    assert int(q.abs().max()) <= INT8_MAX
    back = dequantize_int8(q, scale, torch.empty_like(x))
    step = scale[..., None]  # one quantization step of each row
    assert bool(((back - x).abs() <= step / 2 + 1e-6).all())
    assert scale[0, 0, 5] == 0 and bool((back[0, 0, 5] == 0).all())
    torch.testing.assert_close(back.abs().amax(-1), x.abs().amax(-1))  # the row max is exact


def test_dequantize_writes_into_the_callers_buffer_in_its_dtype():
    q, scale = quantize_int8(_rows(1, 2, 8, 16))
    out = torch.empty(1, 2, 8, 16, dtype=torch.bfloat16)
    assert dequantize_int8(q, scale, out) is out
    torch.testing.assert_close(out.float(), q.float() * scale[..., None], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,n", [(4, 4, 1), (8, 2, 1), (6, 2, 3)])
def test_int8_attention_equals_attention_over_the_dequantized_block(num_q_heads, num_kv_heads, n):
    q = torch.randn(2, num_q_heads, n, 16)
    k8, ks = quantize_int8(_rows(2, num_kv_heads, 37, 16, seed=2))
    v8, vs = quantize_int8(torch.randn(2, num_kv_heads, 37, 16))
    out, lse = int8_attention(q, k8, ks, v8, vs)
    keys = dequantize_int8(k8, ks, torch.empty(k8.shape))
    values = dequantize_int8(v8, vs, torch.empty(v8.shape))
    everything = torch.zeros(37, dtype=torch.long)  # every query sees every key
    expected_out, expected_lse = reference_attention(
        q, keys, values, q_index=torch.zeros(n, dtype=torch.long), k_index=everything
    )
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_int8_attention_over_nothing_is_zero_with_lse_minus_infinity():
    q = torch.randn(1, 4, 1, 16)
    empty = torch.zeros(1, 2, 0, 16, dtype=torch.int8)
    out, lse = int8_attention(q, empty, torch.zeros(1, 2, 0), empty, torch.zeros(1, 2, 0))
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())


def test_cache_dtypes_resolve_and_count_their_bytes():
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype(None, torch.float32) == torch.float32
    assert resolve_kv_cache_dtype("bf16", torch.float32) == torch.bfloat16
    assert resolve_kv_cache_dtype("int8", torch.float32) == torch.int8
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8' is not supported.*int8"):
        resolve_kv_cache_dtype("fp8", torch.float32)
    shape = {"num_layers": 3, "num_kv_heads": 2, "head_dim": 64}
    assert kv_bytes_per_token(**shape, dtype=torch.float32) == 2 * 3 * 2 * 64 * 4
    assert kv_bytes_per_token(**shape, dtype=torch.int8) == 2 * 3 * 2 * (64 + 4)
    cache = KVCache(batch_size=1, capacity=10, dtype=torch.int8, device="cpu", **shape)
    assert cache.num_bytes == 10 * kv_bytes_per_token(**shape, dtype=torch.int8)
    with pytest.raises(ValueError, match="float dtype or int8"):
        KVCache(batch_size=1, capacity=10, dtype=torch.int64, device="cpu", **shape)
