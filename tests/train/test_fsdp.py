"""FSDP2 over dp x cp gloo ranks against one process: the same losses and the same parameters
after three optimizer steps on the same global batches (fp32, default tolerances); frozen parts
unchanged and without optimizer state; a context-parallel shard without a tile does not hang.

Every rank builds the same random model (seed), takes its data-parallel share of each step's
sequences, and runs `train.loop.train_step` (FSDP2 via `parallel.fsdp.parallelize`); the
reference runs the whole batch of each step in this process with the same code.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from longvita.config import tiny
from longvita.data.packed import PackedSequence
from longvita.ops.loss import IGNORE_INDEX, shift_labels
from longvita.parallel.fsdp import parallelize
from longvita.parallel.state import ParallelState
from longvita.testing import random_model
from longvita.train.config import StageConfig
from longvita.train.loop import train_step
from longvita.train.optim import build_optimizer, build_scheduler, freeze, param_groups

CONFIG = tiny(vocab_size=96)
TOKENS_PER_TILE = CONFIG.vision.tokens_per_tile
CONTEXT_ID, PAD_ID = 5, 0
STEPS, GLOBAL_BATCH = 3, 4


def _sequence(seed: int, *, tiles_at: tuple[int, ...], length: int = 40) -> PackedSequence:
    """Two packed samples; a tile of 4 slots at each of `tiles_at`."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(6, CONFIG.vocab_size, (length,), generator=gen)
    visual_mask = torch.zeros(length, dtype=torch.bool)
    for start in tiles_at:
        visual_mask[start : start + TOKENS_PER_TILE] = True
    input_ids[visual_mask] = CONTEXT_ID
    labels = input_ids.clone()
    labels[visual_mask] = IGNORE_INDEX
    labels[torch.rand(length, generator=gen) < 0.4] = IGNORE_INDEX
    split = length // 2 + 3
    size = CONFIG.vision.image_size
    pixels = torch.randn(len(tiles_at), 3, size, size, generator=gen) if tiles_at else None
    return PackedSequence(
        input_ids=input_ids,
        targets=shift_labels(labels),
        position_ids=torch.cat([torch.arange(split), torch.arange(length - split)]),
        cu_seqlens=torch.tensor([0, split, length]),
        visual_mask=visual_mask,
        pixel_values=pixels,
        tokens_per_tile=TOKENS_PER_TILE,
    )


def _batches() -> list[list[PackedSequence]]:
    """STEPS x GLOBAL_BATCH sequences: with tiles, without, and with a tile only in the first
    tenth (at cp 2 the second rank's shard then holds none: the ViT must still run there)."""
    kinds = [(3, 20), (), (1,), (10,)]
    return [
        [_sequence(100 * step + i, tiles_at=kinds[(step + i) % 4]) for i in range(GLOBAL_BATCH)]
        for step in range(STEPS)
    ]


def _stage(trainable: dict) -> StageConfig:
    return StageConfig.from_dict({
        "init": {"model": "tiny", "tokenizer": "unused"},
        "data": {"mixture": "unused.yaml", "seq_len": 40},
        "trainable": trainable,
        # eps 1e-6, not 1e-8: a weight whose gradient is ~1e-9 (terms cancelling) moves by about
        # lr * g / eps, which turns its float rounding (~1e-10, any summation order) into 1e-5
        # at eps 1e-8, past the default tolerance; that is Adam's, not the sharding's
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "eps": 1e-6},
        "schedule": {"steps": STEPS, "warmup_fraction": 0.0},
        "batch": {"global_sequences": GLOBAL_BATCH},
    })  # fmt: skip


def _train(state: ParallelState, trainable: dict) -> dict:
    """STEPS steps of this rank's share; the losses, the full parameters and optimizer facts."""
    stage = _stage(trainable)
    model = random_model(CONFIG, seed=3).train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    freeze(model, stage.trainable)
    parallelize(model, state, activation_checkpointing=True, vision_trains=stage.trainable.vision)
    optimizer = build_optimizer(param_groups(model, stage.optim), stage.optim)
    scheduler = build_scheduler(optimizer, stage.optim, stage.schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    per_rank = GLOBAL_BATCH // state.dp_size
    losses = []
    for batch in _batches():
        mine = batch[state.dp_rank * per_rank : (state.dp_rank + 1) * per_rank]
        outcome = train_step(
            model, mine, state, stage, pad_id=PAD_ID, optimizer=optimizer,
            scheduler=scheduler, params=params,
        )  # fmt: skip
        losses.append(outcome.loss)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    final = get_model_state_dict(model, options=options)
    states_with_moments = sum(1 for s in optimizer.state.values() if "exp_avg" in s)
    return {
        "losses": losses,
        "final": final,
        "initial": initial,
        "optimizer_states": states_with_moments,
        "trainable": len(params),
    }


def _train_on_rank(rank: int, world_size: int, cp: int, trainable: dict) -> dict:
    return _train(ParallelState.from_group(cp, timeout_s=120), trainable)


ALL = {"vision": True, "projector": True, "llm": True}
STAGE_3 = {"vision": False, "projector": True, "llm": True}
STAGE_1 = {"vision": False, "projector": True, "llm": False}


@pytest.fixture(scope="module")
def references() -> dict:
    return {
        name: _train(ParallelState.single(), trainable)
        for name, trainable in (("all", ALL), ("stage3", STAGE_3), ("stage1", STAGE_1))
    }


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world_size", "cp", "name"),
    [(2, 1, "all"), (2, 2, "stage3"), (4, 2, "stage1")],
    ids=["dp2", "cp2", "dp2xcp2"],
)
def test_fsdp_steps_equal_one_process(ranks, references, world_size, cp, name):
    trainable = {"all": ALL, "stage3": STAGE_3, "stage1": STAGE_1}[name]
    results = ranks(_train_on_rank, world_size, args=(cp, trainable), timeout_s=300)
    reference = references[name]
    for result in results:
        torch.testing.assert_close(result["losses"], reference["losses"])
    got = results[0]["final"]
    assert got.keys() == reference["final"].keys()
    for key, value in reference["final"].items():
        torch.testing.assert_close(got[key], value, msg=key)
    frozen = [k for k in got if not _trains(k, trainable)]
    for key in frozen:  # frozen parts are bit-identical to the initial weights
        assert torch.equal(got[key], reference["initial"][key]), key
    for result in results:  # optimizer state only for the trainable parameters
        assert result["optimizer_states"] == result["trainable"] > 0
    assert all(0 < loss < 10 for loss in reference["losses"])


def _trains(key: str, trainable: dict) -> bool:
    if key.startswith("model.vision_model."):
        return trainable["vision"]
    if key.startswith("model.vision_projection."):
        return trainable["projector"]
    return trainable["llm"]
