"""Many sequences on one model at once: continuous batching with chunked prefill.

The engine of the server (one process, one device). Each step is one forward over a *packed*
row of tokens: the next token of every decoding sequence, then prompt chunks of sequences still
prefilling, up to `step_tokens` tokens in all. Every sequence keeps its own KV cache
(`model.kv_cache.KVCache`, sized for its prompt + max_new_tokens) and positions; in the forward,
each segment of the row attends to its own cache only (`PackedCaches`), so sequences of any
lengths share the linear layers' work without padding and without seeing each other. Once its
prompt is read, a sequence's cache moves into a slot of the engine's `DecodePool` when it fits
(`infer.decode_pool`), and the decode tokens of the pooled sequences attend in one call per
layer. The tiles that the step's prompt chunks need go through the ViT together, whichever
prompts they belong to. A sequence joins between steps, leaves when finished, cancelled or past
its deadline, and a long prompt is prefilled a chunk per step while the others keep getting
tokens.

Per-sequence decisions (sampling with its own seed, stop tokens, stop sequences through its
`Detokenizer`, the length limit) are `decode.Continuation`'s, as in the one-sequence loop, so a
sequence gets the tokens it would get alone (greedy: the same up to float rounding of the
batched matmuls). A sequence whose prompt starts like a recent one (`infer.prefix_cache`,
through its runner) starts with that prefix copied into its cache and prefills only the rest.
Knows nothing of HTTP or threads: the server's worker calls `add` and `step` from one thread and
hands each `TokenStep` to its client through the sequence's callbacks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longvita.infer.decode import Continuation, TokenStep
from longvita.infer.decode_pool import DEFAULT_POOL_TOKENS, DecodePool, PooledRows
from longvita.infer.engine import LocalRunner
from longvita.model.kv_cache import KVCache
from longvita.model.long_vita import LongVITAForCausalLM

DEFAULT_STEP_TOKENS = 512
"""Tokens per batched forward: decode tokens first, prompt chunks in what is left."""
MIN_POOLED_ROWS = 3
"""Pooled decode tokens from which a step attends through the pool in one call per layer;
below, each attends in its own slot's cache (the pool's indexing and mask cost more than one
or two plain calls: `benchmarks/results/serve.md`, decode pool)."""


@dataclass(eq=False)
class BatchSequence:
    """One request in the batch: its prompt runner (cache, tiles, sampler), its continuation,
    where it stands, and how its tokens reach the client."""

    runner: LocalRunner
    continuation: Continuation
    on_step: Callable[[TokenStep], None]
    """Called with each new token (and the held-back text at the end, token_id None)."""
    on_finish: Callable[[str, Exception | None], None]
    """Called once with the stop reason ("stop_token", "stop_sequence", "length", "cancelled",
    "timeout" or "error") and, for "error", the exception."""
    deadline: float = float("inf")
    """time.monotonic() after which the sequence is ended with "timeout"."""
    cancelled: bool = False
    """Set from any thread (the client went away): the sequence leaves at the next step."""
    prefilled: int = 0
    """Prompt tokens already in the cache (from the prefix cache when it starts)."""
    next_token: int | None = None
    """The token chosen last, to be fed at the next step."""

    @property
    def prompt_tokens(self) -> int:
        return self.runner.input_ids.numel()

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.prompt_tokens


@dataclass
class Segment:
    """A sequence's tokens in a packed step: [offset, offset + length) of the row."""

    sequence: BatchSequence
    offset: int
    length: int
    positions: torch.Tensor
    """[length] the tokens' positions in their own sequence."""
    needs_logits: bool
    """A decode token, or the chunk that ends a prompt: its last token chooses the next."""
    pooled: bool = False
    """A decode token of a sequence whose cache is a slot of the engine's `DecodePool`."""
    input_ids: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None
    """[length] bool where the segment has visual features, else None."""
    features: torch.Tensor | None = None
    """[num_visual_slots, hidden] of the segment's positions, or None."""


