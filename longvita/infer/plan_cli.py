"""`longvita plan`: the memory per device a generation needs, before running it.

Owns the subcommand's arguments and output; the numbers come from `infer.plan`. Reads only the
checkpoint's config.json (no weights, no tokenizer), so it runs anywhere in a second. `cli.py`
wires `add_parser` into the `longvita` command.
"""

from __future__ import annotations

import argparse
import json

import torch

from longvita.assets import resolve_model_dir
from longvita.config import LongVITAConfig
from longvita.infer.plan import (
    DEFAULT_TEXT_TOKENS,
    count_prompt_tokens,
    plan_memory,
    plan_summary,
)
from longvita.infer.request import DEFAULT_PREFILL_CHUNK, DEFAULT_VISION_BATCH
from longvita.runtime import KV_CACHE_DTYPES, resolve_dtype, resolve_kv_cache_dtype

EXIT_REFUSED = 1
"""Exit status when the plan says the prompt would be refused."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `plan` to the `longvita` subcommands."""
    p = subparsers.add_parser(
        "plan",
        help="print the memory per device (weights, KV cache, activations) of a prompt",
        description=(
            "Estimate the memory per device of one generation from the checkpoint's config.json "
            "alone: weights, KV cache and peak prefill activations, for a prompt of --frames "
            "video frames, --images images (counted at 12 tiles + thumbnail) and --text-tokens "
            "text tokens, or exactly --prompt-tokens tokens. Exits with status 1 when the "
            "prompt would be refused (more tokens than the model's positions)."
        ),
        epilog="example: longvita plan --model Long-VITA-1M_HF --frames 4096 --cp 8 --dtype bf16",
    )
    p.add_argument(
        "--model", required=True, help="checkpoint directory (reads config.json), or demo"
    )
    p.add_argument("--frames", type=int, default=0, help="video frames (default 0)")
    p.add_argument("--images", type=int, default=0, help="images (default 0)")
    p.add_argument(
        "--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="default: %(default)s"
    )
    p.add_argument(
        "--prompt-tokens", type=int, default=None, help="the prompt's tokens, instead of counts"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--cp", type=int, default=1, help="context-parallel devices (default 1)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16, float32")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="what the KV cache stores: auto (--dtype, the default), a float dtype, or int8 "
        "(quantized per token and head)",
    )
    p.add_argument(
        "--device-type", default="cuda", choices=["cuda", "cpu"], help="default: %(default)s"
    )
    p.add_argument(
        "--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="default: %(default)s"
    )
    p.add_argument(
        "--vision-batch", type=int, default=DEFAULT_VISION_BATCH, help="default: %(default)s"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args: argparse.Namespace) -> int:
    config = LongVITAConfig.from_pretrained(resolve_model_dir(args.model))
    tokens = args.prompt_tokens
    counted = {"--frames": args.frames, "--images": args.images}
    if args.text_tokens != DEFAULT_TEXT_TOKENS:
        counted["--text-tokens"] = args.text_tokens
    given = [flag for flag, value in counted.items() if value]
    if tokens is not None and given:
        raise ValueError(
            f"--prompt-tokens is the whole prompt: leave out {', '.join(given)} (or give the "
            "counts without --prompt-tokens)"
        )
    if tokens is None:
        tokens = count_prompt_tokens(
            config, frames=args.frames, images=args.images, text_tokens=args.text_tokens
        )
    dtype = resolve_dtype(args.dtype, torch.device(args.device_type))
    plan = plan_memory(
        config,
        num_prompt_tokens=tokens,
        max_new_tokens=args.max_new_tokens,
        cp=args.cp,
        dtype=dtype,
        kv_cache_dtype=resolve_kv_cache_dtype(args.kv_cache_dtype, dtype),
        prefill_chunk=args.prefill_chunk,
        vision_batch=args.vision_batch,
        has_tiles=args.prompt_tokens is not None or args.frames + args.images > 0,
        device_type=args.device_type,
    )
    limit = config.max_position_embeddings
    fits = tokens < limit
    trimmed = min(args.max_new_tokens, max(0, limit - tokens))
    if args.json:
        record = {**plan.to_dict(), "max_position_embeddings": limit, "fits": fits}
        print(json.dumps(record))
    else:
        print(plan_summary(plan))
        if not fits:
            print(
                f"refused: the {tokens:,}-token prompt does not fit the model's {limit:,} "
                "positions (config.json max_position_embeddings)"
            )
        elif trimmed < args.max_new_tokens:
            print(f"note: only {trimmed:,} new tokens fit the model's {limit:,} positions")
    return 0 if fits else EXIT_REFUSED
