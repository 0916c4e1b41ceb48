"""Everything torch.distributed: parallel state (one object), sequence sharding, ring attention.

The only package that imports torch.distributed; model/, ops/, processing/ and data/ never do.
"""

from longvita.parallel.ring_attention import make_ring_attention_fn, ring_attention
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
    "SequenceShard",
    "make_ring_attention_fn",
    "pad_to_multiple",
    "ring_attention",
    "shard_sequence",
    "shard_tensor",
    "unshard",
    "zigzag_chunks",
    "zigzag_index",
]
