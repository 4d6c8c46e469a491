"""Where messages are kept: memory, sqlite, redis — one module each, one interface (``base``) they all satisfy."""

from __future__ import annotations

from typing import Any

from mqmq.stores.base import Store

#: What ``--store`` accepts, for messages.
STORE_FORMS = "memory:, sqlite:PATH, redis://HOST:PORT/DB or redis+cluster://HOST:PORT[,HOST:PORT...]"


def parse_store_description(description: str) -> tuple[str, str]:
    """A ``--store`` description's kind and what follows its colon.

    :raises ValueError: an unknown kind, or a path missing.
    """
    kind, colon, rest = description.partition(":")
    if not colon:
        raise ValueError(f"--store {description!r}: want {STORE_FORMS}")
    if kind == "memory":
        if rest:
            raise ValueError(f"--store {description!r}: memory: takes nothing after the colon")
    elif kind == "sqlite":
        if not rest:
            raise ValueError(f"--store {description!r}: sqlite: needs the database's path")
    elif kind in ("redis", "redis+cluster"):
        from mqmq.redis import check_url

        try:
            check_url(description)
        except ValueError as error:
            raise ValueError(f"--store {description!r}: {error}") from None
    else:
        raise ValueError(f"--store {description!r}: unknown kind {kind!r}; want {STORE_FORMS}")
    return kind, rest


def store_from_description(
    description: str, fsync: str = "always", reactor: Any = None,
    redis_prefix: str = "mqmq:", redis_timeout: float = 2.0,
) -> Store:
    """The store a ``--store`` description names (``memory:``, ``sqlite:PATH``,
    ``redis://…``, ``redis+cluster://…``), not yet opened.

    :raises ValueError: see :func:`parse_store_description`.
    """
    kind, rest = parse_store_description(description)
    if kind in ("redis", "redis+cluster"):
        from twisted.internet import reactor as default_reactor

        from mqmq.stores.redis import redis_store

        return redis_store(description, reactor or default_reactor, redis_prefix, redis_timeout)
    if kind == "sqlite":
        from mqmq.stores.sqlite import SqliteStore

        return SqliteStore(rest, fsync, reactor)
    from mqmq.stores.memory import MemoryStore

    return MemoryStore()
