"""Memory per device of one generation, from config.json alone: what `longvita plan` prints.

Owns the estimator (`plan_memory`), prompt token counts for a number of frames and images
(`count_prompt_tokens`), the device's free memory (`free_memory_bytes`) and the check that a
prompt fits it before any work (`check_prompt_memory`). Pure arithmetic on the config except
`free_memory_bytes`; no weights are read.

Notation: b bytes per element of the dtype; L decoder layers, h hidden, I MLP hidden, V vocab,
Hq / Hkv query / key-value heads, d head dim; ViT Lv layers, Cv hidden, Iv MLP hidden, tiles of
S x S pixels giving N = 1 + (S/patch)^2 ViT tokens and T = (N - 1) / 4 LLM tokens each; P prompt
tokens, M new tokens, C prefill chunk, B vision batch, K the KV cache's key block.

    weights      (exact parameter count of LLM + ViT + projector) x b, on every device (context
                 parallelism replicates the weights)
    kv_cache     2 x L x Hkv x d x b x kv_tokens with b the KV cache dtype's bytes, or
                 2 x L x Hkv x (d + 4) x kv_tokens for int8 (values and float32 scales);
                 kv_tokens = P + M at cp = 1; under cp,
                 the tokens the most loaded rank caches in `infer.layout`'s layout
                 (the prompt in rounds of 2cp chunks of c = min(C/2, ceil(P/2cp)) tokens cut
                 zigzag, each new token to the rank holding the fewest): about (P + M) / cp
    activations  peak beyond weights and KV cache, the largest of a decoder layer's phases or a
                 ViT batch, plus what lives across them; c = the tokens one forward runs on a
                 device: min(C, P) at cp = 1, 2*min(C/2, ceil(P/2cp)) under cp (a round):
      norm   = c*h*(8 + b)                          RMSNorm in fp32
      attn   = c*h*b + 2*c*(Hq + 2*Hkv)*d*b + 2*c*Hq*d*b + c*Hq*(d*(2b + 4) + 24)
               [+ 2*Hq*min(K, kv_tokens)*d*b, CUDA] q/k/v before and after RoPE, RoPE
                                                    temporaries, two partial outputs merged in
                                                    place into an fp32 accumulator, log-sum-exps
                                                    and merge weights [one key block with its
                                                    K/V heads repeated by the CUDA kernel]
      mlp    = c*h*b + r*(2*I + h)*b                SwiGLU in blocks of r = min(c, 1024) rows
                                                    (`model.qwen2.MLP_ROW_BLOCK`): output,
                                                    silu(gate) * up in place, up, down
      llm    = 3*c*h*b + max(norm, attn, mlp)       residual stream + the layer's largest phase
      vit    = B'*(3*S^2*(8 + b) + N*(5*Cv + 2*Iv)*b + T*(13*Cv + h)*b), 0 without tiles
                                                    pixels (numpy, tensor, cast); ViT tokens,
                                                    qkv and MLP; pixel shuffle + projector;
                                                    B' = min(B, c // T + 4) tiles, the most a
                                                    forward needs, 0 for a text-only prompt
      held   = 3*(c + B'*T)*h*b                     one forward's features, tiles straddling it
      logits = V*(b + 8)                            the last position's logits, fp32 copies
      shards = 4*c*Hkv*d*b + cp*c*Hq*(d*b + 24*(d + 1)) under cp > 1, else 0
                                                    ring K/V blocks in flight; the round's
                                                    queries gathered from every rank, their
                                                    partial results over the local cache (fp32,
                                                    merged, packed, sent and received)
      dequant = 2*Hkv*min(K, 4096, kv_tokens)*d*b with an int8 KV cache, else 0
                                                    one block of cached keys and values
                                                    dequantized for the fused kernel
      total  = max(llm, vit) + held + logits + shards + dequant

The coefficients are upper bounds of what the code allocates (tests/unit/test_plan.py measures
chunked prefills on CPU against them at cp = 1; the shards term follows the design of
`parallel.sharded_cache` and is not measured). Not counted: allocator fragmentation and the
CUDA context (about 0.5 GiB). Host memory for decoding media at their source resolution is the
Processor's estimate (`TileSource.decode_bytes`), which `check_prompt_memory` checks against
the host's free memory (added to the device's needs when the device is the CPU).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from longvita.config import LongVITAConfig
from longvita.errors import PromptError
from longvita.infer.layout import PromptLayout
from longvita.model.kv_cache import DEFAULT_KV_BLOCK, INT8_PREFILL_BLOCK, kv_bytes_per_token
from longvita.model.qwen2 import MLP_ROW_BLOCK
from longvita.processing.image import candidate_grids
from longvita.processing.processor import MAX_TILES, image_token_count, video_token_count
from longvita.runtime import dtype_name, resolve_dtype

logger = logging.getLogger(__name__)

DEFAULT_TEXT_TOKENS = 64
"""Text tokens assumed around the media: the chat template (8 tokens) and a question."""
GIB = 1024**3


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Bytes per device of one generation (see the module docstring for the formulas)."""

    num_prompt_tokens: int
    max_new_tokens: int
    cp: int
    dtype: str
    kv_cache_dtype: str
    prefill_chunk: int
    vision_batch: int
    kv_tokens: int
    """Tokens whose keys/values the most loaded device holds."""
    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    """Peak of prefill (or decode) working memory beyond weights and KV cache."""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def count_parameters(config: LongVITAConfig) -> int:
    """Exact number of parameters of LongVITAForCausalLM(config), tied head counted once."""
    h, inner, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    layer = (h + 1) * q + 2 * (h + 1) * kv + q * h + 3 * h * inner + 2 * h
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    llm = config.vocab_size * h + config.num_hidden_layers * layer + h + head
    v = config.vision
    cv, iv, patch = v.hidden_size, v.intermediate_size, v.patch_size
    embeddings = cv + (3 * patch * patch + 1) * cv + (1 + v.num_patches) * cv
    qkv = cv * 3 * cv + (3 * cv if v.qkv_bias else 0)
    block = qkv + (cv + 1) * cv + (cv + 1) * iv + (iv + 1) * cv + 4 * cv + 2 * cv
    projector = 2 * v.projector_input_size + v.projector_input_size * cv + cv * h
    return llm + embeddings + v.num_hidden_layers * block + projector


