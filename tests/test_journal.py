"""The outage journal: what one sidecar process journalled is applied once Redis is back, by
itself or, when it died, by another process sharing the directory; a live process's file is
never taken from it."""

import contextlib
from pathlib import Path
from typing import Any

from sidecar.outage import Journal


async def test_own_entries_are_replayed_then_gone(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append({"op": "commit", "reservation_id": "r1"})
    journal.append({"op": "refund", "reservation_id": "r2"})
    applied: list[dict[str, Any]] = []

    async def apply(entry: dict[str, Any]) -> None:
        applied.append(entry)

    assert await journal.replay(apply) == 2
    assert [e["reservation_id"] for e in applied] == ["r1", "r2"]
    assert await journal.replay(apply) == 0
    journal.close()
    assert not journal.path.exists()


async def test_a_dead_process_journal_is_adopted_a_live_one_is_not(tmp_path: Path) -> None:
    dead, live, survivor = Journal(tmp_path), Journal(tmp_path), Journal(tmp_path)
    dead.append({"op": "commit", "reservation_id": "from-dead"})
    live.append({"op": "commit", "reservation_id": "from-live"})
    dead.file.close()  # the process died: its lock is gone, its file stays
    applied: list[str] = []

    async def apply(entry: dict[str, Any]) -> None:
        applied.append(entry["reservation_id"])

    assert await survivor.replay(apply) == 1
    assert applied == ["from-dead"]
    assert not dead.path.exists() and live.path.exists()


async def test_a_failed_replay_keeps_the_entries(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append({"op": "commit", "reservation_id": "r1"})

    async def fail(entry: dict[str, Any]) -> None:
        raise ConnectionError("Redis is still away")

    with contextlib.suppress(ConnectionError):
        await journal.replay(fail)
    seen: list[str] = []

    async def apply(entry: dict[str, Any]) -> None:
        seen.append(entry["reservation_id"])

    assert await journal.replay(apply) == 1 and seen == ["r1"]
