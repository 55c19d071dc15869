"""Guarantee 2, one case at a time: each reservation settles at most once (commit, refund or
expiry), a retry returns the first result, and nothing is charged twice."""

import json
from datetime import UTC, datetime, timedelta

import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.keys import user_keys
from tests.api import commit, refund, reserve, usage
from tests.books import assert_books_balance, seed_used, stream_entries
from tests.servers import eventually


async def expired_hold(http: httpx.AsyncClient, user: str, rid: str, tokens: int) -> None:
    """A 1 s hold, awaited until it no longer counts."""
    await hold(http, user, rid, tokens, ttl_s=1)

    async def released() -> bool:
        return int((await usage(http, user))["reserved"]) == 0

    await eventually(released, 5, "the 1 s hold to expire")


async def hold(http: httpx.AsyncClient, user: str, rid: str, tokens: int, **fields: object) -> None:
    status, body = await reserve(http, user, tokens, reservation_id=rid, **fields)
    assert status == 200, body


async def test_commit_twice_replays_the_first_answer(http: httpx.AsyncClient, redis: Redis) -> None:
    await hold(http, "u1", "r1", 1000)
    status, first = await commit(http, "u1", "r1", 700)
    assert status == 200 and first["replayed"] is False
    status, again = await commit(http, "u1", "r1", 700)
    assert status == 200 and again["replayed"] is True
    assert {**again, "replayed": False} == first
    await assert_books_balance(redis, "u1", base_used=0, charged=700, held=0)


async def test_refund_twice_replays_the_first_answer(http: httpx.AsyncClient, redis: Redis) -> None:
    await hold(http, "u1", "r1", 1000)
    status, first = await refund(http, "u1", "r1")
    assert status == 200 and first["status"] == "refunded" and first["released"] == 1000
    assert first["reserved"] == 0 and not first["replayed"]
    status, again = await refund(http, "u1", "r1")
    assert status == 200 and again["replayed"] is True
    assert {**again, "replayed": False} == first
    await assert_books_balance(redis, "u1", base_used=0, charged=0, held=0)


