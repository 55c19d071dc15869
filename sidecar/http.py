"""HTTP plumbing shared by the sidecar's routes: strict JSON bodies, JSON errors, bearer tokens."""

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from quota_common.codes import ErrorCode
from sidecar import metrics
from sidecar.fields import RequestError
from sidecar.outage import UNAVAILABLE

BODY_BYTES_MAX = 64 * 1024
log = logging.getLogger("sidecar")

Handler = Callable[[Request], Awaitable[Response]]


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    # The extra fields (usage of a refusal, say) sit beside "error" and inside it, so clients
    # reading either place find them.
    return JSONResponse(
        {"error": {"code": code, "message": message, **extra}, **extra},
        status_code=status,
        headers=headers,
    )


async def read_json(request: Request) -> object:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise RequestError(
            415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json"
        )
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > BODY_BYTES_MAX):
        raise RequestError(413, ErrorCode.PAYLOAD_TOO_LARGE, "the body may be at most 64 KB")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > BODY_BYTES_MAX:
            raise RequestError(413, ErrorCode.PAYLOAD_TOO_LARGE, "the body may be at most 64 KB")
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise RequestError(400, ErrorCode.INVALID_JSON, "the body is not valid JSON") from None


def bearer_matches(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    supplied = request.headers.get("authorization", "")
    scheme, _, value = supplied.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


def endpoint(
    route: str, token: Callable[[], str | None] | None = None
) -> Callable[[Handler], Handler]:
    """Wraps a route: bearer check, metrics, every failure a JSON error and never a traceback."""

    def wrap(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if token is not None and not bearer_matches(request, token()):
                    response: Response = error_response(
                        401,
                        ErrorCode.UNAUTHORIZED,
                        "missing or wrong bearer token",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                else:
                    response = await handler(request)
            except RequestError as error:
                headers = error.extra.pop("headers", None)
                response = error_response(
                    error.status, error.code, error.message, headers, **error.extra
                )
            except UNAVAILABLE as error:
                metrics.STORE_ERRORS.inc()
                log.warning(
                    "store unavailable", extra={"route": route, "error": type(error).__name__}
                )
                response = error_response(
                    503,
                    ErrorCode.STORE_UNAVAILABLE,
                    "the quota store is unavailable; try again shortly",
                )
            except Exception:
                log.exception("unexpected error", extra={"route": route})
                response = error_response(500, ErrorCode.INTERNAL, "unexpected error")
            metrics.REQUESTS.labels(route, str(response.status_code)).inc()
            metrics.LATENCY.labels(route).observe(time.perf_counter() - started)
            return response

        return run

    return wrap


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 as JSON errors."""
    if not isinstance(exc, HTTPException):
        raise exc
    code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
        exc.status_code, ErrorCode.VALIDATION_ERROR
    )
    return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
