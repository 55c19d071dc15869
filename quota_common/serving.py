"""Serving an ASGI app with uvicorn as both HTTP services do: uvloop and httptools, on a socket
bound before the app starts (an address that cannot be had is one line naming the settings),
each response written at once, and a JSON error, like every other error of the APIs, for a
request httptools cannot parse."""

import asyncio
import socket
import weakref
from typing import Any

import orjson
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from quota_common.codes import ErrorCode


class HeadWithBody(asyncio.Transport):
    """The connection's transport as one request's cycle sees it: the response's head (status
    line and headers) waits for the first body write and goes out with it. uvicorn writes them
    apart; with TCP_NODELAY that is two segments, two send() calls here and two wake-ups of the
    client, for every response."""

    __slots__ = ("cycle", "head", "transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        super().__init__()
        self.transport = transport
        # Weak, until the head is seen: the cycle holds this object, and a reference cycle per
        # request (one that never answers, say) leaves its garbage to the cyclic collector,
        # whose pauses took bare p99 from 2.4 to 17-31 ms.
        self.cycle: weakref.ref[RequestResponseCycle] | None = weakref.ref(cycle)
        self.head: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # The first write after the response started is its head (a 100 Continue before it
        # goes out at once).
        cycle = self.cycle() if self.cycle is not None else None
        if cycle is not None and cycle.response_started:
            self.cycle = None
            self.head = bytes(data)
            return
        if self.head is not None:
            data, self.head = self.head + data, None
        self.transport.write(data)

    def close(self) -> None:
        self.cycle = None
        # A response the app abandoned after its start: its head goes out, as uvicorn sends it.
        if self.head is not None:
            self.transport.write(self.head)
            self.head = None
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)


class ApiHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing each response at once (`HeadWithBody`) and
    answering an unparsable request (a bad Content-Length, a broken request line) with the
    APIs' JSON error body instead of plain text."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # The cycle was just made (its task has not run yet); an upgrade request makes none. A
        # HEAD response has no body write to carry its head: it is written as uvicorn does.
        cycle = self.cycle
        if (
            cycle is not None
            and cycle.scope["method"] != "HEAD"
            and not isinstance(cycle.transport, HeadWithBody)
        ):
            cycle.transport = HeadWithBody(self.transport, cycle)

    def send_400_response(self, msg: str) -> None:
        body = orjson.dumps({"error": {"code": ErrorCode.BAD_REQUEST, "message": msg}})
        head = (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()


def serve(
    app: ASGIApp,
    sock: socket.socket | None,
    uds: str | None = None,
    timeout_keep_alive_s: int = 5,
    proxy_headers: bool = True,
) -> None:
    """`proxy_headers`: take the client's address from X-Forwarded-For when a proxy on this
    host sets it (uvicorn's default; the billing API limits by address). The sidecar reads no
    address and skips the middleware."""
    config = uvicorn.Config(
        app,
        uds=uds,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http=ApiHttpProtocol,
        proxy_headers=proxy_headers,
        # Announcing uvicorn tells an attacker something and costs every response a header.
        server_header=False,
        timeout_keep_alive=timeout_keep_alive_s,
    )
    uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
