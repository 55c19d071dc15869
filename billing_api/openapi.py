"""The billing API's OpenAPI 3.1 document."""

from typing import Any

from billing_api.fields import PAGE_SIZE_MAX
from quota_common.plans import PAID_PLANS, PLAN_NAMES

STRING = {"type": "string"}
INT = {"type": "integer"}
TIME = {"type": "string", "format": "date-time"}
ERROR = {
    "type": "object",
    "required": ["ok", "error"],
    "properties": {
        "ok": {"const": False},
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": STRING, "message": STRING},
        },
    },
}
SUBSCRIPTION = {
    "type": "object",
    "properties": {
        "id": {"type": ["string", "null"]},
        "plan": {"enum": list(PLAN_NAMES)},
        "status": STRING,
        "current_period_start": TIME,
        "current_period_end": TIME,
        "cancel_at_period_end": {"type": "boolean"},
    },
}
OK_SUBSCRIPTION = {
    "type": "object",
    "properties": {"ok": {"const": True}, "subscription": SUBSCRIPTION},
}
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
            "/api/plans": {
                "get": {"summary": "The plan catalogue", "responses": _answers({"type": "object"})}
            },
            "/api/subscribe": {
                "post": {
                    "summary": "Buy a paid plan (one Stripe customer per user)",
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
                    "summary": "Upgrade or downgrade, prorated by Stripe",
                    "security": USER,
                    "requestBody": _body({"plan": PAID}, ["plan"]),
                    "responses": _answers(OK_SUBSCRIPTION, 402, *MUTATING),
                }
            },
            "/api/cancel": {
                "post": {
                    "summary": "Cancel now or at the end of the period",
                    "security": USER,
                    "requestBody": _body({"at_period_end": {"type": "boolean"}}, ["at_period_end"]),
                    "responses": _answers(OK_SUBSCRIPTION, *MUTATING),
                }
            },
            "/api/subscription": {
                "get": {
                    "summary": "The subscription in force (FREE when none)",
                    "security": USER,
                    "responses": _answers(OK_SUBSCRIPTION, 401),
                }
            },
            "/api/usage": {
                "get": {
                    "summary": "Plan, limit, used, reserved, remaining, period, alerts fired",
                    "security": USER,
                    "responses": _answers({"type": "object"}, 401, 503),
                }
            },
            "/api/usage/history": {
                "get": {
                    "summary": "Tokens per day, and totals per metadata value",
                    "security": USER,
                    "parameters": [
                        _query("from", {"type": "string", "format": "date"}, "First day (UTC)"),
                        _query("to", {"type": "string", "format": "date"}, "Last day (UTC)"),
                        _query("group_by", STRING, "A metadata key, e.g. conversation_id"),
                    ],
                    "responses": _answers({"type": "object"}, 401, 422),
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
                    "responses": _answers({"type": "object"}, 401, 422),
                }
            },
            "/api/webhooks/stripe": {
                "post": {
                    "summary": "Stripe events, checked with STRIPE_WEBHOOK_SECRET",
                    "parameters": [{"name": "Stripe-Signature", "in": "header", "required": True}],
                    "responses": _answers({"type": "object"}, 400, 413, 503),
                }
            },
            "/health": {"get": {"responses": _answers({"type": "object"})}},
            "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text"}}}},
            "/openapi.json": {"get": {"responses": {"200": {"description": "This document"}}}},
        },
    }
