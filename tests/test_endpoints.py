"""The sidecar's other faces: bearer SIDECAR_TOKEN on /v1, the Unix socket, /healthz, /readyz
(also with Redis unreachable), /metrics and /openapi.json."""

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.schema import admin_audit
from tests.api import commit, reserve
from tests.books import snapshot
from tests.conftest import start_sidecar
from tests.servers import Process, free_port, wait_until

TOKEN = "sidecar-secret-token"


@pytest.fixture(scope="module")
def guarded_url(base_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    # ADMIN_TOKEN unset too: the operator endpoints are disabled on this one.
    process, url = start_sidecar(base_env, logs_dir, SIDECAR_TOKEN=TOKEN, ADMIN_TOKEN="")
    yield url
    process.stop()


@pytest.fixture
async def guarded(guarded_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded_url, timeout=10) as client:
        yield client


V1_CALLS = [
    ("POST", "/v1/reserve", {"user_id": "u1", "tokens": 5}),
    ("POST", "/v1/extend", {"user_id": "u1", "reservation_id": "r", "tokens": 5}),
    ("POST", "/v1/commit", {"user_id": "u1", "reservation_id": "r", "tokens": 5}),
    ("POST", "/v1/refund", {"user_id": "u1", "reservation_id": "r"}),
    ("GET", "/v1/usage/u1", None),
]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
async def test_v1_needs_the_sidecar_token(
    guarded: httpx.AsyncClient, redis: Redis, headers: dict[str, str]
) -> None:
    before = await snapshot(redis)
    for method, path, body in V1_CALLS:
        response = await guarded.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
    assert await snapshot(redis) == before


async def test_v1_with_the_sidecar_token_works(guarded: httpx.AsyncClient) -> None:
    guarded.headers["Authorization"] = f"Bearer {TOKEN}"
    status, body = await reserve(guarded, "u1", 5, reservation_id="r")
    assert status == 200, body
    assert (await commit(guarded, "u1", "r", 5))[0] == 200
    # Health and metrics stay open for probes and scrapers.
    del guarded.headers["Authorization"]
    assert (await guarded.get("/healthz")).status_code == 200
    assert (await guarded.get("/metrics")).status_code == 200


def test_sidecar_serves_on_a_unix_socket(
    base_env: dict[str, str], logs_dir: Path, tmp_path: Path
) -> None:
    socket_path = str(tmp_path / "sidecar.sock")
    process = Process(
        "quota-sidecar", {**base_env, "SIDECAR_UDS": socket_path}, logs_dir / "sidecar-uds.log"
    ).start()
    transport = httpx.HTTPTransport(uds=socket_path)
    try:
        with httpx.Client(transport=transport, base_url="http://sidecar", timeout=5) as client:

            def ready() -> bool:
                process.running()
                if not os.path.exists(socket_path):
                    return False
                try:
                    return client.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, 20, "the sidecar on its socket")
            response = client.post("/v1/reserve", json={"user_id": "sock", "tokens": 7})
            assert response.status_code == 200 and response.json()["granted"] == 7
    finally:
        process.stop()


async def test_async_client_over_the_unix_socket(
    base_env: dict[str, str], logs_dir: Path, tmp_path: Path
) -> None:
    from sidecar.client import QuotaClient

    socket_path = str(tmp_path / "s.sock")
    process = Process(
        "quota-sidecar", {**base_env, "SIDECAR_UDS": socket_path}, logs_dir / "sidecar-uds2.log"
    ).start()
    try:
        wait_until(lambda: process.running() and os.path.exists(socket_path), 20, "the socket")
        transport = httpx.AsyncHTTPTransport(uds=socket_path)
        async with QuotaClient("http://sidecar", transport=transport, timeout_s=10) as quota:
            async with quota.hold("sock2", 100) as hold:
                hold.used = 40
            assert (await quota.usage("sock2"))["used"] == 40
    finally:
        process.stop()


async def test_healthz_and_readyz(http: httpx.AsyncClient, redis: Redis) -> None:
    assert (await http.get("/healthz")).status_code == 200
    await redis.script_flush()
    response = await http.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")


