"""Ring attention at CP = 2 and 4 on gloo ranks against single-process attention (fp32).

Every rank builds the same inputs from a seed, takes its zigzag shard (chunks r and 2cp-1-r),
runs ring attention forward and backward, and returns its out, dq, dk, dv; the parent compares
them with the matching slices of `reference_attention` over the whole sequence.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from longvita.parallel.ring_attention import make_ring_attention_fn, ring_attention
from longvita.testing import reference_attention, segment_ids

BATCH, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 2, 4, 2, 16
CASES = {  # name: (unpadded length, packed with random sample boundaries)
    "packed_padded": (90, True),
    "single_sample": (64, False),
}


def _make_case(name: str, cp: int, seed: int) -> dict:
    """Inputs for one case, identical on every process: padded to a multiple of 2*cp, the
    padding being its own trailing sample."""
    length, packed = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    seq_len = -(-length // (2 * cp)) * (2 * cp)
    cu_seqlens = None
    if packed:
        cuts = torch.randperm(length - 1, generator=gen)[:5] + 1  # 5 cuts in 1..length-1
        bounds = [0, *sorted(cuts.tolist()), length]
        cu_seqlens = torch.tensor(bounds + ([seq_len] if seq_len > length else []))
    elif seq_len != length:
        raise AssertionError("unpacked cases use a length divisible by 2*cp")

    def randn(heads: int) -> torch.Tensor:
        return torch.randn(BATCH, heads, seq_len, HEAD_DIM, generator=gen)

    q, k, v, grad_out = randn(NUM_Q_HEADS), randn(NUM_KV_HEADS), randn(NUM_KV_HEADS), randn(4)
    return {"q": q, "k": k, "v": v, "grad_out": grad_out, "cu_seqlens": cu_seqlens}


def _zigzag(tensor: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Chunks rank and 2cp-1-rank of the sequence dim (2) of [b, h, S, d]."""
    chunks = tensor.chunk(2 * cp, dim=2)  # 2cp x [b, h, C, d]
    return torch.cat((chunks[rank], chunks[2 * cp - 1 - rank]), dim=2)  # [b, h, 2C, d]


def _reference(case: dict) -> dict:
    q, k, v = (case[name].clone().requires_grad_() for name in ("q", "k", "v"))
    seq_len = q.shape[2]
    index = torch.arange(seq_len)
    cu_seqlens = case["cu_seqlens"]
    segments = None if cu_seqlens is None else segment_ids(cu_seqlens, 0, seq_len)
    out, _ = reference_attention(
        q, k, v, q_index=index, k_index=index, q_segment=segments, k_segment=segments
    )
    out.backward(case["grad_out"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _ring_rank(rank: int, world_size: int, seed: int) -> dict:
    """On each rank: every case's local out, dq, dk, dv."""
    results = {}
    for name in CASES:
        case = _make_case(name, world_size, seed)
        q, k, v = (_zigzag(case[n], world_size, rank).requires_grad_() for n in ("q", "k", "v"))
        attention_fn = make_ring_attention_fn(dist.group.WORLD, case["cu_seqlens"])
        out = attention_fn(q, k, v, 0)
        out.backward(_zigzag(case["grad_out"], world_size, rank))
        results[name] = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_matches_single_process(ranks, cp):
    seed = 1234 + cp
    per_rank = ranks(_ring_rank, cp, args=(seed,), timeout_s=120)
    for name in CASES:
        expected = _reference(_make_case(name, cp, seed))
        for rank, results in enumerate(per_rank):
            for key, value in results[name].items():
                where = f"{name}, rank {rank}, {key}"
                torch.testing.assert_close(
                    value, _zigzag(expected[key], cp, rank), msg=lambda m, w=where: f"{w}: {m}"
                )


def _absent_peer_rank(rank: int, world_size: int, stall_s: float) -> str:
    """Rank 0 runs ring attention; rank 1 does not take part: it leaves at once (stall_s 0) or
    stalls for stall_s seconds, past the group timeout, before leaving."""
    if rank != 0:
        time.sleep(stall_s)
        return "left"
    q = torch.randn(1, 2, 8, HEAD_DIM)
    try:
        ring_attention(q, q, q, group=dist.group.WORLD)
    except RuntimeError as err:
        return str(err)
    return "no error"


@pytest.mark.distributed
@pytest.mark.parametrize(
    "stall_s", [0.0, pytest.param(8.0, marks=pytest.mark.slow)], ids=["dead", "stalled"]
)
def test_absent_peer_raises_runtime_error(ranks, stall_s):
    """A peer that exits (connection closed) or stalls past the 4 s group timeout: rank 0
    raises a RuntimeError naming the ring step instead of hanging."""
    start = time.monotonic()
    message, _ = ranks(_absent_peer_rank, 2, args=(stall_s,), timeout_s=60, group_timeout_s=4)
    assert message.startswith("ring attention: passing K/V at step 0 failed"), message
    assert time.monotonic() - start < 30


def test_group_of_one_is_local_attention():
    case = _make_case("packed_padded", 1, seed=7)
    q, k, v = (case[name].clone().requires_grad_() for name in ("q", "k", "v"))
    out = ring_attention(q, k, v, group=None, cu_seqlens=case["cu_seqlens"])
    out.backward(case["grad_out"])
    expected = _reference(case)
    for key, value in {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}.items():
        torch.testing.assert_close(value, expected[key])
