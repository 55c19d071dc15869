"""Real network faults between the billing API and the servers it calls: a TCP proxy that loses
one request or one answer, or holds one back until the test lets it go, a blackhole that
accepts connections and never answers, and a server that trickles its answer forever."""

import asyncio
from typing import Literal

Fault = Literal["request", "answer", "delay"]


class LossyProxy:
    """Forwards TCP to 127.0.0.1:upstream_port. Armed with `lose`, the next request whose
    first bytes start with the given request line is either never forwarded ("request": the
    server never sees it) or forwarded with its answer dropped ("answer": the server did the
    work, the caller never hears); either way the caller's connection is closed. Armed with
    `delay`, that request waits in the proxy (`held` is set) until `release()`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed: tuple[Fault, bytes] | None = None
        self.lost = asyncio.Event()
        self.held = asyncio.Event()
        self.released = asyncio.Event()
        self.server: asyncio.Server | None = None

    def lose(self, loss: Literal["request", "answer"], request_line: bytes) -> None:
        self.armed = (loss, request_line)
        self.lost.clear()

    def delay(self, request_line: bytes) -> None:
        self.armed = ("delay", request_line)
        self.held.clear()
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        dropping = asyncio.Event()

        def cut() -> None:
            self.lost.set()
            writer.close()
            up_writer.close()

        async def requests() -> None:
            while data := await reader.read(65536):
                if self.armed is not None and data.startswith(self.armed[1]):
                    fault, self.armed = self.armed[0], None
                    if fault == "request":
                        cut()
                        return
                    if fault == "answer":
                        dropping.set()
                    else:
                        self.held.set()
                        await self.released.wait()
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def answers() -> None:
            while data := await up_reader.read(65536):
                if dropping.is_set():
                    cut()
                    return
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(requests(), answers(), return_exceptions=True)


class Blackhole:
    """Accepts connections and never answers; counts them."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.held: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> "Blackhole":
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0, backlog=512)
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.held.append(writer)

    async def stop(self) -> None:
        for writer in self.held:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class Trickle:
    """Answers every request with a 200 whose body comes one byte every `interval_s`, without
    end: each read gets its byte in time, so only a cap on the whole call ever stops it."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> "Trickle":
        self.server = await asyncio.start_server(self._trickle, "127.0.0.1", 0)
        return self

    async def _trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: 1000000\r\n\r\n{")
        try:
            while True:
                await writer.drain()
                await asyncio.sleep(self.interval_s)
                writer.write(b" ")
        except ConnectionError:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
