"""Context-parallel generation: one rank's `SequenceRunner` over a prompt and KV cache split
over the CP group; the decode loop is the single-process one (`infer.decode.TokenStream`).

The official code keeps no KV cache under context parallelism and re-runs the whole forward,
ViT included, for every new token. Here the layout (`infer.layout.PromptLayout`) says where
every token's keys/values live:

Prefill, one round: each rank embeds its 2c tokens, runs the ViT only on the tiles they need
(`infer.engine.VisualFeatureStream`, `vision_batch` tiles at a time), and in every layer
  - attends to the round's own tokens with ring attention (K/V pass rank to rank),
  - attends to the tokens of the earlier rounds, cached on every rank: the round's queries are
    all-gathered, each rank attends all of them over its own cache, and an all-to-all returns
    each rank the partial results for its queries, merged by log-sum-exp,
  - stores its real keys/values in its cache shard. Positions are global.
Memory per rank beyond weights and cache is bounded by the round (2c tokens, cp*2c gathered
queries), not by the prompt. The last round's last real token gives the logits, computed by
the rank that holds it and broadcast.

Prefix cache (`infer.prefix_cache`): before the first round the ranks agree on the longest
cached prompt that all of them hold a shard of (`parallel.collectives.common_options`); each
copies its share of the shared first L tokens (its shard is in position order, so that share
is a prefix of it), the rounds cover the rest from position L (`PromptLayout.build(...,
cached=...)`) and the first round attends to the copied tokens like a later round. After
prefill each rank keeps its shard, and writes it to its own file at the end.

Decode: the new token runs on every rank (same weights, a one-token forward). In every layer
each rank attends the new query over its own shard, the partials are all-gathered and merged by
log-sum-exp in rank order, the same on every rank; the new key/value is stored on the rank the
layout names (`PromptLayout.decode_owners`). Cp rank 0 samples (with the seeded generator, as
one process does) and broadcasts the token, so every rank feeds back the same token and stops
at the same step whatever floating-point noise the ranks see. Scores are rank 0's logits.

The attention strategies of both phases are `parallel.sharded_cache.ShardedKVCache`; every
collective goes through `parallel` (this module never imports torch.distributed), within the
CP group's timeout, and a failed one names the step, layer and rank.
"""

from __future__ import annotations

import torch

from longvita.errors import PromptError
from longvita.infer.decode import RunnerStats, Sampler, run_to_end
from longvita.infer.engine import EncodedTiles, allocate_cache, feature_stream
from longvita.infer.layout import PromptLayout, PromptShard, shard_round
from longvita.infer.prefix_cache import PromptPrefix, longest
from longvita.infer.progress import PrefillProgress
from longvita.infer.request import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_VISION_BATCH,
    GenerationOutput,
    SamplingParams,
)
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.model.qwen2 import AttentionFn
from longvita.parallel.collectives import broadcast, common_options, gather_ints, raise_together
from longvita.parallel.sharded_cache import ShardedKVCache
from longvita.parallel.state import ParallelState
from longvita.processing.tiles import TileSource


