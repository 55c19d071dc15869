"""HTTP plumbing of the sidecar's JSON routes, on plain ASGI: the hot path skips Starlette's
request and response objects, which cost about as much as the rest of a reserve. Strict JSON
bodies, JSON errors, bearer tokens, metrics; nothing a client sends can produce a traceback."""

import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from quota_common.codes import ApiError, ErrorCode, invalid
from sidecar import metrics
from sidecar.outage import UNAVAILABLE
from sidecar.pipeline import ScriptFailed

BODY_BYTES_MAX = 64 * 1024
log = logging.getLogger("sidecar")


@dataclass(slots=True)
class Answer:
    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def error_answer(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Answer:
    # The extra fields (usage of a refusal, say) sit beside "error" and inside it, so clients
    # reading either place find them.
    body = {"error": {"code": code, "message": message, **extra}, **extra}
    return Answer(body, status, headers or {})


class Call:
    """One request, read straight from the ASGI scope."""

    __slots__ = ("headers", "receive", "scope")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.headers: dict[bytes, bytes] = dict(scope["headers"])

    @property
    def path_params(self) -> dict[str, Any]:
        params: dict[str, Any] = self.scope.get("path_params", {})
        return params

    async def json(self) -> object:
        content_type = self.headers.get(b"content-type", b"")
        if content_type.split(b";", 1)[0].strip().lower() != b"application/json":
            raise ApiError(
                415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json"
            )
        declared = self.headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > BODY_BYTES_MAX):
            raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, "the body may be at most 64 KB")
        body = b""
        more = True
        while more:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, ErrorCode.INVALID_JSON, "the client went away")
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > BODY_BYTES_MAX:
                raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, "the body may be at most 64 KB")
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ApiError(400, ErrorCode.INVALID_JSON, "the body is not valid JSON") from None
        repeated = repeated_key(body, parsed)
        if repeated is not None:
            raise invalid(f"{repeated} appears more than once")
        return parsed

    def bearer_matches(self, token: str) -> bool:
        scheme, _, value = self.headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), token.encode())


# More keys in one object than any body of these routes can have: validation refuses it anyway.
OBJECT_KEYS_MAX = 32
# A key, then JSON white space before its colon.
SPACE_BEFORE_COLON = re.compile(rb'"[ \t\r\n]+:')


def repeated_key(raw: bytes, parsed: object) -> str | None:
    """A key that the body or an object in it (metadata) repeats: orjson would silently keep the
    last one. Only bodies that validation could accept are looked at (an object of objects of
    at most OBJECT_KEYS_MAX keys each), so the check stays cheap and shallow whatever is sent.
    Without escapes no string holds a quote, so every `":` in the body ends a key: when no key
    has white space before its colon, as many `":` as the parsed objects have keys means none
    was repeated. Otherwise (escapes, or such white space) the body is parsed again, slowly."""
    objects = shallow_objects(parsed)
    if objects is None:
        return None
    if (
        b"\\" not in raw
        and raw.count(b'":') == sum(map(len, objects))
        and SPACE_BEFORE_COLON.search(raw) is None
    ):
        return None
    repeated: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        names = [name for name, _ in items]
        if len(set(names)) < len(names):
            repeated.extend(name for name in names if names.count(name) > 1)
        return dict(items)

    json.loads(raw, object_pairs_hook=pairs)
    return repeated[0] if repeated else None


def shallow_objects(parsed: object) -> list[dict[str, Any]] | None:
    """The body and the objects directly in it, when the body is an object whose values are
    scalars or objects of scalars, each of a size validation allows; otherwise None."""
    if not isinstance(parsed, dict) or len(parsed) > OBJECT_KEYS_MAX:
        return None
    objects = [parsed]
    for value in parsed.values():
        if isinstance(value, list):
            return None
        if isinstance(value, dict):
            if len(value) > OBJECT_KEYS_MAX or any(
                isinstance(item, dict | list) for item in value.values()
            ):
                return None
            objects.append(value)
    return objects


Handler = Callable[[Call], Awaitable[Answer]]


async def send_answer(send: Send, answer: Answer) -> None:
    payload = orjson.dumps(answer.body)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    if answer.headers:
        headers += [(k.lower().encode(), v.encode()) for k, v in answer.headers.items()]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class EverySecond:
    """Lets one event through per second and counts the ones it held back."""

    def __init__(self) -> None:
        self.next_at = 0.0
        self.skipped = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self.next_at:
            self.skipped += 1
            return False
        self.next_at = now + 1.0
        return True

    def held_back(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped


class Endpoint:
    """An ASGI app for one JSON route: method and bearer checks, the handler, its metrics, and
    every failure turned into a JSON error."""

    def __init__(
        self,
        route: str,
        handler: Handler,
        methods: Iterable[str] = ("POST",),
        token: Callable[[], str | None] | None = None,
    ) -> None:
        self.route = route
        self.handler = handler
        self.methods = frozenset(methods)
        self.token = token
        self.metrics = metrics.HOT.route(route)
        # An outage answers thousands of 503s a second: one log line a second tells as much.
        self.unavailable_log = EverySecond()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        answer = await self.answer(scope, receive)
        await send_answer(send, answer)
        self.metrics.observe(answer.status, time.perf_counter() - started)

    async def answer(self, scope: Scope, receive: Receive) -> Answer:
        if scope["method"] not in self.methods:
            allowed = ", ".join(sorted(self.methods))
            return error_answer(
                405, ErrorCode.METHOD_NOT_ALLOWED, f"use {allowed}", {"Allow": allowed}
            )
        call = Call(scope, receive)
        token = self.token() if self.token else None
        if token is not None and not call.bearer_matches(token):
            return error_answer(
                401,
                ErrorCode.UNAUTHORIZED,
                "missing or wrong bearer token",
                {"WWW-Authenticate": "Bearer"},
            )
        try:
            return await self.handler(call)
        except ApiError as error:
            return error_answer(
                error.status, error.code, error.message, error.headers, **error.extra
            )
        except UNAVAILABLE as error:
            metrics.STORE_ERRORS.inc()
            if self.unavailable_log.ready():
                log.warning(
                    "store unavailable",
                    extra={
                        "route": self.route,
                        "error": type(error).__name__,
                        "since_last_line": self.unavailable_log.held_back(),
                    },
                )
            return error_answer(
                503,
                ErrorCode.STORE_UNAVAILABLE,
                "the quota store is unavailable; try again shortly",
            )
        except ScriptFailed as error:
            log.error("script failed", extra={"route": self.route, "error": str(error)})
            return error_answer(500, ErrorCode.INTERNAL, "the quota script failed")
        except Exception:
            log.exception("unexpected error", extra={"route": self.route})
            return error_answer(500, ErrorCode.INTERNAL, "unexpected error")


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 as JSON errors."""
    if not isinstance(exc, HTTPException):
        raise exc
    code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
        exc.status_code, ErrorCode.VALIDATION_ERROR
    )
    answer = error_answer(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
    return Response(
        orjson.dumps(answer.body), answer.status, answer.headers, media_type="application/json"
    )
