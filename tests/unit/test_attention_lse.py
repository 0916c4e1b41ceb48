"""Attention with log-sum-exp (ops.attention): every backend against the fp32 definition.

Forward (out, lse) and backward, causal / non-causal / grouped-query / masked with rows that
see nothing; the log-sum-exp merge; the blockwise backward given merged results (the basis of
ring attention); packed samples; the plain `attention` entry point.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longvita.ops.attention import (
    attention,
    attention_with_lse,
    block_attention,
    block_attention_backward,
    merge_partials,
    merge_partials_,
    packed_attention_fn,
    packed_causal_attention,
)
from longvita.ops.attention_kernels import (
    fold_query_groups,
    math_backward,
    math_forward,
    unfold_query_groups,
)
from longvita.testing import LargestOutput, reference_attention, segment_ids

CPU_BACKENDS = ["math", "cpu_flash"]
HEAD_DIM = 16


def _qkv(
    q_len, kv_len, num_q_heads=4, num_kv_heads=2, *, seed=0, dtype=torch.float32, device="cpu"
):
    gen = torch.Generator().manual_seed(seed)

    def randn(heads, length):
        return torch.randn(2, heads, length, HEAD_DIM, generator=gen).to(device, dtype)

    return randn(num_q_heads, q_len), randn(num_kv_heads, kv_len), randn(num_kv_heads, kv_len)


def _case(kind: str, q_len: int, kv_len: int, seed: int = 0):
    """(causal, mask, reference kwargs) for a block; 'masked' leaves some rows with no key."""
    gen = torch.Generator().manual_seed(seed + 100)
    if kind == "causal":
        index = torch.arange(q_len)
        return True, None, {"q_index": index, "k_index": index}
    everything = {"q_index": torch.full((q_len,), kv_len), "k_index": torch.arange(kv_len)}
    if kind == "full":
        return False, None, everything
    q_segment = torch.randint(0, 4, (q_len,), generator=gen)  # segment 3 has no key: empty rows
    k_segment = torch.randint(0, 3, (kv_len,), generator=gen)
    mask = q_segment[:, None] == k_segment[None, :]  # [q_len, kv_len]
    if kind == "masked":
        return False, mask, {**everything, "q_segment": q_segment, "k_segment": k_segment}
    index = torch.arange(q_len)  # "causal_masked": a diagonal block spanning sample boundaries
    segments = {"q_segment": q_segment, "k_segment": q_segment}
    return (
        True,
        q_segment[:, None] == q_segment[None, :],
        {"q_index": index, "k_index": index, **segments},
    )


CASES = [("causal", 13, 13), ("full", 9, 21), ("masked", 11, 17), ("causal_masked", 19, 19)]
HEADS = [(4, 2), (4, 1), (2, 2)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,q_len,kv_len", CASES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_block_attention_matches_reference(backend, kind, q_len, kv_len, num_q_heads, num_kv_heads):
    q, k, v = _qkv(q_len, kv_len, num_q_heads, num_kv_heads)
    causal, mask, ref_kwargs = _case(kind, q_len, kv_len)
    out, lse = block_attention(q, k, v, causal=causal, mask=mask, backend=backend)
    ref_out, ref_lse = reference_attention(q, k, v, **ref_kwargs)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert lse.dtype == torch.float32 and out.dtype == q.dtype
    if kind == "masked":
        empty = ~mask.any(-1)
        assert empty.any(), "the case must contain rows that see nothing"
        assert (out[:, :, empty] == 0).all() and (lse[:, :, empty] == float("-inf")).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,q_len,kv_len", CASES)
def test_block_backward_matches_autograd_of_reference(backend, kind, q_len, kv_len):
    q, k, v = _qkv(q_len, kv_len, seed=1)
    causal, mask, ref_kwargs = _case(kind, q_len, kv_len, seed=1)
    grad_out = torch.randn_like(q)
    out, lse = block_attention(q, k, v, causal=causal, mask=mask, backend=backend)
    grads = block_attention_backward(
        grad_out, q, k, v, out, lse, causal=causal, mask=mask, backend=backend
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*leaves, **ref_kwargs)
    ref_out.backward(grad_out)
    for grad, leaf in zip(grads, leaves, strict=True):
        assert grad.shape == leaf.shape  # K/V gradients keep the K/V heads
        torch.testing.assert_close(grad, leaf.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_of_split_keys_equals_full(backend):
    q, k, v = _qkv(10, 24, seed=2)
    causal, mask, _ = _case("masked", 10, 24, seed=2)
    full_out, full_lse = block_attention(q, k, v, causal=False, mask=mask, backend=backend)
    halves = [
        block_attention(
            q, k[:, :, part], v[:, :, part], causal=False, mask=mask[:, part], backend=backend
        )
        for part in (slice(0, 7), slice(7, 24))
    ]
    out, lse = merge_partials(*halves[0], *halves[1])
    torch.testing.assert_close(out, full_out.float())
    torch.testing.assert_close(lse, full_lse)


def test_merge_handles_empty_sides():
    out_a, out_b = torch.randn(3, 4), torch.randn(3, 4)
    lse_a = torch.tensor([0.5, float("-inf"), float("-inf")])
    lse_b = torch.tensor([float("-inf"), 1.5, float("-inf")])
    out_b[2] = 0.0
    out_a[2] = 0.0
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out[0], out_a[0])
    torch.testing.assert_close(out[1], out_b[1])
    assert (out[2] == 0).all() and lse[2] == float("-inf")
    torch.testing.assert_close(lse[:2], torch.tensor([0.5, 1.5]))


def test_in_place_merge_equals_merge_and_leaves_the_new_side_alone():
    gen = torch.Generator().manual_seed(5)
    out_a, out_b = torch.randn(2, 4, 6, 8, generator=gen), torch.randn(2, 4, 6, 8, generator=gen)
    lse_a, lse_b = torch.randn(2, 4, 6, generator=gen), torch.randn(2, 4, 6, generator=gen)
    lse_a[0, 0, :2] = float("-inf")  # rows that saw nothing on one side, or on both
    lse_b[0, 0, 1:3] = float("-inf")
    out_a[0, 0, :2] = 0.0
    out_b[0, 0, 1:3] = 0.0
    expected_out, expected_lse = merge_partials(out_a, lse_a, out_b, lse_b)
    b_before = out_b.clone()
    merge_partials_(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out_a, expected_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse_a, expected_lse)
    assert torch.equal(out_b, b_before)
    assert (out_a[0, 0, 1] == 0).all() and lse_a[0, 0, 1] == float("-inf")


def test_in_place_merge_needs_float32_accumulators():
    with pytest.raises(ValueError, match="float32"):
        merge_partials_(
            torch.zeros(2, 3, dtype=torch.bfloat16),
            torch.zeros(2),
            *(torch.zeros(2, 3), torch.zeros(2)),
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_blockwise_backward_with_merged_results_sums_to_full(backend):
    """The ring's backward: each K/V block's gradient from the merged out/lse is its share."""
    q, k, v = _qkv(12, 12, seed=3)
    grad_out = torch.randn_like(q)
    parts = [(slice(0, 5), False), (slice(5, 12), False)]  # keys 0..4 and 5..11, no causality
    results = [block_attention(q, k[:, :, p], v[:, :, p], causal=c) for p, c in parts]
    out, lse = merge_partials(*results[0], *results[1])
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for part, causal in parts:
        grad_q, grad_k, grad_v = block_attention_backward(
            grad_out, q, k[:, :, part], v[:, :, part], out, lse, causal=causal, backend=backend
        )
        dq += grad_q
        dk[:, :, part], dv[:, :, part] = grad_k, grad_v
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref, _ = attention_with_lse(*leaves, causal=False, backend="math")
    out_ref.backward(grad_out)
    torch.testing.assert_close(out, out_ref.detach())
    for grad, leaf in zip((dq, dk, dv), leaves, strict=True):
        torch.testing.assert_close(grad, leaf.grad)


def _random_bounds(seq_len: int, num_cuts: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randint(1, seq_len, (num_cuts,), generator=gen).tolist()  # repeats: empty samples
    return [0, *sorted(cuts), seq_len]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_causal_attention_matches_reference(backend, seed):
    seq_len = 41
    bounds = _random_bounds(seq_len, 4, seed)
    q, k, v = (t.requires_grad_() for t in _qkv(seq_len, seq_len, seed=seed))
    grad_out = torch.randn_like(q)
    out = packed_causal_attention(q, k, v, torch.tensor(bounds), backend=backend)
    out.backward(grad_out)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    index, segments = torch.arange(seq_len), segment_ids(bounds, 0, seq_len)
    ref_out, _ = reference_attention(
        *leaves, q_index=index, k_index=index, q_segment=segments, k_segment=segments
    )
    ref_out.backward(grad_out)
    torch.testing.assert_close(out, ref_out)
    for leaf, ref in zip((q, k, v), leaves, strict=True):
        torch.testing.assert_close(leaf.grad, ref.grad)


def test_packed_attention_fn_is_an_attention_fn():
    q, k, v = _qkv(20, 20)
    fn = packed_attention_fn([0, 8, 8, 20])  # an empty sample is allowed
    torch.testing.assert_close(fn(q, k, v, 0), packed_causal_attention(q, k, v, [0, 8, 20]))
    one_sample = packed_causal_attention(q, k, v, [0, 20])
    torch.testing.assert_close(one_sample, attention(q, k, v, causal=True))


def test_attention_with_lse_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(15, 15, seed=4))
    out, lse = attention_with_lse(q, k, v, causal=True)
    assert not lse.requires_grad
    out.square().sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    index = torch.arange(15)
    ref_out, _ = reference_attention(*leaves, q_index=index, k_index=index)
    ref_out.square().sum().backward()
    for leaf, ref in zip((q, k, v), leaves, strict=True):
        torch.testing.assert_close(leaf.grad, ref.grad)


@pytest.mark.parametrize("q_len,kv_len,q_offset", [(7, 7, 0), (3, 10, 7), (1, 10, 9), (4, 10, 2)])
def test_attention_entry_point_unchanged(q_len, kv_len, q_offset):
    q, k, v = _qkv(q_len, kv_len)
    out = attention(q, k, v, causal=True, q_offset=q_offset)
    ref, _ = reference_attention(
        q, k, v, q_index=torch.arange(q_offset, q_offset + q_len), k_index=torch.arange(kv_len)
    )
    torch.testing.assert_close(out, ref)
    full = attention(q, k, v, causal=False, scale=0.3)
    k_rep, v_rep = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q, k_rep, v_rep, scale=0.3))


@pytest.mark.parametrize("causal,q_offset", [(True, 4095), (False, 0)])
def test_attention_over_every_key_never_repeats_kv_heads(causal, q_offset):
    """A decode step (and bidirectional attention) with 8 query heads on 2 K/V heads: no tensor
    as large as K/V repeated to the query heads is ever made, whatever the kernel."""
    q, k, v = _qkv(1, 4096, num_q_heads=8, num_kv_heads=2)
    with LargestOutput() as seen:
        out = attention(q, k, v, causal=causal, q_offset=q_offset)
    assert seen.max_numel <= k.numel()  # repeated K would be 4x this
    ref, _ = reference_attention(q, k, v, q_index=torch.tensor([4095]), k_index=torch.arange(4096))
    torch.testing.assert_close(out, ref)


def test_bfloat16_cpu_kernel_close_to_reference():
    q, k, v = _qkv(32, 32, dtype=torch.bfloat16)
    out, lse = block_attention(q, k, v, causal=True)
    index = torch.arange(32)
    ref_out, ref_lse = reference_attention(q, k, v, q_index=index, k_index=index)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)


def test_bad_inputs_raise_value_error():
    q, k, v = _qkv(6, 8)
    with pytest.raises(ValueError, match="q_len 6 == kv_len 8"):
        block_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"want bool \[6, 8\]"):
        block_attention(q, k, v, causal=False, mask=torch.ones(6, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_q_heads 4 must be a multiple of num_kv_heads 3"):
        block_attention(q, *_qkv(6, 8, 4, 3)[1:], causal=False)
    with pytest.raises(ValueError, match="backend 'flash3'"):
        block_attention(q, k, v, causal=False, backend="flash3")
    q, k, v = _qkv(8, 8)
    with pytest.raises(ValueError, match="end at the sequence length 8"):
        packed_causal_attention(q, k, v, [0, 3, 7])
    with pytest.raises(ValueError, match="non-decreasing"):
        packed_causal_attention(q, k, v, [0, 5, 3, 8])


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 2), (6, 2), (4, 1)])
def test_query_groups_folded_into_rows_give_the_same_attention_and_gradients(
    num_q_heads, num_kv_heads
):
    """Over a block every query sees whole, the query heads of a group as extra rows of their
    K/V head (what the CUDA kernel runs there instead of repeating K/V) give the same output,
    log-sum-exp and gradients."""
    q, k, v = _qkv(5, 11, num_q_heads, num_kv_heads)
    scale = HEAD_DIM**-0.5

    def fold(x):
        return fold_query_groups(x, num_kv_heads)

    def unfold(x):
        return unfold_query_groups(x, num_q_heads)

    assert fold(q).shape == (2, num_kv_heads, 5 * num_q_heads // num_kv_heads, HEAD_DIM)
    out, lse = math_forward(q, k, v, None, False, scale)
    folded_out, folded_lse = math_forward(fold(q), k, v, None, False, scale)
    torch.testing.assert_close(unfold(folded_out), out)
    torch.testing.assert_close(unfold(folded_lse), lse)
    grad_out = torch.randn_like(q)
    grads = math_backward(grad_out, q, k, v, out, lse, None, False, scale)
    folded = math_backward(fold(grad_out), fold(q), k, v, fold(out), fold(lse), None, False, scale)
    torch.testing.assert_close(unfold(folded[0]), grads[0])
    torch.testing.assert_close(folded[1], grads[1])
    torch.testing.assert_close(folded[2], grads[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,q_len,kv_len", CASES)
def test_cuda_kernel_matches_math(dtype, kind, q_len, kv_len):
    q, k, v = _qkv(q_len, kv_len, dtype=dtype, device="cuda")
    causal, mask, _ = _case(kind, q_len, kv_len)
    mask = None if mask is None else mask.cuda()
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    out, lse = block_attention(q, k, v, causal=causal, mask=mask, backend="cuda_efficient")
    ref_out, ref_lse = block_attention(q, k, v, causal=causal, mask=mask, backend="math")
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    grad_out = torch.randn_like(q)
    kwargs = {"causal": causal, "mask": mask}
    grads = block_attention_backward(
        grad_out, q, k, v, out, lse, **kwargs, backend="cuda_efficient"
    )
    ref_grads = block_attention_backward(grad_out, q, k, v, out, lse, **kwargs, backend="math")
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, **tol)
