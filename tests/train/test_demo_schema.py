"""The demo model's four stages (plus stage 0, the stand-in for the pretrained LLM) with our
trainer: a few dozen steps on a few synthetic samples each, the loss falling and finite at
every stage, stages 3-4 with context parallelism 2 and stage 4 with the logits-masked loss.
The full recipe and its thresholds are the slow test."""

from __future__ import annotations

import json
import math

import pytest

from longvita.demo_train import STAGES, run_demo_training, stage_file
from longvita.train.config import StageConfig

STEPS = 24


def losses(run_dir) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.distributed
def test_every_stage_learns_a_few_samples(tmp_path):
    short = [
        f"schedule.steps={STEPS}",
        "schedule.warmup_fraction=0.1",
        "log.interval=100",
        f"checkpoint.interval={STEPS}",
        "optim.lr=2e-3",
        "optim.min_lr=1e-3",
    ]
    long_context = ["data.seq_len=1024", "data.max_frames=64"]
    report = run_demo_training(
        tmp_path,
        scale=0.002,
        extra=short,
        stage_extra={3: long_context, 4: long_context},
        evaluate_stages=False,
    )
    for stage in STAGES:
        values = losses(tmp_path / f"stage{stage}")
        assert len(values) == STEPS and all(math.isfinite(v) for v in values), (stage, values)
        first, last = sum(values[:4]) / 4, sum(values[-4:]) / 4
        assert last < 0.8 * first, f"stage {stage}: loss {first:.3f} -> {last:.3f}"
        assert report["stages"][stage]["step"] == STEPS
    assert (tmp_path / "model" / "config.json").is_file()  # exported after stage 4
    assert (tmp_path / "after-stage2" / "config.json").is_file()


def test_stage_files_follow_the_schema():
    """Stage 1 the projector, 2 everything, 3-4 LLM + projector over CP 2, 4 logits-masked."""
    configs = {stage: StageConfig.from_yaml(stage_file(stage)) for stage in STAGES}
    trainable = {
        s: (c.trainable.vision, c.trainable.projector, c.trainable.llm) for s, c in configs.items()
    }
    assert trainable == {
        0: (False, False, True),
        1: (False, True, False),
        2: (True, True, True),
        3: (False, True, True),
        4: (False, True, True),
    }
    assert [configs[s].parallel.cp for s in STAGES] == [1, 1, 1, 2, 2]
    assert configs[4].loss.logits_masked and configs[4].data.max_frames == 4096
    assert configs[3].data.max_frames == 512
