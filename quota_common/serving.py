"""Serving an ASGI app with uvicorn as both HTTP services do: uvloop and httptools, on a socket
bound before the app starts (an address that cannot be had is one line naming the settings),
and a JSON error, like every other error of the APIs, for a request httptools cannot parse."""

import socket

import orjson
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from quota_common.codes import ErrorCode


class JsonErrorsHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering an unparsable request (a bad Content-Length, a
    broken request line) with the APIs' JSON error body instead of plain text."""

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
) -> None:
    config = uvicorn.Config(
        app,
        uds=uds,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http=JsonErrorsHttpToolsProtocol,
        timeout_keep_alive=timeout_keep_alive_s,
    )
    uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
