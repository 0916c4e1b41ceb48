"""Generation: prefill the prompt chunk by chunk into a KV cache, then decode one token per step.

Owns the single-process implementation of a `infer.decode.SequenceRunner` (`LocalRunner`: one
process with the whole KV cache) and the prefill machinery every runner shares; the decode loop
over a runner (`Continuation`, `GenerationStream`) is `infer.decode`'s.

Knows nothing of tokenization or media formats: it takes token ids, the visual mask and a tile
source (`processing.tiles`) from the Processor. Memory beyond the weights and the KV cache is
bounded by the chunk sizes, not by the prompt:
- the prompt runs `prefill_chunk` tokens at a time, positions global, each chunk attending to
  the cache and to itself (`model.kv_cache`); only the last prompt position gets logits;
- the ViT runs on at most `vision_batch` tiles at once, on the tiles of each chunk as it comes
  up (`VisualFeatureStream`): a tile straddling two chunks is encoded once and its features
  kept for the next chunk, and no more than one chunk's features are held.
`infer.plan` estimates these bounds; an out-of-memory error during prefill names the chunk.

With a prefix cache (`infer.prefix_cache.PromptPrefix`), a runner first copies the longest
cached prefix of its prompt into its KV cache, prefill starts after it (positions global; the
tiles of the copied positions are never decoded), and the prompt's keys and values are kept
once prefilled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from longvita.errors import PromptError
from longvita.infer.decode import RunnerStats, Sampler, run_to_end
from longvita.infer.prefix_cache import PromptPrefix, longest
from longvita.infer.progress import PrefillProgress
from longvita.infer.request import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_VISION_BATCH,
    GenerationOutput,
    SamplingParams,
)
from longvita.model.kv_cache import KVCache
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.ops.sequence import SlotIndex
from longvita.processing.tiles import TileSource


def allocate_cache(
    model: LongVITAForCausalLM, capacity: int, dtype: torch.dtype | None = None
) -> KVCache:
    """The KV cache of one sequence of `capacity` tokens on the model's device, stored in
    `dtype` (None: the model's; torch.int8: quantized, `model.kv_cache`)."""
    config = model.config
    return KVCache(
        num_layers=config.num_hidden_layers,
        batch_size=1,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        capacity=capacity,
        dtype=model.lm_head.weight.dtype if dtype is None else dtype,
        device=model.lm_head.weight.device,
    )


class VisualFeatureStream:
    """Projected features of a prompt's tiles, encoded as the positions that need them come up.

    `features(positions)` returns the rows of the visual slots at `positions`, which must come
    in increasing order from call to call (chunks of a prefill, a rank's shard in order). Tiles
    are fetched and encoded at most `vision_batch` at a time; a tile whose slots continue past
    the positions asked is kept (its features only) for the next call, every other feature is
    dropped, so each tile is encoded exactly once. The slot index is built once: all the calls
    of one prompt cost O(prompt length) in all.
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
        encodes_pixels: bool = True,
    ) -> None:
        self.encode = encode  # [n, 3, S, S] pixels -> [n, tokens_per_tile, hidden]
        self.encodes_pixels = encodes_pixels
        """Whether `encode` is the model's ViT on pixels (False: tiles already encoded)."""
        self.tiles = tiles
        self.slots = SlotIndex(visual_mask.cpu(), tokens_per_tile)
        self.tokens_per_tile = tokens_per_tile
        self.vision_batch = vision_batch
        self.device = device
        self.num_encoded_tiles = 0
        self._kept: dict[int, torch.Tensor] = {}  # tile id -> [tokens_per_tile, hidden]

    def tiles_to_encode(self, positions: torch.Tensor) -> list[int]:
        """The tiles `features(positions)` would encode: those at `positions` not kept from the
        call before (a caller may encode them with other prompts' tiles and pass them in)."""
        tile_ids, _ = self.slots.tiles_at(positions.cpu())
        return [t for t in tile_ids.tolist() if t not in self._kept]

    def features(
        self, positions: torch.Tensor, encoded: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """[num_visual_slots_at_positions, hidden] in the order of `positions`; None if none.
        encoded: the features of `tiles_to_encode(positions)`, {tile id: [tokens_per_tile,
        hidden]}, encoded by the caller; None: encoded here."""
        positions = positions.cpu()
        tile_ids, feature_index = self.slots.tiles_at(positions)  # [T], [num_slots]
        if len(tile_ids) == 0:
            return None
        ids = tile_ids.tolist()
        missing = [t for t in ids if t not in self._kept]
        if encoded is None:
            fresh = self._encode(missing)
        else:
            fresh = {t: encoded[t] for t in missing}
            self.num_encoded_tiles += len(missing)
        rows = torch.stack([self._kept[t] if t in self._kept else fresh[t] for t in ids])
        rows = rows.reshape(-1, rows.shape[-1])  # [T * tokens_per_tile, hidden]
        out = rows.index_select(0, feature_index.to(rows.device))  # [num_slots, hidden]
        slots_done = self.slots.slots_through(int(positions.max()))
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


class EncodedTiles:
    """Tiles already through the ViT and projector, standing in for a prompt's TileSource:
    features [num_tiles, tokens_per_tile, hidden] (e.g. a V-NIAH haystack encoded once and
    reused with the needle at every depth)."""

    def __init__(self, features: torch.Tensor) -> None:
        if features.dim() != 3:
            shape = tuple(features.shape)
            raise ValueError(f"features must be [num_tiles, tokens_per_tile, hidden], got {shape}")
        self.features = features
        self.num_tiles = features.shape[0]

    def get(self, tile_ids: list[int] | torch.Tensor) -> torch.Tensor:
        return self.features[torch.as_tensor(tile_ids, dtype=torch.long)]

    def close(self) -> None:
        pass


def feature_stream(
    model: LongVITAForCausalLM,
    tiles: TileSource | EncodedTiles | None,
    visual_mask: torch.Tensor | None,
    *,
    vision_batch: int,
) -> VisualFeatureStream | None:
    """The ViT feature stream of a prompt, or None when it has no visual placeholder."""
    if visual_mask is None or not bool(visual_mask.any()):
        return None
    if tiles is None:
        raise ValueError("the prompt has visual placeholders but no tiles were given")
    encoded = isinstance(tiles, EncodedTiles)
    return VisualFeatureStream(
        (lambda features: features) if encoded else model.model.encode_tiles,
        tiles,
        visual_mask,
        tokens_per_tile=model.config.vision.tokens_per_tile,
        vision_batch=vision_batch,
        device=model.lm_head.weight.device,
        encodes_pixels=not encoded,
    )


@torch.inference_mode()
def prefill_chunks(
    model: LongVITAForCausalLM,
    input_ids: torch.Tensor,
    cache: KVCache,
    *,
    stream: VisualFeatureStream | None = None,
    visual_mask: torch.Tensor | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[torch.Tensor | None]:
    """Run the prompt `input_ids` [seq] into `cache`, one forward of `prefill_chunk` tokens per
    iteration: None after each chunk but the last, then the logits [1, vocab] of the last
    prompt position (a server interleaves other sequences' decode steps between chunks).

    The prompt's first `cache.length` tokens are taken as cached already (a prefix copied from
    the prefix cache): prefill starts after them, positions global.
    stream: the features of the prompt's tiles (`feature_stream`), with visual_mask [seq] bool.
    Raises PromptError naming the chunk when the device runs out of memory. A prefill longer
    than a few seconds logs its progress (INFO).
    """
    device = model.lm_head.weight.device
    seq = input_ids.numel()
    if seq == 0:
        raise ValueError("the prompt has no token")
    if cache.length >= seq:
        raise ValueError(f"the cache holds {cache.length} of the prompt's {seq} tokens: none left")
    no_logits = torch.zeros(0, dtype=torch.long, device=device)
    progress = PrefillProgress(seq, cache.length)
    for start in range(cache.length, seq, prefill_chunk):
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
            raise PromptError(_oom_message(start, end, seq, prefill_chunk)) from err
        cache.advance(end - start)
        progress.update(end)
        yield logits[:, -1] if end == seq else None


def prefill(model: LongVITAForCausalLM, input_ids: torch.Tensor, cache: KVCache, **options):
    """`prefill_chunks` run to the end: the logits [1, vocab] of the last prompt position."""
    *_, logits = prefill_chunks(model, input_ids, cache, **options)
    return logits


def _oom_message(start: int, end: int, seq: int, prefill_chunk: int) -> str:
    return (
        f"out of memory during prefill of tokens {start}-{end} of {seq} "
        f"(prefill_chunk={prefill_chunk} tokens, {start} tokens already cached); retry with a "
        f"smaller prefill_chunk (e.g. {max(1, prefill_chunk // 2)}) or vision_batch, fewer "
        "frames, or more devices (--cp); `longvita plan` estimates the memory needed"
    )


class LocalRunner:
    """One process holding the whole KV cache, allocated once for prompt + max_new_tokens.

    With a `prefix` (`infer.prefix_cache.PromptPrefix`), `start` copies the longest cached
    prefix of the prompt into the cache, prefill runs only the rest, and the prompt's keys and
    values are kept for later prompts once prefilled (and written to disk at `close`).
    """

    def __init__(
        self,
        model: LongVITAForCausalLM,
        input_ids: torch.Tensor,
        *,
        params: SamplingParams,
        tiles: TileSource | EncodedTiles | torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        vision_batch: int = DEFAULT_VISION_BATCH,
        prefix: PromptPrefix | None = None,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.input_ids = input_ids
        self.visual_mask = visual_mask
        self.prefill_chunk = prefill_chunk
        self.tiles = TileSource.from_tensor(tiles) if torch.is_tensor(tiles) else tiles
        self.device = model.lm_head.weight.device
        capacity = input_ids.numel() + params.max_new_tokens
        self.cache = allocate_cache(model, capacity, kv_cache_dtype)
        self.stream = feature_stream(model, self.tiles, visual_mask, vision_batch=vision_batch)
        self.sampler = Sampler(params, self.device)
        self.prefix = prefix
        self.cached_tokens = 0
        """Prompt tokens copied from the prefix cache (set by `start`)."""
        self._started = False
        self._prefilled = False

    def start(self) -> int:
        """Copy the longest cached prefix of the prompt into the cache (once); the number of
        prompt tokens copied, where prefill starts."""
        if not self._started:
            self._started = True
            choice = None if self.prefix is None else longest(self.prefix.matches())
            if choice is not None:
                self.prefix.load(*choice, self.cache)
                self.cached_tokens = self.cache.length
        return self.cached_tokens

    def prefill(self) -> torch.Tensor:
        self.start()
        logits = prefill(
            self.model,
            self.input_ids,
            self.cache,
            stream=self.stream,
            visual_mask=self.visual_mask,
            prefill_chunk=self.prefill_chunk,
        )
        self.prefilled()
        return logits

    def prefilled(self) -> None:
        """The whole prompt is in the cache: free the media decoders (every tile is encoded)
        and keep the prompt's keys and values for later prompts."""
        self._release_media()
        if self.prefix is not None and not self._prefilled:
            self.prefix.keep(self.cache, torch.arange(self.input_ids.numel()))
        self._prefilled = True

    def move_cache(self, cache: KVCache) -> None:
        """Go on in `cache`, which holds what the current one does (a decode pool's slot)."""
        if cache.length != self.cache.length:
            raise ValueError(f"the new cache holds {cache.length} tokens, not {self.cache.length}")
        self.cache = cache

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        return self.sampler(logits)

    @torch.inference_mode()
    def feed(self, token: torch.Tensor, step: int) -> torch.Tensor:
        position = torch.tensor([[self.cache.length]], device=self.device)  # [1, 1]
        token = token.to(self.device)[None]  # [1, 1]: the loop hands tokens over on the CPU
        logits = self.model(token, position_ids=position, attention_fn=self.cache)
        self.cache.advance(1)
        return logits[:, -1]  # [1, vocab]

    def stats(self) -> RunnerStats:
        return RunnerStats(
            kv_cache_bytes=[self.cache.num_bytes],
            kv_cache_tokens=[self.cache.length],
            tiles_encoded=[0 if self.stream is None else self.stream.num_encoded_tiles],
            prefill_rounds=-(-(self.input_ids.numel() - self.cached_tokens) // self.prefill_chunk),
            cached_tokens=self.cached_tokens,
        )

    def close(self) -> None:
        """Release the media decoders; write the prompt's keys and values to the prefix
        cache's directory if it has one and the prompt was prefilled."""
        self._release_media()
        if self.prefix is not None and self._prefilled:
            self.prefix.persist()

    def _release_media(self) -> None:
        if self.tiles is not None:
            self.tiles.close()


def generate(
    model: LongVITAForCausalLM,
    input_ids: torch.Tensor,
    *,
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    tiles: TileSource | EncodedTiles | torch.Tensor | None = None,
    visual_mask: torch.Tensor | None = None,
    return_scores: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    vision_batch: int = DEFAULT_VISION_BATCH,
    kv_cache_dtype: torch.dtype | None = None,
) -> GenerationOutput:
    """Generate after the prompt `input_ids` [seq] in this process (token ids, no text).

    tiles: the prompt's TileSource, or a [num_tiles, 3, S, S] tensor; visual_mask: [seq] bool;
    kv_cache_dtype: the KV cache's storage dtype (None: the model's; torch.int8: quantized).
    """
    runner = LocalRunner(
        model,
        input_ids,
        params=params,
        tiles=tiles,
        visual_mask=visual_mask,
        prefill_chunk=prefill_chunk,
        vision_batch=vision_batch,
        kv_cache_dtype=kv_cache_dtype,
    )
    return run_to_end(
        runner, params, stop_ids, return_scores=return_scores, vocab_size=model.config.vocab_size
    )
