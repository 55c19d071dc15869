"""Turning the scripts' answers ("a|b|c" strings, see the headers in lua/) into API bodies."""

from datetime import UTC, datetime
from typing import Any

from quota_common.periods import unix_rfc3339


def remaining(limit: int, used: int, reserved: int) -> int:
    return max(limit - used - reserved, 0)


def expires_rfc3339(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def reservation(reservation_id: str, user_id: str, answer: str, replayed: bool) -> dict[str, Any]:
    plan, granted, limit, used, reserved, ps, pe, expires = answer.split("|")
    lim, use, res = int(limit), int(used), int(reserved)
    return {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "plan": plan,
        "granted": int(granted),
        "limit": lim,
        "used": use,
        "reserved": res,
        "remaining": remaining(lim, use, res),
        "period_start": unix_rfc3339(ps),
        "period_end": unix_rfc3339(pe),
        "expires_at": expires_rfc3339(int(expires)),
        "replayed": replayed,
    }


def refusal(answer: str) -> tuple[dict[str, Any], int]:
    """The usage fields of a quota_exceeded error, and the seconds to the period's end."""
    plan, _, limit, used, reserved, _, pe, _ = answer.split("|")
    lim, use, res = int(limit), int(used), int(reserved)
    fields = {
        "plan": plan,
        "limit": lim,
        "used": use,
        "reserved": res,
        "remaining": remaining(lim, use, res),
        "period_end": unix_rfc3339(pe),
    }
    retry_after = max(int(pe) - int(datetime.now(UTC).timestamp()), 1)
    return fields, retry_after


def commit(reservation_id: str, user_id: str, answer: str, replayed: bool) -> dict[str, Any]:
    charged, released, used, reserved, limit, late, plan, ps, pe = answer.split("|")
    lim, use, res = int(limit), int(used), int(reserved)
    return {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "status": "committed",
        "charged": int(charged),
        "released": int(released),
        "plan": plan,
        "limit": lim,
        "used": use,
        "reserved": res,
        "remaining": remaining(lim, use, res),
        "period_start": unix_rfc3339(ps),
        "period_end": unix_rfc3339(pe),
        "late": late == "1",
        "replayed": replayed,
    }


def refund(reservation_id: str, user_id: str, answer: str, replayed: bool) -> dict[str, Any]:
    status, released, used, reserved, limit, plan, ps, pe = answer.split("|")
    lim, use, res = int(limit), int(used), int(reserved)
    return {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "status": status,
        "released": int(released),
        "plan": plan,
        "limit": lim,
        "used": use,
        "reserved": res,
        "remaining": remaining(lim, use, res),
        "period_start": unix_rfc3339(ps),
        "period_end": unix_rfc3339(pe),
        "replayed": replayed,
    }


def usage(user_id: str, answer: str) -> dict[str, Any]:
    plan, limit, used, reserved, credits, ps, pe = answer.split("|")
    lim, use, res = int(limit), int(used), int(reserved)
    return {
        "user_id": user_id,
        "plan": plan,
        "limit": lim,
        "used": use,
        "reserved": res,
        "remaining": remaining(lim, use, res),
        "credits": int(credits),
        "period_start": unix_rfc3339(ps),
        "period_end": unix_rfc3339(pe),
    }
