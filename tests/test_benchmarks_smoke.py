"""The benchmark harness still runs: `python -m benchmarks.run --quick` writes its report with
every section. Performance is never asserted here; the figures of a quick run mean nothing.

It uses Redis DB 3 (the benchmark's own, whatever TEST_REDIS_DB says) and a Postgres database
of its own, dropped afterwards. While a real benchmark run holds DB 3 (a lock file), it skips.
`benchmarks.sync_throughput` runs on the test's Redis database instead (it takes one).
"""

import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from benchmarks.report import SECTIONS
from benchmarks.run import LOCKED_EXIT
from benchmarks.stores import drop_database
from tests.conftest import REDIS_DB

ROOT = Path(__file__).resolve().parent.parent
PG_ROOT = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("wrk") is None or shutil.which("redis-benchmark") is None,
        reason="wrk and redis-benchmark are needed (apt-get install -y wrk redis-tools)",
    ),
]


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    database = f"quota_bench_smoke_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        finished = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.run",
                "--quick",
                "--out",
                str(tmp_path),
                "--database",
                database,
                "--pg-root",
                PG_ROOT,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        drop_database(f"{PG_ROOT}/{database}")
    if finished.returncode == LOCKED_EXIT:
        pytest.skip("a benchmark run is using Redis DB 3 right now")
    assert finished.returncode == 0, finished.stderr[-3000:]

    markdown = (tmp_path / "latest.md").read_text()
    for heading in SECTIONS:
        assert heading in markdown
    assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG")

    results = orjson.loads((tmp_path / "latest.json").read_bytes())
    sections = {"meta", "loads", "paired", "overgrant", "floor", "memory", "sync_worker"}
    assert sections <= set(results)
    assert [len(row["rounds"]) for row in results["paired"]] == [2]
    names = {load["name"] for load in results["loads"]}
    assert {"bare", "reserve", "flow", "naive", "naive-race", "flow-race"} <= names
    assert all(load["requests"] > 0 for load in results["loads"])
    assert [row["pipeline"] for row in results["floor"]] == [1, 16]
    assert results["memory"]["users"] > 0
    # Skipped with a note until quota-sync-worker exists, measured after.
    assert "skipped" in results["sync_worker"] or "events" in results["sync_worker"]
    # The one figure that is a guarantee, not a performance: no tokens beyond the quota.
    sidecar = [row for row in results["overgrant"] if row["service"].startswith("sidecar")]
    assert sidecar[0]["tokens_beyond_quota"] == 0


def test_ab_compares_two_trees() -> None:
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.ab",
            "--base",
            str(ROOT),
            "--rounds",
            "2",
            "--seconds",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if finished.returncode == LOCKED_EXIT:
        pytest.skip("a benchmark run is using Redis DB 3 right now")
    assert finished.returncode == 0, finished.stderr[-3000:]
    lines = finished.stdout.splitlines()
    assert lines[0].startswith("A (") and lines[1].startswith("B (")
    assert lines[2].startswith("B had more requests/s in") and lines[2].endswith("of 2 rounds")


async def test_sync_throughput_drains_with_two_writers_and_balances_the_books(
    redis: Redis,
) -> None:
    """The in-process sync worker benchmark (on the test's own Redis database, which it
    FLUSHes) writes every entry once and the totals add up."""
    database = f"quota_bench_sync_smoke_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    finished = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "benchmarks.sync_throughput",
            "--entries",
            "3000",
            "--users",
            "300",
            "--batch",
            "500",
            "--writers",
            "2",
            "--redis-db",
            str(REDIS_DB),
            "--database",
            database,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "events/s (batch 500, 2 writers)" in finished.stdout
    books = re.search(
        r"books: events=(\d+) \(want (\d+)\), totals=(\d+) \(want (\d+)\)", finished.stdout
    )
    assert books is not None, finished.stdout
    assert books[1] == books[2] == "3000" and books[3] == books[4]
