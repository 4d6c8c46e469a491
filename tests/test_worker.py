"""The store's worker thread, on the real reactor: calls run in order, in
another thread, and answer in the reactor thread."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor

from mqmq.stores.worker import WorkerThread


@pytest_twisted.ensureDeferred
async def test_calls_run_in_order_in_one_other_thread_and_answer_in_the_reactor_thread() -> None:
    worker = WorkerThread(reactor, "test-worker")
    worker.start()
    ran: list[tuple[int, int]] = []
    answered_in: list[int] = []

    def call(number: int) -> int:
        ran.append((number, threading.get_ident()))
        return number * 10

    def answered(value: int) -> int:
        answered_in.append(threading.get_ident())
        return value

    try:
        results = await defer.gatherResults([worker.run(call, n).addCallback(answered) for n in range(50)])
    finally:
        worker.stop()
    assert results == [n * 10 for n in range(50)]
    assert [number for number, _ in ran] == list(range(50))
    assert {ident for _, ident in ran} == {ran[0][1]} != {threading.get_ident()}
    assert set(answered_in) == {threading.get_ident()}


@pytest_twisted.ensureDeferred
async def test_a_call_that_raises_fails_its_deferred_and_the_next_still_runs() -> None:
    worker = WorkerThread(reactor, "test-worker")
    worker.start()

    def fail() -> None:
        raise OSError(28, "No space left on device")

    try:
        failed = worker.run(fail)
        after = worker.run(lambda: "after")
        with pytest.raises(OSError, match="No space left"):
            await failed
        assert await after == "after"
    finally:
        worker.stop()


def test_stop_lets_given_calls_finish_and_ends_the_thread() -> None:
    worker = WorkerThread(reactor, "test-worker")
    worker.stop()  # never started: nothing to do
    worker.start()
    ran = threading.Event()
    worker.run(ran.set)
    worker.stop()
    assert ran.is_set()
    assert not worker._thread.is_alive()
