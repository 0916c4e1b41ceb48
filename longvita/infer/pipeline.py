"""The public entry point: `longvita.load(dir)` -> Pipeline, and `Pipeline.generate`.

Owns wiring a checkpoint directory into a model, a Processor and the engine, the checks that
need all three, and turning the engine's tokens into the answer. The checks run after the
Processor has planned the prompt (headers only) and before any pixel is decoded or the model
runs: the prompt against the model's positions, and its KV cache, prefill and media decoding
memory (`infer.plan`) against the free memory. The contract is in DESIGN.md; tests outside this
repo rely on it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from longvita.assets import DEMO_NAME
from longvita.checks import check_int
from longvita.config import LongVITAConfig
from longvita.errors import CheckpointError, PositionsError, PromptError
from longvita.infer.cp_engine import ShardedRunner
from longvita.infer.decode import Continuation, GenerationStream
from longvita.infer.detokenize import Detokenizer
from longvita.infer.engine import EncodedTiles, LocalRunner
from longvita.infer.plan import check_prompt_memory, free_memory_bytes
from longvita.infer.prefix_cache import (
    DEFAULT_MEMORY_FRACTION,
    UNKNOWN_FREE_MEMORY_BUDGET,
    PrefixCache,
    PromptPrefix,
)
from longvita.infer.prefix_disk import DEFAULT_DISK_BYTES, DiskPrefixStore, checkpoint_identity
from longvita.infer.request import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_VISION_BATCH,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
)
from longvita.model.checkpoint import load_model, save_model
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.parallel.state import ParallelState
from longvita.processing.chat import Messages
from longvita.processing.image import DEFAULT_MAX_PIXELS
from longvita.processing.processor import ImageInput, ProcessedPrompt, Processor, VideoInput
from longvita.processing.tiles import TileSource
from longvita.processing.tokens import load_tokenizer, save_tokenizer
from longvita.runtime import resolve_device, resolve_dtype, resolve_kv_cache_dtype

logger = logging.getLogger(__name__)


class Pipeline:
    """A loaded model with its Processor: prompts and media in, text out.

    `prefix_cache` keeps the keys and values of recent prompts so that a prompt starting like
    one of them prefills only the rest (`infer.prefix_cache`); by default in memory, within
    `DEFAULT_MEMORY_FRACTION` of the free memory (`longvita.load` sets it up).
    `kv_cache_dtype` is what every KV cache of this pipeline stores: "auto" (the model's
    dtype), "float32", "bfloat16", "float16" or "int8" (quantized per token and head,
    `model.kv_cache`); fixed for the pipeline's life, as its prefix cache holds that dtype.
    """

    def __init__(
        self,
        model: LongVITAForCausalLM,
        processor: Processor,
        *,
        prefix_cache: PrefixCache | None = None,
        kv_cache_dtype: str | torch.dtype | None = "auto",
    ) -> None:
        self.model = model
        self.processor = processor
        self._kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, model.lm_head.weight.dtype)
        if prefix_cache is None:
            prefix_cache = PrefixCache(
                max_bytes=default_prefix_cache_bytes(self.device),
                tokens_per_tile=model.config.vision.tokens_per_tile,
            )
        self.prefix_cache = prefix_cache

    @property
    def config(self) -> LongVITAConfig:
        return self.model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The storage dtype of the KV caches (torch.int8: quantized)."""
        return self._kv_cache_dtype

    def process(
        self,
        messages: Messages,
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
        *,
        max_frames: int | None = None,
        fps: float | None = None,
    ) -> ProcessedPrompt:
        """Token ids, visual mask and lazy tiles of a prompt (media headers read, no pixels)."""
        return self.processor(messages, images, videos, max_frames=max_frames, fps=fps)

    def generate(
        self,
        messages: Messages,
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
        **options: Any,
    ) -> GenerationOutput:
        """Answer `messages` (a string is one user turn); the contract is in DESIGN.md.

        images / videos: one per `<image>` / `<video>` tag, in order (paths, PIL images; video
        files or frame directories). Options (GenerationRequest, SamplingParams):
        max_new_tokens=64, temperature=0.0 (greedy), top_p=1.0, top_k=0, seed=None,
        stop=() (strings: the answer ends before the first one), max_frames=None / fps=None
        (the model's 4096 frames at 1 fps), return_scores=False,
        prefill_chunk=4096 tokens and vision_batch=16 tiles (working memory, not results).
        A prompt longer than the model's positions, or whose KV cache and prefill do not fit
        the free memory, raises PromptError before any media is decoded.
        """
        return self.run(GenerationRequest.create(messages, images, videos, **options))

    def stream(
        self,
        messages: Messages,
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
        **options: Any,
    ) -> GenerationStream:
        """`generate`, with the answer as it comes: iterate for its pieces (`TokenStep`: a new
        token's id and the text it completes, never half a character), then read `.output`
        (the GenerationOutput `generate` returns). Same options as `generate`.

            for piece in pipe.stream("Tell a story", max_new_tokens=100):
                print(piece.text, end="", flush=True)

        Checks run here, before the first piece; the media decoders are released when the
        iteration ends (or by `close()` if it is left early).
        """
        return self.open(GenerationRequest.create(messages, images, videos, **options))

    def run(
        self, request: GenerationRequest, *, state: ParallelState | None = None
    ) -> GenerationOutput:
        """Generate the answer to a request: in this process, or, with a `state` whose cp group
        has several ranks, with the prompt, tiles and KV cache split over that group (every rank
        calls this with the same request; all get the same tokens, scores are on cp rank 0)."""
        return self.open(request, state=state).run()

    def open(
        self, request: GenerationRequest, *, state: ParallelState | None = None
    ) -> GenerationStream:
        """The stream of a request (`run` drains it, `stream` hands it out): the prompt planned
        and checked, nothing generated yet."""
        cp = 1 if state is None else state.cp_size
        ranks_per_host = 1 if state is None else state.local_world_size
        prompt, sampling = self.prepare(request, cp=cp, ranks_per_host=ranks_per_host)
        try:
            return self.token_stream(
                prompt.input_ids,
                prompt.visual_mask,
                prompt.tiles,
                sampling,
                stop=request.stop,
                prefill_chunk=request.prefill_chunk,
                vision_batch=request.vision_batch,
                return_scores=request.return_scores,
                state=state,
                prefix=self.prompt_prefix(prompt),
                finalize=lambda output: self.describe(output, prompt),
            )
        except BaseException:
            prompt.tiles.close()
            raise

    def generate_tokens(self, *args: Any, **kwargs: Any) -> GenerationOutput:
        """`token_stream(...)` run to the end."""
        return self.token_stream(*args, **kwargs).run()

    def token_stream(
        self,
        input_ids: torch.Tensor,
        visual_mask: torch.Tensor,
        tiles: TileSource | EncodedTiles,
        sampling: SamplingParams,
        *,
        finalize: Callable[[GenerationOutput], GenerationOutput] | None = None,
        **options: Any,
    ) -> GenerationStream:
        """The engine on a prompt already processed (no checks): `open` and callers that bring
        their own tiles, e.g. features encoded once and reused (V-NIAH). Options: `sequence`'s."""
        runner, continuation = self.sequence(input_ids, visual_mask, tiles, sampling, **options)
        return GenerationStream(
            runner, continuation, vocab_size=self.config.vocab_size, finalize=finalize
        )

    def sequence(
        self,
        input_ids: torch.Tensor,
        visual_mask: torch.Tensor,
        tiles: TileSource | EncodedTiles,
        sampling: SamplingParams,
        *,
        stop: Sequence[str] = (),
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        vision_batch: int = DEFAULT_VISION_BATCH,
        return_scores: bool = False,
        state: ParallelState | None = None,
        prefix: PromptPrefix | None = None,
    ) -> tuple[LocalRunner | ShardedRunner, Continuation]:
        """What generating after a processed prompt needs, nothing run yet: the runner (this
        process, or this rank's share under `state`) and the continuation that decides each
        token, with the text decoded as it comes up to the first `stop` sequence. `prefix`
        (`prompt_prefix`): reuse and keep the prompt's keys and values."""
        inputs = {
            "params": sampling,
            "tiles": tiles,
            "visual_mask": visual_mask,
            "prefill_chunk": prefill_chunk,
            "vision_batch": vision_batch,
            "prefix": prefix,
            "kv_cache_dtype": self.kv_cache_dtype,
        }
        if state is None or state.cp_size == 1:
            runner = LocalRunner(self.model, input_ids, **inputs)
        else:
            pad = self.processor.tokens.pad
            runner = ShardedRunner(self.model, input_ids, state=state, pad_id=pad, **inputs)
        continuation = Continuation(
            runner.choose,
            sampling,
            self.processor.tokens.stop,
            text=Detokenizer(self.tokenizer, stop),
            keep_logits=return_scores and (state is None or state.cp_rank == 0),
        )
        return runner, continuation

    def prepare(
        self,
        request: GenerationRequest,
        *,
        cp: int = 1,
        ranks_per_host: int = 1,
        trim: bool = True,
    ) -> tuple[ProcessedPrompt, SamplingParams]:
        """Plan the prompt and check it fits, before any pixel is decoded: returns it with the
        sampling parameters (max_new_tokens trimmed to the model's positions; with trim=False,
        PositionsError instead: a server refuses a max_tokens its client chose).

        cp, ranks_per_host: the context-parallel size and the ranks sharing this host's memory
        (each rank then holds its share of the KV cache and the round's working memory).
        """
        prompt = self.process(
            request.messages,
            request.images,
            request.videos,
            max_frames=request.max_frames,
            fps=request.fps,
        )
        max_new_tokens = self.fit_to_positions(prompt, request.sampling.max_new_tokens, trim=trim)
        self._check_memory(
            self.config,
            num_prompt_tokens=prompt.num_tokens,
            max_new_tokens=max_new_tokens,
            dtype=self.model.lm_head.weight.dtype,
            kv_cache_dtype=self.kv_cache_dtype,
            device=self.device,
            prefill_chunk=request.prefill_chunk,
            vision_batch=request.vision_batch,
            has_tiles=prompt.num_tiles > 0,
            cp=cp,
            ranks_per_host=ranks_per_host,
            media_bytes=prompt.tiles.decode_bytes(request.vision_batch),
        )
        return prompt, dataclasses.replace(request.sampling, max_new_tokens=max_new_tokens)

    def prompt_prefix(self, prompt: ProcessedPrompt) -> PromptPrefix | None:
        """The prompt's use of the prefix cache (its media files hashed now), or None when the
        cache is off or a medium cannot be identified."""
        return self.prefix_cache.for_prompt(prompt)

    def _check_memory(self, *args: Any, **kwargs: Any) -> None:
        """`check_prompt_memory`; when it refuses while the prefix cache holds memory, the
        cache is emptied (with a warning) and the check runs again."""
        try:
            check_prompt_memory(*args, **kwargs)
        except PromptError:
            if self.prefix_cache.memory.num_bytes == 0:
                raise
            logger.warning("prefix cache emptied: the prompt needs the memory it held")
            self.prefix_cache.clear()
            check_prompt_memory(*args, **kwargs)

    def describe(self, output: GenerationOutput, prompt: ProcessedPrompt) -> GenerationOutput:
        """The engine's output with what the prompt held."""
        return dataclasses.replace(
            output,
            prompt_tokens=prompt.num_tokens,
            num_tiles=prompt.num_tiles,
            image_grids=prompt.image_grids,
            video_frames=prompt.video_frames,
        )

    def fit_to_positions(
        self,
        prompt: ProcessedPrompt,
        max_new_tokens: int,
        *,
        how_to_shorten: str | None = None,
        trim: bool = True,
    ) -> int:
        """Refuse a prompt past the model's positions; trim max_new_tokens to what is left
        (trim=False: refuse it too, PositionsError).
        how_to_shorten: the advice in the refusal (default: the prompt's own, e.g. fewer
        frames for a video)."""
        limit = self.config.max_position_embeddings
        prompt_tokens = prompt.num_tokens
        if prompt_tokens >= limit:
            raise PositionsError(
                f"the prompt has {prompt_tokens} tokens but the model accepts at most {limit} "
                f"positions (prompt + new tokens); use {how_to_shorten or prompt.how_to_shorten}",
                prompt_tokens=prompt_tokens,
                positions=limit,
            )
        if prompt_tokens + max_new_tokens > limit and not trim:
            raise PositionsError(
                f"max_new_tokens={max_new_tokens:,} does not fit: the prompt has "
                f"{prompt_tokens:,} tokens and the model {limit:,} positions (prompt + new "
                f"tokens); ask at most {limit - prompt_tokens:,}",
                prompt_tokens=prompt_tokens,
                positions=limit,
            )
        if prompt_tokens + max_new_tokens > limit:
            logger.warning(
                "max_new_tokens=%d trimmed to %d: the model has %d positions and the prompt %d",
                max_new_tokens,
                limit - prompt_tokens,
                limit,
                prompt_tokens,
            )
            return limit - prompt_tokens
        return max_new_tokens

    def save(self, directory: str | Path, *, max_shard_bytes: int | None = None) -> None:
        """Write the official layout: config.json, safetensors, tokenizer files. An existing
        checkpoint there is replaced as a whole (see `model.checkpoint.save_model`)."""
        save_model(
            self.model,
            directory,
            max_shard_bytes=max_shard_bytes,
            write_extra=lambda staged: save_tokenizer(self.tokenizer, staged),
        )


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    kv_cache_dtype: str | torch.dtype = "auto",
    prefix_cache_bytes: int | None = None,
    prefix_cache_dir: str | Path | None = None,
    prefix_cache_dir_bytes: int = DEFAULT_DISK_BYTES,
) -> Pipeline:
    """Load a Long-VITA checkpoint directory (official `Long-VITA-*_HF` layout).

    device: "cpu", "cuda", "cuda:N" or another accelerator this machine has; dtype: float32,
    bfloat16 or float16 (None: float32 on CPU, bfloat16 on an accelerator). Anything else is a
    ValueError here, before the weights are read. max_pixels: images and video frames with more
    pixels are refused from their headers (default: Pillow's 89,478,485).
    kv_cache_dtype: what the KV cache stores: "auto" (dtype), "float32", "bfloat16",
    "float16", or "int8" (keys and values quantized per token and head with a float32 scale:
    3.8x smaller than float32, 1.9x than bfloat16; dequantized block by block in attention).

    Prefix cache (docs/prefix_cache.md): prefix_cache_bytes, the memory kept for recent
    prompts' keys and values (None: a quarter of the free memory after loading; 0: off);
    prefix_cache_dir, a directory where they are also kept across runs, within
    prefix_cache_dir_bytes (default 64 GiB).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    check_int("max_pixels", max_pixels, minimum=1)
    kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype)
    directory = Path(path).expanduser()
    if not directory.is_dir():
        hint = " (the demo model is longvita.DEMO_MODEL)" if str(path) == DEMO_NAME else ""
        raise CheckpointError(f"{directory} is not a directory: give a checkpoint directory{hint}")
    config = LongVITAConfig.from_pretrained(directory)
    processor = Processor(load_tokenizer(directory), config.vision, max_pixels=max_pixels)
    _check_vocab(len(processor.tokenizer), config)
    if prefix_cache_bytes is not None:
        check_int("prefix_cache_bytes", prefix_cache_bytes, minimum=0)
    check_int("prefix_cache_dir_bytes", prefix_cache_dir_bytes, minimum=1)
    model = load_model(directory, device=device, dtype=dtype, config=config)
    if prefix_cache_bytes is None:
        prefix_cache_bytes = default_prefix_cache_bytes(device)
    disk = None
    if prefix_cache_dir is not None:
        disk = DiskPrefixStore(
            Path(prefix_cache_dir).expanduser(),
            max_bytes=prefix_cache_dir_bytes,
            model_identity=checkpoint_identity(directory),
            dtype=kv_dtype,
            kv_shape=(config.num_hidden_layers, config.num_key_value_heads, config.head_dim),
        )
    prefix_cache = PrefixCache(
        max_bytes=prefix_cache_bytes, tokens_per_tile=config.vision.tokens_per_tile, disk=disk
    )
    return Pipeline(model, processor, prefix_cache=prefix_cache, kv_cache_dtype=kv_dtype)


def default_prefix_cache_bytes(device: torch.device) -> int:
    """The default in-memory prefix cache budget: `DEFAULT_MEMORY_FRACTION` of the device's
    free memory now."""
    free = free_memory_bytes(device)
    return UNKNOWN_FREE_MEMORY_BUDGET if free is None else int(DEFAULT_MEMORY_FRACTION * free)


def _check_vocab(tokenizer_size: int, config: LongVITAConfig) -> None:
    if tokenizer_size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer_size} tokens but the model's embedding only "
            f"{config.vocab_size} rows (config.json vocab_size)"
        )
