"""Make a finished model trainable at scale, in one place and a fixed order (torchtitan's):
activation checkpointing, then FSDP2.

- Activation checkpointing (`parallel.activation_checkpointing`): every decoder layer (and,
  when the ViT trains, every ViT layer) recomputes its activations in backward
  (non-reentrant `checkpoint_wrapper`; ring attention's P2P traffic is re-issued in the same
  order on every rank, so recompute under context parallelism is exact).
- FSDP2 (`fully_shard`) over the flattened dp x cp mesh, for any job of more than one process:
  each ViT layer, each decoder layer, then the root (embeddings, ViT stem, projector, final
  norm, LM head). On an accelerator, bf16 parameters with fp32 gradient reduction; fp32 on the
  CPU (bf16 brings no speed there).

The traps of FSDP2 with this model, verified on torch 2.13 / gloo
(reference/TRAINING-SERVING-NOTES.md section 1.2), and what answers each:
- `model.loss` is not `forward`: registered with `register_fsdp_forward_method`, or the root's
  parameters are never gathered.
- The loss is normalized by the supervised tokens of the whole step over every rank (the
  trainer divides), so FSDP must sum gradients over dp x cp, not average:
  `set_gradient_divide_factor(1.0)`, with `set_force_sum_reduction_for_comms` (gloo has no
  PREMUL_SUM).
- A rank whose shard holds no tile must still run the ViT or the collectives of its FSDP units
  mismatch and the job hangs: the trainer asks the model to keep the vision tower in the graph
  (a zero-weighted dummy tile, `LongVITAModel.embed_multimodal`), and unused parameters are
  reduce-scattered anyway (`set_reduce_scatter_unused_params`).
Frozen parameters are sharded like the others; they get no gradient and no optimizer state.
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from longvita.model.long_vita import LongVITAForCausalLM
from longvita.parallel.state import ParallelState

logger = logging.getLogger(__name__)


def apply_activation_checkpointing(model: LongVITAForCausalLM, *, vision: bool) -> None:
    """Wrap every decoder layer (and ViT layer when `vision`) in a non-reentrant checkpoint."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
    if vision:
        vit_layers = model.model.vision_model.encoder.layers
        for i, layer in enumerate(vit_layers):
            vit_layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_fsdp(model: LongVITAForCausalLM, state: ParallelState) -> None:
    """fully_shard the ViT layers, the decoder layers and the root over the dp x cp mesh."""
    mesh = state.mesh._flatten("dp_cp") if state.mesh.ndim == 2 else state.mesh
    kwargs = {"mesh": mesh}
    if state.device.type != "cpu":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for layer in model.model.vision_model.encoder.layers:
        fully_shard(layer, **kwargs)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "loss")
    model.set_reduce_scatter_unused_params(True)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # the trainer normalizes by global tokens
            module.set_force_sum_reduction_for_comms(True)


def parallelize(
    model: LongVITAForCausalLM,
    state: ParallelState,
    *,
    activation_checkpointing: bool,
    vision_trains: bool,
) -> LongVITAForCausalLM:
    """Activation checkpointing, then FSDP2 when the job has more than one process; in place."""
    if activation_checkpointing:
        apply_activation_checkpointing(model, vision=vision_trains)
    if state.world_size > 1:
        apply_fsdp(model, state)
        logger.info("FSDP2 over %d ranks (dp %d x cp %d)", state.world_size, state.dp_size,
                    state.cp_size)  # fmt: skip
    return model


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Scale the gradients down to a global L2 norm of `max_norm`; returns the norm before
    clipping, the same on every rank (FSDP's sharded gradients are reduced across ranks)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)
