"""Context-parallel generation: prefill a prompt sharded over the CP group in chunks, then
decode from a KV cache that stays sharded.

Owns where every token's keys/values live under context parallelism and the prefill/decode
loops over them; the official code keeps no KV cache here and re-runs the whole forward, ViT
included, for every new token.

Layout (`PromptLayout`). The prompt of N tokens is prefilled in rounds. A round is a segment of
2*cp*c consecutive tokens cut zigzag (`parallel.sharding`): rank r takes the segment's chunks r
and 2cp-1-r, 2c tokens, c chosen so that 2c <= prefill_chunk (one round when the prompt is
short). The last segment is padded at its end; attention is causal, so no real token ever sees
a pad, and pads are never cached. Within a segment the pads fill the highest chunks, so each
rank's real tokens of a round are a prefix of its 2c tokens, which is what it caches. A rank
may hold no real token at all (`--cp` larger than the prompt) or no tile: it still takes part.

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

Decode: the new token runs on every rank (same weights, a one-token forward). In every layer
each rank attends the new query over its own shard, the partials are all-gathered and merged by
log-sum-exp in rank order, the same on every rank. The new token's key/value is stored on
exactly one rank, the one with the fewest cached tokens, ties to the lowest rank
(`PromptLayout.decode_owners`): the ranks short of tokens (the last round's padding, fewer
than c per rank) fill first, then round robin, so the shards end within one token of 1/cp of
the cache once enough tokens are decoded, and within c tokens before. The schedule is known
before prefill, so each shard is allocated once at its final size.

Sampling: cp rank 0 samples (with the seeded generator, as the single-process engine does) and
broadcasts the token, so every rank feeds back the same token and stops at the same step
whatever floating-point noise the ranks see. Scores are rank 0's logits.

The attention strategies of both phases are `parallel.sharded_cache.ShardedKVCache`.

Errors: every collective runs in the CP group, whose timeout (`ParallelState`) bounds how long
a rank waits for a dead or stalled peer; a failed collective raises a RuntimeError naming the
step, layer and rank (`peer_errors`). `parallel.launch` turns one rank's failure into the job's.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longvita.errors import PromptError
from longvita.infer.engine import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_VISION_BATCH,
    SamplingParams,
    VisualFeatureStream,
    allocate_cache,
    check_chunking,
    feature_stream,
    stack_scores,
)
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.model.qwen2 import AttentionFn
from longvita.ops.sampling import sample_next_token
from longvita.parallel.sharded_cache import ShardedKVCache, peer_errors
from longvita.parallel.sharding import zigzag_index
from longvita.parallel.state import ParallelState
from longvita.processing.tiles import TileSource


@dataclass(frozen=True)
class PromptLayout:
    """Which rank holds which tokens of a prompt, round by round, and of the tokens after it."""

    num_tokens: int
    """Real prompt tokens N."""
    cp: int
    """Context-parallel degree."""
    chunk_len: int
    """c: tokens per zigzag chunk of a round (a rank takes 2c tokens per round)."""

    def __post_init__(self) -> None:
        if min(self.num_tokens, self.cp, self.chunk_len) < 1:
            raise ValueError(
                f"num_tokens {self.num_tokens}, cp {self.cp} and chunk_len {self.chunk_len} "
                "must be >= 1"
            )

    @classmethod
    def build(cls, num_tokens: int, cp: int, prefill_chunk: int) -> PromptLayout:
        """Rounds of at most `prefill_chunk` tokens per rank (at least 2), as few as possible."""
        one_round = -(-num_tokens // (2 * cp))  # c of a single round
        return cls(num_tokens, cp, max(1, min(prefill_chunk // 2, one_round)))

    @property
    def segment_len(self) -> int:
        """Tokens of one round over the whole group: 2 * cp * c."""
        return 2 * self.cp * self.chunk_len

    @property
    def num_rounds(self) -> int:
        return -(-self.num_tokens // self.segment_len)

    def round_index(self, rank: int, round_idx: int) -> torch.Tensor:
        """[2c] global indices (= positions) of `rank`'s tokens in round `round_idx`."""
        start = round_idx * self.segment_len
        return start + zigzag_index(self.segment_len, self.cp, rank)

    def real_tokens(self, rank: int, round_idx: int) -> int:
        """Real tokens of `rank` in round `round_idx`: a prefix of its 2c tokens."""
        left = self.num_tokens - round_idx * self.segment_len  # real tokens from the round start
        chunks = (rank, 2 * self.cp - 1 - rank)
        return sum(max(0, min(self.chunk_len, left - c * self.chunk_len)) for c in chunks)

    def prompt_tokens_on(self, rank: int) -> int:
        """Real prompt tokens `rank` caches over all rounds."""
        return sum(self.real_tokens(rank, j) for j in range(self.num_rounds))

    def last_token(self) -> tuple[int, int]:
        """(rank, index among its 2c tokens of the last round) of the last prompt token."""
        left = self.num_tokens - (self.num_rounds - 1) * self.segment_len
        chunk, offset = divmod(left - 1, self.chunk_len)
        if chunk < self.cp:
            return chunk, offset
        return 2 * self.cp - 1 - chunk, self.chunk_len + offset

    def decode_owners(self, num_new: int) -> list[int]:
        """The rank that stores each of `num_new` decoded tokens: the one with the fewest cached
        tokens at that step, ties to the lowest rank."""
        heap = [(self.prompt_tokens_on(rank), rank) for rank in range(self.cp)]
        heapq.heapify(heap)
        owners = []
        for _ in range(num_new):
            count, rank = heapq.heappop(heap)
            owners.append(rank)
            heapq.heappush(heap, (count + 1, rank))
        return owners

    def kv_capacity(self, rank: int, owners: list[int]) -> int:
        """Tokens `rank` caches in all: its real prompt tokens plus the decoded ones it owns."""
        return self.prompt_tokens_on(rank) + sum(1 for owner in owners if owner == rank)


