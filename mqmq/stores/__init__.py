"""Where messages are kept: memory, sqlite — one module each, one interface (``base``) they all satisfy."""

from __future__ import annotations

from typing import Any

from mqmq.stores.base import Store

#: What ``--store`` accepts, for messages.
STORE_FORMS = "memory: or sqlite:PATH"


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
    else:
        raise ValueError(f"--store {description!r}: unknown kind {kind!r}; want {STORE_FORMS}")
    return kind, rest


def store_from_description(description: str, fsync: str = "always", reactor: Any = None) -> Store:
    """The store a ``--store`` description names (``memory:``, ``sqlite:PATH``), not yet opened.

    :raises ValueError: see :func:`parse_store_description`.
    """
    kind, rest = parse_store_description(description)
    if kind == "sqlite":
        from mqmq.stores.sqlite import SqliteStore

        return SqliteStore(rest, fsync, reactor)
    from mqmq.stores.memory import MemoryStore

    return MemoryStore()
