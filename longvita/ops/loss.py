"""Next-token loss without [sequence, vocab] logits: label shift and the logits-masked LM loss.

Owns the math only: shifting labels into next-token targets, and the summed cross entropy of
the supervised rows projected to the vocabulary chunk by chunk (forward and backward), so that
peak memory is O(chunk_size x vocab) whatever the sequence length and whatever fraction of it
is supervised (and, for comparison, the same loss over full logits: `full_logits_loss`). Both
return (loss_sum, count) and leave the mean, and any all-reduce of the pair across
context-parallel ranks, to the caller; this module knows nothing about torch.distributed.

Order matters (reference/LONGVITA.md section 8): shift the labels over the whole sequence
first, then select the supervised rows (and only then cut the sequence for context
parallelism), so that each answer's first token is predicted from the position before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [..., S] -> next-token targets [..., S]: targets[p] = labels[p+1], last ignored."""
    if labels.dim() < 1:
        raise ValueError(f"labels must have a sequence dimension, got shape {tuple(labels.shape)}")
    targets = torch.full_like(labels, IGNORE_INDEX)  # [..., S]
    targets[..., :-1] = labels[..., 1:]
    return targets


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            "expected hidden [N, H], weight [V, H], targets [N]; got hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"shapes disagree: hidden {tuple(hidden.shape)} [N, H], weight "
            f"{tuple(weight.shape)} [V, H], targets {tuple(targets.shape)} [N]"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")


def _chunk_logits_fp32(hidden_chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[c, H] x [V, H] -> fresh float32 logits [c, V]: matmul in the input dtype, then upcast."""
    logits = hidden_chunk @ weight.t()  # [c, V], input dtype
    return logits if logits.dtype == torch.float32 else logits.float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of rows [M, H] against targets [M]; logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        num_rows = hidden.shape[0]
        lse = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)  # [M]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, num_rows, chunk_size):
            stop = min(start + chunk_size, num_rows)
            logits = _chunk_logits_fp32(hidden[start:stop], weight)  # [c, V] fp32
            target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)  # [c]
            row_max = logits.amax(dim=1)  # [c]
            # In place: the chunk's logits become exp(logits - max); no second [c, V] tensor.
            chunk_lse = logits.sub_(row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)
            del logits
            lse[start:stop] = chunk_lse
            loss_sum += (chunk_lse - target_logit).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return loss_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # [M, H]
        grad_weight = (  # [V, H], accumulated in fp32
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_weight
            else None
        )
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:stop]  # [c, H]
            # d(lse - logit_t)/d logits = softmax - onehot(t), built in place in the logits.
            grad_logits = _chunk_logits_fp32(hidden_chunk, weight)  # [c, V] fp32
            grad_logits.sub_(lse[start:stop, None]).exp_()
            rows = torch.arange(stop - start, device=hidden.device)
            grad_logits[rows, targets[start:stop]] -= 1.0
            grad_logits = grad_logits.to(weight.dtype)  # [c, V]; the same tensor in fp32
            if need_hidden:
                grad_hidden[start:stop] = grad_logits @ weight  # [c, H]
            if need_weight and grad_logits.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), hidden_chunk.float())
            elif need_weight:  # low-precision matmul, fp32 accumulation across chunks
                grad_weight += grad_logits.t() @ hidden_chunk.to(grad_logits.dtype)  # [V, H]
            del grad_logits
        scale = grad_loss.to(torch.float32)
        if need_hidden:
            grad_hidden.mul_(scale.to(grad_hidden.dtype))
        if need_weight:
            grad_weight = grad_weight.mul_(scale).to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def masked_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy over the rows whose target is supervised.

    hidden [N, H] final hidden states, weight [V, H] the LM head, targets [N] already shifted
    (`shift_labels`), IGNORE_INDEX where unsupervised. Only the supervised rows are projected to
    the vocabulary, `chunk_size` rows at a time, in forward and again in backward: no tensor
    larger than [chunk_size, V] exists. Logits are computed in the input dtype and reduced in
    float32. Returns (loss_sum: float32 0-d with autograd to hidden and weight, count: int64
    0-d); the mean is loss_sum / count, taken by the caller (after any all-reduce of both).
    """
    _check_inputs(hidden, weight, targets)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # [M]
    selected_targets = targets.index_select(0, rows).long()  # [M]
    vocab_size = weight.shape[0]
    if rows.numel() and (selected_targets.min() < 0 or selected_targets.max() >= vocab_size):
        raise ValueError(
            f"targets must be in [0, {vocab_size}) or {IGNORE_INDEX}; got range "
            f"[{selected_targets.min().item()}, {selected_targets.max().item()}]"
        )
    # Autograd of index_select scatters the rows' gradients back into a [N, H] zero tensor.
    selected_hidden = hidden.index_select(0, rows)  # [M, H]
    loss_sum = _ChunkedCrossEntropy.apply(selected_hidden, weight, selected_targets, chunk_size)
    count = torch.tensor(rows.numel(), dtype=torch.int64, device=targets.device)
    return loss_sum, count


def full_logits_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same loss the usual way: full [N, V] logits, upcast to float32, F.cross_entropy.

    The contract of `masked_lm_loss`; memory grows with N x V. What the official stages 1-3
    compute (a stage's `loss.logits_masked: false`), and the reference the masked head is
    tested against.
    """
    _check_inputs(hidden, weight, targets)
    logits = (hidden @ weight.t()).float()  # [N, V]
    loss_sum = F.cross_entropy(logits, targets.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum().to(torch.int64)
    return loss_sum, count
