"""Plans pushed on NOTIFY within 1 s (also for a row changed by plain SQL: a trigger sends the
NOTIFY), and alerts fired once per threshold and delivered once, with the worker as a real
process; alerts given up after ALERT_WEBHOOK_ATTEMPTS_MAX, counted and logged."""

import asyncio
import functools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.accounts import PLAN_CHANNEL
from sync_worker import metrics
from sync_worker.alerts import AlertSender
from sync_worker.worker import Worker
from tests.api import commit, reserve, usage
from tests.servers import Process, eventually, free_port
from tests.sync.conftest import MakeWorker, drain, rows, scalar, start_worker
from tests.sync.receiver import Receiver, signature_valid

SECRET = "whsec_test_secret"
PLAN_LATENCY_MAX_S = 1.0


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
    processes: list[Process],
) -> None:
    processes.append(start_worker(base_env, logs_dir))
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
    processes: list[Process],
) -> None:
    assert (await usage(http, "quiet-user"))["limit"] == 100_000
    await subscribe(pg, "quiet-user", "PLUS", notify=False)
    processes.append(start_worker(base_env, logs_dir))
    await eventually(lambda: limit_is(http, "quiet-user", 1_000_000), 10, "the start pass")


@pytest.mark.slow
async def test_alerts_fire_once_per_threshold_under_concurrent_commits(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    base_env: dict[str, str],
    logs_dir: Path,
    processes: list[Process],
) -> None:
    receiver = await Receiver(free_port()).start()
    try:
        processes.append(
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
    processes: list[Process],
) -> None:
    port = free_port()
    processes.append(
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


async def test_plain_sql_changes_of_subscriptions_reach_the_sidecar_within_a_second(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    base_env: dict[str, str],
    logs_dir: Path,
    processes: list[Process],
) -> None:
    """Another tool (or an operator in psql) changes the row: no pg_notify of its own."""
    processes.append(start_worker(base_env, logs_dir))
    assert (await usage(http, "sql-user"))["limit"] == 100_000
    steps = (
        (
            "INSERT INTO subscriptions (user_id, plan, status, current_period_start,"
            " current_period_end) VALUES ('sql-user', 'PRO', 'active',"
            " now() - interval '1 day', now() + interval '29 days')",
            5_000_000,
        ),
        ("UPDATE subscriptions SET plan = 'PLUS' WHERE user_id = 'sql-user'", 1_000_000),
        ("DELETE FROM subscriptions WHERE user_id = 'sql-user'", 100_000),
    )
    for statement, limit in steps:
        async with pg.begin() as conn:
            await conn.execute(text(statement))
        changed_at = time.monotonic()
        await eventually(functools.partial(limit_is, http, "sql-user", limit), 5, statement)
        assert time.monotonic() - changed_at < PLAN_LATENCY_MAX_S, statement


async def test_notifications_are_answered_during_a_full_pass(
    pg: AsyncEngine, make_worker: MakeWorker
) -> None:
    worker = await make_worker()
    await subscribe(pg, "in-pass", "PLUS", notify=False)
    async with pg.begin() as conn:
        await conn.execute(text("SELECT pg_notify(:c, 'noted')"), {"c": PLAN_CHANNEL})
    notified = metrics.PLANS_APPLIED.labels("notify")._value.get()

    async def heard() -> bool:
        await worker.plans.full_pass()
        return bool(metrics.PLANS_APPLIED.labels("notify")._value.get() > notified)

    await eventually(heard, 5, "the notification pushed by the pass")


async def test_alert_given_up_after_the_last_attempt_is_counted_and_logged(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    worker: Worker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/hook"
    sender = AlertSender(worker.alerts.conninfo, nobody, SECRET, 500, 0, 0, 2)
    try:
        assert (await commit(http, "unheard", "c1", 85_000))[0] == 200
        await drain(worker)
        given_up = metrics.ALERTS.labels("given_up")._value.get()
        assert await sender.run_once() == 0  # attempt 1 of 2
        assert metrics.ALERTS.labels("given_up")._value.get() == given_up
        assert await sender.run_once() == 0  # attempt 2 of 2: given up
        assert metrics.ALERTS.labels("given_up")._value.get() == given_up + 1
        assert await sender.run_once() == 0  # never tried again
        assert await rows(pg, "SELECT attempts, delivered_at FROM usage_alerts") == [(2, None)]
        lost = [r for r in caplog.records if r.getMessage() == "alert given up: never delivered"]
        assert [(r.levelname, getattr(r, "threshold", None)) for r in lost] == [("ERROR", 80)]
    finally:
        await sender.close()
