"""The server's Prometheus metrics, in the text exposition format 0.0.4, with no dependency.

Owns `Counter`, `Gauge` and `Histogram` (fixed buckets), each with optional label names, a
`Registry` that renders them for `GET /metrics` (`CONTENT_TYPE`), and `ServerMetrics`, the set
`longvita serve` keeps. Every metric has its own lock, so handlers and the model worker may
update them from any thread. Knows nothing of HTTP or the model.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: from a short answer's first token to a long video's whole answer."""
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def format_value(value: float) -> str:
    """A sample value: integers without a decimal point, +Inf/-Inf/NaN as Prometheus spells."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value == int(value) and abs(value) < 2**53 else repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"metric name {name!r} is not a valid Prometheus name")
        for label in labels:
            if not _LABEL.fullmatch(label) or label.startswith("__") or label == "le":
                raise ValueError(f"label name {label!r} of {name} is not allowed")
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], Any] = {}
        if not labels:  # an unlabelled metric is exposed from the start
            self._values[()] = self._initial()

    def _initial(self) -> Any:
        return 0.0

    def _key(self, labels: dict[str, object]) -> tuple[str, ...]:
        if not labels and not self.label_names:
            return ()
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def _labels(self, key: tuple[str, ...], extra: str = "") -> str:
        named = zip(self.label_names, key, strict=True)
        pairs = [f'{n}="{escape_label_value(v)}"' for n, v in named] + ([extra] if extra else [])
        return "{" + ",".join(pairs) + "}" if pairs else ""

    def _add(self, amount: float, labels: dict[str, object]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> Any:
        with self._lock:
            return self._values.get(self._key(labels), self._initial())

    def render(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines = [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            lines += self._samples(key, value)
        return lines

    def _samples(self, key: tuple[str, ...], value: Any) -> list[str]:
        return [f"{self.name}{self._labels(key)} {format_value(value)}"]


class Counter(_Metric):
    """A total that only goes up."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (inc by {amount})")
        self._add(amount, labels)


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels: object) -> None:
        self._add(-amount, labels)


class Histogram(_Metric):
    """Observations counted in fixed buckets (upper bounds, `le`), with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        if not buckets or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"{name}: buckets must be increasing and distinct, got {buckets}")
        self.buckets = tuple(float(b) for b in buckets if not math.isinf(b))
        super().__init__(name, help, labels)

    def _initial(self) -> list[float]:
        return [0] * (len(self.buckets) + 1) + [0.0]  # per-bucket counts, +Inf count, sum

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        slot = next((i for i, bound in enumerate(self.buckets) if value <= bound), -1)
        with self._lock:
            state = self._values.setdefault(key, self._initial())
            state[slot if slot >= 0 else len(self.buckets)] += 1
            state[-1] += value

    def value(self, **labels: object) -> list[float]:
        return list(super().value(**labels))

    def _samples(self, key: tuple[str, ...], value: list[float]) -> list[str]:
        counts, total = value[:-1], value[-1]
        bounds = [format_value(b) for b in self.buckets] + ["+Inf"]
        lines, cumulative = [], 0
        for bound, count in zip(bounds, counts, strict=True):
            cumulative += count
            le = f'le="{bound}"'
            lines.append(f"{self.name}_bucket{self._labels(key, le)} {cumulative}")
        lines.append(f"{self.name}_sum{self._labels(key)} {format_value(total)}")
        lines.append(f"{self.name}_count{self._labels(key)} {cumulative}")
        return lines


class Registry:
    """The metrics one `/metrics` endpoint renders, in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: _Metric) -> Any:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(line + "\n" for metric in metrics for line in metric.render())


class ServerMetrics:
    """The metrics of `longvita serve`. Times are `time.monotonic()` seconds."""

    def __init__(self, registry: Registry | None = None, *, window_s: float = 10.0) -> None:
        self.registry = registry or Registry()
        add = self.registry.register
        self.requests = add(Counter("longvita_requests_total", "Requests by status.", ("status",)))
        self.queue_depth = add(Gauge("longvita_queue_depth", "Requests waiting for the model."))
        self.running = add(Gauge("longvita_running_requests", "Requests the model is running."))
        self.decode_pool_bytes = add(
            Gauge(
                "longvita_decode_pool_bytes",
                "Memory of the decode pool: decoding sequences' KV caches side by side.",
            )
        )
        self.prompt_tokens = add(Counter("longvita_prompt_tokens_total", "Prompt tokens."))
        self.generated_tokens = add(Counter("longvita_generated_tokens_total", "Tokens generated."))
        self.time_to_first_token = add(
            Histogram("longvita_time_to_first_token_seconds", "Request arrival to first token.")
        )
        self.request_latency = add(
            Histogram("longvita_request_latency_seconds", "Request arrival to last token.")
        )
        self.tokens_per_second = add(
            Gauge(
                "longvita_generation_tokens_per_second",
                f"Tokens generated per second over the last {window_s:g} s.",
            )
        )
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens)
        self._recent_tokens = 0  # the sum of the tokens in _recent
        self._lock = threading.Lock()

    def record_tokens(self, n: int, now: float) -> None:
        """Count `n` generated tokens (the total and the recent rate) at time `now`; the rate
        gauge itself is brought up to date when it is read (`render`, `update_rate`)."""
        self.generated_tokens.inc(n)
        with self._lock:
            self._recent.append((now, n))
            self._recent_tokens += n
            self._forget_before(now - self.window_s)

    def update_rate(self, now: float) -> float:
        """Set and return the generation rate: tokens in the last `window_s` over `window_s`."""
        with self._lock:
            self._forget_before(now - self.window_s)
            rate = self._recent_tokens / self.window_s
        self.tokens_per_second.set(rate)
        return rate

    def _forget_before(self, start: float) -> None:
        """Drop the recent counts at or before `start` (the lock is held)."""
        while self._recent and self._recent[0][0] <= start:
            self._recent_tokens -= self._recent.popleft()[1]

    def render(self, now: float | None = None) -> str:
        """The exposition text, with the generation rate brought up to `now`."""
        self.update_rate(time.monotonic() if now is None else now)
        return self.registry.render()
