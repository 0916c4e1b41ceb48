"""What every GPU test shares."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32: no TF32 in matmuls or convolutions (the ViT's patch embedding)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
