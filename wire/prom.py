"""prometheus_client glue shared by both programs: a registry per program, families built from the state the
programs keep anyway, and the MetricsServer that renders it on the event loop (wire/metrics.py).

The programs do not count twice: no prometheus_client Counter is incremented on the hot path. Each program has
one custom collector (edge_agent/metrics.py, collector/metrics.py) whose collect() turns its counters, views and
queues into metric families at scrape time, on the loop. Names follow the Prometheus conventions
(https://prometheus.io/docs/practices/naming/): a `citynerve_` prefix, `_total` counters (prometheus_client adds
the suffix to a CounterMetricFamily), base units (seconds, bytes), labels of bounded cardinality.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from wire.metrics import Histogram, MetricsServer, MetricsSettings

__all__ = ["Families", "counter", "gauge", "histogram", "metrics_server"]


class _Collect(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()

    def describe(self) -> list[Metric]:
        return []  # nothing collected at registration (the program's state may not exist yet)


def registry(collect: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) with the process metrics (process_*: CPU
    seconds, resident memory, open files, start time, read from /proc at scrape time), python_info and
    python_gc_*, and the program's collector."""
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    reg.register(_Collect(collect))
    return reg


def metrics_server(settings: MetricsSettings, collect: Callable[[], Iterable[Metric]]) -> MetricsServer:
    reg = registry(collect)
    return MetricsServer(settings, lambda: generate_latest(reg), CONTENT_TYPE_LATEST)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.sum)


class Families:
    """Labelled families filled row by row, yielded in the order they were first named.

        f = Families()
        f.counter("citynerve_agent_device_polls_total", "Polls ...", ("device",)).add_metric([dev], n)
        yield from f
    """

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> CounterMetricFamily:
        return self._get(name, lambda: CounterMetricFamily(name, doc, labels=labels))  # type: ignore[return-value]

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> GaugeMetricFamily:
        return self._get(name, lambda: GaugeMetricFamily(name, doc, labels=labels))  # type: ignore[return-value]

    def histogram(self, name: str, doc: str, labels: tuple[str, ...]) -> HistogramMetricFamily:
        return self._get(name, lambda: HistogramMetricFamily(name, doc, labels=labels))  # type: ignore[return-value]

    def add_histogram(self, name: str, doc: str, labels: tuple[str, ...], values: list[str], h: Histogram) -> None:
        self.histogram(name, doc, labels).add_metric(values, h.cumulative(), h.sum)

    def counters_by(self, name: str, doc: str, label: str, counts: Mapping[str, Any]) -> CounterMetricFamily:
        """A family with one label and a row per key of `counts` (e.g. reason code -> count)."""
        family = self.counter(name, doc, (label,))
        for key, value in sorted(counts.items()):
            family.add_metric([str(key)], value)
        return family

    def _get(self, name: str, make: Callable[[], Metric]) -> Metric:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = make()
        return family

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())

