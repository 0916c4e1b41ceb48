"""What only a CUDA device can check: the whole pipeline on the GPU in fp32 (the CPU's tokens),
bf16 close to fp32, the int8 KV cache (the CPU's tokens), chunked prefill + KV-cache decode
equal to one forward, decode attention over a long cache without repeated K/V heads, a
training step's gradients, and NCCL groups (one GPU: a world of one; two or more:
`generate_cp` across GPUs). Skipped without a GPU; `make gpu-check` runs them on a lent one
(README)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longvita
from longvita.data.packed import PackedSequence
from longvita.ops.attention import attention, block_attention
from longvita.ops.loss import IGNORE_INDEX, shift_labels
from longvita.parallel.context_parallel import sequence_loss
from longvita.parallel.state import ParallelState
from longvita.testing import random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = {  # name: (prompt, image keys, video keys)
    "text": ("Describe a quiet morning.", [], []),
    "image": ("<image>\nWhat is in this image?", ["wide"], []),
    "video": ("<video>\nWhat happens?", [], ["video"]),
}


def _generate(pipe, media, name, **options):
    prompt, image_keys, video_keys = PROMPTS[name]
    images, videos = [media[k] for k in image_keys], [media[k] for k in video_keys]
    return pipe.generate(prompt, images, videos, return_scores=True, **options)


@pytest.mark.parametrize("name", PROMPTS)
def test_pipeline_on_cuda_in_fp32_gives_the_cpu_tokens(tiny_checkpoint, media, name):
    cpu = _generate(longvita.load(tiny_checkpoint), media, name, max_new_tokens=8)
    gpu_pipe = longvita.load(tiny_checkpoint, device="cuda", dtype="float32")
    gpu = _generate(gpu_pipe, media, name, max_new_tokens=8, prefill_chunk=7)
    assert gpu.token_ids == cpu.token_ids
    torch.testing.assert_close(gpu.scores, cpu.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", PROMPTS)
def test_an_int8_kv_cache_on_cuda_gives_the_cpu_int8_tokens(tiny_checkpoint, media, name):
    """The int8 cache's decode (direct int8 blocks) and chunked prefill (dequantized blocks for
    the fused kernel) on the GPU, fp32: the CPU's int8 tokens, logits close."""
    options = {"max_new_tokens": 8, "prefill_chunk": 7}
    cpu = _generate(longvita.load(tiny_checkpoint, kv_cache_dtype="int8"), media, name, **options)
    gpu_pipe = longvita.load(tiny_checkpoint, device="cuda", dtype="float32", kv_cache_dtype="int8")
    gpu = _generate(gpu_pipe, media, name, **options)
    assert gpu.token_ids == cpu.token_ids
    torch.testing.assert_close(gpu.scores, cpu.scores, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", PROMPTS)
def test_bfloat16_on_cuda_is_close_to_fp32(tiny_checkpoint, media, name):
    reference = _generate(longvita.load(tiny_checkpoint), media, name, max_new_tokens=1)
    pipe = longvita.load(tiny_checkpoint, device="cuda")  # bfloat16 by default on a GPU
    assert pipe.model.lm_head.weight.dtype == torch.bfloat16
    got = _generate(pipe, media, name, max_new_tokens=1)
    torch.testing.assert_close(got.scores, reference.scores, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_and_cached_decode_on_cuda_equal_one_forward(tiny_checkpoint, media, dtype):
    pipe = longvita.load(tiny_checkpoint, device="cuda", dtype=dtype)
    out = _generate(pipe, media, "image", max_new_tokens=6, prefill_chunk=5, vision_batch=2)
    prompt = pipe.process(PROMPTS["image"][0], [media["wide"]])
    ids = torch.cat([prompt.input_ids, torch.tensor(out.token_ids)])
    mask = torch.cat([prompt.visual_mask, torch.zeros(len(out.token_ids), dtype=torch.bool)])
    with torch.inference_mode():
        full = pipe.model(
            ids.cuda()[None],
            pixel_values=prompt.pixel_values.cuda(),
            visual_mask=mask.cuda()[None],
            logit_positions=torch.arange(ids.numel()),
        )[0].float()  # [seq, vocab]
    steps = full[prompt.num_tokens - 1 : prompt.num_tokens - 1 + len(out.token_ids)].cpu()
    tol = {} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(out.scores, steps, **tol)


def test_batched_decode_in_the_pool_on_cuda_gives_the_cpu_tokens(tiny_checkpoint, media):
    """Three sequences stepped together by the server's engine on the GPU in fp32, their caches
    moved into the decode pool (CUDA index tensors, a masked SDPA): each gets the tokens the CPU
    gives it alone."""
    from longvita.infer.batch import BatchEngine, BatchSequence
    from longvita.infer.request import GenerationRequest

    cpu = longvita.load(tiny_checkpoint)
    gpu = longvita.load(tiny_checkpoint, device="cuda", dtype="float32")
    engine = BatchEngine(gpu.model, max_batch=4)
    requests, got, pooled = [], {}, set()
    for name, (prompt, image_keys, video_keys) in PROMPTS.items():
        images, videos = [media[k] for k in image_keys], [media[k] for k in video_keys]
        request = GenerationRequest.create(prompt, images, videos, max_new_tokens=8)
        planned, sampling = gpu.prepare(request)
        runner, continuation = gpu.sequence(
            planned.input_ids, planned.visual_mask, planned.tiles, sampling
        )
        got[name] = []
        engine.add(BatchSequence(runner, continuation, _recorder(got[name]), _ignore))
        requests.append((name, request, runner))
    while not engine.idle:
        engine.step()
        pooled |= {name for name, _, runner in requests if engine.pool.holds(runner.cache)}
    assert pooled == set(PROMPTS)
    for name, request, _ in requests:
        assert got[name] == cpu.run(request).token_ids, name


def _recorder(token_ids: list[int]):
    def on_step(step) -> None:
        if step.token_id is not None:
            token_ids.append(step.token_id)

    return on_step


def _ignore(reason, error) -> None:
    pass


def _grouped_qkv(q_len: int, kv_len: int, dtype: torch.dtype):
    """q [1, 40, q_len, 128] and k, v [1, 8, kv_len, 128] on CUDA (the 14B model's heads)."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(heads, length):
        return torch.randn(1, heads, length, 128, device="cuda", dtype=dtype, generator=gen)

    return randn(40, q_len), randn(8, kv_len), randn(8, kv_len)


def _peak_added(call):
    """call()'s result and the CUDA memory its peak held above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - before


def _reference(q, k, v):
    """fp32 attention of q over k, v with each K/V head read by 5 query heads: (out, lse)."""
    scores = q.float() @ k.float().repeat_interleave(5, 1).transpose(-1, -2) / 128**0.5
    return scores.softmax(-1) @ v.float().repeat_interleave(5, 1), scores.logsumexp(-1)


def _tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_a_long_cache_never_repeats_kv_heads(dtype):
    """40 query heads on 8 K/V heads over 256K cached tokens: a repeated K/V would add 4x the
    cache; the step may add only a sliver."""
    q, k, v = _grouped_qkv(1, 262_144, dtype)
    out, added = _peak_added(lambda: attention(q, k, v, causal=True, q_offset=k.shape[2] - 1))
    assert added < 0.05 * k.numel() * k.element_size(), added
    torch.testing.assert_close(out.float(), _reference(q, k, v)[0], **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefill_chunk_over_a_cache_block_never_repeats_kv_heads(dtype):
    """A 1,024-token chunk of 40 query heads over 64K cached tokens of 8 K/V heads (what
    `KVCache.attend_cached_` runs for every chunk after the first): the CUDA kernel may not
    repeat the block's K/V (5x its size); the query groups fold into rows instead."""
    q, k, v = _grouped_qkv(1024, 65_536, dtype)
    (out, lse), added = _peak_added(lambda: block_attention(q, k, v, causal=False))
    block = k.numel() * k.element_size()
    assert added < 3 * block, added  # repeated K and V would add 10 blocks; out is 0.16 of one
    rows = slice(0, 64)  # the fp32 reference for a slice of the queries
    expected_out, expected_lse = _reference(q[:, :, rows], k, v)
    torch.testing.assert_close(out[:, :, rows].float(), expected_out, **_tolerance(dtype))
    torch.testing.assert_close(lse[:, :, rows], expected_lse, **_tolerance(dtype))


def _packed_sequence(config) -> PackedSequence:
    gen = torch.Generator().manual_seed(0)
    lengths = [23, 17, 21]
    seq_len = sum(lengths)
    input_ids = torch.randint(6, config.vocab_size, (seq_len,), generator=gen)
    visual_mask = torch.zeros(seq_len, dtype=torch.bool)
    tokens_per_tile = config.vision.tokens_per_tile
    visual_mask[3 : 3 + 2 * tokens_per_tile] = True
    input_ids[visual_mask] = 5
    labels = input_ids.clone()
    labels[visual_mask] = IGNORE_INDEX
    size = config.vision.image_size
    return PackedSequence(
        input_ids=input_ids,
        targets=shift_labels(labels),
        position_ids=torch.cat([torch.arange(n) for n in lengths]),
        cu_seqlens=torch.tensor([0, 23, 40, 61]),
        visual_mask=visual_mask,
        pixel_values=torch.randn(2, 3, size, size, generator=gen),
        tokens_per_tile=tokens_per_tile,
    )


def test_a_training_step_on_cuda_gives_the_cpu_gradients():
    """Packed samples, tiles, the masked loss: forward and backward through the CUDA kernels."""
    grads = {}
    for device in ("cpu", "cuda"):
        model = random_model(seed=3).to(device).train()
        seq = _packed_sequence(model.config)
        result = sequence_loss(model, seq, ParallelState.single(device), pad_id=0)
        result.loss.backward()
        grads[device] = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["cuda"].keys() == grads["cpu"].keys()
    for name, grad in grads["cpu"].items():
        torch.testing.assert_close(grads["cuda"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


_NCCL_SCRIPT = """
import json, sys, torch, torch.distributed as dist
import longvita
from longvita.infer.cp_engine import generate_sharded
from longvita.infer.request import SamplingParams
from longvita.parallel.state import ParallelState

state = ParallelState.init(cp=1)  # NCCL, from the environment: a world of one
ones = torch.ones(3, device=state.device)
dist.all_reduce(ones, group=state.cp_group)
dist.all_reduce(ones, group=state.dp_group)
pipe = longvita.load(sys.argv[1], device=state.device, dtype="float32")
prompt = pipe.process("Describe a quiet morning.")
out = generate_sharded(pipe.model, prompt.input_ids, state=state,
    params=SamplingParams(max_new_tokens=6), stop_ids=pipe.processor.tokens.stop, pad_id=0)
print("RESULT " + json.dumps({"backend": dist.get_backend(state.cp_group),
      "sum": ones.tolist(), "tokens": out.token_ids}))
state.destroy()
"""


def test_nccl_process_groups_on_one_gpu(tiny_checkpoint, tmp_path):
    script = tmp_path / "nccl.py"
    script.write_text(_NCCL_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": path}  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_checkpoint)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["backend"] == "nccl" and result["sum"] == [1.0, 1.0, 1.0]
    expected = longvita.load(tiny_checkpoint).generate(
        "Describe a quiet morning.", max_new_tokens=6
    )
    assert result["tokens"] == expected.token_ids


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_generate_cp_over_two_gpus_equals_one_process(tiny_checkpoint, media):
    from longvita.infer.cp_launch import generate_cp
    from longvita.infer.request import GenerationRequest

    request = GenerationRequest.create(
        "<video>\nWhat happens?", [], [media["video"]], max_new_tokens=6, return_scores=True
    )
    reference = longvita.load(tiny_checkpoint, device="cuda", dtype="float32").run(request)
    output = generate_cp(tiny_checkpoint, request, cp=2, device="cuda", dtype="float32")
    assert output.token_ids == reference.token_ids
    torch.testing.assert_close(output.scores, reference.scores, atol=1e-4, rtol=1e-4)
