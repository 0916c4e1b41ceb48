"""`PrefillProgress`: a long prefill logs where it is; a short one says nothing."""

from __future__ import annotations

import logging

from longvita.infer.progress import PrefillProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "longvita.infer.progress"]


def test_a_short_prefill_is_silent(caplog):
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    progress = PrefillProgress(4096, clock=clock, interval_s=10)
    for done in (1024, 2048, 3072, 4096):
        clock.now += 2
        progress.update(done)
    assert _messages(caplog) == []


def test_a_long_prefill_logs_every_interval_and_at_the_end(caplog):
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    progress = PrefillProgress(10_000, 2_000, clock=clock, interval_s=10)  # 2,000 cached
    for done in range(3_000, 10_001, 1_000):  # 1,000 tokens every 4 s
        clock.now += 4
        progress.update(done)
    assert _messages(caplog) == [
        "prefill: 5,000 of 10,000 tokens (250 tokens/s, about 20 s left)",  # at 12 s
        "prefill: 8,000 of 10,000 tokens (250 tokens/s, about 8 s left)",  # at 24 s
        "prefill: 8,000 tokens in 32.0 s (250 tokens/s)",
    ]


def test_other_ranks_stay_silent(caplog):
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    progress = PrefillProgress(100, clock=clock, interval_s=1, enabled=False)
    clock.now += 5
    progress.update(100)
    assert _messages(caplog) == []
