"""Token ids in, text out, one token at a time: the text layer of every generation path.

`Detokenizer.push(token_id)` returns the text the new token completes, so that the deltas of a
stream concatenate to the decoded answer:
- never half a character: byte-level BPE splits a multi-byte UTF-8 character (an emoji, a CJK
  character) over several tokens; text is only released once it decodes without a trailing
  U+FFFD, the replacement character of an incomplete byte sequence;
- stop sequences: the text ends right before the first occurrence of any of them (which is not
  part of the answer), and text that could be the beginning of one is held back until the next
  tokens decide, so a client never sees text that is later taken back.
Decoding re-reads only the tokens since the last released character (a window of a few tokens),
so a stream costs O(answer length) in all. Special tokens are skipped, as in
`Processor.decode`. Knows nothing of the model or the engine: `infer.decode` calls it through
`TextWatcher` (push, stopped).
"""

from __future__ import annotations

from collections.abc import Sequence

INCOMPLETE = "\ufffd"
"""What a tokenizer decodes an incomplete UTF-8 byte sequence to."""


def check_stop_sequences(stop: Sequence[str] | str | None) -> tuple[str, ...]:
    """A tuple of non-empty strings (None: none), or ValueError naming the bad entry."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    for k, sequence in enumerate(stop):
        if not isinstance(sequence, str) or not sequence:
            raise ValueError(f"stop[{k}] = {sequence!r}: a stop sequence is a non-empty string")
    return stop


class Detokenizer:
    """Incremental decoding of one answer, with optional stop sequences."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = check_stop_sequences(stop)
        self.token_ids: list[int] = []
        self.text = ""
        """Every character decoded so far (complete characters only)."""
        self.released = 0
        """Characters of `text` handed out."""
        self.stopped = False
        """A stop sequence was found: the answer is complete."""
        self._window_start = 0  # tokens before it are fully reflected in `text`
        self._window_text = ""  # the decoded text of token_ids[_window_start:_window_end]
        self._window_end = 0

    def push(self, token_id: int) -> str:
        """Add one generated token; the text it releases (often "", never after a stop)."""
        if self.stopped:
            raise RuntimeError("push after a stop sequence ended the answer")
        self.token_ids.append(token_id)
        self._decode_new(final=False)
        return self._release()

    def finish(self) -> str:
        """The answer is over (stop token or length): the text still held back, incomplete
        characters included (as U+FFFD, like a full decode), up to a stop sequence that this
        last text completes (then `stopped`)."""
        if self.stopped:
            return ""
        self._decode_new(final=True)
        pending = self.text[self.released :]
        cut = min((pending.find(s) for s in self.stop if s in pending), default=len(pending))
        self.stopped = cut < len(pending)
        self.released = len(self.text)
        return pending[:cut]

    def _decode_new(self, *, final: bool) -> None:
        """Extend `text` with what the tokens after the window's start now decode to."""
        window = self._decode(self.token_ids[self._window_start :])
        if not final and (len(window) <= len(self._window_text) or window.endswith(INCOMPLETE)):
            return  # no new complete character yet
        self.text += window[len(self._window_text) :]
        # the next window starts where this one's decoding is settled (the tokens just used)
        self._window_start, self._window_end = self._window_end, len(self.token_ids)
        self._window_text = self._decode(self.token_ids[self._window_start : self._window_end])

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _release(self) -> str:
        """The next piece of `text` that no stop sequence can still claim."""
        pending = self.text[self.released :]
        if not self.stop:
            self.released = len(self.text)
            return pending
        # released text never ends inside a possible stop sequence, so none can start before it
        found = [(pending.find(s), s) for s in self.stop if s in pending]
        if found:
            cut = min(index for index, _ in found)
            self.stopped = True
            self.released = len(self.text)
            return pending[:cut]
        hold = max((_prefix_overlap(pending, s) for s in self.stop), default=0)
        delta = pending[: len(pending) - hold]
        self.released += len(delta)
        return delta


def _prefix_overlap(text: str, sequence: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `sequence`."""
    for length in range(min(len(text), len(sequence) - 1), 0, -1):
        if sequence.startswith(text[-length:]):
            return length
    return 0
