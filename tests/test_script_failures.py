"""A script that fails inside Redis (here: a user's state key holding the wrong type, as a
corrupted or foreign key would) is our bug, not an outage: the call answers 500 with a JSON
error, the breaker stays closed for every other user, and a commit is not journalled (a replay
would fail the same way forever)."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from quota_common.keys import user_keys
from tests.conftest import start_sidecar


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def sidecar(base_env: dict[str, str], logs_dir: Path, journal_dir: Path) -> Iterator[str]:
    process, url = start_sidecar(base_env, logs_dir, SIDECAR_JOURNAL_DIR=str(journal_dir))
    yield url
    process.stop()


async def test_a_failing_script_is_a_500_and_no_outage(
    sidecar: str, redis: Redis, journal_dir: Path
) -> None:
    await redis.set(user_keys("broken").state, "not a hash")
    async with httpx.AsyncClient(base_url=sidecar, timeout=10) as http:
        for _ in range(5):  # more than the breaker's failures to open
            response = await http.post("/v1/reserve", json={"user_id": "broken", "tokens": 5})
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "internal_error"
        body = {"user_id": "broken", "reservation_id": "r1", "tokens": 5}
        response = await http.post("/v1/commit", json=body)
        assert response.status_code == 500
        response = await http.post("/v1/reserve", json={"user_id": "healthy", "tokens": 5})
        assert response.status_code == 200, response.text
    assert journalled_bytes(journal_dir) == 0


def journalled_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir())
