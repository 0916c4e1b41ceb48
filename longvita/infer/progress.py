"""What a long prefill says while it runs: an INFO line every few seconds (tokens done, rate,
time left) and one at the end, for a prompt that takes longer than that; nothing for a short
one, so a server's log does not fill with its requests' prefills."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 10.0


class PrefillProgress:
    """Reports a prefill of `total` prompt tokens of which `done` were cached before it began;
    `update(done)` after each chunk or round. Silent when `enabled` is False (a rank other than
    the first) or until `interval_s` (default `PROGRESS_INTERVAL_S`) has passed."""

    def __init__(
        self,
        total: int,
        done: int = 0,
        *,
        enabled: bool = True,
        interval_s: float | None = None,
        clock=time.monotonic,
    ) -> None:
        self.total = total
        self.first = done
        self.enabled = enabled
        self.interval_s = PROGRESS_INTERVAL_S if interval_s is None else interval_s
        self.clock = clock
        self.started = self.last = clock()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        finished = done >= self.total
        if now - (self.started if finished else self.last) < self.interval_s:
            return
        self.last = now
        elapsed = now - self.started
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        if finished:
            logger.info(
                "prefill: %s tokens in %.1f s (%s tokens/s)",
                f"{done - self.first:,}",
                elapsed,
                f"{rate:,.0f}",
            )
        else:
            left = (self.total - done) / rate if rate > 0 else float("inf")
            logger.info(
                "prefill: %s of %s tokens (%s tokens/s, about %.0f s left)",
                f"{done:,}",
                f"{self.total:,}",
                f"{rate:,.0f}",
                left,
            )