def tokens_per_forward(num_prompt_tokens: int, cp: int, prefill_chunk: int) -> int:
    """Prompt tokens one prefill forward runs on a device: a chunk, or under cp a rank's share
    of a round (`infer.layout.PromptLayout`)."""
    if cp == 1:
        return min(prefill_chunk, num_prompt_tokens)
    return 2 * PromptLayout.build(num_prompt_tokens, cp, prefill_chunk).chunk_len


def kv_tokens_per_device(
    num_prompt_tokens: int, max_new_tokens: int, cp: int, prefill_chunk: int
) -> int:
    """Tokens cached on the most loaded device: all of them at cp = 1, else the largest shard
    of `infer.layout`'s layout (the one the context-parallel engine allocates)."""
    if cp == 1:
        return num_prompt_tokens + max_new_tokens
    layout = PromptLayout.build(num_prompt_tokens, cp, prefill_chunk)
    owners = layout.decode_owners(max_new_tokens)
    return max(layout.kv_capacity(rank, owners) for rank in range(cp))


def plan_memory(
    config: LongVITAConfig,
    *,
    num_prompt_tokens: int,
    max_new_tokens: int,
    cp: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    kv_cache_dtype: torch.dtype | None = None,
    prefill_chunk: int,
    vision_batch: int,
    has_tiles: bool = True,
    kv_block: int = DEFAULT_KV_BLOCK,
    device_type: str = "cuda",
) -> MemoryPlan:
    """Weights, KV cache and peak activation bytes per device (formulas: module docstring).

    kv_cache_dtype: the KV cache's storage dtype (None: `dtype`; torch.int8: quantized).
    has_tiles: False for a text-only prompt (no ViT). device_type: "cuda" counts the key block
    that the CUDA attention kernel repeats; "cpu" does not.
    """
    for name, value in [
        ("num_prompt_tokens", num_prompt_tokens),
        ("max_new_tokens", max_new_tokens),
        ("cp", cp),
        ("prefill_chunk", prefill_chunk),
        ("vision_batch", vision_batch),
    ]:
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    dtype = resolve_dtype(dtype, torch.device("cpu"))
    kv_dtype = dtype if kv_cache_dtype is None else kv_cache_dtype
    b = dtype.itemsize
    kv_tokens = kv_tokens_per_device(num_prompt_tokens, max_new_tokens, cp, prefill_chunk)
    kv_per_token = kv_bytes_per_token(
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        dtype=kv_dtype,
    )
    chunk = tokens_per_forward(num_prompt_tokens, cp, prefill_chunk)
    key_block = min(kv_block, kv_tokens) if device_type == "cuda" else 0
    llm = _llm_chunk_bytes(config, chunk, key_block, b)
    tokens_per_tile = config.vision.tokens_per_tile
    batch = min(vision_batch, chunk // tokens_per_tile + 4) if has_tiles else 0
    vit = _vit_batch_bytes(config, batch, b)
    held = 3 * (chunk + batch * tokens_per_tile) * config.hidden_size * b
    logits = config.vocab_size * (b + 8)
    shards = 0
    if cp > 1:
        hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        shards = 4 * chunk * hkv * d * b + cp * chunk * hq * (d * b + 24 * (d + 1))
    dequant = 0
    if kv_dtype == torch.int8:
        block = min(kv_block, INT8_PREFILL_BLOCK, kv_tokens)
        dequant = 2 * config.num_key_value_heads * block * config.head_dim * b
    return MemoryPlan(
        num_prompt_tokens=num_prompt_tokens,
        max_new_tokens=max_new_tokens,
        cp=cp,
        dtype=dtype_name(dtype),
        kv_cache_dtype=dtype_name(kv_dtype),
        prefill_chunk=prefill_chunk,
        vision_batch=vision_batch,
        kv_tokens=kv_tokens,
        weight_bytes=count_parameters(config) * b,
        kv_cache_bytes=kv_per_token * kv_tokens,
        activation_bytes=max(llm, vit) + held + logits + shards + dequant,
    )


def _llm_chunk_bytes(config: LongVITAConfig, chunk: int, key_block: int, b: int) -> int:
    h, d = config.hidden_size, config.head_dim
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    norm = chunk * h * (8 + b)
    attn = (
        chunk * h * b
        + 2 * chunk * (hq + 2 * hkv) * d * b
        + 2 * chunk * hq * d * b
        + chunk * hq * (d * (2 * b + 4) + 24)
        + 2 * hq * key_block * d * b
    )
    rows = min(chunk, MLP_ROW_BLOCK)
    mlp = chunk * h * b + rows * (2 * config.intermediate_size + h) * b
    return 3 * chunk * h * b + max(norm, attn, mlp)


def _vit_batch_bytes(config: LongVITAConfig, batch: int, b: int) -> int:
    v = config.vision
    num_tokens, tokens_per_tile = 1 + v.num_patches, v.tokens_per_tile
    pixels = 3 * v.image_size**2 * (8 + b)  # numpy float32, tensor, cast to dtype
    encoder = num_tokens * (5 * v.hidden_size + 2 * v.intermediate_size) * b
    projector = tokens_per_tile * (13 * v.hidden_size + config.hidden_size) * b
    return batch * (pixels + encoder + projector)


def count_prompt_tokens(
    config: LongVITAConfig,
    *,
    frames: int = 0,
    images: int = 0,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    max_tiles: int = MAX_TILES,
) -> int:
    """Prompt tokens for `frames` video frames (258 each with the official tiles), `images`
    images counted at their largest tiling (12 tiles + thumbnail: 3,366 tokens each) and
    `text_tokens` of text."""
    if min(frames, images, text_tokens) < 0:
        raise ValueError(f"counts must be >= 0: {frames=}, {images=}, {text_tokens=}")
    tokens_per_tile = config.vision.tokens_per_tile
    per_image = max(
        image_token_count(grid, tokens_per_tile=tokens_per_tile)
        for grid in candidate_grids(max_tiles)
    )
    video = video_token_count(frames, tokens_per_tile=tokens_per_tile)
    return video + images * per_image + text_tokens


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Bytes the process can still allocate on `device`; None where unknown.

    An accelerator: its free memory (`mem_get_info` of its torch module: torch.cuda, torch.xpu)
    plus what PyTorch's caching allocator holds unused. CPU: MemAvailable of /proc/meminfo.
    """
    device = torch.device(device)
    if device.type == "cpu":
        meminfo = Path("/proc/meminfo")
        if not meminfo.is_file():
            return None
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
        return None
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    try:
        free, _total = module.mem_get_info(index)
        cached = module.memory_reserved(index) - module.memory_allocated(index)
    except (AttributeError, RuntimeError):  # a backend without memory queries
        return None
    return free + cached


def check_prompt_memory(
    config: LongVITAConfig,
    *,
    num_prompt_tokens: int,
    max_new_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    prefill_chunk: int,
    vision_batch: int,
    has_tiles: bool,
    kv_cache_dtype: torch.dtype | None = None,
    cp: int = 1,
    ranks_per_host: int = 1,
    media_bytes: int = 0,
) -> MemoryPlan:
    """Refuse, with the numbers, a prompt whose KV cache and prefill do not fit the device's
    free memory, or whose media decoding (`media_bytes`, host memory) does not fit the host's.

    The weights are taken as already loaded (they are not in the free memory any more). On the
    CPU, the host's free memory is shared by the `ranks_per_host` ranks of this machine and the
    media bytes come out of the same memory. When only the new tokens' share of the KV cache is
    too much, the refusal names max_new_tokens and how many would fit. Returns the plan.
    """

    def plan_for(new_tokens: int) -> MemoryPlan:
        return plan_memory(
            config,
            num_prompt_tokens=num_prompt_tokens,
            max_new_tokens=new_tokens,
            cp=cp,
            dtype=dtype,
            kv_cache_dtype=kv_cache_dtype,
            prefill_chunk=prefill_chunk,
            vision_batch=vision_batch,
            has_tiles=has_tiles,
            device_type=device.type,
        )

    plan = plan_for(max_new_tokens)
    name = str(device) if cp == 1 else f"{device} (one of {cp} context-parallel ranks)"
    host_free = free_memory_bytes("cpu")
    if host_free is not None:
        host_free //= max(1, ranks_per_host)
    on_host = device.type == "cpu"
    extra = media_bytes if on_host else 0
    free = host_free if on_host else free_memory_bytes(device)
    needed = plan.kv_cache_bytes + plan.activation_bytes + extra
    if free is None:
        logger.info("free memory of %s unknown: not checking the %d bytes needed", name, needed)
    elif needed > free:
        fitting = _new_tokens_that_fit(plan, plan_for, free - extra)
        raise PromptError(_refusal(plan, needed, free, name, extra, fitting))
    if not on_host and host_free is not None and media_bytes > host_free:
        raise PromptError(
            f"decoding the prompt's media needs about {format_bytes(media_bytes)} of host "
            f"memory but {format_bytes(host_free)} is free; use smaller or fewer images, fewer "
            "frames (max_frames), or a smaller vision_batch"
        )
    return plan


def _new_tokens_that_fit(plan: MemoryPlan, plan_for, free: int) -> int | None:
    """The most new tokens whose plan fits `free` bytes; None when not even one does.

    Exact by bisection at cp = 1 (a plan is a few multiplications); under cp, where a plan
    walks the decode schedule, a linear estimate from the bytes each new token adds."""

    def fits(new_tokens: int) -> bool:
        candidate = plan_for(new_tokens)
        return candidate.kv_cache_bytes + candidate.activation_bytes <= free

    if not fits(1):
        return None
    if plan.cp > 1:  # each new token adds one cached token on one of the cp devices
        bytes_per_new_token = plan.kv_cache_bytes / plan.kv_tokens / plan.cp
        excess = plan.kv_cache_bytes + plan.activation_bytes - free
        return max(1, plan.max_new_tokens - math.ceil(excess / bytes_per_new_token))
    low, high = 1, plan.max_new_tokens  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _refusal(
    plan: MemoryPlan, needed: int, free: int, device: str, media_bytes: int, fitting: int | None
) -> str:
    """Why a plan does not fit, naming the setting to change first."""
    situation = (
        f"the prompt has {plan.num_prompt_tokens:,} tokens (+{plan.max_new_tokens:,} new): its "
        f"KV cache needs {format_bytes(plan.kv_cache_bytes)}, prefill "
        f"{format_bytes(plan.activation_bytes)} (prefill_chunk={plan.prefill_chunk}, "
        f"vision_batch={plan.vision_batch})"
        + (f", decoding its media {format_bytes(media_bytes)}" if media_bytes else "")
        + f", {format_bytes(needed)} in all, but {device} has {format_bytes(free)} free"
    )
    if fitting is not None:
        about = "about " if plan.cp > 1 else ""
        return (
            f"{situation}; max_new_tokens={plan.max_new_tokens:,} is what does not fit: "
            f"{about}{fitting:,} new tokens would (lower max_new_tokens)"
        )
    return (
        f"{situation}; use fewer frames (max_frames) or images, a smaller prefill_chunk (e.g. "
        f"{max(1, plan.prefill_chunk // 4)}), or more devices (--cp N holds 1/N of the KV cache "
        "on each); `longvita plan` shows the numbers"
    )


def format_bytes(num_bytes: int) -> str:
    """1,234.56 GiB, or MiB / KiB below a GiB."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= size:
            return f"{num_bytes / size:,.2f} {unit}"
    return f"{num_bytes} B"


def plan_summary(plan: MemoryPlan) -> str:
    """The human-readable table `longvita plan` prints."""
    rows = [
        ("weights", plan.weight_bytes, "replicated on every device"),
        ("KV cache", plan.kv_cache_bytes, f"{plan.kv_tokens:,} tokens, {plan.kv_cache_dtype}"),
        (
            "activations",
            plan.activation_bytes,
            f"peak; prefill chunk {plan.prefill_chunk:,}, vision batch {plan.vision_batch}",
        ),
        ("total", plan.total_bytes, ""),
    ]
    lines = [
        f"{plan.num_prompt_tokens:,} prompt tokens + {plan.max_new_tokens:,} new, "
        f"cp={plan.cp}, {plan.dtype}; memory per device:"
    ]
    lines += [f"  {name:<12} {format_bytes(n):>14}  {note}".rstrip() for name, n, note in rows]
    return "\n".join(lines)
