"""``twistd mqmq`` and ``mqmq start`` as daemons: SIGHUP, failed starts, bad options.

Run as a user runs them: subprocesses on loopback ports they chose, real
signals, real log files.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
from pathlib import Path
from typing import Iterator

import pytest
from twisted.python import usage

from conftest import (
    Processes,
    assert_one_error_line,
    bin_path,
    logged_port,
    raw_info,
    stop,
    wait_until,
)
from mqmq.server import tap

EXIT_FAILURE = 1
EXIT_USAGE = 2

REOPENED = "received SIGHUP: reopened the log file"


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def taken_address() -> Iterator[str]:
    """``127.0.0.1:PORT`` where something else listens for the whole test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield "127.0.0.1:%d" % holder.getsockname()[1]


# --- SIGHUP ---------------------------------------------------------------------


def test_twistd_reopens_its_log_file_on_sighup_and_serves_on(
    procs: Processes, tmp_path: Path
) -> None:
    log = tmp_path / "mqmq.log"
    process = procs.spawn(bin_path("twistd"), "-n", "--pidfile=", f"--logfile={log}",
                          "mqmq", "--addr", "127.0.0.1:0")
    port = logged_port(lambda: read(log), process)

    process.send_signal(signal.SIGHUP)
    wait_until(lambda: REOPENED in read(log))
    assert process.poll() is None
    assert raw_info(port)["NumConnections"] == 1

    # As logrotate does: move the file away, then SIGHUP.
    rotated = tmp_path / "mqmq.log.1"
    log.rename(rotated)
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: REOPENED in read(log))
    assert re.search(rf"\[mqmq\S*#info\] {REOPENED} {re.escape(str(log))}", read(log)), read(log)
    assert raw_info(port)["NumConnections"] == 1
    # Nothing more went to the file moved away once the new one was open.
    assert read(rotated).count(REOPENED) == 1

    assert stop(process, signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Server Shut Down." in read(log)
    assert "Traceback" not in read(log) + read(rotated)


def test_twistd_keeps_its_log_file_when_a_new_one_cannot_be_made(
    procs: Processes, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    process = procs.spawn(bin_path("twistd"), "-n", "--pidfile=", f"--logfile={logs / 'mqmq.log'}",
                          "mqmq", "--addr", "127.0.0.1:0")
    port = logged_port(lambda: read(logs / "mqmq.log"), process)

    # The whole folder gone: no new file can be made where the old one was.
    moved = tmp_path / "moved"
    logs.rename(moved)
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: "cannot reopen the log file" in read(moved / "mqmq.log"))
    assert re.search(r"#error\] received SIGHUP: cannot reopen the log file", read(moved / "mqmq.log"))
    assert raw_info(port)["NumConnections"] == 1

    # Once it can be, the next SIGHUP makes it, and logging goes on there.
    logs.mkdir()
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: REOPENED in read(logs / "mqmq.log"))
    assert stop(process, signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Server Shut Down." in read(logs / "mqmq.log")
    assert "Traceback" not in read(moved / "mqmq.log") + read(logs / "mqmq.log")


def test_twistd_logging_to_stdout_serves_on_after_sighup(procs: Processes) -> None:
    process, _, port = procs.start_twistd()
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: b"received SIGHUP: no log file to reopen" in procs.output(process)[0])
    assert raw_info(port)["NumConnections"] == 1
    assert stop(process, signal.SIGTERM) in (0, -signal.SIGTERM)


def test_start_logs_sighup_and_serves_on(procs: Processes) -> None:
    process, addr, port = procs.start_server()
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: "INFO: received signal: hangup" in procs.output(process)[1])
    assert raw_info(port)["NumConnections"] == 1
    assert stop(process, signal.SIGTERM) == 0
    stderr = procs.output(process)[1]
    assert f"INFO: server stopped: {addr}" in stderr
    assert "Traceback" not in stderr


# --- a port already taken ---------------------------------------------------------


def test_twistd_on_a_taken_port_logs_one_error_line(
    procs: Processes, taken_address: str
) -> None:
    process = procs.spawn(bin_path("twistd"), "-n", "--pidfile=", "mqmq", "--addr", taken_address)
    assert process.wait(timeout=30) == EXIT_FAILURE
    stdout, stderr = procs.output(process)
    log = stdout.decode("utf-8", "replace")
    assert "Traceback" not in log + stderr
    errors = [line for line in log.splitlines() if "#error]" in line or "#critical]" in line]
    assert len(errors) == 1, log
    assert re.search(rf"\[mqmq\S*#error\] cannot start server: .*{re.escape(taken_address)}",
                     errors[0]), log
    assert "starting server" not in log


def test_twistd_daemon_on_a_taken_port_fails_and_cleans_up(
    procs: Processes, tmp_path: Path, taken_address: str
) -> None:
    pidfile, log = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    result = procs.run(bin_path("twistd"), f"--pidfile={pidfile}", f"--logfile={log}",
                       "mqmq", "--addr", taken_address)
    try:
        assert result.returncode != 0
        assert not pidfile.exists()
        assert taken_address.encode() in result.stderr  # what the parent says
        assert "Traceback" not in read(log)
        assert len(re.findall(r"#error\] cannot start server: ", read(log))) == 1, read(log)
    finally:
        if pidfile.exists():  # a daemon that should not be running
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


# --- bad options --------------------------------------------------------------------


OPENSSL_INSTALLED = True
try:
    import OpenSSL  # noqa: F401
except ImportError:
    OPENSSL_INSTALLED = False

