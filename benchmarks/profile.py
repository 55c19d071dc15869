"""Where the sidecar's CPU goes under load: one `quota-sidecar` process, wrk running the reserve
(or flow) load of the benchmark, and py-spy sampling the server meanwhile.

    .venv/bin/pip install py-spy
    .venv/bin/python -m benchmarks.profile --seconds 20 --load reserve

Samples C frames too (py-spy --native), so syscalls and the garbage collector show. Writes
benchmarks/results/profile-<load>-<stamp>.txt (py-spy's collapsed stacks: open it in
https://www.speedscope.app or flamegraph.pl) and a summary (.md) of the CPU by what it does,
by layer and by function, in microseconds per request from the server's measured CPU time.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from redis.asyncio import Redis

from benchmarks import procs, stores
from benchmarks.run import (
    HERE,
    LOAD_SCRIPT,
    PG_ROOT,
    REDIS_URL,
    UNLIMITED,
    USER_PREFIX,
    exclusive,
)

# Layer of a frame, by the first match in its file path.
LAYERS = (
    ("asyncio/runners.py", "event loop itself (uvloop in C: epoll, callbacks, socket reads)"),
    ("benchmarks/", "the bare endpoint itself (benchmarks/apps.py)"),
    ("sidecar/", "sidecar (handlers, validation, answers, metrics calls)"),
    ("quota_common/", "quota_common (keys, scripts, periods)"),
    ("prometheus_client/", "prometheus_client"),
    ("redis/", "redis-py (commands, connection, parser)"),
    ("starlette/", "starlette (routing, Request, Response)"),
    ("uvicorn/", "uvicorn (httptools protocol, ASGI cycle)"),
    ("asyncio/", "asyncio (tasks, futures, streams, timeouts)"),
    ("uuid.py", "stdlib: uuid"),
    ("logging/", "stdlib: logging"),
)


WAITING = ("epoll_wait", "epoll_pwait")  # a leaf here is the loop waiting, not working
NATIVE_KINDS = (
    ("write (", "syscall write (socket sends; on loopback also the peer's TCP receive path)"),
    ("writev (", "syscall write (socket sends; on loopback also the peer's TCP receive path)"),
    ("read (", "syscall read (socket receives)"),
    ("recv", "syscall read (socket receives)"),
    ("gc_collect", "CPython cyclic garbage collector"),
    # CPython 3.11's C asyncio.get_running_loop() compares the pid on every call (3.12 does
    # not): asyncio.timeout(), current_task() and get_running_loop() each cost a getpid.
    ("getpid (", "syscall getpid (CPython 3.11 get_running_loop() pid check)"),
)


def is_python(frame: str) -> bool:
    return ".py:" in frame or frame.endswith(".py)")


def layer_of(frame: str) -> str:
    for needle, name in LAYERS:
        if needle in frame:
            return name
    return "other (" + frame.rsplit("(", 1)[-1].split(":")[0].rsplit("/", 1)[-1].rstrip(")") + ")"


def kind_of(leaf: str) -> str:
    """What the innermost frame is doing, for native stacks."""
    for needle, name in NATIVE_KINDS:
        if leaf.startswith(needle):
            return name
    if is_python(leaf):
        return "Python code (interpreted)"
    return "native code of CPython, uvloop, httptools, hiredis, orjson (not syscalls)"


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], cpu_us_per_request: float) -> list[str]:
    waiting = sum(n for frames, n in stacks if frames[-1].startswith(WAITING))
    working = [(frames, n) for frames, n in stacks if not frames[-1].startswith(WAITING)]
    total = sum(n for _, n in working) or 1
    kinds: Counter[str] = Counter()  # by the innermost frame (native stacks)
    layers: Counter[str] = Counter()  # by the innermost Python frame, with what it calls
    own: Counter[str] = Counter()  # innermost Python frame
    inclusive: Counter[str] = Counter()  # anywhere on the stack
    for frames, n in working:
        python = [f for f in frames if is_python(f)] or frames
        kinds[kind_of(frames[-1])] += n
        layers[layer_of(python[-1])] += n
        own[python[-1]] += n
        for frame in set(python):
            inclusive[frame] += n

    def share(samples: int) -> str:
        return f"{100 * samples / total:.1f} % | {cpu_us_per_request * samples / total:.1f}"

    lines = [
        f"{total + waiting} samples, {waiting} of them in epoll (waiting for work, or woken and "
        f"waiting for a core on this busy machine) left out; the {total} others share the "
        f"server's measured CPU, {cpu_us_per_request:.0f} us per request.",
    ]
    if len(kinds) > 1:
        lines += ["", "### What the CPU does (innermost frame)", "", "| what | share | us/req |"]
        lines.append("|---|--:|--:|")
        lines += [f"| {name} | {share(n)} |" for name, n in kinds.most_common()]
    lines += [
        "",
        "### By layer (innermost Python frame, with the C code and syscalls it calls)",
        "",
        "| layer | share | us/req |",
        "|---|--:|--:|",
    ]
    lines += [f"| {name} | {share(n)} |" for name, n in layers.most_common()]
    lines += ["", "### Top functions, own time (with what they call in C)", ""]
    lines += ["| function | share | us/req |", "|---|--:|--:|"]
    lines += [f"| `{frame}` | {share(n)} |" for frame, n in own.most_common(25)]
    lines += ["", "### Top functions, inclusive", "", "| function | share | us/req |"]
    lines.append("|---|--:|--:|")
    lines += [f"| `{frame}` | {share(n)} |" for frame, n in inclusive.most_common(45)]
    return lines


async def profile(seconds: float, load: str, rate: int, native: bool, out_dir: Path) -> Path:
    database_url = f"{PG_ROOT}/quota_bench"
    await asyncio.to_thread(stores.migrate, database_url)
    redis = Redis.from_url(REDIS_URL)
    await stores.flush(redis)
    await stores.seed_users(redis, USER_PREFIX, 10_000, UNLIMITED)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    port = procs.free_port()
    # The bare endpoint for comparison: what the server configuration costs with no work.
    argv = (
        procs.uvicorn_argv("benchmarks.apps:bare_app", port, 1)
        if load == "bare"
        else [str(procs.BIN / "quota-sidecar")]
    )
    server = procs.Server(
        f"{load}-profile",
        argv,
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": REDIS_URL,
            "REDIS_TIMEOUT_MS": "1000",
            "LOG_LEVEL": "WARNING",
            "SIDECAR_PORT": str(port),
        },
        port,
        out_dir,
    )
    await asyncio.to_thread(server.start, "/" if load == "bare" else "/healthz")
    raw = out_dir / f"profile-{load}-{stamp}.txt"
    try:
        wrk = await asyncio.create_subprocess_exec(
            "wrk",
            "-t2",
            "-c16",
            f"-d{round(seconds) + 4}s",
            "-s",
            str(LOAD_SCRIPT),
            server.url,
            env={**os.environ, "BENCH_MODE": load, "BENCH_RUN": uuid.uuid4().hex[:8]},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        await asyncio.sleep(2)  # past the warm-up
        cpu0 = procs.cpu_seconds([server.pid])
        spy = await asyncio.create_subprocess_exec(
            str(procs.BIN / "py-spy"),
            "record",
            "-p",
            str(server.pid),
            "-d",
            str(round(seconds)),
            "-r",
            str(rate),
            "--function",  # one row per function, not per line
            *(["--native"] if native else []),
            "-f",
            "raw",
            "-o",
            str(raw),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        spy_output, _ = await spy.communicate()
        cpu = procs.cpu_seconds([server.pid]) - cpu0
        output, _ = await wrk.communicate()
    finally:
        await asyncio.to_thread(server.stop)
        await stores.flush(redis)
        await redis.aclose()
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {spy_output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    rps_line = next((x for x in text.splitlines() if x.startswith("Requests/sec")), "")
    rps = float(rps_line.split()[-1]) if rps_line else 0.0
    cpu_us = cpu * 1e6 / (rps * seconds) if rps else 0.0
    summary = raw.with_suffix(".md")
    lines = [
        f"# Server profile, {load} load, {stamp}",
        "",
        f"wrk -t2 -c16: {rps:,.0f} requests/s (py-spy sampling at {rate} Hz slows it a little).",
        "",
        *summarise(read_collapsed(raw), cpu_us),
        "",
    ]
    summary.write_text("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--load", choices=["reserve", "flow", "bare"], default="reserve")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument(
        "--python-only", action="store_true", help="no C frames (without py-spy --native)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if not (procs.BIN / "py-spy").exists():
        sys.exit("benchmarks.profile: py-spy is not installed (.venv/bin/pip install py-spy)")
    args.out.mkdir(parents=True, exist_ok=True)
    with exclusive(REDIS_URL):
        summary = asyncio.run(
            profile(args.seconds, args.load, args.rate, not args.python_only, args.out)
        )
    print(summary)


if __name__ == "__main__":
    main()
