"""`longvita generate --cp N`: one GenerationRequest answered by N context-parallel ranks.

Owns starting the ranks through `parallel.launch` (spawned here, or the ranks of the torchrun
job this process belongs to) and what every rank does for one request: load the checkpoint and
run its share of `Pipeline.run` (which plans and checks the prompt with the rank's share of the
memory and drives `infer.cp_engine.ShardedRunner` through the common decode loop). The weights
are replicated: every rank loads the checkpoint and runs the Processor; only the sequence, the
ViT tiles and the KV cache are split.
"""

from __future__ import annotations

import os
from pathlib import Path

from longvita.checks import check_int
from longvita.infer.pipeline import load
from longvita.infer.request import GenerationOutput, GenerationRequest
from longvita.parallel.launch import DEFAULT_TIMEOUT_S, launch
from longvita.parallel.state import ParallelState
from longvita.processing.image import DEFAULT_MAX_PIXELS
from longvita.runtime import resolve_device, resolve_dtype, resolve_kv_cache_dtype

PREFIX_CACHE_OPTIONS = ("prefix_cache_bytes", "prefix_cache_dir", "prefix_cache_dir_bytes")


def generate_cp(
    model_dir: str | Path,
    request: GenerationRequest,
    *,
    cp: int,
    device: str = "cpu",
    dtype: str | None = None,
    kv_cache_dtype: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **prefix_cache: object,
) -> GenerationOutput | None:
    """`Pipeline.run(request)` with the prompt, the ViT tiles and the KV cache split over `cp`
    ranks (started here, or those of the torchrun job this process belongs to).

    prefix_cache: `longvita.load`'s prefix_cache_bytes / prefix_cache_dir /
    prefix_cache_dir_bytes, for every rank (each keeps its own shard of the prompt's keys and
    values, in its own file). kv_cache_dtype: `longvita.load`'s, each rank's shard in it.

    Returns the output on global rank 0 (with `cp` and the per-rank statistics filled in),
    None on the other torchrun ranks. Bad arguments (device, dtype, a torchrun world of another
    size) raise ValueError here, before any process starts; a user error of a rank (a missing
    image...) is raised as itself, any other failure as `parallel.RankFailedError`.
    """
    resolved = resolve_device(device)
    resolve_kv_cache_dtype(kv_cache_dtype, resolve_dtype(dtype, resolved))
    check_int("max_pixels", max_pixels, minimum=1)
    unknown = sorted(set(prefix_cache) - set(PREFIX_CACHE_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; expected some of {PREFIX_CACHE_OPTIONS}")
    world_size = os.environ.get("WORLD_SIZE")
    if world_size is not None and int(world_size) != cp:
        raise ValueError(
            f"torchrun started {world_size} processes but --cp is {cp}: generate runs one "
            f"sequence, so start exactly --cp processes (--nproc-per-node x --nnodes)"
        )
    return launch(
        _generate_on_rank,
        cp=cp,
        args=(
            str(model_dir),
            request,
            dtype,
            {"max_pixels": max_pixels, "kv_cache_dtype": kv_cache_dtype, **prefix_cache},
        ),
        device=resolved.type,
        timeout_s=timeout_s,
    )


def _generate_on_rank(
    state: ParallelState,
    model_dir: str,
    request: GenerationRequest,
    dtype: str | None,
    load_options: dict,
) -> GenerationOutput | None:
    """Every rank: load, then its share of `Pipeline.run`; cp rank 0 returns the output."""
    pipe = load(model_dir, device=state.device, dtype=dtype, **load_options)
    output = pipe.run(request, state=state)
    return output if state.cp_rank == 0 else None
