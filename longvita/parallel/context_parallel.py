"""The model under context parallelism: one packed sequence, cut over the CP group.

Owns the step that turns a PackedSequence into this rank's loss: pad to a multiple of 2*cp,
take this rank's zigzag shard (labels were shifted over the whole sequence before), run the
model with ring attention in every layer (the ViT only on the tiles this rank's tokens need),
and combine the (sum, count) of the logits-masked loss over the group, so that the loss and,
after `all_reduce_gradients`, every gradient equal the single-process run's. With cp = 1 the
same function runs the whole sequence locally (packed samples attend only within themselves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from longvita.data.packed import PackedSequence
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.ops.attention import packed_attention_fn
from longvita.parallel.ring_attention import make_ring_attention_fn
from longvita.parallel.sharding import pad_to_multiple, shard_sequence
from longvita.parallel.state import ParallelState


@dataclass
class SequenceLoss:
    loss: torch.Tensor
    """This rank's share of the loss: local sum / the normalizer (by default the sequence's
    supervised positions, so the ranks' shares add up to its mean). Call backward on it."""
    mean: torch.Tensor
    """The mean loss over the whole sequence (detached, the same on every rank)."""
    count: int
    """Supervised positions in the whole sequence."""
    total: torch.Tensor
    """The summed loss over the whole sequence (detached float32, the same on every rank)."""


def sequence_loss(
    model: LongVITAForCausalLM,
    seq: PackedSequence,
    state: ParallelState,
    *,
    pad_id: int,
    chunk_size: int = 4096,
    normalizer: float | None = None,
    logits_masked: bool = True,
    keep_vision_in_graph: bool = False,
) -> SequenceLoss:
    """Next-token loss of `seq` (targets already shifted) under `state`'s context parallelism.

    normalizer: what the local loss sum is divided by (a trainer passes the supervised tokens
    of the whole optimizer step, over every sequence and rank); default: this sequence's.
    logits_masked, keep_vision_in_graph: see `LongVITAForCausalLM.loss`.
    """
    cp, group = state.cp_size, state.cp_group
    device = model.lm_head.weight.device
    if cp > 1:
        shard = shard_sequence(pad_to_multiple(seq, 2 * cp, pad_id), cp, state.cp_rank)
        attention_fn = make_ring_attention_fn(group, shard.cu_seqlens)
        feature_index = shard.feature_index
    else:
        shard, feature_index = seq, None
        attention_fn = packed_attention_fn(seq.cu_seqlens) if len(seq.cu_seqlens) > 2 else None
    loss_sum, count = model.loss(
        shard.input_ids.to(device)[None],
        shard.targets.to(device)[None],
        position_ids=shard.position_ids.to(device)[None],
        pixel_values=None if shard.pixel_values is None else shard.pixel_values.to(device),
        visual_mask=shard.visual_mask.to(device)[None],
        feature_index=feature_index,
        attention_fn=attention_fn,
        chunk_size=chunk_size,
        logits_masked=logits_masked,
        keep_vision_in_graph=keep_vision_in_graph,
    )
    totals = torch.stack([loss_sum.detach().float(), count.float()])  # [2]: (sum, count)
    if cp > 1:
        dist.all_reduce(totals, group=group)
    global_count = totals[1].clamp(min=1)
    divisor = global_count if normalizer is None else normalizer
    return SequenceLoss(
        loss=loss_sum / divisor,
        mean=totals[0] / global_count,
        count=int(totals[1]),
        total=totals[0],
    )


def all_reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Sum every parameter's gradient over `group` (a missing gradient counts as zero).

    Each CP rank holds the gradient of its share of the loss; their sum is the gradient of
    the whole sequence. The sum is taken in float32 whatever the parameters' dtype (a bf16
    all-reduce would round every partial sum). (Under FSDP the reduce-scatter over the data x
    context mesh does this, with its own reduce dtype.)
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    for param in model.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad if param.grad.dtype == torch.float32 else param.grad.float()
        dist.all_reduce(grad, group=group)
        if grad is not param.grad:
            param.grad.copy_(grad)
