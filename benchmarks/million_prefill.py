"""A 1M-token prefill of a 7B-shaped random model on one device with the 8-bit KV cache (issue 14).

The model has Qwen2.5-7B's LLM shape (hidden 3,584, intermediate 18,944, 28 query / 4 KV heads
of 128, vocab 152,064) with a stub ViT, random weights, built on the device in `--dtype`. The
prompt is `--tokens` random token ids (text only); the engine (`infer.engine.generate`) prefills
it `--prefill-chunk` tokens at a time into a KV cache of `--kv-cache-dtype` (int8: per token
and head scales, 1,056 bytes per token and layer for this shape) and samples one greedy token.
Time to first token: from a synchronized start to the token on the host; peak: the allocator's
high-water mark over the whole process (weights included) on an accelerator, VmHWM on the CPU.

A prefill's layers are alike, so `--layers L` (2 <= L < 28) runs the first L layers on the
full-length prompt and also reports the whole model, *scaled*: time x 27 / (L - 1), peak + the
other layers' weights and KV cache (exact byte counts). The last layer only stores keys and
values until the last position, so L - 1 layers do a layer's full work; counting the last
layer's, the embedding's and the head's time with them overestimates the whole model's by
their share. `longvita plan`'s estimate for the whole model is reported beside it.

    python benchmarks/million_prefill.py --device cuda               # all 28 layers, 1M tokens
    python benchmarks/million_prefill.py --device cuda --layers 2    # 2 layers, scaled (gpu-check)
    python benchmarks/million_prefill.py --quick                     # CPU, small shape, seconds

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import STUB_VISION, peak_since, reset_peak

from longvita.config import LongVITAConfig, VisionConfig
from longvita.infer.engine import generate
from longvita.infer.plan import plan_memory
from longvita.infer.request import DEFAULT_PREFILL_CHUNK, DEFAULT_VISION_BATCH, SamplingParams
from longvita.model.kv_cache import kv_bytes_per_token
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.runtime import resolve_dtype, resolve_kv_cache_dtype

QWEN25_7B = {  # the LLM of Qwen2.5-7B (config.json), what "7B-shaped" means here
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
}  # fmt: skip
QUICK = {  # a shape that prefills a few thousand tokens on a CPU in seconds
    "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip


def model_config(shape: dict, layers: int, dtype: torch.dtype) -> LongVITAConfig:
    return LongVITAConfig(
        **{**shape, "num_hidden_layers": layers},
        max_position_embeddings=1 << 21,
        torch_dtype=str(dtype).removeprefix("torch."),
        vision=VisionConfig(**STUB_VISION),
    )


def build_model(config: LongVITAConfig, device: torch.device, dtype: torch.dtype):
    """Random weights made on `device` in `dtype` (no fp32 copy on the host)."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LongVITAForCausalLM(config)
            with torch.no_grad():
                model.model.init_weights()
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def layer_weight_bytes(model: LongVITAForCausalLM) -> int:
    layer = model.model.layers[0]
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def time_to_first_token(model, ids: torch.Tensor, args, kv_dtype: torch.dtype) -> float:
    synchronize(ids.device)
    start = time.perf_counter()
    with torch.inference_mode():
        generate(
            model,
            ids,
            params=SamplingParams(max_new_tokens=1),
            stop_ids=(),
            prefill_chunk=args.prefill_chunk,
            kv_cache_dtype=kv_dtype,
        )  # the token reaches the host: everything before it has run
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    shape = QUICK if args.quick else QWEN25_7B
    full_layers = shape["num_hidden_layers"]
    layers = args.layers or full_layers
    if not 2 <= layers <= full_layers:
        raise SystemExit(f"--layers must be 2..{full_layers}, got {layers}")
    config = model_config(shape, layers, dtype)
    print(f"building the {layers}-layer model on {device} in {dtype}", file=sys.stderr, flush=True)
    base = reset_peak(device.type)
    model = build_model(config, device, dtype)
    kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, dtype)
    ids = torch.randint(0, shape["vocab_size"], (args.tokens,), generator=torch.Generator())
    ids = ids.to(device)
    print("warm-up", file=sys.stderr, flush=True)
    warmup = time_to_first_token(model, ids[: 2 * args.prefill_chunk], args, kv_dtype)
    print(f"prefill of {args.tokens:,} tokens", file=sys.stderr, flush=True)
    seconds = time_to_first_token(model, ids, args, kv_dtype)
    peak = peak_since(base, device.type)  # weights + cache + activations, since the start

    per_token = kv_bytes_per_token(
        num_layers=1, num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
        dtype=kv_dtype,
    )  # fmt: skip
    cache_tokens = args.tokens + 1
    measured = {
        "layers": layers,
        "time_to_first_token_s": round(seconds, 2),
        "prefill_tokens_per_s": round(args.tokens / seconds, 1),
        "peak_bytes": peak,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "kv_cache_bytes": per_token * layers * cache_tokens,
        "warmup_s": round(warmup, 2),
    }
    report = {"measured": measured}
    if layers < full_layers:
        others = full_layers - layers
        report["scaled_to_full_model"] = {
            "layers": full_layers,
            "time_to_first_token_s": round(seconds * (full_layers - 1) / (layers - 1), 1),
            "peak_bytes": peak + others * (layer_weight_bytes(model) + per_token * cache_tokens),
            "how": f"time x {full_layers - 1}/{layers - 1} (the layers before the last); "
            f"peak + {others} layers' weights and cache",
        }
    plan = plan_memory(
        model_config(shape, full_layers, dtype),
        num_prompt_tokens=args.tokens,
        max_new_tokens=1,
        dtype=dtype,
        kv_cache_dtype=kv_dtype,
        prefill_chunk=args.prefill_chunk,
        vision_batch=DEFAULT_VISION_BATCH,
        has_tiles=False,
        device_type=device.type,
    )
    report["plan_full_model"] = {
        "weight_bytes": plan.weight_bytes,
        "kv_cache_bytes": plan.kv_cache_bytes,
        "activation_bytes": plan.activation_bytes,
        "total_bytes": plan.weight_bytes + plan.kv_cache_bytes + plan.activation_bytes,
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 20, help="prompt length (1,048,576)")
    parser.add_argument(
        "--layers", type=int, default=None, help="run the first L >= 2 layers, scaled"
    )
    parser.add_argument("--kv-cache-dtype", default="int8", help="int8 (default), auto, bfloat16")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    parser.add_argument("--device", default="cpu", help="cuda on a GPU machine (default: cpu)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 off the CPU, else float32")
    parser.add_argument("--quick", action="store_true", help="a small shape and 8K tokens")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.prefill_chunk = min(args.tokens, 8192), min(args.prefill_chunk, 1024)
    if args.tokens < 2 * args.prefill_chunk:
        parser.error(f"--tokens {args.tokens} must be at least two --prefill-chunk's")
    started = time.perf_counter()
    report = {
        "benchmark": "million_prefill",
        "config": {**vars(args), "torch": torch.__version__},
        **run(args),
    }
    if args.device != "cpu":
        report["config"]["device_name"] = torch.cuda.get_device_name(torch.device(args.device))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
