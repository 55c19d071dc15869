"""Prometheus metrics of the sidecar, every name `quota_<thing>_<unit>`."""

from prometheus_client import Counter, Histogram

from quota_common.metrics import only_quota_metrics

only_quota_metrics()

REQUESTS = Counter(
    "quota_http_requests_total", "Sidecar HTTP requests by route and status.", ["route", "status"]
)
LATENCY = Histogram(
    "quota_http_request_duration_seconds",
    "Sidecar request latency by route.",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
GRANTED = Counter("quota_granted_tokens_total", "Tokens held by successful reserves and extends.")
REFUSED = Counter("quota_refusals_total", "Reserves and extends refused for lack of quota.")
CHARGED = Counter("quota_charged_tokens_total", "Tokens charged by commits.")
RELEASED = Counter("quota_released_tokens_total", "Tokens released by commits and refunds.")
CHARGE_RATIO = Histogram(
    "quota_commit_charged_ratio",
    "Tokens charged / tokens held per commit: how good the callers' estimates are.",
    buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0, 5.0),
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
