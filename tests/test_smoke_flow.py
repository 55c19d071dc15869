"""The chat flow end to end over HTTP: reserve, commit, usage."""

import httpx

from tests.api import commit, reserve, usage


async def test_reserve_then_commit_charges_what_was_used(http: httpx.AsyncClient) -> None:
    status, hold = await reserve(http, "alice", 1000, reservation_id="r1")
    assert status == 200
    assert hold["granted"] == 1000 and hold["plan"] == "FREE" and hold["limit"] == 100_000
    assert hold["reserved"] == 1000 and hold["remaining"] == 99_000 and not hold["replayed"]

    status, done = await commit(http, "alice", "r1", 600)
    assert status == 200
    assert done["charged"] == 600 and done["released"] == 400 and done["late"] is False

    now = await usage(http, "alice")
    assert (now["used"], now["reserved"], now["remaining"]) == (600, 0, 99_400)
