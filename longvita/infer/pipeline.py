"""The public entry point: `longvita.load(dir)` -> Pipeline, and `Pipeline.generate`.

Owns wiring a checkpoint directory into a model, a Processor and the engine, the checks that
need all three, and decoding the output. The checks run after the Processor has planned the
prompt (headers only) and before any pixel is decoded or the model runs: the prompt against the
model's positions, and its KV cache and prefill memory (`infer.plan`) against the device's free
memory. The contract is in DESIGN.md; tests outside this repo rely on it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longvita.config import LongVITAConfig
from longvita.errors import CheckpointError, PromptError
from longvita.infer.engine import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_VISION_BATCH,
    SamplingParams,
    check_chunking,
    generate,
)
from longvita.infer.plan import check_memory, free_memory_bytes, plan_memory
from longvita.model.checkpoint import load_model, save_model
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.processing.chat import Messages
from longvita.processing.processor import ImageInput, ProcessedPrompt, Processor, VideoInput
from longvita.processing.tokens import load_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype name or torch.dtype; None means float32 on CPU and bfloat16 on GPUs."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}") from None


@dataclass
class GenerationOutput:
    token_ids: list[int]
    """The new tokens (stop token not included)."""
    text: str
    """The new tokens decoded without special tokens."""
    scores: torch.Tensor | None = None
    """With return_scores: float32 [len(token_ids), vocab], raw logits of each step."""
    prompt_tokens: int = 0
    """Tokens in the expanded prompt."""
    num_tiles: int = 0
    """Image tiles plus video frames encoded by the ViT."""
    image_grids: list[tuple[int, int]] = field(default_factory=list)
    video_frames: list[int] = field(default_factory=list)
    stop_reason: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    kv_cache_bytes: int = 0
    """Bytes of the KV cache allocated for prompt + max_new_tokens."""


class Pipeline:
    """A loaded model with its Processor: prompts and media in, text out."""

    def __init__(self, model: LongVITAForCausalLM, processor: Processor) -> None:
        self.model = model
        self.processor = processor

    @property
    def config(self) -> LongVITAConfig:
        return self.model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def process(
        self,
        messages: Messages,
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
        *,
        max_frames: int | None = None,
        fps: float | None = None,
    ) -> ProcessedPrompt:
        return self.processor(messages, images, videos, max_frames=max_frames, fps=fps)

    def generate(
        self,
        messages: Messages,
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_frames: int | None = None,
        fps: float | None = None,
        return_scores: bool = False,
        seed: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        vision_batch: int = DEFAULT_VISION_BATCH,
    ) -> GenerationOutput:
        """Answer `messages` (a string is one user turn); see DESIGN.md for the contract.

        prefill_chunk: prompt tokens per prefill forward; vision_batch: tiles per ViT forward.
        Both bound the working memory (not the result). A prompt longer than the model's
        positions, or whose KV cache and prefill do not fit the device's free memory, raises
        PromptError before any media is decoded.
        """
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
        )
        check_chunking(prefill_chunk, vision_batch)
        prompt = self.process(messages, images, videos, max_frames=max_frames, fps=fps)
        params.max_new_tokens = self.fit_to_positions(prompt.num_tokens, params.max_new_tokens)
        self._check_memory(prompt, params.max_new_tokens, prefill_chunk, vision_batch)
        result = generate(
            self.model,
            prompt.input_ids,
            params=params,
            stop_ids=self.processor.tokens.stop,
            tiles=prompt.tiles,
            visual_mask=prompt.visual_mask,
            return_scores=return_scores,
            prefill_chunk=prefill_chunk,
            vision_batch=vision_batch,
        )
        return GenerationOutput(
            token_ids=result.token_ids,
            text=self.processor.decode(result.token_ids),
            scores=result.scores,
            prompt_tokens=prompt.num_tokens,
            num_tiles=prompt.num_tiles,
            image_grids=prompt.image_grids,
            video_frames=prompt.video_frames,
            stop_reason=result.stop_reason,
            prefill_seconds=result.prefill_seconds,
            decode_seconds=result.decode_seconds,
            kv_cache_bytes=result.kv_cache_bytes,
        )

    def _check_memory(
        self, prompt: ProcessedPrompt, max_new_tokens: int, prefill_chunk: int, vision_batch: int
    ) -> None:
        """Refuse a prompt whose KV cache + prefill activations exceed the free memory."""
        device = self.model.lm_head.weight.device
        plan = plan_memory(
            self.config,
            num_prompt_tokens=prompt.num_tokens,
            max_new_tokens=max_new_tokens,
            dtype=self.model.lm_head.weight.dtype,
            prefill_chunk=prefill_chunk,
            vision_batch=vision_batch,
            has_tiles=prompt.num_tiles > 0,
            device_type=device.type,
        )
        check_memory(plan, free_memory_bytes(device), device=str(device))

    def fit_to_positions(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Refuse a prompt past the model's positions; trim max_new_tokens to what is left."""
        limit = self.config.max_position_embeddings
        if prompt_tokens >= limit:
            raise PromptError(
                f"the prompt has {prompt_tokens} tokens but the model accepts at most {limit} "
                "positions (prompt + new tokens); use fewer frames (max_frames) or images"
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
        """Write the official layout: config.json, safetensors, tokenizer files."""
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        save_model(self.model, directory, **kwargs)
        self.tokenizer.save_pretrained(str(directory))


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Pipeline:
    """Load a Long-VITA checkpoint directory (official `Long-VITA-*_HF` layout)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory: give a checkpoint directory")
    device = torch.device(device)
    config = LongVITAConfig.from_pretrained(directory)
    processor = Processor(load_tokenizer(directory), config.vision)
    _check_vocab(len(processor.tokenizer), config)
    model = load_model(directory, device=device, dtype=resolve_dtype(dtype, device), config=config)
    return Pipeline(model, processor)


def _check_vocab(tokenizer_size: int, config: LongVITAConfig) -> None:
    if tokenizer_size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer_size} tokens but the model's embedding only "
            f"{config.vocab_size} rows (config.json vocab_size)"
        )
