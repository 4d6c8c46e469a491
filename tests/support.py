"""Small helpers shared by the tests: fired Deferreds and blocking socket reads."""

from __future__ import annotations

import socket
from typing import Any, TypeVar, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def _outcome(deferred: Deferred[Any]) -> object:
    results: list[object] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def success(deferred: Deferred[T]) -> T:
    """The result of a Deferred that must already have succeeded."""
    result = _outcome(deferred)
    if isinstance(result, Failure):
        pytest.fail(f"expected a result, got {result.getTraceback()}")
    return cast(T, result)


def failure(deferred: Deferred[Any], kind: type[E]) -> E:
    """The exception of a Deferred that must already have failed with ``kind``."""
    result = _outcome(deferred)
    assert isinstance(result, Failure), f"expected {kind.__name__}, got result {result!r}"
    assert result.check(kind), f"expected {kind.__name__}, got {result.value!r}"
    return cast(E, result.value)


def read_exactly(sock: socket.socket, count: int) -> bytes:
    """Exactly ``count`` bytes from a blocking socket, or ConnectionError."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data
