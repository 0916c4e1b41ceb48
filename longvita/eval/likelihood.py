"""Teacher-forced scoring: how likely is each continuation after a prompt?

The one likelihood primitive of every evaluation path (`eval mcq`'s option scoring, the
lmms-eval adapter's `loglikelihood`). For a prompt (messages + media) and continuations (the
texts of an assistant answer), the log-probability of each continuation's tokens:

- the prompt is planned and checked by `Pipeline.prepare` (the same Processor and memory check
  as generation), its tiles go through the vision tower once and the prompt is prefilled once
  into a KV cache, chunk by chunk, exactly as for generation;
- each continuation then runs after the cached prompt (the cache is rewound to the prompt's
  length before the next one, so the prompt is never recomputed), and the LM head projects only
  the rows that predict a continuation token: [continuation tokens, vocab] logits at most,
  never [sequence, vocab].

Knows nothing of harnesses or answer formats; one process only (context parallelism is not
supported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longvita.errors import PromptError
from longvita.infer.engine import allocate_cache, feature_stream, prefill
from longvita.infer.request import DEFAULT_PREFILL_CHUNK, DEFAULT_VISION_BATCH, GenerationRequest
from longvita.model.kv_cache import KVCache
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.processing.chat import Messages


@dataclass(frozen=True)
class ContinuationScore:
    """How a model scores one continuation after a prompt."""

    logprob: float
    """Sum over the continuation's tokens of log p(token | prompt, earlier tokens)."""
    num_tokens: int
    is_greedy: bool
    """Whether greedy decoding would produce exactly these tokens."""

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.num_tokens


def score_continuations(
    pipe,
    messages: Messages,
    continuations: Sequence[str],
    images: Sequence | None = None,
    videos: Sequence | None = None,
    *,
    max_frames: int | None = None,
    fps: float | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    vision_batch: int = DEFAULT_VISION_BATCH,
) -> list[ContinuationScore]:
    """The score of each continuation (text right after the assistant header of `messages`),
    in order. The prompt and its media are processed, encoded and prefilled once."""
    if isinstance(continuations, str) or not continuations:
        raise ValueError(
            f"continuations must be a non-empty list of strings, got {continuations!r}"
        )
    token_lists = [pipe.processor.tokenize(text) for text in continuations]
    empty = [text for text, ids in zip(continuations, token_lists, strict=True) if not ids]
    if empty:
        raise ValueError(f"continuations {empty!r} have no token: give non-empty texts")
    longest = max(len(ids) for ids in token_lists)
    request = GenerationRequest.create(
        messages,
        images,
        videos,
        max_new_tokens=longest,
        max_frames=max_frames,
        fps=fps,
        prefill_chunk=prefill_chunk,
        vision_batch=vision_batch,
    )
    prompt, _ = pipe.prepare(request)  # planned and checked against memory for prompt + longest
    limit = pipe.config.max_position_embeddings
    if prompt.num_tokens + longest > limit:
        raise PromptError(
            f"the prompt ({prompt.num_tokens} tokens) and the longest continuation ({longest} "
            f"tokens) exceed the model's {limit} positions; use {prompt.how_to_shorten}"
        )
    model = pipe.model
    with torch.inference_mode():
        cache = allocate_cache(model, prompt.num_tokens + longest, pipe.kv_cache_dtype)
        try:
            stream = feature_stream(
                model, prompt.tiles, prompt.visual_mask, vision_batch=vision_batch
            )
            last = prefill(
                model,
                prompt.input_ids,
                cache,
                stream=stream,
                visual_mask=prompt.visual_mask,
                prefill_chunk=prefill_chunk,
            )  # [1, vocab]: predicts each continuation's first token
        finally:
            prompt.tiles.close()
        return [
            _score_after_prompt(model, cache, last[0], torch.tensor(ids), chunk=prefill_chunk)
            for ids in token_lists
        ]


def _score_after_prompt(
    model: LongVITAForCausalLM,
    cache: KVCache,
    first_logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    chunk: int,
) -> ContinuationScore:
    """One continuation `token_ids` [n] after the prompt held in `cache`; first_logits [vocab]
    are the prompt's last-position logits. Tokens 0..n-2 run through the model (`chunk` at a
    time) to predict tokens 1..n-1; the cache is rewound to the prompt first, and left dirty."""
    prompt_length = cache.length
    device = first_logits.device
    rows = [first_logits[None].float()]  # logits predicting each token: [1, vocab] per piece
    inputs = token_ids[:-1]  # [n - 1]: the last token predicts nothing we score
    for start in range(0, inputs.numel(), chunk):
        piece = inputs[start : start + chunk].to(device)  # [c]
        positions = cache.length + torch.arange(piece.numel(), device=device)  # [c]
        logits = model(
            piece[None],
            position_ids=positions[None],
            attention_fn=cache,
            logit_positions=torch.arange(piece.numel(), device=device),
        )  # [1, c, vocab]
        cache.advance(piece.numel())
        rows.append(logits[0].float())
    cache.length = prompt_length  # rewind: the next continuation overwrites these entries
    logits = torch.cat(rows)  # [n, vocab]
    targets = token_ids.to(device)  # [n]
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]  # [n]
    greedy = bool((logits.argmax(dim=-1) == targets).all())
    return ContinuationScore(float(logprobs.sum()), int(targets.numel()), greedy)