@dataclass(frozen=True)
class PromptShard:
    """One rank's tokens of one prefill round."""

    input_ids: torch.Tensor
    """[2c] int64 (the pad id past the prompt's end)."""
    position_ids: torch.Tensor
    """[2c] int64 global positions, ascending; also the tokens' indices in the prompt."""
    visual_mask: torch.Tensor
    """[2c] bool placeholder slots."""
    num_real: int
    """Real tokens: the first `num_real` of the 2c."""


def shard_round(
    input_ids: torch.Tensor,
    visual_mask: torch.Tensor | None,
    layout: PromptLayout,
    *,
    rank: int,
    round_idx: int,
    pad_id: int,
) -> PromptShard:
    """Rank `rank`'s tokens of round `round_idx` of the prompt `input_ids` [N]."""
    index = layout.round_index(rank, round_idx)  # [2c]
    num_real = layout.real_tokens(rank, round_idx)
    real = index[:num_real]
    ids = torch.full((len(index),), pad_id, dtype=torch.int64)
    ids[:num_real] = input_ids.cpu()[real]
    mask = torch.zeros(len(index), dtype=torch.bool)
    if visual_mask is not None:
        mask[:num_real] = visual_mask.cpu()[real]
    return PromptShard(input_ids=ids, position_ids=index, visual_mask=mask, num_real=num_real)


@dataclass
class ShardedGenerationResult:
    """What one rank returns; tokens and stop reason are the same on every rank."""

    token_ids: list[int]
    """New tokens, the stop token excluded."""
    scores: torch.Tensor | None
    """[len(token_ids), vocab] float32 raw logits per step, on cp rank 0 when asked for."""
    stop_reason: str
    """"stop_token" or "length"."""
    prefill_seconds: float
    decode_seconds: float
    kv_cache_bytes: int
    """Bytes of this rank's KV cache shard (allocated once)."""
    kv_cache_tokens: int
    """Tokens cached on this rank at the end."""
    num_tiles_encoded: int
    """Tiles this rank's ViT encoded (a tile cut by a chunk seam is encoded on both sides)."""
    num_rounds: int
    """Prefill rounds (each rank ran at most prefill_chunk tokens per round)."""


