"""Start the processes of a context-parallel job on this machine, or join the job torchrun
started; and `generate_cp`, the entry point of `longvita generate --cp N`.

Owns process start-up, the rendezvous and the propagation of one rank's failure to the job.
`launch(fn, cp=N)` runs `fn(state, *args)` on every rank and returns global rank 0's result:

- under torchrun (WORLD_SIZE in the environment) this process is one rank: it joins the job
  with `ParallelState.init` (env:// rendezvous) and returns its result on global rank 0, None
  on the others, which print nothing;
- otherwise, with N > 1, it spawns N local processes (gloo on CPU; NCCL on CUDA with device
  `cuda:r` for rank r) that meet over a file:// rendezvous in a temporary directory, waits for
  them and returns rank 0's result; with N = 1 it calls `fn` in this process.

Failures: every collective has the `timeout_s` of `ParallelState`, so a rank whose peer died or
stalled raises instead of hanging. Here, the first rank to fail ends the job: the others are
terminated at once and this process raises. A user error (a ValueError such as a missing image)
is re-raised as itself, so the command line reports it as it would at --cp 1; anything else
becomes `RankFailedError` naming the rank, with its traceback. Under torchrun the elastic agent
stops the other ranks when one fails.

The model weights are replicated: every rank loads the checkpoint and runs the Processor;
only the sequence, the ViT tiles and the KV cache are split.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longvita.infer.engine import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_VISION_BATCH,
    SamplingParams,
    check_chunking,
)
from longvita.infer.plan import check_memory, free_memory_bytes, plan_memory
from longvita.parallel.cp_inference import ShardedGenerationResult, generate_sharded
from longvita.parallel.state import ParallelState

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
"""How long a rank waits in a collective for its peers before it raises."""


class RankFailedError(RuntimeError):
    """A rank of a launched job failed; the message names it and carries its traceback."""


def launch(
    fn: Callable[..., Any],
    *,
    cp: int,
    args: tuple = (),
    device: str | torch.device = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """Run `fn(state: ParallelState, *args)` on the `cp` ranks of a context-parallel group.

    Returns global rank 0's result (None on the other ranks under torchrun). `fn` and `args`
    must be picklable when processes are spawned (a module-level function).
    device: "cpu" (gloo) or "cuda" (NCCL, one GPU per rank, cuda:0 .. cuda:cp-1 when spawned,
        cuda:LOCAL_RANK under torchrun).
    timeout_s: the collective timeout of every process group.
    """
    if cp < 1:
        raise ValueError(f"--cp must be >= 1, got {cp}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    device = torch.device(device)
    if "WORLD_SIZE" in os.environ:
        return _join_torchrun(fn, cp, args, device, timeout_s)
    if cp == 1:
        return fn(ParallelState.single(device), *args)
    if device.type == "cuda" and torch.cuda.device_count() < cp:
        raise ValueError(
            f"--cp {cp} on {device.type} needs {cp} GPUs (one per rank) but "
            f"{torch.cuda.device_count()} are visible"
        )
    if device.index is not None:
        logger.warning("device %s: the index is ignored, rank r runs on %s:r", device, device.type)
    return _spawn(fn, cp, args, device, timeout_s)


def _join_torchrun(fn, cp, args, device, timeout_s) -> Any:
    """This process is one rank of a torchrun job."""
    state = ParallelState.init(
        cp, timeout_s=timeout_s, device=None if device.type == "cuda" else device
    )
    result = fn(state, *args)
    state.destroy()
    return result if state.is_main else None


def _spawn(fn, cp: int, args: tuple, device: torch.device, timeout_s: float) -> Any:
    """Spawn `cp` local ranks, wait for all of them, return rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="longvita-cp-") as tmp:
        workdir = Path(tmp)
        context = mp.start_processes(
            _rank_main,
            args=(cp, str(workdir), device.type, timeout_s, fn, args),
            nprocs=cp,
            join=False,
            start_method="spawn",
        )
        try:
            while not context.join():
                pass
        except mp.ProcessRaisedException as err:
            raise _job_error(workdir, cp, err.error_index, str(err)) from None
        except mp.ProcessExitedException as err:
            raise RankFailedError(
                f"rank {err.error_index} of {cp} exited with code {err.exit_code} "
                f"{err.signal_name or ''} before finishing; the other ranks were stopped"
            ) from None
        finally:
            for process in context.processes:  # ours, e.g. after KeyboardInterrupt
                if process.is_alive():
                    process.kill()
                    process.join()
        result_file = workdir / "result.pt"
        if not result_file.is_file():
            raise RankFailedError(f"rank 0 of {cp} exited without a result")
        # A file our own rank 0 has just written: full unpickling allows any result type.
        return torch.load(result_file, weights_only=False)


