"""`longvita serve`: the OpenAI-compatible server on a model directory, one process or a
context-parallel group (`--cp N`: rank 0 serves HTTP and drives the others).

Owns the command's flags and starting uvicorn; the API is `serve.app`, the model worker
`serve.worker`, what media are fetched `serve.media`. FastAPI and uvicorn come with the
`serve` extra (`pip install 'longvita[serve]'`, part of the default set-up).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from longvita.assets import DEMO_NAME
from longvita.infer.batch import DEFAULT_STEP_TOKENS
from longvita.infer.decode_pool import DEFAULT_POOL_TOKENS
from longvita.runtime import KV_CACHE_DTYPES

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  longvita serve --model demo
  longvita serve --model Long-VITA-16K_HF --allowed-local-media-path /data/videos
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'

Media: data: URLs always; local paths and file:// URLs only under --allowed-local-media-path;
http(s) URLs only with --allow-remote-media (public addresses, checked at every redirect).
Open http://HOST:PORT/ in a browser for the chat page.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat completions, streaming, batching)",
        description="Serve a model over OpenAI's chat-completions API: POST "
        "/v1/chat/completions (streamed or not), GET /v1/models, /health, /metrics, and a chat "
        "page at /. Concurrent requests are batched; a full server answers 503.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint directory, or demo")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model's name in the API (default: `demo` for the demo, else the directory's "
        "name; requests may also name the --model value as typed)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    p.add_argument(
        "--allowed-local-media-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory local media may be read from (repeatable; default none)",
    )
    p.add_argument(
        "--allow-remote-media",
        action="store_true",
        help="fetch http(s) media URLs (public addresses only)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LONGVITA_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LONGVITA_API_KEY)",
    )
    p.add_argument(
        "--trust-control-tokens",
        action="store_true",
        help="do not escape control tokens typed in messages (trusted clients)",
    )
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-batch", type=int, default=32, help="sequences per step (32)")
    limits.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting beyond --max-batch before 503 (64; 0: none wait)",
    )
    limits.add_argument(
        "--step-tokens",
        type=int,
        default=DEFAULT_STEP_TOKENS,
        help=f"tokens per batched forward ({DEFAULT_STEP_TOKENS}): long prompts "
        "are prefilled this much per step between others' tokens",
    )
    limits.add_argument(
        "--decode-pool-tokens",
        type=int,
        default=DEFAULT_POOL_TOKENS,
        help=f"longest sequence (prompt + answer) whose decode steps are batched in the decode "
        f"pool ({DEFAULT_POOL_TOKENS:,}; longer ones decode alone; 0: no pool; not under --cp)",
    )
    limits.add_argument(
        "--max-tokens", type=int, default=256, help="max_tokens of a request that gives none (256)"
    )
    limits.add_argument(
        "--max-frames",
        type=int,
        default=512,
        help="most frames per video a request may ask (512, also the default)",
    )
    limits.add_argument(
        "--max-media",
        type=int,
        default=256,
        help="most image and video parts per request (256; lmms-eval sends a video's frames as "
        "images)",
    )
    limits.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="most tokens per expanded prompt (default: the model's positions)",
    )
    limits.add_argument(
        "--max-body-mb", type=float, default=64.0, help="largest request body in MiB (64)"
    )
    limits.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse images and frames with more pixels (default 89,478,485)",
    )
    limits.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a request may take, arrival to last token (600)",
    )
    p.add_argument(
        "--prefix-cache-gib",
        type=float,
        default=None,
        help="memory in GiB kept for recent prompts' keys and values, reused by requests that "
        "start the same (another question about a video, the next turn); 0: off (default: a "
        "quarter of the free memory)",
    )
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the model, per rank under --cp (default: torch's, one per core; "
        "under --cp, the cores shared out). A small model on a few cores serves faster with "
        "fewer threads than cores: the HTTP side keeps a core (docs/serving.md)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="what the KV caches store: auto (--dtype, the default), a float dtype, or int8 "
        "(quantized per token and head: more or longer requests in the same memory)",
    )
    p.set_defaults(func=run_serve)
    return p


def served_name(model: str, model_dir: Path) -> str:
    """The API's name of `--model`: `demo` for the demo, else its directory's name (of the
    resolved path: `--model .` or `ckpt/` name the directory too)."""
    return DEMO_NAME if str(model) == DEMO_NAME else Path(model_dir).resolve().name


def settings_from_args(args: argparse.Namespace, model_dir):
    """The ServerSettings of the flags (ValueError naming a bad one)."""
    from longvita.processing.image import DEFAULT_MAX_PIXELS
    from longvita.serve.app import ServerSettings
    from longvita.serve.media import MediaPolicy

    for flag in ("max_batch", "step_tokens", "max_tokens", "max_frames", "max_media"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_queue < 0:  # 0: a 503 as soon as every slot is busy
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_body_mb <= 0 or args.timeout <= 0:
        raise ValueError("--max-body-mb and --timeout must be positive")
    if args.cp < 1:
        raise ValueError(f"--cp must be >= 1, got {args.cp}")
    if args.decode_pool_tokens < 0:
        raise ValueError(f"--decode-pool-tokens must be >= 0, got {args.decode_pool_tokens}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0-65535 (0: any free port), got {args.port}")
    policy = MediaPolicy(
        allowed_local_paths=tuple(args.allowed_local_media_path),
        allow_remote=args.allow_remote_media,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
    )
    return ServerSettings(
        model_id=args.served_model_name or served_name(args.model, model_dir),
        model_aliases=frozenset() if args.served_model_name else frozenset({str(args.model)}),
        media=policy,
        max_body_bytes=int(args.max_body_mb * 2**20),
        default_max_tokens=args.max_tokens,
        max_frames=args.max_frames,
        max_media=args.max_media,
        max_prompt_tokens=args.max_prompt_tokens,
        request_timeout_s=args.timeout,
        escape_control_tokens=not args.trust_control_tokens,
        api_key=args.api_key,
    )


def run_serve(args: argparse.Namespace) -> int:
    from longvita.assets import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    settings = settings_from_args(args, model_dir)
    load_options = {
        "device": args.device,
        "dtype": args.dtype,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    if args.max_pixels is not None:
        load_options["max_pixels"] = args.max_pixels
    if args.prefix_cache_gib is not None:
        if args.prefix_cache_gib < 0:
            raise ValueError(f"--prefix-cache-gib must be >= 0, got {args.prefix_cache_gib}")
        load_options["prefix_cache_bytes"] = int(args.prefix_cache_gib * 2**30)
    worker_options = {
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "step_tokens": args.step_tokens,
        "pool_tokens": args.decode_pool_tokens,
    }
    listen = bind(args.host, args.port)  # a busy port fails here, before the model loads
    set_threads(args.threads, args.cp)
    if args.cp == 1:
        serve_local(str(model_dir), load_options, worker_options, settings, listen)
        return 0
    from longvita.parallel.launch import launch

    listen.close()  # cp rank 0 listens itself (the check above: the address is free)
    launch(
        serve_on_rank,
        cp=args.cp,
        world_size=args.cp,
        args=(str(model_dir), load_options, settings, args.max_queue, args.host, args.port),
        device=args.device.split(":")[0],
        timeout_s=24 * 3600,
        grace_s=10.0,
    )
    return 0


def set_threads(threads: int | None, cp: int) -> None:
    """The model's CPU threads: this process's, or each cp rank's (`parallel.launch` reads
    OMP_NUM_THREADS in the ranks it spawns); None leaves torch's default."""
    if threads is None:
        return
    if cp > 1:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        return
    import torch

    torch.set_num_threads(threads)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (OSError naming the address if it is taken). Its protocol is named
    (IPPROTO_TCP): asyncio turns Nagle's algorithm off only on sockets that say so, and with it
    on, a stream's second small write waits for the client's delayed ACK (40 ms on Linux: the
    time to first token of every streamed answer)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listen = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listen.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited where supported
    try:
        listen.bind((host, port))
    except OSError as err:
        listen.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    listen.listen(128)
    return listen