@torch.inference_mode()
def generate_sharded(
    model: LongVITAForCausalLM,
    input_ids: torch.Tensor,
    *,
    state: ParallelState,
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    pad_id: int,
    tiles: TileSource | torch.Tensor | None = None,
    visual_mask: torch.Tensor | None = None,
    return_scores: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    vision_batch: int = DEFAULT_VISION_BATCH,
) -> ShardedGenerationResult:
    """Generate after the prompt `input_ids` [N] on every rank of `state`'s CP group.

    Every rank of the group calls this with the same prompt and parameters. Each prefills at
    most `prefill_chunk` tokens per round, caches only its shard and fetches and encodes only
    the tiles its tokens need, `vision_batch` at a time. tiles: the prompt's TileSource or a
    [num_tiles, 3, S, S] tensor; visual_mask: [N] bool.
    """
    check_chunking(prefill_chunk, vision_batch)
    layout = PromptLayout.build(input_ids.numel(), state.cp_size, prefill_chunk)
    owners = layout.decode_owners(params.max_new_tokens - 1)  # the last token is not fed back
    storage = allocate_cache(model, layout.kv_capacity(state.cp_rank, owners))
    cache = ShardedKVCache(storage, group=state.cp_group, cp_rank=state.cp_rank)
    if torch.is_tensor(tiles):
        tiles = TileSource.from_tensor(tiles)
    stream = feature_stream(model, tiles, visual_mask, vision_batch=vision_batch)
    start = time.perf_counter()
    logits = _prefill(
        model,
        input_ids,
        visual_mask,
        pad_id=pad_id,
        layout=layout,
        cache=cache,
        state=state,
        stream=stream,
    )  # [1, vocab] on every rank
    if tiles is not None:
        tiles.close()
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens, scores, stop_reason = _decode(
        model,
        logits,
        owners=owners,
        layout=layout,
        cache=cache,
        state=state,
        params=params,
        stop_ids=stop_ids,
        return_scores=return_scores,
    )
    decode_seconds = time.perf_counter() - start
    keep_scores = return_scores and state.cp_rank == 0
    return ShardedGenerationResult(
        token_ids=tokens,
        scores=stack_scores(scores, model.config.vocab_size) if keep_scores else None,
        stop_reason=stop_reason,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        kv_cache_bytes=cache.num_bytes,
        kv_cache_tokens=cache.length,
        num_tiles_encoded=0 if stream is None else stream.num_encoded_tiles,
        num_rounds=layout.num_rounds,
    )


