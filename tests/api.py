"""Short calls to the sidecar's API for tests, returning (status, body)."""

from typing import Any

import httpx


async def post(http: httpx.AsyncClient, path: str, **body: Any) -> tuple[int, dict[str, Any]]:
    response = await http.post(path, json=body)
    return response.status_code, response.json()


async def reserve(
    http: httpx.AsyncClient, user_id: str, tokens: int, **fields: Any
) -> tuple[int, dict[str, Any]]:
    return await post(http, "/v1/reserve", user_id=user_id, tokens=tokens, **fields)


async def commit(
    http: httpx.AsyncClient, user_id: str, reservation_id: str, tokens: int, **fields: Any
) -> tuple[int, dict[str, Any]]:
    return await post(
        http, "/v1/commit", user_id=user_id, reservation_id=reservation_id, tokens=tokens, **fields
    )


async def refund(
    http: httpx.AsyncClient, user_id: str, reservation_id: str
) -> tuple[int, dict[str, Any]]:
    return await post(http, "/v1/refund", user_id=user_id, reservation_id=reservation_id)


async def extend(
    http: httpx.AsyncClient, user_id: str, reservation_id: str, tokens: int, **fields: Any
) -> tuple[int, dict[str, Any]]:
    return await post(
        http, "/v1/extend", user_id=user_id, reservation_id=reservation_id, tokens=tokens, **fields
    )


async def usage(http: httpx.AsyncClient, user_id: str) -> dict[str, Any]:
    response = await http.get(f"/v1/usage/{user_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
