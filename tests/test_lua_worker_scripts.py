"""The scripts of the sync worker and the operator endpoints, called directly on real Redis:
every return code in their headers (raise_used, settled_ack, apply_plan, grant, reset)."""

import time
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from quota_common import keys
from quota_common.codes import Code
from quota_common.keys import UserKeys, user_keys
from quota_common.periods import calendar_month
from quota_common.scripts import SCRIPTS
from sync_worker.drift import RaiseResult
from sync_worker.plans import PlanPush

GROUP = keys.SETTLE_GROUP
OTHER_PERIOD = 2  # lua/grant.lua, lua/reset.lua


def this_month() -> tuple[int, int]:
    start, end = calendar_month(datetime.now(UTC))
    return int(start.timestamp()), int(end.timestamp())


async def seed(redis: Redis, user: UserKeys, used: int = 0, credits: int = 0) -> None:
    ps, pe = this_month()
    args = ["FREE", 1000, credits, used, ps, pe, "", "", user.record_prefix]
    assert await SCRIPTS["seed"](redis, [user.state, user.holds], args) == 1


async def field(redis: Redis, user: UserKeys, name: str) -> bytes | None:
    value: Any = await redis.hget(user.state, name)
    return None if value is None else bytes(value)


async def raise_used(
    redis: Redis, user: UserKeys, floor: int, last_id: str, period_s: int | None = None
) -> tuple[int, int]:
    ps = this_month()[0] if period_s is None else period_s
    code, used = await SCRIPTS["raise_used"](
        redis, [user.state, user.stream], [ps, floor, last_id, GROUP]
    )
    return int(code), int(used)


async def add(redis: Redis, stream: str, fields: dict[Any, Any]) -> str:
    entry_id: Any = await redis.xadd(stream, fields)
    return str(entry_id.decode())


async def caught_up_stream(redis: Redis, user: UserKeys) -> str:
    """The user's stream with one entry, delivered and acknowledged: its last id."""
    entry_id = await add(redis, user.stream, {"k": "reset"})
    await redis.xgroup_create(user.stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, "w", {user.stream: ">"})
    await redis.xack(user.stream, GROUP, entry_id)
    return entry_id


async def test_raise_used_raises_to_the_floor_and_answers_the_used_before(redis: Redis) -> None:
    u = user_keys("low")
    await seed(redis, u, used=100)
    last_id = await caught_up_stream(redis, u)
    assert await raise_used(redis, u, 1000, last_id) == (RaiseResult.OK, 100)
    assert await field(redis, u, "used") == b"1000"
    assert await raise_used(redis, u, 1000, last_id) == (RaiseResult.OK, 1000)


async def test_raise_used_never_lowers_and_answers_how_far_above(redis: Redis) -> None:
    u = user_keys("high")
    await seed(redis, u, used=5000)
    assert await raise_used(redis, u, 1000, "0-0") == (RaiseResult.OK, 5000)  # no stream
    assert await field(redis, u, "used") == b"5000"


async def test_raise_used_not_loaded(redis: Redis) -> None:
    assert await raise_used(redis, user_keys("gone"), 10, "0-0") == (RaiseResult.NOT_LOADED, 0)
    assert await redis.dbsize() == 0


async def test_raise_used_is_stale_in_another_period(redis: Redis) -> None:
    u = user_keys("other")
    await seed(redis, u, used=1)
    assert await raise_used(redis, u, 10, "0-0", this_month()[0] - 86_400) == (
        RaiseResult.STALE,
        0,
    )
    assert await field(redis, u, "used") == b"1"


async def test_raise_used_is_stale_while_the_stream_is_not_fully_processed(redis: Redis) -> None:
    u = user_keys("busy")
    await seed(redis, u, used=1)
    last_id = await caught_up_stream(redis, u)
    # A settlement added since the worker looked: the stream moved on.
    newer = await add(redis, u.stream, {"k": "committed"})
    assert await raise_used(redis, u, 10, last_id) == (RaiseResult.STALE, 0)
    # At the new id, but not yet delivered to the group.
    assert await raise_used(redis, u, 10, newer) == (RaiseResult.STALE, 0)
    # Delivered, not acknowledged: pending.
    await redis.xreadgroup(GROUP, "w", {u.stream: ">"})
    assert await raise_used(redis, u, 10, newer) == (RaiseResult.STALE, 0)
    await redis.xack(u.stream, GROUP, newer)
    assert await raise_used(redis, u, 10, newer) == (RaiseResult.OK, 1)


async def test_raise_used_is_stale_without_the_group_or_the_stream_expected(redis: Redis) -> None:
    u = user_keys("nogroup")
    await seed(redis, u, used=1)
    # The worker saw a stream that is gone now (a flush), or a stream without the group.
    assert await raise_used(redis, u, 10, "5-0") == (RaiseResult.STALE, 0)
    entry_id = await add(redis, u.stream, {"k": "reset"})
    assert await raise_used(redis, u, 10, entry_id) == (RaiseResult.STALE, 0)
    assert await field(redis, u, "used") == b"1"


