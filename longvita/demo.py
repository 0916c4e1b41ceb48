"""`longvita demo`: the shipped demo model answers questions about media it has never seen.

The demo model (`longvita.DEMO_MODEL`, trained by `longvita demo train` through the four
stages) is shown an image and a long video rendered now, from a seed no training data used:
a digit, a letter or a shape to name, and a digit hidden among a thousand frames of letters.
For each question the demo prints the question, the answer, the truth, and what it cost
(tokens, tiles, time). `longvita demo train` (docs/demo.md) trains the model again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from longvita.checks import check_int
from longvita.data.synth import DIGITS, LETTERS, NEEDLE_QUESTION, SHAPES, Renderer

DEMO_SEED = 424242


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the shipped demo model answers about an image and a long video it never saw",
        description=(
            "Render an image and a long video the demo model has never seen (a digit, a letter "
            "or a shape; a digit among --frames frames of letters), ask about them, and print "
            "question, answer and truth. `longvita demo train` trains the demo model through "
            "the four stages (15-30 minutes on a laptop CPU)."
        ),
    )
    p.add_argument("--model", default="demo", help="the model (default: the shipped demo)")
    p.add_argument("--output", default="demo_output", help="where the media go (%(default)s)")
    p.add_argument("--frames", type=int, default=1024, help="frames of the video (1024)")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="of the renders (%(default)s)")
    p.set_defaults(func=run_demo)
    sub = p.add_subparsers(dest="demo_command", metavar="COMMAND")
    t = sub.add_parser(
        "train",
        help="train the demo model through the four stages and evaluate it",
        description=(
            "Synthetic curriculum data; the ViT trained to name renders (the stand-in for the "
            "pretrained InternViT) and stage 0, the LLM on text (the stand-in for Qwen2.5); "
            "then stages 1-4 of configs/tiny with the ordinary trainer (stages 3-4 with "
            "context parallelism 2, stage 4 logits-masked), V-NIAH and short-context "
            "accuracy after stages 2 and 4; OUT/report.md says what each stage did. Rerun to "
            "resume. --install copies the result into the package as the demo model."
        ),
    )
    t.add_argument("--out", default="runs/demo", help="the run directory (%(default)s)")
    t.add_argument("--scale", type=float, default=1.0,
                   help="multiply each of the four stages' samples, not the ViT's (1)")  # fmt: skip
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of every stage file")  # fmt: skip
    t.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256, 1024, 4096],
                   help="V-NIAH haystack lengths")  # fmt: skip
    t.add_argument("--needles", type=int, default=20, help="V-NIAH questions per cell")
    t.add_argument("--no-eval", action="store_true", help="train only")
    t.add_argument("--install", action="store_true", help="make the result the shipped model")
    t.set_defaults(func=run_demo_train)


def run_demo_train(args: argparse.Namespace) -> int:
    from longvita.demo_train import run_demo_training

    report = run_demo_training(
        args.out,
        scale=args.scale,
        frames=tuple(args.frames),
        needles=args.needles,
        extra=args.set,
        evaluate_stages=not args.no_eval,
        install=args.install,
    )
    print((Path(args.out) / "report.md").read_text())
    return 0 if report else 1


def run_demo(args: argparse.Namespace) -> int:
    import longvita
    from longvita.assets import resolve_model_dir
    from longvita.data.synth import write_lossless_video

    check_int("--frames", args.frames, minimum=1)  # before the three image questions
    start = time.perf_counter()
    pipe = longvita.load(resolve_model_dir(args.model))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(args.seed)
    size = sum(p.numel() for p in pipe.model.parameters())
    print(f"longvita demo: {args.model} ({size:,} parameters, trained by longvita's four "
          f"stages); media rendered now (seed {args.seed}), never seen in training")  # fmt: skip
    right, asked = 0, 0
    for kind, values in (("digit", DIGITS), ("letter", LETTERS), ("shape", SHAPES)):
        item = renderer.item(kind, str(renderer.rng.choice(list(values))))
        path = output / f"{kind}.png"
        renderer.render(item).save(path)
        right += _ask(pipe, f"<image>\nWhat {kind} is this?", item.value, images=[path])
        asked += 1
    frames = [renderer.render(renderer.item("letter")) for _ in range(args.frames - 1)]
    needle = renderer.item("digit")
    depth = int(renderer.rng.integers(0, args.frames))
    frames.insert(depth, renderer.render(needle))
    video = write_lossless_video(output / "haystack.mkv", frames)
    print(f"\nvideo: {video} ({args.frames} frames, one second each; the digit is frame {depth})")
    right += _ask(pipe, f"<video>\n{NEEDLE_QUESTION}", needle.value, videos=[video])
    asked += 1
    seconds = time.perf_counter() - start
    print(f"\n{right} of {asked} right, in {seconds:.1f} s")
    return 0


def _ask(pipe, prompt: str, truth: str, **media) -> bool:
    out = pipe.generate(prompt, max_new_tokens=4, max_frames=8192, **media)
    answer = out.text.strip()
    mark = "right" if answer == truth else "WRONG"
    question = prompt.split("\n", 1)[1]
    print(f"\nQ: {question}  [{out.prompt_tokens} tokens, {out.num_tiles} tiles, "
          f"{out.prefill_seconds + out.decode_seconds:.2f} s]")  # fmt: skip
    print(f"A: {answer!r}   truth: {truth!r}   {mark}")
    return answer == truth
