"""The shipped entry points, run as a user runs them.

``twistd -n mqmq`` and ``mqmq start|info|put|get`` are started as
subprocesses on a real loopback port and stopped with real signals.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    COMMAND_TIMEOUT,
    REPO_ROOT,
    Processes,
    assert_one_error_line,
    bin_path,
    default_signals,
    raw_info,
    stop,
    wait_until,
)

# Exit statuses are part of the command's contract (scripts test them), so
# they are spelt out here rather than taken from mqmq.cli.
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

LOG_LINE = r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d"


# --- twistd mqmq --------------------------------------------------------------


def assert_twistd_stopped_cleanly(procs: Processes, process: subprocess.Popen, number: int) -> None:
    """twistd shut down in order after signal ``number``, within a few seconds.

    After a clean shutdown twistd re-raises the stopping signal on itself
    (``twisted.application.app._exitWithSignal``), so a clean stop shows as
    either status 0 or death by that same signal; anything else is a failure.
    """
    started = time.monotonic()
    assert stop(process, number) in (0, -number)
    assert time.monotonic() - started < 5
    stdout, stderr = procs.output(process)
    assert b"Traceback" not in stdout
    assert "Traceback" not in stderr
    assert b"Main loop terminated." in stdout
    assert b"Server Shut Down." in stdout


def test_twistd_serves_and_stops_on_sigterm(procs: Processes) -> None:
    process, addr, _ = procs.start_twistd()

    put = procs.mqmq("put", "-addr", addr, "q", "hello")
    assert put.returncode == 0, put.stderr
    assert put.stdout == b""

    info = procs.mqmq("info", "-addr", addr)
    assert info.returncode == 0, info.stderr
    assert info.stdout == (
        b"Number of connections: 1\n"
        b"Number of queues: 1\n"
        b"Number of messages: 1\n"
        b"Queues:\n"
        b"        q: 1\n"
    )

    get = procs.mqmq("get", "--addr", addr, "q")
    assert get.returncode == 0, get.stderr
    assert get.stdout == b"hello"

    assert_twistd_stopped_cleanly(procs, process, signal.SIGTERM)


def test_twistd_stops_on_sigint(procs: Processes) -> None:
    process, addr, port = procs.start_twistd()
    # A served request means the reactor runs, so twistd's own signal handlers
    # (installed as the reactor starts, after it listens) are in place.
    assert raw_info(port)["NumQueues"] == 0
    assert_twistd_stopped_cleanly(procs, process, signal.SIGINT)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_twistd_help_lists_mqmq(procs: Processes) -> None:
    result = procs.run(bin_path("twistd"), "--help")
    assert result.returncode == 0, result.stderr
    assert re.search(rb"^\s+mqmq\s+\S", result.stdout, re.MULTILINE), result.stdout


def test_twistd_mqmq_help_documents_options(procs: Processes) -> None:
    result = procs.run(bin_path("twistd"), "mqmq", "--help")
    assert result.returncode == 0, result.stderr
    assert b"--addr" in result.stdout
    assert b"--listen" in result.stdout
    assert b"127.0.0.1:47774" in result.stdout


# --- mqmq start ---------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, signal_number, signal_name",
    [
        ("-addr", signal.SIGINT, "interrupt"),
        ("--addr", signal.SIGTERM, "terminated"),
    ],
)
def test_start_logs_and_stops_on_signal(
    procs: Processes, flag: str, signal_number: int, signal_name: str
) -> None:
    process, addr, _ = procs.start_server(flag=flag)
    assert stop(process, signal_number) == 0
    stdout, stderr = procs.output(process)
    assert "Traceback" not in stderr
    assert b"Traceback" not in stdout
    lines = stderr.splitlines()
    escaped = re.escape(addr)
    starting = [
        i for i, line in enumerate(lines)
        if re.fullmatch(rf"{LOG_LINE} INFO: starting server: {escaped}", line)
    ]
    received = [
        i for i, line in enumerate(lines)
        if re.fullmatch(rf"{LOG_LINE} INFO: received signal: {signal_name}", line)
    ]
    stopped = [
        i for i, line in enumerate(lines)
        if re.fullmatch(rf"{LOG_LINE} INFO: server stopped: {escaped}", line)
    ]
    assert len(starting) == len(received) == len(stopped) == 1, stderr
    assert starting[0] < received[0] < stopped[0], stderr


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT] * 3)
def test_start_handles_signal_sent_as_soon_as_it_listens(
    procs: Processes, signal_number: int
) -> None:
    # A supervisor may signal the server the moment its port accepts; the
    # signal handlers must already be in place by then.
    process, addr, _ = procs.start_server()
    assert stop(process, signal_number) == 0
    stderr = procs.output(process)[1]
    assert "Traceback" not in stderr
    assert f"INFO: server stopped: {addr}" in stderr


def test_start_on_taken_port_fails_cleanly(procs: Processes) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        addr = "127.0.0.1:%d" % holder.getsockname()[1]
        result = procs.mqmq("start", "-addr", addr)
    assert result.returncode == EXIT_FAILURE
    line = assert_one_error_line(result)
    assert line.startswith("mqmq: cannot start server: ") and addr in line, line


@pytest.mark.parametrize("addr", ["nonsense", "127.0.0.1:99999"])
def test_start_with_bad_address_is_a_usage_error(procs: Processes, addr: str) -> None:
    result = procs.mqmq("start", "-addr", addr)
    assert result.returncode == EXIT_USAGE
    assert addr in assert_one_error_line(result)


# --- mqmq info|put|get against a server --------------------------------------


def test_info_on_empty_server(procs: Processes, server: tuple[str, int]) -> None:
    addr, _ = server
    result = procs.mqmq("info", "-addr", addr)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        b"Number of connections: 1\nNumber of queues: 0\nNumber of messages: 0\n"
    )


def test_get_times_out_on_empty_queue(procs: Processes, server: tuple[str, int]) -> None:
    addr, port = server
    started = time.monotonic()
    result = procs.mqmq("get", "-addr", addr, "-timeout", "100ms", "q")
    assert result.returncode == EXIT_TIMEOUT, result.stderr
    assert result.stdout == b""
    assert "Traceback" not in result.stderr.decode("utf-8", "replace")
    assert time.monotonic() - started < COMMAND_TIMEOUT
    # The Get reached the server (it created the queue) and took nothing.
    assert raw_info(port)["Queues"] == {"q": {"NumMessages": 0}}


def _wait_for_waiter(port: int, queue: str) -> None:
    # A Get creates its queue on arrival: once listed, the getter is waiting.
    wait_until(lambda: queue in raw_info(port)["Queues"])


def test_waiting_get_receives_later_put(procs: Processes, server: tuple[str, int]) -> None:
    addr, port = server
    getter = procs.spawn(bin_path("mqmq"), "get", "-addr", addr, "-timeout", "5s", "later")
    _wait_for_waiter(port, "later")
    assert getter.poll() is None, "get returned before anything was put"
    put = procs.mqmq("put", "-addr", addr, "later", "arrived")
    assert put.returncode == 0, put.stderr
    assert getter.wait(timeout=COMMAND_TIMEOUT) == 0
    stdout, stderr = procs.output(getter)
    assert stdout == b"arrived"
    assert "Traceback" not in stderr
    # mqmq get reserved it, then acked it: the Info is the extended one now.
    assert raw_info(port)["Queues"] == {"later": {"NumMessages": 0, "NumReserved": 0, "NumBuried": 0}}


def test_blocking_get_woken_by_put_from_other_process(
    procs: Processes, server: tuple[str, int]
) -> None:
    addr, port = server
    getter = procs.spawn(bin_path("mqmq"), "get", "--addr", addr, "--timeout=10s", "wake")
    _wait_for_waiter(port, "wake")
    woken = time.monotonic()
    put = procs.mqmq("put", "--addr", addr, "wake", "up")
    assert put.returncode == 0, put.stderr
    assert getter.wait(timeout=COMMAND_TIMEOUT) == 0
    # Woken by the put, not by its 10 s timeout running out.
    assert time.monotonic() - woken < 8
    assert procs.output(getter)[0] == b"up"


def test_binary_message_through_stdin(procs: Processes, server: tuple[str, int]) -> None:
    addr, port = server
    put = procs.mqmq("put", "-addr", addr, "bin", "-", input=b"\x00\xffbin")
    assert put.returncode == 0, put.stderr
    assert raw_info(port)["Queues"] == {"bin": {"NumMessages": 1}}
    get = procs.mqmq("get", "-addr", addr, "bin")
    assert get.returncode == 0, get.stderr
    assert get.stdout == b"\x00\xffbin"


# --- mqmq errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("info",), ("put", "q", "x"), ("get", "q")],
    ids=["info", "put", "get"],
)
def test_refused_connection_fails_with_one_line(
    procs: Processes, args: tuple[str, ...], refused_address: str
) -> None:
    addr = refused_address
    result = procs.mqmq(args[0], "-addr", addr, *args[1:])
    assert result.returncode == EXIT_FAILURE
    assert addr in assert_one_error_line(result)


@pytest.mark.parametrize("addr", ["nonsense", "127.0.0.1:99999"])
@pytest.mark.parametrize(
    "args",
    [("info",), ("put", "q", "x"), ("get", "q")],
    ids=["info", "put", "get"],
)
def test_bad_address_is_a_usage_error(
    procs: Processes, args: tuple[str, ...], addr: str
) -> None:
    result = procs.mqmq(args[0], "-addr", addr, *args[1:])
    assert result.returncode == EXIT_USAGE
    assert addr in assert_one_error_line(result)


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("put",),
        ("get",),
        ("get", "q", "extra"),
    ],
    ids=["no-command", "unknown-command", "put-no-queue", "get-no-queue", "get-extra"],
)
def test_bad_command_line_is_a_usage_error(procs: Processes, args: tuple[str, ...]) -> None:
    result = procs.mqmq(*args)
    assert result.returncode == EXIT_USAGE
    assert_one_error_line(result)


@pytest.mark.parametrize("duration", ["5x", "2h"], ids=["malformed", "over-one-hour"])
def test_bad_duration_is_a_usage_error(
    procs: Processes, duration: str, refused_address: str
) -> None:
    # Nothing listens: the duration must be refused before connecting.
    addr = refused_address
    result = procs.mqmq("get", "-addr", addr, "-timeout", duration, "q")
    assert result.returncode == EXIT_USAGE
    assert duration in assert_one_error_line(result)


def test_start_listens_on_a_unix_socket_and_logs_its_path(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    path = tmp_path / "mqmq.sock"
    server = subprocess.Popen(
        [bin_path("mqmq"), "start", "--listen", f"unix:{path}"],
        env=subprocess_env, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals,
    )
    try:
        deadline = time.monotonic() + 10
        # The socket's file appears at bind(), a moment before listen(): until
        # then a connection is refused.
        while True:
            client = socket.socket(socket.AF_UNIX)
            try:
                client.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                client.close()
            assert time.monotonic() < deadline, "the UNIX socket never accepted a connection"
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.02)
        with client:
            client.settimeout(5)
            client.sendall(b"\x00\x00\x00\x11" + b"\x00\x00\x00\x03Put\x00\x00\x00\x01q\x00\x00\x00\x01m")
            assert client.recv(64) == b"\x00\x00\x00\x06\x00\x00\x00\x02OK"
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0
    assert f"INFO: starting server: unix:{path}" in stderr
    assert f"INFO: server stopped: unix:{path}" in stderr


@pytest.mark.parametrize(
    "command", [["mqmq", "--version"], ["mqmq", "get", "--version"], ["twistd", "mqmq", "--version"]]
)
def test_version_is_mqmqs(command: list[str], subprocess_env: dict[str, str]) -> None:
    import mqmq

    done = subprocess.run([bin_path(command[0]), *command[1:]], env=subprocess_env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"mqmq {mqmq.__version__}\n"


def test_every_package_of_mqmq_is_installed() -> None:
    # A package missing from setup.cfg works in the checkout and is missing
    # from every install (mqmq.redis once was).
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {
        ".".join(path.parent.relative_to(REPO_ROOT).parts)
        for path in (REPO_ROOT / "mqmq").rglob("__init__.py")
    }
    assert found <= listed, f"not in setup.cfg's packages: {sorted(found - listed)}"
