"""Plans pushed on NOTIFY within 1 s, and alerts fired once per threshold and delivered
once, with the worker as a real process."""

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.accounts import PLAN_CHANNEL
from tests.api import commit, reserve, usage
from tests.servers import Process, eventually, free_port
from tests.sync.conftest import rows, scalar, start_worker
from tests.sync.receiver import Receiver, signature_valid

SECRET = "whsec_test_secret"
PLAN_LATENCY_MAX_S = 1.0


@pytest.fixture
def workers() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


async def subscribe(pg: AsyncEngine, user_id: str, plan: str, notify: bool = True) -> float:
    """Writes the user's subscription as the billing API does, with its NOTIFY; returns the
    time of the commit."""
    now = datetime.now(UTC)
    async with pg.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO subscriptions (user_id, plan, status, current_period_start,"
                " current_period_end, updated_at) VALUES (:u, :p, 'active', :s, :e, now())"
            ),
            {"u": user_id, "p": plan, "s": now - timedelta(days=1), "e": now + timedelta(days=29)},
        )
        if notify:
            await conn.execute(text("SELECT pg_notify(:c, :u)"), {"c": PLAN_CHANNEL, "u": user_id})
    return time.monotonic()


async def limit_is(http: httpx.AsyncClient, user_id: str, limit: int) -> bool:
    return bool((await usage(http, user_id))["limit"] == limit)


async def test_plan_change_reaches_the_sidecar_within_a_second(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    base_env: dict[str, str],
    logs_dir: Path,
    workers: list[Process],
) -> None:
    workers.append(start_worker(base_env, logs_dir))
    assert (await usage(http, "plan-user"))["limit"] == 100_000  # loaded into Redis: FREE
    changed_at = await subscribe(pg, "plan-user", "PRO")
    await eventually(lambda: limit_is(http, "plan-user", 5_000_000), 5, "the PRO limit")
    latency_s = time.monotonic() - changed_at
    print(f"plan change latency: {latency_s * 1000:.1f} ms")
    assert latency_s < PLAN_LATENCY_MAX_S

    # A downgrade below what is already used: the next reserve is refused.
    status, _ = await reserve(http, "plan-user", 1_200_000, reservation_id="big")
    assert status == 200
    assert (await commit(http, "plan-user", "big", 1_200_000))[0] == 200
    async with pg.begin() as conn:
        await conn.execute(text("UPDATE subscriptions SET plan = 'PLUS', updated_at = now()"))
        await conn.execute(text("SELECT pg_notify(:c, 'plan-user')"), {"c": PLAN_CHANNEL})
    await eventually(lambda: limit_is(http, "plan-user", 1_000_000), 5, "the PLUS limit")
    assert (await reserve(http, "plan-user", 1))[0] == 429


async def test_start_pass_applies_plans_changed_while_no_worker_ran(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    base_env: dict[str, str],
    logs_dir: Path,
    workers: list[Process],
) -> None:
    assert (await usage(http, "quiet-user"))["limit"] == 100_000
    await subscribe(pg, "quiet-user", "PLUS", notify=False)
    workers.append(start_worker(base_env, logs_dir))
    await eventually(lambda: limit_is(http, "quiet-user", 1_000_000), 10, "the start pass")


@pytest.mark.slow
async def test_alerts_fire_once_per_threshold_under_concurrent_commits(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    base_env: dict[str, str],
    logs_dir: Path,
    workers: list[Process],
) -> None:
    receiver = await Receiver(free_port()).start()
    try:
        workers.append(
            start_worker(
                base_env,
                logs_dir,
                ALERT_WEBHOOK_URL=f"http://127.0.0.1:{receiver.port}/hook",
                ALERT_WEBHOOK_SECRET=SECRET,
            )
        )
        assert (await commit(http, "heavy", "first", 70_000))[0] == 200  # 70 %: no alert
        # 40 concurrent commits of 1,000 cross 80 % and 90 % together, then 100 % and more.
        answers = await asyncio.gather(*(commit(http, "heavy", f"c{n}", 1000) for n in range(40)))
        assert all(status == 200 for status, _ in answers)

        async def delivered() -> bool:
            undelivered = await scalar(
                pg, "SELECT count(*) FROM usage_alerts WHERE delivered_at IS NULL"
            )
            return undelivered == 0 and len(receiver.received) >= 3

        await eventually(delivered, 15, "three alerts delivered")
        stored = await rows(pg, 'SELECT threshold, "limit" FROM usage_alerts ORDER BY 1')
        assert [tuple(r) for r in stored] == [(80, 100_000), (90, 100_000), (100, 100_000)]
        assert sorted(r.body["threshold"] for r in receiver.received) == [80, 90, 100]
        assert len({r.body["id"] for r in receiver.received}) == 3
        for got in receiver.received:
            assert signature_valid(SECRET, got.signature, got.raw)
            assert set(got.body) == {
                "id",
                "user_id",
                "threshold",
                "limit",
                "used",
                "period_start",
                "period_end",
            }
            assert got.body["used"] * 100 >= got.body["threshold"] * got.body["limit"]
    finally:
        await receiver.stop()


@pytest.mark.slow
async def test_webhook_down_then_up_delivers_the_alert_once(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    base_env: dict[str, str],
    logs_dir: Path,
    workers: list[Process],
) -> None:
    port = free_port()
    workers.append(
        start_worker(
            base_env,
            logs_dir,
            ALERT_WEBHOOK_URL=f"http://127.0.0.1:{port}/hook",
            ALERT_WEBHOOK_SECRET=SECRET,
        )
    )
    assert (await commit(http, "later", "c1", 85_000))[0] == 200

    async def failed_twice() -> bool:
        return (await scalar(pg, "SELECT max(attempts) FROM usage_alerts") or 0) >= 2

    await eventually(failed_twice, 15, "two failed attempts")
    receiver = await Receiver(port).start()
    try:

        async def delivered() -> bool:
            return bool(
                await scalar(pg, "SELECT bool_and(delivered_at IS NOT NULL) FROM usage_alerts")
            )

        await eventually(delivered, 15, "the alert delivered")
        assert [r.body["threshold"] for r in receiver.received] == [80]
        alert_id = await scalar(pg, "SELECT id FROM usage_alerts")
        assert receiver.received[0].body["id"] == alert_id
    finally:
        await receiver.stop()
