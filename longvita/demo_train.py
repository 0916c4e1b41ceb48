"""`longvita demo train`: the demo model through Long-VITA's four stages, and what each did.

One command runs the recipe of docs/demo.md: synthetic curriculum data (`data.synth`, the train
split), the demo ViT pretrained to name renders (`demo_vision`, the stand-in for the pretrained
InternViT), the tiny stage files (`configs/tiny/stage{0..4}.yaml`: stage 0 the LLM alone on text,
standing in for the pretrained Qwen2.5 the official schema starts from; stage 1 the projector on
captions; stage 2 everything on image and short-video questions; stages 3-4 the LLM and projector
on 16-512 and 256-4,096-frame haystacks with context parallelism 2, stage 4 with the logits-masked
head), each with the ordinary trainer (`train.loop.run_training`, ranks started by
`parallel.launch`), then V-NIAH (`eval.vniah`) and short-context accuracy (single-image questions
of the test split) after stage 2 and after stage 4. Writes OUT/report.json and OUT/report.md (wall
times, accuracies, the heatmaps), exports OUT/model in the official layout and, with `install`,
copies it to `longvita.DEMO_MODEL`. Rerunning resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from longvita.data.synth import DIGITS, LETTERS, SHAPES, Renderer, synthesize
from longvita.demo_vision import VisionPretraining
from longvita.eval.vniah import TEST_SEED

STAGE_FILES = Path(__file__).resolve().parent / "configs" / "tiny"
DATA_DONE = ".complete"
VISION_DIR = "vision"
TOWER_DIR = "vision-tower"
STAGES = (0, 1, 2, 3, 4)
"""Stage 0 stands in for the pretrained LLM the official stage 1 starts from (`demo_vision` for
its pretrained ViT)."""
VNIAH_HAYSTACKS = 5
"""Rendered haystacks per length in the demo's V-NIAH: with one, a single letter the model takes
for a digit fails most of a row (model r7: 76%, 100% and 100% at 4,096 frames on the haystacks
of three seeds; benchmarks/results/demo_model.md)."""
SHORT_QUESTIONS = 200
"""Single-image questions of the short-context check."""


def stage_file(stage: int) -> Path:
    return STAGE_FILES / f"stage{stage}.yaml"


def stage_overrides(stage: int, out: Path) -> list[str]:
    """Where stage `stage` finds its data and weights under `out` (the files assume runs/demo)."""
    data = out / "data"
    overrides = [f"data.mixture={data / f'stage{stage}' / 'mixture.yaml'}"]
    if stage == 0:
        overrides.append(f"init={{from: {out / VISION_DIR}}}")
    else:
        overrides.append(f"init={{from: {out / f'stage{stage - 1}'}}}")
    return overrides


def make_data(out: Path, *, scale: float, seed: int = 0) -> Path:
    """The train split under out/data, written once (a marker says it is complete)."""
    data = out / "data"
    if not (data / DATA_DONE).is_file():
        shutil.rmtree(data, ignore_errors=True)
        synthesize(data, seed=seed, scale=scale)
        (data / DATA_DONE).write_text(json.dumps({"scale": scale, "seed": seed}))
    return data


def make_data_and_vision(out: Path, *, scale: float, spec: VisionPretraining) -> dict:
    """The train split (`make_data`) and the pretrained-ViT stand-in under out/vision, each made
    once. The ViT trains in a process of its own while the data is rendered (it needs nothing of
    the run's data, and each takes one core); its export waits for the data's tokenizer and is
    rewritten whenever the ViT was trained here. Returns the ViT's report and the wall seconds of
    the data and of both."""
    from longvita.demo_vision import REPORT, pretrain_tower, write_vision_model

    start = time.perf_counter()
    tower = out / TOWER_DIR
    trainer = None
    if not (tower / REPORT).is_file():
        trainer = multiprocessing.get_context("spawn").Process(
            target=pretrain_tower, args=(tower, spec), name="demo-vision-pretraining"
        )
        trainer.start()
    try:
        make_data(out, scale=scale)
        data_seconds = time.perf_counter() - start
        if trainer is not None:
            trainer.join()
            if trainer.exitcode != 0:
                raise RuntimeError(
                    f"vision pretraining failed (exit code {trainer.exitcode}); its error is "
                    "printed above. Rerun the same command to retry it (the data is kept)."
                )
    finally:
        if trainer is not None and trainer.is_alive():
            trainer.terminate()
            trainer.join()
    if trainer is not None or not (out / VISION_DIR / "config.json").is_file():
        write_vision_model(out / VISION_DIR, tower, out / "data" / "tokenizer", spec.seed)
    report = json.loads((tower / REPORT).read_text())
    return {
        "vision": report,
        "data_seconds": round(data_seconds, 1),
        "data_and_vision_seconds": round(time.perf_counter() - start, 1),
    }


def _say(message: str) -> None:
    """Progress of the recipe on stderr, whatever the logging level."""
    print(f"demo train: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _environment_default(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` unless the user set it, and unset again afterwards."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def train_stage(stage: int, out: Path, extra: list[str] = ()) -> dict:
    """Train one stage into out/stageN (resuming if it was interrupted); its summary."""
    from longvita.parallel.launch import launch
    from longvita.train.config import StageConfig
    from longvita.train.loop import run_training

    config = StageConfig.from_yaml(stage_file(stage), [*stage_overrides(stage, out), *extra])
    world_size = config.parallel.cp  # one data-parallel group: the demo runs on one machine
    config.check_world(world_size)
    start = time.perf_counter()
    result = launch(
        run_training,
        cp=config.parallel.cp,
        world_size=world_size,
        args=(config, str(out / f"stage{stage}")),
        timeout_s=1800,
    )
    return {**asdict(result), "seconds": round(time.perf_counter() - start, 1)}


def export(out: Path, stage: int, name: str) -> Path:
    from longvita.train.export import export_checkpoint

    return export_checkpoint(out / f"stage{stage}", out / name)


def short_context_accuracy(model_dir: Path, *, seed: int = TEST_SEED + 7) -> dict[str, float]:
    """Exact-match accuracy on single-image questions about test renders: "what digit / letter
    / shape is this?" (SHORT_QUESTIONS, the kinds in turn: `short_context_accuracy`, and each
    kind's) and "what colour is it?" of the same images (`colour`)."""
    import longvita

    pipe = longvita.load(model_dir)
    renderer = Renderer(seed)
    kinds = {"digit": DIGITS, "letter": LETTERS, "shape": SHAPES}
    right = dict.fromkeys([*kinds, "colour"], 0)
    asked = dict.fromkeys(kinds, 0)
    for k in range(SHORT_QUESTIONS):
        kind = list(kinds)[k % len(kinds)]
        values = kinds[kind]
        item = renderer.item(kind, values[k % len(values)])
        image = renderer.render(item)
        answer = pipe.generate(f"<image>\nWhat {kind} is this?", images=[image], max_new_tokens=4)
        colour = pipe.generate("<image>\nWhat colour is it?", images=[image], max_new_tokens=4)
        asked[kind] += 1
        right[kind] += answer.text.strip() == item.value
        right["colour"] += colour.text.strip() == item.colour
    return {
        "short_context_accuracy": sum(right[kind] for kind in kinds) / SHORT_QUESTIONS,
        **{f"short_context_{kind}": right[kind] / asked[kind] for kind in kinds},
        "short_context_colour": right["colour"] / SHORT_QUESTIONS,
    }


def evaluate(model_dir: Path, out: Path, frames: tuple[int, ...], needles: int) -> dict:
    """V-NIAH (results.json + heatmap.png under `out`) and the short-context accuracy."""
    import longvita
    from longvita.eval.vniah import (
        PipelineAnswerer,
        VniahConfig,
        rendered_haystack,
        run_vniah,
        write_report,
    )

    config = VniahConfig(frames=frames, needles=needles, haystacks=VNIAH_HAYSTACKS)
    answerer = PipelineAnswerer(longvita.load(model_dir))
    cells = run_vniah(answerer, config, haystack_frames=rendered_haystack(config.seed))
    report = write_report(cells, config, out, title=f"V-NIAH {model_dir.name}")
    return {
        "vniah_accuracy": report["accuracy"],
        "vniah_by_frames": report["accuracy_by_frames"],
        **short_context_accuracy(model_dir),
    }


def run_demo_training(
    out: str | Path,
    *,
    scale: float = 1.0,
    frames: tuple[int, ...] = (16, 64, 256, 1024, 4096),
    needles: int = 20,
    extra: list[str] = (),
    stage_extra: dict[int, list[str]] | None = None,
    vision: VisionPretraining | None = None,
    evaluate_stages: bool = True,
    install: bool = False,
) -> dict:
    """The whole recipe into `out`; returns (and writes as report.json / report.md) what each
    stage took and what the model could do after stage 2 and after stage 4.

    extra: `--set` overrides for every stage; stage_extra: more for some stages ({3: [...]});
    vision: the pretrained-ViT stand-in's recipe (default `VisionPretraining()`).
    """
    # one compute thread per rank: each stage's data worker takes the other core (a tiny model's
    # steps are many small kernels, which two contended OpenMP threads make several times slower)
    with _environment_default("OMP_NUM_THREADS", "1"):
        out = Path(out).resolve()
        report: dict = {"stages": {}, "evaluations": {}}
        start = time.perf_counter()
        _say("rendering the data, pretraining the vision tower (for InternViT)")
        report.update(make_data_and_vision(out, scale=scale, spec=vision or VisionPretraining()))
        for stage in STAGES:
            _say(f"training stage {stage}")
            overrides = [*extra, *(stage_extra or {}).get(stage, [])]
            report["stages"][stage] = train_stage(stage, out, overrides)
            if stage in (2, 4):
                name = "after-stage2" if stage == 2 else "model"
                model = export(out, stage, name)
                if evaluate_stages:
                    _say(f"evaluating {name}")
                    report["evaluations"][name] = evaluate(
                        model, out / f"vniah-{name}", frames, needles
                    )
        report["schema_seconds"] = round(
            report["data_and_vision_seconds"]
            + sum(s["seconds"] for s in report["stages"].values()),
            1,
        )
        report["total_seconds"] = round(time.perf_counter() - start, 1)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(report_markdown(report))
        if install:
            install_model(out / "model")
        return report


def install_model(model: Path) -> Path:
    """Copy an exported model into the package as the demo model (`longvita.DEMO_MODEL`)."""
    from longvita.assets import DEMO_MODEL

    shutil.rmtree(DEMO_MODEL, ignore_errors=True)
    shutil.copytree(model, DEMO_MODEL)
    return DEMO_MODEL


def report_markdown(report: dict) -> str:
    lines = ["# Demo model: the four stages", "", "| stage | steps | final loss | seconds |",
             "|---|---|---|---|"]  # fmt: skip
    for stage, summary in report["stages"].items():
        loss = summary["final_loss"]
        lines.append(f"| {stage} | {summary['step']} | {loss:.4f} | {summary['seconds']} |")
    vision = report["vision"]
    lines += ["", f"Vision tower (the stand-in for InternViT): {vision['seconds']} s; test renders "
              f"named right {100 * vision['test_class_accuracy']:.1f}%, colours "
              f"{100 * vision['test_colour_accuracy']:.1f}%, digit or not "
              f"{100 * vision['test_digit_accuracy']:.2f}%.{needle_estimate(vision)}"]  # fmt: skip
    lines += ["", f"Data {report['data_seconds']} s, the vision tower trained alongside (both "
              f"{report['data_and_vision_seconds']} s); the schema (data, tower and stages) "
              f"{report['schema_seconds']} s, in all (evaluations included) "
              f"{report['total_seconds']} s.", ""]  # fmt: skip
    for name, evaluation in report["evaluations"].items():
        by_frames = ", ".join(
            f"{f}: {100 * a:.1f}%" for f, a in evaluation["vniah_by_frames"].items()
        )
        lines += [f"## {name}", "",
                  f"- V-NIAH: {100 * evaluation['vniah_accuracy']:.1f}% ({by_frames})",
                  f"- short context (single-image questions): "
                  f"{100 * evaluation['short_context_accuracy']:.1f}%{short_kinds(evaluation)}",
                  f"- heatmap: vniah-{name}/heatmap.png", ""]  # fmt: skip
    return "\n".join(lines)


def needle_estimate(vision: dict) -> str:
    """The digit head's needle estimate of a ViT report as a sentence; "" without one."""
    shares = vision.get("digit_head_finds_needle")
    if not shares:
        return ""
    rows = ", ".join(f"{100 * share:.2f}% at {int(frames):,}" for frames, share in shares.items())
    return f" Needles its digit head alone ranks first among fresh letters: {rows} frames."


def short_kinds(evaluation: dict) -> str:
    """Each kind's accuracy in an evaluation, as " (digit 100%, letter 80%, ...)"; "" for a
    report from before the kinds were counted."""
    parts = [
        f"{kind} {100 * evaluation[key]:.0f}%"
        for kind in ("digit", "letter", "shape", "colour")
        if (key := f"short_context_{kind}") in evaluation
    ]
    return f" ({', '.join(parts)})" if parts else ""
