"""The billing API's HTTP surface: public routes, security headers, strict bodies answered
with 4xx JSON errors, rate limits, and payment history paging."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_api.http import stripe_failure
from quota_common.schema import payments
from tests.billing.helpers import Keys, auth, start_billing


async def test_plans_need_no_auth(billing: httpx.AsyncClient) -> None:
    reply = await billing.get("/api/plans")
    assert reply.status_code == 200
    plans = reply.json()["plans"]
    # Exactly DESIGN's shape, nothing more: prices are cents of STRIPE_CURRENCY.
    assert set(reply.json()) == {"ok", "plans"}
    assert all(set(plan) == {"price", "quota", "features"} for plan in plans.values())
    assert reply.json()["ok"] is True and list(plans) == ["FREE", "PLUS", "PRO"]
    assert plans["PLUS"]["price"] == 990 and plans["PLUS"]["quota"] == 1_000_000
    assert plans["PRO"]["price"] == 1990 and plans["PRO"]["quota"] == 5_000_000
    assert plans["FREE"]["quota"] == 100_000 and plans["FREE"]["features"]


async def test_health_metrics_openapi_and_security_headers(billing: httpx.AsyncClient) -> None:
    assert (await billing.get("/health")).json()["ok"] is True
    await billing.get("/api/plans")
    metrics = (await billing.get("/metrics")).text
    assert 'quota_billing_http_requests_total{route="plans",status="200"}' in metrics
    document = (await billing.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    for path in ("/api/subscribe", "/api/usage/history", "/api/webhooks/stripe"):
        assert path in document["paths"]
    for route in ("/api/plans", "/nowhere", "/api/subscription"):
        headers = (await billing.get(route)).headers
        assert headers["x-content-type-options"] == "nosniff", route
        assert headers["x-frame-options"] == "DENY"
        assert "default-src 'none'" in headers["content-security-policy"]
        assert headers["cache-control"] == "no-store"


async def test_bad_requests_are_4xx_json(billing: httpx.AsyncClient) -> None:
    headers = auth("http-1")
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("GET", "/nowhere", {}, 404, "not_found"),
        ("GET", "/api/plans/", {"headers": {"host": "evil.example"}}, 404, "not_found"),
        ("POST", "/api/webhooks/stripe/", {"content": b"{}"}, 404, "not_found"),
        ("POST", "/api/subscribe/", {"json": {"plan": "PLUS"}}, 404, "not_found"),
        ("GET", "/api/subscribe", {}, 405, "method_not_allowed"),
        (
            "POST",
            "/api/subscribe",
            {"content": b"{", "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/api/subscribe",
            {
                "content": b"plan=PLUS",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/api/subscribe",
            {"json": {"plan": "PLUS", "coupon": "x"}},
            422,
            "validation_error",
        ),
        ("POST", "/api/subscribe", {"json": {"plan": "GOLD"}}, 422, "validation_error"),
        ("POST", "/api/subscribe", {"json": {"plan": "FREE"}}, 422, "validation_error"),
        ("POST", "/api/subscribe", {"json": {}}, 422, "validation_error"),
        ("POST", "/api/subscribe", {"json": ["PLUS"]}, 422, "validation_error"),
        (
            "POST",
            "/api/subscribe",
            {"json": {"plan": "PLUS", "payment_method": "tok_visa"}},
            422,
            "validation_error",
        ),
        (
            "POST",
            "/api/subscribe",
            {"json": {"plan": "PLUS", "payment_method": 5}},
            422,
            "validation_error",
        ),
        (
            "POST",
            "/api/subscribe",
            {
                "content": b"{" + b" " * 20_000 + b"}",
                "headers": {"content-type": "application/json"},
            },
            413,
            "payload_too_large",
        ),
        ("POST", "/api/change-plan", {"json": {"plan": "PRO"}}, 409, "conflict"),
        ("POST", "/api/change-plan", {"json": {"plan": 1}}, 422, "validation_error"),
        ("POST", "/api/cancel", {"json": {"at_period_end": True}}, 409, "conflict"),
        ("POST", "/api/cancel", {"json": {"at_period_end": "yes"}}, 422, "validation_error"),
        ("POST", "/api/cancel", {"json": {}}, 422, "validation_error"),
        ("GET", "/api/payments?limit=0", {}, 422, "validation_error"),
        ("GET", "/api/payments?limit=101", {}, 422, "validation_error"),
        ("GET", "/api/payments?limit=1&limit=2", {}, 422, "validation_error"),
        ("GET", "/api/payments?limit=%C2%B2", {}, 422, "validation_error"),
        ("GET", "/api/usage/history?from=9999-12-30&to=9999-12-31", {}, 422, "validation_error"),
        ("GET", "/api/payments?starting_after=in_unknown", {}, 422, "validation_error"),
        ("GET", "/api/payments?starting_after=..%2F", {}, 422, "validation_error"),
    ]
    for method, path, extra, status, code in cases:
        reply = await billing.request(
            method, path, headers=headers | extra.pop("headers", {}), **extra
        )
        assert reply.status_code == status, (method, path, reply.text)
        assert reply.json()["error"]["code"] == code, (method, path, reply.text)
        assert "location" not in reply.headers, (method, path)


async def test_payments_newest_first_in_pages(billing: httpx.AsyncClient, pg: AsyncEngine) -> None:
    user = "http-2"
    start = datetime(2026, 1, 1, tzinfo=UTC)
    async with pg.begin() as conn:
        await conn.execute(
            insert(payments),
            [
                {
                    "user_id": user,
                    "stripe_invoice_id": f"in_{n}",
                    "amount_cents": 990,
                    "currency": "usd",
                    "status": "succeeded",
                    "plan": "PLUS",
                    "hosted_invoice_url": f"https://pay.test/in_{n}",
                    "invoice_pdf": f"https://pay.test/in_{n}.pdf",
                    "created_at": start + timedelta(days=n),
                }
                for n in range(5)
            ]
            + [
                {
                    "user_id": "http-other",
                    "stripe_invoice_id": "in_other",
                    "amount_cents": 1,
                    "currency": "usd",
                    "status": "succeeded",
                    "plan": None,
                    "hosted_invoice_url": None,
                    "invoice_pdf": None,
                    "created_at": start,
                }
            ],
        )
    headers = auth(user)
    seen: list[str] = []
    after: str | None = None
    while True:
        params = {"limit": "2", **({"starting_after": after} if after else {})}
        page = (await billing.get("/api/payments", params=params, headers=headers)).json()
        seen += [p["id"] for p in page["payments"]]
        if not page["has_more"]:
            break
        after = page["payments"][-1]["id"]
    assert seen == ["in_4", "in_3", "in_2", "in_1", "in_0"]
    first = (await billing.get("/api/payments", headers=headers)).json()["payments"][0]
    assert first["hosted_invoice_url"] == "https://pay.test/in_4"
    assert first["invoice_pdf"] == "https://pay.test/in_4.pdf"
    assert first["status"] == "succeeded" and first["amount"] == 990
    reply = await billing.get(
        "/api/payments", params={"starting_after": "in_other"}, headers=headers
    )
    assert reply.status_code == 422


@pytest.fixture
def strict_billing(
    base_env: dict[str, str], logs_dir: Path, localstripe_url: str, keys: Keys
) -> Iterator[str]:
    process, url = start_billing(
        base_env,
        logs_dir,
        localstripe_url,
        keys,
        BILLING_RATE_USER_PER_MIN="2",
        BILLING_RATE_ADDRESS_PER_MIN="5",
    )
    yield url
    process.stop()


async def test_mutating_routes_are_rate_limited(strict_billing: str) -> None:
    async with httpx.AsyncClient(base_url=strict_billing) as client:
        body = {"at_period_end": True}
        statuses = [
            (await client.post("/api/cancel", json=body, headers=auth("rl-1"))).status_code
            for _ in range(3)
        ]
        # Reads are not limited.
        for _ in range(5):
            assert (await client.get("/api/subscription", headers=auth("rl-1"))).status_code == 200
        assert statuses == [409, 409, 429]
        refused = await client.post("/api/cancel", json=body, headers=auth("rl-1"))
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Another user from the same address, until the address has had its share.
        statuses = [
            (await client.post("/api/cancel", json=body, headers=auth("rl-2"))).status_code
            for _ in range(2)
        ]
        assert statuses == [409, 429]


def test_an_idempotency_clash_is_a_503_to_retry_not_a_409() -> None:
    """Stripe's 409 for a key still in use (our keys always carry the same parameters) passes
    on its own: 503 with Retry-After, since 409 tells a subscriber "already subscribed"."""
    clash = stripe.IdempotencyError(
        "There is currently another in-progress request using this Idempotent Key",
        http_status=409,
    )
    failure = stripe_failure(clash)
    assert failure.status == 503 and failure.code == "payment_provider_unavailable"
    assert failure.headers is not None and int(failure.headers["Retry-After"]) >= 1
