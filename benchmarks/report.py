"""The report of a benchmark run: Markdown tables, the JSON of every figure, and a PNG of the
latency percentiles of each load. `SECTIONS` are the Markdown headings, in order (the smoke test
checks them)."""

import math
import shutil
from pathlib import Path
from typing import Any

import orjson

SECTIONS = (
    "## Loads",
    "## Reserve vs bare, paired rounds",
    "## Over-grant race",
    "## Redis floor",
    "## Redis memory per active user",
    "## Sync worker",
    "## Targets",
    "## Notes",
)


def ms(value: float) -> str:
    return f"{value:.2f}"


def bare_cpu_us(loads: list[dict[str, Any]], workers: int, conns: int) -> float | None:
    """Server CPU per request of the bare endpoint: the mean over its loads of the block."""
    values = [
        x["server_cpu_us"]
        for x in loads
        if x["name"] in ("bare", "bare-again")
        and (x["workers"], x["connections"]) == (workers, conns)
    ]
    return sum(values) / len(values) if values else None


def cpu_ratio(loads: list[dict[str, Any]], load: dict[str, Any]) -> str:
    """Bare's server CPU per request over this load's: the rate ratio if both servers had a
    core to themselves, which the shared machine's noise moves far less than requests/s."""
    bare = bare_cpu_us(loads, load["workers"], load["connections"])
    if bare is None or not load["server_cpu_us"]:
        return "-"
    return f"{bare / load['server_cpu_us']:.2f}"


