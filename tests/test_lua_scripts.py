"""Each Lua script called directly through quota_common.scripts, as its header documents it:
keys, arguments, return codes and answers; and recovery from NOSCRIPT after SCRIPT FLUSH."""

from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis

from quota_common.codes import Code
from quota_common.keys import UserKeys, user_keys
from quota_common.periods import calendar_month
from quota_common.scripts import SCRIPTS, register_all
from tests.books import field_of, hash_of, stream_entries
from tests.servers import eventually

THRESHOLDS = "80,90,100"


def period() -> tuple[int, int]:
    start, end = calendar_month(datetime.now(UTC))
    return int(start.timestamp()), int(end.timestamp())


async def seed(
    redis: Redis, user: str, quota: int = 10_000, used: int = 0, **next_plan: str
) -> Any:
    ps, pe = period()
    args = ["FREE", quota, 0, used, ps, pe, next_plan.get("plan", ""), next_plan.get("quota", "")]
    keys = user_keys(user)
    return await SCRIPTS["seed"](redis, [keys.state, keys.holds], [*args, keys.record_prefix])


def joined(reply: list[Any]) -> tuple[int, str]:
    """A hot script's {code, value...} as (code, "value|value"), for short assertions."""
    values = [v.decode() if isinstance(v, bytes) else str(v) for v in reply[1:]]
    return int(reply[0]), "|".join(values)


async def reserve(
    redis: Redis, user: UserKeys, rid: str, tokens: int, min_tokens: int = 0, ttl_ms: int = 60_000
) -> tuple[int, str]:
    args = [user.user_id, rid, tokens, min_tokens, ttl_ms, "", user.record_prefix]
    return joined(await SCRIPTS["reserve"](redis, user.reservation_keys(rid), args))


async def commit(
    redis: Redis, user: UserKeys, rid: str, tokens: int, md: str = "", charge_unknown: str = "1"
) -> tuple[int, str]:
    args = [user.user_id, rid, tokens, md, user.record_prefix, THRESHOLDS, charge_unknown]
    return joined(await SCRIPTS["commit"](redis, user.reservation_keys(rid), args))


async def refund(redis: Redis, user: UserKeys, rid: str) -> tuple[int, str]:
    args = [user.user_id, rid, user.record_prefix]
    return joined(await SCRIPTS["refund"](redis, user.reservation_keys(rid), args))


async def extend(
    redis: Redis, user: UserKeys, rid: str, tokens: int, ttl_ms: int = 0
) -> tuple[int, str]:
    args = [user.user_id, rid, tokens, ttl_ms, user.record_prefix]
    return joined(await SCRIPTS["extend"](redis, user.reservation_keys(rid), args))


async def on_state(redis: Redis, name: str, user: UserKeys, *extra: Any) -> tuple[int, str]:
    keys = user.state_keys()
    code, answer = await SCRIPTS[name](redis, keys, [user.user_id, user.record_prefix, *extra])
    return int(code), answer.decode()


async def test_every_call_on_an_unknown_user_is_not_loaded(redis: Redis) -> None:
    u = user_keys("ghost")
    assert (await reserve(redis, u, "r", 1))[0] == Code.NOT_LOADED
    assert (await commit(redis, u, "r", 1))[0] == Code.NOT_LOADED
    assert (await refund(redis, u, "r"))[0] == Code.NOT_LOADED
    assert (await extend(redis, u, "r", 1))[0] == Code.NOT_LOADED
    for name in ("usage", "reset"):
        assert (await on_state(redis, name, u))[0] == Code.NOT_LOADED
    assert (await on_state(redis, "grant", u, 5, 0))[0] == Code.NOT_LOADED
    assert await redis.dbsize() == 0


async def test_seed_sets_once_and_never_adds(redis: Redis) -> None:
    u = user_keys("s")
    assert await seed(redis, "s", used=700) == 1
    assert await seed(redis, "s", used=700) == 0
    assert await seed(redis, "s", quota=1, used=99) == 0
    state = await hash_of(redis, u.state)
    assert (state[b"used"], state[b"quota"], state[b"reserved"]) == (b"700", b"10000", b"0")


