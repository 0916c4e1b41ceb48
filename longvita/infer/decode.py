"""Decoding one sequence, token by token, on any runner: the part of generation that knows
nothing of prefill, caches or ranks.

- `SequenceRunner`, what one process does for one sequence: `prefill` the prompt, `choose` the
  next token from logits, `feed` a chosen token back. `infer.engine.LocalRunner` is one process
  with the whole KV cache; `infer.cp_engine.ShardedRunner` is one rank of a context-parallel
  group.
- `Continuation`, what each step decides for one sequence: the next token (`Sampler`), and
  whether a stop token, a stop sequence (through a `TextWatcher`, the text layer) or the length
  limit ends it; shared by the one-sequence loop below and the server's batched one
  (`infer.batch`).
- `TokenStream`, the decode loop over a runner, and `GenerationStream` around it: the new
  tokens one by one (with their text), then the whole `GenerationOutput`; `run_to_end` drains
  it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from longvita.infer.request import GenerationOutput, SamplingParams
from longvita.ops.sampling import sample_next_token


class Sampler:
    """Chooses the next token from logits: greedy, or seeded temperature / top-k / top-p."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, vocab] -> token [1] int64."""
        params = self.params
        return sample_next_token(
            logits,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            generator=self.generator,
        )


@dataclass
class RunnerStats:
    """What one sequence cost, per rank in rank order (one entry in a single process)."""

    kv_cache_bytes: list[int]
    kv_cache_tokens: list[int]
    tiles_encoded: list[int]
    prefill_rounds: int
    cached_tokens: int = 0
    """Prompt tokens taken from the prefix cache instead of prefilled."""


