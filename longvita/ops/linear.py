"""Linear layers for a few rows at a time: batched decode on a CPU.

A decode step of a batch multiplies each weight by a handful of rows (one per sequence). On a
CPU, `F.linear` on 2-4 rows goes through the BLAS's matrix-matrix product, which on the 0.5B's
large weights is slower than the same product written as `weight @ rows.T` (the weight on the
left, read once in its own layout), and slower per product than on 1 row or on 8: figures in
benchmarks/results/serve.md (`benchmarks/small_batch_linear.py`). Which row counts pay depends
on the CPU and its BLAS: on this project's 2-core AMD EPYC, 2-4 rows gained and more rows were
mixed and unstable from run to run; an earlier machine gained up to 32 rows. So
`SmallBatchLinear` takes that path only for inference on a CPU, on 2-4 rows and large weights,
and is `nn.Linear` otherwise (same parameters, same state-dict keys; training never takes it);
`decode_linear` gives the LLM's layers one where the weight is large, a plain `nn.Linear`
elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_BATCH_ROWS = (2, 4)
"""Rows (tokens) for which the weight-on-the-left product is used: 1 row is a GEMV already."""
SMALL_BATCH_MIN_WEIGHT = 1 << 21
"""Weights of fewer elements (2.1M) stay with `F.linear`: the 0.5B's 896 x 896 was as often
slower as faster on the other path, the demo model's are far smaller."""


def use_weight_left(rows: int, weight: torch.Tensor) -> bool:
    """Whether `rows` rows times `weight` should be computed as `weight @ rows.T` (see the
    module's docstring): inference only, on a CPU, a few rows, a large weight."""
    low, high = SMALL_BATCH_ROWS
    return (
        weight.numel() >= SMALL_BATCH_MIN_WEIGHT
        and low <= rows <= high
        and weight.device.type == "cpu"
        and not torch.is_grad_enabled()
    )


def weight_left_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as `weight @ x.T` (+ bias). x [..., in] ->
    [..., out]."""
    columns = x.reshape(-1, x.shape[-1]).T  # [in, rows]
    out = weight @ columns if bias is None else torch.addmm(bias[:, None], weight, columns)
    return out.T.reshape(*x.shape[:-1], weight.shape[0])  # [out, rows] -> [..., out]


def decode_linear(in_features: int, out_features: int, *, bias: bool) -> nn.Linear:
    """A linear layer of the LLM: `SmallBatchLinear` where its weight is large enough for the
    weight-on-the-left path to pay, a plain `nn.Linear` (no per-call check) otherwise."""
    large = in_features * out_features >= SMALL_BATCH_MIN_WEIGHT
    return (SmallBatchLinear if large else nn.Linear)(in_features, out_features, bias=bias)


class SmallBatchLinear(nn.Linear):
    """`nn.Linear` whose inference on a few rows on a CPU uses `weight_left_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_weight_left(x.numel() // x.shape[-1], self.weight):
            return weight_left_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