def _forward_local(
    model: LongVITAForCausalLM,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_fn: AttentionFn,
    *,
    visual_mask: torch.Tensor | None = None,
    visual_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's tokens [1, n] through the model -> final hidden states [1, n, hidden]."""
    embeds = model.model.embed_multimodal(
        input_ids, visual_mask=visual_mask, visual_features=visual_features
    )  # [1, n, hidden]
    return model.model(embeds, position_ids, attention_fn=attention_fn)


def _prefill(
    model: LongVITAForCausalLM,
    input_ids: torch.Tensor,
    visual_mask: torch.Tensor | None,
    *,
    pad_id: int,
    layout: PromptLayout,
    cache: ShardedKVCache,
    state: ParallelState,
    stream: VisualFeatureStream | None,
) -> torch.Tensor:
    """Run this rank's share of every round, caching its real tokens; -> logits [1, vocab] of
    the last prompt token, on every rank."""
    device = model.lm_head.weight.device
    for round_idx in range(layout.num_rounds):
        cache.phase = f"prefill round {round_idx}/{layout.num_rounds}"
        shard = shard_round(
            input_ids, visual_mask, layout, rank=state.cp_rank, round_idx=round_idx, pad_id=pad_id
        )
        features = None  # [local visual slots, hidden]: this rank's tiles only
        if stream is not None and shard.num_real > 0:
            features = stream.features(shard.position_ids[: shard.num_real])
        try:
            hidden = _forward_local(
                model,
                shard.input_ids.to(device)[None],  # [1, 2c]
                shard.position_ids.to(device)[None],  # [1, 2c] global positions
                cache.prefill_fn(shard.num_real, after_cached=round_idx > 0),
                visual_mask=None if features is None else shard.visual_mask.to(device)[None],
                visual_features=features,
            )  # [1, 2c, hidden]
        except torch.OutOfMemoryError as err:
            raise PromptError(_oom_message(layout, round_idx, state)) from err
        cache.advance(shard.num_real)
    holder, index = layout.last_token()
    if state.cp_rank == holder:
        logits = model.logits_at(hidden, torch.tensor([index]))[:, 0]  # [1, vocab]
    else:
        logits = hidden.new_empty(1, model.config.vocab_size)
    if state.cp_size > 1:
        src = dist.get_global_rank(state.cp_group, holder)
        with peer_errors("broadcasting the prompt's logits", state.cp_rank, state.cp_size):
            dist.broadcast(logits, src=src, group=state.cp_group)
    return logits


def _oom_message(layout: PromptLayout, round_idx: int, state: ParallelState) -> str:
    per_rank = 2 * layout.chunk_len
    return (
        f"out of memory on cp rank {state.cp_rank}/{state.cp_size} in prefill round "
        f"{round_idx + 1} of {layout.num_rounds} ({per_rank} tokens per rank per round, "
        f"prefill_chunk >= {per_rank}); retry with a smaller prefill_chunk (e.g. "
        f"{max(2, per_rank // 2)}) or vision_batch, fewer frames, or more ranks (--cp); "
        "`longvita plan` estimates the memory needed"
    )


def _decode(
    model: LongVITAForCausalLM,
    logits: torch.Tensor,
    *,
    owners: list[int],
    layout: PromptLayout,
    cache: ShardedKVCache,
    state: ParallelState,
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    return_scores: bool,
) -> tuple[list[int], list[torch.Tensor], str]:
    """Sample, broadcast, feed back: (tokens, rank 0's scores, stop_reason), as the
    single-process engine's decode loop."""
    device = logits.device
    sampler = _Sampler(params, state, device)
    tokens: list[int] = []
    scores: list[torch.Tensor] = []
    for step in range(params.max_new_tokens):
        cache.phase = f"decode step {step}"
        next_token = sampler(logits)  # [1], the same on every rank
        token = int(next_token)
        if token in stop_ids:
            return tokens, scores, "stop_token"
        tokens.append(token)
        if return_scores and state.cp_rank == 0:
            scores.append(logits[0].float().cpu())
        if step + 1 == params.max_new_tokens:
            break
        store = owners[step] == state.cp_rank
        position = torch.tensor([[layout.num_tokens + step]], device=device)  # [1, 1]
        hidden = _forward_local(model, next_token[None], position, cache.decode_fn(store))
        cache.advance(1 if store else 0)
        logits = model.logits_at(hidden)[:, -1]  # [1, vocab], the same on every rank
    return tokens, scores, "length"


class _Sampler:
    """Chooses the next token on cp rank 0 and broadcasts it to the group."""

    def __init__(self, params: SamplingParams, state: ParallelState, device: torch.device):
        self.params, self.state, self.device = params, state, device
        self.generator = None
        if params.seed is not None and state.cp_rank == 0:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, vocab] -> token [1] int64, identical on every rank."""
        params, state = self.params, self.state
        if state.cp_rank == 0:
            token = sample_next_token(
                logits,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                generator=self.generator,
            )  # [1]
        else:
            token = torch.zeros(1, dtype=torch.int64, device=self.device)
        if state.cp_size > 1:
            src = dist.get_global_rank(state.cp_group, 0)
            with peer_errors("broadcasting the sampled token", state.cp_rank, state.cp_size):
                dist.broadcast(token, src=src, group=state.cp_group)
        return token
