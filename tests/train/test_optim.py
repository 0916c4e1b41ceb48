"""Trainable parts, parameter groups with the ViT's layer-wise decay, and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from longvita.config import tiny
from longvita.testing import random_model
from longvita.train.config import OptimConfig, ScheduleConfig, TrainableConfig
from longvita.train.optim import (
    build_optimizer,
    build_scheduler,
    freeze,
    lr_at,
    param_groups,
    parts,
)


def test_parts_cover_every_parameter_once():
    model = random_model(tiny())
    split = parts(model)
    ids = [id(p) for params in split.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert split["projector"] == list(model.model.vision_projection.parameters())


def test_stage_two_groups_follow_the_official_layer_decay():
    model = random_model(tiny())  # a 2-block ViT: layer ids 0 (embeddings), 1, 2
    freeze(model, TrainableConfig(vision=True, projector=True, llm=True))
    optim = OptimConfig(lr=1e-5, min_lr=1e-7, vision_lr_mult=0.1, vision_layer_decay=0.9)
    groups = {g["name"]: g["lr_mult"] for g in param_groups(model, optim)}
    assert groups["llm+projector"] == 1.0
    for layer_id in range(3):  # official: 0.1 * 0.9 ** (num_blocks + 1 - layer_id)
        assert groups[f"vision.{layer_id}"] == pytest.approx(0.1 * 0.9 ** (3 - layer_id))


def test_frozen_parts_get_no_gradient_and_no_optimizer_state():
    model = random_model(tiny())
    counts = freeze(model, TrainableConfig(vision=False, projector=True, llm=False))
    assert set(counts) == {"projector"}
    optimizer = build_optimizer(param_groups(model, OptimConfig()), OptimConfig())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.model.vision_projection.parameters()}
    assert not any(p.requires_grad for p in model.model.vision_model.parameters())


def test_lr_warms_up_then_decays_by_cosine_to_min_lr():
    lr, min_lr, warmup, steps = 1e-3, 1e-5, 3, 13
    at = [lr_at(s, lr=lr, min_lr=min_lr, warmup=warmup, steps=steps) for s in range(steps)]
    assert at[:3] == pytest.approx([lr / 3, 2 * lr / 3, lr])
    assert at[3] == pytest.approx(lr)  # the cosine starts at the peak
    assert all(a >= b for a, b in zip(at[3:], at[4:], strict=False))  # then decreases
    halfway = 3 + (steps - warmup) // 2
    assert at[halfway] == pytest.approx((lr + min_lr) / 2)
    assert min_lr < at[-1] < min_lr + 0.03 * (lr - min_lr)
    assert lr_at(steps + 5, lr=lr, min_lr=min_lr, warmup=warmup, steps=steps) == min_lr
    assert lr_at(0, lr=lr, min_lr=min_lr, warmup=0, steps=steps) == lr  # no warmup


def test_the_scheduler_scales_every_group_by_its_multiplier():
    model = random_model(tiny())
    freeze(model, TrainableConfig(vision=True, projector=True, llm=True))
    optim, schedule = OptimConfig(lr=1e-4, min_lr=1e-6), ScheduleConfig(steps=10)
    optimizer = build_optimizer(param_groups(model, optim), optim)
    scheduler = build_scheduler(optimizer, optim, schedule)
    for step in range(10):
        expected = lr_at(step, lr=1e-4, min_lr=1e-6, warmup=0, steps=10)
        for group in optimizer.param_groups:
            assert math.isclose(group["lr"], expected * group["lr_mult"], rel_tol=1e-9)
        optimizer.step()
        scheduler.step()
    assert torch.is_tensor(next(model.parameters()))
