"""What the sidecar does while Redis does not answer.

A circuit breaker keeps a dead or hanging Redis from costing every request its timeout: after a
few failures in a row calls fail at once, and one probe per cool-down tests whether Redis is
back. Reserves then follow FAIL_MODE: `closed` refuses (503 store_unavailable), `open` grants up
to FAIL_OPEN_BUDGET tokens per user per outage, marked degraded. Commits and refunds are never
lost: they go to an fsynced journal on local disk and are applied once Redis answers again.
"""

import asyncio
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import orjson
from prometheus_client import Counter
from redis.asyncio import RedisCluster
from redis.exceptions import RedisClusterException, RedisError, SlotNotCoveredError
from sqlalchemy.exc import SQLAlchemyError

from quota_common.scripts import AnyRedis

log = logging.getLogger("sidecar.outage")

# Failures that mean "Redis did not answer", as opposed to a refusal by a script. redis-py's
# cluster client raises RedisClusterException, which is no RedisError, when it cannot reach the
# cluster at all (no node answers, a slot has no master).
STORE_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
# ... or Postgres did not, when a user had to be loaded from it.
UNAVAILABLE = (*STORE_ERRORS, SQLAlchemyError)

JOURNAL_SET_ASIDE = Counter(
    "quota_journal_set_aside_entries_total",
    "Journal lines not applied (unreadable, or not a commit or refund) and kept in a *.bad file.",
)


class StoreUnavailable(RedisError):
    """The breaker is open: Redis was not even tried."""


class JournalError(Exception):
    """The journal's own disk failed: logged, never taken for Redis being away (an OSError
    would be, and would go unnoticed)."""


class Breaker:
    def __init__(self, failures_to_open: int = 3, cooldown_s: float = 1.0) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.retry_at = 0.0
        self.budgets: dict[str, int] = {}
        # Degraded grants of this outage by (user, reservation id), so retries replay them.
        self.grants: dict[tuple[str, str], tuple[tuple[int, int, int], dict[str, Any]]] = {}

    @property
    def open(self) -> bool:
        return self.failures >= self.failures_to_open

    def check(self) -> None:
        """Raises StoreUnavailable while open, except for one probe per cool-down."""
        if not self.open:
            return
        now = time.monotonic()
        if now < self.retry_at:
            raise StoreUnavailable("circuit open: Redis failed recently")
        self.retry_at = now + self.cooldown_s

    def succeeded(self) -> None:
        if self.failures:
            if self.open:
                log.warning("store back", extra={"failures": self.failures})
            self.failures = 0
            self.budgets.clear()
            self.grants.clear()

    def failed(self) -> None:
        self.failures += 1
        if self.failures == self.failures_to_open:
            log.warning("store unavailable: circuit open", extra={"cooldown_s": self.cooldown_s})
            self.retry_at = time.monotonic() + self.cooldown_s

    def spend_budget(self, user_id: str, tokens: int, min_tokens: int, budget: int) -> int:
        """Tokens FAIL_MODE=open grants this user now, by the rules of a reserve (all, or what is
        left when that is at least min_tokens); 0 when the outage budget cannot cover it."""
        left = budget - self.budgets.get(user_id, 0)
        granted = tokens if tokens <= left else left if 0 < min_tokens <= left else 0
        if granted:
            self.budgets[user_id] = budget - left + granted
        return granted


class Breakers:
    """The breakers of one store: a single Redis has one; a cluster has one per master, so a
    sick master fails fast for the users whose slots it holds and no one else. A slot that moves
    to another master (a failover) gets that master's breaker."""

    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        self.single = None if isinstance(redis, RedisCluster) else Breaker()
        self.by_master: dict[str, Breaker] = {}

    def for_key(self, key: str) -> Breaker:
        if self.single is not None:
            return self.single
        master = master_of(self.redis, key)
        breaker = self.by_master.get(master)
        if breaker is None:
            breaker = self.by_master[master] = Breaker()
        return breaker


def master_of(redis: AnyRedis, key: str) -> str:
    """The name ("host:port") of the cluster master that holds the key's slot; "" on a single
    Redis, and on a cluster whose slot map the client has not read yet (down since the start)."""
    if not isinstance(redis, RedisCluster):
        return ""
    try:
        node = redis.get_node_from_key(key)
    except SlotNotCoveredError:
        return ""
    return node.name if node is not None else ""


Replay = Callable[[dict[str, Any]], Awaitable[None]]


