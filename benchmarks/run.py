"""The benchmark suite in one command:

    .venv/bin/python -m benchmarks.run --seconds 10      # the full run, a few minutes
    .venv/bin/python -m benchmarks.run --quick           # a few seconds, for the smoke test

It starts what it needs on loopback (the bare JSON endpoint, the sidecar, the naive baseline,
for 1 and 2 uvicorn workers), uses Redis DB 3 (FLUSHDB only) and its own Postgres database,
runs every load for a fixed time with wrk and redis-benchmark, and writes a report (Markdown,
JSON and a PNG latency plot) in benchmarks/results/. Performance is reported, never asserted.
"""

import argparse
import asyncio
import fcntl
import hashlib
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from benchmarks import procs, report, stores
from quota_common import db
from quota_common.keys import user_keys
from quota_common.scripts import SCRIPTS, register_all

HERE = Path(__file__).resolve().parent
LOAD_SCRIPT = HERE / "load.lua"
REDIS_URL = "redis://127.0.0.1:6379/3"
PG_ROOT = "postgresql://postgres@127.0.0.1:5432"

USER_PREFIX = "u"  # the 10,000 users of the loads
HOT_PREFIX = "hot"  # the few users of the over-grant race
MEMORY_PREFIX = "m"
SYNC_PREFIX = "s"
UNLIMITED = 10**12
# The bare endpoint runs first and last of each block; the ceiling is their mean.
BARE_LOADS = ("bare", "bare-again")


@dataclass
class Config:
    seconds: float
    connections: list[int]
    workers: list[int]
    users: int = 10_000
    tokens: int = 10
    hot_users: int = 50
    hot_quota: int = 10_000
    hot_tokens: int = 1_000
    llm_ms: int = 1
    refund_percent: int = 10
    # The paced loads: each of 16 connections waits this long after an answer (about 3,500
    # requests/s in all), so latency is the service's, not the queue of a saturated server.
    paced_delay_ms: int = 4
    paced_connections: int = 16
    # Reserve against bare in alternating short loads (one worker): the machine's speed drifts
    # by a third over minutes here, which one bare load before and one after cannot cancel.
    paired_rounds: int = 6
    paired_seconds: float = 5
    memory_users: int = 100_000
    floor_calls_per_s: int = 30_000  # calls = this x seconds (x2 pipelined): ~a load's length
    sync_events: int = 50_000
    sync_timeout_s: float = 120
    wrk_threads: int = 2
    database_url: str = f"{PG_ROOT}/quota_bench"
    redis_url: str = REDIS_URL
    out_dir: Path = HERE / "results"
    quick: bool = False
    sections: tuple[str, ...] = ("http", "floor", "memory", "sync")


@dataclass
class Load:
    """One wrk load against one server, with the CPU everything spent meanwhile."""

    name: str
    target: str
    workers: int
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    server_cpu_us: float
    redis_cpu_us: float
    wrk_cpu_us: float
    machine_busy_percent: float
    others_cpu_percent: float  # of the machine, by processes that are not server, Redis, wrk
    ratio_to_bare: float = 0.0
    flow: dict[str, int] = field(default_factory=dict)
    percentiles_ms: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Results:
    meta: dict[str, Any]
    loads: list[Load] = field(default_factory=list)
    overgrant: list[dict[str, Any]] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)
    floor: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    sync_worker: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ceiling(self, workers: int, connections: int) -> float:
        """Requests/s of the bare endpoint: the mean of its loads before and after the others
        of the same workers and connections (0 when it was not run)."""
        rates = [
            load.rps
            for load in self.loads
            if load.name in BARE_LOADS
            and (load.workers, load.connections) == (workers, connections)
        ]
        return sum(rates) / len(rates) if rates else 0.0

    def set_ratios(self) -> None:
        for load in self.loads:
            ceiling = self.ceiling(load.workers, load.connections)
            load.ratio_to_bare = load.rps / ceiling if ceiling else 0.0


