"""The server's log: JSON lines for log shippers, and no debug lines unless asked."""

from __future__ import annotations

import json
import signal
import socket
from typing import Any

import pytest
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from conftest import Processes, assert_one_error_line, bin_path, stop, wait_until
from mqmq.server.logs import at_level, json_line
from mqmq.wire.codec import encode_frame


def test_a_json_line_has_the_time_level_message_and_the_events_fields() -> None:
    events: list[dict[str, Any]] = []
    log = Logger(namespace="mqmq.test", observer=events.append)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.failure("refused {peer}: {detail}", Failure(), peer="127.0.0.1:5", detail=b"a\nb")
    line = json_line(events[0])
    assert line.endswith("\n") and line.count("\n") == 1  # one event, one line
    record = json.loads(line)
    assert record["level"] == "critical"
    assert record["namespace"] == "mqmq.test"
    assert record["message"] == "refused 127.0.0.1:5: b'a\\nb'"
    assert record["peer"] == "127.0.0.1:5" and record["detail"] == "a\nb"
    assert "ValueError: bad" in record["traceback"]
    assert record["time"].endswith("+00:00")


def test_the_level_filter_drops_what_is_below() -> None:
    seen: list[dict[str, Any]] = []
    log = Logger(observer=at_level(seen.append, "info"))
    log.debug("hidden")
    log.info("shown")
    assert [event["log_format"] for event in seen] == ["shown"]


def _stall_reading(port: int) -> socket.socket:
    """A client whose Get waits while it sends more than the server buffers
    behind it: the server stops reading from it (and says so, at debug)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(encode_frame([b"Get", b"nothing", b"5000"]))
    client.sendall(encode_frame([b"Put", b"q", b"x" * 4096]) * 64)
    return client


@pytest.mark.parametrize("level, shown", [("info", False), ("debug", True)])
def test_twistd_logs_debug_lines_only_when_asked(procs: Processes, level: str, shown: bool) -> None:
    process, _, port = procs.start_twistd("--max-pending-bytes", "4096", "--log-level", level)
    with _stall_reading(port):
        if shown:
            wait_until(lambda: b"stopped reading from" in procs.output(process)[0])
        else:
            # The same stall, then a line logged after it: nothing about reading in between.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as other:
                other.sendall(encode_frame([b"Bogus"]))
                other.recv(100)
            wait_until(lambda: b"refused a request" in procs.output(process)[0])
    assert stop(process, signal.SIGTERM) in (0, -signal.SIGTERM)  # (twistd ends as the signal says)
    log = procs.output(process)[0].decode("utf-8", "replace")
    assert ("stopped reading from" in log) is shown
    assert ("#debug]" in log) is shown


def test_twistd_writes_json_lines(procs: Processes) -> None:
    process, _, port = procs.start_twistd("--log-format", "json")
    assert stop(process, signal.SIGTERM) in (0, -signal.SIGTERM)
    lines = procs.output(process)[0].decode("utf-8").splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    started = [r for r in records if r["message"].startswith("starting server")]
    assert started[0]["address"] == f"127.0.0.1:{port}"
    assert started[0]["level"] == "info" and started[0]["namespace"] == "mqmq.server.tap.TwistdServer"


def test_twistd_writes_json_lines_to_its_log_file(procs: Processes, tmp_path: Any) -> None:
    log_file = tmp_path / "mqmq.log"
    result = procs.run(bin_path("twistd"), "--pidfile=", f"--logfile={log_file}", "-n", "mqmq",
                       "--addr", "127.0.0.1:0", "--log-format", "json", "--store", "sqlite:/nonexistent/dir/q.db")
    assert result.returncode != 0  # cannot start: its one error line is logged as JSON
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1 and "cannot start server" in errors[0]["message"]


def test_mqmq_start_writes_json_lines(procs: Processes) -> None:
    process, _, port = procs.start_server("--log-format", "json")
    assert stop(process, signal.SIGTERM) == 0
    records = [json.loads(line) for line in procs.output(process)[1].splitlines()]
    assert any(r["message"] == f"starting server: 127.0.0.1:{port}" for r in records)
    assert any(r["message"] == "received signal: terminated" for r in records)


@pytest.mark.parametrize("options, said", [
    (["--log-format", "xml"], "--log-format"),
    (["--log-level", "loud"], "--log-level"),
])
def test_bad_log_options_are_usage_errors(procs: Processes, options: list[str], said: str) -> None:
    result = procs.mqmq("start", *options)
    assert result.returncode == 2
    assert said in assert_one_error_line(result)


def test_json_lines_are_refused_for_syslog(procs: Processes) -> None:
    result = procs.run(bin_path("twistd"), "--pidfile=", "--syslog", "mqmq", "--log-format", "json")
    assert result.returncode != 0
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert "Traceback" not in output and "not to syslog" in output.splitlines()[-1]


def test_a_json_line_survives_odd_fields_and_legacy_failures() -> None:
    from twisted.python import log as legacy

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    events: list[dict[str, Any]] = []
    Logger(observer=events.append).info("odd", ratio=float("nan"), thing=Unprintable())
    record = json.loads(json_line(events[0]), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert record["ratio"] == "nan" and record["thing"] == "<unprintable Unprintable>"
    legacy_events: list[dict[str, Any]] = []
    legacy.addObserver(legacy_events.append)
    try:
        try:
            raise KeyError("lost")
        except KeyError:
            legacy.err(None, "while testing")
    finally:
        legacy.removeObserver(legacy_events.append)
    line = json.loads(json_line(legacy_events[-1]))
    assert "KeyError" in line["traceback"]