class ShardedRunner:
    """This rank's share of one sequence under context parallelism (every rank makes one)."""

    def __init__(
        self,
        model: LongVITAForCausalLM,
        input_ids: torch.Tensor,
        *,
        state: ParallelState,
        params: SamplingParams,
        pad_id: int,
        tiles: TileSource | EncodedTiles | torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        vision_batch: int = DEFAULT_VISION_BATCH,
        prefix: PromptPrefix | None = None,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.kv_cache_dtype = kv_cache_dtype
        self.input_ids = input_ids
        self.visual_mask = visual_mask
        self.state = state
        self.pad_id = pad_id
        self.params = params
        self.prefill_chunk = prefill_chunk
        self.prefix = prefix
        self.device = model.lm_head.weight.device
        self.tiles = TileSource.from_tensor(tiles) if torch.is_tensor(tiles) else tiles
        self.stream = feature_stream(model, self.tiles, visual_mask, vision_batch=vision_batch)
        self.sampler = Sampler(params, self.device) if state.cp_rank == 0 else None
        self.layout: PromptLayout | None = None
        """Set by `start`, with the decode owners and this rank's cache shard."""
        self._loaded = torch.zeros(0, dtype=torch.long)  # positions copied from the prefix cache
        self._prefilled = False

    def start(self) -> int:
        """Agree with the other ranks on the longest prefix all of them hold in the prefix
        cache, copy this rank's share of it, and lay out and allocate the rest (once; a
        collective). Returns the prompt tokens taken from the prefix cache."""
        if self.layout is not None:
            return self.layout.start
        state, num_tokens = self.state, self.input_ids.numel()
        choice, cached = None, ()
        if self.prefix is not None:
            offered = self.prefix.matches(cp=state.cp_size, cp_rank=state.cp_rank)
            choice = longest(common_options(offered, state, what="agreeing on a cached prefix"))
        if choice is not None:
            here = self.prefix.held_before(*choice)
            cached = tuple(gather_ints([here], state)[0])  # every rank's share
        self.layout = PromptLayout.build(
            num_tokens, state.cp_size, self.prefill_chunk, cached=cached
        )
        self.owners = self.layout.decode_owners(self.params.max_new_tokens - 1)  # last: not fed
        capacity = self.layout.kv_capacity(state.cp_rank, self.owners)
        storage = allocate_cache(self.model, capacity, self.kv_cache_dtype)
        self.cache = ShardedKVCache(storage, group=state.cp_group, cp_rank=state.cp_rank)
        if choice is not None:
            self._loaded = self.prefix.load(*choice, storage)
        return self.layout.start

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Run this rank's share of every round, caching its real tokens; -> the logits
        [1, vocab] of the last prompt token, on every rank."""
        self.start()
        layout = self.layout
        rounds = layout.num_rounds
        progress = PrefillProgress(layout.end, layout.start, enabled=self.state.cp_rank == 0)
        for round_idx in range(rounds):
            self.cache.phase = f"prefill round {round_idx}/{rounds}"
            shard = shard_round(
                self.input_ids,
                self.visual_mask,
                self.layout,
                rank=self.state.cp_rank,
                round_idx=round_idx,
                pad_id=self.pad_id,
            )
            features = self._features(shard, round_idx)  # [local visual slots, hidden] | None
            try:
                hidden = self._forward(
                    shard.input_ids.to(self.device)[None],  # [1, 2c]
                    shard.position_ids.to(self.device)[None],  # [1, 2c] global positions
                    self.cache.prefill_fn(
                        shard.num_real, after_cached=round_idx > 0 or self.layout.start > 0
                    ),
                    visual_mask=None if features is None else shard.visual_mask[None],
                    visual_features=features,
                )  # [1, 2c, hidden]
            except torch.OutOfMemoryError as err:
                raise PromptError(self._oom_message(round_idx)) from err
            self.cache.advance(shard.num_real)
            done = min(layout.num_tokens, (round_idx + 1) * layout.segment_len)
            progress.update(layout.start + done)
        self._prefilled_all()
        holder, index = self.layout.last_token()
        if self.state.cp_rank == holder:
            logits = self.model.logits_at(hidden, torch.tensor([index]))[:, 0]  # [1, vocab]
        else:
            logits = hidden.new_empty(1, self.model.config.vocab_size)
        broadcast(logits, self.state, src_cp_rank=holder, what="broadcasting the prompt's logits")
        return logits

    def _features(self, shard: PromptShard, round_idx: int) -> torch.Tensor | None:
        """The features of this rank's tiles in a round. Only this rank reads its share of the
        media, so a frame that cannot be decoded (or a ViT out of memory) fails here alone:
        the ranks agree first, and every one raises it instead of the others waiting for this
        one in the round's attention until the group times out."""
        if self.stream is None:
            return None
        features, error = None, None
        try:
            if shard.num_real > 0:
                features = self.stream.features(shard.position_ids[: shard.num_real])
        except ValueError as err:  # MediaError and the other user errors
            error = err
        except torch.OutOfMemoryError:
            error = PromptError(self._oom_message(round_idx))
        raise_together(error, self.state, what=f"prefill round {round_idx}: reading media")
        return features

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Cp rank 0 samples; every rank gets its token [1]."""
        if self.sampler is not None:
            token = self.sampler(logits)  # [1]
        else:
            token = torch.zeros(1, dtype=torch.int64, device=self.device)
        broadcast(token, self.state, src_cp_rank=0, what="broadcasting the sampled token")
        return token

    @torch.inference_mode()
    def feed(self, token: torch.Tensor, step: int) -> torch.Tensor:
        self.cache.phase = f"decode step {step}"
        store = self.owners[step] == self.state.cp_rank
        position = torch.tensor([[self.layout.end + step]], device=self.device)  # [1, 1]
        token = token.to(self.device)[None]  # [1, 1]
        hidden = self._forward(token, position, self.cache.decode_fn(store))
        self.cache.advance(1 if store else 0)
        return self.model.logits_at(hidden)[:, -1]  # [1, vocab], the same on every rank

    def stats(self) -> RunnerStats:
        tiles = 0 if self.stream is None else self.stream.num_encoded_tiles
        kv_bytes, kv_tokens, encoded = gather_ints(
            [self.cache.num_bytes, self.cache.length, tiles], self.state
        )
        return RunnerStats(
            kv_cache_bytes=kv_bytes,
            kv_cache_tokens=kv_tokens,
            tiles_encoded=encoded,
            prefill_rounds=self.layout.num_rounds,
            cached_tokens=self.layout.start,
        )

    def close(self) -> None:
        """Release the media decoders; write this rank's share of the prompt's keys and values
        to the prefix cache's directory if it has one and the prompt was prefilled."""
        self._release_media()
        if self.prefix is not None and self._prefilled:
            self.prefix.persist()

    def _prefilled_all(self) -> None:
        """Every tile is encoded: free the decoders; keep this rank's share of the prompt."""
        self._release_media()
        self._prefilled = True
        if self.prefix is not None:
            rank = self.state.cp_rank
            positions = torch.cat([self._loaded, self.layout.prefilled_positions(rank)])
            self.prefix.keep(self.cache.storage, positions, cp=self.state.cp_size, cp_rank=rank)

    def _release_media(self) -> None:
        if self.tiles is not None:
            self.tiles.close()

    def _forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_fn: AttentionFn,
        *,
        visual_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This rank's tokens [1, n] through the model -> final hidden states [1, n, hidden]."""
        model = self.model.model
        embeds = model.embed_multimodal(
            input_ids,
            visual_mask=None if visual_mask is None else visual_mask.to(self.device),
            visual_features=visual_features,
        )  # [1, n, hidden]
        return model(embeds, position_ids, attention_fn=attention_fn)

    def _oom_message(self, round_idx: int) -> str:
        per_rank, state = 2 * self.layout.chunk_len, self.state
        return (
            f"out of memory on cp rank {state.cp_rank}/{state.cp_size} in prefill round "
            f"{round_idx + 1} of {self.layout.num_rounds} ({per_rank} tokens per rank per "
            f"round, prefill_chunk >= {per_rank}); retry with a smaller prefill_chunk (e.g. "
            f"{max(2, per_rank // 2)}) or vision_batch, fewer frames, or more ranks (--cp); "
            "`longvita plan` estimates the memory needed"
        )


def generate_sharded(
    model: LongVITAForCausalLM,
    input_ids: torch.Tensor,
    *,
    state: ParallelState,
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    pad_id: int,
    tiles: TileSource | EncodedTiles | torch.Tensor | None = None,
    visual_mask: torch.Tensor | None = None,
    return_scores: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    vision_batch: int = DEFAULT_VISION_BATCH,
    kv_cache_dtype: torch.dtype | None = None,
) -> GenerationOutput:
    """Generate after the prompt `input_ids` [N] on every rank of `state`'s CP group (token ids,
    no text); every rank calls it with the same prompt and parameters and gets the same tokens.

    Each rank prefills at most `prefill_chunk` tokens per round, caches only its shard and
    fetches and encodes only the tiles its tokens need, `vision_batch` at a time. tiles: the
    prompt's TileSource or a [num_tiles, 3, S, S] tensor; visual_mask: [N] bool. Scores, when
    asked for, are on cp rank 0 only (None elsewhere). kv_cache_dtype: each rank's KV cache
    storage dtype (None: the model's; torch.int8: quantized).
    """
    runner = ShardedRunner(
        model,
        input_ids,
        state=state,
        params=params,
        pad_id=pad_id,
        tiles=tiles,
        visual_mask=visual_mask,
        prefill_chunk=prefill_chunk,
        vision_batch=vision_batch,
        kv_cache_dtype=kv_cache_dtype,
    )
    keep_scores = return_scores and state.cp_rank == 0
    return run_to_end(
        runner, params, stop_ids, return_scores=keep_scores, vocab_size=model.config.vocab_size
    )