def _rank_main(rank, cp, workdir, device_type, timeout_s, fn, args) -> None:
    """Body of a spawned rank: join the group, run `fn`, leave rank 0's result or the error."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(cp), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(cp)
    )
    if device_type == "cpu":  # cp processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cp))
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device(device_type)
    try:
        state = ParallelState.init(
            cp, timeout_s=timeout_s, device=device, init_method=f"file://{workdir}/rendezvous"
        )
        result = fn(state, *args)
    except ValueError as err:
        _save_user_error(Path(workdir) / f"rank{rank}.error", err)
        raise
    state.destroy()
    if rank == 0:
        torch.save(result, Path(workdir) / "result.pt")


def _save_user_error(path: Path, err: ValueError) -> None:
    """Leave a user error for the parent to raise as itself, when it survives pickling."""
    try:
        payload = pickle.dumps(err)
        pickle.loads(payload)
    except Exception:  # an exception with unpicklable state: the parent shows the traceback
        return
    path.write_bytes(payload)


def _job_error(workdir: Path, cp: int, rank: int, trace: str) -> Exception:
    """What the parent raises when `rank` raised: a user error (ValueError) of any rank as
    itself, the lowest rank's first (the others may only have lost their peer), else
    RankFailedError with `rank`'s traceback."""
    for candidate in range(cp):
        error_file = workdir / f"rank{candidate}.error"
        if error_file.is_file():
            # Written by our own rank moments ago: unpickling it is safe.
            return pickle.loads(error_file.read_bytes())
    return RankFailedError(f"rank {rank} failed; the other ranks were stopped:{trace}")


# -- longvita generate --cp N ----------------------------------------------------------------


@dataclass(kw_only=True)
class GenerateRequest:
    """One `generate` call, as every rank receives it (picklable)."""

    model_dir: str
    messages: Any
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    dtype: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_frames: int | None = None
    fps: float | None = None
    return_scores: bool = False
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    vision_batch: int = DEFAULT_VISION_BATCH


