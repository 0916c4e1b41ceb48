"""The server's Prometheus metrics (longvita.serve.metrics): the text exposition format 0.0.4
(every line parsed by a regex), cumulative buckets, label escaping, thread safety and the
windowed generation rate."""

from __future__ import annotations

import re
import threading

import pytest

from longvita.serve.metrics import (
    Counter,
    Gauge,
    Histogram,
    Registry,
    ServerMetrics,
    format_value,
)

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?(?:e[+-]?\d+)?|Inf)|NaN)"
SAMPLE = re.compile(rf"({NAME})(\{{{LABEL}(?:,{LABEL})*\}})? ({VALUE})")
HELP = re.compile(rf"# HELP ({NAME}) (?:[^\\\n]|\\[\\n])*")
TYPE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|histogram)")


def parse(text: str) -> dict[str, float]:
    """{sample name + labels: value}, asserting every line is well formed and every sample
    belongs to a metric announced by HELP and TYPE lines."""
    assert text.endswith("\n")
    samples, typed = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP"):
            assert HELP.fullmatch(line), line
        elif line.startswith("# TYPE"):
            match = TYPE.fullmatch(line)
            assert match, line
            typed[match[1]] = match[2]
        else:
            match = SAMPLE.fullmatch(line)
            assert match, line
            base = re.sub(r"_(bucket|sum|count)$", "", match[1])
            assert match[1] in typed or typed.get(base) == "histogram", line
            samples[match[1] + (match[2] or "")] = float(match[3])
    return samples


def test_server_metrics_render():
    metrics = ServerMetrics()
    metrics.requests.inc(status=200)
    metrics.requests.inc(status=200)
    metrics.requests.inc(status=503)
    metrics.queue_depth.set(3)
    metrics.running.inc()
    metrics.prompt_tokens.inc(120)
    metrics.time_to_first_token.observe(0.07)
    metrics.request_latency.observe(1.5)
    metrics.record_tokens(20, now=100.0)
    samples = parse(metrics.render(now=101.0))
    assert samples['longvita_requests_total{status="200"}'] == 2
    assert samples['longvita_requests_total{status="503"}'] == 1
    assert samples["longvita_queue_depth"] == 3
    assert samples["longvita_running_requests"] == 1
    assert samples["longvita_prompt_tokens_total"] == 120
    assert samples["longvita_generated_tokens_total"] == 20
    assert samples["longvita_generation_tokens_per_second"] == 2.0
    assert samples['longvita_time_to_first_token_seconds_bucket{le="0.1"}'] == 1
    assert samples["longvita_request_latency_seconds_count"] == 1
    assert samples["longvita_request_latency_seconds_sum"] == 1.5


def test_unlabelled_metrics_are_exposed_from_the_start():
    samples = parse(ServerMetrics().render(now=0.0))
    assert samples["longvita_queue_depth"] == 0
    assert samples['longvita_request_latency_seconds_bucket{le="+Inf"}'] == 0
    assert not any(name.startswith("longvita_requests_total") for name in samples)


def test_histogram_buckets_are_cumulative():
    registry = Registry()
    latency = registry.register(Histogram("lat_seconds", "Latency.", buckets=(0.1, 1.0, 10.0)))
    for value in (0.05, 0.1, 0.5, 3.0, 3.0, 99.0):
        latency.observe(value)
    samples = parse(registry.render())
    buckets = [samples[f'lat_seconds_bucket{{le="{le}"}}'] for le in ("0.1", "1", "10", "+Inf")]
    assert buckets == [2, 3, 5, 6]
    assert samples["lat_seconds_count"] == 6
    assert samples["lat_seconds_sum"] == pytest.approx(105.65)
    assert latency.value() == [2, 1, 2, 1, pytest.approx(105.65)]


def test_labelled_histogram():
    histogram = Histogram("h", "H.", ("route",), buckets=(1.0,))
    histogram.observe(0.5, route="/v1")
    lines = histogram.render()
    assert 'h_bucket{route="/v1",le="1"} 1' in lines
    assert 'h_bucket{route="/v1",le="+Inf"} 1' in lines
    assert 'h_count{route="/v1"} 1' in lines


def test_label_values_and_help_are_escaped():
    registry = Registry()
    counter = registry.register(Counter("c_total", 'Help with \\ and\nnewline "q".', ("v",)))
    counter.inc(v='a"b\\c\nd')
    text = registry.render()
    assert 'c_total{v="a\\"b\\\\c\\nd"} 1\n' in text
    assert '# HELP c_total Help with \\\\ and\\nnewline "q".\n' in text
    parse(text)


def test_gauge_and_counter_rules():
    gauge = Gauge("g", "G.")
    gauge.set(5)
    gauge.inc(2)
    gauge.dec(4)
    assert gauge.value() == 3
    counter = Counter("c_total", "C.", ("status",))
    with pytest.raises(ValueError, match="cannot decrease"):
        counter.inc(-1, status=200)
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc()
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(status=200, route="/")
    assert counter.value(status=404) == 0


def test_invalid_definitions():
    with pytest.raises(ValueError, match="not a valid Prometheus name"):
        Counter("bad-name", "x")
    for label in ("le", "__x", "1a"):
        with pytest.raises(ValueError, match="not allowed"):
            Gauge("g", "x", (label,))
    with pytest.raises(ValueError, match="increasing"):
        Histogram("h", "x", buckets=(1.0, 0.5))
    registry = Registry()
    registry.register(Gauge("g", "x"))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Gauge("g", "y"))


def test_generation_rate_over_the_last_window():
    metrics = ServerMetrics(window_s=10.0)
    metrics.record_tokens(50, now=100.0)
    metrics.record_tokens(30, now=105.0)
    assert metrics.update_rate(105.0) == 8.0
    assert metrics.update_rate(110.0) == 3.0  # the tokens at 100.0 left the window
    assert parse(metrics.render(now=116.0))["longvita_generation_tokens_per_second"] == 0
    assert metrics.generated_tokens.value() == 80


def test_updates_from_many_threads():
    metrics = ServerMetrics()

    def work():
        for _ in range(2000):
            metrics.requests.inc(status=200)
            metrics.request_latency.observe(0.2)
            metrics.record_tokens(1, now=0.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = parse(metrics.render(now=1.0))
    assert samples['longvita_requests_total{status="200"}'] == 8000
    assert samples["longvita_request_latency_seconds_count"] == 8000
    assert samples["longvita_generated_tokens_total"] == 8000
    assert samples["longvita_generation_tokens_per_second"] == 800


def test_format_value():
    assert [format_value(v) for v in (3.0, 0.25, float("inf"), float("-inf"))] == [
        "3",
        "0.25",
        "+Inf",
        "-Inf",
    ]
    assert format_value(float("nan")) == "NaN"
    assert format_value(1e20) == "1e+20"