async def test_reserve_answers_and_codes(redis: Redis) -> None:
    await seed(redis, "r", quota=1000, used=100)
    u = user_keys("r")
    ps, pe = period()
    code, answer = await reserve(redis, u, "a", 600)
    assert code == Code.OK
    plan, granted, limit, used, reserved, aps, ape, expires = answer.split("|")
    assert (plan, granted, limit, used, reserved) == ("FREE", "600", "1000", "100", "600")
    assert (int(aps), int(ape)) == (ps, pe)
    assert abs(int(expires) - (datetime.now(UTC).timestamp() * 1000 + 60_000)) < 5_000
    assert await reserve(redis, u, "a", 600) == (Code.REPLAYED, answer)
    assert (await reserve(redis, u, "a", 601))[0] == Code.IDEMPOTENCY_CONFLICT
    code, refusal = await reserve(redis, u, "b", 301)
    assert code == Code.QUOTA_EXCEEDED
    assert refusal.split("|")[1] == "0" and refusal.split("|")[-1] == "0"
    # Partial: 300 left, at least 300 asked -> 300; nothing left -> refused.
    code, answer = await reserve(redis, u, "c", 1000, min_tokens=300)
    assert code == Code.OK and answer.split("|")[1] == "300"
    assert (await reserve(redis, u, "d", 1000, min_tokens=1))[0] == Code.QUOTA_EXCEEDED
    assert await redis.zcard(u.holds) == 2
    assert await redis.zscore(u.due, "r") is not None


async def test_commit_answers_and_codes(redis: Redis) -> None:
    await seed(redis, "c", quota=1000)
    u = user_keys("c")
    await reserve(redis, u, "a", 500)
    code, answer = await commit(redis, u, "a", 200, '{"m":"x"}')
    assert code == Code.OK
    assert answer.split("|")[:6] == ["200", "300", "200", "0", "1000", "0"]
    assert answer.split("|")[-1] == "500"  # the hold, for the charged/reserved histogram
    assert await commit(redis, u, "a", 200) == (Code.REPLAYED, answer)
    assert (await commit(redis, u, "a", 201))[0] == Code.IDEMPOTENCY_CONFLICT
    # No record: NOT_FOUND (the sidecar asks Postgres first), nothing charged; then charged.
    assert await commit(redis, u, "never", 50, charge_unknown="0") == (Code.NOT_FOUND, "")
    assert await field_of(redis, u.state, "used") == b"200"
    code, late = await commit(redis, u, "never", 50)
    assert code == Code.OK and late.split("|")[:6] == ["50", "0", "250", "0", "1000", "1"]
    assert late.split("|")[-1] == "0"
    await reserve(redis, u, "b", 10)
    await refund(redis, u, "b")
    assert (await commit(redis, u, "b", 10))[0] == Code.ALREADY_REFUNDED
    # Zero tokens charge nothing (and never call HINCRBY with -0).
    await reserve(redis, u, "z", 10)
    assert (await commit(redis, u, "z", 0))[1].split("|")[:4] == ["0", "10", "250", "0"]
    # A commit past the limit is charged and fires every threshold once.
    await reserve(redis, u, "big", 100)
    assert (await commit(redis, u, "big", 900))[0] == Code.OK
    alerts = [e for e in await stream_entries(redis, u.stream) if e[b"k"] == b"alert"]
    assert sorted(int(e[b"th"]) for e in alerts) == [80, 90, 100]


async def test_refund_answers_and_codes(redis: Redis) -> None:
    await seed(redis, "f", quota=1000)
    u = user_keys("f")
    assert (await refund(redis, u, "none"))[0] == Code.NOT_FOUND
    await reserve(redis, u, "a", 400)
    code, answer = await refund(redis, u, "a")
    assert code == Code.OK and answer.split("|")[:5] == ["refunded", "400", "0", "0", "1000"]
    assert await refund(redis, u, "a") == (Code.REPLAYED, answer)
    await reserve(redis, u, "b", 1)
    await commit(redis, u, "b", 1)
    assert (await refund(redis, u, "b"))[0] == Code.ALREADY_COMMITTED
    await reserve(redis, u, "e", 100, ttl_ms=1)
    await _until_expired(redis, u, "e")
    code, answer = await refund(redis, u, "e")
    assert code == Code.OK and answer.split("|")[:2] == ["expired", "100"]
    # That refund settled nothing (the expiry did): a commit after it is late, and charged.
    code, late = await commit(redis, u, "e", 10)
    assert code == Code.OK and late.split("|")[5] == "1"
    assert await field_of(redis, u.state, "used") == b"11"
    assert (await refund(redis, u, "e"))[0] == Code.REPLAYED


