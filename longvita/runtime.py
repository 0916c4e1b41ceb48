"""Where and in what precision the model runs: the device and dtype tables, and their checks.

Owns the names users give (`"cuda:1"`, `"bf16"`), what they resolve to, and the refusal, at
load time, of what this code cannot run on: a device type torch does not know, an accelerator
this machine does not have, the meta device (no data), dtypes other than float32, bfloat16
and float16. Device-agnostic (DESIGN.md): an accelerator is whatever `torch.accelerator`
reports (CUDA, ROCm, XPU, MPS, an NPU plugin), never spelled out here.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes models run in, by their config.json name."""
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype name, alias or torch.dtype; None means float32 on CPU and bfloat16 elsewhere.

    Raises ValueError for anything but float32, bfloat16 and float16 (float64 and integer
    types are not dtypes the model runs in).
    """
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype).lower()
    name = DTYPE_ALIASES.get(name.removeprefix("torch."), name.removeprefix("torch."))
    if name not in DTYPES:
        choices = sorted([*DTYPES, *DTYPE_ALIASES])
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {choices}")
    return DTYPES[name]


KV_CACHE_DTYPES = ("auto", *DTYPES, "int8")
"""What a KV cache can store (`kv_cache_dtype`): "auto" is the model's dtype, int8 quantized."""


def resolve_kv_cache_dtype(
    kv_cache_dtype: str | torch.dtype | None, model_dtype: torch.dtype
) -> torch.dtype:
    """The storage dtype of a `kv_cache_dtype` (None or "auto": `model_dtype`; a float dtype
    or alias as `resolve_dtype` takes; "int8" gives torch.int8, the quantized cache)."""
    if kv_cache_dtype is None or kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("int8", torch.int8):
        return torch.int8
    try:
        return resolve_dtype(kv_cache_dtype, torch.device("cpu"))
    except ValueError:
        raise ValueError(
            f"kv_cache_dtype {kv_cache_dtype!r} is not supported; use one of "
            f"{', '.join(KV_CACHE_DTYPES)}"
        ) from None


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch.device of a name, checked to exist on this machine.

    Raises ValueError for an unknown device type, the meta device, an accelerator type this
    machine does not have, or a device index past the number of devices.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"unknown device {device!r}: use cpu, cuda, cuda:N, or another accelerator type "
            "torch knows (mps, xpu, npu...)"
        ) from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "meta":
        raise ValueError("device 'meta' holds no data: models run on cpu or an accelerator")
    accelerator = _available_accelerator()
    if accelerator != resolved.type:
        seen = f"only {accelerator!r} devices" if accelerator else "no accelerator"
        raise ValueError(
            f"device {str(resolved)!r} is not available: torch {torch.__version__} sees {seen} "
            "on this machine; use cpu" + (f" or {accelerator}" if accelerator else "")
        )
    count = torch.accelerator.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(
            f"device {str(resolved)!r} does not exist: {count} {resolved.type} device(s) are "
            f"visible (indices 0..{count - 1})"
        )
    return resolved


def _available_accelerator() -> str | None:
    """The device type of this machine's accelerator, None when there is none."""
    if not torch.accelerator.is_available():
        return None
    return torch.accelerator.current_accelerator().type
