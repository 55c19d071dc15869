"""The billing API's refusals: one exception answered as `{"error": {"code", "message"}}`.

Codes come from quota_common.codes.ErrorCode; the two below exist only here (candidates for
that shared table once another service needs them)."""

from enum import StrEnum
from typing import Any

from quota_common.codes import ErrorCode


class BillingCode(StrEnum):
    PAYMENT_PROVIDER_UNAVAILABLE = "payment_provider_unavailable"
    SERVICE_UNAVAILABLE = "service_unavailable"


Code = ErrorCode | BillingCode


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: Code,
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


def unauthorized(message: str) -> ApiError:
    return ApiError(401, ErrorCode.UNAUTHORIZED, message, {"WWW-Authenticate": "Bearer"})
