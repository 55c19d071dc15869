"""The sidecar's OpenAPI 3.1 document, built from the request declarations in fields.py."""

from typing import Any

from quota_common.codes import ErrorCode
from quota_common.keys import ID_PATTERN
from sidecar.fields import (
    COMMIT,
    CREDITS,
    EXTEND,
    METADATA_KEY_CHARS_MAX,
    METADATA_KEYS_MAX,
    METADATA_VALUE_CHARS_MAX,
    REASON_CHARS_MAX,
    REFUND,
    RESERVE,
    RESET,
    Field,
)


def field_schema(spec: Field) -> dict[str, Any]:
    if spec.kind == "id":
        schema: dict[str, Any] = {"type": "string", "pattern": ID_PATTERN}
    elif spec.kind == "int":
        schema = {"type": "integer", "minimum": spec.low, "maximum": spec.high}
    elif spec.kind == "metadata":
        schema = {
            "type": "object",
            "maxProperties": METADATA_KEYS_MAX,
            "propertyNames": {"minLength": 1, "maxLength": METADATA_KEY_CHARS_MAX},
            "additionalProperties": {"type": "string", "maxLength": METADATA_VALUE_CHARS_MAX},
        }
    else:
        schema = {"type": "string", "minLength": 1, "maxLength": REASON_CHARS_MAX}
    if spec.doc:
        schema["description"] = spec.doc
    return schema


def body_schema(fields: tuple[Field, ...]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [f.name for f in fields if f.required],
        "properties": {f.name: field_schema(f) for f in fields},
    }


INT = {"type": "integer"}
TIME = {"type": "string", "format": "date-time"}
USAGE_FIELDS: dict[str, Any] = {
    "plan": {"type": "string"},
    "limit": INT,
    "used": INT,
    "reserved": INT,
    "remaining": {"type": "integer", "minimum": 0},
    "period_start": TIME,
    "period_end": TIME,
}


# Set (true) only on answers given while Redis was away (FAIL_MODE=open, journalled settlements).
DEGRADED = {
    "degraded": {
        "type": "boolean",
        "description": "Present and true when Redis was away: an outage grant (FAIL_MODE=open)"
        " or a settlement kept in the journal until Redis is back; usage figures are then"
        " unknown.",
    }
}


def answer(properties: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(properties),
        "properties": {**properties, **(optional or {})},
    }


RESERVATION_ANSWER = answer(
    {
        "reservation_id": {"type": "string"},
        "user_id": {"type": "string"},
        "granted": INT,
        **USAGE_FIELDS,
        "expires_at": TIME,
        "replayed": {"type": "boolean"},
    },
    DEGRADED,
)
COMMIT_ANSWER = answer(
    {
        "reservation_id": {"type": "string"},
        "user_id": {"type": "string"},
        "status": {"const": "committed"},
        "charged": INT,
        "released": INT,
        **USAGE_FIELDS,
        "late": {"type": "boolean"},
        "replayed": {"type": "boolean"},
    },
    DEGRADED,
)
REFUND_ANSWER = answer(
    {
        "reservation_id": {"type": "string"},
        "user_id": {"type": "string"},
        "status": {"enum": ["refunded", "expired"]},
        "released": INT,
        **USAGE_FIELDS,
        "replayed": {"type": "boolean"},
    },
    DEGRADED,
)
USAGE_ANSWER = answer({"user_id": {"type": "string"}, **USAGE_FIELDS, "credits": INT})
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"enum": [c.value for c in ErrorCode]},
                "message": {"type": "string"},
            },
        }
    },
}
# The usage fields of a refusal sit both beside "error" and inside it.
REFUSAL_FIELDS = {k: v for k, v in USAGE_FIELDS.items() if k != "period_start"}
QUOTA_ERROR = {
    "type": "object",
    "required": ["error", *REFUSAL_FIELDS],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", *REFUSAL_FIELDS],
            "properties": {
                "code": {"const": ErrorCode.QUOTA_EXCEEDED.value},
                "message": {"type": "string"},
                **REFUSAL_FIELDS,
            },
        },
        **REFUSAL_FIELDS,
    },
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds until the period ends and the quota starts again.",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def responses(ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": "OK", "content": json_content(ok)}}
    for status in errors:
        out[str(status)] = {"description": "Error", "content": json_content(ERROR)}
    if "429" in out:
        out["429"] = {
            "description": "Not enough tokens left in this period; nothing held",
            "headers": RETRY_AFTER,
            "content": json_content(QUOTA_ERROR),
        }
    return out