class Journal:
    """Commits and refunds taken while Redis was away: one JSON line each, fsynced before the
    client hears 200. Each process writes its own file and holds a lock on it; a file whose lock
    is free belongs to a process that died, and is replayed by whoever finds it. A line that
    cannot be applied (torn by a full disk or a power cut, or not an entry at all) is skipped,
    and its file kept as `<name>.bad` for an operator once the rest is applied."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path, self.file = self._open()
        self.pending = 0
        # Our own files whose replay failed half-way (Redis went away again): retried first.
        self.held: list[tuple[Path, IO[bytes]]] = []
        # A write failed: the file may end in part of a line.
        self.torn = False
        self.unsynced: list[asyncio.Future[None]] = []
        self.syncing: asyncio.Task[None] | None = None
        # Dead processes' files the disk refused us, logged once each.
        self.skipped: set[Path] = set()

    def _open(self) -> tuple[Path, IO[bytes]]:
        # Locked under a name the orphan scan ignores, then renamed: another process can never
        # take a fresh file for a dead process's and delete it under us.
        name = f"journal-{os.getpid()}-{time.time_ns()}.jsonl"
        opening = self.directory / f"opening-{name}"
        # Unbuffered: a failed write must not leave bytes in a buffer for the next one to flush.
        file = opening.open("ab", buffering=0)
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = self.directory / name
        opening.rename(path)
        return path, file

    def append(self, entry: dict[str, Any]) -> "asyncio.Future[None]":
        """Writes the entry now (an OSError means it is not journalled) and returns what to
        await before answering: done once the entry is on disk. One fsync, on a thread, covers
        every entry written while the previous one ran, so a burst of journalled commits costs
        a few fsyncs and never stalls the event loop."""
        line = orjson.dumps(entry) + b"\n"
        if self.torn:
            # End the part-line a failed write may have left, so it cannot swallow this entry.
            line = b"\n" + line
        try:
            write_all(self.file, line)
        except OSError:
            self.torn = True
            raise
        self.torn = False
        self.pending += 1
        synced = asyncio.get_running_loop().create_future()
        self.unsynced.append(synced)
        if self.syncing is None:
            self.syncing = asyncio.create_task(self._sync())
        return synced

    async def _sync(self) -> None:
        while self.unsynced:
            waiting, self.unsynced = self.unsynced, []
            try:
                await asyncio.to_thread(os.fsync, self.file.fileno())
                failure: OSError | None = None
            except OSError as error:
                failure = error
            for synced in waiting:
                if synced.done():
                    continue
                if failure is None:
                    synced.set_result(None)
                else:
                    synced.set_exception(failure)
        self.syncing = None

    async def _synced(self) -> None:
        # Shielded: a replay cancelled at shutdown must not cancel the fsync others await.
        while self.syncing is not None:
            await asyncio.shield(self.syncing)

    async def replay(self, apply: Replay) -> int:
        """Applies every journalled entry, ours first, then dead processes'; returns how many.
        An outage error (UNAVAILABLE) from `apply` stops the replay and keeps the file; any
        other error sets that entry aside. A file of ours the disk fails on raises JournalError;
        a dead process's is skipped (logged once) so that it cannot hold up the others."""
        done = await self._replay_own(apply)
        for path in self.directory.glob("journal-*.jsonl"):
            if path == self.path:
                continue
            try:
                done += await self._adopt(path, apply)
            except JournalError as error:
                if path not in self.skipped:
                    self.skipped.add(path)
                    log.error("journal file skipped", extra={"error": str(error)})
        return done

    async def _replay_own(self, apply: Replay) -> int:
        done = 0
        for path, file in list(self.held):
            done += await self._replay_file(path, apply)
            file.close()
            self.held.remove((path, file))
        if self.pending:
            # New entries go to a fresh file while this one is replayed; the entries written so
            # far are fsynced first, so their callers hear 200 before the file can go away.
            await self._synced()
            try:
                fresh = self._open()
            except OSError as error:
                raise JournalError(f"cannot start a journal file: {error}") from error
            self.held.append((self.path, self.file))
            self.path, self.file = fresh
            self.pending = 0
            self.torn = False
            path, file = self.held[-1]
            done += await self._replay_file(path, apply)
            file.close()
            self.held.pop()
        return done

    async def _adopt(self, path: Path, apply: Replay) -> int:
        """Replays a file whose lock is free: its process died."""
        try:
            orphan = path.open("rb")
        except FileNotFoundError:
            return 0  # another process replayed it just now
        except OSError as error:
            raise JournalError(f"cannot open {path}: {error}") from error
        with orphan:
            try:
                fcntl.flock(orphan, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live process owns it
            if not still_named(path, orphan):
                return 0  # replayed and removed while we waited for the lock
            return await self._replay_file(path, apply)

    @staticmethod
    async def _replay_file(path: Path, apply: Replay) -> int:
        """Applies a file's entries, then removes it. Entries are idempotent (commit/refund by
        reservation id), so a replay cut short by an outage or a crash is simply run again."""
        try:
            lines = read_lines(path)
        except OSError as error:
            raise JournalError(f"cannot read {path}: {error}") from error
        set_aside: list[tuple[int, str]] = []
        done = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = orjson.loads(line)
                if not isinstance(entry, dict):
                    raise TypeError("not a JSON object")
                await apply(entry)
            except UNAVAILABLE:
                raise
            except Exception as error:
                set_aside.append((number, f"{type(error).__name__}: {error}"))
                continue
            done += 1
        try:
            remove_replayed(path, set_aside)
        except OSError as error:
            raise JournalError(f"cannot remove {path} once replayed: {error}") from error
        return done

    async def close(self) -> None:
        await self._synced()
        for _, file in self.held:
            file.close()  # kept on disk, unlocked: the next process replays it
        self.file.close()
        if self.path.stat().st_size == 0:
            self.path.unlink()


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


def remove_replayed(path: Path, set_aside: list[tuple[int, str]]) -> None:
    """Deletes a replayed file or, when lines of it could not be applied, keeps its bytes as
    `<name>.bad` (a name the orphan scan ignores) for an operator."""
    if not set_aside:
        path.unlink()
        return
    bad = path.with_name(f"{path.name}.bad")
    path.rename(bad)
    for number, reason in set_aside:
        # Not the line itself: it holds the client's metadata.
        log.error(
            "journal line set aside",
            extra={"file": str(bad), "line": number, "reason": reason[:200]},
        )
    JOURNAL_SET_ASIDE.inc(len(set_aside))


def write_all(file: IO[bytes], data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[file.write(view) :]


def still_named(path: Path, file: IO[bytes]) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False
