"""`longvita eval vniah` (and the other evaluations): arguments, the ranks, what is printed.

Owns the command line of evaluation; `longvita.cli` wires `add_parsers` in. The work is in
`eval.vniah` (and `eval.mcq`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser(
        "eval", help="evaluate a model", description="Evaluate a Long-VITA model."
    )
    sub = group.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "vniah",
        help="visual needle in a haystack: a digit among up to thousands of frames",
        description=(
            "LongVA's V-NIAH protocol: a needle frame (a rendered digit, test split) at each "
            "depth of haystacks of each length (rendered letters, or frames sampled evenly "
            "from --haystack), asked 'What digit appears in the video?', scored by exact match "
            "(or the digits' next-token logits with --teacher-forced). Each haystack is "
            "encoded by the vision tower once and reused at every depth. Writes "
            "OUT/results.json and OUT/heatmap.png."
        ),
        epilog="example: longvita eval vniah --model demo --out runs/vniah --frames 16 256 4096",
    )
    p.add_argument("--model", required=True, help="checkpoint directory, or demo")
    p.add_argument("--out", required=True, help="where results.json and heatmap.png go")
    p.add_argument("--frames", type=int, nargs="+", default=None,
                   help="haystack lengths (default 16 64 256 1024 4096)")  # fmt: skip
    p.add_argument("--depths", type=float, nargs="+", default=None,
                   help="needle depths, 0 the first frame (default 0 0.25 0.5 0.75 1)")  # fmt: skip
    p.add_argument("--needles", type=int, default=20, help="questions per cell (default 20)")
    p.add_argument(
        "--haystacks",
        type=int,
        default=1,
        help="rendered haystacks per length; needle n goes into haystack n %% N (default 1)",
    )
    p.add_argument("--haystack", default=None, help="a video (file or frame directory)")
    p.add_argument("--seed", type=int, default=None,
                   help="the test renders' seed (default: the test split's, which no training "
                   "split uses)")  # fmt: skip
    p.add_argument("--teacher-forced", action="store_true", help="score by next-token logits")
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default=None, help="default: fp32 on CPU, bf16 on GPU")
    p.set_defaults(func=run_vniah_command)
    add_mcq_parser(sub)


def vniah_config(args: argparse.Namespace):
    from longvita.eval.vniah import DEFAULT_DEPTHS, DEFAULT_FRAMES, TEST_SEED, VniahConfig

    return VniahConfig(
        frames=tuple(args.frames or DEFAULT_FRAMES),
        depths=tuple(args.depths if args.depths is not None else DEFAULT_DEPTHS),
        needles=args.needles,
        haystacks=args.haystacks,
        seed=TEST_SEED if args.seed is None else args.seed,
        haystack=args.haystack,
        teacher_forced=args.teacher_forced,
    )


def run_vniah_command(args: argparse.Namespace) -> int:
    from longvita.assets import resolve_model_dir
    from longvita.parallel.launch import launch

    config = vniah_config(args)  # bad values fail here, before any process starts
    check_out_dir(args.out)
    model_dir = resolve_model_dir(args.model)
    if args.haystack is not None and not Path(args.haystack).exists():
        raise ValueError(f"--haystack {args.haystack} does not exist")
    report = launch(
        _vniah_on_rank,
        cp=args.cp,
        args=(str(model_dir), config, args.out, args.dtype),
        device=args.device,
    )
    if report is None:  # a non-main rank of a torchrun job
        return 0
    rows = {f: v for f, v in report["accuracy_by_frames"].items()}
    print(json.dumps({"accuracy": report["accuracy"], "accuracy_by_frames": rows}))
    print(f"wrote {Path(args.out) / 'results.json'} and heatmap.png", file=sys.stderr)
    return 0


def _vniah_on_rank(state, model_dir: str, config, out: str, dtype: str | None) -> dict | None:
    import longvita
    from longvita.eval.vniah import (
        PipelineAnswerer,
        rendered_haystack,
        run_vniah,
        video_haystack,
        write_report,
    )

    pipe = longvita.load(model_dir, device=state.device, dtype=dtype)
    answerer = PipelineAnswerer(pipe, state=state if state.cp_size > 1 else None)
    answerer.check_lengths(config.frames, config.question)  # before a frame is encoded
    if config.haystack is None:
        haystack = rendered_haystack(config.seed)
    else:
        haystack = video_haystack(config.haystack, max_pixels=pipe.processor.max_pixels)
    progress = None
    if state.is_main and sys.stderr.isatty():
        from tqdm import tqdm

        progress = lambda cells: tqdm(cells, desc="vniah", unit="cell", file=sys.stderr)  # noqa: E731
    cells = run_vniah(answerer, config, haystack_frames=haystack, progress=progress)
    if not state.is_main:
        return None
    return write_report(cells, config, Path(out), title=f"V-NIAH {Path(model_dir).name}")


def add_mcq_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mcq",
        help="multiple-choice questions about images and videos from a local JSONL file",
        description=(
            "Multiple-choice questions in the Video-MME / MVBench shape, one JSON object per "
            'line: {"id", "question", "options": [...], "answer": "B", "category"?, "image"? | '
            '"video"?}. Scored by the option letter extracted from a generated answer and by '
            "the likelihood of each option's text. Malformed lines are skipped, counted and "
            "reported. Writes OUT/answers.jsonl (also the cache: a rerun answers only what is "
            "missing) and OUT/results.json."
        ),
        epilog="example: longvita eval mcq questions.jsonl --model demo --out runs/mcq",
    )
    p.add_argument("file", help="the questions, JSONL")
    p.add_argument("--model", required=True, help="checkpoint directory, or demo")
    p.add_argument("--out", required=True, help="where answers.jsonl and results.json go")
    p.add_argument("--media-root", default=None, help="media paths are relative to this")
    p.add_argument("--max-frames", type=int, default=None, help="frames per video")
    p.add_argument("--fps", type=float, default=None, help="video frames per second (default 1)")
    p.add_argument(
        "--scoring", choices=("both", "letter", "likelihood"), default="both", help="default both"
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="per answer (default 16)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks (letter scoring)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default=None, help="default: fp32 on CPU, bf16 on GPU")
    p.set_defaults(func=run_mcq_command)


def check_out_dir(out: str) -> None:
    """ValueError before any work when `--out` cannot be the results' directory."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")