INPUT_ERRORS = (400, 401, 405, 413, 415, 422, 503)
# The empty alternative: /v1 needs no token while SIDECAR_TOKEN is unset.
SIDECAR_TOKEN: list[dict[str, list[str]]] = [{"sidecarToken": []}, {}]
ADMIN_TOKEN: list[dict[str, list[str]]] = [{"adminToken": []}]


def post(
    summary: str, fields: tuple[Field, ...], ok: dict[str, Any], *errors: int
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": SIDECAR_TOKEN,
            "requestBody": {"required": True, "content": json_content(body_schema(fields))},
            "responses": responses(ok, *INPUT_ERRORS, *errors),
        }
    }


def user_path(
    summary: str, ok: dict[str, Any], method: str, security: list[Any], *errors: int
) -> dict[str, Any]:
    return {
        method: {
            "summary": summary,
            "security": security,
            "parameters": [
                {
                    "name": "user_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": ID_PATTERN},
                }
            ],
            "responses": responses(ok, *errors),
        }
    }


def openapi_document() -> dict[str, Any]:
    admin_ok = answer({"user_id": {"type": "string"}, **USAGE_FIELDS, "credits": INT})
    # 404: the operator endpoints are disabled while ADMIN_TOKEN is unset.
    admin = {**user_path("", admin_ok, "post", ADMIN_TOKEN, *INPUT_ERRORS, 404)["post"]}
    plain = {"description": "OK"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Quota gateway sidecar", "version": "1"},
        "components": {
            "securitySchemes": {
                "sidecarToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "SIDECAR_TOKEN; needed by /v1 only when it is set.",
                },
                "adminToken": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"},
            }
        },
        "paths": {
            "/v1/reserve": post(
                "Check the quota and hold tokens", RESERVE, RESERVATION_ANSWER, 409, 429
            ),
            "/v1/extend": post(
                "Raise an open hold to a new total", EXTEND, RESERVATION_ANSWER, 404, 409, 429
            ),
            "/v1/commit": post("Charge the tokens really used", COMMIT, COMMIT_ANSWER, 409),
            "/v1/refund": post("Release a hold", REFUND, REFUND_ANSWER, 404, 409),
            "/v1/usage/{user_id}": user_path(
                "A user's usage this period", USAGE_ANSWER, "get", SIDECAR_TOKEN, 401, 405, 422, 503
            ),
            "/admin/v1/users/{user_id}/reset": {
                "post": {
                    **admin,
                    "summary": "Usage of the current period back to 0",
                    "requestBody": {"required": True, "content": json_content(body_schema(RESET))},
                }
            },
            "/admin/v1/users/{user_id}/credits": {
                "post": {
                    **admin,
                    "summary": "One-off credits for the current period",
                    "requestBody": {
                        "required": True,
                        "content": json_content(body_schema(CREDITS)),
                    },
                }
            },
            "/healthz": {"get": {"summary": "Process up", "responses": {"200": plain}}},
            "/readyz": {
                "get": {
                    "summary": "Redis reachable and scripts loaded",
                    "responses": {
                        "200": {"description": "Ready"},
                        "503": {"description": "Not ready"},
                    },
                }
            },
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": plain}}},
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": plain}},
            },
        },
    }
