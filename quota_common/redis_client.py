"""Redis connections for a single server or a cluster, chosen by the settings, and Redis'
clock (the scripts roll periods by it, so Python chooses periods by it too)."""

from datetime import UTC, datetime

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from quota_common.scripts import AnyRedis
from quota_common.settings import Settings


def connect(
    settings: Settings, timeout_s: float | None = None, max_connections: int = 64
) -> AnyRedis:
    """Short timeouts by default: a hung Redis must cost a request milliseconds, not seconds."""
    timeout = timeout_s if timeout_s is not None else settings.redis_timeout_ms / 1000
    if settings.uses_cluster:
        url = settings.redis_url.replace("redis+cluster://", "redis://", 1)
        return RedisCluster.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
        )
    # A blocking pool: a burst of more concurrent calls than connections waits (up to the same
    # timeout) for a free connection instead of failing at once with "Too many connections".
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        max_connections=max_connections,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)


async def redis_now(redis: AnyRedis) -> datetime:
    seconds, micros = await redis.time()
    return datetime.fromtimestamp(int(seconds) + int(micros) / 1_000_000, UTC)
