"""The `longvita` command: generate, plan, data, train, export, eval, serve, demo.

Owns argument parsing, what is printed, and how a run ends: a user error (a missing file, a
bad setting, a prompt that does not fit, a device this machine lacks) is one line on stderr and
exit status 2; a failed context-parallel rank is one line (its traceback with -v) and status 1;
Ctrl-C ends every rank and exits with 130 without a traceback. Warnings of the libraries
underneath go through logging (shown with -v). All work is done by the library.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence

from longvita.logs import configure_logging

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Turn the two characters `\n` (and `\t`, `\\`) into the characters they name.

    So `--prompt "<image>\nWhat is this?"` works from a shell, where "\n" stays two characters.
    """
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def argument_text(value: str, flag: str) -> str:
    """A command-line string checked to be valid UTF-8 (argv bytes that are not decode to lone
    surrogates); ValueError naming the flag and the offending byte otherwise."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raw = os.fsencode(value)
        bad = os.fsencode(value[err.start : err.end])
        raise ValueError(
            f"{flag} is not valid UTF-8: byte(s) {bad!r} at byte {raw.find(bad)}; pass UTF-8 "
            "text, or put the prompt in a file (--prompt-file)"
        ) from None
    return value


def read_text_file(path: str, flag: str) -> str:
    """The UTF-8 text of `path` ("-" = standard input); ValueError naming the flag otherwise."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()  # noqa: SIM115
    except OSError as err:
        raise ValueError(f"{flag} {path!r}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{flag} {path!r} is not valid UTF-8: byte {data[err.start : err.start + 1]!r} at "
            f"byte {err.start}"
        ) from None


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from longvita.runtime import KV_CACHE_DTYPES

    p = sub.add_parser(
        "generate",
        help="answer a prompt about images and videos",
        description=(
            "Answer one prompt with a Long-VITA checkpoint. Put one <image> tag per --image and "
            "one <video> tag per --video in the prompt, in order; '\\n' in --prompt is a "
            "newline (a --prompt-file is taken as is). Greedy by default (--temperature 0)."
        ),
        epilog='example: longvita generate --model Long-VITA-16K_HF --prompt "<image>\\nWhat is '
        'this?" --image cat.png --json',
    )
    p.add_argument(
        "--model", required=True, help="checkpoint directory (official HF layout), or demo"
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the user turn, with <image>/<video> tags")
    prompt.add_argument(
        "--prompt-file",
        metavar="PATH",
        help="read the user turn from a UTF-8 file ('-' = standard input): long prompts",
    )
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
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop sequence: the answer ends before it (repeat for several)",
    )
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
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse images and video frames with more pixels, from their headers (default "
        "89,478,485: Pillow's limit); frames above 4K UHD are scaled down while decoded",
    )
    p.add_argument(
        "--prefix-cache",
        metavar="DIR",
        default=None,
        help="keep the prompt's keys and values in DIR and reuse the longest prefix found there "
        "(the next question about the same video skips decoding and prefilling it); a cache "
        "written at --cp N is used at the same N",
    )
    p.add_argument(
        "--prefix-cache-gib",
        type=float,
        default=64.0,
        help="size limit of --prefix-cache DIR in GiB, least recently used dropped (default 64)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 CPU, bf16 GPU)"
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="what the KV cache stores: auto (--dtype, the default), a float dtype, or int8 "
        "(quantized per token and head: 3.8x smaller than float32, for longer prompts)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_generate)


def generation_request(args: argparse.Namespace):
    """The GenerationRequest of `longvita generate`'s arguments."""
    from longvita.infer.request import GenerationRequest

    if args.prompt is not None:
        text = unescape(argument_text(args.prompt, "--prompt"))
    else:
        text = read_text_file(args.prompt_file, "--prompt-file")
    for flag, paths in (("--image", args.image), ("--video", args.video)):
        for path in paths:  # before the checkpoint loads: a typo should not cost minutes
            if not os.path.exists(path):
                raise ValueError(f"{flag} {path}: no such file or directory")
    messages = [{"role": "user", "content": text}]
    if args.system:
        system = unescape(argument_text(args.system, "--system"))
        messages.insert(0, {"role": "system", "content": system})
    chunking = {"prefill_chunk": args.prefill_chunk, "vision_batch": args.vision_batch}
    return GenerationRequest.create(
        messages,
        args.image,
        args.video,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=[unescape(argument_text(stop, "--stop")) for stop in args.stop],
        max_frames=args.max_frames,
        fps=args.fps,
        **{k: v for k, v in chunking.items() if v is not None},
    )


def run_generate(args: argparse.Namespace) -> int:
    from longvita.assets import resolve_model_dir

    request = generation_request(args)
    model = resolve_model_dir(args.model)
    options = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
    options.update(prefix_cache_options(args), kv_cache_dtype=args.kv_cache_dtype)
    if args.cp < 1:
        raise ValueError(f"--cp must be >= 1, got {args.cp}")
    if args.cp > 1:
        from longvita.infer.cp_launch import generate_cp

        output = generate_cp(
            model, request, cp=args.cp, device=args.device, dtype=args.dtype, **options
        )
        if output is None:  # a non-main rank of a torchrun job: rank 0 prints
            return 0
    else:
        import longvita

        pipe = longvita.load(model, device=args.device, dtype=args.dtype, **options)
        stream = pipe.open(request)
        if not args.json:  # the answer as it comes
            for piece in stream:
                print(piece.text, end="", flush=True)
            print()
            return 0
        output = stream.run()
    print(json.dumps(output.to_record(), ensure_ascii=False) if args.json else output.text)
    return 0


def prefix_cache_options(args: argparse.Namespace) -> dict:
    """`longvita.load`'s prefix cache options of --prefix-cache / --prefix-cache-gib: one
    question per process, so only the directory is worth keeping."""
    if not args.prefix_cache_gib > 0:
        raise ValueError(f"--prefix-cache-gib must be > 0, got {args.prefix_cache_gib}")
    if args.prefix_cache is None:
        return {"prefix_cache_bytes": 0}
    return {
        "prefix_cache_bytes": 0,
        "prefix_cache_dir": args.prefix_cache,
        "prefix_cache_dir_bytes": int(args.prefix_cache_gib * 2**30),
    }


def build_parser() -> argparse.ArgumentParser:
    from longvita import __version__

    parser = argparse.ArgumentParser(
        prog="longvita",
        description="Run Long-VITA vision-language models on images and long videos.",
    )
    parser.add_argument("--version", action="version", version=f"longvita {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress and warnings to stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_subcommands(sub)
    _accept_verbose_everywhere(parser)
    return parser


def _add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Commands whose parsers live beside their code."""
    from longvita.data.inspect import add_parser as add_data_parser
    from longvita.demo import add_parser as add_demo_parser
    from longvita.eval.cli import add_parsers as add_eval_parsers
    from longvita.infer.plan_cli import add_parser as add_plan_parser
    from longvita.serve.cli import add_parser as add_serve_parser
    from longvita.train.cli import add_parsers as add_train_parsers

    add_plan_parser(sub)
    add_data_parser(sub)
    add_train_parsers(sub)
    add_eval_parsers(sub)
    add_serve_parser(sub)
    add_demo_parser(sub)


def _accept_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose after any subcommand too (`longvita generate -v ...`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                subparser.add_argument(
                    "-v",
                    "--verbose",
                    action="store_true",
                    default=argparse.SUPPRESS,  # keep a -v given before the subcommand
                    help="log progress and warnings to stderr",
                )
                _accept_verbose_everywhere(subparser)


_TOKENIZER_COMMANDS = ("generate", "data", "demo", "train", "export", "eval", "serve")
"""Commands that load a tokenizer (and import transformers)."""


def main(argv: Sequence[str] | None = None) -> int:
    from longvita.errors import RunError

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, route_transformers=args.command in _TOKENIZER_COMMANDS)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"longvita {_command_name(args)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:
        _print_error(args, err)
        return EXIT_USER_ERROR
    except RunError as err:  # a failed rank, a diverged run: its message says what happened
        _print_error(args, err)
        trace = getattr(err, "traceback", "")
        if args.verbose and trace:
            print(trace, file=sys.stderr)
        elif trace:
            print("(run with -v for the rank's traceback)", file=sys.stderr)
        return EXIT_RUN_FAILED


def _command_name(args: argparse.Namespace) -> str:
    """The command as typed, nested ones whole (`eval vniah`, `data inspect`, `demo train`)."""
    nested = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {nested}" if nested else args.command


def _print_error(args: argparse.Namespace, err: BaseException) -> None:
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"longvita {_command_name(args)}: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
