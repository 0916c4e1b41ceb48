"""Token embedding lookup whose weight gradient is added in place.

With `F.embedding`, the lookup's backward builds a dense [vocab, hidden] gradient that autograd
then adds to the weight's gradient from elsewhere. That happens in every step of a model with
tied embeddings (the LM head's gradient for the shared weight waits, whole, through the
backward of every layer until the lookup's arrives) and in every micro-batch after the first
under gradient accumulation: a second vocab-sized tensor (0.5 GiB for Qwen2.5-0.5B's
151,936 x 896 in fp32) that under FSDP comes on top of the unsharded weight and its gradient.
`embed` instead adds the looked-up rows' gradients into the weight's `.grad`.

How: the lookup reads a detached view of the weight, so the weight's gradient node has only
its other users (the LM head) as inputs and stores their gradient in `.grad` as soon as they
are done; the lookup's backward then index-adds into that `.grad` (or sets it when there is
none). A zero-size anchor that requires grad keeps the lookup's output in the graph.

Made for `.backward()` training, the only way the trainer takes gradients: the lookup's part
lands in `.grad` even under `torch.autograd.grad`, and gradient hooks on the weight (DDP
buckets) do not see it. FSDP2 reads `.grad` once the whole backward of its unit is done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _EmbedIntoGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_ids, weight_data, anchor, weight_holder):
        ctx.save_for_backward(token_ids)
        (ctx.weight,) = weight_holder  # in a tuple: not an input, so no edge to its grad node
        return F.embedding(token_ids, weight_data)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_embeds: torch.Tensor):
        (token_ids,) = ctx.saved_tensors
        weight = ctx.weight
        rows = grad_embeds.reshape(-1, grad_embeds.shape[-1]).to(weight.dtype)  # [N, hidden]
        index = token_ids.reshape(-1)  # [N]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        weight.grad.index_add_(0, index, rows)
        return None, None, None, None


def embed(token_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.embedding(token_ids, weight)`; when training a plain leaf weight, its gradient is
    added into `weight.grad` in place (no second vocab-sized gradient)."""
    trains = torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf
    if not trains or type(weight) not in (torch.Tensor, torch.nn.Parameter):  # e.g. DTensor
        return F.embedding(token_ids, weight)
    anchor = torch.empty(0, device=weight.device, requires_grad=True)
    return _EmbedIntoGrad.apply(token_ids, weight.detach(), anchor, (weight,))
