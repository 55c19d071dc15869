"""Extend (raise an open hold to a new total) and partial grants with min_tokens, at the edges."""

from datetime import datetime

import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.api import commit, extend, refund, reserve, usage
from tests.books import assert_books_balance, seed_used
from tests.servers import eventually

LIMIT = 100_000


def moment(rfc3339: str) -> datetime:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))


async def test_extend_within_quota_raises_the_hold(http: httpx.AsyncClient, redis: Redis) -> None:
    status, first = await reserve(http, "u1", 1000, reservation_id="r1")
    assert status == 200
    status, body = await extend(http, "u1", "r1", 2500)
    assert status == 200, body
    assert body["granted"] == 2500 and body["reserved"] == 2500 and body["remaining"] == 97_500
    assert body["expires_at"] == first["expires_at"] and body["reservation_id"] == "r1"
    status, done = await commit(http, "u1", "r1", 2000)
    assert status == 200 and done["released"] == 500
    await assert_books_balance(redis, "u1", base_used=0, charged=2000, held=0)


async def test_extend_beyond_quota_is_429_and_the_hold_stays(
    http: httpx.AsyncClient, redis: Redis, pg: AsyncEngine
) -> None:
    await seed_used(pg, "u1", LIMIT - 3000)
    assert (await reserve(http, "u1", 1000, reservation_id="r1"))[0] == 200
    status, body = await extend(http, "u1", "r1", 3001)
    assert status == 429 and body["error"]["code"] == "quota_exceeded", body
    assert body["remaining"] == 2000
    now = await usage(http, "u1")
    assert now["reserved"] == 1000
    # Exactly what is left is fine.
    status, body = await extend(http, "u1", "r1", 3000)
    assert status == 200 and body["remaining"] == 0
    await assert_books_balance(redis, "u1", base_used=LIMIT - 3000, charged=0, held=3000)


async def test_extend_replayed_changes_nothing(http: httpx.AsyncClient, redis: Redis) -> None:
    assert (await reserve(http, "u1", 1000, reservation_id="r1"))[0] == 200
    status, first = await extend(http, "u1", "r1", 4000)
    assert status == 200
    status, again = await extend(http, "u1", "r1", 4000)
    assert status == 200 and again["granted"] == 4000 and again["reserved"] == 4000
    assert again["expires_at"] == first["expires_at"]
    await assert_books_balance(redis, "u1", base_used=0, charged=0, held=4000)


async def test_extend_moves_the_expiry(http: httpx.AsyncClient) -> None:
    status, first = await reserve(http, "u1", 1000, reservation_id="r1", ttl_s=1)
    assert status == 200
    status, body = await extend(http, "u1", "r1", 1000, ttl_s=3600)
    assert status == 200
    moved = (moment(body["expires_at"]) - moment(first["expires_at"])).total_seconds()
    assert 3590 < moved < 3600
    # Well past the original second, the hold still counts.
    status, late = await extend(http, "u1", "r1", 1000, ttl_s=1)
    assert status == 200
    assert moment(late["expires_at"]) < moment(body["expires_at"])


async def test_extend_below_the_hold_is_422(http: httpx.AsyncClient) -> None:
    assert (await reserve(http, "u1", 1000, reservation_id="r1"))[0] == 200
    status, body = await extend(http, "u1", "r1", 999)
    assert status == 422 and body["error"]["code"] == "validation_error"
    assert (await usage(http, "u1"))["reserved"] == 1000


async def test_extend_after_settle_is_409(http: httpx.AsyncClient) -> None:
    for rid in ("c", "r", "e"):
        ttl = 1 if rid == "e" else 300
        assert (await reserve(http, "u1", 100, reservation_id=rid, ttl_s=ttl))[0] == 200
    assert (await commit(http, "u1", "c", 100))[0] == 200
    assert (await refund(http, "u1", "r"))[0] == 200

    async def expired() -> bool:
        return int((await usage(http, "u1"))["reserved"]) == 0

    await eventually(expired, 5, "the 1 s hold to expire")
    for rid, code in (("c", "already_committed"), ("r", "already_refunded"), ("e", "expired")):
        status, body = await extend(http, "u1", rid, 200)
        assert status == 409 and body["error"]["code"] == code, (rid, body)
    status, body = await extend(http, "u1", "unknown", 200)
    assert status == 404 and body["error"]["code"] == "reservation_not_found"
    now = await usage(http, "u1")
    assert (now["used"], now["reserved"]) == (100, 0)


async def test_partial_grant_at_exactly_min_tokens(
    http: httpx.AsyncClient, redis: Redis, pg: AsyncEngine
) -> None:
    await seed_used(pg, "u1", LIMIT - 500)
    status, body = await reserve(http, "u1", 2000, min_tokens=500, reservation_id="p")
    assert status == 200 and body["granted"] == 500 and body["remaining"] == 0, body
    status, again = await reserve(http, "u1", 2000, min_tokens=500, reservation_id="p")
    assert status == 200 and again["replayed"] and again["granted"] == 500
    await assert_books_balance(redis, "u1", base_used=LIMIT - 500, charged=0, held=500)


async def test_partial_grant_one_below_min_tokens_is_429(
    http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    await seed_used(pg, "u1", LIMIT - 499)
    status, body = await reserve(http, "u1", 2000, min_tokens=500)
    assert status == 429 and body["remaining"] == 499
    assert (await usage(http, "u1"))["reserved"] == 0


async def test_partial_when_everything_fits_grants_all(
    http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    await seed_used(pg, "u1", LIMIT - 2000)
    status, body = await reserve(http, "u1", 2000, min_tokens=1)
    assert status == 200 and body["granted"] == 2000 and body["remaining"] == 0
    status, body = await reserve(http, "u1", 1, min_tokens=1)
    assert status == 429


async def test_min_tokens_above_tokens_is_422(http: httpx.AsyncClient) -> None:
    status, body = await reserve(http, "u1", 10, min_tokens=11)
    assert status == 422 and body["error"]["code"] == "validation_error"
