"""The outage journal: what one sidecar process journalled is applied once Redis is back, by
itself or, when it died, by another process sharing the directory; a live process's file is
never taken from it; a line that cannot be applied is skipped, counted and kept for an operator,
never a reason to stop applying the others. The fsync happens off the event loop."""

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from subprocess import PIPE
from typing import Any

import orjson
from prometheus_client import REGISTRY

from sidecar.outage import Journal

SET_ASIDE = "quota_journal_set_aside_entries_total"


def set_aside_so_far() -> float:
    return REGISTRY.get_sample_value(SET_ASIDE) or 0.0


def journal_files(directory: Path) -> list[Path]:
    """Every file in the directory, journals, .bad and all."""
    return sorted(directory.iterdir())


class Applied:
    """Records the entries a replay applies, refusing those marked "poison" as a check of the
    entry would."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, entry: dict[str, Any]) -> None:
        if entry.get("poison"):
            raise ValueError("not a journalled commit or refund")
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


async def test_a_burst_of_appends_does_not_wait_for_the_disk(tmp_path: Path) -> None:
    """500 appends in one event-loop turn: the loop only writes (the fsync runs on a thread, one
    for the whole burst), and each entry is on disk once its future is done."""
    journal = Journal(tmp_path)
    started = time.perf_counter()
    synced = [journal.append({"op": "commit", "reservation_id": f"r{i}"}) for i in range(500)]
    blocked_s = time.perf_counter() - started
    assert not any(future.done() for future in synced)
    # 500 fsyncs on this disk take over 100 ms; 500 page-cache writes a few.
    assert blocked_s < 0.05, blocked_s
    for future in synced:
        await future
    lines = journal.path.read_bytes().splitlines()
    assert [orjson.loads(line)["reservation_id"] for line in lines] == [f"r{i}" for i in range(500)]
    await journal.close()