async def test_holds_are_only_looked_at_once_one_may_have_expired(redis: Redis) -> None:
    """`ex` is a lower bound of the hold expiries: commits leave it (and the due score) early,
    the first call after it sweeps and sets both to the next expiry exactly."""
    await seed(redis, "ex", quota=1000)
    u = user_keys("ex")
    await reserve(redis, u, "short", 10, ttl_ms=50)
    await reserve(redis, u, "long", 20, ttl_ms=600_000)
    short_expiry = int(await score_of(redis, u.holds, "short"))
    assert await field_of(redis, u.state, "ex") == b"%d" % short_expiry
    await commit(redis, u, "short", 5)
    assert await redis.zscore(u.due, "ex") == short_expiry  # early, never late
    await _until_expired_past(redis, short_expiry)
    assert (await on_state(redis, "usage", u))[1].split("|")[3] == "20"
    long_expiry = int(await score_of(redis, u.holds, "long"))
    assert await field_of(redis, u.state, "ex") == b"%d" % long_expiry
    assert await redis.zscore(u.due, "ex") == long_expiry
    await refund(redis, u, "long")
    await on_state(redis, "usage", u)
    assert await field_of(redis, u.state, "ex") is None
    assert await redis.zscore(u.due, "ex") is None


async def score_of(redis: Redis, key: str, member: str) -> float:
    score = await redis.zscore(key, member)
    assert score is not None, f"{member} is not in {key}"
    return score