def serve_local(model_dir: str, load_options: dict, worker_options: dict, settings, listen):
    import longvita
    from longvita.serve.app import create_app
    from longvita.serve.worker import BatchWorker

    pipe = longvita.load(model_dir, **load_options)
    app = create_app(pipe, BatchWorker(pipe, **worker_options), settings)
    run_uvicorn(app, listen, settings.model_id)


def serve_on_rank(state, model_dir, load_options, settings, max_queue: int, host: str, port: int):
    """Every rank of `--cp N`: load; cp rank 0 serves HTTP, the others follow its requests."""
    import longvita
    from longvita.serve.worker import ContextParallelWorker, follow_requests

    pipe = longvita.load(model_dir, **{**load_options, "device": state.device})
    if state.cp_rank != 0:
        follow_requests(pipe, state)
        return None
    from longvita.serve.app import create_app

    listen = bind(host, port)
    app = create_app(pipe, ContextParallelWorker(pipe, state, max_queue=max_queue), settings)
    run_uvicorn(app, listen, settings.model_id)
    return None


def run_uvicorn(app, listen: socket.socket, model_id: str) -> None:
    import uvicorn

    host, port = listen.getsockname()[:2]
    print(f"longvita serve: {model_id} on http://{host}:{port}; Ctrl-C to stop", flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.stopping.set()  # requests in flight answer 503 within the grace period
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    Server(config).run(sockets=[listen])
