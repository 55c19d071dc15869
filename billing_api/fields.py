"""Request bodies and query strings of the billing API, checked strictly: an unknown field or
parameter is refused, so a client's typo fails loudly instead of being ignored."""

import re
from datetime import date, timedelta
from typing import Any

from starlette.datastructures import QueryParams

from quota_common.codes import invalid
from quota_common.plans import PAID_PLANS, PLAN_NAMES

PAYMENT_METHOD_RE = re.compile(r"^pm_[A-Za-z0-9_]{1,250}$")
STRIPE_ID_RE = re.compile(r"^[A-Za-z0-9_]{1,255}$")
METADATA_KEY_CHARS_MAX = 64
PAGE_SIZE_DEFAULT = 10
PAGE_SIZE_MAX = 100
HISTORY_DAYS_MAX = 366


def _object(body: object, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    unknown = sorted(key for key in body if key not in allowed)
    if unknown:
        raise invalid(f"unknown field: {unknown[0]}")
    return body


def _plan(value: object) -> str:
    if value is None:
        raise invalid("plan is required")
    if not isinstance(value, str) or value not in PLAN_NAMES:
        raise invalid(f"plan must be one of {', '.join(PLAN_NAMES)}")
    if value not in PAID_PLANS:
        raise invalid("FREE needs no subscription; use /api/cancel to return to it")
    return value


def subscribe_body(body: object) -> tuple[str, str | None]:
    fields = _object(body, ("plan", "payment_method"))
    payment_method = fields.get("payment_method")
    if payment_method is not None and (
        not isinstance(payment_method, str) or not PAYMENT_METHOD_RE.fullmatch(payment_method)
    ):
        raise invalid("payment_method must be a Stripe PaymentMethod id (pm_...)")
    return _plan(fields.get("plan")), payment_method


def change_plan_body(body: object) -> str:
    return _plan(_object(body, ("plan",)).get("plan"))


def cancel_body(body: object) -> bool:
    value = _object(body, ("at_period_end",)).get("at_period_end")
    if type(value) is not bool:
        raise invalid("at_period_end must be true or false")
    return value


def _query(params: QueryParams, allowed: tuple[str, ...]) -> dict[str, str]:
    unknown = sorted(key for key in params if key not in allowed)
    if unknown:
        raise invalid(f"unknown query parameter: {unknown[0]}")
    if any(len(params.getlist(key)) > 1 for key in params):
        raise invalid("each query parameter may be given once")
    return dict(params)


def _date(value: str | None, name: str) -> date | None:
    if value is None:
        return None
    try:
        if len(value) != 10:
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise invalid(f"{name} must be a date like 2026-01-31") from None


def history_query(params: QueryParams) -> tuple[date | None, date | None, str | None]:
    query = _query(params, ("from", "to", "group_by"))
    start, end = _date(query.get("from"), "from"), _date(query.get("to"), "to")
    if (start is None) != (end is None):
        raise invalid("give both from and to, or neither (the current period)")
    if start is not None and end is not None:
        if end < start:
            raise invalid("to must not be before from")
        if end >= date.max - timedelta(days=1):
            raise invalid("to must be a date before 9999-12-30")
        if (end - start).days + 1 > HISTORY_DAYS_MAX:
            raise invalid(f"at most {HISTORY_DAYS_MAX} days at a time")
    group_by = query.get("group_by")
    if group_by is not None and (
        not 1 <= len(group_by) <= METADATA_KEY_CHARS_MAX or not group_by.isprintable()
    ):
        # isprintable: Postgres refuses NUL in text, which must be a 422 and not a 503.
        raise invalid(
            f"group_by must be a metadata key of 1-{METADATA_KEY_CHARS_MAX} printable characters"
        )
    return start, end, group_by


def payments_query(params: QueryParams) -> tuple[int, str | None]:
    query = _query(params, ("limit", "starting_after"))
    raw = query.get("limit")
    limit = PAGE_SIZE_DEFAULT
    if raw is not None:
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= PAGE_SIZE_MAX:
            raise invalid(f"limit must be a whole number from 1 to {PAGE_SIZE_MAX}")
        limit = int(raw)
    after = query.get("starting_after")
    if after is not None and not STRIPE_ID_RE.fullmatch(after):
        raise invalid("starting_after must be a payment id from a previous page")
    return limit, after
