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
from dataclasses import dataclass, field
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
    "Journal lines not applied (unreadable, not a commit or refund, or refused by the ledger)"
    " and kept in a *.bad file.",
)


class StoreUnavailable(RedisError):
    """The breaker is open: Redis was not even tried."""


class JournalError(Exception):
    """The journal's own disk failed: logged, never taken for Redis being away (an OSError
    would be, and would go unnoticed)."""


class Breaker:
    def __init__(
        self,
        on_success: Callable[[], None],
        failures_to_open: int = 3,
        cooldown_s: float = 1.0,
    ) -> None:
        self.on_success = on_success
        self.failures_to_open = failures_to_open
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.retry_at = 0.0

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
        self.on_success()

    def failed(self) -> None:
        self.failures += 1
        if self.failures == self.failures_to_open:
            log.warning("store unavailable: circuit open", extra={"cooldown_s": self.cooldown_s})
            self.retry_at = time.monotonic() + self.cooldown_s


class OutageBudget:
    """What FAIL_MODE=open granted in the outage under way: tokens per user, and each grant by
    (user, reservation id) so that a retry replays it. One per process, whatever breaker a
    user's calls go through: a user whose slot moves to another master mid-outage (a failover,
    or "" before the slot map was read) is still granted FAIL_OPEN_BUDGET once."""

    def __init__(self) -> None:
        self.spent: dict[str, int] = {}
        self.grants: dict[tuple[str, str], tuple[tuple[int, int, int], dict[str, Any]]] = {}

    def spend(self, user_id: str, tokens: int, min_tokens: int, budget: int) -> int:
        """Tokens granted to this user now, by the rules of a reserve (all, or what is left
        when that is at least min_tokens); 0 when the outage budget cannot cover it."""
        left = budget - self.spent.get(user_id, 0)
        granted = tokens if tokens <= left else left if 0 < min_tokens <= left else 0
        if granted:
            self.spent[user_id] = budget - left + granted
        return granted

    def end(self) -> None:
        self.spent.clear()
        self.grants.clear()


class Breakers:
    """The breakers of one store: a single Redis has one; a cluster has one per master, so a
    sick master fails fast for the users whose slots it holds and no one else. A slot that moves
    to another master (a failover) gets that master's breaker, and the breakers of masters the
    slot map no longer names are dropped then. The outage, and with it the budget, ends at the
    first call that succeeds while no breaker counts a failure: a user is granted the budget
    once in any stretch of time in which some master of the store kept failing."""

    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        self.outage = OutageBudget()
        self.single = None if isinstance(redis, RedisCluster) else Breaker(self._succeeded)
        self.by_master: dict[str, Breaker] = {}

    def for_key(self, key: str) -> Breaker:
        if self.single is not None:
            return self.single
        master = master_of(self.redis, key)
        breaker = self.by_master.get(master)
        if breaker is None:
            breaker = self.by_master[master] = Breaker(self._succeeded)
            self._prune(master)
        return breaker

    def _prune(self, new: str) -> None:
        # A master seen for the first time means the slot map changed: the masters it no
        # longer names (the one failed over, or "" once the map is read) lose their breakers.
        primaries = self.redis.get_primaries() if isinstance(self.redis, RedisCluster) else []
        masters = {node.name for node in primaries} | {new}
        for name in [name for name in self.by_master if name not in masters]:
            del self.by_master[name]

    def _succeeded(self) -> None:
        if not self.outage.spent:
            return  # the common case, on the hot path: no outage under way
        breakers = self.by_master.values() if self.single is None else [self.single]
        if not any(breaker.failures for breaker in breakers):
            self.outage.end()


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
# A reservation as its journal entries name it (user id, reservation id).
Reservation = tuple[str, str]


class EntryRefused(Exception):
    """The ledger refused a journalled entry whose client heard 200 (an idempotency conflict,
    say): the entry is set aside for an operator, as an unreadable line is."""


@dataclass(slots=True)
class Round:
    """One replay of the whole journal."""

    apply: Replay
    applied: int = 0
    # Reservations with an entry waiting for the store: their later entries wait behind it.
    blocked: set[Reservation] = field(default_factory=set)
    waiting: int = 0


@dataclass(slots=True)
class FileReplay:
    """What one replay of a journal file did with its lines."""

    applied: int = 0
    # Lines whose entries cannot be applied yet, in the order written.
    waiting: list[bytes] = field(default_factory=list)
    # (line number, why) of the lines kept for an operator.
    set_aside: list[tuple[int, str]] = field(default_factory=list)


