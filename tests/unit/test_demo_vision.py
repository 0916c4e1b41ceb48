"""The demo ViT's pretraining: hard-example mining keeps the renders on the wrong side of the
digit head, the same seed gives the same tower, and a recipe that cannot mine is refused before
anything trains."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from longvita.demo_vision import (
    CLASSES,
    IS_DIGIT,
    TOWER,
    VisionPretraining,
    hardest,
    needle_found_share,
    pretrain_tower,
)

DIGIT = next(k for k, (kind, _) in enumerate(CLASSES) if kind == "digit")
LETTER = next(k for k, (kind, _) in enumerate(CLASSES) if kind == "letter")


class FixedDigitLogit(torch.nn.Module):
    """A classifier stub whose digit logit is pixel [0, 0, 0] of each render."""

    def forward(self, pixels):
        n = len(pixels)
        return torch.zeros(n, len(CLASSES)), torch.zeros(n, 7), pixels[:, 0, 0, :1]


def test_hardest_keeps_the_renders_nearest_the_wrong_side():
    logits = torch.tensor([5.0, -3.0, 0.5, 4.0, -6.0, 2.0])
    classes = torch.tensor([DIGIT, DIGIT, DIGIT, LETTER, LETTER, LETTER])
    pixels = torch.zeros(6, 3, 2, 2)
    pixels[:, 0, 0, 0] = logits
    renders = (pixels, classes, torch.arange(6))
    (kept_pixels, kept_classes, kept_ids), wrong = hardest(FixedDigitLogit(), renders, keep=3)
    # margins: digits 5, -3, 0.5; letters -4, 6, -2 -> the letter at 4 (-4), the digit at -3,
    # the letter at 2 (-2)
    assert kept_ids.tolist() == [3, 1, 5]
    assert wrong == 3
    assert IS_DIGIT[kept_classes].tolist() == [False, True, False]
    assert kept_pixels[:, 0, 0, 0].tolist() == [4.0, -3.0, 2.0]


def test_mining_adds_rounds_and_the_same_seed_gives_the_same_tower(tmp_path):
    spec = VisionPretraining(train_renders=128, test_renders=16, steps=6, batch=16,
                             digit_weight=1.0, hard_rounds=2, hard_pool=64, hard_keep=8,
                             hard_steps=2, estimate_renders=50)  # fmt: skip
    report = pretrain_tower(tmp_path / "a", spec)
    assert len(report["hard_pool_wrong_side"]) == 2
    assert set(report["digit_head_finds_needle"]) == {"1024", "4096"}
    assert all(0 <= share <= 1 for share in report["digit_head_finds_needle"].values())
    assert all(0 <= wrong <= 64 for wrong in report["hard_pool_wrong_side"])
    torch.manual_seed(12345)  # the global random state must not matter
    pretrain_tower(tmp_path / "b", spec)
    a, b = (load_file(tmp_path / run / TOWER) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"digit_weight": 0.0, "hard_rounds": 1}, "hard_rounds=1 mines with the digit head"),
        (
            {"digit_weight": 1.0, "hard_rounds": 1, "hard_keep": 10, "hard_pool": 5},
            r"hard_keep \(10\) > hard_pool \(5\)",
        ),  # fmt: skip
        ({"hard_steps": -1}, "hard_steps must be >= 0, got -1"),
    ],
)
def test_a_recipe_that_cannot_mine_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        VisionPretraining(**fields)


def test_needle_found_share_is_the_chance_that_every_letter_scores_lower():
    letters = torch.arange(100, dtype=torch.float32)  # scores 0..99
    assert needle_found_share(torch.tensor([100.0, 200.0]), letters, 4096) == 1.0
    assert needle_found_share(torch.tensor([-1.0]), letters, 2) == 0.0
    # a needle above 90 of the 100 letters beats the one letter of a 2-frame haystack 90% of
    # the time, both letters of a 3-frame one 81%; the share is the mean over the needles
    assert needle_found_share(torch.tensor([89.5]), letters, 2) == pytest.approx(0.9)
    assert needle_found_share(torch.tensor([89.5]), letters, 3) == pytest.approx(0.81)
    needles = torch.tensor([89.5, 100.0, 100.0, 100.0])
    assert needle_found_share(needles, letters, 2) == pytest.approx((0.9 + 3) / 4)