def log(message: str) -> None:
    print(f"[bench {datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, config: Config, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.redis = Redis.from_url(config.redis_url)
        self.engine: AsyncEngine = db.async_engine(config.database_url)
        self.redis_pid = 0
        self.results = Results(meta={})

    # --- servers ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.config.database_url,
            "REDIS_URL": self.config.redis_url,
            # Generous: wrk and other people's tests share the two cores with Redis.
            "REDIS_TIMEOUT_MS": "1000",
            "LOG_LEVEL": "WARNING",
            "NAIVE_LLM_MS": str(self.config.llm_ms),
        }

    async def start(self, name: str, workers: int) -> procs.Server:
        port = procs.free_port()
        if name == "sidecar" and workers == 1:
            # As operators run it: the console script, one uvicorn process.
            argv = [str(procs.BIN / "quota-sidecar")]
            env = {**self.env(), "SIDECAR_PORT": str(port)}
            ready = "/healthz"
        else:
            argv = procs.uvicorn_argv(f"benchmarks.apps:{name}_app", port, workers)
            env, ready = self.env(), "/healthz" if name == "sidecar" else "/"
        server = procs.Server(f"{name}-w{workers}", argv, env, port, self.log_dir)
        await asyncio.to_thread(server.start, ready)
        if workers > 1:
            await asyncio.to_thread(self.wait_for_workers, server, workers)
        return server

    @staticmethod
    def wait_for_workers(server: procs.Server, workers: int) -> None:
        """Every worker answers (a request per connection lands on whichever accepts)."""
        with httpx.Client(base_url=server.url, timeout=2) as client:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if len(procs.process_tree(server.pid)) > workers:
                    for _ in range(20):
                        client.get("/healthz", headers={"Connection": "close"})
                    return
                time.sleep(0.1)

    # --- loads -----------------------------------------------------------------------------

    async def wrk(
        self, name: str, server: procs.Server, workers: int, connections: int, **env: str
    ) -> Load:
        """`env`: the load script's environment; `mode` (default: the name) and `seconds`
        (default: the configured length) are the load's own."""
        seconds = float(env.pop("seconds", self.config.seconds))
        load_env = {
            **os.environ,
            "BENCH_MODE": env.pop("mode", name),
            "BENCH_USERS": str(self.config.users),
            "BENCH_PREFIX": USER_PREFIX,
            "BENCH_TOKENS": str(self.config.tokens),
            "BENCH_RUN": uuid.uuid4().hex[:8],
            "BENCH_REFUND_PERCENT": str(self.config.refund_percent),
            **env,
        }
        argv = [
            "wrk",
            f"-t{min(self.config.wrk_threads, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(LOAD_SCRIPT),
            server.url,
        ]
        server_pids = procs.process_tree(server.pid)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = procs.cpu_seconds(server_pids)
        redis0 = procs.cpu_seconds([self.redis_pid])
        machine0 = procs.machine_times()
        process = await asyncio.create_subprocess_exec(
            *argv, env=load_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output = await finish(process, seconds + 60)
        machine1 = procs.machine_times()
        cpu = procs.cpu_seconds(server_pids) - cpu0
        redis_cpu = procs.cpu_seconds([self.redis_pid]) - redis0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        text = output.decode(errors="replace")
        line = next((x for x in text.splitlines() if x.startswith("BENCH_JSON ")), None)
        if process.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({process.returncode}): {text[-2000:]}")
        data = orjson.loads(line.removeprefix("BENCH_JSON "))
        requests = max(int(data["requests"]), 1)
        percentiles = {float(p): v / 1000 for p, v in data["percentiles_us"]}
        errors = data["errors"]
        wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        busy = machine1.busy_s - machine0.busy_s
        total = max(machine1.total_s - machine0.total_s, 1e-9)
        load = Load(
            name=name,
            target=server.name,
            workers=workers,
            connections=connections,
            seconds=data["duration_us"] / 1e6,
            requests=int(data["requests"]),
            rps=data["requests"] / (data["duration_us"] / 1e6),
            p50_ms=percentiles[50.0],
            p99_ms=percentiles[99.0],
            p999_ms=percentiles[99.9],
            max_ms=data["latency_us"]["max"] / 1000,
            non_2xx=int(errors["status"]),
            socket_errors=int(errors["connect"] + errors["read"] + errors["write"])
            + int(errors["timeout"]),
            server_cpu_us=cpu * 1e6 / requests,
            redis_cpu_us=redis_cpu * 1e6 / requests,
            wrk_cpu_us=wrk_cpu * 1e6 / requests,
            machine_busy_percent=100 * busy / total,
            others_cpu_percent=100 * max(busy - cpu - redis_cpu - wrk_cpu, 0) / total,
            flow={k: int(v) for k, v in data["flow"].items()},
            percentiles_ms=sorted(percentiles.items()),
        )
        log(
            f"{name:8} w{workers} c{connections:<3} {load.rps:8.0f} req/s  p50 {load.p50_ms:.2f}"
            f"  p99 {load.p99_ms:.2f}  p99.9 {load.p999_ms:.2f} ms  cpu {load.server_cpu_us:.0f}"
            f" us/req  non-2xx {load.non_2xx}"
        )
        return load

    async def fresh_users(self, prefix: str, count: int, quota: int) -> None:
        await stores.flush(self.redis)
        await stores.seed_users(self.redis, prefix, count, quota)

    async def http_loads(self, workers: int) -> None:
        """Bare, reserve, chat flow and naive, side by side, at each connection count."""
        config = self.config
        names = ["bare", "sidecar", "naive"] + ([] if config.quick else ["bare_asgi"])
        started = await asyncio.gather(
            *(self.start(name, workers) for name in names), return_exceptions=True
        )
        servers = [x for x in started if isinstance(x, procs.Server)]
        failed = [x for x in started if isinstance(x, BaseException)]
        if failed:
            for server in servers:
                await asyncio.to_thread(server.stop)
            raise failed[0]
        bare, sidecar, naive = servers[:3]
        log(f"servers up, {workers} worker(s)")
        try:
            for connections in config.connections:
                self.add(await self.wrk("bare", bare, workers, connections))
                if len(servers) > 3:
                    load = await self.wrk(
                        "bare-asgi", servers[3], workers, connections, mode="bare"
                    )
                    self.add(load)
                await self.fresh_users(USER_PREFIX, config.users, UNLIMITED)
                self.add(await self.wrk("reserve", sidecar, workers, connections))
                await self.fresh_users(USER_PREFIX, config.users, UNLIMITED)
                self.add(await self.wrk("flow", sidecar, workers, connections))
                if connections == config.paced_connections:
                    await self.paced_loads(bare, sidecar, workers, connections)
                await stores.reset_naive(self.engine, [(USER_PREFIX, config.users, UNLIMITED)])
                self.add(await self.wrk("naive", naive, workers, connections))
                # Again at the end: the machine's drift over the block shows, and is averaged.
                self.add(await self.wrk("bare-again", bare, workers, connections, mode="bare"))
            if workers == min(config.workers):
                await self.overgrant(sidecar, naive, workers, max(config.connections))
                for connections in config.connections:
                    await self.paired(bare, sidecar, workers, connections)
        finally:
            for server in servers:
                await asyncio.to_thread(server.stop)

    async def paired(
        self, bare: procs.Server, sidecar: procs.Server, workers: int, connections: int
    ) -> None:
        """Bare and reserve in turns (bare, reserve, reserve, bare, ...), the ratio taken in
        each round from two loads a few seconds apart; the median round is the figure."""
        config = self.config
        rounds = []
        for order in in_turns(["bare", "reserve"], config.paired_rounds):
            loads: dict[str, Load] = {}
            for name in order:
                server = bare if name == "bare" else sidecar
                if name == "reserve":
                    await self.fresh_users(USER_PREFIX, config.users, UNLIMITED)
                loads[name] = await self.wrk(
                    name, server, workers, connections, seconds=str(config.paired_seconds)
                )
            rounds.append(
                {
                    "bare_rps": loads["bare"].rps,
                    "reserve_rps": loads["reserve"].rps,
                    "ratio": loads["reserve"].rps / loads["bare"].rps,
                    "cpu_ratio": loads["bare"].server_cpu_us / loads["reserve"].server_cpu_us,
                    "bare_p99_ms": loads["bare"].p99_ms,
                    "reserve_p99_ms": loads["reserve"].p99_ms,
                    # Refusals and errors answer fast: a round with any is no fair ratio.
                    "errors": sum(x.non_2xx + x.socket_errors for x in loads.values()),
                }
            )
        ratios = sorted(r["ratio"] for r in rounds)
        summary = {
            "workers": workers,
            "connections": connections,
            "seconds": config.paired_seconds,
            "rounds": rounds,
            "median_ratio": statistics.median(ratios),
            "min_ratio": ratios[0],
            "max_ratio": ratios[-1],
            "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rounds),
            "median_bare_p99_ms": statistics.median(r["bare_p99_ms"] for r in rounds),
            "median_reserve_p99_ms": statistics.median(r["reserve_p99_ms"] for r in rounds),
            "errors": sum(r["errors"] for r in rounds),
        }
        self.results.paired.append(summary)
        log(
            f"paired w{workers} c{connections}: reserve x bare median {summary['median_ratio']:.2f}"
            f" ({ratios[0]:.2f}-{ratios[-1]:.2f}), by CPU {summary['median_cpu_ratio']:.2f}"
        )

    async def paced_loads(
        self, bare: procs.Server, sidecar: procs.Server, workers: int, connections: int
    ) -> None:
        """Bare and reserve below saturation, at the same pace: the latency a chat service
        sees from a sidecar that is not flat out."""
        delay = str(self.config.paced_delay_ms)
        self.add(
            await self.wrk(
                "bare-paced", bare, workers, connections, mode="bare", BENCH_DELAY_MS=delay
            )
        )
        await self.fresh_users(USER_PREFIX, self.config.users, UNLIMITED)
        load = await self.wrk(
            "reserve-paced", sidecar, workers, connections, mode="reserve", BENCH_DELAY_MS=delay
        )
        self.add(load)

    def add(self, load: Load) -> None:
        self.results.loads.append(load)
        self.results.set_ratios()

    async def overgrant(
        self, sidecar: procs.Server, naive: procs.Server, workers: int, connections: int
    ) -> None:
        """The same race against both: few users, small quotas, an LLM wait between the
        decision and the charge; then the books say how many tokens went beyond the quota."""
        config = self.config
        hot = {
            "BENCH_USERS": str(config.hot_users),
            "BENCH_PREFIX": HOT_PREFIX,
            "BENCH_TOKENS": str(config.hot_tokens),
        }
        quota_total = config.hot_users * config.hot_quota

        await stores.reset_naive(self.engine, [(HOT_PREFIX, config.hot_users, config.hot_quota)])
        load = await self.wrk("naive-race", naive, workers, connections, mode="naive", **hot)
        books = await stores.naive_books(self.engine, HOT_PREFIX)
        self.add(load)
        self.results.overgrant.append(
            {
                "service": "naive (read, decide, LLM, increment in Postgres)",
                "load": load.name,
                "connections": connections,
                "rps": load.rps,
                "p50_ms": load.p50_ms,
                "p99_ms": load.p99_ms,
                "grants": books["used"] // config.hot_tokens,
                "refused": load.non_2xx,
                "tokens_granted": books["used"],
                "quota_total": quota_total,
                "tokens_beyond_quota": books["beyond"],
                "users_over_quota": books["users_over"],
            }
        )

        await self.fresh_users(HOT_PREFIX, config.hot_users, config.hot_quota)
        load = await self.wrk(
            "flow-race",
            sidecar,
            workers,
            connections,
            mode="flow",
            BENCH_COMMIT="full",
            BENCH_REFUND_PERCENT="0",
            BENCH_LLM_MS=str(config.llm_ms),
            **hot,
        )
        self.add(load)
        granted = beyond = users_over = 0
        async with httpx.AsyncClient(base_url=sidecar.url, timeout=10) as client:
            for n in range(config.hot_users):
                usage = (await client.get(f"/v1/usage/{HOT_PREFIX}{n}")).raise_for_status().json()
                held = usage["used"] + usage["reserved"]
                granted += held
                beyond += max(held - usage["limit"], 0)
                users_over += held > usage["limit"]
        self.results.overgrant.append(
            {
                "service": "sidecar (reserve, LLM, commit)",
                "load": load.name,
                "connections": connections,
                "rps": load.rps,
                "p50_ms": load.p50_ms,
                "p99_ms": load.p99_ms,
                "grants": load.flow.get("reserved", 0),
                "refused": load.flow.get("refused", 0),
                "tokens_granted": granted,
                "quota_total": quota_total,
                "tokens_beyond_quota": beyond,
                "users_over_quota": users_over,
            }
        )
        log(f"over-grant: {self.results.overgrant[-2:]}")

    async def floor(self) -> None:
        """redis-benchmark running the reserve script by EVALSHA: the Lua and Redis floor."""
        if shutil.which("redis-benchmark") is None:
            self.results.notes.append("redis-benchmark is not installed: no Redis floor.")
            return
        await stores.flush(self.redis)
        user_id = "floor-user"
        await stores.seed_users(self.redis, user_id, 1, 10**15)
        user = user_keys(f"{user_id}0")
        reserve = SCRIPTS["reserve"]
        # The keys carry the user's hash tag; each __rand_int__ is a new reservation id.
        command = [
            "EVALSHA",
            reserve.sha,
            "5",
            user.state,
            user.holds,
            user.record_prefix + "__rand_int__",
            user.stream,
            user.due,
            user.user_id,
            "__rand_int__",
            str(self.config.tokens),
            "0",
            str(stores.HOLD_TTL_MS),
            "",
            user.record_prefix,
        ]
        ceiling = self.results.ceiling(1, min(self.config.connections))
        for pipeline in (1, 16):
            calls = round(self.config.floor_calls_per_s * self.config.seconds) * (
                2 if pipeline > 1 else 1
            )
            argv = [
                "redis-benchmark",
                "-h",
                "127.0.0.1",
                "-p",
                "6379",
                "--dbnum",
                "3",
                "-c",
                "16",
                "-n",
                str(calls),
                "-r",
                "1000000000",
                "-P",
                str(pipeline),
                "--csv",
                *command,
            ]
            row = await redis_benchmark(self.redis, argv)
            rps = float(row.get("rps", 0))
            self.results.floor.append(
                {
                    "what": "EVALSHA reserve.lua, one user, new reservation id per call",
                    "clients": 16,
                    "pipeline": pipeline,
                    "calls": calls,
                    "rps": rps,
                    "p50_ms": float(row.get("p50_latency_ms", 0)),
                    "p99_ms": float(row.get("p99_latency_ms", 0)),
                    "ratio_to_bare": rps / ceiling if ceiling else 0.0,
                }
            )
            log(f"floor -P {pipeline}: {rps:.0f} EVALSHA/s")
        await stores.flush(self.redis)

    async def memory(self) -> None:
        """Redis bytes per active user: state, one open hold and its record."""
        users = self.config.memory_users
        await stores.flush(self.redis)
        before = await stores.used_memory(self.redis)
        await stores.seed_users(self.redis, MEMORY_PREFIX, users, UNLIMITED)
        _, seeded = await stores.db_memory(self.redis)
        granted = await stores.reserve_each(self.redis, MEMORY_PREFIX, users, self.config.tokens)
        after = await stores.used_memory(self.redis)
        keys, in_db = await stores.db_memory(self.redis)
        self.results.memory = {
            "users": users,
            "holds": granted,
            "keys": keys,
            "db_bytes": in_db,
            "bytes_per_user": in_db / users,
            "bytes_per_user_state_only": seeded / users,
            "bytes_per_hold": (in_db - seeded) / max(granted, 1),
            "used_memory_before": before,
            "used_memory_after": after,
            "used_memory_delta_per_user": (after - before) / users,
        }
        log(
            f"memory: {in_db / users:.0f} bytes per active user (MEMORY USAGE), "
            f"{(after - before) / users:.0f} (used_memory delta)"
        )
        await stores.flush(self.redis)

    async def sync_worker(self) -> None:
        script = procs.BIN / "quota-sync-worker"
        events, config = self.config.sync_events, self.config
        if not script.exists():
            self.results.sync_worker = {
                "skipped": "the quota-sync-worker console script is not installed yet"
            }
            log("sync worker: skipped (no quota-sync-worker)")
            return
        await stores.flush(self.redis)
        await stores.truncate_usage(self.engine)
        users = min(1000, events)
        await stores.seed_users(self.redis, SYNC_PREFIX, users, UNLIMITED)
        committed = await stores.settle_events(self.redis, SYNC_PREFIX, users, events, 10)
        await stores.create_settle_groups(self.redis)
        log_path = self.log_dir / "sync-worker.log"
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                str(script),
                # Its own metrics port: a worker started by scripts/up may hold the default.
                env={**os.environ, **self.env(), "SYNC_WORKER_PORT": str(procs.free_port())},
                cwd=procs.ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = time.monotonic()
        first_seen: tuple[float, int] | None = None
        last_empty = started
        done_at: float | None = None
        count = 0
        cpu = 0.0
        try:
            while time.monotonic() - started < config.sync_timeout_s:
                if process.returncode is not None:
                    break
                cpu = procs.cpu_seconds(procs.process_tree(process.pid))
                count = await stores.count_usage_events(self.engine)
                now = time.monotonic()
                if not count:
                    last_empty = now
                elif first_seen is None:
                    first_seen = (now, count)
                if count >= committed:
                    done_at = now
                    break
                await asyncio.sleep(0.05)
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
                    await process.wait()
        result: dict[str, Any] = {"events": committed, "rows": count}
        if done_at is None or first_seen is None:
            tail = log_path.read_text(errors="replace")[-500:]
            result["error"] = f"{count} of {committed} rows after {config.sync_timeout_s}s: {tail}"
        else:
            seen_at, seen = first_seen
            if seen < committed:
                rate = (committed - seen) / (done_at - seen_at)
            else:  # all in one poll: at least this fast
                rate = committed / (done_at - last_empty)
            result.update(
                events_per_s=rate,
                events_per_s_from_start=committed / (done_at - started),
                seconds_from_start=done_at - started,
                worker_cpu_us_per_event=cpu * 1e6 / committed,
            )
            ceiling = self.results.ceiling(1, min(config.connections))
            result["ratio_to_bare"] = result["events_per_s"] / ceiling if ceiling else 0.0
        self.results.sync_worker = result
        log(f"sync worker: {result}")
        await stores.flush(self.redis)

    # --- the run ---------------------------------------------------------------------------

    async def run(self) -> Results:
        config = self.config
        # SIGTERM or SIGINT (even when started in the background, where SIGINT is ignored)
        # cancels the run, so every server and tool it started is stopped on the way out.
        task = asyncio.current_task()
        if task is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        started = datetime.now(UTC)
        self.results.meta = meta(config, started)
        log(f"migrating {config.database_url}")
        await asyncio.to_thread(stores.migrate, config.database_url)
        await stores.flush(self.redis)
        self.redis_pid = await stores.redis_pid(self.redis)
        try:
            if "http" in config.sections:
                for workers in config.workers:
                    await self.http_loads(workers)
            sections = {"floor": self.floor, "memory": self.memory, "sync": self.sync_worker}
            for name, section in sections.items():
                if name not in config.sections:
                    continue
                try:
                    await section()
                except Exception as error:
                    # A report without one section beats no report; the error says why.
                    message = f"{section.__name__} failed: {type(error).__name__}: {error}"
                    log(message)
                    self.results.notes.append(message[:1000])
        finally:
            await stores.flush(self.redis)
            await self.redis.aclose()
            await self.engine.dispose()
        self.results.meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.results.meta["wall_s"] = (datetime.now(UTC) - started).total_seconds()
        self.results.notes.extend(standard_notes(config))
        return self.results


def in_turns(names: list[str], rounds: int) -> Iterator[list[str]]:
    """Each round's order: A B, B A, A B, ... so that the machine's drift and whatever going
    first does fall on every name alike."""
    for n in range(rounds):
        yield names if n % 2 == 0 else names[::-1]


async def finish(process: asyncio.subprocess.Process, timeout_s: float) -> bytes:
    """The output of a tool; stopped, not left behind, on a timeout or a cancelled run."""
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
        return output
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise


async def redis_benchmark(redis: Redis, argv: list[str]) -> dict[str, str]:
    """Runs redis-benchmark; loads the scripts first and again after someone's SCRIPT FLUSH."""
    for attempt in range(10):
        await asyncio.sleep(attempt * 0.5)
        await register_all(redis)
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        text = (await finish(process, 300)).decode(errors="replace")
        if "NOSCRIPT" not in text:
            return parse_redis_benchmark(text)
        log("redis-benchmark met NOSCRIPT (a SCRIPT FLUSH elsewhere): again")
    raise RuntimeError("redis-benchmark: the scripts kept being flushed")


def parse_redis_benchmark(output: str) -> dict[str, str]:
    lines = [x.strip() for x in output.splitlines() if x.startswith('"')]
    if len(lines) < 2:
        raise RuntimeError(f"redis-benchmark printed no CSV: {output[-1000:]}")
    header = [x.strip('"') for x in lines[0].split(",")]
    values = [x.strip('"') for x in lines[-1].split(",")]
    return dict(zip(header, values, strict=False))


def meta(config: Config, started: datetime) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "sidecar", "lua", "quota_common"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return {
        "started": started.isoformat(timespec="seconds"),
        "commit": commit + (" (hot path modified)" if dirty else ""),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "seconds_per_load": config.seconds,
        "connections": config.connections,
        "workers": config.workers,
        "users": config.users,
        "tokens_per_reserve": config.tokens,
        "wrk": (wrk.stdout + wrk.stderr).split(" [", 1)[0].strip(),
        "wrk_threads": config.wrk_threads,
        "quick": config.quick,
    }


def standard_notes(config: Config) -> list[str]:
    return [
        "bare is a Starlette route (Request, Response) reading and answering JSON with orjson; "
        "bare-asgi the same as a plain ASGI callable (what uvicorn and httptools cost alone). "
        "Ratios are to bare, the ceiling the design names: the mean of the bare load that "
        "opens each block of loads (same workers and connections) and the one that closes it "
        "(bare-again), so the machine's drift over the block is averaged and shows.",
        "Everything runs on one machine: wrk (2 threads), Redis, Postgres and the server share "
        f"its {os.cpu_count()} cores, so the load generator competes with the server; "
        "'wrk CPU' and 'machine busy' show how much. Ratios within one run are the figures "
        "to compare; absolute rates move with whatever else the machine is doing.",
        "Server CPU is utime+stime of the server's processes (/proc/<pid>/stat, 10 ms ticks) "
        "over the load, divided by its requests; Redis CPU likewise for redis-server (which "
        "also serves other people's tests on this machine). 'others' CPU' is the share of all "
        "cores used meanwhile by processes that are neither the server, Redis nor wrk: the "
        "noise of that load.",
        "Latency is wrk's per-request latency (connection-level, so it includes queueing "
        "behind the other requests of the same connection's thread). The closed loads run "
        "flat out, so their latency is mostly the queue of a saturated server (connections / "
        "requests per second); bare-paced and reserve-paced run at "
        f"{config.paced_connections} connections that each wait {config.paced_delay_ms} ms "
        "after every answer, below saturation: the latency a chat service sees.",
        f"flow: reserve, then commit (tokens 1..granted) or refund ({config.refund_percent} %) "
        "the reservation it was granted; its latency is over both calls, its requests/s "
        "counts both.",
        "naive: the original billing service's path, POST /chat: read the user's usage from "
        f"Postgres, decide, await the LLM ({config.llm_ms} ms), then increment the usage in "
        "Postgres. Its latency includes the LLM wait.",
        f"Race: {config.hot_users} users with {config.hot_quota} tokens each, "
        f"{config.hot_tokens} tokens per request, {max(config.connections)} connections; "
        f"the sidecar's race waits {config.llm_ms} ms between reserve and commit (the LLM) "
        "and commits what was granted. Its books are read back with GET /v1/usage.",
        "Workers > 1 run `uvicorn --workers N --factory benchmarks.apps:sidecar_app` with the "
        "console script's loop and http settings; one worker is the `quota-sidecar` console "
        "script itself.",
        "REDIS_TIMEOUT_MS=1000 for the sidecar (default 50) so a starved Redis on the shared "
        "machine is not reported as an outage.",
    ]


LOCKED_EXIT = 3


@contextmanager
def exclusive(redis_url: str) -> Iterator[None]:
    """One benchmark run (or smoke test, or profile) per Redis database on this machine: they
    FLUSHDB it. Exits with LOCKED_EXIT when another one holds it."""
    name = hashlib.sha1(redis_url.encode(), usedforsecurity=False).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"quota-bench-{name}.lock"
    with path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"benchmarks: another run is using {redis_url} ({path})", file=sys.stderr)
            sys.exit(LOCKED_EXIT)
        yield


