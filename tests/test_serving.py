"""The APIs' uvicorn protocol (quota_common.serving): each response leaves in one write, so one
TCP segment and one wake-up of the client; a 100 Continue still goes first, at once, and a
response abandoned after its start still sends its head before the connection closes."""

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from quota_common.serving import ApiHttpProtocol

BODY = b'{"ok":true}'


class Recorded(asyncio.Transport):
    """The socket side of one connection: what the protocol wrote, call by call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.changed = asyncio.Event()

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not condition():
                await self.changed.wait()
                self.changed.clear()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8700), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def answer(scope: Scope, receive: Receive, send: Send) -> None:
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


async def never(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the request, then waits for the client to go away without answering."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def abandon(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    raise RuntimeError("the app gave up after starting its response")


def connection(app: Any) -> tuple[ApiHttpProtocol, Recorded]:
    config = uvicorn.Config(app, http=ApiHttpProtocol, log_config=None, access_log=False)
    protocol = ApiHttpProtocol(config, ServerState(), {})
    transport = Recorded()
    protocol.connection_made(transport)
    return protocol, transport


def request(body: bytes, *headers: bytes) -> bytes:
    head = b"POST /v1/reserve HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    return head + b"".join(h + b"\r\n" for h in headers) + b"content-length: %d\r\n\r\n" % len(body)


async def test_a_response_is_one_write_per_request_on_a_kept_alive_connection() -> None:
    protocol, transport = connection(answer)
    for n in range(1, 4):
        protocol.data_received(request(b'{"user_id":"u"}') + b'{"user_id":"u"}')
        await transport.until(lambda: len(transport.writes) == n)  # noqa: B023 (awaited here)
        head, _, body = transport.writes[-1].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert body == BODY
    assert not transport.closed


async def test_a_100_continue_goes_out_before_the_request_body_arrives() -> None:
    protocol, transport = connection(answer)
    protocol.data_received(request(b'{"a":1}', b"expect: 100-continue"))
    await transport.until(lambda: len(transport.writes) == 1)
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    protocol.data_received(b'{"a":1}')
    await transport.until(lambda: len(transport.writes) == 2)
    assert transport.writes[1].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[1].endswith(BODY)


async def test_a_response_abandoned_after_its_start_sends_its_head_then_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    protocol, transport = connection(abandon)
    protocol.data_received(request(b"{}") + b"{}")
    await transport.until(lambda: transport.closed)
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n")


async def test_a_head_answer_goes_out_at_once_and_the_next_request_gets_its_own() -> None:
    protocol, transport = connection(answer)
    head = b"HEAD /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    protocol.data_received(head + request(b"{}") + b"{}")
    await transport.until(lambda: len(transport.writes) == 2)
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n")  # the head alone
    assert transport.writes[1].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[1].endswith(BODY)


async def test_a_request_that_is_never_answered_leaves_no_reference_cycle() -> None:
    protocol, _ = connection(never)
    protocol.data_received(request(b"{}") + b"{}")
    cycle = protocol.cycle
    assert cycle is not None
    assert not reaches(cycle.transport, cycle)
    protocol.connection_lost(None)
    await asyncio.gather(*protocol.tasks)


def reaches(start: object, target: object, depth: int = 4) -> bool:
    """Whether `target` is among what `start` holds, directly or through `depth` objects."""
    seen, layer = {id(start)}, [start]
    for _ in range(depth):
        layer = [o for x in layer for o in gc.get_referents(x) if id(o) not in seen]
        if any(o is target for o in layer):
            return True
        seen.update(map(id, layer))
    return False
