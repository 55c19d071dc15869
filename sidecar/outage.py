"""What the sidecar does while Redis does not answer.

A circuit breaker keeps a dead or hanging Redis from costing every request its timeout: after a
few failures in a row calls fail at once, and one probe per cool-down tests whether Redis is
back. Reserves then follow FAIL_MODE: `closed` refuses (503 store_unavailable), `open` grants up
to FAIL_OPEN_BUDGET tokens per user per outage, marked degraded. Commits and refunds are never
lost: they go to an fsynced journal on local disk and are applied once Redis answers again.
"""

import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import orjson
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger("sidecar.outage")

# Failures that mean "Redis did not answer", as opposed to a refusal by a script.
STORE_ERRORS = (RedisError, OSError, TimeoutError)
# ... or Postgres did not, when a user had to be loaded from it.
UNAVAILABLE = (*STORE_ERRORS, SQLAlchemyError)


class StoreUnavailable(RedisError):
    """The breaker is open: Redis was not even tried."""


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


Replay = Callable[[dict[str, Any]], Awaitable[None]]


class Journal:
    """Commits and refunds taken while Redis was away: one JSON line each, fsynced before the
    client hears 200. Each process writes its own file and holds a lock on it; a file whose lock
    is free belongs to a process that died, and is replayed by whoever finds it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.held: list[tuple[Path, IO[bytes]]] = []
        self.path, self.file = self._open()
        self.pending = 0

    def _open(self) -> tuple[Path, IO[bytes]]:
        # Locked under a name the orphan scan ignores, then renamed: another process can never
        # take a fresh file for a dead process's and delete it under us.
        name = f"journal-{os.getpid()}-{time.time_ns()}.jsonl"
        opening = self.directory / f"opening-{name}"
        file = opening.open("ab")
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = self.directory / name
        opening.rename(path)
        return path, file

    def append(self, entry: dict[str, Any]) -> None:
        self.file.write(orjson.dumps(entry) + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.pending += 1

    async def replay(self, apply: Replay) -> int:
        """Applies every journalled entry (ours and dead processes'); returns how many."""
        if self.pending:
            # New entries go to a fresh file while this one is replayed.
            self.held.append((self.path, self.file))
            self.path, self.file = self._open()
            self.pending = 0
        done = 0
        for path, file in list(self.held):
            done += await self._replay_file(path, apply)
            path.unlink()
            file.close()
            self.held.remove((path, file))
        mine = {self.path, *(path for path, _ in self.held)}
        for path in self.directory.glob("journal-*.jsonl"):
            if path in mine:
                continue
            try:
                orphan = path.open("rb")
            except FileNotFoundError:
                continue  # another process replayed it just now
            with orphan:
                try:
                    fcntl.flock(orphan, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process owns it
                if not still_named(path, orphan):
                    continue  # replayed and removed while we waited for the lock
                done += await self._replay_file(path, apply)
                path.unlink()
        return done

    @staticmethod
    async def _replay_file(path: Path, apply: Replay) -> int:
        # Entries are idempotent (commit/refund by reservation id), so a replay cut short by a
        # crash is simply run again.
        entries = read_entries(path)
        for entry in entries:
            await apply(entry)
        return len(entries)

    def close(self) -> None:
        self.file.close()
        if self.path.stat().st_size == 0:
            self.path.unlink()


def still_named(path: Path, file: IO[bytes]) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


def read_entries(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