class Journal:
    """Commits and refunds taken while Redis was away: one JSON line each, fsynced before the
    client hears 200. Each process writes its own file and holds a lock on it; a file whose lock
    is free belongs to a process that died, and is replayed by whoever finds it. A line that
    cannot be applied (torn by a full disk or a power cut, not an entry at all, or refused by
    the ledger) is skipped, and its file kept as `<name>.bad` for an operator once the rest is
    applied. An entry whose store is away waits for the next round without holding up any
    other (see `replay`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path, self.file = self._open()
        self.pending = 0
        # Files of ours, oldest first, whose entries wait for their store.
        self.held: list[tuple[Path, IO[bytes]]] = []
        # A write failed: the file may end in part of a line.
        self.torn = False
        # The futures of entries written to self.file that no fsync covers yet, and of those
        # the fsync under way covers.
        self.unsynced: list[asyncio.Future[None]] = []
        self.in_flight: list[asyncio.Future[None]] = []
        self.syncing: asyncio.Task[None] | None = None
        # Entries the last replay left waiting for their store.
        self.waiting = 0
        # Dead processes' files the disk refused us, logged once each.
        self.skipped: set[Path] = set()
        # Files applied that the disk would not let us remove, by identity: never applied again.
        self.stuck: dict[Path, tuple[int, ...]] = {}

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
        await before answering: done once the entry is on disk, failed when it may not be. One
        fsync, on a thread, covers every entry written while the previous one ran, so a burst
        of journalled commits costs a few fsyncs and never stalls the event loop."""
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
        if self.syncing is None or self.syncing.done():
            self._start_sync()
        return synced

    def _start_sync(self) -> None:
        self.syncing = asyncio.create_task(self._sync())
        self.syncing.add_done_callback(self._sync_ended)

    async def _sync(self) -> None:
        while self.unsynced:
            self.in_flight, self.unsynced = self.unsynced, []
            await fsync_entries(self.file, self.in_flight)

    def _sync_ended(self, task: "asyncio.Task[None]") -> None:
        """Whatever ended the fsync task (cancelled at a shutdown, even before its first step,
        or an error of the thread pool), no entry waits for an fsync that will never come: the
        batch under way has failed (`fsync_entries`), and entries written since get a task of
        their own."""
        if not task.cancelled() and task.exception() is not None:
            log.error("journal fsync failed", extra={"error": repr(task.exception())})
        if self.syncing is task and self.unsynced:
            self._start_sync()

    async def _rotate(self) -> None:
        """New entries go to a fresh file; the current one joins the held files once every
        entry written to it is on disk, so that their callers hear 200 before it can be applied
        and removed. That takes an fsync for the entries no fsync covers yet and the end of the
        one under way: never a pause between appends, which steady traffic may never leave."""
        try:
            fresh = self._open()
        except OSError as error:
            raise JournalError(f"cannot start a journal file: {error}") from error
        path, file = self.path, self.file
        unsynced, in_flight = self.unsynced, self.in_flight
        self.path, self.file = fresh
        self.unsynced, self.pending, self.torn = [], 0, False
        self.held.append((path, file))
        await fsync_entries(file, unsynced)
        if in_flight:
            await asyncio.wait(in_flight)

    async def replay(self, apply: Replay) -> int:
        """Applies every journalled entry that can be applied now, ours first (oldest first),
        then dead processes'; returns how many. An entry `apply` fails with an outage error
        (UNAVAILABLE: its Redis master, or Postgres, is away) waits for the next round in a
        file of ours, and every later entry of its reservation waits behind it, so that a
        reservation's entries keep their order; it holds up no other entry. Any other error
        sets the entry aside. Entries are idempotent (commits and refunds by reservation id),
        so a round cut short by a crash is simply run again. A disk failure is logged (once,
        for a dead process's file) and never raised: it cannot hold up the other files."""
        round_ = Round(apply)
        await self._replay_own(round_)
        self.skipped = {path for path in self.skipped if path.exists()}
        self.stuck = {path: known for path, known in self.stuck.items() if path.exists()}
        for path in sorted(self.directory.glob("journal-*.jsonl")):
            if path == self.path:
                continue
            try:
                await self._adopt(path, round_)
            except JournalError as error:
                if path not in self.skipped:
                    self.skipped.add(path)
                    log.error("journal file skipped", extra={"error": str(error)})
        self.waiting = round_.waiting
        return round_.applied

    async def _replay_own(self, round_: Round) -> None:
        try:
            if self.pending:
                await self._rotate()
        except JournalError as error:
            log.error("journal file not replayed", extra={"error": str(error)})
        for held in list(self.held):
            path, file = held
            try:
                replayed = await self._replay_file(path, round_)
                if replayed.waiting and not (replayed.applied or replayed.set_aside):
                    continue  # unchanged: held as it is for the next round
                moved = await self._dispose(path, file, replayed)
            except JournalError as error:
                log.error("journal file not replayed", extra={"error": str(error)})
                continue
            index = self.held.index(held)
            if moved is None:
                del self.held[index]
            else:
                self.held[index] = moved
            file.close()

    async def _adopt(self, path: Path, round_: Round) -> None:
        """Replays a file whose lock is free (its process died); what waits moves to ours."""
        try:
            orphan = path.open("rb")
        except FileNotFoundError:
            return  # another process replayed it just now
        except OSError as error:
            raise JournalError(f"cannot open {path}: {error}") from error
        with orphan:
            try:
                fcntl.flock(orphan, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a live process owns it
            if not still_named(path, orphan) or self.stuck.get(path) == identity(orphan):
                return  # replayed and removed while we waited for the lock, or applied already
            replayed = await self._replay_file(path, round_)
            moved = await self._dispose(path, orphan, replayed)
        if moved is not None:
            self.held.append(moved)

    @staticmethod
    async def _replay_file(path: Path, round_: Round) -> FileReplay:
        try:
            lines = read_lines(path)
        except OSError as error:
            raise JournalError(f"cannot read {path}: {error}") from error
        replayed = FileReplay()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = parse_entry(line)
            except ValueError as error:
                replayed.set_aside.append((number, f"{type(error).__name__}: {error}"))
                continue
            reservation = (str(entry.get("user_id")), str(entry.get("reservation_id")))
            if reservation in round_.blocked:
                replayed.waiting.append(line)
                continue
            try:
                await round_.apply(entry)
            except UNAVAILABLE:
                round_.blocked.add(reservation)
                replayed.waiting.append(line)
                continue
            except Exception as error:
                replayed.set_aside.append((number, f"{type(error).__name__}: {error}"))
                continue
            replayed.applied += 1
        round_.applied += replayed.applied
        round_.waiting += len(replayed.waiting)
        return replayed

    async def _dispose(
        self, path: Path, file: IO[bytes], replayed: FileReplay
    ) -> tuple[Path, IO[bytes]] | None:
        """Once a file is replayed: its waiting entries move to a fresh file of ours (returned),
        then it is removed, or kept as `.bad` for its set-aside lines. A file the disk will not
        let us remove is remembered, and not applied again by this process."""
        moved = await self._hold(replayed.waiting) if replayed.waiting else None
        try:
            remove_replayed(path, replayed.set_aside)
        except OSError as error:
            self.stuck[path] = identity(file)
            log.error(
                "journal file applied but not removed: this process will not apply it again",
                extra={"file": str(path), "error": str(error)},
            )
        return moved

    async def _hold(self, lines: list[bytes]) -> tuple[Path, IO[bytes]]:
        """A fresh file of ours holding these entries, on disk."""
        try:
            path, file = self._open()
        except OSError as error:
            raise JournalError(f"cannot start a journal file: {error}") from error
        written = False
        try:
            write_all(file, b"".join(line + b"\n" for line in lines))
            await asyncio.to_thread(os.fsync, file.fileno())
            written = True
        except OSError as error:
            raise JournalError(f"cannot write {path}: {error}") from error
        finally:
            if not written:  # the entries stay where they were
                path.unlink(missing_ok=True)  # before the lock goes, as in close()
                file.close()
        return path, file

    async def close(self) -> None:
        """Leaves what waits on disk, unlocked, for the next process to apply. An empty file of
        ours is removed while still locked: once unlocked, another sidecar sharing the directory
        could take it for a dead process's and remove it first."""
        while self.syncing is not None and not self.syncing.done():
            await asyncio.wait([self.syncing])
        for _, file in self.held:
            file.close()
        self.held = []
        if os.fstat(self.file.fileno()).st_size == 0:
            self.path.unlink(missing_ok=True)
        self.file.close()


async def fsync_entries(file: IO[bytes], entries: list["asyncio.Future[None]"]) -> None:
    """Fsyncs the file on a thread, then resolves the future of each entry written to it: done,
    or failed with the disk's error. Cut short (cancelled at a shutdown), it fails them too, so
    that no caller waits for an answer that will never come (DESIGN, guarantee 8)."""
    failure: OSError | None = InterruptedError("the journal's fsync was cut short")
    try:
        await asyncio.to_thread(os.fsync, file.fileno())
        failure = None
    except OSError as error:
        failure = error
    finally:
        for synced in entries:
            if synced.done():
                continue
            if failure is None:
                synced.set_result(None)
            else:
                synced.set_exception(failure)


def parse_entry(line: bytes) -> dict[str, Any]:
    entry = orjson.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    return entry


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


def identity(file: IO[bytes]) -> tuple[int, ...]:
    """A file as it stands: the same name can never hold another with this identity."""
    stat = os.fstat(file.fileno())
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def still_named(path: Path, file: IO[bytes]) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False
