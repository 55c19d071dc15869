"""The billing API's OpenAPI 3.1 document. Every answer has a schema with its required fields,
so the schemathesis test checks what each route really returns."""

from typing import Any

from billing_api.fields import PAGE_SIZE_MAX
from quota_common.codes import ErrorCode
from quota_common.plans import PAID_PLANS, PLAN_NAMES

STRING = {"type": "string"}
INT = {"type": "integer"}
COUNT = {"type": "integer", "minimum": 0}
BOOL = {"type": "boolean"}
TIME = {"type": "string", "format": "date-time"}
DATE = {"type": "string", "format": "date"}
OK = {"const": True}
NULLABLE_STRING = {"type": ["string", "null"]}


def _object(properties: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """A closed object whose properties are all required but the `optional` ones."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [name for name in properties if name not in optional],
        "properties": properties,
    }


ERROR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["ok", "error"],
    "properties": {
        "ok": {"const": False},
        "error": {
            "type": "object",
            # Some errors say more (402: subscription_id, payment_status, client_secret, ...).
            "required": ["code", "message"],
            "properties": {
                "code": {"enum": [code.value for code in ErrorCode]},
                "message": STRING,
                "subscription_id": NULLABLE_STRING,
                "subscription_status": STRING,
                "payment_status": NULLABLE_STRING,
                "client_secret": NULLABLE_STRING,
                "plan": {"enum": list(PAID_PLANS)},
            },
        },
    },
}
PLAN = _object({"price": COUNT, "quota": COUNT, "features": {"type": "array", "items": STRING}})
PLANS = _object({"ok": OK, "plans": _object(dict.fromkeys(PLAN_NAMES, PLAN))})
SUBSCRIPTION = _object(
    {
        "id": NULLABLE_STRING,
        "plan": {"enum": list(PLAN_NAMES)},
        "status": STRING,
        "current_period_start": TIME,
        "current_period_end": TIME,
        "cancel_at_period_end": BOOL,
    }
)
OK_SUBSCRIPTION = _object({"ok": OK, "subscription": SUBSCRIPTION})
USAGE = _object(
    {
        "ok": OK,
        "user_id": STRING,
        "plan": {"enum": list(PLAN_NAMES)},
        "limit": COUNT,
        "used": COUNT,
        "reserved": COUNT,
        "remaining": COUNT,
        "credits": COUNT,
        "period": _object({"start": TIME, "end": TIME}),
        "period_start": TIME,
        "period_end": TIME,
        "alerts": {
            "type": "array",
            "items": _object({"threshold": {"type": "integer"}, "triggered_at": TIME}),
        },
        "source": {"enum": ["live", "recorded"]},
    }
)
COUNTED = {"tokens": COUNT, "calls": COUNT}
HISTORY = _object(
    {
        "ok": OK,
        "user_id": STRING,
        "from": DATE,
        "to": DATE,
        "total_tokens": COUNT,
        "days": {"type": "array", "items": _object({"date": DATE, **COUNTED})},
        "group_by": STRING,
        "groups": {"type": "array", "items": _object({"key": NULLABLE_STRING, **COUNTED})},
    },
    optional=("group_by", "groups"),
)
PAYMENT = _object(
    {
        "id": STRING,
        "status": {"enum": ["pending", "succeeded", "failed", "refunded"]},
        "amount": COUNT,
        "amount_refunded": COUNT,
        "currency": STRING,
        "plan": {"enum": [*PAID_PLANS, None]},
        "subscription_id": NULLABLE_STRING,
        "created_at": TIME,
        "hosted_invoice_url": NULLABLE_STRING,
        "invoice_pdf": NULLABLE_STRING,
    }
)
PAYMENTS = _object({"ok": OK, "payments": {"type": "array", "items": PAYMENT}, "has_more": BOOL})
WEBHOOK = _object(
    {"ok": OK, "event": STRING, "applied": BOOL, "replayed": {"const": True}},
    optional=("replayed",),
)
HEALTH = _object({"ok": OK, "status": {"const": "ok"}})
USER: list[dict[str, list[str]]] = [{"bearer": []}, {"session": []}]


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": required,
                    "properties": properties,
                }
            }
        },
    }


def _answers(ok: dict[str, Any], *errors: int, status: str = "200") -> dict[str, Any]:
    described = {status: {"description": "OK", "content": {"application/json": {"schema": ok}}}}
    for code in errors:
        described[str(code)] = {
            "description": "error",
            "content": {"application/json": {"schema": ERROR}},
        }
    return described


def _query(name: str, schema: dict[str, Any], doc: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": doc}


MUTATING = (400, 401, 409, 413, 415, 422, 429, 503)
PAID = {"enum": list(PAID_PLANS)}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Quota gateway billing API", "version": "1"},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "session": {"type": "apiKey", "in": "cookie", "name": "session"},
            }
        },
        "paths": {
            "/api/plans": {"get": {"summary": "The plan catalogue", "responses": _answers(PLANS)}},
            "/api/subscribe": {
                "post": {
                    "summary": "Buy a paid plan (one Stripe customer per user)",
                    "description": "402 when the first payment fails or needs 3-D Secure "
                    "(then `payment_status: requires_action` and `client_secret`); 409 only "
                    "when a paid subscription is already active (`subscription_id`, `plan`); "
                    "503 with `Retry-After` (the seconds left) while an earlier subscribe may "
                    "still be under way at Stripe or another change for the user is running.",
                    "security": USER,
                    "requestBody": _body(
                        {"plan": PAID, "payment_method": {"type": "string", "pattern": "^pm_"}},
                        ["plan"],
                    ),
                    "responses": _answers(OK_SUBSCRIPTION, 402, *MUTATING, status="201"),
                }
            },
            "/api/change-plan": {
                "post": {
                    "summary": "Upgrade or downgrade, prorated by Stripe; also keeps a "
                    "subscription set to cancel at the period end",
                    "security": USER,
                    "requestBody": _body({"plan": PAID}, ["plan"]),
                    "responses": _answers(OK_SUBSCRIPTION, 402, *MUTATING),
                }
            },
            "/api/cancel": {
                "post": {
                    "summary": "Cancel now or at the end of the period",
                    "security": USER,
                    "requestBody": _body({"at_period_end": BOOL}, ["at_period_end"]),
                    "responses": _answers(OK_SUBSCRIPTION, *MUTATING),
                }
            },
            "/api/subscription": {
                "get": {
                    "summary": "The subscription in force (FREE when none)",
                    "security": USER,
                    "responses": _answers(OK_SUBSCRIPTION, 401, 503),
                }
            },
            "/api/usage": {
                "get": {
                    "summary": "Plan, limit, used, reserved, remaining, period, alerts fired",
                    "security": USER,
                    "responses": _answers(USAGE, 401, 422, 503),
                }
            },
            "/api/usage/history": {
                "get": {
                    "summary": "Tokens per day, and totals per metadata value",
                    "security": USER,
                    "parameters": [
                        _query("from", DATE, "First day (UTC)"),
                        _query("to", DATE, "Last day (UTC)"),
                        _query("group_by", STRING, "A metadata key, e.g. conversation_id"),
                    ],
                    "responses": _answers(HISTORY, 401, 422, 503),
                }
            },
            "/api/payments": {
                "get": {
                    "summary": "Payment history, newest first",
                    "security": USER,
                    "parameters": [
                        _query("limit", {**INT, "minimum": 1, "maximum": PAGE_SIZE_MAX}, "Page"),
                        _query("starting_after", STRING, "Last payment id of the previous page"),
                    ],
                    "responses": _answers(PAYMENTS, 401, 422, 503),
                }
            },
            "/api/webhooks/stripe": {
                "post": {
                    "summary": "Stripe events, checked with STRIPE_WEBHOOK_SECRET",
                    "parameters": [{"name": "Stripe-Signature", "in": "header", "required": True}],
                    "responses": _answers(WEBHOOK, 400, 413, 422, 503),
                }
            },
            "/health": {"get": {"responses": _answers(HEALTH)}},
            "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text"}}}},
            "/openapi.json": {"get": {"responses": {"200": {"description": "This document"}}}},
        },
    }
