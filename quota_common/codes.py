"""Result codes of the Lua scripts (mirrored at the end of lua/_prelude.lua) and the error codes
the HTTP APIs answer with. One table, so Lua, Python and the OpenAPI documents agree."""

from enum import IntEnum, StrEnum
from typing import Any


class Code(IntEnum):
    OK = 0
    REPLAYED = 1
    OTHER_PERIOD = 2
    NOT_LOADED = -1
    QUOTA_EXCEEDED = -2
    IDEMPOTENCY_CONFLICT = -3
    NOT_FOUND = -4
    ALREADY_COMMITTED = -5
    ALREADY_REFUNDED = -6
    EXPIRED = -7
    BELOW_HOLD = -8


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    INVALID_JSON = "invalid_json"
    VALIDATION_ERROR = "validation_error"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    QUOTA_EXCEEDED = "quota_exceeded"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    RESERVATION_NOT_FOUND = "reservation_not_found"
    ALREADY_COMMITTED = "already_committed"
    ALREADY_REFUNDED = "already_refunded"
    EXPIRED = "expired"
    STORE_UNAVAILABLE = "store_unavailable"
    RATE_LIMITED = "rate_limited"
    CONFLICT = "conflict"
    PAYMENT_FAILED = "payment_failed"
    BAD_SIGNATURE = "bad_signature"
    INTERNAL = "internal_error"
    PAYMENT_PROVIDER_UNAVAILABLE = "payment_provider_unavailable"
    SERVICE_UNAVAILABLE = "service_unavailable"


class ApiError(Exception):
    """A refusal of either API, answered as `{"error": {"code", "message", ...extra}}`."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra


def invalid(message: str) -> ApiError:
    return ApiError(422, ErrorCode.VALIDATION_ERROR, message)


# Status of each script refusal, and the error code the API answers with.
REFUSALS: dict[Code, tuple[int, ErrorCode]] = {
    Code.QUOTA_EXCEEDED: (429, ErrorCode.QUOTA_EXCEEDED),
    Code.IDEMPOTENCY_CONFLICT: (409, ErrorCode.IDEMPOTENCY_CONFLICT),
    Code.NOT_FOUND: (404, ErrorCode.RESERVATION_NOT_FOUND),
    Code.ALREADY_COMMITTED: (409, ErrorCode.ALREADY_COMMITTED),
    Code.ALREADY_REFUNDED: (409, ErrorCode.ALREADY_REFUNDED),
    Code.EXPIRED: (409, ErrorCode.EXPIRED),
    Code.BELOW_HOLD: (422, ErrorCode.VALIDATION_ERROR),
}