async def _until_expired_past(redis: Redis, expiry_ms: float) -> None:
    async def passed() -> bool:
        seconds, micros = await redis.time()
        return bool(seconds * 1000 + micros // 1000 > expiry_ms)

    await eventually(passed, 5, "Redis' clock passing the expiry")


async def _until_expired(redis: Redis, u: UserKeys, rid: str) -> None:
    for _ in range(200):
        await on_state(redis, "usage", u)
        if await field_of(redis, u.record(rid), "s") == b"E":
            return
        await redis.ping()
    raise AssertionError(f"{rid} did not expire")


async def test_extend_answers_and_codes(redis: Redis) -> None:
    await seed(redis, "x", quota=1000)
    u = user_keys("x")
    assert (await extend(redis, u, "none", 5))[0] == Code.NOT_FOUND
    await reserve(redis, u, "a", 100)
    assert await extend(redis, u, "a", 99) == (Code.BELOW_HOLD, "100")
    code, answer = await extend(redis, u, "a", 400, ttl_ms=120_000)
    assert code == Code.OK and answer.split("|")[1:5] == ["400", "1000", "0", "400"]
    assert (await extend(redis, u, "a", 1001))[0] == Code.QUOTA_EXCEEDED
    assert await field_of(redis, u.state, "reserved") == b"400"
    await commit(redis, u, "a", 1)
    assert (await extend(redis, u, "a", 500))[0] == Code.ALREADY_COMMITTED
    await reserve(redis, u, "b", 1)
    await refund(redis, u, "b")
    assert (await extend(redis, u, "b", 5))[0] == Code.ALREADY_REFUNDED
    await reserve(redis, u, "e", 1, ttl_ms=1)
    await _until_expired(redis, u, "e")
    assert (await extend(redis, u, "e", 5))[0] == Code.EXPIRED


async def test_usage_grant_reset_and_apply_plan(redis: Redis) -> None:
    await seed(redis, "g", quota=1000, used=300)
    u = user_keys("g")
    ps, pe = period()
    assert await on_state(redis, "usage", u) == (
        Code.OK,
        f"FREE|1000|300|0|0|{ps}|{pe}",
    )
    assert (await on_state(redis, "grant", u, 250, ps))[1].split("|")[:5] == [
        "FREE",
        "1250",
        "300",
        "0",
        "250",
    ]
    # Setting, not adding: the same total again changes nothing; another period is ignored.
    assert (await on_state(redis, "grant", u, 250, ps))[1].split("|")[1] == "1250"
    assert (await on_state(redis, "grant", u, 999, ps - 1))[1].split("|")[1] == "1250"
    code, answer = await on_state(redis, "reset", u)
    assert code == Code.OK and answer.split("|")[2] == "0"
    assert [e[b"k"] for e in await stream_entries(redis, u.stream)] == [b"reset"]
    args = ["PRO", 5_000_000, 0, 42, ps + 1, pe + 10, "FREE", 1000]
    assert await SCRIPTS["apply_plan"](redis, [u.state], args) == 1
    state = await hash_of(redis, u.state)
    assert state[b"plan"] == b"PRO" and state[b"used"] == b"42" and state[b"np"] == b"FREE"
    assert await SCRIPTS["apply_plan"](redis, [user_keys("nobody").state], args) == 0
    assert not await redis.exists(user_keys("nobody").state)


async def test_scripts_recover_from_script_flush(redis: Redis) -> None:
    await register_all(redis)
    await seed(redis, "n")
    u = user_keys("n")
    # The script cache is the server's: another process on it may load scripts again at any
    # moment, so the flush is checked through what matters, calls that keep working.
    await redis.script_flush()
    code, _ = await reserve(redis, u, "a", 10)
    assert code == Code.OK
    assert (await redis.script_exists(SCRIPTS["reserve"].sha)) == [True]
    await redis.script_flush()
    assert (await commit(redis, u, "a", 10))[0] == Code.OK


def test_every_key_of_a_call_shares_one_hash_slot() -> None:
    u = user_keys("someone@example.com")
    tags = {key.split("{", 1)[1].split("}", 1)[0] for key in u.reservation_keys("rid")}
    assert len(tags) == 1
    for script in SCRIPTS.values():
        assert "redis.call('KEYS'" not in script.source, script.name


async def test_lua_calendar_months_match_python(redis: Redis) -> None:
    """month_bounds() of the prelude (FREE periods) against quota_common.periods, on the
    edges: year ends, leap days, the first and last second of a month."""
    prelude = files("lua").joinpath("_prelude.lua").read_text()
    probe = prelude + "\nlocal out = {}\nfor i, s in ipairs(ARGV) do\n"
    probe += "  local a, b = month_bounds(tonumber(s))\n  out[i] = a .. '-' .. b\nend\nreturn out"
    moments = [
        datetime(year, month, day, hour, tzinfo=UTC)
        for year in (1999, 2000, 2024, 2026, 2100)
        for month, day in ((1, 1), (2, 28), (2, 29) if year in (2000, 2024) else (3, 1), (12, 31))
        for hour in (0, 23)
    ]
    seconds = [int(m.timestamp()) for m in moments]
    seconds += [s - 1 for s in seconds] + [int(datetime.now(UTC).timestamp())]
    answers = await redis.eval(probe, 0, *seconds)
    for second, answer in zip(seconds, answers, strict=True):
        start, end = calendar_month(datetime.fromtimestamp(second, UTC))
        assert answer.decode() == f"{int(start.timestamp())}-{int(end.timestamp())}", second


async def test_a_state_expires_a_week_after_its_last_period_unless_renewed(redis: Redis) -> None:
    """Redis keeps the users of the last weeks, not everyone ever seen: a seeded state expires
    7 days after its period ends, and a call in a later period (its rollover) renews that."""
    week_ms = 7 * 86_400_000
    await seed(redis, "idle")
    u = user_keys("idle")
    _, pe = period()
    assert await redis.pexpiretime(u.state) == pe * 1000 + week_ms
    seconds = int((await redis.time())[0])
    await redis.hset(u.state, mapping={"ps": seconds - 200_000, "pe": seconds - 100_000})
    assert (await on_state(redis, "usage", u))[0] == Code.OK  # rolls into the current month
    assert (
        await redis.pexpiretime(u.state)
        == int(await field_of(redis, u.state, "pe") or 0) * 1000 + week_ms
    )
