"""What a stage trains and how fast: frozen modules, parameter groups, AdamW, the schedule.

Owns the split of the model into its three trainable parts (the InternViT, the projector, the
LLM: everything else), `requires_grad` from the stage's `trainable:` section, the parameter
groups with their learning-rate multipliers (the ViT's layer-wise decay of stage 2), AdamW over
the trainable parameters only (frozen ones get no optimizer state), and the learning rate of
each step: linear warmup then cosine to min_lr (`lr_at`, a pure function). Groups are built
from the module structure, not from parameter names, so they are the same before and after
activation checkpointing and FSDP wrap the modules.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from longvita.model.long_vita import LongVITAForCausalLM
from longvita.train.config import OptimConfig, ScheduleConfig, TrainableConfig


def parts(model: LongVITAForCausalLM) -> dict[str, list[nn.Parameter]]:
    """The parameters of the three trainable parts: vision, projector, llm (the rest)."""
    vision = list(model.model.vision_model.parameters())
    projector = list(model.model.vision_projection.parameters())
    taken = {id(p) for p in vision + projector}
    llm = [p for p in model.parameters() if id(p) not in taken]
    return {"vision": vision, "projector": projector, "llm": llm}


def freeze(model: LongVITAForCausalLM, trainable: TrainableConfig) -> dict[str, int]:
    """Set requires_grad per part; returns the parameter count of each trainable part."""
    counts = {}
    for name, params in parts(model).items():
        train = getattr(trainable, name)
        for param in params:
            param.requires_grad_(train)
        if train:
            counts[name] = sum(p.numel() for p in params)
    return counts


def vision_layer_groups(model: LongVITAForCausalLM) -> list[list[nn.Parameter]]:
    """The ViT's parameters by layer id: [embeddings, block 0, ..., block L-1]."""
    vision = model.model.vision_model
    groups = [list(vision.embeddings.parameters())]
    groups += [list(layer.parameters()) for layer in vision.encoder.layers]
    return groups


def param_groups(model: LongVITAForCausalLM, optim: OptimConfig) -> list[dict]:
    """AdamW parameter groups of the trainable parameters, each with its `lr_mult`.

    LLM and projector: multiplier 1. ViT layer id k (0 = embeddings, i + 1 = block i) of L
    blocks: vision_lr_mult * vision_layer_decay ** (L + 1 - k), the official
    `0.1 * 0.9 ** (25 - layer_id)` for the 24 blocks of InternViT-300M.
    """
    split = parts(model)
    groups = []
    rest = [p for p in split["llm"] + split["projector"] if p.requires_grad]
    if rest:
        groups.append({"params": rest, "lr_mult": 1.0, "name": "llm+projector"})
    layers = vision_layer_groups(model)
    num_blocks = len(layers) - 1
    for layer_id, params in enumerate(layers):
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            mult = optim.vision_lr_mult * optim.vision_layer_decay ** (num_blocks + 1 - layer_id)
            groups.append({"params": trainable, "lr_mult": mult, "name": f"vision.{layer_id}"})
    if not groups:
        raise ValueError("no parameter requires grad: nothing to optimize")
    return groups


def build_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the groups; each group's lr starts at optim.lr x its lr_mult."""
    for group in groups:
        group["lr"] = optim.lr * group["lr_mult"]
    return torch.optim.AdamW(
        groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
    )


def warmup_steps(schedule: ScheduleConfig) -> int:
    return int(schedule.warmup_fraction * schedule.steps)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): (step + 1) / warmup of lr during
    the warmup, then a cosine from lr to min_lr over the remaining steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)  # [0, 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (lr - min_lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, schedule: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group follows `lr_at`, scaled by its lr_mult (its initial lr)."""
    warmup = warmup_steps(schedule)

    def factor(step: int) -> float:
        at = lr_at(step, lr=optim.lr, min_lr=optim.min_lr, warmup=warmup, steps=schedule.steps)
        return at / optim.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
