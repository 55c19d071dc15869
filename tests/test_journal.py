"""The outage journal: what one sidecar process journalled is applied once Redis is back, by
itself or, when it died, by another process sharing the directory; a live process's file is
never taken from it; a line that cannot be applied is skipped, counted and kept for an operator,
and an entry whose store is still away waits, neither ever a reason to stop applying the others.
The fsync happens off the event loop, and nothing that befalls it can leave a caller waiting."""

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from subprocess import PIPE
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from sidecar.outage import Journal
from tests.servers import eventually

SET_ASIDE = "quota_journal_set_aside_entries_total"


def set_aside_so_far() -> float:
    return REGISTRY.get_sample_value(SET_ASIDE) or 0.0


def journal_files(directory: Path) -> list[Path]:
    """Every file in the directory, journals, .bad and all."""
    return sorted(directory.iterdir())


class Applied:
    """Records the entries a replay applies, refusing those marked "poison" as a check of the
    entry would. The store of the users in `away` does not answer (a ConnectionError, as from
    their Redis master), nor does it for the first try of each reservation in `flaky`."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.away: set[str] = set()
        self.flaky: set[str] = set()

    async def __call__(self, entry: dict[str, Any]) -> None:
        if entry.get("poison"):
            raise ValueError("not a journalled commit or refund")
        if entry.get("user_id") in self.away:
            raise ConnectionError("this user's Redis master is away")
        if entry["reservation_id"] in self.flaky:
            self.flaky.discard(entry["reservation_id"])
            raise ConnectionError("the call timed out")
        self.ids.append(entry["reservation_id"])


async def test_own_entries_are_replayed_then_gone(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    await journal.append({"op": "commit", "reservation_id": "r1"})
    await journal.append({"op": "refund", "reservation_id": "r2"})
    applied = Applied()
    assert await journal.replay(applied) == 2
    assert applied.ids == ["r1", "r2"]
    assert await journal.replay(applied) == 0
    await journal.close()
    assert not journal.path.exists()
    assert journal_files(tmp_path) == []


async def test_a_dead_process_journal_is_adopted_a_live_one_is_not(tmp_path: Path) -> None:
    dead, live, survivor = Journal(tmp_path), Journal(tmp_path), Journal(tmp_path)
    await dead.append({"op": "commit", "reservation_id": "from-dead"})
    await live.append({"op": "commit", "reservation_id": "from-live"})
    dead.file.close()  # its lock is gone, its file stays (a real kill -9: test_failure_modes)
    applied = Applied()
    assert await survivor.replay(applied) == 1
    assert applied.ids == ["from-dead"]
    assert not dead.path.exists() and live.path.exists()


async def test_a_failed_replay_keeps_the_entries(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    await journal.append({"op": "commit", "reservation_id": "r1"})

    async def fail(entry: dict[str, Any]) -> None:
        raise ConnectionError("Redis is still away")

    for _ in range(3):  # retried rounds start no new file each
        with contextlib.suppress(ConnectionError):
            await journal.replay(fail)
    assert len(journal_files(tmp_path)) == 2  # the held one and the fresh one
    applied = Applied()
    assert await journal.replay(applied) == 1 and applied.ids == ["r1"]


async def test_unreadable_lines_are_skipped_counted_and_kept(tmp_path: Path) -> None:
    """A dead process's file with a corrupt line in the middle, an entry the check refuses, and a
    torn last line (what a power cut leaves): the good entries are applied, the file's bytes are
    kept as *.bad, and the next round does not see it again."""
    dead = Journal(tmp_path)
    for rid in ("a", "b"):
        await dead.append({"op": "commit", "reservation_id": rid})
    dead.file.write(b'{"op": "commit", "reserv\x00\xff garbage\n')
    await dead.append({"op": "commit", "reservation_id": "c"})
    await dead.append({"op": "commit", "reservation_id": "d", "poison": True})
    await dead.append({"op": "refund", "reservation_id": "e"})
    dead.file.write(b'{"op":"commit","reservation_id":"f","tok')
    dead.file.close()
    original = dead.path.read_bytes()
    before = set_aside_so_far()

    survivor = Journal(tmp_path)
    applied = Applied()
    assert await survivor.replay(applied) == 4
    assert applied.ids == ["a", "b", "c", "e"]
    assert set_aside_so_far() - before == 3
    kept = dead.path.with_name(dead.path.name + ".bad")
    assert kept.read_bytes() == original and not dead.path.exists()
    assert await survivor.replay(applied) == 0 and applied.ids == ["a", "b", "c", "e"]


async def test_a_file_the_disk_refuses_does_not_hold_up_the_others(tmp_path: Path) -> None:
    (tmp_path / "journal-1-1.jsonl").mkdir()  # opening it fails, as an unreadable file would
    dead = Journal(tmp_path)
    await dead.append({"op": "commit", "reservation_id": "from-dead"})
    dead.file.close()
    survivor = Journal(tmp_path)
    await survivor.append({"op": "commit", "reservation_id": "mine"})
    applied = Applied()
    assert await survivor.replay(applied) == 2
    assert sorted(applied.ids) == ["from-dead", "mine"]
    assert (tmp_path / "journal-1-1.jsonl").is_dir()


TORN_WRITER = """
import asyncio, resource, signal, sys
from pathlib import Path
from sidecar.outage import Journal

