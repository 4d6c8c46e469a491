"""``mqmq put|get|info`` at their edges: odd bytes, full disks, Ctrl-C, big messages.

Run as a user runs them, against ``mqmq start`` on a loopback port it chose.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import (
    COMMAND_TIMEOUT,
    Processes,
    assert_one_error_line,
    bin_path,
    logged_port,
    raw_info,
    wait_until,
)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

MiB = 1024 * 1024
#: The protocol's largest message, the default of --max-message-bytes.
MAX_MESSAGE = 32 * MiB


# --- the bytes the shell passed -------------------------------------------------------


def test_queue_name_and_message_that_are_not_utf8_round_trip(
    procs: Processes, server: tuple[str, int]
) -> None:
    addr, port = server
    put = procs.mqmq("put", "-addr", addr, b"q\xff", b"\xfe\xfdm")
    assert put.returncode == 0, put.stderr
    assert raw_info(port)["Queues"] == {"q\ufffd": {"NumMessages": 1}}
    get = procs.mqmq("get", "-addr", addr, b"q\xff")
    assert get.returncode == 0, get.stderr
    assert get.stdout == b"\xfe\xfdm"


def test_a_longest_queue_name_is_taken(procs: Processes, server: tuple[str, int]) -> None:
    addr, _ = server
    name = "é" * 512  # 1024 bytes in UTF-8
    assert procs.mqmq("put", "-addr", addr, name, "m").returncode == 0
    assert procs.mqmq("get", "-addr", addr, name).stdout == b"m"


# --- bad arguments: status 2 ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, said",
    [
        (("info", "--addr="), "--addr is empty"),
        (("put", "--addr=", "q", "m"), "--addr is empty"),
        (("get", "-addr", "", "q"), "--addr is empty"),
        (("put", "q" * 1025, "m"), "queue name of 1025 bytes"),
        (("get", "é" * 513), "queue name of 1026 bytes"),
        (("put", "--max-message-bytes", "0", "q", "m"), "would refuse every message"),
        (("get", "--max-message-bytes", "0", "q"), "would refuse every message"),
        (("get", "--max-message-bytes", "5XB", "q"), "invalid size '5XB'"),
        (("put", "--max-message-bytes", "4", "q", "12345"), "message too large"),
    ],
    ids=["info-empty-addr", "put-empty-addr", "get-empty-addr", "put-long-queue",
         "get-long-queue", "put-limit-0", "get-limit-0", "get-bad-limit", "put-over-limit"],
)
def test_bad_arguments_exit_2(
    procs: Processes, refused_address: str, args: tuple[str, ...], said: str
) -> None:
    command, *rest = args
    if "--addr=" not in rest and "-addr" not in rest:
        rest = ["-addr", refused_address, *rest]
    result = procs.mqmq(command, *rest)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert said in assert_one_error_line(result)


# --- writing to standard output fails --------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("command", ["get", "info"])
def test_a_failed_write_to_stdout_is_one_line(
    procs: Processes, server: tuple[str, int], command: str
) -> None:
    addr, _ = server
    assert procs.mqmq("put", "-addr", addr, "q", "hello").returncode == 0
    with open("/dev/full", "wb") as full:
        result = procs.mqmq(command, "-addr", addr, *(["q"] if command == "get" else []),
                            stdout=full.fileno())
    assert result.returncode == EXIT_FAILURE
    # One line: no traceback, and no "Exception ignored" from Python's exit.
    line = assert_one_error_line(result)
    assert "standard output" in line and os.strerror(28) in line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_message_get_could_not_write_stays_in_its_queue(
    procs: Processes, server: tuple[str, int]
) -> None:
    addr, port = server
    assert procs.mqmq("put", "-addr", addr, "q", "precious").returncode == 0
    with open("/dev/full", "wb") as full:
        result = procs.mqmq("get", "-addr", addr, "q", stdout=full.fileno())
    assert result.returncode == EXIT_FAILURE
    assert "given back to the server" in assert_one_error_line(result)
    assert raw_info(port)["Queues"]["q"]["NumMessages"] == 1
    assert procs.mqmq("get", "-addr", addr, "q").stdout == b"precious"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_get_no_ack_takes_it_with_a_plain_get(procs: Processes, server: tuple[str, int]) -> None:
    addr, port = server
    assert procs.mqmq("put", "-addr", addr, "q", "gone").returncode == 0
    with open("/dev/full", "wb") as full:
        result = procs.mqmq("get", "-addr", addr, "--no-ack", "q", stdout=full.fileno())
    assert result.returncode == EXIT_FAILURE
    # At most once: the message went out with the reply, and is gone.
    assert raw_info(port)["Queues"] == {"q": {"NumMessages": 0}}


def test_get_falls_back_to_a_plain_get_where_reserve_is_not_served(procs: Processes) -> None:
    # A server that refuses Reserve as an unknown command and closes, as the
    # original server does.
    original = procs.spawn(sys.executable, Path(__file__).parent / "original_server.py")
    port = logged_port(lambda: procs.output(original)[1], original)
    addr = f"127.0.0.1:{port}"
    assert procs.mqmq("put", "-addr", addr, "q", "old style").returncode == 0
    result = procs.mqmq("get", "-addr", addr, "q")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"old style", b"")
    kick = procs.mqmq("kick", "-addr", addr, "q")
    assert kick.returncode == EXIT_FAILURE
    assert "does not support acknowledged delivery" in assert_one_error_line(kick)


def test_kick_prints_how_many_came_back(procs: Processes, server: tuple[str, int]) -> None:
    addr, _ = server
    kick = procs.mqmq("kick", "-addr", addr, "q", "3")
    assert (kick.returncode, kick.stdout, kick.stderr) == (0, b"0\n", b"")
    for count in ("none", "\u00b2"):  # a superscript two is a digit to str.isdigit
        bad = procs.mqmq("kick", "-addr", addr, "q", count)
        assert bad.returncode == EXIT_USAGE
        assert "COUNT" in assert_one_error_line(bad)


# --- Ctrl-C ---------------------------------------------------------------------------


def test_ctrl_c_while_get_waits_exits_130_quietly(
    procs: Processes, server: tuple[str, int]
) -> None:
    addr, port = server
    getter = procs.spawn(bin_path("mqmq"), "get", "-addr", addr, "-timeout", "60s", "wait")
    wait_until(lambda: "wait" in raw_info(port)["Queues"])  # the Get waits on the server
    getter.send_signal(signal.SIGINT)
    assert getter.wait(timeout=5) == EXIT_INTERRUPTED
    assert procs.output(getter) == (b"", "")
    # The server saw the consumer go: a message put now stays queued.
    wait_until(lambda: raw_info(port)["NumConnections"] == 1)
    assert procs.mqmq("put", "-addr", addr, "wait", "kept").returncode == 0
    assert raw_info(port)["Queues"] == {"wait": {"NumMessages": 1}}


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    """A pseudo-terminal: (controller, terminal) file descriptors."""
    controller, term = os.openpty()
    try:
        yield controller, term
    finally:
        os.close(controller)
        os.close(term)


def unread(term: int) -> int:
    """Bytes typed on the terminal that nobody has read yet."""
    return int.from_bytes(fcntl.ioctl(term, termios.FIONREAD, b"\0\0\0\0"), "little")


def test_ctrl_c_while_put_reads_a_terminal_exits_130_quietly(
    procs: Processes, server: tuple[str, int], terminal: tuple[int, int]
) -> None:
    addr, port = server
    controller, term = terminal
    # A line typed before the command starts (the terminal takes it in
    # asynchronously), then taken by it: the command is reading the terminal.
    os.write(controller, b"half a message\n")
    wait_until(lambda: unread(term) > 0)
    putter = procs.spawn(bin_path("mqmq"), "put", "-addr", addr, "typed", stdin=term)
    wait_until(lambda: unread(term) == 0)
    # The line gone from the terminal is not enough: a slow start-up (PyPy)
    # may still be before the read; Ctrl-C is pressed once it blocks there.
    wait_until(lambda: reading_standard_input(putter.pid))
    putter.send_signal(signal.SIGINT)
    try:
        status = putter.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("mqmq put ignored Ctrl-C")
    assert status == EXIT_INTERRUPTED
    assert procs.output(putter) == (b"", "")
    assert "typed" not in raw_info(port)["Queues"]


# --- messages over the limit ------------------------------------------------------------


def feed(process: subprocess.Popen, data: bytes) -> threading.Thread:
    """Write ``data`` to the process's stdin from a thread, leaving it open."""

    def write() -> None:
        assert process.stdin is not None
        try:
            process.stdin.write(data)
            process.stdin.flush()
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