def loads_table(loads: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| load | workers | conns | requests/s | x bare | x bare (CPU) | p50 ms | p99 ms | "
        "p99.9 ms | server CPU us/req | Redis CPU us/req | wrk CPU us/req | machine busy % | "
        "others' CPU % | non-2xx | socket errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for x in sorted(loads, key=lambda x: (x["workers"], x["connections"])):
        lines.append(
            f"| {x['name']} | {x['workers']} | {x['connections']} | {x['rps']:,.0f} | "
            f"{x['ratio_to_bare']:.2f} | {cpu_ratio(loads, x)} | {ms(x['p50_ms'])} | "
            f"{ms(x['p99_ms'])} | {ms(x['p999_ms'])} | {x['server_cpu_us']:.0f} | "
            f"{x['redis_cpu_us']:.0f} | "
            f"{x['wrk_cpu_us']:.0f} | {x['machine_busy_percent']:.0f} | "
            f"{x.get('others_cpu_percent', 0):.0f} | {x['non_2xx']} | "
            f"{x['socket_errors']} |"
        )
    flows = [x for x in loads if x["flow"].get("reserved")]
    if flows:
        lines += [
            "",
            "Chat flows (counted by the load script from the answers):",
            "",
            "| load | workers | conns | flows/s | reserved | committed | refunded | refused "
            "| failed |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for x in flows:
            f = x["flow"]
            lines.append(
                f"| {x['name']} | {x['workers']} | {x['connections']} | "
                f"{f['reserved'] / x['seconds']:,.0f} | {f['reserved']} | {f['committed']} | "
                f"{f['refunded']} | {f['refused']} | {f['failed']} |"
            )
    return lines


def paired_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["Not run."]
    lines = [
        "Bare and reserve loads in turns (bare, reserve, reserve, bare, ...), each ratio from two "
        "loads seconds apart, so the machine's drift over the run cancels out; the median round "
        "is the figure the targets use.",
        "",
        "| workers | conns | rounds x s | reserve x bare, median | min - max | x bare (CPU), "
        "median | reserve p99 ms, median | bare p99 ms, median | non-2xx and socket errors | "
        "reserve x bare per round |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for x in rows:
        each = ", ".join(f"{r['ratio']:.2f}" for r in x["rounds"])
        lines.append(
            f"| {x['workers']} | {x['connections']} | {len(x['rounds'])} x {x['seconds']:g} | "
            f"**{x['median_ratio']:.2f}** | {x['min_ratio']:.2f} - {x['max_ratio']:.2f} | "
            f"{x['median_cpu_ratio']:.2f} | {ms(x['median_reserve_p99_ms'])} | "
            f"{ms(x['median_bare_p99_ms'])} | {x['errors']} | {each} |"
        )
    return lines


def overgrant_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["Not run."]
    lines = [
        "| service | conns | requests/s | p50 ms | p99 ms | grants | refused | tokens granted "
        "| quota (all users) | tokens beyond quota | users over quota |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for x in rows:
        lines.append(
            f"| {x['service']} | {x['connections']} | {x['rps']:,.0f} | {ms(x['p50_ms'])} | "
            f"{ms(x['p99_ms'])} | {x['grants']} | {x['refused']} | {x['tokens_granted']:,} | "
            f"{x['quota_total']:,} | **{x['tokens_beyond_quota']:,}** | "
            f"{x['users_over_quota']} |"
        )
    return lines


def floor_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["Not run."]
    lines = [
        "| what | clients | pipeline | calls | EVALSHA/s | x bare | p50 ms | p99 ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for x in rows:
        lines.append(
            f"| {x['what']} | {x['clients']} | {x['pipeline']} | {x['calls']:,} | "
            f"{x['rps']:,.0f} | {x['ratio_to_bare']:.2f} | {ms(x['p50_ms'])} | "
            f"{ms(x['p99_ms'])} |"
        )
    return lines


def memory_lines(memory: dict[str, Any]) -> list[str]:
    if not memory:
        return ["Not run."]
    return [
        f"{memory['users']:,} users, each with its state and one open hold ({memory['holds']:,}"
        f" holds), {memory['keys']:,} keys in DB 3. Per user: the sum of `MEMORY USAGE` of "
        "every key of DB 3 (value, key name and dict entry of each key; only the keyspace's "
        "bucket arrays, some 8-16 bytes a key, are not in it) and the server-wide `used_memory` "
        "delta "
        f"({memory['used_memory_before']:,} -> {memory['used_memory_after']:,} bytes, which "
        "also counts the keyspace tables and whatever other databases did meanwhile).",
        "",
        "| bytes per active user | of which state | of which one hold (holds zset, record, due "
        "entry) | used_memory delta per user |",
        "|--:|--:|--:|--:|",
        f"| **{memory['bytes_per_user']:.0f}** | {memory['bytes_per_user_state_only']:.0f} | "
        f"{memory['bytes_per_hold']:.0f} | {memory['used_memory_delta_per_user']:.0f} |",
    ]


def sync_lines(sync: dict[str, Any]) -> list[str]:
    if not sync:
        return ["Not run."]
    if "skipped" in sync:
        return [f"Skipped: {sync['skipped']}."]
    if "error" in sync:
        return [f"Failed: {sync['error']}"]
    return [
        f"{sync['events']:,} settled events waiting in Redis, then `quota-sync-worker` started; "
        f"every row was in `usage_events` {sync['seconds_from_start']:.2f} s after the start.",
        "",
        "| events/s (first row to last) | x bare | events/s (from process start) "
        "| worker CPU us/event |",
        "|--:|--:|--:|--:|",
        f"| **{sync['events_per_s']:,.0f}** | {sync['ratio_to_bare']:.2f} | "
        f"{sync['events_per_s_from_start']:,.0f} | {sync['worker_cpu_us_per_event']:.0f} |",
    ]


def find(loads: list[dict[str, Any]], name: str, workers: int, conns: int) -> dict[str, Any] | None:
    for x in loads:
        if (x["name"], x["workers"], x["connections"]) == (name, workers, conns):
            return x
    return None


def targets_table(results: dict[str, Any]) -> list[str]:
    loads = results["loads"]
    rows: list[tuple[str, str, bool | None]] = []
    paired = {(x["workers"], x["connections"]): x for x in results.get("paired", [])}
    for conns in sorted({x["connections"] for x in loads}):
        reserve = find(loads, "reserve", 1, conns)
        bare = bare_cpu_us(loads, 1, conns)
        rounds = paired.get((1, conns))
        if rounds:
            median = rounds["median_ratio"]
            rows.append(
                (
                    f"reserve >= 0.6 x bare, 1 worker, {conns} conns, paired (issue: aim 0.8)",
                    f"{median:.2f} ({rounds['min_ratio']:.2f} - {rounds['max_ratio']:.2f})",
                    median >= 0.6 and not rounds["errors"],
                )
            )
        if reserve and bare:
            ratio = reserve["ratio_to_bare"]
            rows.append(
                (
                    f"the same from the block's loads, {conns} conns",
                    f"{ratio:.2f}",
                    ratio >= 0.6,
                )
            )
            by_cpu = bare / max(reserve["server_cpu_us"], 1e-9)
            rows.append(
                (
                    f"the same by server CPU per request, {conns} conns",
                    f"{by_cpu:.2f}",
                    by_cpu >= 0.6,
                )
            )
    for name, how in (("reserve", "saturated"), ("reserve-paced", "paced")):
        load, bare_load = (
            find(loads, name, 1, 16),
            find(loads, name.replace("reserve", "bare"), 1, 16),
        )
        if load:
            p99 = load["p99_ms"]
            context = (
                f" at {load['rps']:,.0f}/s (bare: {bare_load['p99_ms']:.2f} ms)"
                if bare_load
                else ""
            )
            rows.append(
                (
                    f"reserve p99 <= 2 ms at 16 conns, 1 worker, {how}",
                    f"{p99:.2f} ms{context}",
                    p99 <= 2,
                )
            )
    sync = results["sync_worker"]
    if "events_per_s" in sync:
        rate = sync["events_per_s"]
        rows.append(("sync worker >= 20,000 events/s", f"{rate:,.0f}", rate >= 20_000))
        rows.append(("(issue) sync worker >= 50,000 events/s", f"{rate:,.0f}", rate >= 50_000))
    else:
        rows.append(("sync worker >= 20,000 events/s", "not measured", None))
    memory = results["memory"]
    if memory:
        # MEMORY USAGE counts each key's value, name and dict entry; only the keyspace's bucket
        # arrays (~8-16 B per key) are missing. used_memory moves with the other databases.
        per_user = memory["bytes_per_user"]
        rows.append(("Redis <= 1 KB per active user", f"{per_user:.0f} B", per_user <= 1024))
        rows.append(("(issue) <= 600 B with one open hold", f"{per_user:.0f} B", per_user <= 600))
    race = [x for x in results["overgrant"] if x["service"].startswith("sidecar")]
    if race:
        beyond = race[0]["tokens_beyond_quota"]
        rows.append(("sidecar grants 0 tokens beyond quota", f"{beyond}", beyond == 0))
    lines = ["| target | this run | met |", "|---|--:|---|"]
    for what, figure, met in rows:
        mark = "n/a" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {what} | {figure} | {mark} |")
    return lines


def markdown(results: dict[str, Any], plot_name: str) -> str:
    meta = results["meta"]
    lines = [
        f"# Benchmark report {meta['started']}",
        "",
        f"Commit {meta['commit']}, Python {meta['python']}, {meta['cpus']} CPUs, "
        f"{meta['platform']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in meta['load_average_at_start'])}. "
        f"{meta['seconds_per_load']:g} s per load, {meta['users']:,} users, "
        f"{meta['wrk']} with {meta['wrk_threads']} threads."
        + (" **Quick mode: figures are not meaningful.**" if meta["quick"] else ""),
        "",
        "`x bare` is the ratio of requests/s to the bare JSON endpoint of the same run, workers "
        "and connections (the ceiling: the mean of `bare`, run first, and `bare-again`, run "
        "last, of each block); `x bare (CPU)` is bare's server CPU per request over "
        "this load's, the ratio the two would reach with a core each and no one else on the "
        "machine (less moved by the noise of a shared machine).",
        "",
        SECTIONS[0],
        "",
        *loads_table(results["loads"]),
        "",
        f"![latency percentiles]({plot_name})",
        "",
        SECTIONS[1],
        "",
        *paired_table(results.get("paired", [])),
        "",
        SECTIONS[2],
        "",
        *overgrant_table(results["overgrant"]),
        "",
        SECTIONS[3],
        "",
        *floor_table(results["floor"]),
        "",
        SECTIONS[4],
        "",
        *memory_lines(results["memory"]),
        "",
        SECTIONS[5],
        "",
        *sync_lines(results["sync_worker"]),
        "",
        SECTIONS[6],
        "",
        *targets_table(results),
        "",
        SECTIONS[7],
        "",
        *(f"- {note}" for note in results["notes"]),
        "",
    ]
    return "\n".join(lines)


def nines(percentile: float) -> float:
    """Plot position of a percentile: 90 -> 1, 99 -> 2, 99.9 -> 3."""
    return -math.log10(1 - percentile / 100)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = results["loads"]
    panels = sorted({(x["workers"], x["connections"]) for x in loads})
    columns = min(len(panels), 2) or 1
    rows = (len(panels) + columns - 1) // columns or 1
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.8 * rows), squeeze=False)
    ticks = [50, 90, 99, 99.9, 99.99]
    for axis, (workers, conns) in zip(axes.flat, panels, strict=False):
        for x in loads:
            if (x["workers"], x["connections"]) != (workers, conns):
                continue
            points = [(nines(p), v) for p, v in x["percentiles_ms"] if p < 100]
            axis.plot(
                [p for p, _ in points],
                [v for _, v in points],
                marker=".",
                label=f"{x['name']} ({x['rps']:,.0f}/s)",
            )
        axis.set_yscale("log")
        axis.set_xticks([nines(p) for p in ticks], [f"p{p:g}" for p in ticks])
        axis.set_ylabel("latency, ms (log)")
        axis.set_title(f"{workers} worker(s), {conns} connections")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Latency by percentile, benchmark {results['meta']['started']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(results: dict[str, Any], out_dir: Path, stamp: str) -> list[Path]:
    """Writes report-<stamp>.{md,json,png} and copies them to latest.*; returns the paths."""
    base = out_dir / f"report-{stamp}"
    png = base.with_suffix(".png")
    plot(results, png)
    md = base.with_suffix(".md")
    md.write_text(markdown(results, png.name))
    js = base.with_suffix(".json")
    js.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    for path in (md, js, png):
        shutil.copyfile(path, out_dir / f"latest{path.suffix}")
    (out_dir / "latest.md").write_text(markdown(results, "latest.png"))
    return [md, js, png]


def main() -> None:
    """Renders the Markdown and the plot again from a report's JSON:
    `python -m benchmarks.report benchmarks/results/report-<stamp>.json`."""
    import sys

    for name in sys.argv[1:]:
        path = Path(name)
        results = orjson.loads(path.read_bytes())
        plot(results, path.with_suffix(".png"))
        path.with_suffix(".md").write_text(markdown(results, path.with_suffix(".png").name))
        print(path.with_suffix(".md"))


if __name__ == "__main__":
    main()