async def main() -> None:
    journal = Journal(Path(sys.argv[1]))
    await journal.append({"op": "commit", "reservation_id": "before"})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # The disk is full 10 bytes further on: the next write is cut short, then refused.
    resource.setrlimit(resource.RLIMIT_FSIZE, (journal.path.stat().st_size + 10, hard))
    try:
        journal.append({"op": "commit", "reservation_id": "refused", "pad": "x" * 100})
    except OSError as error:
        print(type(error).__name__)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    await journal.append({"op": "commit", "reservation_id": "after"})

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
asyncio.run(main())
"""


async def test_a_write_cut_short_does_not_swallow_the_next_entry(tmp_path: Path) -> None:
    """A real short write (the file size limit standing in for a full disk) leaves part of a
    line: the client of that entry heard an error, and the next entry still stands alone."""
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TORN_WRITER, str(tmp_path), stdout=PIPE, stderr=PIPE
    )
    out, err = await writer.communicate()
    assert writer.returncode == 0 and out.strip() == b"OSError", err
    (path,) = journal_files(tmp_path)
    assert b'"refused"' not in path.read_bytes()  # only part of that line was written
    applied = Applied()
    assert await Journal(tmp_path).replay(applied) == 2
    assert applied.ids == ["before", "after"]
    assert path.with_name(path.name + ".bad").exists()


async def test_a_burst_of_appends_does_not_wait_for_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 appends in one event-loop turn: the loop only writes, and one fsync, on a thread,
    covers the whole burst (the real one, counted); each entry is on disk once its future is
    done."""
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counted_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted_fsync)
    journal = Journal(tmp_path)
    started = time.perf_counter()
    synced = [journal.append({"op": "commit", "reservation_id": f"r{i}"}) for i in range(500)]
    blocked_s = time.perf_counter() - started
    assert not any(future.done() for future in synced)
    # 500 fsyncs on this disk take over 100 ms; 500 page-cache writes a few.
    assert blocked_s < 0.05, blocked_s
    for future in synced:
        await future
    assert fsyncs == [journal.file.fileno()]
    lines = journal.path.read_bytes().splitlines()
    assert [orjson.loads(line)["reservation_id"] for line in lines] == [f"r{i}" for i in range(500)]
    await journal.close()


async def test_a_cancelled_fsync_never_wedges_the_journal(tmp_path: Path) -> None:
    """The fsync task cancelled, as a shutdown cancels pending tasks: before its first step,
    then in the middle of an fsync. Every entry's future is done or failed at once (never left
    pending: a request awaiting it would hang), entries written since are fsynced, and
    close() works."""
    journal = Journal(tmp_path)
    first = journal.append({"op": "commit", "reservation_id": "first"})
    assert journal.syncing is not None
    journal.syncing.cancel()  # before it ever ran
    second = journal.append({"op": "commit", "reservation_id": "second"})
    async with asyncio.timeout(1):
        await first
        await second

    third = journal.append({"op": "commit", "reservation_id": "third"})
    # Checked every loop turn: cancelled while its fsync's thread runs, not after.
    await eventually(lambda: third in journal.in_flight, 1, "third's fsync", interval_s=0)
    journal.syncing.cancel()
    fourth = journal.append({"op": "commit", "reservation_id": "fourth"})
    async with asyncio.timeout(1):
        # An OSError: the commit handler answers 503 store_unavailable, and the client retries.
        with pytest.raises(InterruptedError):
            await third
        await fourth
        await journal.close()
    lines = journal.path.read_bytes().splitlines()
    assert [orjson.loads(line)["reservation_id"] for line in lines] == [
        "first",
        "second",
        "third",
        "fourth",
    ]


