"""Pure tensor math: attention, RoPE, sampling. No state, no torch.distributed."""

from longvita.ops.attention import attention, causal_mask
from longvita.ops.rope import apply_rope, rope_cos_sin, rotate_half

__all__ = ["apply_rope", "attention", "causal_mask", "rope_cos_sin", "rotate_half"]
