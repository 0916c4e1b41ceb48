"""Generation: prefill the prompt chunk by chunk into a KV cache, then decode one token per step.

Owns the prefill and decode loops, the cache's lifetime, streaming the vision tower over the
prompt's tiles, stopping and per-step scores. Knows nothing of tokenization or media formats:
it takes token ids, the visual mask and a tile source (`processing.tiles`) from the Processor.

Memory beyond the weights and the KV cache is bounded by the chunk sizes, not by the prompt:
- the prompt runs `prefill_chunk` tokens at a time, positions global, each chunk attending to
  the cache and to itself (`model.kv_cache`); only the last prompt position gets logits;
- the ViT runs on at most `vision_batch` tiles at once, on the tiles of each chunk as it comes
  up (`VisualFeatureStream`): a tile straddling two chunks is encoded once and its features
  kept for the next chunk, and no more than one chunk's features are held.
`infer.plan` estimates these bounds; an out-of-memory error during prefill names the chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longvita.errors import PromptError
from longvita.model.kv_cache import KVCache
from longvita.model.long_vita import LongVITAForCausalLM, tiles_for_positions
from longvita.ops.sampling import sample_next_token
from longvita.processing.tiles import TileSource

DEFAULT_PREFILL_CHUNK = 4096
"""Prompt tokens per prefill forward."""
DEFAULT_VISION_BATCH = 16
"""Tiles per ViT forward (about the frames of one 4096-token chunk at 258 tokens per frame)."""


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
    num_encoded_tiles: int = 0
    """Tiles run through the ViT (each tile once)."""


def check_chunking(prefill_chunk: int, vision_batch: int) -> None:
    """ValueError naming the setting unless both are >= 1."""
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if vision_batch < 1:
        raise ValueError(f"vision_batch must be >= 1, got {vision_batch}")


def allocate_cache(model: LongVITAForCausalLM, capacity: int) -> KVCache:
    """The KV cache of one sequence of `capacity` tokens, in the model's dtype and device."""
    config = model.config
    return KVCache(
        num_layers=config.num_hidden_layers,
        batch_size=1,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        capacity=capacity,
        dtype=model.lm_head.weight.dtype,
        device=model.lm_head.weight.device,
    )


class VisualFeatureStream:
    """Projected features of a prompt's tiles, encoded as the positions that need them come up.

    `features(positions)` returns the rows of the visual slots at `positions`, which must come
    in increasing order from call to call (chunks of a prefill, a rank's shard in order). Tiles
    are fetched and encoded at most `vision_batch` at a time; a tile whose slots continue past
    the positions asked is kept (its features only) for the next call, every other feature is
    dropped, so each tile is encoded exactly once.
    """

    def __init__(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        tiles: TileSource,
        visual_mask: torch.Tensor,
        *,
        tokens_per_tile: int,
        vision_batch: int,
        device: torch.device,
    ) -> None:
        self.encode = encode  # [n, 3, S, S] pixels -> [n, tokens_per_tile, hidden]
        self.tiles = tiles
        self.visual_mask = visual_mask.cpu()  # [seq] bool
        self.tokens_per_tile = tokens_per_tile
        self.vision_batch = vision_batch
        self.device = device
        self.num_encoded_tiles = 0
        self._kept: dict[int, torch.Tensor] = {}  # tile id -> [tokens_per_tile, hidden]

    def features(self, positions: torch.Tensor) -> torch.Tensor | None:
        """[num_visual_slots_at_positions, hidden] in the order of `positions`; None if none."""
        positions = positions.cpu()
        tile_ids, feature_index = tiles_for_positions(
            self.visual_mask, self.tokens_per_tile, positions
        )  # [T], [num_slots]
        if len(tile_ids) == 0:
            return None
        ids = tile_ids.tolist()
        fresh = self._encode([t for t in ids if t not in self._kept])
        rows = torch.stack([self._kept[t] if t in self._kept else fresh[t] for t in ids])
        rows = rows.reshape(-1, rows.shape[-1])  # [T * tokens_per_tile, hidden]
        out = rows.index_select(0, feature_index.to(rows.device))  # [num_slots, hidden]
        slots_done = int(self.visual_mask[: int(positions.max()) + 1].sum())
        still_needed = {t for t in ids if (t + 1) * self.tokens_per_tile > slots_done}
        self._kept = {
            t: self._kept[t] if t in self._kept else fresh[t].clone()  # not a view of the batch
            for t in still_needed
        }
        return out

    def _encode(self, tile_ids: list[int]) -> dict[int, torch.Tensor]:
        """Encode tiles `vision_batch` at a time -> {tile id: [tokens_per_tile, hidden]}."""
        features: dict[int, torch.Tensor] = {}
        for start in range(0, len(tile_ids), self.vision_batch):
            batch = tile_ids[start : start + self.vision_batch]
            pixels = self.tiles.get(batch).to(self.device)  # [b, 3, S, S]
            features.update(zip(batch, self.encode(pixels), strict=True))  # [tpt, hidden] each
            self.num_encoded_tiles += len(batch)
        return features