async def test_settled_ack_acknowledges_and_deletes_exactly_the_ids_given(redis: Redis) -> None:
    stream = keys.settle_stream(3)
    ids = [await add(redis, stream, {"n": n}) for n in range(2500)]
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, "w", {stream: ">"}, count=2500)
    done, kept = ids[:2400], ids[2400:]  # more than one slice of 1000
    assert await SCRIPTS["settled_ack"](redis, [stream], [GROUP, *done]) == 2400
    left: Any = await redis.xrange(stream)
    assert [entry_id.decode() for entry_id, _ in left] == kept
    assert (await redis.xpending(stream, GROUP))["pending"] == 100
    # A redelivered batch acknowledged again: 0, nothing else touched.
    assert await SCRIPTS["settled_ack"](redis, [stream], [GROUP, *done[:10]]) == 0
    assert await redis.xlen(stream) == 100


async def apply_plan(redis: Redis, user: UserKeys, **fields: Any) -> int:
    ps, pe = this_month()
    account = {"plan": "PLUS", "quota": 5000, "credits": 0, "used": 0, "ps": ps, "pe": pe}
    account.update(fields)
    args = [*account.values(), "", ""]
    return int(await SCRIPTS["apply_plan"](redis, [user.state], args))


async def test_apply_plan_unknown_user(redis: Redis) -> None:
    assert await apply_plan(redis, user_keys("nobody")) == PlanPush.UNKNOWN_USER
    assert await redis.dbsize() == 0


async def test_apply_plan_refuses_a_period_that_is_not_current_by_redis_clock(
    redis: Redis,
) -> None:
    u = user_keys("skew")
    await seed(redis, u, used=700)
    before: Any = await redis.hgetall(u.state)
    now = int(time.time())
    # Computed on a clock behind Redis' (the period already ended) or ahead of it.
    assert await apply_plan(redis, u, ps=now - 100, pe=now - 1, used=9) == PlanPush.NOT_CURRENT
    assert await apply_plan(redis, u, ps=now + 60, pe=now + 99, used=9) == PlanPush.NOT_CURRENT
    assert await redis.hgetall(u.state) == before


async def test_apply_plan_never_lowers_the_credits_of_the_same_period(redis: Redis) -> None:
    u = user_keys("granted")
    await seed(redis, u, used=700, credits=500)
    # A push that read the grants before the operator's grant committed.
    assert await apply_plan(redis, u, credits=200) == PlanPush.APPLIED
    assert (await field(redis, u, "credits"), await field(redis, u, "plan")) == (b"500", b"PLUS")
    assert await apply_plan(redis, u, credits=800) == PlanPush.APPLIED
    assert await field(redis, u, "credits") == b"800"
    assert await field(redis, u, "used") == b"700"  # same period: Redis' usage stands


async def test_apply_plan_of_another_current_period_takes_postgres_usage_and_credits(
    redis: Redis,
) -> None:
    u = user_keys("upgraded")
    await seed(redis, u, used=700, credits=500)
    now = int(time.time())
    assert await apply_plan(redis, u, ps=now - 10, pe=now + 3600, used=42) == PlanPush.APPLIED
    state: Any = await redis.hgetall(u.state)
    assert (state[b"used"], state[b"credits"], state[b"ps"]) == (
        b"42",
        b"0",
        str(now - 10).encode(),
    )


async def on_state(redis: Redis, name: str, user: UserKeys, *extra: Any) -> tuple[int, list[str]]:
    keys_ = user.state_keys()
    code, answer = await SCRIPTS[name](redis, keys_, [user.user_id, user.record_prefix, *extra])
    return int(code), answer.decode().split("|") if answer else []


async def test_grant_sets_the_credits_of_its_period_only(redis: Redis) -> None:
    u = user_keys("g")
    assert (await on_state(redis, "grant", u, 5, 0))[0] == Code.NOT_LOADED
    await seed(redis, u)
    ps, pe = this_month()
    code, answer = await on_state(redis, "grant", u, 300, ps - 86_400)
    assert code == OTHER_PERIOD and answer[4:] == ["0", str(ps), str(pe)]  # Redis' period
    code, answer = await on_state(redis, "grant", u, 300, ps)
    assert code == Code.OK and (answer[1], answer[4]) == ("1300", "300")


async def test_reset_answers_its_stream_position_and_refuses_another_period(
    redis: Redis,
) -> None:
    u = user_keys("r")
    assert (await on_state(redis, "reset", u))[0] == Code.NOT_LOADED
    await seed(redis, u, used=900)
    ps, pe = this_month()
    unchanged = ["FREE", "1000", "900", "0", "0", str(ps), str(pe)]
    assert await on_state(redis, "reset", u, ps - 86_400) == (OTHER_PERIOD, unchanged)
    assert await redis.xlen(u.stream) == 0
    code, answer = await on_state(redis, "reset", u, ps)
    entries: Any = await redis.xrange(u.stream)
    assert code == Code.OK and answer[2] == "0" and len(answer) == 8
    assert answer[7] == entries[0][0].decode() and entries[0][1][b"k"] == b"reset"
    assert (await on_state(redis, "reset", u))[0] == Code.OK  # no period given: the current