BAD_LISTEN = [
    pytest.param("bogus:x", "Unknown endpoint type", id="unknown-type"),
    pytest.param("tcp:abc", "tcp:abc", id="port-not-a-number"),
    pytest.param("tcp:0:colour=blue", "colour", id="unknown-argument"),
    pytest.param("ssl:0", "pip install 'mqmq[tls]'", id="ssl-without-pyopenssl",
                 marks=pytest.mark.skipif(OPENSSL_INSTALLED, reason="pyOpenSSL is installed")),
    pytest.param("ssl:0:privateKey=missing.pem", "No such file", id="ssl-missing-key",
                 marks=pytest.mark.skipif(not OPENSSL_INSTALLED, reason="needs pyOpenSSL")),
    pytest.param("tls:/nonexistent-mqmq-pems:port=0", "no such directory", id="tls-missing-directory",
                 marks=pytest.mark.skipif(not OPENSSL_INSTALLED, reason="needs pyOpenSSL")),
    pytest.param("tls:.:port=0", "no HOSTNAME.pem file", id="tls-no-pem",
                 marks=pytest.mark.skipif(not OPENSSL_INSTALLED, reason="needs pyOpenSSL")),
]


@pytest.mark.parametrize("description, said", BAD_LISTEN)
def test_start_with_a_bad_listen_is_a_usage_error(
    procs: Processes, description: str, said: str
) -> None:
    result = procs.mqmq("start", "--listen", description)
    assert result.returncode == EXIT_USAGE
    line = assert_one_error_line(result)
    assert description in line and said in line


@pytest.mark.parametrize("description, said", BAD_LISTEN)
def test_twistd_with_a_bad_listen_says_why(
    procs: Processes, description: str, said: str
) -> None:
    result = procs.run(bin_path("twistd"), "-n", "--pidfile=", "mqmq", "--listen", description)
    assert result.returncode != 0
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert "Traceback" not in output
    # twistd prints the options, then the error, last.
    assert description in output.splitlines()[-1] and said in output.splitlines()[-1], output


@pytest.mark.parametrize(
    "options, said",
    [
        (["--max-message-bytes", "0"], "--max-message-bytes"),
        (["--max-info-bytes", "61"], "--max-info-bytes"),
        (["--addr="], "--addr"),
    ],
    ids=["message-limit-0", "info-limit-below-smallest-reply", "empty-addr"],
)
def test_start_refuses_options_that_refuse_everything(
    procs: Processes, options: list[str], said: str
) -> None:
    result = procs.mqmq("start", *options)
    assert result.returncode == EXIT_USAGE
    assert said in assert_one_error_line(result)


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def test_the_smallest_info_reply_is_the_lowest_info_limit() -> None:
    # {"NumConnections":1,"NumQueues":0,"NumMessages":0,"Queues":{}}
    assert parse("--max-info-bytes", "62")["limits"].max_info_bytes == 62
    with pytest.raises(usage.UsageError):
        parse("--max-info-bytes", "61")
    with pytest.raises(usage.UsageError):
        parse("--max-info-bytes", "0")


def test_one_byte_messages_are_the_lowest_message_limit() -> None:
    assert parse("--max-message-bytes", "1")["limits"].max_message_bytes == 1
    with pytest.raises(usage.UsageError):
        parse("--max-message-bytes", "0")


# --- UNIX sockets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "description, expected",
    [
        ("unix:/run/mqmq.sock", "unix:/run/mqmq.sock:mode=660"),
        ("unix:address=/run/mqmq.sock", "unix:address=/run/mqmq.sock:mode=660"),
        ("unix:/run/mqmq.sock:backlog=5", "unix:/run/mqmq.sock:backlog=5:mode=660"),
        ("unix:/run/mqmq.sock:mode=600", "unix:/run/mqmq.sock:mode=600"),
        ("unix:/run/mqmq.sock:mode=666", "unix:/run/mqmq.sock:mode=666"),
        ("unix:/run/mqmq.sock:600", "unix:/run/mqmq.sock:600"),  # mode, positionally
        (r"unix:/run/a\:b.sock", r"unix:/run/a\:b.sock:mode=660"),
        ("tcp:0", "tcp:0"),
    ],
)
def test_unix_sockets_default_to_mode_660(description: str, expected: str) -> None:
    assert tap.listen_description(description) == expected


@pytest.mark.parametrize(
    "suffix, mode", [("", 0o660), (":mode=600", 0o600), (":mode=666", 0o666)],
    ids=["default", "mode-600", "mode-666"],
)
@pytest.mark.parametrize("command", ["start", "twistd"])
def test_unix_socket_file_mode(
    procs: Processes, tmp_path: Path, command: str, suffix: str, mode: int
) -> None:
    path = tmp_path / "mqmq.sock"
    listen = ["--listen", f"unix:{path}{suffix}"]
    if command == "start":
        process = procs.spawn(bin_path("mqmq"), "start", *listen)
    else:
        process = procs.spawn(bin_path("twistd"), "-n", "--pidfile=", "mqmq", *listen)

    def started() -> bool:
        assert process.poll() is None, procs.output(process)
        stdout, stderr = procs.output(process)
        return f"starting server: unix:{path}" in stdout.decode() + stderr

    wait_until(started)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    stop(process, signal.SIGTERM)


def test_subprocess_helpers_see_through_an_ignored_sigint(procs: Processes) -> None:
    # As when pytest runs as a background job: SIGINT ignored, and inherited.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process, _, port = procs.start_twistd()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert raw_info(port)["NumQueues"] == 0
    assert stop(process, signal.SIGINT) in (0, -signal.SIGINT)


def test_twistd_help_mentions_sighup(procs: Processes) -> None:
    result = procs.run(bin_path("twistd"), "mqmq", "--help")
    assert result.returncode == 0
    assert b"SIGHUP" in result.stdout
