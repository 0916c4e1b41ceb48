"""The full LongVITA model under context parallelism: loss and every gradient at CP = 2 and 4
equal the single-process run (text, image tiles straddling chunk seams, packed samples)."""

from __future__ import annotations

import pytest
import torch

from longvita.config import tiny
from longvita.data.packed import PackedSequence
from longvita.ops.loss import IGNORE_INDEX, shift_labels
from longvita.parallel.context_parallel import all_reduce_gradients, sequence_loss
from longvita.parallel.state import ParallelState
from longvita.testing import random_model

PAD_ID = 0
CONFIG = tiny(vocab_size=96)
TOKENS_PER_TILE = CONFIG.vision.tokens_per_tile
CONTEXT_ID = 5  # placeholder id: embeddings there are overwritten by tile features


def make_sequence(*, reset: bool, seed: int = 0) -> PackedSequence:
    """Three packed samples of text and tiles (61 tokens: not a multiple of 4 or 8)."""
    gen = torch.Generator().manual_seed(seed)
    lengths, tiles_at = [23, 17, 21], {3: 2, 27: 1, 44: 1}  # sample lengths; slot start: tiles
    seq_len = sum(lengths)
    input_ids = torch.randint(6, CONFIG.vocab_size, (seq_len,), generator=gen)
    visual_mask = torch.zeros(seq_len, dtype=torch.bool)
    for start, count in tiles_at.items():
        visual_mask[start : start + count * TOKENS_PER_TILE] = True
    input_ids[visual_mask] = CONTEXT_ID
    labels = input_ids.clone()
    labels[visual_mask] = IGNORE_INDEX
    labels[torch.rand(seq_len, generator=gen) < 0.3] = IGNORE_INDEX
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    if reset:
        positions = torch.cat([torch.arange(n) for n in lengths])
        cu_seqlens = bounds
    else:
        positions, cu_seqlens = torch.arange(seq_len), torch.tensor([0, seq_len])
    num_tiles = sum(tiles_at.values())
    size = CONFIG.vision.image_size
    return PackedSequence(
        input_ids=input_ids,
        targets=shift_labels(labels),
        position_ids=positions,
        cu_seqlens=cu_seqlens,
        visual_mask=visual_mask,
        pixel_values=torch.randn(num_tiles, 3, size, size, generator=gen),
        tokens_per_tile=TOKENS_PER_TILE,
    )


def loss_and_grads(state: ParallelState, reset: bool) -> dict:
    model = random_model(CONFIG, seed=0).train()
    result = sequence_loss(model, make_sequence(reset=reset), state, pad_id=PAD_ID, chunk_size=7)
    result.loss.backward()
    all_reduce_gradients(model, state.cp_group)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {"loss": result.mean, "count": result.count, "grads": grads}


def _rank(rank: int, world_size: int, reset: bool) -> dict:
    return loss_and_grads(ParallelState.from_group(world_size, timeout_s=60), reset)


@pytest.mark.distributed
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("reset", [True, False], ids=["reset", "continuous"])
def test_loss_and_gradients_match_single_process(ranks, cp, reset):
    reference = loss_and_grads(ParallelState.single(), reset)
    assert reference["count"] > 20
    results = ranks(_rank, cp, args=(reset,), timeout_s=120)
    for result in results:
        assert result["count"] == reference["count"]
        torch.testing.assert_close(result["loss"], reference["loss"])
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, msg=name)
    vision_grad = reference["grads"]["model.vision_model.embeddings.patch_embedding.weight"]
    assert vision_grad.abs().sum() > 0  # the tiles are in the loss's graph


def _bf16_gradients_summed(rank: int, world_size: int) -> dict:
    """Sum bf16 gradients over the group, recording the dtype of every all-reduce."""
    state = ParallelState.from_group(world_size, timeout_s=60)
    layer = torch.nn.Linear(3, 2, bias=False).to(torch.bfloat16)
    layer.weight.grad = torch.full_like(layer.weight, 1.0 if rank == 0 else 2.0**-9)
    seen, all_reduce = [], torch.distributed.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.dtype)
        return all_reduce(tensor, *args, **kwargs)

    torch.distributed.all_reduce = recording_all_reduce
    try:
        all_reduce_gradients(layer, state.cp_group)
    finally:
        torch.distributed.all_reduce = all_reduce
    return {"dtypes": seen, "grad": layer.weight.grad}


@pytest.mark.distributed
def test_gradients_of_bfloat16_parameters_are_summed_in_float32(ranks):
    """NCCL sums bf16 in bf16 hop by hop; the sum is taken in float32 and rounded once."""
    for result in ranks(_bf16_gradients_summed, 2):
        assert result["dtypes"] == [torch.float32]
        assert result["grad"].dtype == torch.bfloat16
        assert torch.equal(result["grad"], torch.full((2, 3), 1.0 + 2.0**-9).to(torch.bfloat16))
