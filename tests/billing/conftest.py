"""Fixtures of the billing tests: localstripe (a stateful Stripe stand-in, driven through the
official SDK), a JWKS server with an RSA and an EC key, and quota-billing-api as a real process
next to the sidecar of tests/conftest.py. localstripe is emptied before every test."""

import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.billing.helpers import (
    STRIPE_KEY,
    Keys,
    jwk_of,
    send_webhooks,
    silence_webhooks,
    start_billing,
)
from tests.servers import free_port, wait_until

LOCALSTRIPE = (
    "import sys\n"
    "from aiohttp import web\n"
    "from localstripe.server import app\n"
    "web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), print=None)\n"
)


def stripe_up(url: str) -> bool:
    try:
        reply = httpx.get(f"{url}/v1/plans", auth=(STRIPE_KEY, ""), timeout=0.5)
        return reply.status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def localstripe_url(logs_dir: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (logs_dir / "localstripe.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCALSTRIPE, str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=logs_dir,
        start_new_session=True,
    )
    try:
        wait_until(lambda: proc.poll() is None and stripe_up(url), 20, "localstripe")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def keys() -> Iterator[Keys]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    body = json.dumps({"keys": [jwk_of(rsa_key, "rsa-1"), jwk_of(ec_key, "ec-1")]}).encode()

    class JWKS(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), JWKS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Keys(rsa_key, ec_key, f"http://127.0.0.1:{server.server_port}/jwks.json")
    server.shutdown()


@pytest.fixture(scope="session")
def billing_url(
    base_env: dict[str, str], logs_dir: Path, localstripe_url: str, keys: Keys
) -> Iterator[str]:
    process, url = start_billing(base_env, logs_dir, localstripe_url, keys)
    yield url
    process.stop()


def webhooks_in_progress(billing_url: str) -> float:
    text = httpx.get(f"{billing_url}/metrics").text
    for line in text.splitlines():
        if line.startswith('quota_billing_http_requests_in_progress{route="stripe_webhook"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(autouse=True)
def stripe_webhooks(localstripe_url: str, billing_url: str) -> Iterator[None]:
    """An empty localstripe whose events reach the billing API during this test only: events
    still pending at its end are dropped, and the test ends once none is being handled, so
    none lands in the next test's table cleaning."""
    assert httpx.delete(f"{localstripe_url}/_config/data").status_code == 200
    send_webhooks(localstripe_url, billing_url)
    yield
    silence_webhooks(localstripe_url, billing_url)
    wait_until(lambda: webhooks_in_progress(billing_url) == 0, 10, "webhooks in progress")


@pytest.fixture
def no_webhooks(stripe_webhooks: None, localstripe_url: str, billing_url: str) -> None:
    """No events from localstripe in this test: our own calls and retries must do the work,
    or the test signs the events it means to send."""
    silence_webhooks(localstripe_url, billing_url)


@pytest.fixture
async def billing(billing_url: str, sidecar_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The billing API; the sidecar runs too, so plan pushes can be seen where they matter."""
    async with httpx.AsyncClient(base_url=billing_url, timeout=30) as client:
        yield client


@pytest.fixture
def stripe_client(localstripe_url: str) -> stripe.StripeClient:
    """Stripe's side of the story: what Stripe (or an operator in its dashboard) does."""
    return stripe.StripeClient(
        STRIPE_KEY,
        base_addresses={"api": localstripe_url},
        max_network_retries=0,
        http_client=stripe.HTTPXClient(),
    )