@torch.inference_mode()
def prefill(
    model: LongVITAForCausalLM,
    input_ids: torch.Tensor,
    cache: KVCache,
    *,
    tiles: TileSource | None = None,
    visual_mask: torch.Tensor | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    vision_batch: int = DEFAULT_VISION_BATCH,
) -> tuple[torch.Tensor, VisualFeatureStream | None]:
    """Run the prompt `input_ids` [seq] into `cache`, `prefill_chunk` tokens per forward.

    Returns the logits [1, vocab] of the last prompt position and the feature stream (for its
    counters). Raises PromptError naming the chunk when the device runs out of memory.
    """
    check_chunking(prefill_chunk, vision_batch)
    device = model.lm_head.weight.device
    seq = input_ids.numel()
    if seq == 0:
        raise ValueError("the prompt has no token")
    stream = feature_stream(model, tiles, visual_mask, vision_batch=vision_batch)
    no_logits = torch.zeros(0, dtype=torch.long, device=device)
    logits = None
    for start in range(0, seq, prefill_chunk):
        end = min(start + prefill_chunk, seq)
        positions = torch.arange(start, end)  # [chunk] global positions
        try:
            features = None if stream is None else stream.features(positions)
            logits = model(
                input_ids[start:end].to(device)[None],
                position_ids=positions.to(device)[None],
                visual_mask=None if features is None else visual_mask[start:end].to(device)[None],
                visual_features=features,
                attention_fn=cache,
                logit_positions=None if end == seq else no_logits,
            )  # [1, 1, vocab] for the last chunk, [1, 0, vocab] before
        except torch.OutOfMemoryError as err:
            raise PromptError(_oom_message(start, end, seq, prefill_chunk, vision_batch)) from err
        cache.advance(end - start)
    return logits[:, -1], stream


def _oom_message(start: int, end: int, seq: int, prefill_chunk: int, vision_batch: int) -> str:
    return (
        f"out of memory during prefill of tokens {start}-{end} of {seq} "
        f"(prefill_chunk={prefill_chunk} tokens, vision_batch={vision_batch} tiles, "
        f"{start} tokens already cached); retry with a smaller prefill_chunk "
        f"(e.g. {max(1, prefill_chunk // 2)}) or vision_batch, fewer frames, or more devices "
        "(--cp); `longvita plan` estimates the memory needed"
    )


@torch.inference_mode()
def decode(
    model: LongVITAForCausalLM,
    logits: torch.Tensor,
    cache: KVCache,
    *,
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    return_scores: bool = False,
) -> tuple[list[int], list[torch.Tensor], str]:
    """Sample from `logits` [1, vocab], feed each token back: (tokens, scores, stop_reason)."""
    device = logits.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    tokens: list[int] = []
    scores: list[torch.Tensor] = []
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
            return tokens, scores, "stop_token"
        tokens.append(token)
        if return_scores:
            scores.append(logits[0].float().cpu())
        if step + 1 == params.max_new_tokens:
            break
        position = torch.tensor([[cache.length]], device=device)  # [1, 1]
        logits = model(next_token[None], position_ids=position, attention_fn=cache)[:, -1]
        cache.advance(1)
    return tokens, scores, "length"


@torch.inference_mode()
def generate(
    model: LongVITAForCausalLM,
    input_ids: torch.Tensor,
    *,
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    tiles: TileSource | torch.Tensor | None = None,
    visual_mask: torch.Tensor | None = None,
    return_scores: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    vision_batch: int = DEFAULT_VISION_BATCH,
) -> GenerationResult:
    """Generate after the prompt `input_ids` [seq] (one sequence, as the Processor gives it).

    tiles: the prompt's TileSource, or a [num_tiles, 3, S, S] tensor; visual_mask: [seq] bool.
    The cache is allocated once for seq + max_new_tokens tokens.
    """
    check_chunking(prefill_chunk, vision_batch)
    if torch.is_tensor(tiles):
        tiles = TileSource.from_tensor(tiles)
    cache = allocate_cache(model, input_ids.numel() + params.max_new_tokens)
    start = time.perf_counter()
    logits, stream = prefill(
        model,
        input_ids,
        cache,
        tiles=tiles,
        visual_mask=visual_mask,
        prefill_chunk=prefill_chunk,
        vision_batch=vision_batch,
    )
    if tiles is not None:
        tiles.close()
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens, scores, stop_reason = decode(
        model, logits, cache, params=params, stop_ids=stop_ids, return_scores=return_scores
    )
    decode_seconds = time.perf_counter() - start
    return GenerationResult(
        token_ids=tokens,
        scores=stack_scores(scores, model.config.vocab_size) if return_scores else None,
        stop_reason=stop_reason,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        kv_cache_bytes=cache.num_bytes,
        num_encoded_tiles=0 if stream is None else stream.num_encoded_tiles,
    )


def stack_scores(scores: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Per-step logits [vocab] -> float32 [steps, vocab] (an empty [0, vocab] for no step)."""
    return torch.stack(scores) if scores else torch.zeros(0, vocab_size)


def feature_stream(
    model: LongVITAForCausalLM,
    tiles: TileSource | None,
    visual_mask: torch.Tensor | None,
    *,
    vision_batch: int,
) -> VisualFeatureStream | None:
    """The ViT feature stream of a prompt, or None when it has no visual placeholder."""
    if visual_mask is None or not bool(visual_mask.any()):
        return None
    if tiles is None:
        raise ValueError("the prompt has visual placeholders but no tiles were given")
    return VisualFeatureStream(
        model.model.encode_tiles,
        tiles,
        visual_mask,
        tokens_per_tile=model.config.vision.tokens_per_tile,
        vision_batch=vision_batch,
        device=model.lm_head.weight.device,
    )
