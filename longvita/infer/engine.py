"""Generation: prefill the prompt once, then decode one token per step from a KV cache.

Owns the decode loop, the cache's lifetime, stopping and per-step scores. Knows nothing of
tokenization or media: it takes token ids, tiles and the visual mask from the Processor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from longvita.model.kv_cache import KVCache
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.ops.sampling import sample_next_token


@dataclass(kw_only=True)
class SamplingParams:
    """How many tokens to generate and how to choose them."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens (the stop token is not counted)."""
    temperature: float = 0.0
    """0 is greedy decoding; above 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1.0 disables it."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 disables it."""
    seed: int | None = None
    """Seed of the sampling generator, for reproducible samples."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class GenerationResult:
    token_ids: list[int]
    """New tokens, the stop token excluded."""
    scores: torch.Tensor | None
    """[len(token_ids), vocab] float32 raw logits of each step, when asked for."""
    stop_reason: str
    """"stop_token" or "length"."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    kv_cache_bytes: int = 0


@torch.inference_mode()
def generate(
    model: LongVITAForCausalLM,
    input_ids: torch.Tensor,
    *,
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    pixel_values: torch.Tensor | None = None,
    visual_mask: torch.Tensor | None = None,
    return_scores: bool = False,
) -> GenerationResult:
    """Generate after the prompt `input_ids` [seq] (one sequence; tiles as the Processor gives)."""
    device = model.lm_head.weight.device
    config = model.config
    cache = KVCache(
        num_layers=config.num_hidden_layers,
        batch_size=1,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        capacity=input_ids.numel() + params.max_new_tokens,
        dtype=model.lm_head.weight.dtype,
        device=device,
    )
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    start = time.perf_counter()
    logits = model(
        input_ids.to(device)[None],
        pixel_values=None if pixel_values is None else pixel_values.to(device),
        visual_mask=None if visual_mask is None else visual_mask.to(device)[None],
        attention_fn=cache,
    )[:, -1]  # [1, vocab]
    cache.advance(input_ids.numel())
    prefill_seconds = time.perf_counter() - start

    tokens: list[int] = []
    scores: list[torch.Tensor] = []
    stop_reason = "length"
    start = time.perf_counter()
    for step in range(params.max_new_tokens):
        next_token = sample_next_token(
            logits,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            generator=generator,
        )  # [1]
        token = int(next_token)
        if token in stop_ids:
            stop_reason = "stop_token"
            break
        tokens.append(token)
        if return_scores:
            scores.append(logits[0].float().cpu())
        if step + 1 == params.max_new_tokens:
            break
        position = torch.tensor([[cache.length]], device=device)  # [1, 1]
        logits = model(next_token[None], position_ids=position, attention_fn=cache)[:, -1]
        cache.advance(1)
    decode_seconds = time.perf_counter() - start
    all_scores = None
    if return_scores:
        all_scores = torch.stack(scores) if scores else torch.zeros(0, config.vocab_size)
    return GenerationResult(
        token_ids=tokens,
        scores=all_scores,
        stop_reason=stop_reason,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        kv_cache_bytes=cache.num_bytes,
    )
