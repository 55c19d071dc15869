"""Async client of the sidecar for chat services.

    async with QuotaClient("http://127.0.0.1:8700", token=...) as quota:
        async with quota.hold("user-42", tokens=4000, metadata={"conversation_id": "c1"}) as hold:
            answer = await llm(max_tokens=hold.granted)
            hold.used = answer.usage.total_tokens
    # committed on a clean exit, refunded when the block raised

Every call carries a reservation id chosen here, so a retry after a timeout is a replay, never a
second charge: calls that get no answer (or a 5xx) are retried a few times with backoff.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

log = logging.getLogger("sidecar.client")


class QuotaError(Exception):
    """The sidecar refused the call; `code` is the API's error code."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.body = body


class QuotaExceeded(QuotaError):
    """Not enough tokens left; `retry_after` is the seconds until the period ends."""

    def __init__(
        self, status: int, code: str, message: str, body: dict[str, Any], retry_after: int | None
    ) -> None:
        super().__init__(status, code, message, body)
        self.retry_after = retry_after


class QuotaUnavailable(QuotaError):
    """The sidecar or its store did not answer in time."""


@dataclass
class Hold:
    """An open reservation inside `QuotaClient.hold`; set `used` to what the LLM call spent."""

    reservation_id: str
    user_id: str
    granted: int
    reservation: dict[str, Any]
    used: int | None = None


class QuotaClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
        attempts_max: int = 3,
        backoff_s: float = 0.05,
    ) -> None:
        self.attempts_max = max(attempts_max, 1)
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout_s, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One call, retried while the sidecar does not answer: every call is idempotent (the
        reservation id makes a repeated reserve, commit or refund a replay)."""
        attempt = 1
        while True:
            try:
                return await self._call_once(method, path, body)
            except QuotaUnavailable:
                if attempt >= self.attempts_max:
                    raise
            await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            attempt += 1

    async def _call_once(
        self, method: str, path: str, body: dict[str, Any] | None
    ) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.TransportError as error:
            raise QuotaUnavailable(
                0, "unreachable", str(error) or type(error).__name__, {}
            ) from error
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            # Not an answer of the sidecar (a proxy's error page, say): as if it did not answer.
            raise QuotaUnavailable(
                response.status_code, "bad_response", f"HTTP {response.status_code}", {}
            )
        if response.status_code == 200:
            return payload
        detail = payload.get("error", {})
        args = (
            response.status_code,
            detail.get("code", "unknown"),
            detail.get("message", ""),
            payload,
        )
        if response.status_code == 429:
            retry_after = response.headers.get("retry-after")
            raise QuotaExceeded(*args, int(retry_after) if retry_after else None)
        if response.status_code >= 500:
            raise QuotaUnavailable(*args)
        raise QuotaError(*args)

    async def reserve(
        self,
        user_id: str,
        tokens: int,
        *,
        reservation_id: str | None = None,
        min_tokens: int | None = None,
        ttl_s: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "user_id": user_id,
            "tokens": tokens,
            "reservation_id": reservation_id or uuid.uuid4().hex,
        }
        optional = {"min_tokens": min_tokens, "ttl_s": ttl_s, "metadata": metadata}
        body.update({key: value for key, value in optional.items() if value is not None})
        return await self._call("POST", "/v1/reserve", body)

    async def extend(
        self, user_id: str, reservation_id: str, tokens: int, ttl_s: int | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "user_id": user_id,
            "reservation_id": reservation_id,
            "tokens": tokens,
        }
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return await self._call("POST", "/v1/extend", body)

    async def commit(
        self, user_id: str, reservation_id: str, tokens: int, metadata: dict[str, str] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "user_id": user_id,
            "reservation_id": reservation_id,
            "tokens": tokens,
        }
        if metadata is not None:
            body["metadata"] = metadata
        return await self._call("POST", "/v1/commit", body)

    async def refund(self, user_id: str, reservation_id: str) -> dict[str, Any]:
        return await self._call(
            "POST", "/v1/refund", {"user_id": user_id, "reservation_id": reservation_id}
        )

    async def usage(self, user_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/usage/{user_id}")

    @asynccontextmanager
    async def hold(self, user_id: str, tokens: int, **options: Any) -> AsyncIterator[Hold]:
        """Reserves on entry; commits `hold.used` (default: all granted) on a clean exit and
        refunds when the block raises. The block's own exception always reaches the caller: a
        refund that fails is logged (the hold then expires at its `expires_at`)."""
        reservation = await self.reserve(user_id, tokens, **options)
        hold = Hold(reservation["reservation_id"], user_id, reservation["granted"], reservation)
        try:
            yield hold
        except BaseException:
            try:
                await self.refund(user_id, hold.reservation_id)
            except Exception as error:
                log.warning(
                    "refund failed; the hold expires by itself",
                    extra={"reservation_id": hold.reservation_id, "error": str(error)},
                )
            raise
        used = hold.granted if hold.used is None else hold.used
        await self.commit(user_id, hold.reservation_id, used)
