"""Every Redis key name of the gateway, and the hash tag that keeps one call on one slot.

Users are spread over BUCKETS buckets by crc32 of their id; the bucket is the hash tag, so a
user's state, holds and records and the bucket's settle stream and due set share a slot. A
script touching all of them therefore runs unchanged on Redis Cluster, and the sync worker reads
one stream per bucket instead of one per user. BUCKETS is part of the stored layout: changing
it moves every user's keys (flush Redis and let the state rebuild from Postgres).
"""

import functools
import re
import zlib
from dataclasses import dataclass
from typing import TypeGuard

BUCKETS = 128
# User and reservation ids: they become parts of key names, so "/" and whitespace never occur.
ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)
SETTLE_GROUP = "settlers"


def is_valid_id(value: object) -> TypeGuard[str]:
    # fullmatch: with match, "$" also matches before a trailing newline.
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def bucket_of(user_id: str) -> int:
    return zlib.crc32(user_id.encode()) % BUCKETS


def bucket_tag(bucket: int) -> str:
    return f"{{b{bucket}}}"


def settle_stream(bucket: int) -> str:
    return f"q:{bucket_tag(bucket)}:settled"


def due_set(bucket: int) -> str:
    return f"q:{bucket_tag(bucket)}:due"


@dataclass(frozen=True, slots=True)
class UserKeys:
    """The keys of one user; `record(rid)` is the hash of one reservation."""

    user_id: str
    state: str
    holds: str
    record_prefix: str
    stream: str
    due: str

    def record(self, reservation_id: str) -> str:
        return self.record_prefix + reservation_id

    def reservation_keys(self, reservation_id: str) -> list[str]:
        """KEYS of the scripts on one reservation (reserve, extend, commit, refund)."""
        return [self.state, self.holds, self.record(reservation_id), self.stream, self.due]

    def state_keys(self) -> list[str]:
        """KEYS of the scripts on the user's state alone (usage, grant, reset)."""
        return [self.state, self.holds, self.stream, self.due]


@functools.lru_cache(maxsize=65_536)
def user_keys(user_id: str) -> UserKeys:
    """Cached: the active users' key names are built once, not on every call."""
    bucket = bucket_of(user_id)
    tag = bucket_tag(bucket)
    # "/" is not allowed in ids, so "<user>/<reservation>" can never be read two ways.
    return UserKeys(
        user_id=user_id,
        state=f"q:{tag}:s:{user_id}",
        holds=f"q:{tag}:h:{user_id}",
        record_prefix=f"q:{tag}:r:{user_id}/",
        stream=settle_stream(bucket),
        due=due_set(bucket),
    )