async def test_a_replay_makes_progress_under_continuous_appends(tmp_path: Path) -> None:
    """An append at every event-loop turn, so that an fsync is always under way: a replay still
    ends, having applied every entry written before it began, each only once its caller's
    future was done (the caller hears 200 before its entry can be applied)."""
    journal = Journal(tmp_path)
    written = {
        f"b{i}": journal.append({"op": "commit", "reservation_id": f"b{i}"}) for i in range(100)
    }
    stop = asyncio.Event()

    async def traffic() -> None:
        n = 0
        while not stop.is_set():
            journal.append({"op": "commit", "reservation_id": f"t{n}"})
            n += 1
            await asyncio.sleep(0)

    applied: list[str] = []

    async def apply(entry: dict[str, Any]) -> None:
        rid = entry["reservation_id"]
        assert rid not in written or written[rid].done()
        applied.append(rid)

    writer = asyncio.create_task(traffic())
    try:
        async with asyncio.timeout(5):
            await journal.replay(apply)
    finally:
        stop.set()
        await writer
    assert applied[:100] == list(written)
    await journal.close()


async def test_an_entry_whose_store_is_away_holds_up_no_other(tmp_path: Path) -> None:
    """One user's master is away and one call times out: every other entry, ours and a dead
    process's, is applied in the first round; the waiting ones in the next rounds, each
    reservation's in the order written (o3's refund never before its commit), and every entry
    exactly once. A round in which nothing could be applied rewrites nothing."""
    dead = Journal(tmp_path)
    await dead.append({"op": "commit", "user_id": "sick", "reservation_id": "d1"})
    await dead.append({"op": "commit", "user_id": "well", "reservation_id": "d2"})
    dead.file.close()
    ours = Journal(tmp_path)
    for op, user, rid in [
        ("commit", "sick", "o1"),
        ("commit", "well", "o2"),
        ("commit", "well", "o3"),
        ("refund", "well", "o3"),
        ("commit", "well", "o4"),
    ]:
        await ours.append({"op": op, "user_id": user, "reservation_id": rid})
    applied = Applied()
    applied.away = {"sick"}
    applied.flaky = {"o3"}

    assert await ours.replay(applied) == 3
    assert applied.ids == ["o2", "o4", "d2"] and ours.waiting == 4
    assert not dead.path.exists()  # its waiting entry moved to a file of ours

    assert await ours.replay(applied) == 2  # o3 now answers; the sick master still does not
    assert applied.ids[3:] == ["o3", "o3"] and ours.waiting == 2
    applied.away.clear()
    assert await ours.replay(applied) == 2
    assert applied.ids[5:] == ["o1", "d1"] and ours.waiting == 0
    assert await ours.replay(applied) == 0
    assert sorted(applied.ids) == ["d1", "d2", "o1", "o2", "o3", "o3", "o4"]
    assert journal_files(tmp_path) == [ours.path]


async def test_a_round_with_nothing_applied_rewrites_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    await journal.append({"op": "commit", "user_id": "sick", "reservation_id": "r1"})
    applied = Applied()
    applied.away = {"sick"}
    await journal.replay(applied)
    held = [path for path, _ in journal.held]
    for _ in range(3):
        assert await journal.replay(applied) == 0
    assert [path for path, _ in journal.held] == held and journal.waiting == 1
    assert journal_files(tmp_path) == sorted([*held, journal.path])


async def test_a_dead_file_that_cannot_be_removed_is_applied_once(tmp_path: Path) -> None:
    """A dead process's file with a line to set aside, and a directory where its `.bad` copy
    should go: the disk refuses the rename. Its good entry is applied once, not again at each
    round."""
    dead = Journal(tmp_path)
    await dead.append({"op": "commit", "reservation_id": "once"})
    dead.file.write(b"not json\n")
    dead.file.close()
    (tmp_path / f"{dead.path.name}.bad" / "in-the-way").mkdir(parents=True)
    survivor = Journal(tmp_path)
    applied = Applied()
    for _ in range(3):
        await survivor.replay(applied)
    assert applied.ids == ["once"] and dead.path.exists()


async def test_close_after_the_empty_file_was_removed(tmp_path: Path) -> None:
    """close() removes an empty file of ours while it still holds its lock, so that a sidecar
    sharing the directory cannot take it for a dead process's in between; and should the file
    be gone all the same (an operator's hand), close() still ends cleanly."""
    journal = Journal(tmp_path)
    other = Journal(tmp_path)
    assert await other.replay(Applied()) == 0 and journal.path.exists()  # locked: not taken
    journal.path.unlink()
    await journal.close()
    await other.close()
    assert journal_files(tmp_path) == []