def test_readyz_is_503_when_redis_is_unreachable(base_env: dict[str, str], logs_dir: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    process, url = start_sidecar(base_env, logs_dir, REDIS_URL=dead, REDIS_TIMEOUT_MS="200")
    try:
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        response = httpx.get(f"{url}/readyz", timeout=5)
        assert response.status_code == 503, response.text
        response = httpx.post(f"{url}/v1/reserve", json={"user_id": "u", "tokens": 1}, timeout=5)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "store_unavailable"
    finally:
        process.stop()


def sample(text: str, name: str) -> float:
    (value,) = [line.split(" ")[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


def series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_are_prometheus_text_named_quota(http: httpx.AsyncClient) -> None:
    before = (await http.get("/metrics")).text
    assert (await reserve(http, "m", 100, reservation_id="r"))[0] == 200
    assert (await commit(http, "m", "r", 50))[0] == 200
    # A commit far above its hold (the estimate was too low) shows as a ratio above 1.
    assert (await reserve(http, "m", 10, reservation_id="small"))[0] == 200
    assert (await commit(http, "m", "small", 500))[0] == 200
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    ratio = "quota_commit_charged_ratio"
    assert sample(text, f"{ratio}_count") - sample(before, f"{ratio}_count") == 2
    assert sample(text, f"{ratio}_sum") - sample(before, f"{ratio}_sum") == pytest.approx(50.5)
    above_5 = sample(text, f'{ratio}_bucket{{le="+Inf"}}') - sample(
        text, f'{ratio}_bucket{{le="5.0"}}'
    )
    assert (
        above_5
        - (
            sample(before, f'{ratio}_bucket{{le="+Inf"}}')
            - sample(before, f'{ratio}_bucket{{le="5.0"}}')
        )
        == 1
    )
    earlier, now = series(before), series(text)
    for name, labels in [
        ("quota_http_requests_total", {"route": "reserve", "status": "200"}),
        ("quota_http_requests_total", {"route": "commit", "status": "200"}),
        ("quota_http_request_duration_seconds_count", {"route": "reserve"}),
        ("quota_http_request_duration_seconds_bucket", {"route": "reserve", "le": "+Inf"}),
    ]:
        key = (name, frozenset(labels.items()))
        assert now[key] - earlier.get(key, 0) == 2, key
    # Cumulative, as Prometheus reads them: each bucket counts the ones below it too.
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in now.items()
        if name == "quota_http_request_duration_seconds_bucket" and ("route", "commit") in labels
    )
    counts = [value for _, value in buckets]
    assert len(counts) == 11 and counts == sorted(counts)
    count = now[("quota_http_request_duration_seconds_count", frozenset({("route", "commit")}))]
    assert counts[-1] == count
    names = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert names and all(name.startswith("quota_") for name in names), sorted(names)
    assert not any(name.endswith("_created") for name in names), sorted(names)


async def test_openapi_lists_every_v1_path(http: httpx.AsyncClient) -> None:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.content)
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path, method in [
        ("/v1/reserve", "post"),
        ("/v1/extend", "post"),
        ("/v1/commit", "post"),
        ("/v1/refund", "post"),
        ("/v1/usage/{user_id}", "get"),
    ]:
        assert method in paths[path], path
    reserve_body = paths["/v1/reserve"]["post"]["requestBody"]["content"]["application/json"]
    assert reserve_body["schema"]["additionalProperties"] is False
    refusal = paths["/v1/reserve"]["post"]["responses"]["429"]
    assert "Retry-After" in refusal["headers"]
    refusal_fields = refusal["content"]["application/json"]["schema"]["required"]
    assert {"plan", "limit", "used", "reserved", "remaining", "period_end"} <= set(refusal_fields)
    for path in ("/v1/reserve", "/v1/extend", "/v1/commit", "/v1/refund"):
        assert {"405", "413", "415", "422"} <= set(paths[path]["post"]["responses"]), path
    assert "404" in paths["/admin/v1/users/{user_id}/credits"]["post"]["responses"]
    assert set(document["components"]["securitySchemes"]) == {"sidecarToken", "adminToken"}
    assert "/openapi.json" in paths


async def test_admin_is_disabled_without_admin_token(
    guarded: httpx.AsyncClient, redis: Redis, pg: AsyncEngine
) -> None:
    before = await snapshot(redis)
    for headers in ({}, {"Authorization": "Bearer " + TOKEN}, {"Authorization": "Bearer x"}):
        response = await guarded.post(
            "/admin/v1/users/u1/credits", json={"tokens": 5, "reason": "x"}, headers=headers
        )
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"]
    assert await snapshot(redis) == before
    async with pg.connect() as conn:
        assert (await conn.execute(select(admin_audit))).first() is None
