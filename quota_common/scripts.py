"""Loading the Lua scripts of `lua/` and calling them by SHA.

Each operation script is the shared prelude followed by the operation's file. Calls use EVALSHA
and load the script again on NOSCRIPT (after SCRIPT FLUSH or a Redis restart), so no caller ever
sees that error.
"""

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

AnyRedis = Redis | RedisCluster

OPERATIONS = (
    "reserve",
    "commit",
    "refund",
    "extend",
    "usage",
    "seed",
    "apply_plan",
    "grant",
    "reset",
    "raise_used",
    "settled_ack",
)


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    source: str
    sha: str
    sha_bytes: bytes

    async def __call__(self, redis: AnyRedis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # EVAL runs the script and caches it again on that node in one round trip.
            return await redis.eval(self.source, len(keys), *keys, *args)


def read_script(name: str) -> str:
    package = files("lua")
    return (
        package.joinpath("_prelude.lua").read_text() + package.joinpath(f"{name}.lua").read_text()
    )


def load_all() -> dict[str, LuaScript]:
    scripts = {}
    for name in OPERATIONS:
        source = read_script(name)
        sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        scripts[name] = LuaScript(name, source, sha, sha.encode())
    return scripts


SCRIPTS = load_all()


async def register_all(redis: AnyRedis) -> None:
    """Loads every script into Redis (every primary of a cluster), so the first calls hit."""
    for script in SCRIPTS.values():
        await redis.script_load(script.source)
