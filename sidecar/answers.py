"""Turning the scripts' answers into API bodies: the hot scripts' values ({code, value...}, see
the headers in lua/) and usage.lua's "a|b|c" string."""

from datetime import UTC, datetime
from typing import Any

from quota_common.periods import calendar_month, rfc3339, unix_rfc3339


def remaining(limit: int, used: int, reserved: int) -> int:
    return max(limit - used - reserved, 0)


def expires_rfc3339(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    return f"{unix_rfc3339(seconds)[:-1]}.{millis:03d}Z"


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def period_usage(
    plan: Any, limit: Any, used: Any, reserved: Any, ps: Any, pe: Any
) -> dict[str, Any]:
    """The usage fields every answer carries, from a script's values (ints, or bytes/str of
    digits where they come from a stored answer)."""
    lim, use, res = int(limit), int(used), int(reserved)
    return {
        "plan": text(plan),
        "limit": lim,
        "used": use,
        "reserved": res,
        "remaining": remaining(lim, use, res),
        "period_start": unix_rfc3339(int(ps)),
        "period_end": unix_rfc3339(int(pe)),
    }


def reservation(
    reservation_id: str, user_id: str, values: list[Any], replayed: bool
) -> dict[str, Any]:
    """reserve.lua's and extend.lua's values: plan, granted, limit, used, reserved, ps, pe,
    expires_ms (extend adds one more)."""
    plan, granted, limit, used, reserved, ps, pe, expires = values[:8]
    return {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "granted": int(granted),
        **period_usage(plan, limit, used, reserved, ps, pe),
        "expires_at": expires_rfc3339(int(expires)),
        "replayed": replayed,
    }


def refusal(values: list[Any]) -> tuple[dict[str, Any], int]:
    """The usage fields of a quota_exceeded error, and the seconds to the period's end."""
    plan, _, limit, used, reserved, ps, pe = values[:7]
    fields = period_usage(plan, limit, used, reserved, ps, pe)
    del fields["period_start"]
    retry_after = max(int(pe) - int(datetime.now(UTC).timestamp()), 1)
    return fields, retry_after


def commit(reservation_id: str, user_id: str, values: list[Any], replayed: bool) -> dict[str, Any]:
    """commit.lua's values: charged, released, used, reserved, limit, late, plan, ps, pe, held."""
    charged, released, used, reserved, limit, late, plan, ps, pe, _ = values
    return {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "status": "committed",
        "charged": int(charged),
        "released": int(released),
        **period_usage(plan, limit, used, reserved, ps, pe),
        "late": int(late) == 1,
        "replayed": replayed,
    }


def commit_held(values: list[Any]) -> int:
    """The tokens the committed hold had (0 for a late commit)."""
    return int(values[9])


def refund(reservation_id: str, user_id: str, values: list[Any], replayed: bool) -> dict[str, Any]:
    """refund.lua's values: status, released, used, reserved, limit, plan, ps, pe."""
    status, released, used, reserved, limit, plan, ps, pe = values
    return {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "status": text(status),
        "released": int(released),
        **period_usage(plan, limit, used, reserved, ps, pe),
        "replayed": replayed,
    }


def usage(user_id: str, answer: str) -> dict[str, Any]:
    """usage.lua's answer "plan|limit|used|reserved|credits|ps|pe"."""
    plan, limit, used, reserved, credits, ps, pe = answer.split("|")
    return {
        "user_id": user_id,
        **period_usage(plan, limit, used, reserved, ps, pe),
        "credits": int(credits),
    }


def degraded_reservation(
    reservation_id: str, user_id: str, granted: int, budget: int, spent: int, ttl_ms: int
) -> dict[str, Any]:
    """FAIL_MODE=open while Redis is away: the outage budget stands in for the plan."""
    start, end = calendar_month(datetime.now(UTC))
    expires_ms = int(datetime.now(UTC).timestamp() * 1000) + ttl_ms
    return {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "plan": "UNKNOWN",
        "granted": granted,
        "limit": budget,
        "used": 0,
        "reserved": spent,
        "remaining": remaining(budget, 0, spent),
        "period_start": rfc3339(start),
        "period_end": rfc3339(end),
        "expires_at": expires_rfc3339(expires_ms),
        "replayed": False,
        "degraded": True,
    }


def journalled(reservation_id: str, user_id: str, status: str, tokens: int) -> dict[str, Any]:
    """A commit or refund kept in the journal until Redis is back: usage figures unknown."""
    start, end = calendar_month(datetime.now(UTC))
    body: dict[str, Any] = {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "status": status,
        "plan": "UNKNOWN",
        "limit": 0,
        "used": 0,
        "reserved": 0,
        "remaining": 0,
        "period_start": rfc3339(start),
        "period_end": rfc3339(end),
        "released": 0,
        "replayed": False,
        "degraded": True,
    }
    if status == "committed":
        body.update(charged=tokens, late=False)
    return body
