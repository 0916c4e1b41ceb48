"""`longvita train` and `longvita export`: arguments, the checks done before any process
starts, launching the ranks, and what is printed.

Owns the command line of training only; `longvita.cli` wires `add_parsers` in. A stage file
with an unknown key, a wrong type, a batch that does not divide over the data-parallel ranks,
a cp that does not divide the processes, a missing init or mixture file: one line naming the
key, before any process starts (StageConfigError, a ValueError).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

EXIT_STOPPED = 130
"""`longvita train` stopped by a signal after writing its checkpoint (rerun to resume)."""
SHUTDOWN_GRACE_S = 600.0
"""How long ranks may take to checkpoint after Ctrl-C before they are killed."""


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a stage (a YAML file) into a run directory; rerun to resume",
        description=(
            "Train one Long-VITA stage described by a YAML file (longvita/configs/: the four "
            "official stages and tiny ones that run on a laptop) into RUN_DIR: metrics.jsonl, "
            "distributed checkpoints, loss.png. Rerunning the same command resumes from the "
            "latest complete checkpoint. --nproc N starts N local processes (gloo on CPU, "
            "NCCL on GPUs); under torchrun the job's processes are used. SIGTERM or Ctrl-C "
            "writes a checkpoint after the step in progress, then stops."
        ),
        epilog="example: longvita train longvita/configs/tiny/stage1.yaml --out runs/s1 "
        "--set schedule.steps=50 --nproc 2 (the tiny stages read the data of `longvita data "
        "synth --out runs/demo/data`, and stages 1-4 start from the run before: `longvita "
        "demo train` makes both; docs/training.md)",
    )
    p.add_argument("stage", metavar="STAGE.yaml", help="the stage file")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the stage file, e.g. optim.lr=1e-4 (repeatable)",
    )
    p.add_argument("--nproc", type=int, default=1, help="local processes (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: one GPU per process")
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="collective timeout in seconds (1800)"
    )
    p.set_defaults(func=run_train)

    e = subparsers.add_parser(
        "export",
        help="write a training checkpoint as an official Long-VITA checkpoint directory",
        description=(
            "Write the model of RUN_DIR's latest complete checkpoint (or of "
            "RUN_DIR/checkpoints/step-N) as config.json + safetensors + tokenizer, the layout "
            "longvita.load and the official code read."
        ),
        epilog="example: longvita export runs/stage4 --out Long-VITA-mine_HF --dtype bfloat16",
    )
    e.add_argument(
        "checkpoint",
        metavar="RUN_DIR[/checkpoints/step-N]",
        help="a run directory (its latest complete checkpoint) or one of its checkpoints",
    )
    e.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory")
    e.add_argument("--dtype", default=None, help="of the weights (default: as trained)")
    e.set_defaults(func=run_export)


def check_before_launch(args: argparse.Namespace):
    """The stage, validated against the world it will run on; ValueError naming the key."""
    from longvita.runtime import resolve_device
    from longvita.train.config import StageConfig
    from longvita.train.init import InitSpec
    from longvita.train.run_dir import RunDirectory

    stage = StageConfig.from_yaml(args.stage, args.set)
    world_size = int(os.environ.get("WORLD_SIZE", args.nproc))
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    stage.check_world(world_size)
    resolve_device(args.device)
    run = RunDirectory(args.out)
    run.check_usable()
    if run.latest_checkpoint() is None:  # a new run needs its init weights
        InitSpec.from_dict(stage.init).check_paths()
    check_mixture(stage)
    return stage, world_size


def check_mixture(stage) -> None:
    """The stage's mixture file: its values, and that its data files exist where
    `build_loader` will look (the ranks read them)."""
    from longvita.data.mixture import MixtureConfig, check_data_files, data_root_of
    from longvita.train.config import StageConfigError

    mixture = stage.resolve(stage.data.mixture)
    if not mixture.is_file():
        raise StageConfigError(f"data.mixture: {mixture} does not exist")
    root = stage.resolve(stage.data.data_root) if stage.data.data_root else None
    try:
        check_data_files(MixtureConfig.from_yaml(mixture), data_root_of(mixture, root))
    except ValueError as err:
        raise StageConfigError(f"data.mixture: {err}") from None


def run_train(args: argparse.Namespace) -> int:
    from longvita.parallel.launch import launch
    from longvita.train.loop import run_training
    from longvita.train.run_dir import RunDirectory

    stage, world_size = check_before_launch(args)
    first = int(os.environ.get("RANK", "0")) == 0  # the job's first process (torchrun too)
    with RunDirectory(args.out).locked() if first else contextlib.nullcontext():
        result = launch(  # one job per run directory
            run_training,
            cp=stage.parallel.cp,
            world_size=world_size,
            args=(stage, str(Path(args.out).resolve())),
            device=args.device,
            timeout_s=args.timeout,
            grace_s=SHUTDOWN_GRACE_S,
        )
    if result is None:  # a non-main rank of a torchrun job
        return 0
    print(json.dumps(vars(result)), file=sys.stdout)
    if result.stopped:
        print(
            f"stopped at step {result.step} after writing {result.checkpoint}; rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    return 0


def run_export(args: argparse.Namespace) -> int:
    from longvita.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype)
    print(out)
    return 0
