"""Prometheus metrics of the sidecar, every name `quota_<thing>_<unit>`.

What every request moves (its route's count and latency, tokens granted, charged, released) is
kept as plain numbers: the event loop is their only writer, so prometheus_client's values, each
behind a lock (about 5 us of a reserve here, a few percent), are only made when /metrics is read.
Counters of rare events (outages, cold loads) are prometheus_client's own."""

import bisect
import itertools
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Metric
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from quota_common.metrics import only_quota_metrics

only_quota_metrics()

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
CHARGE_RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0, 5.0)


class Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Buckets:
    """A histogram's observations, counted per upper bound (the last count: above them all)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus' buckets: each counts the ones below it too."""
        bounds = [*map(floatToGoString, self.bounds), "+Inf"]
        return list(zip(bounds, itertools.accumulate(self.counts), strict=True))


class RouteMetrics:
    __slots__ = ("by_status", "latency")

    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        self.latency = Buckets(LATENCY_BUCKETS_S)

    def observe(self, status: int, seconds: float) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        self.latency.observe(seconds)


class HotMetrics(Collector):
    def __init__(self) -> None:
        self.routes: dict[str, RouteMetrics] = {}
        self.counts: list[tuple[str, str, Count]] = []
        self.histograms: list[tuple[str, str, Buckets]] = []

    def route(self, name: str) -> RouteMetrics:
        return self.routes.setdefault(name, RouteMetrics())

    def count(self, name: str, documentation: str) -> Count:
        count = Count()
        self.counts.append((name, documentation, count))
        return count

    def histogram(self, name: str, documentation: str, bounds: tuple[float, ...]) -> Buckets:
        buckets = Buckets(bounds)
        self.histograms.append((name, documentation, buckets))
        return buckets

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "quota_http_requests",
            "Sidecar HTTP requests by route and status.",
            labels=["route", "status"],
        )
        latency = HistogramMetricFamily(
            "quota_http_request_duration_seconds",
            "Sidecar request latency by route.",
            labels=["route"],
        )
        for name, route in self.routes.items():
            for status, answered in sorted(route.by_status.items()):
                requests.add_metric([name, str(status)], answered)
            latency.add_metric([name], route.latency.cumulative(), route.latency.total)
        yield requests
        yield latency
        for name, documentation, count in self.counts:
            yield CounterMetricFamily(name, documentation, value=count.value)
        for name, documentation, buckets in self.histograms:
            yield HistogramMetricFamily(
                name, documentation, buckets=buckets.cumulative(), sum_value=buckets.total
            )


HOT = HotMetrics()
REGISTRY.register(HOT)

GRANTED = HOT.count("quota_granted_tokens_total", "Tokens held by successful reserves and extends.")
REFUSED = HOT.count("quota_refusals_total", "Reserves and extends refused for lack of quota.")
CHARGED = HOT.count("quota_charged_tokens_total", "Tokens charged by commits.")
RELEASED = HOT.count("quota_released_tokens_total", "Tokens released by commits and refunds.")
CHARGE_RATIO = HOT.histogram(
    "quota_commit_charged_ratio",
    "Tokens charged / tokens held per commit: how good the callers' estimates are.",
    CHARGE_RATIO_BUCKETS,
)
COLD_LOADS = Counter("quota_cold_loads_total", "Users seeded into Redis from Postgres.")
STORE_ERRORS = Counter(
    "quota_store_errors_total", "Calls that failed because Redis did not answer."
)
DEGRADED = Counter(
    "quota_degraded_grants_total", "Reserves granted from the outage budget (FAIL_MODE=open)."
)
JOURNALLED = Counter(
    "quota_journalled_settlements_total", "Commits and refunds kept in the journal during outages."
)
JOURNAL_REFUSED = Counter(
    "quota_journal_refused_entries_total",
    "Journalled commits and refunds (answered 200) the ledger refused once Redis was back, by"
    " code; each is kept in a *.bad file.",
    ["code"],
)