@contextmanager
def log_directory(out_dir: Path, stamp: str) -> Iterator[Path]:
    path = out_dir / f"logs-{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    yield path


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10, help="length of each load")
    parser.add_argument("--connections", default="16,64", help="comma-separated")
    parser.add_argument("--workers", default="1,2", help="uvicorn workers, comma-separated")
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (smoke test)")
    parser.add_argument("--database", default="quota_bench", help="Postgres database name")
    parser.add_argument("--pg-root", default=PG_ROOT, help="Postgres URL without database")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="report directory")
    parser.add_argument("--memory-users", type=int, default=100_000)
    parser.add_argument("--sync-events", type=int, default=50_000)
    parser.add_argument(
        "--sections", default="http,floor,memory,sync", help="which parts to run, comma-separated"
    )
    args = parser.parse_args(argv)
    config = Config(
        seconds=args.seconds,
        connections=[int(x) for x in args.connections.split(",")],
        workers=[int(x) for x in args.workers.split(",")],
        memory_users=args.memory_users,
        sync_events=args.sync_events,
        database_url=f"{args.pg_root}/{args.database}",
        out_dir=args.out,
        sections=tuple(args.sections.split(",")),
    )
    if args.quick:
        config.seconds = 1
        config.connections = [16]
        config.workers = [1]
        config.memory_users = 2_000
        config.floor_calls_per_s = 5_000
        config.sync_events = 2_000
        config.sync_timeout_s = 8
        config.paired_rounds = 2
        config.paired_seconds = 1
        config.quick = True
    # Enough requests/s x seconds per user that the reserve loads never run out of quota.
    return config


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    for tool, package in (("wrk", "wrk"), ("redis-benchmark", "redis-tools")):
        if shutil.which(tool) is None:
            sys.exit(f"benchmarks: {tool} is not installed (apt-get install -y {package})")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(config.redis_url), log_directory(config.out_dir, stamp) as log_dir:
        try:
            results = asyncio.run(Bench(config, log_dir).run())
        except asyncio.CancelledError:
            sys.exit("benchmarks: stopped by a signal; servers and tools stopped")
    paths = report.write(results_dict(results), config.out_dir, stamp)
    for path in paths:
        print(path)


def results_dict(results: Results) -> dict[str, Any]:
    return asdict(results)


if __name__ == "__main__":
    main()
