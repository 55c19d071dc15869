"""Helpers of the billing tests: starting quota-billing-api, session tokens, hand-made JWTs,
signed Stripe events, and polling a condition with a deadline."""

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import stripe
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.schema import customers
from tests.servers import Process, free_port

AUTH_SECRET = "test-auth-secret-that-is-long-enough-0123456789"
ISSUER = "https://auth.test"
AUDIENCE = "quota-billing"
WEBHOOK_SECRET = "whsec_test_billing_secret"
STRIPE_KEY = "sk_test_billing"


def token(user_id: str | None, **claims: Any) -> str:
    """A valid HS256 session token; `claims` override or (with None) remove claims."""
    payload: dict[str, Any] = {
        "sub": user_id,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 600,
        "iat": int(time.time()),
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, AUTH_SECRET, algorithm="HS256")


def auth(user_id: str, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user_id, **claims)}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT signed with HMAC-SHA256 under any key (pyjwt refuses some on purpose), or
    unsigned when `key` is None."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if key is None:
        return f"{signing_input}."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def sign(payload: str, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    header: str = stripe.WebhookSignature.generate_signature_header(
        payload, secret, int(time.time()) if timestamp is None else timestamp
    )
    return header


async def send_event(
    client: httpx.AsyncClient,
    event_type: str,
    obj: dict[str, Any],
    event_id: str | None = None,
    created: int | None = None,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
) -> httpx.Response:
    """An event localstripe never sends, signed as Stripe signs them."""
    event = {
        "id": event_id or f"evt_test_{time.monotonic_ns()}",
        "object": "event",
        "type": event_type,
        "created": created or int(time.time()),
        "data": {"object": obj},
    }
    payload = json.dumps(event)
    return await client.post(
        "/api/webhooks/stripe",
        content=payload,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": sign(payload, secret, timestamp),
        },
    )


@dataclass(frozen=True)
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    url: str


def billing_env(base_env: dict[str, str], stripe_url: str, keys: Keys, port: int) -> dict[str, str]:
    return {
        **base_env,
        "AUTH_SECRET": AUTH_SECRET,
        "AUTH_JWKS_URL": keys.url,
        "AUTH_ISSUER": ISSUER,
        "AUTH_AUDIENCE": AUDIENCE,
        "STRIPE_API_KEY": STRIPE_KEY,
        "STRIPE_API_BASE": stripe_url,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BILLING_PORT": str(port),
        # The suite makes many calls from one address; the limit has its own test.
        "BILLING_RATE_USER_PER_MIN": "100000",
        "BILLING_RATE_ADDRESS_PER_MIN": "100000",
    }


def start_billing(
    base_env: dict[str, str], logs_dir: Path, stripe_url: str, keys: Keys, **env: str
) -> tuple[Process, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = Process(
        "quota-billing-api",
        {**billing_env(base_env, stripe_url, keys, port), **env},
        logs_dir / f"billing-{port}.log",
        ready_url=f"{url}/health",
    ).start()
    return process, url


def send_webhooks(localstripe_url: str, billing_url: str, events: list[str] | None = None) -> None:
    """Where localstripe sends its events (signed, about a second after each change); with
    `events`, only those types."""
    target: dict[str, Any] = {"url": f"{billing_url}/api/webhooks/stripe", "secret": WEBHOOK_SECRET}
    if events is not None:
        target["events"] = events
    registered = httpx.post(f"{localstripe_url}/_config/webhooks/billing", json=target)
    assert registered.status_code == 200, registered.text


def silence_webhooks(localstripe_url: str, billing_url: str) -> None:
    """No more events from localstripe (for tests where our own retry must do the work)."""
    send_webhooks(localstripe_url, billing_url, ["quota.tests.nothing"])


def jwk_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig"}


async def subscribe(billing: httpx.AsyncClient, user_id: str, plan: str = "PLUS") -> str:
    """Subscribes the user with the card that works; the subscription id."""
    reply = await billing.post(
        "/api/subscribe",
        json={"plan": plan, "payment_method": "pm_card_visa"},
        headers=auth(user_id),
    )
    assert reply.status_code == 201, reply.text
    return str(reply.json()["subscription"]["id"])


async def three_d_secure_card(stripe_client: stripe.StripeClient) -> str:
    """A card whose payments need the card holder's 3-D Secure authentication."""
    card = await stripe_client.v1.payment_methods.create_async(
        {
            "type": "card",
            "card": {"number": "4000002500003155", "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    return str(card.id)


async def authenticate(localstripe_url: str, client_secret: str) -> None:
    """What Stripe.js does in the browser once the bank's page says yes (localstripe's hook)."""
    intent_id = client_secret.split("_secret_")[0]
    async with httpx.AsyncClient(base_url=localstripe_url, auth=(STRIPE_KEY, "")) as browser:
        done = await browser.post(
            f"/v1/payment_intents/{intent_id}/_authenticate",
            params={"client_secret": client_secret, "success": "true"},
        )
    assert done.status_code == 200, done.text


async def metric(client: httpx.AsyncClient, sample: str) -> float:
    """The value of one sample of the process's /metrics (0 when it has none yet)."""
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(f"{sample} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def stripe_subscriptions(
    pg: AsyncEngine, stripe_client: stripe.StripeClient, user_id: str
) -> list[dict[str, Any]]:
    """Every subscription Stripe holds for the user's customer, newest first."""
    async with pg.connect() as conn:
        customer = await conn.scalar(
            select(customers.c.stripe_customer_id).where(customers.c.user_id == user_id)
        )
    listed = await stripe_client.v1.subscriptions.list_async(
        {"customer": str(customer), "status": "all"}
    )
    return [s.to_dict() for s in listed.data]


async def bill_a_renewal(stripe_client: stripe.StripeClient, subscription_id: str) -> Any:
    """Makes Stripe bill the subscription now, as a renewal would: localstripe bills at once only
    when the billing interval changes, so it moves to a yearly PLUS plan. The subscription."""
    await stripe_client.v1.plans.create_async(
        {
            "id": "test_plus_yearly",
            "amount": 9900,
            "currency": "usd",
            "interval": "year",
            "product": {"name": "PLUS yearly"},
            "metadata": {"quota_plan": "PLUS"},
        }
    )
    current = await stripe_client.v1.subscriptions.retrieve_async(subscription_id)
    return await stripe_client.v1.subscriptions.update_async(
        subscription_id,
        {"items": [{"id": current["items"].data[0].id, "plan": "test_plus_yearly"}]},
    )
