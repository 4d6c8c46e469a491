"""A small Redis client for Twisted: RESP2, one server or a Redis Cluster, scripts, shard-channel subscriptions."""

from __future__ import annotations

from mqmq.redis.client import (
    Redis,
    RedisError,
    RedisUnavailable,
    Script,
    SingleRedis,
    check_url,
    from_url,
    single,
)

__all__ = ["Redis", "RedisError", "RedisUnavailable", "Script", "SingleRedis", "check_url", "from_url", "single"]