async def test_commit_after_refund_is_409_already_refunded(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    await hold(http, "u1", "r1", 1000)
    assert (await refund(http, "u1", "r1"))[0] == 200
    status, body = await commit(http, "u1", "r1", 500)
    assert status == 409 and body["error"]["code"] == "already_refunded"
    assert (await usage(http, "u1"))["used"] == 0
    await assert_books_balance(redis, "u1", base_used=0, charged=0, held=0)


async def test_refund_after_commit_is_409_already_committed(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    await hold(http, "u1", "r1", 1000)
    assert (await commit(http, "u1", "r1", 400))[0] == 200
    status, body = await refund(http, "u1", "r1")
    assert status == 409 and body["error"]["code"] == "already_committed"
    assert (await usage(http, "u1"))["used"] == 400
    await assert_books_balance(redis, "u1", base_used=0, charged=400, held=0)


async def test_reserve_replay_with_other_tokens_is_idempotency_conflict(
    http: httpx.AsyncClient,
) -> None:
    await hold(http, "u1", "r1", 1000)
    status, body = await reserve(http, "u1", 1001, reservation_id="r1")
    assert status == 409 and body["error"]["code"] == "idempotency_conflict"
    status, body = await reserve(http, "u1", 1000, reservation_id="r1", ttl_s=77)
    assert status == 409 and body["error"]["code"] == "idempotency_conflict"
    now = await usage(http, "u1")
    assert now["reserved"] == 1000


async def test_reserve_replay_returns_original_body_whatever_happened_since(
    http: httpx.AsyncClient,
) -> None:
    status, first = await reserve(http, "u1", 1000, reservation_id="r1")
    assert status == 200
    assert (await commit(http, "u1", "r1", 10))[0] == 200
    status, again = await reserve(http, "u1", 1000, reservation_id="r1")
    assert status == 200 and again["replayed"] is True
    assert {**again, "replayed": False} == first
    now = await usage(http, "u1")
    assert (now["used"], now["reserved"]) == (10, 0)


async def test_commit_replay_with_other_tokens_is_idempotency_conflict(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    await hold(http, "u1", "r1", 1000)
    assert (await commit(http, "u1", "r1", 300))[0] == 200
    status, body = await commit(http, "u1", "r1", 301)
    assert status == 409 and body["error"]["code"] == "idempotency_conflict"
    await assert_books_balance(redis, "u1", base_used=0, charged=300, held=0)


async def test_commit_more_than_held_charges_everything_and_blocks_next_reserve(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    await hold(http, "u1", "r1", 90_000)
    status, body = await commit(http, "u1", "r1", 120_000)
    assert status == 200 and body["charged"] == 120_000 and body["released"] == 0
    assert body["used"] == 120_000 and body["remaining"] == 0 and not body["late"]
    status, body = await reserve(http, "u1", 1)
    assert status == 429 and body["remaining"] == 0
    now = await usage(http, "u1")
    assert now["remaining"] == 0 and now["used"] == 120_000
    await assert_books_balance(redis, "u1", base_used=0, charged=120_000, held=0)


async def test_commit_less_and_zero_release_the_rest(http: httpx.AsyncClient, redis: Redis) -> None:
    await hold(http, "u1", "less", 1000)
    await hold(http, "u1", "zero", 500)
    status, less = await commit(http, "u1", "less", 250)
    assert status == 200 and (less["charged"], less["released"]) == (250, 750)
    status, zero = await commit(http, "u1", "zero", 0)
    assert status == 200 and (zero["charged"], zero["released"]) == (0, 500)
    assert zero["used"] == 250 and zero["reserved"] == 0 and zero["remaining"] == 99_750
    status, again = await commit(http, "u1", "zero", 0)
    assert status == 200 and again["replayed"] is True
    await assert_books_balance(redis, "u1", base_used=0, charged=250, held=0)


async def test_commit_after_expiry_is_charged_and_late(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    await expired_hold(http, "u1", "r1", 1000)
    status, body = await commit(http, "u1", "r1", 800)
    assert status == 200 and body["late"] is True and body["charged"] == 800
    assert body["released"] == 0 and body["used"] == 800
    status, again = await commit(http, "u1", "r1", 800)
    assert status == 200 and again["replayed"] is True and again["late"] is True
    books = await assert_books_balance(redis, "u1", base_used=0, charged=800, held=0)
    assert books.settlements["r1"] == {"expired": 1, "committed": 1}


async def test_commit_for_unknown_reservation_is_charged_and_late(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    status, body = await commit(http, "u1", "never-reserved", 321)
    assert status == 200 and body["late"] is True and body["charged"] == 321
    assert body["used"] == 321
    status, body = await commit(http, "u1", "never-reserved", 321)
    assert status == 200 and body["replayed"] is True
    assert (await usage(http, "u1"))["used"] == 321
    await assert_books_balance(redis, "u1", base_used=0, charged=321, held=0)


async def test_refund_unknown_reservation_is_404(http: httpx.AsyncClient) -> None:
    status, body = await refund(http, "u1", "nope")
    assert status == 404 and body["error"]["code"] == "reservation_not_found"
    assert body["error"]["message"]


async def test_two_users_with_the_same_reservation_id_do_not_meet(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    await hold(http, "ann", "shared", 1000)
    await hold(http, "bob", "shared", 2000)
    status, body = await commit(http, "ann", "shared", 100)
    assert status == 200 and not body["replayed"] and body["released"] == 900
    status, body = await refund(http, "bob", "shared")
    assert status == 200 and body["status"] == "refunded" and body["released"] == 2000
    assert (await usage(http, "ann"))["used"] == 100
    assert (await usage(http, "bob"))["used"] == 0
    await assert_books_balance(redis, "ann", base_used=0, charged=100, held=0)
    await assert_books_balance(redis, "bob", base_used=0, charged=0, held=0)


async def test_reserve_with_an_id_a_late_commit_settled_conflicts(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    assert (await commit(http, "u1", "spent", 40))[0] == 200
    status, body = await reserve(http, "u1", 100, reservation_id="spent")
    assert status == 409 and body["error"]["code"] == "idempotency_conflict"
    await assert_books_balance(redis, "u1", base_used=0, charged=40, held=0)


def rfc3339_utc(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_answers_carry_every_contract_field(http: httpx.AsyncClient) -> None:
    status, held = await reserve(http, "u1", 100, reservation_id="f", metadata={"m": "gpt"})
    assert status == 200
    assert set(held) >= {
        "reservation_id", "user_id", "plan", "granted", "limit", "used", "reserved",
        "remaining", "period_start", "period_end", "expires_at", "replayed",
    }  # fmt: skip
    assert held["remaining"] == held["limit"] - held["used"] - held["reserved"]
    start, end = rfc3339_utc(held["period_start"]), rfc3339_utc(held["period_end"])
    expires = rfc3339_utc(held["expires_at"])
    now = datetime.now(UTC)
    assert start <= now < end
    assert timedelta(seconds=290) < expires - now <= timedelta(seconds=301)  # the 300 s default
    status, done = await commit(http, "u1", "f", 60)
    assert status == 200
    assert set(done) >= {
        "reservation_id", "status", "charged", "released", "used", "reserved", "remaining",
        "late", "replayed",
    }  # fmt: skip
    assert done["status"] == "committed"
    assert (await reserve(http, "u1", 100, reservation_id="g"))[0] == 200
    status, voided = await refund(http, "u1", "g")
    assert status == 200
    assert set(voided) >= {"reservation_id", "status", "released", "used", "reserved", "remaining"}
    now_usage = await usage(http, "u1")
    assert set(now_usage) == {
        "user_id", "plan", "limit", "used", "reserved", "remaining", "credits", "period_start",
        "period_end",
    }  # fmt: skip


async def test_quota_exceeded_has_usage_fields_and_retry_after(
    http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    await seed_used(pg, "u1", 99_990)
    response = await http.post("/v1/reserve", json={"user_id": "u1", "tokens": 11})
    assert response.status_code == 429
    body = response.json()
    assert body["error"]["code"] == "quota_exceeded" and body["error"]["message"]
    assert (body["plan"], body["limit"], body["used"], body["reserved"], body["remaining"]) == (
        "FREE",
        100_000,
        99_990,
        0,
        10,
    )
    to_end = (rfc3339_utc(body["period_end"]) - datetime.now(UTC)).total_seconds()
    assert abs(int(response.headers["retry-after"]) - to_end) <= 5
    assert (await usage(http, "u1"))["reserved"] == 0


async def test_reserve_replay_with_other_metadata_conflicts(http: httpx.AsyncClient) -> None:
    status, _ = await reserve(http, "u1", 10, reservation_id="m", metadata={"c": "1"})
    assert status == 200
    status, body = await reserve(http, "u1", 10, reservation_id="m", metadata={"c": "2"})
    assert status == 409 and body["error"]["code"] == "idempotency_conflict"
    status, body = await reserve(http, "u1", 10, reservation_id="m", metadata={"c": "1"})
    assert status == 200 and body["replayed"] is True


async def test_commit_metadata_is_merged_over_the_reservation_s(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    metadata = {"conversation_id": "c1", "model": "small"}
    assert (await reserve(http, "u1", 10, reservation_id="m", metadata=metadata))[0] == 200
    status, _ = await commit(http, "u1", "m", 7, metadata={"model": "large", "n": 'ü/"'})
    assert status == 200
    (entry,) = [e for e in await stream_entries(redis, user_keys("u1").stream)]
    assert entry[b"k"] == b"committed" and entry[b"tr"] == b"10" and entry[b"tc"] == b"7"
    assert json.loads(entry[b"md"]) == {"conversation_id": "c1", "model": "large", "n": 'ü/"'}


async def test_refund_of_expired_hold_replays_after_a_late_commit(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    """A refund of an expired hold settles nothing (the expiry did) and says so; a commit after
    it is a late commit, charged (usage that happened is never dropped); the refund replays."""
    await expired_hold(http, "u1", "r1", 1000)
    status, first = await refund(http, "u1", "r1")
    assert status == 200 and first["status"] == "expired"
    status, late = await commit(http, "u1", "r1", 300)
    assert status == 200 and late["late"] is True and late["charged"] == 300
    assert (await usage(http, "u1"))["used"] == 300
    status, again = await refund(http, "u1", "r1")
    assert status == 200 and again["replayed"] is True and again["status"] == "expired"
