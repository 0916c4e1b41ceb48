"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling.

Pure functions of logits and a torch.Generator (the seed lives with the caller).
"""

from __future__ import annotations

import torch


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits of each row [batch, vocab] (0 = keep all)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [batch, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = keep all)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [batch, vocab]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better-ranked tokens
    drop_sorted = mass_before >= top_p  # the best token always stays (mass_before = 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] token ids. temperature 0 is greedy (argmax)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # the best logit becomes 0 first: a tiny temperature then makes the others -inf, not
    # inf - inf = nan (softmax is the same for any shift)
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    scaled = filter_top_p(filter_top_k(scaled, top_k), top_p)
    probs = scaled.softmax(dim=-1)  # [batch, vocab]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
