"""Everything torch.distributed: parallel state (one object), sequence sharding, ring attention,
context-parallel generation over a sharded KV cache, and the launcher of local ranks.

The only package that imports torch.distributed; model/, ops/, processing/ and data/ never do.
"""

from longvita.parallel.cp_inference import (
    PromptLayout,
    ShardedGenerationResult,
    generate_sharded,
)
from longvita.parallel.launch import RankFailedError, generate_cp, launch
from longvita.parallel.ring_attention import (
    make_ring_attention_fn,
    ring_attention,
    ring_attention_with_lse,
)
from longvita.parallel.sharded_cache import ShardedKVCache
from longvita.parallel.sharding import (
    PackedSequence,
    SequenceShard,
    pad_to_multiple,
    shard_sequence,
    shard_tensor,
    unshard,
    zigzag_chunks,
    zigzag_index,
)
from longvita.parallel.state import ParallelState

__all__ = [
    "PackedSequence",
    "ParallelState",
    "PromptLayout",
    "RankFailedError",
    "SequenceShard",
    "ShardedGenerationResult",
    "ShardedKVCache",
    "generate_cp",
    "generate_sharded",
    "launch",
    "make_ring_attention_fn",
    "pad_to_multiple",
    "ring_attention",
    "ring_attention_with_lse",
    "shard_sequence",
    "shard_tensor",
    "unshard",
    "zigzag_chunks",
    "zigzag_index",
]
