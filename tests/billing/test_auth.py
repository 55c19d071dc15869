"""JWT authentication: HS256 with AUTH_SECRET and RS256/ES256 from the JWKS are accepted; every
other token is 401 with a JSON error and changes nothing. And the start-up checks."""

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.schema import customers
from tests.billing.helpers import AUDIENCE, AUTH_SECRET, ISSUER, Keys, hand_made_token, token
from tests.servers import BIN


def claims(user_id: str = "auth-1", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": user_id,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 600,
    }
    return {**base, **extra}


async def test_hs256_bearer_and_session_cookie_are_accepted(billing: httpx.AsyncClient) -> None:
    reply = await billing.get(
        "/api/subscription", headers={"Authorization": f"Bearer {token('auth-1')}"}
    )
    assert reply.status_code == 200 and reply.json()["subscription"]["plan"] == "FREE"
    billing.cookies.set("session", token("auth-1"))
    reply = await billing.get("/api/subscription")
    billing.cookies.clear()
    assert reply.status_code == 200


async def test_rs256_and_es256_from_the_jwks_are_accepted(
    billing: httpx.AsyncClient, keys: Keys
) -> None:
    for key, algorithm, kid in ((keys.rsa, "RS256", "rsa-1"), (keys.ec, "ES256", "ec-1")):
        signed = jwt.encode(claims(), key, algorithm=algorithm, headers={"kid": kid})
        reply = await billing.get("/api/usage", headers={"Authorization": f"Bearer {signed}"})
        assert reply.status_code == 200, (algorithm, reply.text)
        assert reply.json()["user_id"] == "auth-1"


def bad_tokens(keys: Keys) -> dict[str, str]:
    now = int(time.time())
    public_pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "alg none": hand_made_token({"alg": "none", "typ": "JWT"}, claims(), None),
        "alg None with a signature": hand_made_token(
            {"alg": "None", "typ": "JWT"}, claims(), AUTH_SECRET.encode()
        ),
        "hs256 signed with the rsa public key": hand_made_token(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), public_pem
        ),
        "hs256 with another secret": jwt.encode(claims(), "x" * 40, algorithm="HS256"),
        "expired": token("auth-1", exp=now - 5),
        "not yet valid": token("auth-1", nbf=now + 3600),
        "no exp": token("auth-1", exp=None),
        "exp as a numeric string": token("auth-1", exp=str(now + 600)),
        "nbf as a numeric string": token("auth-1", nbf=str(now - 60)),
        "rs256 without a kid": jwt.encode(claims(), keys.rsa, algorithm="RS256"),
        "wrong aud": token("auth-1", aud="someone-else"),
        "no aud": token("auth-1", aud=None),
        "wrong iss": token("auth-1", iss="https://evil.test"),
        "no sub": token(None),
        "sub not an id": token("has spaces/and slashes"),
        "sub not a string": hand_made_token(
            {"alg": "HS256", "typ": "JWT"}, claims(sub=123), AUTH_SECRET.encode()
        ),
        "rs256 signed by a key not in the jwks": jwt.encode(
            claims(), stranger, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "rs256 with an unknown kid": jwt.encode(
            claims(), keys.rsa, algorithm="RS256", headers={"kid": "nope"}
        ),
        "es256 key named as rsa": jwt.encode(
            claims(), keys.ec, algorithm="ES256", headers={"kid": "rsa-1"}
        ),
        "ps256 not allowed": jwt.encode(
            claims(), keys.rsa, algorithm="PS256", headers={"kid": "rsa-1"}
        ),
        "es384 not allowed": jwt.encode(
            claims(),
            ec.generate_private_key(ec.SECP384R1()),
            algorithm="ES384",
            headers={"kid": "ec-1"},
        ),
        "garbage": "not-a-jwt",
        "three garbage parts": "abc.def.ghi",
        "huge": "a" * 10_000,
    }


@pytest.mark.parametrize("route", ["/api/subscription", "/api/usage", "/api/payments"])
async def test_every_bad_token_is_401_on_reads(
    billing: httpx.AsyncClient, keys: Keys, route: str
) -> None:
    for name, bad in bad_tokens(keys).items():
        reply = await billing.get(route, headers={"Authorization": f"Bearer {bad}"})
        assert reply.status_code == 401, (name, reply.text)
        assert reply.json()["error"]["code"] == "unauthorized", name


async def test_every_bad_token_is_401_and_buys_nothing(
    billing: httpx.AsyncClient, keys: Keys, pg: AsyncEngine
) -> None:
    body = {"plan": "PLUS", "payment_method": "pm_card_visa"}
    for name, bad in bad_tokens(keys).items():
        reply = await billing.post(
            "/api/subscribe", json=body, headers={"Authorization": f"Bearer {bad}"}
        )
        assert reply.status_code == 401, (name, reply.text)
        billing.cookies.set("session", bad)
        reply = await billing.post("/api/subscribe", json=body)
        billing.cookies.clear()
        assert reply.status_code == 401, (name, reply.text)
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Token abc"):
        reply = await billing.post("/api/subscribe", json=body, headers={"Authorization": header})
        assert reply.status_code == 401, header
    reply = await billing.post("/api/subscribe", json=body)
    assert reply.status_code == 401 and "WWW-Authenticate" in reply.headers
    async with pg.connect() as conn:
        found = await conn.scalar(
            select(func.count()).select_from(customers).where(customers.c.user_id == "auth-1")
        )
    assert found == 0


def run_billing(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "quota-billing-api")],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "AUTH_SECRET"),
        ({"AUTH_SECRET": "short-secret-of-31-bytes-000000"}, "AUTH_SECRET"),
        ({"AUTH_SECRET": "s" * 32}, "STRIPE_API_KEY"),
        ({"AUTH_SECRET": "s" * 32, "STRIPE_API_KEY": "sk_test_x"}, "STRIPE_WEBHOOK_SECRET"),
        (
            {
                "AUTH_SECRET": "s" * 32,
                "STRIPE_API_KEY": "sk_test_x",
                "STRIPE_WEBHOOK_SECRET": "whsec_x",
                "AUTH_JWKS_URL": "ftp://keys",
            },
            "AUTH_JWKS_URL",
        ),
        (
            {
                "AUTH_SECRET": "s" * 32,
                "STRIPE_API_KEY": "sk_test_x",
                "STRIPE_WEBHOOK_SECRET": "whsec_x",
                "AUTH_JWKS_ALGORITHMS": "RS256,HS512",
            },
            "AUTH_JWKS_ALGORITHMS",
        ),
        (
            {
                "AUTH_SECRET": "s" * 32,
                "STRIPE_API_KEY": "sk_test_x",
                "STRIPE_WEBHOOK_SECRET": "whsec_x",
                "STRIPE_CURRENCY": "dollars",
            },
            "STRIPE_CURRENCY",
        ),
        ({"AUTH_SECRET": "s" * 32, "BILLING_PORT": "http"}, "BILLING_PORT"),
    ],
)
def test_bad_settings_stop_the_start_with_one_line(
    env: dict[str, str], named: str, tmp_path: Path
) -> None:
    done = run_billing(env, tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert lines[0].startswith("quota-billing-api: ") and "Traceback" not in done.stderr
