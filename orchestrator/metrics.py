"""An opt-in Prometheus endpoint on the controller: ``PipelineModule(..., metrics_port=0)``.

A collector reads ``pipe.stats()`` at each scrape, so nothing is counted twice and nothing runs
between scrapes. Per stage, labelled by stage, worker and device: inputs, failures, drops and
bytes as counters; service time and the wait for an input set's last part as histograms; queued
bytes as a gauge. For the pipeline: end-to-end latency (launch to result) as a histogram; inputs
in flight, queued bytes and restarts as gauges. Served by prometheus_client's own HTTP server,
on this process's bind address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

LABELS = ["stage", "worker", "device"]
COUNTERS = {  # stats() key -> (metric name, help)
    "processed": ("tvmpipe_stage_inputs", "input sets a stage computed"),
    "failed": ("tvmpipe_stage_failures", "input sets on which a stage raised"),
    "dropped": ("tvmpipe_stage_drops", "messages a stage dropped as invalid or unexpected"),
    "bytes_in": ("tvmpipe_stage_received_bytes", "bytes a stage received"),
    "bytes_out": ("tvmpipe_stage_sent_bytes", "bytes a stage sent"),
    "received_ahead": (
        "tvmpipe_stage_received_ahead",
        "input sets a stage received while computing the one before",
    ),
}
HISTOGRAMS = {  # stats() key prefix -> (metric name, help)
    "service": ("tvmpipe_stage_service_seconds", "time a stage computed one input set"),
    "join_wait": ("tvmpipe_stage_queue_wait_seconds", "time an input set waited for its parts"),
}


class PipelineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        stages = stats["stages"]
        counters = {k: CounterMetricFamily(n, h, labels=LABELS) for k, (n, h) in COUNTERS.items()}
        hists = {k: HistogramMetricFamily(n, h, labels=LABELS) for k, (n, h) in HISTOGRAMS.items()}
        queued = GaugeMetricFamily(
            "tvmpipe_stage_queued_bytes", "bytes a stage holds to send", labels=LABELS
        )
        for name, data in stages.items():
            if "unreachable" in data:
                continue
            labels = [name, str(data.get("worker", "")), str(data.get("device", ""))]
            for key, counter in counters.items():
                counter.add_metric(labels, float(data.get(key, 0)))
            for key, hist in hists.items():
                buckets = _buckets(data.get("buckets_s", []), data.get(f"{key}_hist", []))
                hist.add_metric(labels, buckets, float(data.get(f"{key}_sum_s", 0.0)))
            queued.add_metric(labels, float(data.get("queued_bytes", 0)))
        yield from counters.values()
        yield from hists.values()
        yield queued
        client = stats["client"]
        latency = HistogramMetricFamily(
            "tvmpipe_latency_seconds", "time from launching an input to its result"
        )
        latency.add_metric(
            [],
            _buckets(client.get("latency_buckets_s", []), client.get("latency_hist", [])),
            float(client.get("latency_sum_s", 0.0)),
        )
        yield latency
        for key, help_text in (
            ("in_flight", "inputs launched and not yet handed back"),
            ("queued_bytes", "bytes queued by set_input, not yet launched"),
            ("restarts", "stages deployed again after a loss"),
        ):
            gauge = GaugeMetricFamily(f"tvmpipe_{key}", help_text)
            gauge.add_metric([], float(client.get(key, 0)))
            yield gauge


def _buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one past every bound) as cumulative Prometheus buckets."""
    out, total = [], 0
    for bound, count in zip([*bounds, float("inf")], counts, strict=False):
        total += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(total)))
    return out or [("+Inf", 0.0)]


class MetricsServer:
    """Serves ``/metrics`` for one pipeline until ``close()``."""

    def __init__(self, stats: Callable[[], dict[str, Any]], host: str, port: int):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PipelineCollector(stats))
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.address = f"http://{host}:{self._server.server_port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