class SequenceRunner(Protocol):
    """One process's share of generating one sequence (all of it, or a rank's)."""

    def prefill(self) -> torch.Tensor:
        """Run the prompt; the logits [1, vocab] of its last token (the same on every rank)."""
        ...

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token [1] int64 (the same on every rank)."""
        ...

    def feed(self, token: torch.Tensor, step: int) -> torch.Tensor:
        """Run decoded token `step` (0-based) [1] -> the logits [1, vocab] after it."""
        ...

    def stats(self) -> RunnerStats:
        """Cache sizes and tiles encoded (a collective under context parallelism)."""
        ...

    def close(self) -> None:
        """Release the media decoders (called in a `finally`)."""
        ...


@dataclass
class TokenStep:
    """One new token, or (token_id None) the text held back until the answer ended."""

    token_id: int | None
    logits: torch.Tensor | None = None
    """float32 [vocab] on the CPU: the raw logits it was chosen from, when scores are kept."""
    text: str = ""
    """The text this token releases (`TextWatcher.push`; "" without one)."""


class TextWatcher(Protocol):
    """The text layer of a stream (`infer.detokenize.Detokenizer`): decodes the tokens as they
    come and says when a stop sequence has ended the answer."""

    stopped: bool

    def push(self, token_id: int) -> str: ...

    def finish(self) -> str: ...


class Continuation:
    """What follows a prompt, decided one token at a time: each logits row -> the next token,
    until a stop token (unless `params.ignore_eos`), a stop sequence (with a `TextWatcher`) or
    the length limit.

    The per-sequence logic every decode loop shares (`TokenStream` for one sequence, the
    server's batch of many). After `finished`, `stop_reason` is "stop_token", "stop_sequence"
    or "length", and `tail` the text a watcher still held.
    """

    def __init__(
        self,
        choose: Callable[[torch.Tensor], torch.Tensor],
        params: SamplingParams,
        stop_ids: tuple[int, ...],
        *,
        text: TextWatcher | None = None,
        keep_logits: bool = False,
    ) -> None:
        self.choose = choose
        self.greedy = params.temperature <= 0.0
        """`choose` is the argmax: a batch may pick this sequence's token with its others'."""
        self.max_new_tokens = params.max_new_tokens
        self.stop_ids = frozenset() if params.ignore_eos else frozenset(stop_ids)
        self.text = text
        self.keep_logits = keep_logits
        self.num_tokens = 0
        self.stop_reason = ""
        self.tail = ""

    @property
    def finished(self) -> bool:
        return bool(self.stop_reason)

    def next(self, logits: torch.Tensor, chosen: int | None = None) -> TokenStep | None:
        """The token chosen from logits [1, vocab] (or `chosen`, the argmax of these logits
        already taken by a batch for a `greedy` sequence); None when it is a stop token."""
        if self.finished:
            raise RuntimeError(f"the sequence is finished ({self.stop_reason})")
        token_id = int(self.choose(logits)) if chosen is None else chosen
        if token_id in self.stop_ids:
            self._finish("stop_token")
            return None
        self.num_tokens += 1
        step = TokenStep(token_id, logits[0].float().cpu() if self.keep_logits else None)
        if self.text is not None:
            step.text = self.text.push(token_id)
            if self.text.stopped:
                self._finish("stop_sequence")
        if not self.finished and self.num_tokens == self.max_new_tokens:
            self._finish("length")
        return step

    def _finish(self, reason: str) -> None:
        if self.text is not None:
            self.tail = self.text.finish()
            if self.text.stopped:  # the text held back until now completed a stop sequence
                reason = "stop_sequence"
        self.stop_reason = reason


class TokenStream:
    """The new tokens of one sequence, one per iteration; the prompt is prefilled on the first.

    After the iteration ends, `continuation.stop_reason` ("stop_token", "stop_sequence" or
    "length"), `prefill_seconds` and `decode_seconds` say how it went. The stop token is not
    yielded.
    """

    def __init__(self, runner: SequenceRunner, continuation: Continuation) -> None:
        self.runner = runner
        self.continuation = continuation
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    def __iter__(self) -> Iterator[TokenStep]:
        start = time.perf_counter()
        logits = self.runner.prefill()  # [1, vocab]
        self.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        try:
            while True:
                step = self.continuation.next(logits)
                if step is not None:
                    yield step
                if self.continuation.finished:
                    return
                token = torch.tensor([step.token_id])
                logits = self.runner.feed(token, self.continuation.num_tokens - 1)
        finally:
            self.decode_seconds = time.perf_counter() - start


class GenerationStream:
    """The tokens of one sequence as they come (`TokenStep`s, with their text when a watcher
    decodes them), then, once iterated to the end, the whole `output` (a GenerationOutput:
    tokens, text, scores, timings, cache statistics). Closes the runner when done or dropped.

    The one decode loop of every path: `Pipeline.generate` drains it, `Pipeline.stream` hands
    it out, a context-parallel rank runs it with a `ShardedRunner`.
    """

    def __init__(
        self,
        runner: SequenceRunner,
        continuation: Continuation,
        *,
        vocab_size: int,
        finalize: Callable[[GenerationOutput], GenerationOutput] | None = None,
    ) -> None:
        self.tokens = TokenStream(runner, continuation)
        self.vocab_size = vocab_size
        self.finalize = finalize
        self.output: GenerationOutput | None = None
        """Set when the iteration has ended."""
        self._steps: Iterator[TokenStep] | None = None

    def __iter__(self) -> Iterator[TokenStep]:
        if self._steps is None:
            self._steps = self._generate()
        return self._steps

    def close(self) -> None:
        """Stop early: release the runner (its KV cache and media decoders)."""
        if self._steps is not None:
            self._steps.close()
        self.tokens.runner.close()

    def _generate(self) -> Iterator[TokenStep]:
        steps: list[TokenStep] = []
        continuation = self.tokens.continuation
        runner = self.tokens.runner
        try:
            for step in self.tokens:
                steps.append(step)
                yield step
            if continuation.tail:  # text a watcher held back until the end
                yield TokenStep(None, text=continuation.tail)
            stats = runner.stats()
        finally:
            runner.close()
        self.output = self._output(steps, stats)
        if self.finalize is not None:
            self.output = self.finalize(self.output)

    def run(self) -> GenerationOutput:
        """Iterate to the end; the output."""
        for _ in self:
            pass
        return self.output

    def _output(self, steps: list[TokenStep], stats: RunnerStats) -> GenerationOutput:
        continuation = self.tokens.continuation
        scores = None
        if continuation.keep_logits:
            logits = [step.logits for step in steps]
            scores = torch.stack(logits) if logits else torch.zeros(0, self.vocab_size)
        return GenerationOutput(
            token_ids=[step.token_id for step in steps],
            text="".join(step.text for step in steps) + continuation.tail,
            scores=scores,
            stop_reason=continuation.stop_reason,
            prefill_seconds=self.tokens.prefill_seconds,
            decode_seconds=self.tokens.decode_seconds,
            cp=len(stats.kv_cache_bytes),
            prefill_rounds=stats.prefill_rounds,
            kv_cache_bytes_per_rank=stats.kv_cache_bytes,
            kv_cache_tokens_per_rank=stats.kv_cache_tokens,
            tiles_encoded_per_rank=stats.tiles_encoded,
            cached_tokens=stats.cached_tokens,
        )


def run_to_end(
    runner: SequenceRunner,
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    *,
    return_scores: bool,
    vocab_size: int,
) -> GenerationOutput:
    """One sequence's tokens, scores, timings and cache statistics, without a text layer."""
    continuation = Continuation(runner.choose, params, stop_ids, keep_logits=return_scores)
    return GenerationStream(runner, continuation, vocab_size=vocab_size).run()
