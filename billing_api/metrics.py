"""Prometheus metrics of the billing API, every name `quota_billing_<thing>_<unit>` so they never
meet the sidecar's."""

from prometheus_client import Counter, Gauge, Histogram

from quota_common.metrics import only_quota_metrics

only_quota_metrics()

REQUESTS = Counter(
    "quota_billing_http_requests_total",
    "Billing API HTTP requests by route and status.",
    ["route", "status"],
)
LATENCY = Histogram(
    "quota_billing_http_request_duration_seconds",
    "Billing API request latency by route.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
IN_PROGRESS = Gauge(
    "quota_billing_http_requests_in_progress", "Billing API requests being answered.", ["route"]
)
WEBHOOK_EVENTS = Counter(
    "quota_billing_webhook_events_total",
    "Stripe webhook events by outcome (applied, replayed, ignored, refused).",
    ["outcome"],
)
STRIPE_ERRORS = Counter(
    "quota_billing_stripe_errors_total", "Failed Stripe API calls by error class.", ["error"]
)
PLAN_PUSHES = Counter(
    "quota_billing_plan_pushes_total",
    "Plan changes pushed to Redis by outcome (applied, not_loaded, failed).",
    ["outcome"],
)
RATE_LIMITED = Counter(
    "quota_billing_rate_limited_requests_total", "Requests refused by a rate limit.", ["scope"]
)
SUBSCRIBE_RECOVERIES = Counter(
    "quota_billing_subscribe_recoveries_total",
    "Subscribe attempts left without an answer and settled later, by outcome (found: Stripe had "
    "made the subscription; abandoned: it had not).",
    ["outcome"],
)