def generate_cp(
    model_dir: str | Path,
    messages: Any,
    images: Sequence | None = None,
    videos: Sequence | None = None,
    *,
    cp: int,
    device: str = "cpu",
    dtype: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    max_frames: int | None = None,
    fps: float | None = None,
    return_scores: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    vision_batch: int = DEFAULT_VISION_BATCH,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict | None:
    """`Pipeline.generate` with the prompt, the ViT tiles and the KV cache split over `cp`
    ranks (started here, or those of the torchrun job this process belongs to).

    Returns, on global rank 0 (None on the other torchrun ranks), a dict with "text",
    "token_ids", "prompt_tokens", "new_tokens", "num_tiles", "image_grids", "video_frames",
    "stop_reason", "prefill_seconds", "decode_seconds" (as `longvita generate --json`), plus
    "cp", "prefill_rounds", "kv_cache_bytes_per_rank", "kv_cache_tokens_per_rank",
    "tiles_encoded_per_rank" and, with return_scores, "scores" (float32 [new_tokens, vocab]).
    prefill_chunk: prompt tokens per rank per prefill round; vision_batch: tiles per ViT
    forward (both bound the working memory, not the result).
    """
    SamplingParams(  # bad parameters fail here, before any process starts
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k
    )
    check_chunking(prefill_chunk, vision_batch)
    world_size = os.environ.get("WORLD_SIZE")
    if world_size is not None and int(world_size) != cp:
        raise ValueError(
            f"torchrun started {world_size} processes but --cp is {cp}: generate runs one "
            f"sequence, so start exactly --cp processes (--nproc-per-node x --nnodes)"
        )
    request = GenerateRequest(
        model_dir=str(model_dir),
        messages=messages,
        images=[str(image) if isinstance(image, Path) else image for image in images or []],
        videos=[str(video) for video in videos or []],
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        max_frames=max_frames,
        fps=fps,
        return_scores=return_scores,
        prefill_chunk=prefill_chunk,
        vision_batch=vision_batch,
    )
    return launch(_generate_on_rank, cp=cp, args=(request,), device=device, timeout_s=timeout_s)


def _generate_on_rank(state: ParallelState, request: GenerateRequest) -> dict | None:
    """Every rank: load, process the prompt, generate its share; rank 0 builds the record."""
    import longvita

    pipe = longvita.load(request.model_dir, device=state.device, dtype=request.dtype)
    prompt = pipe.process(
        request.messages,
        request.images,
        request.videos,
        max_frames=request.max_frames,
        fps=request.fps,
    )
    sampling = {k: v for k, v in asdict(request).items() if k in _SAMPLING_FIELDS}
    sampling["max_new_tokens"] = pipe.fit_to_positions(prompt.num_tokens, request.max_new_tokens)
    _check_memory(pipe, prompt, sampling["max_new_tokens"], request, state)
    result = generate_sharded(
        pipe.model,
        prompt.input_ids,
        state=state,
        params=SamplingParams(**sampling),
        stop_ids=pipe.processor.tokens.stop,
        pad_id=pipe.processor.tokens.pad,
        tiles=prompt.tiles,
        visual_mask=prompt.visual_mask,
        return_scores=request.return_scores,
        prefill_chunk=request.prefill_chunk,
        vision_batch=request.vision_batch,
    )
    per_rank = _gather_rank_stats(result, state)
    if state.cp_rank != 0:
        return None
    record = {
        "text": pipe.processor.decode(result.token_ids),
        "token_ids": result.token_ids,
        "prompt_tokens": prompt.num_tokens,
        "new_tokens": len(result.token_ids),
        "num_tiles": prompt.num_tiles,
        "image_grids": prompt.image_grids,
        "video_frames": prompt.video_frames,
        "stop_reason": result.stop_reason,
        "prefill_seconds": result.prefill_seconds,
        "decode_seconds": result.decode_seconds,
        "cp": state.cp_size,
        "prefill_rounds": result.num_rounds,
        **per_rank,
    }
    if request.return_scores:
        record["scores"] = result.scores
    return record


_SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")


def _check_memory(pipe, prompt, max_new_tokens: int, request: GenerateRequest, state) -> None:
    """Refuse, before any media is decoded, a prompt whose KV cache shard and prefill round do
    not fit this rank's free memory (the ranks on one host share its RAM on CPU)."""
    device = state.device
    plan = plan_memory(
        pipe.config,
        num_prompt_tokens=prompt.num_tokens,
        max_new_tokens=max_new_tokens,
        cp=state.cp_size,
        dtype=pipe.model.lm_head.weight.dtype,
        prefill_chunk=request.prefill_chunk,
        vision_batch=request.vision_batch,
        has_tiles=prompt.num_tiles > 0,
        device_type=device.type,
    )
    free = free_memory_bytes(device)
    if free is not None and device.type == "cpu":
        free //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    check_memory(plan, free, device=f"{device} (cp rank {state.cp_rank}/{state.cp_size})")


def _gather_rank_stats(result: ShardedGenerationResult, state: ParallelState) -> dict[str, list]:
    """Every rank's KV cache bytes and tokens and ViT tiles, in cp rank order (on every rank)."""
    local = torch.tensor(
        [result.kv_cache_bytes, result.kv_cache_tokens, result.num_tiles_encoded],
        dtype=torch.int64,
        device=state.device,
    )  # [3]
    if state.cp_size > 1:
        parts = [torch.empty_like(local) for _ in range(state.cp_size)]
        dist.all_gather(parts, local, group=state.cp_group)
        local = torch.stack(parts)  # [cp, 3]
    table = local.reshape(state.cp_size, 3).T.tolist()  # 3 x [cp]
    return {
        "kv_cache_bytes_per_rank": table[0],
        "kv_cache_tokens_per_rank": table[1],
        "tiles_encoded_per_rank": table[2],
    }
