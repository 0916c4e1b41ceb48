"""`longvita train` and `longvita export` end to end on the tiny setup: metrics and plot, exact
resume after SIGKILL, a checkpoint on SIGTERM, stage transitions (weights only), export, bad
stage files refused before any process starts, and a diverged run stopped with an error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import longvita
from longvita.cli import main
from longvita.config import LongVITAConfig
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.testing import write_mixture
from longvita.train.init import InitSpec, initialize
from longvita.train.metrics import read_metrics

METRIC_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens", "supervised_tokens",
                 "tokens_per_s", "seconds"}  # fmt: skip


def _train_command(stage: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "longvita", "train", str(stage), "--out", str(out), *extra]


def _run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


@pytest.fixture(scope="module")
def finished_run(train_setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole"
    done = _run(_train_command(train_setup["stage"], out))
    assert done.returncode == 0, done.stderr[-3000:]
    (out.parent / "whole.stderr").write_text(done.stderr)
    return out


def test_a_run_without_a_terminal_prints_its_progress_without_v(finished_run):
    """No bar when stderr is not a terminal: a line at the start, every log.interval steps
    (1 here) and at each checkpoint, whatever the logging level."""
    lines = (finished_run.parent / "whole.stderr").read_text().splitlines()
    assert lines[0].startswith(f"train: {finished_run}: steps 1-6 (a new run); ")
    steps = [line for line in lines if line.startswith("train: step ")]
    assert [line.split()[2] for line in steps] == [f"{i}/6" for i in range(1, 7)]
    assert " loss " in steps[0] and " tokens/s " in steps[0]
    checkpoints = [line for line in lines if line.startswith("train: checkpoint ")]
    assert [Path(line.split()[-1]).name for line in checkpoints] == ["step-2", "step-4", "step-6"]


def test_a_run_writes_metrics_checkpoints_and_a_plot(finished_run):
    records = read_metrics(finished_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert record.keys() >= METRIC_FIELDS
        assert record["supervised_tokens"] > 0 and record["tokens"] >= record["supervised_tokens"]
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert records[0]["lr"] == pytest.approx(1e-3) and records[-1]["lr"] < 3e-4  # the schedule
    checkpoints = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    assert checkpoints == ["step-4", "step-6"]  # keep_latest 2; no partial directory left
    with Image.open(finished_run / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 100


def _kill_after(command: list[str], run: Path, steps: int, last_step: int) -> None:
    """Start `command` in its own session and SIGKILL it once `steps` metrics are written,
    before its `last_step`. A loaded machine can stall this process past the few hundred ms
    the tiny run needs for its last steps: then it is run again from an empty directory."""
    for _ in range(3):
        shutil.rmtree(run, ignore_errors=True)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
                break
            time.sleep(0.05)
        ran_on = process.poll() is None
        if ran_on:
            os.killpg(process.pid, signal.SIGKILL)
        _, err = process.communicate()
        assert ran_on or process.returncode == 0, err[-3000:]
        if ran_on and max(_losses(run), default=0) < last_step:
            return
    raise AssertionError(f"the run reached step {last_step} before the kill, 3 times")


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_a_killed_run_resumes_with_bitwise_the_same_losses(
    train_setup, finished_run, tmp_path, nproc
):
    extra = ["--nproc", str(nproc)]
    reference = finished_run
    if nproc > 1:  # the reference of a 2-process run is a 2-process run
        reference = tmp_path / "whole"
        done = _run(_train_command(train_setup["stage"], reference, *extra))
        assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "killed"
    command = _train_command(train_setup["stage"], run, *extra)
    _kill_after(command, run, steps=3, last_step=6)
    done = _run(command)  # the same command resumes from the latest complete checkpoint
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(run) == _losses(reference)  # bitwise: float equality of every step
    assert not list((run / "checkpoints").glob("*.partial"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 7))  # each step once


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_sigterm_writes_a_checkpoint_then_stops(train_setup, tmp_path, nproc):
    """With spawned ranks the launcher passes SIGTERM on and waits for their checkpoint; a
    second SIGTERM while they write it changes nothing."""
    run = tmp_path / "terminated"
    command = _train_command(
        train_setup["stage"], run, "--set", "schedule.steps=200", "--nproc", str(nproc)
    )
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (run / "metrics.jsonl").is_file() and process.poll() is None:
        time.sleep(0.05)
    for _ in range(nproc):
        process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    result = json.loads(out)
    assert result["stopped"] and 0 < result["step"] < 200
    assert Path(result["checkpoint"]).name == f"step-{result['step']}"
    assert "rerun the same command to resume" in err
    assert "train: step 1/200 loss " in err  # rank 0's progress, spawned or not
    assert err.count("SIGTERM: checkpointing after this step") == 1, err  # not once per rank


def test_a_stage_transition_loads_the_weights_only(train_setup, finished_run, tmp_path):
    stage = tmp_path / "next.yaml"
    text = (
        train_setup["stage"]
        .read_text()
        .replace(
            f"init: {{model: tiny, tokenizer: {train_setup['tokenizer']}}}",
            f"init: {{from: {finished_run}}}",
        )
    )
    stage.write_text(text.replace("steps: 6", "steps: 2"))
    run = tmp_path / "next"
    done = _run(_train_command(stage, run))
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]  # the step restarts at 0
    assert records[0]["lr"] == pytest.approx(1e-3)  # a fresh schedule (warmup of 1 step)
    previous, _ = initialize(InitSpec(from_=str(finished_run)), seed=0)
    started, _ = initialize(InitSpec(from_=str(finished_run / "checkpoints" / "step-6")), seed=1)
    for (name, a), b in zip(previous.state_dict().items(), started.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_a_resumed_run_s_metrics_keep_one_record_per_step(tmp_path, caplog):
    """Records after the checkpoint (redone) and a line a kill cut short are dropped."""
    from longvita.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": step, "loss": 1.0 / step, "lr": 0.1}) for step in (1, 2, 3, 4)]
    path.write_text("\n".join(records) + '\n{"step": 5, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert "not a whole record" in caplog.text
    log = MetricsLog(path, total_steps=6, start_step=2, interval=1, tensorboard=False)
    log.close()
    assert path.read_text().splitlines() == records[:2]


def test_export_of_a_checkpoint_that_is_not_there_lists_the_run_s(tmp_path):
    from longvita.train.export import find_checkpoint

    (tmp_path / "run" / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-2" / ".metadata").touch()
    (tmp_path / "run" / "checkpoints" / "step-4.partial").mkdir()
    with pytest.raises(
        ValueError, match=r"step-9 does not exist; the run's checkpoints: \['step-2'\]"
    ):
        find_checkpoint(tmp_path / "run" / "checkpoints" / "step-9")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path / "run" / "checkpoints" / "step-4.partial")


def test_export_gives_the_trained_model(finished_run, tmp_path, media):
    out = tmp_path / "export"
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    pipe = longvita.load(out)
    # the checkpoint read by DCP's own converter, independently of our loading code
    dcp_to_torch_save(finished_run / "checkpoints" / "step-6", tmp_path / "all.pt")
    flat = torch.load(tmp_path / "all.pt", weights_only=False)["app"]["model"]
    reference = LongVITAForCausalLM(LongVITAConfig.from_pretrained(out)).eval()
    reference.load_state_dict(flat)
    prompt = pipe.process("<image>\nWhat is this?", [media["image"]])
    with torch.inference_mode():
        got = pipe.model(prompt.input_ids[None], pixel_values=prompt.pixel_values,
                         visual_mask=prompt.visual_mask[None])  # fmt: skip
        want = reference(prompt.input_ids[None], pixel_values=prompt.pixel_values,
                         visual_mask=prompt.visual_mask[None])  # fmt: skip
    torch.testing.assert_close(got, want)


def _forbid_launch(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a process started before the stage file was checked")

    monkeypatch.setattr(sys.modules["longvita.parallel.launch"], "launch", forbidden)


@pytest.mark.parametrize(
    ("overrides", "nproc", "message"),
    [
        (["optim.lr=-1"], 1, "optim.lr: must be > 0, got -1.0"),
        (["optim.learning_rate=1"], 1, "optim.learning_rate: unknown key"),
        (["batch.global_sequences=3"], 2, "batch.global_sequences: 3 sequences do not split"),
        (["parallel.cp=2"], 3, "parallel.cp: 2 does not divide the 3 processes"),
        (["init={from: /no/such/run}"], 1, "init.from: /no/such/run does not exist"),
        (["data.mixture=/no/mixture.yaml"], 1, "data.mixture: /no/mixture.yaml does not exist"),
        (["data.mixture=BAD_RATIO"], 1, "data.mixture: BAD_RATIO: group 'g': ratio must be"),
        (["data.mixture=MISSING_FILE"], 1, "data.mixture: 1 data file(s) not found"),
    ],
)
def test_bad_stage_files_fail_in_one_line_before_any_process(
    train_setup, tmp_path, capsys, monkeypatch, overrides, nproc, message
):
    _forbid_launch(monkeypatch)
    mixtures = {  # mixture files that are wrong inside: found before any process starts
        "BAD_RATIO": write_mixture(
            tmp_path / "ratio.yaml", {"g": {"ratio": -1, "data_paths": ["a"]}}
        ),
        "MISSING_FILE": write_mixture(
            tmp_path / "gone.yaml", {"g": {"data_paths": ["gone.jsonl"]}}
        ),
    }
    argv = ["train", str(train_setup["stage"]), "--out", str(tmp_path / "r"), "--nproc", str(nproc)]
    for override in overrides:
        for name, path in mixtures.items():
            override = override.replace(name, str(path))
            message = message.replace(name, str(path))
        argv += ["--set", override]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_run_that_diverges_stops_with_an_error(train_setup, tmp_path):
    command = _train_command(
        train_setup["stage"], tmp_path / "diverged", "--set", "optim.lr=1e30",
        "--set", "optim.max_nonfinite_steps=2",
    )  # fmt: skip
    done = _run(command)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "2 steps in a row had a loss or gradient that is not finite" in done.stderr
    assert "Traceback" not in done.stderr
    skipped = [r for r in read_metrics(tmp_path / "diverged" / "metrics.jsonl") if r["skipped"]]
    assert len(skipped) >= 1


@pytest.mark.parametrize("damage", ["shard deleted", "shard cut", "metadata cut"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, caplog, damage):
    import torch.distributed.checkpoint as dcp

    from longvita.train.run_dir import RunDirectory

    run = RunDirectory(tmp_path)
    for step in (2, 4):
        state = {"app": {"w": torch.full((1000,), float(step)), "step": step}}
        dcp.save(state, checkpoint_id=str(run.step_dir(step)), no_dist=True)
    newest = run.step_dir(4)
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    if damage == "shard deleted":
        shard.unlink()
    elif damage == "shard cut":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (newest / ".metadata").write_bytes((newest / ".metadata").read_bytes()[:50])
    assert run.latest_checkpoint() == run.step_dir(2)
    assert "step-4 is damaged" in caplog.text


def test_a_run_directory_in_use_or_foreign_is_refused_before_any_process(
    train_setup, tmp_path, capsys, monkeypatch
):
    from longvita.train.run_dir import RunDirectory

    _forbid_launch(monkeypatch)
    out = tmp_path / "run"
    with RunDirectory(out).locked():  # another job holds it
        assert main(["train", str(train_setup["stage"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another longvita train (pid {os.getpid()})" in err
    assert err.count("\n") == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["train", str(train_setup["stage"]), "--out", str(tmp_path / "mine")]) == 2
    assert "is not empty and not a run directory" in capsys.readouterr().err


def test_a_run_resumed_at_or_past_its_steps(train_setup, finished_run, tmp_path):
    import shutil

    run = tmp_path / "again"
    shutil.copytree(finished_run, run)
    done = _run(_train_command(train_setup["stage"], run))  # at its 6 steps: nothing to do
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["step"] == 6 and summary["checkpoint"].endswith("step-6")
    assert summary["final_loss"] == _losses(finished_run)[6]
    assert "nothing to train" in done.stderr
    done = _run(_train_command(train_setup["stage"], run, "--set", "schedule.steps=4"))
    assert done.returncode == 2 and "past schedule.steps=4: give at least 6" in done.stderr


def test_a_second_ctrl_c_waits_for_a_checkpoint_being_written():
    from longvita.train.loop import StopRequest

    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)  # the first: checkpoint after the step, then stop
        assert stop.requested
        stop.saving = True
        signal.raise_signal(signal.SIGINT)  # while writing: the checkpoint finishes first
        stop.saving = False
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # otherwise: at once


def test_export_of_a_running_run_takes_the_newest_checkpoint_left(
    finished_run, tmp_path, monkeypatch
):
    """keep_latest of a run still training may delete the checkpoint an export is reading."""
    import shutil

    from longvita.train import export

    run = tmp_path / "running"
    shutil.copytree(finished_run, run)
    read = export.load_model_weights

    def deleted_while_read(checkpoint, model):
        if checkpoint.name == "step-6":
            shutil.rmtree(checkpoint)
            raise FileNotFoundError(checkpoint / ".metadata")
        read(checkpoint, model)

    monkeypatch.setattr(export, "load_model_weights", deleted_while_read)
    _, _, checkpoint = export.load_checkpoint_model(run)
    assert checkpoint.name == "step-4"
    shutil.copytree(finished_run / "checkpoints" / "step-6", run / "checkpoints" / "step-6")
    with pytest.raises(ValueError, match="step-6 was deleted while being read"):
        export.load_checkpoint_model(run / "checkpoints" / "step-6")
