"""A webhook receiver for the alert tests: records each POST and answers 200."""

import asyncio
import contextlib
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Received:
    body: dict[str, Any]
    raw: bytes
    signature: str


def signature_valid(secret: str, header: str, raw: bytes) -> bool:
    parts = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + raw, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), parts["v1"])


@dataclass
class Receiver:
    port: int
    received: list[Received] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def start(self) -> "Receiver":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
                if name
            }
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            self.received.append(Received(orjson.loads(raw), raw, headers["quota-signature"]))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
