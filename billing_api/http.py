"""HTTP plumbing of the billing API: strict JSON bodies, JSON errors for every failure, the
security headers, and the wrapper that turns Stripe, Postgres and Redis trouble into answers."""

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import stripe
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing_api import metrics
from quota_common.codes import ApiError, ErrorCode

BODY_BYTES_MAX = 16 * 1024
# Stripe events carry whole invoices; still bounded so a flood cannot exhaust memory.
WEBHOOK_BYTES_MAX = 512 * 1024
RETRY_AFTER_S = 5
log = logging.getLogger("billing_api")

Handler = Callable[[Request], Awaitable[Response]]


def retry_after(seconds: float) -> dict[str, str]:
    """A Retry-After header of the whole seconds to wait, at least one."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"strict-transport-security", b"max-age=31536000; includeSubDomains"),
    (b"cache-control", b"no-store"),
]


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        {"ok": False, "error": {"code": code, "message": message, **extra}},
        status_code=status,
        headers=headers,
    )


async def read_body(request: Request, bytes_max: int) -> bytes:
    declared = request.headers.get("content-length")
    too_large = ApiError(
        413, ErrorCode.PAYLOAD_TOO_LARGE, f"the body may be at most {bytes_max // 1024} KB"
    )
    if declared is not None and (not declared.isdigit() or int(declared) > bytes_max):
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > bytes_max:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> object:
    """The JSON body. Demanding application/json also keeps cookie-authenticated POSTs safe
    from cross-site forms, which cannot send that content type without a CORS preflight."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json")
    body = await read_body(request, BODY_BYTES_MAX)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, ErrorCode.INVALID_JSON, "the body is not valid JSON") from None


def stripe_failure(error: stripe.StripeError) -> ApiError:
    """A Stripe refusal as the user should see it; Stripe's own trouble as a 503 to retry."""
    metrics.STRIPE_ERRORS.labels(type(error).__name__).inc()
    message = error.user_message or "the payment was refused"
    if isinstance(error, stripe.CardError):
        return ApiError(402, ErrorCode.PAYMENT_FAILED, message)
    if isinstance(error, stripe.IdempotencyError):
        # Our keys always carry the same parameters, so this is Stripe still working on an
        # earlier request with the key: to be retried, not a conflict of state.
        return ApiError(
            503,
            ErrorCode.PAYMENT_PROVIDER_UNAVAILABLE,
            "Stripe is still working on an earlier request for this; try again shortly",
            retry_after(RETRY_AFTER_S),
        )
    if isinstance(error, stripe.InvalidRequestError) and (error.http_status or 500) < 500:
        log.info("stripe refused a request", extra={"stripe_error": str(error.code or "")})
        if "payment method" in message.lower() or error.param == "payment_method":
            return ApiError(402, ErrorCode.PAYMENT_FAILED, message)
        return ApiError(422, ErrorCode.VALIDATION_ERROR, f"Stripe refused the request: {message}")
    log.warning("stripe unavailable", extra={"stripe_error": type(error).__name__})
    return ApiError(
        503,
        ErrorCode.PAYMENT_PROVIDER_UNAVAILABLE,
        "the payment provider is unavailable; try again shortly",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


def endpoint(route: str) -> Callable[[Handler], Handler]:
    """Wraps a route: metrics, and every failure a JSON error, never a traceback."""

    def wrap(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            started = time.perf_counter()
            in_progress = metrics.IN_PROGRESS.labels(route)
            in_progress.inc()
            try:
                response = await handler(request)
            except ApiError as error:
                response = error_response(
                    error.status, error.code, error.message, error.headers, **error.extra
                )
            except stripe.StripeError as error:
                failure = stripe_failure(error)
                response = error_response(
                    failure.status, failure.code, failure.message, failure.headers
                )
            except (SQLAlchemyError, RedisError, OSError, TimeoutError) as error:
                log.warning("store unavailable", extra={"route": route, "error": repr(error)})
                response = error_response(
                    503,
                    ErrorCode.SERVICE_UNAVAILABLE,
                    "a backing store is unavailable; try again shortly",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
            except Exception:
                log.exception("unexpected error", extra={"route": route})
                response = error_response(500, ErrorCode.INTERNAL, "unexpected error")
            finally:
                in_progress.dec()
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


class SecurityHeaders:
    """Adds the security headers to every answer, errors and 404s included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
