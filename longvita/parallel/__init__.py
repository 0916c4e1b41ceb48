"""Everything torch.distributed: parallel state (one object), the launcher of local ranks,
sequence sharding, ring attention, the sharded KV cache, the context-parallel loss and the few
collectives the layers above need (`collectives`).

The only package that imports torch.distributed; model/, ops/, processing/ and data/ never do,
and infer/ (which sits above this package) calls it instead. Nothing here imports infer/.
"""

from longvita.parallel.launch import RankFailedError, launch
from longvita.parallel.ring_attention import (
    make_ring_attention_fn,
    ring_attention,
    ring_attention_with_lse,
)
from longvita.parallel.sharded_cache import ShardedKVCache
from longvita.parallel.sharding import (
    SequenceShard,
    pad_to_multiple,
    shard_sequence,
    shard_tensor,
    unshard,
)
from longvita.parallel.state import ParallelState

__all__ = [
    "ParallelState",
    "RankFailedError",
    "SequenceShard",
    "ShardedKVCache",
    "launch",
    "make_ring_attention_fn",
    "pad_to_multiple",
    "ring_attention",
    "ring_attention_with_lse",
    "shard_sequence",
    "shard_tensor",
    "unshard",
]
