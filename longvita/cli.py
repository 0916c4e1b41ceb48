"""The `longvita` command: generate, plan, data inspect, demo.

Owns argument parsing, turning user errors into one line on stderr with a non-zero exit, and
what is printed. All work is done by the library (`longvita.load`, `Pipeline.generate`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence

EXIT_USER_ERROR = 2

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Turn the two characters `\n` (and `\t`, `\\`) into the characters they name.

    So `--prompt "<image>\nWhat is this?"` works from a shell, where "\n" stays two characters.
    """
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="answer a prompt about images and videos",
        description=(
            "Answer one prompt with a Long-VITA checkpoint. Put one <image> tag per --image and "
            "one <video> tag per --video in the prompt, in order; '\\n' in the prompt is a "
            "newline. Greedy by default (--temperature 0)."
        ),
        epilog='example: longvita generate --model Long-VITA-16K_HF --prompt "<image>\\nWhat is '
        'this?" --image cat.png --json',
    )
    p.add_argument("--model", required=True, help="checkpoint directory (official HF layout)")
    p.add_argument("--prompt", required=True, help="the user turn, with <image>/<video> tags")
    p.add_argument("--system", default=None, help="optional system turn (none by default)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument(
        "--video", action="append", default=[], help="video file or frame directory (repeatable)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, 1 = off (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--max-frames", type=int, default=None, help="frames per video (default 4096)")
    p.add_argument("--fps", type=float, default=None, help="video sampling rate (default 1)")
    p.add_argument(
        "--cp",
        type=int,
        default=1,
        help="context-parallel ranks: the prompt, tiles and KV cache are split over N processes "
        "started here (or the torchrun job's); default 1",
    )
    p.add_argument(
        "--prefill-chunk", type=int, default=None, help="prompt tokens per prefill step (4096)"
    )
    p.add_argument("--vision-batch", type=int, default=None, help="tiles per ViT forward (16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 CPU, bf16 GPU)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    prompt = unescape(args.prompt)
    messages = [{"role": "user", "content": prompt}]
    if args.system:
        messages.insert(0, {"role": "system", "content": unescape(args.system)})
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "max_frames": args.max_frames,
        "fps": args.fps,
    }
    options.update(_chunking(args))
    if args.cp < 1:
        raise ValueError(f"--cp must be >= 1, got {args.cp}")
    if args.cp > 1:
        record = _generate_cp(args, messages, options)
        if record is None:  # a non-main rank of a torchrun job: rank 0 prints
            return 0
    else:
        record = _generate_local(args, messages, options)
    print(json.dumps(record, ensure_ascii=False) if args.json else record["text"])
    return 0


def _chunking(args: argparse.Namespace) -> dict:
    chunking = {"prefill_chunk": args.prefill_chunk, "vision_batch": args.vision_batch}
    return {k: v for k, v in chunking.items() if v is not None}


def _generate_local(args: argparse.Namespace, messages: list, options: dict) -> dict:
    import longvita

    pipe = longvita.load(args.model, device=args.device, dtype=args.dtype)
    out = pipe.generate(messages, images=args.image, videos=args.video, **options)
    return {
        "text": out.text,
        "token_ids": out.token_ids,
        "prompt_tokens": out.prompt_tokens,
        "new_tokens": len(out.token_ids),
        "num_tiles": out.num_tiles,
        "image_grids": out.image_grids,
        "video_frames": out.video_frames,
        "stop_reason": out.stop_reason,
        "prefill_seconds": round(out.prefill_seconds, 4),
        "decode_seconds": round(out.decode_seconds, 4),
        "kv_cache_bytes": out.kv_cache_bytes,
    }


def _generate_cp(args: argparse.Namespace, messages: list, options: dict) -> dict | None:
    from longvita.parallel import generate_cp

    record = generate_cp(
        args.model,
        messages,
        args.image,
        args.video,
        cp=args.cp,
        device=args.device,
        dtype=args.dtype,
        **options,
    )
    if record is not None:
        record.pop("scores", None)
        for key in ("prefill_seconds", "decode_seconds"):
            record[key] = round(record[key], 4)
    return record


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a tiny random model and synthetic media",
        description=(
            "Build a tiny random checkpoint, a synthetic image and video, and run processing and "
            "generation on them, printing tiles, tokens, time and memory of each step. The "
            "weights are random: the generated text is noise."
        ),
    )
    p.add_argument("--output", default="demo_output", help="where to write (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="default: %(default)s")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from longvita.demo import run

    run(args.output, max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longvita",
        description="Run Long-VITA vision-language models on images and long videos.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_subcommands(sub)
    _add_demo(sub)
    return parser


def _add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Commands whose parsers live beside their code."""
    from longvita.data.inspect import add_parser as add_data_parser
    from longvita.infer.plan_cli import add_parser as add_plan_parser

    add_plan_parser(sub)
    add_data_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"longvita {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