class PackedCaches:
    """Attention strategy of a packed row: segment i attends to cache i (and stores its keys
    and values there), never to another segment. The first `pooled.count` rows, decode tokens
    of pooled sequences, go through the pool in one call per layer."""

    def __init__(
        self,
        spans: list[tuple[KVCache, int, int]],
        pool: DecodePool | None = None,
        pooled: PooledRows | None = None,
    ) -> None:
        self.spans = spans  # (cache, start, end) in the packed row
        self.pool, self.pooled = pool, pooled

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int
    ) -> torch.Tensor:
        """q [1, heads, T, head_dim], k, v [1, kv_heads, T, head_dim] -> [1, heads, T, head_dim]."""
        outs = []
        if self.pooled is not None:
            n = self.pooled.count
            rows = q[:, :, :n], k[:, :, :n], v[:, :, :n]
            outs.append(self.pool.attend(*rows, layer_idx, self.pooled))
        outs += [
            cache(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], layer_idx)
            for cache, start, end in self.spans
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class BatchEngine:
    """The running and waiting sequences of one model, advanced one packed forward per `step`."""

    def __init__(
        self,
        model: LongVITAForCausalLM,
        *,
        max_batch: int = 32,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        pool_tokens: int = DEFAULT_POOL_TOKENS,
    ) -> None:
        if max_batch < 1 or step_tokens < 1 or pool_tokens < 0:
            raise ValueError(
                f"need max_batch, step_tokens >= 1 and pool_tokens >= 0, got {max_batch=}, "
                f"{step_tokens=}, {pool_tokens=}"
            )
        self.model = model
        self.max_batch = max_batch
        self.step_tokens = step_tokens
        self.device = model.lm_head.weight.device
        config = model.config
        self.pool = None
        """Slots where decoding sequences' caches move (`infer.decode_pool`); None: off."""
        if pool_tokens > 0:
            self.pool = DecodePool(
                num_layers=config.num_hidden_layers,
                num_kv_heads=config.num_key_value_heads,
                head_dim=config.head_dim,
                slots=max_batch,
                dtype=model.lm_head.weight.dtype,
                device=self.device,
                max_tokens=pool_tokens,
            )
        self.waiting: deque[BatchSequence] = deque()
        self.running: list[BatchSequence] = []
        self.steps = 0

    def add(self, sequence: BatchSequence) -> None:
        """Queue a sequence; it starts prefilling when a slot is free."""
        self.waiting.append(sequence)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def step(self) -> int:
        """One forward over the decoding sequences' next tokens and prompt chunks; the number
        of tokens it ran (0 when there was nothing to do)."""
        self._drop_ended()
        while self.waiting and len(self.running) < self.max_batch:
            self._start(self.waiting.popleft())
        segments = self._with_inputs(self._schedule())
        if not segments:
            return 0
        try:
            logits = self._forward(segments)
        except Exception as err:  # noqa: BLE001 - every sequence of the step gets the error
            for segment in segments:
                self._end(segment.sequence, "error", err)
            return 0
        choosing = [segment.sequence for segment in segments if segment.needs_logits]
        greedy = [sequence.continuation.greedy for sequence in choosing]
        argmax = logits.argmax(dim=-1).tolist() if any(greedy) else []  # one call, one sync
        for k, (sequence, row) in enumerate(zip(choosing, logits, strict=True)):
            self._advance(sequence, row[None], argmax[k] if greedy[k] else None)
        self.steps += 1
        return sum(segment.length for segment in segments)

    def close(self) -> None:
        """End every sequence as cancelled (the server is shutting down: a 503, not a 500)."""
        for sequence in [*self.running, *self.waiting]:
            self._end(sequence, "cancelled")
        self.waiting.clear()

    def _start(self, sequence: BatchSequence) -> None:
        """Run the sequence: its cached prefix copied in (the prefix cache), prefill after it."""
        try:
            sequence.prefilled = sequence.runner.start()
        except Exception as err:  # noqa: BLE001 - that request fails, not the step
            self._end(sequence, "error", err)
            return
        self.running.append(sequence)

    def _schedule(self) -> list[Segment]:
        """Decode tokens first (one per decoding sequence), then prompt chunks, oldest first, in
        the tokens left of the step (at least a quarter of it, so prompts always progress)."""
        segments: list[Segment] = []
        decoding = [sequence for sequence in self.running if not sequence.prefilling]
        pooled = {id(s) for s in decoding if self.pool and self.pool.holds(s.runner.cache)}
        if len(pooled) < MIN_POOLED_ROWS:  # too few to gain: each attends in its slot alone
            pooled = set()
        decoding.sort(key=lambda sequence: id(sequence) not in pooled)  # the pool's rows first
        for offset, sequence in enumerate(decoding):
            position = torch.tensor([sequence.runner.cache.length])
            in_pool = id(sequence) in pooled
            segments.append(Segment(sequence, offset, 1, position, True, pooled=in_pool))
        offset = len(decoding)
        budget = max(self.step_tokens - offset, self.step_tokens // 4, 1)
        for sequence in self.running:
            if budget == 0:
                break
            if sequence.prefilling:
                start = sequence.prefilled
                length = min(sequence.prompt_tokens - start, budget)
                positions = torch.arange(start, start + length)
                ends = start + length == sequence.prompt_tokens
                segments.append(Segment(sequence, offset, length, positions, needs_logits=ends))
                offset += length
                budget -= length
        return segments

    @torch.inference_mode()
    def _with_inputs(self, segments: list[Segment]) -> list[Segment]:
        """Each segment's token ids, visual mask and visual features (the new tiles of every
        prompt chunk in one ViT call, `_encode_tiles`); a sequence whose media fail to decode
        (a corrupt frame) ends with the error, alone, and the offsets of the others close up."""
        encoded, failed = self._encode_tiles(segments)
        kept, offset = [], 0
        for segment in segments:
            sequence = segment.sequence
            if id(sequence) in failed:
                continue
            try:
                self._inputs(segment, encoded.get(id(sequence)))
            except Exception as err:  # noqa: BLE001 - that request fails, not the step
                self._end(sequence, "error", err)
                continue
            segment.offset = offset
            offset += segment.length
            kept.append(segment)
        return kept

    def _encode_tiles(self, segments: list[Segment]) -> tuple[dict, set[int]]:
        """The tiles the step's prompt chunks need, through the ViT together when two or more
        prompts have some (one prompt encodes its own, as alone): ({id(sequence): {tile id:
        features}}, ids of the sequences ended here because their media failed to load). The
        ViT runs on at most the smallest `vision_batch` of those prompts at a time."""
        pending = []  # (sequence, its stream, the tile ids it needs)
        for segment in segments:
            sequence, stream = segment.sequence, segment.sequence.runner.stream
            if not sequence.prefilling or stream is None or not stream.encodes_pixels:
                continue
            if tile_ids := stream.tiles_to_encode(segment.positions):
                pending.append((sequence, stream, tile_ids))
        if len(pending) < 2:
            return {}, set()
        loaded, failed = [], set()
        for sequence, stream, tile_ids in pending:
            try:
                loaded.append((sequence, tile_ids, stream.tiles.get(tile_ids)))
            except Exception as err:  # noqa: BLE001 - that request fails, not the step
                self._end(sequence, "error", err)
                failed.add(id(sequence))
        if not loaded:
            return {}, failed
        pixels = torch.cat([tiles for _, _, tiles in loaded]).to(self.device)  # [n, 3, S, S]
        batch = min(stream.vision_batch for _, stream, _ in pending)
        try:
            features = torch.cat(
                [
                    self.model.model.encode_tiles(pixels[start : start + batch])
                    for start in range(0, len(pixels), batch)
                ]
            )  # [n, tokens_per_tile, hidden]
        except Exception as err:  # noqa: BLE001 - those requests fail, not the step
            for sequence, _, _ in loaded:
                self._end(sequence, "error", err)
                failed.add(id(sequence))
            return {}, failed
        encoded, start = {}, 0
        for sequence, tile_ids, _ in loaded:
            stop = start + len(tile_ids)
            encoded[id(sequence)] = dict(zip(tile_ids, features[start:stop], strict=True))
            start = stop
        return encoded, failed

    def _inputs(self, segment: Segment, encoded: dict | None) -> None:
        sequence, runner = segment.sequence, segment.sequence.runner
        if not sequence.prefilling:
            segment.input_ids = torch.tensor([sequence.next_token])
            return
        segment.input_ids = runner.input_ids[segment.positions]
        if runner.stream is not None:
            segment.features = runner.stream.features(segment.positions, encoded)
            if segment.features is not None:
                segment.visual_mask = runner.visual_mask[segment.positions]

    @torch.inference_mode()
    def _forward(self, segments: list[Segment]) -> torch.Tensor:
        """The packed row through the model -> logits [n, vocab] of the segments that need
        them (decode tokens and prompts' last chunks), in segment order."""
        features = [s.features for s in segments if s.features is not None]
        visual_mask = None
        if features:
            masks = [
                torch.zeros(s.length, dtype=torch.bool) if s.visual_mask is None else s.visual_mask
                for s in segments
            ]
            visual_mask = torch.cat(masks).to(self.device)[None]  # [1, T]
        input_ids = torch.cat([s.input_ids for s in segments]).to(self.device)[None]  # [1, T]
        positions = torch.cat([s.positions for s in segments]).to(self.device)[None]  # [1, T]
        logit_rows = [s.offset + s.length - 1 for s in segments if s.needs_logits]
        pooled = [s.sequence.runner.cache for s in segments if s.pooled]
        spans = [
            (s.sequence.runner.cache, s.offset, s.offset + s.length)
            for s in segments
            if not s.pooled
        ]
        rows = self.pool.rows(pooled) if pooled else None
        logits = self.model(
            input_ids,
            position_ids=positions,
            visual_mask=visual_mask,
            visual_features=torch.cat(features) if features else None,
            attention_fn=PackedCaches(spans, self.pool, rows),
            logit_positions=torch.tensor(logit_rows, dtype=torch.long, device=self.device),
        )  # [1, n, vocab]
        for segment in segments:
            sequence = segment.sequence
            sequence.runner.cache.advance(segment.length)
            if sequence.prefilling:
                sequence.prefilled += segment.length
                if not sequence.prefilling:
                    sequence.runner.prefilled()  # free the decoders, keep the prompt's cache
                    self._to_pool(sequence)
        return logits[0]

    def _to_pool(self, sequence: BatchSequence) -> None:
        """Move a sequence that starts decoding into a slot of the pool, when it fits."""
        runner = sequence.runner
        pooled = None if self.pool is None else self.pool.admit(runner.cache)
        if pooled is not None:
            runner.move_cache(pooled)

    def _advance(self, sequence: BatchSequence, logits: torch.Tensor, chosen: int | None) -> None:
        """Choose the sequence's next token from logits [1, vocab] (`chosen`: the greedy one,
        taken for the whole step) and hand it out."""
        step = sequence.continuation.next(logits, chosen)
        if step is not None:
            sequence.on_step(step)
            sequence.next_token = step.token_id
        continuation = sequence.continuation
        if continuation.finished:
            if continuation.tail:
                sequence.on_step(TokenStep(None, text=continuation.tail))
            self._end(sequence, continuation.stop_reason)

    def _drop_ended(self) -> None:
        now = time.monotonic()
        for sequence in [*self.running, *self.waiting]:
            if sequence.cancelled:
                self._end(sequence, "cancelled")
            elif now > sequence.deadline:
                self._end(sequence, "timeout")

    def _end(self, sequence: BatchSequence, reason: str, error: Exception | None = None) -> None:
        sequence.runner.close()
        if self.pool is not None and self.pool.holds(sequence.runner.cache):
            self.pool.release(sequence.runner.cache)
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        sequence.on_finish(reason, error)
