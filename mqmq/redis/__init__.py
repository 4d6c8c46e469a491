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
from mqmq.redis.cluster import ClusterRedis, cluster, key_slot

__all__ = [
    "ClusterRedis",
    "Redis",
    "RedisError",
    "RedisUnavailable",
    "Script",
    "SingleRedis",
    "check_url",
    "cluster",
    "from_url",
    "key_slot",
    "single",
]
