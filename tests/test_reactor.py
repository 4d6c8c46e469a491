"""The leaner epoll reactor: what it changes, what it keeps, where it is used."""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

import pytest
from twisted.internet import reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.main import CONNECTION_LOST
from twisted.logger import capturedLogs

from conftest import TEST_REACTOR, Processes, bin_path, logged_port, raw_info
from mqmq.server import reactor as lean_reactor

pytestmark = pytest.mark.skipif(not lean_reactor.available(), reason="needs epoll")


def test_the_in_process_tests_run_on_the_lean_reactor() -> None:
    if TEST_REACTOR != "mqmq-epoll":
        pytest.skip("MQMQ_TEST_REACTOR chose another reactor")
    assert isinstance(reactor, lean_reactor.LeanEPollReactor)


class _Readable(FileDescriptor):
    """One end of a pipe with data waiting, whose handling goes wrong."""

    def __init__(self, lean: lean_reactor.LeanEPollReactor, fd: int,
                 on_lost: Callable[[], None]) -> None:
        super().__init__(lean)
        self.fd = fd
        self.on_lost = on_lost
        self.read = 0

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        self.read += 1
        return CONNECTION_LOST

    def connectionLost(self, reason: Any) -> None:
        self.on_lost()


def _lean_with_two_ready() -> tuple[lean_reactor.LeanEPollReactor, list[_Readable], list[int]]:
    lean = lean_reactor.LeanEPollReactor()
    fds: list[int] = []
    readers = []

    def broken() -> None:
        raise RuntimeError("boom")

    for on_lost in (broken, lambda: None):
        read_end, write_end = os.pipe()
        os.write(write_end, b"x")
        fds += [read_end, write_end]
        reader = _Readable(lean, read_end, on_lost)
        lean.addReader(reader)
        readers.append(reader)
    return lean, readers, fds


def test_an_error_past_the_handler_is_logged_and_the_other_events_are_handled() -> None:
    lean, (broken, fine), fds = _lean_with_two_ready()
    try:
        with capturedLogs() as events:
            lean.doPoll(0)
        # Both ready descriptors were handled, the failure of one logged.
        assert broken.read == fine.read == 1
        failures = [event["log_failure"] for event in events if "log_failure" in event]
        assert len(failures) == 1 and failures[0].check(RuntimeError)
    finally:
        for fd in fds:
            os.close(fd)
        lean._poller.close()


def test_nothing_ready_within_the_timeout_returns() -> None:
    lean = lean_reactor.LeanEPollReactor()
    try:
        lean.doPoll(0)
        lean.doPoll(0.001)
    finally:
        lean._poller.close()


def test_twistd_serves_on_the_lean_reactor(procs: Processes) -> None:
    process = procs.spawn(bin_path("twistd"), "-n", "--pidfile=", "-r", "mqmq-epoll",
                          "mqmq", "--addr", "127.0.0.1:0")
    port = logged_port(lambda: procs.output(process)[0].decode(errors="replace"), process)
    assert raw_info(port)["NumConnections"] == 1
    process.send_signal(signal.SIGTERM)
    process.wait(10)
    stdout = procs.output(process)[0].decode(errors="replace")
    assert "LeanEPollReactor" in stdout, stdout
    assert "Traceback" not in stdout


@pytest.mark.parametrize("name", ["mqmq-epoll", "poll", "default"])
def test_mqmq_start_runs_on_the_reactor_asked_for(procs: Processes, name: str) -> None:
    process = procs.spawn(bin_path("mqmq"), "start", "-addr", "127.0.0.1:0", "--reactor", name)
    port = logged_port(lambda: procs.output(process)[1], process)
    assert raw_info(port)["NumConnections"] == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0


def test_mqmq_start_refuses_an_unknown_reactor(procs: Processes) -> None:
    result = procs.mqmq("start", "--reactor", "bogus")
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert stderr.startswith("mqmq: unknown reactor 'bogus'") and stderr.count("\n") == 1