def run_mcq_command(args: argparse.Namespace) -> int:
    from longvita.assets import resolve_model_dir
    from longvita.eval.harness import HarnessModel
    from longvita.eval.mcq import McqSettings, load_questions, run_mcq

    path = Path(args.file)
    if not path.is_file():
        raise ValueError(f"{path} is not a file: give the questions' JSONL file")
    if args.media_root is not None and not Path(args.media_root).is_dir():
        raise ValueError(f"--media-root {args.media_root} is not a directory")
    if args.cp > 1 and args.scoring != "letter":
        raise ValueError(f"--cp {args.cp} needs --scoring letter (likelihood runs in one process)")
    check_out_dir(args.out)
    model_dir = resolve_model_dir(args.model)
    model_id = f"{model_dir.resolve()} max_frames={args.max_frames} fps={args.fps}"
    settings = McqSettings(
        scoring=args.scoring, max_new_tokens=args.max_new_tokens, model_id=model_id
    )
    questions, skipped = load_questions(path, media_root=args.media_root)
    for line in skipped:
        print(f"{line.where}: skipped: {line.reason}", file=sys.stderr)
    if not questions:
        raise ValueError(
            f"{path}: no well-formed question ({len(skipped)} line(s) skipped); give one JSON "
            "object per line (JSONL)"
        )
    model = HarnessModel.load(
        model_dir,
        device=args.device,
        dtype=args.dtype,
        max_frames=args.max_frames,
        fps=args.fps,
        cp=args.cp,
    )
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        progress = lambda items: tqdm(items, desc="mcq", unit="question", file=sys.stderr)  # noqa: E731
    try:
        report = run_mcq(model, questions, Path(args.out), settings, skipped=skipped,
                         progress=progress)  # fmt: skip
    finally:
        model.close()
    shown = {key: report[key] for key in ("accuracy", "letter_accuracy", "likelihood_accuracy",
                                          "n", "skipped")}  # fmt: skip
    print(json.dumps(shown))
    if report["from_cache"]:
        print(f"{report['from_cache']} of {report['n']} answers came from an earlier run's "
              "answers.jsonl (same questions, model and settings); delete it to ask again",
              file=sys.stderr)  # fmt: skip
    print(f"wrote {Path(args.out) / 'results.json'} and answers.jsonl", file=sys.stderr)
    return 0
