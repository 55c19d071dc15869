"""The billing API's own refusals (the error class and codes are in quota_common.codes)."""

from quota_common.codes import ApiError, ErrorCode


def unauthorized(message: str) -> ApiError:
    return ApiError(401, ErrorCode.UNAUTHORIZED, message, {"WWW-Authenticate": "Bearer"})
