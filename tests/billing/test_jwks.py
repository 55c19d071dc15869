"""JWKS trouble: a JWKS that hangs or goes away never holds up HS256 tokens, queues nobody
behind one fetch, and leaves known keys working; a key removed from the JWKS stops working
at the next fetch; made-up key ids cannot make us hammer the identity provider."""

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from quota_common.auth import AuthError, Jwks, Verifier, verify
from tests.billing.faults import Blackhole
from tests.billing.helpers import AUDIENCE, AUTH_SECRET, ISSUER, Keys, jwk_of, start_billing, token
from tests.servers import eventually


class JwksServer:
    """A JWKS endpoint whose keys can change and which can be made to hang."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.body = json.dumps({"keys": keys}).encode()
        self.requests = 0
        self.hanging = threading.Event()
        self.released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                if server.hanging.is_set():
                    server.released.wait(10)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/jwks.json"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.released.set()
        self.http.shutdown()


@pytest.fixture
def jwks_server(keys: Keys) -> Iterator[JwksServer]:
    server = JwksServer([jwk_of(keys.rsa, "rsa-1"), jwk_of(keys.ec, "ec-1")])
    yield server
    server.stop()


@pytest.fixture
async def blackhole() -> AsyncIterator[Blackhole]:
    hole = await Blackhole().start()
    yield hole
    await hole.stop()


def with_jwks(jwks: Jwks) -> Verifier:
    return Verifier(AUTH_SECRET.encode(), jwks, ("RS256", "ES256"), ISSUER, AUDIENCE)


def rs256(keys: Keys, kid: str = "rsa-1", user_id: str = "jwks-1") -> str:
    claims = {"sub": user_id, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}
    return jwt.encode(claims, keys.rsa, algorithm="RS256", headers={"kid": kid})


def age(jwks: Jwks, seconds: float) -> None:
    """As if the last fetch, and the last try, were `seconds` longer ago."""
    jwks.fetched_at -= seconds
    jwks.tried_at -= seconds


async def test_a_hanging_jwks_delays_no_hs256_token_and_is_fetched_once(
    keys: Keys, blackhole: Blackhole
) -> None:
    verifier = with_jwks(Jwks(blackhole.url, timeout_s=1.0))
    started = time.monotonic()
    waiting = [asyncio.create_task(verify(verifier, rs256(keys))) for _ in range(12)]
    await eventually(lambda: blackhole.connections == 1, 5, "the JWKS fetch under way")
    assert await verify(verifier, token("jwks-hs")) == "jwks-hs"
    assert not any(task.done() for task in waiting), "HS256 waited for the JWKS"
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, AuthError) for r in results), results
    assert "could not be fetched" in str(results[0])
    # One fetch for all twelve: one after another they would take 12 s.
    assert blackhole.connections == 1
    assert time.monotonic() - started < 6


async def test_known_keys_outlive_a_jwks_outage_and_removed_keys_stop_working(
    keys: Keys, jwks_server: JwksServer
) -> None:
    jwks = Jwks(jwks_server.url, cache_s=60, timeout_s=5)
    verifier = with_jwks(jwks)
    assert await verify(verifier, rs256(keys)) == "jwks-1"
    assert jwks_server.requests == 1

    jwks_server.hanging.set()
    age(jwks, 120)
    assert await verify(verifier, rs256(keys)) == "jwks-1"
    assert jwks.fetching is not None
    assert not jwks.fetching.done(), "a known key waited for the refresh"
    # The provider hangs up without an answer: the refresh fails, the keys stay.
    jwks_server.released.set()
    await jwks.fetching
    assert jwks_server.requests == 2
    assert await verify(verifier, rs256(keys)) == "jwks-1"

    # The provider is back and has retired the RSA key.
    jwks_server.body = json.dumps({"keys": [jwk_of(keys.ec, "ec-1")]}).encode()
    jwks_server.hanging.clear()
    age(jwks, 120)
    await verify(verifier, rs256(keys))
    assert jwks.fetching is not None
    await jwks.fetching
    with pytest.raises(AuthError, match="not known"):
        await verify(verifier, rs256(keys))


async def test_made_up_key_ids_fetch_the_jwks_once_per_retry_interval(
    keys: Keys, jwks_server: JwksServer
) -> None:
    verifier = with_jwks(Jwks(jwks_server.url, retry_s=60))
    tokens = [rs256(keys, kid=f"made-up-{n}") for n in range(50)]
    results = await asyncio.gather(*(verify(verifier, t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, AuthError) for r in results)
    assert jwks_server.requests == 1
    assert await verify(verifier, rs256(keys)) == "jwks-1"
    assert jwks_server.requests == 1


async def test_the_billing_api_answers_hs256_users_while_its_jwks_hangs(
    base_env: dict[str, str],
    logs_dir: Path,
    localstripe_url: str,
    keys: Keys,
    blackhole: Blackhole,
) -> None:
    process, url = start_billing(
        base_env, logs_dir, localstripe_url, keys, AUTH_JWKS_URL=blackhole.url
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            started = time.monotonic()
            bearer = {"Authorization": f"Bearer {rs256(keys)}"}
            waiting = [
                asyncio.create_task(client.get("/api/payments", headers=bearer)) for _ in range(12)
            ]

            async def asked() -> bool:
                return blackhole.connections >= 1

            await eventually(asked, 5, "the JWKS fetch")
            hs = {"Authorization": f"Bearer {token('jwks-hs')}"}
            reply = await client.get("/api/payments", headers=hs)
            assert reply.status_code == 200
            assert not any(task.done() for task in waiting), "HS256 waited for the JWKS"
            replies = await asyncio.gather(*waiting)
            assert {r.status_code for r in replies} == {401}
            # One fetch with a 2 s timeout for all of them: one after another they would take
            # 24 s.
            assert blackhole.connections == 1
            assert time.monotonic() - started < 12
    finally:
        process.stop()
