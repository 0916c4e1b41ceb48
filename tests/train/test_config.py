"""Stage files: the shipped ones read, every bad key is one line naming it, overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest

import longvita
from longvita.train.config import StageConfig, StageConfigError

CONFIGS = Path(longvita.__file__).parent / "configs"
OFFICIAL = {  # stage: (lr, min_lr, global batch, steps, seq_len, frames, cp, logits_masked)
    1: (1e-3, 1e-5, 512, 1000, 32768, 128, 1, False),
    2: (1e-5, 1e-7, 540, 5000, 16384, 64, 1, False),
    3: (5e-6, 1e-7, 64, 1000, 131072, 512, 2, False),
    4: (5e-6, 1e-7, 8, 500, 1048576, 4096, 8, True),
}


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_the_official_stage_files_carry_the_official_numbers(stage):
    config = StageConfig.from_yaml(CONFIGS / f"stage{stage}.yaml")
    lr, min_lr, batch, steps, seq_len, frames, cp, masked = OFFICIAL[stage]
    assert (config.optim.lr, config.optim.min_lr) == (lr, min_lr)
    assert config.batch.global_sequences == batch and config.schedule.steps == steps
    assert (config.data.seq_len, config.data.max_frames) == (seq_len, frames)
    assert config.parallel.cp == cp and config.loss.logits_masked is masked
    assert config.optim.betas == (0.9, 0.999) and config.optim.weight_decay == 0.0
    assert config.optim.clip == 1.0 and config.schedule.warmup_fraction == 0.03
    trainable = (config.trainable.vision, config.trainable.projector, config.trainable.llm)
    assert trainable == {1: (False, True, False), 2: (True, True, True)}.get(
        stage, (False, True, True)
    )
    assert config.data.packing == ("per_source" if stage <= 2 else "cross_source")
    assert config.data.reset_per_sample is (stage <= 2)


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    return path


BASE = "init: {model: tiny, tokenizer: tok}\ndata: {mixture: m.yaml, seq_len: 64}\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("optim: {lr: -1}\n", "optim.lr: must be > 0, got -1.0"),
        ("optim: {lrr: 0.1}\n", "optim.lrr: unknown key"),
        ("bogus: 1\n", "bogus: unknown key"),
        ("optim: {lr: fast}\n", "optim.lr: must be a number, got 'fast'"),
        ("optim: {lr: .nan}\n", "optim.lr: must be finite"),
        ("batch: {global_sequences: 2.5}\n", "batch.global_sequences: must be an integer"),
        ("trainable: {llm: yes please}\n", "trainable.llm: must be true or false"),
        ("optim: {betas: [0.9]}\n", "optim.betas: must be a list of 2"),
        ("parallel: {cp: 0}\n", "parallel.cp: must be >= 1, got 0"),
        ("data: {seq_len: 64}\n", "data.mixture: a mixture YAML is required"),
        ("trainable: {projector: false}\n", "trainable: nothing to train"),
        ("optim: {lr: 1e-5, min_lr: 1e-3}\n", "optim.min_lr: 0.001 is above optim.lr 1e-05"),
        ("schedule: {warmup_fraction: 1.5}\n", "schedule.warmup_fraction: must be in [0, 1)"),
        ("data: {mixture: m.yaml, packing: zigzag}\n", "data.packing: per_source or"),
        ("optim: [1, 2]\n", "optim: expected a mapping"),
        ("seed: -3\n", "seed: must be in [0, 2**63), got -3"),
        ("seed: 123456789012345678901234567890\n", "seed: must be in [0, 2**63)"),
        ("data: {mixture: m.yaml, seed: -5}\n", "data.seed: must be in [0, 2**63), got -5"),
        (
            "data: {mixture: m.yaml, seq_len: 64, pose_max_position: 32}\n",
            "data.pose_max_position: must be >= data.seq_len 64, got 32",
        ),
    ],
)
def test_bad_stage_files_name_the_key(tmp_path, extra, message):
    text = "init: {model: tiny}\n" if extra.startswith("data:") else BASE
    with pytest.raises(StageConfigError) as info:
        StageConfig.from_yaml(_write(tmp_path, text + extra))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_not_yaml_a_directory_or_missing(tmp_path):
    with pytest.raises(StageConfigError, match="is not valid YAML"):
        StageConfig.from_yaml(_write(tmp_path, "optim: {lr: [\n"))
    with pytest.raises(StageConfigError, match="is a directory"):
        StageConfig.from_yaml(tmp_path)
    with pytest.raises(StageConfigError, match="does not exist"):
        StageConfig.from_yaml(tmp_path / "nope.yaml")


def test_overrides_set_any_key_with_yaml_values(tmp_path):
    config = StageConfig.from_yaml(
        _write(tmp_path, BASE),
        ["optim.lr=1e-4", "optim.betas=[0.8, 0.95]", "parallel.cp=2", "trainable.llm=true"],
    )
    assert config.optim.lr == 1e-4 and config.optim.betas == (0.8, 0.95)
    assert config.parallel.cp == 2 and config.trainable.llm is True
    with pytest.raises(StageConfigError, match="--set 'optim.lr': expected key.sub=value"):
        StageConfig.from_yaml(_write(tmp_path, BASE), ["optim.lr"])
    with pytest.raises(StageConfigError, match="optim.nope: unknown key"):
        StageConfig.from_yaml(_write(tmp_path, BASE), ["optim.nope=1"])
    spelled = StageConfig.from_yaml(_write(tmp_path, BASE), ["data.packing=cross-source"])
    assert spelled.data.packing == "cross_source"  # as `data inspect --packing` spells it too
    empty_section = _write(tmp_path, BASE + "log:\n")  # its keys commented out: the defaults
    assert StageConfig.from_yaml(empty_section).log.interval == 10
    assert StageConfig.from_yaml(empty_section, ["log.interval=5"]).log.interval == 5


def test_the_world_must_fit_the_stage(tmp_path):
    config = StageConfig.from_yaml(
        _write(tmp_path, BASE), ["parallel.cp=2", "batch.global_sequences=6"]
    )
    config.check_world(2)  # dp 1: 6 micro-batches a step
    config.check_world(6)  # dp 3: 2 each
    assert config.accumulation_steps(3) == 2
    with pytest.raises(StageConfigError, match="parallel.cp: 2 does not divide the 3 processes"):
        config.check_world(3)
    with pytest.raises(StageConfigError, match="batch.global_sequences: 6 sequences do not split"):
        config.check_world(8)  # dp 4