def reading_standard_input(pid: int) -> bool:
    """True while the process is blocked in read(2) on its descriptor 0
    (Linux's /proc/PID/syscall: the call's number, then its arguments)."""
    try:
        with open(f"/proc/{pid}/syscall") as status:
            fields = status.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == "0" and fields[1] == "0x0"


@pytest.mark.parametrize("limit", [None, "1KiB"])
def test_put_refuses_a_message_over_the_limit_before_reading_it_all(
    procs: Processes, server: tuple[str, int], limit: str
) -> None:
    addr, port = server
    size = MAX_MESSAGE if limit is None else 1024
    options = [] if limit is None else ["--max-message-bytes", limit]
    putter = procs.spawn(bin_path("mqmq"), "put", "-addr", addr, *options, "big",
                         stdin=subprocess.PIPE)
    # One byte over, and standard input left open: the command must not
    # wait for its end to know the message is too large.
    writer = feed(putter, b"x" * (size + 1))
    try:
        status = putter.wait(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("mqmq put kept reading past the limit")
    finally:
        assert putter.stdin is not None
        putter.stdin.close()
        writer.join(5)
    stdout, stderr = procs.output(putter)
    assert status == EXIT_FAILURE
    assert stdout == b"" and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("mqmq: message too large"), stderr
    assert "big" not in raw_info(port)["Queues"]


def test_a_message_the_server_refuses_as_too_large_says_so(procs: Processes) -> None:
    _, addr, port = procs.start_server("--max-message-bytes", "1KiB")
    result = procs.mqmq("put", "-addr", addr, "q", "x" * 1025)
    assert result.returncode == EXIT_FAILURE
    line = assert_one_error_line(result)
    assert line.startswith("mqmq: message too large") and "REQUEST_MESSAGE_TOO_LARGE" in line
    assert raw_info(port)["NumMessages"] == 0


def test_a_message_over_the_protocols_frame_closing_the_connection_says_too_large(
    procs: Processes, server: tuple[str, int]
) -> None:
    addr, _ = server
    result = procs.mqmq("put", "-addr", addr, "--max-message-bytes", "40MiB", "q",
                        input=b"x" * (MAX_MESSAGE + MiB))
    assert result.returncode == EXIT_FAILURE
    assert assert_one_error_line(result).startswith("mqmq: message too large")


def test_max_message_bytes_for_a_server_that_allows_more(procs: Processes) -> None:
    _, addr, _ = procs.start_server("--max-message-bytes", "40MiB")
    message = bytes(range(256)) * ((MAX_MESSAGE + MiB) // 256)
    put = procs.mqmq("put", "-addr", addr, "--max-message-bytes", "40MiB", "big", input=message)
    assert put.returncode == 0, put.stderr
    get = procs.mqmq("get", "-addr", addr, "--max-message-bytes", "40MiB", "big")
    assert get.returncode == 0, get.stderr
    assert get.stdout == message
    # Without the option, the default limit refuses it cleanly.
    assert procs.mqmq("put", "-addr", addr, "--max-message-bytes", "40MiB", "big",
                      input=message).returncode == 0
    started = time.monotonic()
    refused = procs.mqmq("get", "-addr", addr, "big")
    assert refused.returncode == EXIT_FAILURE
    assert_one_error_line(refused)
    assert time.monotonic() - started < COMMAND_TIMEOUT


def test_every_long_option_may_take_one_dash_go_style_hyphenated_ones_too() -> None:
    from mqmq import cli

    assert cli._go_style_flags(
        ["-addr", "a:1", "-no-ack", "-max-message-bytes=1KiB", "-log-format", "json", "-a", "-", "-5", "--cert", "c"]
    ) == ["--addr", "a:1", "--no-ack", "--max-message-bytes=1KiB", "--log-format", "json", "-a", "-", "-5",
          "--cert", "c"]
