"""A same-run A/B of two builds: the same app served from two source trees side by side, their
loads taken in turns (A B, B A, A B, ...) so that the machine's drift cancels out, and the
medians of the rounds printed with how many rounds B won.

    git worktree add /tmp/base HEAD~1
    .venv/bin/python -m benchmarks.ab --base /tmp/base --load reserve --rounds 6 --seconds 5

A is the tree at --base, B this checkout. Each server imports its own tree's code (uvicorn
--app-dir and PYTHONPATH) with this checkout's virtual environment and server configuration;
Redis DB 3 is used as by benchmarks.run (FLUSHDB, and the same lock).
"""

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from benchmarks import procs, stores
from benchmarks.run import (
    REDIS_URL,
    UNLIMITED,
    USER_PREFIX,
    Bench,
    Config,
    Load,
    exclusive,
    in_turns,
)

APPS = {"sidecar": "benchmarks.apps:sidecar_app", "bare": "benchmarks.apps:bare_app"}


async def compare(trees: dict[str, Path], app: str, load: str, config: Config, rounds: int) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="quota-ab-"))
    bench = Bench(config, log_dir)
    bench.redis_pid = await stores.redis_pid(bench.redis)
    servers: dict[str, procs.Server] = {}
    results: dict[str, list[Load]] = {name: [] for name in trees}
    try:
        for name, tree in trees.items():
            port = procs.free_port()
            argv = [*procs.uvicorn_argv(APPS[app], port, 1), "--app-dir", str(tree)]
            env = {**bench.env(), "PYTHONPATH": str(tree)}
            servers[name] = procs.Server(f"ab-{name}", argv, env, port, log_dir)
            ready = "/healthz" if app == "sidecar" else "/"
            await asyncio.to_thread(servers[name].start, ready)
        connections = config.connections[0]
        for order in in_turns(list(trees), rounds):
            for name in order:
                if load != "bare":
                    await bench.fresh_users(USER_PREFIX, config.users, UNLIMITED)
                results[name].append(
                    await bench.wrk(load, servers[name], 1, connections, mode=load)
                )
    finally:
        for server in servers.values():
            await asyncio.to_thread(server.stop)
        await bench.redis.aclose()
        await bench.engine.dispose()
    for name, loads in results.items():
        print(
            f"{name} ({trees[name]}): requests/s {statistics.median(x.rps for x in loads):,.0f}, "
            f"server CPU {statistics.median(x.server_cpu_us for x in loads):.1f} us/req, "
            f"p50 {statistics.median(x.p50_ms for x in loads):.2f} ms, "
            f"p99 {statistics.median(x.p99_ms for x in loads):.2f} ms, "
            f"non-2xx and socket errors {sum(x.non_2xx + x.socket_errors for x in loads)}; "
            f"rounds {', '.join(f'{x.rps:,.0f}' for x in loads)}"
        )
    won = sum(b.rps > a.rps for a, b in zip(results["A"], results["B"], strict=True))
    print(f"B had more requests/s in {won} of {rounds} rounds")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="the tree of build A")
    parser.add_argument("--app", choices=sorted(APPS), default="sidecar")
    parser.add_argument("--load", choices=("reserve", "flow", "bare"), default="reserve")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if args.app == "bare" and args.load != "bare":
        parser.error("the bare app only answers the bare load")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    # Both builds are served with this checkout's server settings, its protocol included.
    serving = args.base / "quota_common" / "serving.py"
    if not serving.is_file() or "class ApiHttpProtocol" not in serving.read_text():
        parser.error(f"{args.base} is no tree of this project with ApiHttpProtocol")
    config = Config(seconds=args.seconds, connections=[args.connections], workers=[1])
    trees = {"A": args.base.resolve(), "B": procs.ROOT}
    with exclusive(REDIS_URL):
        asyncio.run(compare(trees, args.app, args.load, config, args.rounds))


if __name__ == "__main__":
    main()
