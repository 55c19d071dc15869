"""The Python client chat services use (sidecar/client.py), against the real sidecar: the hold()
context manager, its exceptions, retries after a timeout, and requests cancelled mid-flight."""

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.keys import user_keys
from sidecar.client import QuotaClient, QuotaError, QuotaExceeded, QuotaUnavailable
from tests.api import reserve, usage
from tests.books import assert_books_balance, crowd, seed_used
from tests.servers import eventually, free_port


@pytest.fixture
async def quota(sidecar_url: str) -> AsyncIterator[QuotaClient]:
    async with QuotaClient(sidecar_url, timeout_s=10) as client:
        yield client


class Boom(Exception):
    pass


async def test_hold_commits_what_the_block_reports(
    quota: QuotaClient, http: httpx.AsyncClient, redis: Redis
) -> None:
    async with quota.hold("chat", 4000, metadata={"conversation_id": "c1"}) as hold:
        assert hold.granted == 4000 and hold.reservation["reserved"] == 4000
        hold.used = 1234
    now = await usage(http, "chat")
    assert (now["used"], now["reserved"]) == (1234, 0)
    await assert_books_balance(redis, "chat", base_used=0, charged=1234, held=0)


async def test_hold_without_used_commits_the_grant(
    quota: QuotaClient, http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    await seed_used(pg, "chat", 99_000)
    async with quota.hold("chat", 4000, min_tokens=100) as hold:
        assert hold.granted == 1000
    now = await usage(http, "chat")
    assert (now["used"], now["reserved"]) == (100_000, 0)


async def test_hold_refunds_when_the_block_raises(
    quota: QuotaClient, http: httpx.AsyncClient, redis: Redis
) -> None:
    with pytest.raises(Boom):
        async with quota.hold("chat", 4000, reservation_id="failing") as hold:
            hold.used = 10
            raise Boom
    now = await usage(http, "chat")
    assert (now["used"], now["reserved"]) == (0, 0)
    status, body = await reserve(http, "chat", 4000, reservation_id="failing")
    assert status == 200 and body["replayed"]
    books = await assert_books_balance(redis, "chat", base_used=0, charged=0, held=0)
    assert books.settlements["failing"] == {"refunded": 1}


async def test_quota_exceeded_carries_retry_after(quota: QuotaClient, pg: AsyncEngine) -> None:
    await seed_used(pg, "broke", 100_000)
    with pytest.raises(QuotaExceeded) as caught:
        async with quota.hold("broke", 1):
            raise AssertionError("the block must not run")
    error = caught.value
    assert error.status == 429 and error.code == "quota_exceeded"
    assert error.retry_after is not None and 0 < error.retry_after <= 31 * 86_400
    assert error.body["remaining"] == 0


async def test_other_refusals_are_quota_errors(quota: QuotaClient) -> None:
    with pytest.raises(QuotaError) as caught:
        await quota.refund("chat", "unknown")
    assert caught.value.status == 404 and caught.value.code == "reservation_not_found"
    with pytest.raises(QuotaError) as caught:
        await quota.reserve("chat", 0)
    assert caught.value.status == 422


async def test_unreachable_sidecar_is_quota_unavailable() -> None:
    async with QuotaClient(f"http://127.0.0.1:{free_port()}", timeout_s=1) as client:
        with pytest.raises(QuotaUnavailable):
            await client.usage("chat")


class LoseFirstAnswer(httpx.AsyncBaseTransport):
    """Delivers each request, but the first answer to a path is lost as if the client timed
    out after the sidecar had done the work."""

    def __init__(self, inner: httpx.AsyncBaseTransport, path: str) -> None:
        self.inner = inner
        self.path = path
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path == self.path and not self.lost:
            self.lost += 1
            await response.aread()
            raise httpx.ReadTimeout("answer lost", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_commit_retried_after_a_timeout_is_a_replay(
    sidecar_url: str, http: httpx.AsyncClient, redis: Redis
) -> None:
    transport = LoseFirstAnswer(httpx.AsyncHTTPTransport(), "/v1/commit")
    async with QuotaClient(sidecar_url, timeout_s=10, transport=transport) as client:
        hold = await client.reserve("chat", 1000, reservation_id="once")
        again = await client.commit("chat", hold["reservation_id"], 700)
    assert transport.lost == 1
    assert again["replayed"] is True and again["charged"] == 700
    assert (await usage(http, "chat"))["used"] == 700
    await assert_books_balance(redis, "chat", base_used=0, charged=700, held=0)


async def test_reserve_retried_after_a_timeout_holds_once(
    sidecar_url: str, http: httpx.AsyncClient, redis: Redis
) -> None:
    transport = LoseFirstAnswer(httpx.AsyncHTTPTransport(), "/v1/reserve")
    async with QuotaClient(sidecar_url, timeout_s=10, transport=transport) as client:
        again = await client.reserve("chat", 1000, reservation_id="twice")
    assert transport.lost == 1 and again["replayed"] is True
    assert (await usage(http, "chat"))["reserved"] == 1000
    await assert_books_balance(redis, "chat", base_used=0, charged=0, held=1000)


async def test_without_retries_a_lost_answer_is_quota_unavailable(sidecar_url: str) -> None:
    transport = LoseFirstAnswer(httpx.AsyncHTTPTransport(), "/v1/commit")
    async with QuotaClient(sidecar_url, transport=transport, attempts_max=1) as client:
        hold = await client.reserve("chat", 1000)
        with pytest.raises(QuotaUnavailable):
            await client.commit("chat", hold["reservation_id"], 700)
        assert (await client.commit("chat", hold["reservation_id"], 700))["replayed"] is True


class RefundsUnreachable(httpx.AsyncBaseTransport):
    """The sidecar goes away between the reserve and the refund."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/refund":
            raise httpx.ConnectError("sidecar down", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_failed_refund_never_hides_the_blocks_exception(
    sidecar_url: str, http: httpx.AsyncClient
) -> None:
    transport = RefundsUnreachable(httpx.AsyncHTTPTransport())
    async with QuotaClient(sidecar_url, transport=transport, backoff_s=0.001) as client:
        with pytest.raises(Boom):
            async with client.hold("chat", 300, ttl_s=60):
                raise Boom
    # The hold stays until its expiry, as documented.
    assert (await usage(http, "chat"))["reserved"] == 300


async def test_cancelled_requests_leak_no_hold(
    sidecar_url: str, http: httpx.AsyncClient, redis: Redis
) -> None:
    """Many reserves cancelled at random points mid-flight: whatever reached Redis is held once
    (a retry with the same id replays) and expires at its ttl; nothing stays held."""
    calls, tokens = 200, 100
    cut: list[int] = []
    async with crowd(sidecar_url) as clients:

        async def impatient(i: int) -> None:
            body = {"user_id": "flaky", "tokens": tokens, "reservation_id": f"f{i}", "ttl_s": 1}
            # From 2 ms to about 2 s: cut before sending, mid-flight or not at all, however
            # slow the machine is (on a busy one, 100 ms did not get a single request through).
            timeout = httpx.Timeout(0.002 * 1.035**i)
            try:
                await clients[i % len(clients)].post("/v1/reserve", json=body, timeout=timeout)
            except httpx.TimeoutException:
                cut.append(i)

        tasks = [asyncio.create_task(impatient(i)) for i in range(calls)]

        async def some_held() -> bool:
            return await redis.zcard(user_keys("flaky").holds) > 0

        # Cancelled once reserves are reaching Redis: some got there, others are on their way.
        await eventually(some_held, 10, "the first reserves to reach Redis", interval_s=0.002)
        for task in tasks[::3]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    cut += [i for i, task in enumerate(tasks) if task.cancelled()]
    assert cut, "the test must cut requests mid-flight"

    # Retries with the same ids: each one is held at most once, replayed when it got through.
    retried = await asyncio.gather(
        *(reserve(http, "flaky", tokens, reservation_id=f"f{i}", ttl_s=1) for i in range(calls))
    )
    assert all(status == 200 for status, _ in retried), retried
    replays = sum(body["replayed"] for _, body in retried)
    now = await usage(http, "flaky")
    # Some 1 s holds may already have expired on a slow machine; never more than one each.
    assert now["reserved"] <= calls * tokens
    assert now["reserved"] % tokens == 0

    async def released() -> bool:
        return int((await usage(http, "flaky"))["reserved"]) == 0

    await eventually(released, 10, "every cancelled or retried hold to expire")
    books = await assert_books_balance(redis, "flaky", base_used=0, charged=0, held=0)
    assert len(books.settlements) == calls
    assert all(kinds == {"expired": 1} for kinds in books.settlements.values())
    # After expiry a retry still replays the first answer and holds nothing.
    status, body = await reserve(http, "flaky", tokens, reservation_id="f0", ttl_s=1)
    assert status == 200 and body["replayed"] is True
    assert (await usage(http, "flaky"))["reserved"] == 0
    assert replays <= calls


@pytest.mark.parametrize(
    ("status", "content", "content_type"),
    [
        (502, b"<html>Bad Gateway</html>", "text/html"),
        (504, b"", "text/plain"),
        (200, b"not json", "text/plain"),
        (500, b'{"error": {"code": "internal_error", "message": "x"}}', "application/json"),
        (200, b"[1, 2]", "application/json"),
    ],
)
async def test_a_proxy_or_server_failure_is_quota_unavailable(
    status: int, content: bytes, content_type: str
) -> None:
    """What a proxy in front of the sidecar may answer: a clear, retryable QuotaUnavailable,
    never a JSON decoding error or a bare QuotaError."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers={"content-type": content_type})

    transport = httpx.MockTransport(answer)
    async with QuotaClient("http://sidecar", transport=transport) as client:
        with pytest.raises(QuotaUnavailable) as caught:
            await client.reserve("u1", 5)
    assert caught.value.status == status
