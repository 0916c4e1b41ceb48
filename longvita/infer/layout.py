"""Where the tokens of a context-parallel generation live: prefill rounds and decode owners.

Owns the layout arithmetic of `infer.cp_engine` (and of `infer.plan`, which sizes the KV cache
shards from it). Pure: no torch.distributed, no model.

The prompt of N tokens is prefilled in rounds. A round is a segment of 2*cp*c consecutive
tokens cut zigzag (`ops.sequence`): rank r takes the segment's chunks r and 2cp-1-r, 2c tokens,
c chosen so that 2c <= prefill_chunk (one round when the prompt is short). The last segment is
padded at its end; attention is causal, so no real token ever sees a pad, and pads are never
cached. Within a segment the pads fill the highest chunks, so each rank's real tokens of a round
are a prefix of its 2c tokens, which is what it caches. A rank may hold no real token at all
(`--cp` larger than the prompt) or no tile: it still takes part.

A prompt whose first tokens come from the prefix cache (`infer.prefix_cache`) is laid out from
its first uncached token (`start`): the rounds cover the rest, positions global, and each
rank's share of the cached tokens (`cached`) counts as already held.

Decode: each new token's key/value is stored on exactly one rank, the one with the fewest
cached tokens, ties to the lowest rank (`PromptLayout.decode_owners`): the ranks short of
tokens (the last round's padding, fewer than c per rank) fill first, then round robin, so the
shards end within one token of 1/cp of the cache once enough tokens are decoded, and within c
tokens before. The schedule is known before prefill, so each shard is allocated once at its
final size.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from longvita.ops.sequence import zigzag_index


@dataclass(frozen=True)
class PromptLayout:
    """Which rank holds which tokens of a prompt, round by round, and of the tokens after it."""

    num_tokens: int
    """Real prompt tokens to prefill N (those after `start`)."""
    cp: int
    """Context-parallel degree."""
    chunk_len: int
    """c: tokens per zigzag chunk of a round (a rank takes 2c tokens per round)."""
    start: int = 0
    """Position of the first token to prefill: the prompt tokens before it are cached."""
    cached: tuple[int, ...] = ()
    """Tokens before `start` each rank holds already (empty: none)."""

    def __post_init__(self) -> None:
        if min(self.num_tokens, self.cp, self.chunk_len) < 1:
            raise ValueError(
                f"num_tokens {self.num_tokens}, cp {self.cp} and chunk_len {self.chunk_len} "
                "must be >= 1"
            )
        if self.cached and (len(self.cached) != self.cp or sum(self.cached) != self.start):
            raise ValueError(
                f"cached {self.cached} must give each of the {self.cp} ranks' share of the "
                f"{self.start} tokens before start"
            )

    @classmethod
    def build(
        cls, num_tokens: int, cp: int, prefill_chunk: int, *, cached: tuple[int, ...] = ()
    ) -> PromptLayout:
        """Rounds of at most `prefill_chunk` tokens per rank (at least 2), as few as possible,
        over a prompt of `num_tokens` whose first sum(cached) are held already (`cached[r]`
        on rank r)."""
        start = sum(cached)
        one_round = -(-(num_tokens - start) // (2 * cp))  # c of a single round
        chunk_len = max(1, min(prefill_chunk // 2, one_round))
        return cls(num_tokens - start, cp, chunk_len, start=start, cached=tuple(cached))

    @property
    def end(self) -> int:
        """The prompt's length: the position of the first decoded token."""
        return self.start + self.num_tokens

    @property
    def segment_len(self) -> int:
        """Tokens of one round over the whole group: 2 * cp * c."""
        return 2 * self.cp * self.chunk_len

    @property
    def num_rounds(self) -> int:
        return -(-self.num_tokens // self.segment_len)

    def round_index(self, rank: int, round_idx: int) -> torch.Tensor:
        """[2c] global indices (= positions) of `rank`'s tokens in round `round_idx`."""
        start = self.start + round_idx * self.segment_len
        return start + zigzag_index(self.segment_len, self.cp, rank)

    def real_tokens(self, rank: int, round_idx: int) -> int:
        """Real tokens of `rank` in round `round_idx`: a prefix of its 2c tokens."""
        left = self.num_tokens - round_idx * self.segment_len  # real tokens from the round start
        chunks = (rank, 2 * self.cp - 1 - rank)
        return sum(max(0, min(self.chunk_len, left - c * self.chunk_len)) for c in chunks)

    def prompt_tokens_on(self, rank: int) -> int:
        """Prompt tokens `rank` caches: its share of the cached ones, then its real tokens of
        every round."""
        held = self.cached[rank] if self.cached else 0
        return held + sum(self.real_tokens(rank, j) for j in range(self.num_rounds))

    def prefilled_positions(self, rank: int) -> torch.Tensor:
        """[n] the positions of the real tokens `rank` prefills, in the order it caches them
        (round after round: ascending)."""
        rounds = range(self.num_rounds)
        return torch.cat([self.round_index(rank, j)[: self.real_tokens(rank, j)] for j in rounds])

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
