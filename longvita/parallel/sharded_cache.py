"""The KV cache under context parallelism: this rank's shard, and attention over all shards.

Owns the attention strategies of a context-parallel generation (`infer.cp_engine` owns the
layout and the loops): a prefill round attends to its own tokens with ring attention and
to the tokens cached on every rank (queries all-gathered, partial results returned all-to-all
and merged by log-sum-exp), then caches its real keys/values; a decode step attends its query
(the same on every rank) over each shard and merges the all-gathered partials in rank order,
so every rank gets the same numbers, and caches the new key/value only on the rank told to.
Storage is a plain `model.kv_cache.KVCache` sized to this rank's share (float or int8): it
reads its cached tokens block by block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longvita.model.kv_cache import KVCache
from longvita.model.qwen2 import AttentionFn
from longvita.ops.attention import merge_partials
from longvita.parallel.collectives import peer_errors
from longvita.parallel.ring_attention import ring_attention_with_lse


class ShardedKVCache:
    """This rank's shard of the KV cache, and the attention strategies over the sharded whole.

    `prefill_fn` and `decode_fn` give the `AttentionFn` of one forward; like `KVCache`, the
    caller `advance`s after every layer has written.
    """

    def __init__(
        self,
        storage: KVCache,
        *,
        group: dist.ProcessGroup | None,
        cp_rank: int,
    ) -> None:
        self.storage = storage
        self.group = group
        self.cp = 1 if group is None else dist.get_world_size(group)
        self.cp_rank = cp_rank
        self.phase = "prefill"
        """What runs now ("prefill round j", "decode step i"), for error messages."""

    @property
    def length(self) -> int:
        """Tokens cached on this rank."""
        return self.storage.length

    @property
    def num_bytes(self) -> int:
        return self.storage.num_bytes

    def advance(self, num_tokens: int) -> None:
        self.storage.advance(num_tokens)

    def prefill_fn(self, num_store: int, *, after_cached: bool) -> AttentionFn:
        """A prefill round: ring attention over the round's tokens, merged (when
        `after_cached`, on every rank alike) with attention over every rank's cache; the first
        `num_store` local keys/values (the real tokens) are then cached here."""

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
            # q: [1, hq, 2c, d]; k, v: [1, hkv, 2c, d]: this rank's two chunks of the round
            with self._collective("ring attention", layer_idx):
                out, lse = ring_attention_with_lse(q, k, v, group=self.group)  # f32 [1,hq,2c,(d)]
            if after_cached:
                with self._collective("attention over the cached tokens", layer_idx):
                    out_cached, lse_cached = self._over_all_caches(q, layer_idx)
                out, _ = merge_partials(out_cached, lse_cached, out, lse)
            self.storage.write(layer_idx, k[:, :, :num_store], v[:, :, :num_store])
            return out.to(q.dtype)

        return attend

    def decode_fn(self, store: bool) -> AttentionFn:
        """One new token, the same on every rank: its query over every rank's shard; its
        key/value is cached here iff `store`."""

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
            # q: [1, hq, 1, d]; k, v: [1, hkv, 1, d]
            new = 1 if store else 0
            end = self.storage.write(layer_idx, k[:, :, :new], v[:, :, :new])
            out, lse = self._local_partial(q, layer_idx, end)  # [1, hq, 1, d], [1, hq, 1]
            if self.cp > 1:
                packed = _pack(out, lse)  # [1, hq, 1, d + 1]
                parts = [torch.empty_like(packed) for _ in range(self.cp)]
                with self._collective("merging decode attention", layer_idx):
                    dist.all_gather(parts, packed, group=self.group)
                out, lse = _merge_packed(parts)
            return out.to(q.dtype)

        return attend

    def _over_all_caches(self, q, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Local queries q [1, hq, m, d] over every rank's cache of layer `layer_idx`
        -> (out f32, lse)."""
        length = self.storage.length
        if self.cp == 1:
            return self._local_partial(q, layer_idx, length)
        gathered = [torch.empty_like(q) for _ in range(self.cp)]
        dist.all_gather(gathered, q.contiguous(), group=self.group)
        queries = torch.cat(gathered, dim=2)  # [1, hq, cp * m, d]: every rank's, in rank order
        out, lse = self._local_partial(queries, layer_idx, length)  # over this rank's cache
        send = [part.contiguous() for part in _pack(out, lse).split(q.shape[2], dim=2)]
        received = [torch.empty_like(part) for part in send]  # cp x [1, hq, m, d + 1]
        dist.all_to_all(received, send, group=self.group)  # our queries' partial from each rank
        return _merge_packed(received)

    def _local_partial(self, q, layer_idx: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q [1, hq, n, d] over the first `end` tokens of this rank's cache of
        layer `layer_idx` -> (out float32 [1, hq, n, d], lse [1, hq, n]); an empty shard gives
        (0, -inf)."""
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        self.storage.attend_cached_(q, layer_idx, end, out, lse)
        return out, lse

    def _collective(self, what: str, layer_idx: int):
        return peer_errors(f"{what} in layer {layer_idx} ({self.phase})", self.cp_rank, self.cp)


def _pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(out [..., n, d], lse [..., n]) -> one float32 message [..., n, d + 1]."""
    return torch.cat([out.float(), lse.float()[..., None]], dim=-1)


def _merge_packed(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of packed partial results, in list (rank) order."""
    out, lse = parts[0][..., :-1], parts[0][..., -1]
    for part in parts[1:]:
        out, lse = merge_partials(out, lse, part[..., :-1], part[..., -1])
    return out, lse
