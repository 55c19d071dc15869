"""Bursts of requests against a sidecar whose Redis is failing, and the check of guarantee 8's
bound on each answer: shared by the single-Redis and the cluster outage tests."""

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import eventually

# The contract's bound on an answer while Redis is down (DESIGN, guarantee 8).
ANSWER_BOUND_S = 0.1
# What a client on this test machine may see on top of it: the burst's client, the sidecar and
# other developers' test suites share 2 cores, so the time from a request's bytes written to
# its whole answer read includes waits for a core that are no part of the sidecar's answer.
# Alone, the slowest of 200 answers to a paused Redis comes in 65-85 ms (the 50 ms Redis
# deadline, then 200 answers written); with a load average of 4 it was seen at 115 ms.
SHARED_MACHINE_ALLOWANCE_S = 0.05


class Connection:
    """One kept-alive HTTP/1.1 connection on raw sockets: a burst of hundreds costs the client
    microseconds per request, where httpx would add more than the bound itself."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        payload = orjson.dumps(body)
        head = f"POST {path} HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\n"
        self.writer.write(head.encode() + b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        return await self.answer()

    async def answer(self) -> tuple[int, dict[str, Any]]:
        status_line, *headers = (await self.reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        length = next(
            int(line.split(":", 1)[1])
            for line in headers
            if line.lower().startswith("content-length")
        )
        return int(status_line.split()[1]), orjson.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        self.writer.close()


async def connections(url: str, count: int) -> list[Connection]:
    """Connections that each answered one GET /healthz already: accepted by the server, so
    what a test times is the answer, not the accept."""
    parts = urlsplit(url)
    opened = await asyncio.gather(
        *(asyncio.open_connection(parts.hostname, parts.port) for _ in range(count))
    )
    ready = [Connection(*pair) for pair in opened]
    for connection in ready:
        connection.writer.write(b"GET /healthz HTTP/1.1\r\nHost: s\r\n\r\n")
    await asyncio.gather(*(connection.answer() for connection in ready))
    return ready


@dataclass
class Timed:
    path: str
    status: int
    body: dict[str, Any]
    seconds: float


async def burst(url: str, requests: list[tuple[str, dict[str, Any]]]) -> list[Timed]:
    """Sends every request at once, each on a connection of its own; each timed from the
    moment it is written to the moment its whole answer is read."""
    ready = await connections(url, len(requests))
    start = asyncio.Event()
    waiting = 0

    async def one(connection: Connection, path: str, body: dict[str, Any]) -> Timed:
        nonlocal waiting
        waiting += 1
        await start.wait()
        started = time.perf_counter()
        status, answer = await connection.post(path, body)
        seconds = time.perf_counter() - started
        connection.close()
        return Timed(path, status, answer, seconds)

    tasks = [
        asyncio.create_task(one(connection, path, body))
        for connection, (path, body) in zip(ready, requests, strict=True)
    ]
    await eventually(lambda: waiting == len(tasks), 5, "every task at the start line", 0)
    start.set()
    return await asyncio.gather(*tasks)


async def handled(url: str) -> tuple[float, float]:
    """(requests the sidecar handled within ANSWER_BOUND_S, requests it handled), by its own
    measure: the quota_http_request_duration_seconds histogram of every /v1 route."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    within = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "quota_http_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                total += sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == ANSWER_BOUND_S:
                within += sample.value
    return within, total


async def burst_within_bound(url: str, requests: list[tuple[str, dict[str, Any]]]) -> list[Timed]:
    """The burst, with guarantee 8's bound checked twice. As the contract states it, on the
    sidecar's own measure of each request (from the request reaching the application to its
    answer written): every one within 100 ms, no allowance. End to end, as the client saw
    it: within 100 ms plus SHARED_MACHINE_ALLOWANCE_S, the waits for a core on this shared
    2-core machine that client-side timing cannot tell apart from the sidecar's."""
    within_before, total_before = await handled(url)
    answers = await burst(url, requests)
    within_after, total_after = await handled(url)
    assert total_after - total_before == len(requests)
    assert within_after - within_before == len(requests), (
        f"{len(requests) - (within_after - within_before):.0f} of {len(requests)} requests took"
        f" the sidecar over {ANSWER_BOUND_S} s"
    )
    seconds = sorted(answer.seconds for answer in answers)
    assert seconds[-1] <= ANSWER_BOUND_S + SHARED_MACHINE_ALLOWANCE_S, (
        f"end to end: p50 {seconds[len(seconds) // 2]:.3f} s, p100 {seconds[-1]:.3f} s"
    )
    return answers
