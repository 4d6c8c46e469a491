"""The original Go client, unchanged, against this server while other clients
use the extension (``Reserve``/``Ack``/``Release``/``Touch``/``Bury``/``Kick``)
on the same server, on the same queues and on others.

The original ships one command-line tool, ``mqmq start|info -addr ADDR``: it
has no ``put`` or ``get``.  Its ``Put`` and ``Get`` are in its client library
(``client.go``), so the test builds a small driver, :data:`DRIVER`, that
imports that library as it is and runs its ``Put``, ``Get`` and ``Info`` on
one connection, one request per line of its input.  ``info`` goes through
the original's own tool as well.

Needs, else skips:

- ``MQMQ_GO_SRC``: a checkout of github.com/leobcn/mqmq (or of
  disintegration/mqmq). Its library files are copied, with a ``go.mod`` of
  our own (it has none) and the driver, and built with ``go`` ($GO, else on
  PATH) and the standard library only, offline (``GOPROXY=off``).
- ``MQMQ_GO_BIN`` (else ``mqmq-go`` on PATH; else built from ``MQMQ_GO_SRC``):
  the original's tool, for ``info``.

See benchmarks/README.md, "The original Go server", for the build.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import socket
import subprocess
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import pytest

from conftest import COMMAND_TIMEOUT, Processes, load_benchmark, raw_info, wait_until

crash = load_benchmark("crash")

#: The driver: the Go client library, unchanged, behind a line protocol.
#: In: ``put QHEX MHEX``, ``get QHEX TIMEOUT_MS``, ``info``, ``quit``.
#: Out, a line each: ``ok``; ``msg HEX ELAPSED_US``; ``timeout ELAPSED_US``;
#: ``info JSON`` (the ServerInfo the library decoded, encoded again);
#: ``err TEXT`` (any error the library returned).
DRIVER = r'''
package main

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/disintegration/mqmq"
)

func main() {
	out := bufio.NewWriter(os.Stdout)
	reply := func(format string, args ...interface{}) {
		fmt.Fprintf(out, format+"\n", args...)
		out.Flush()
	}
	c := mqmq.NewClient()
	if err := c.Connect(os.Args[1]); err != nil {
		reply("err %s", err)
		os.Exit(1)
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<27)
	for in.Scan() {
		words := strings.Split(in.Text(), " ")
		switch words[0] {
		case "put":
			queue, _ := hex.DecodeString(words[1])
			message, _ := hex.DecodeString(words[2])
			if err := c.Put(string(queue), message); err != nil {
				reply("err %s", err)
			} else {
				reply("ok")
			}
		case "get":
			queue, _ := hex.DecodeString(words[1])
			ms, _ := strconv.Atoi(words[2])
			start := time.Now()
			message, err := c.Get(string(queue), time.Duration(ms)*time.Millisecond)
			elapsed := time.Since(start) / time.Microsecond
			if err == mqmq.ErrTimeout {
				reply("timeout %d", elapsed)
			} else if err != nil {
				reply("err %s", err)
			} else {
				reply("msg %s %d", hex.EncodeToString(message), elapsed)
			}
		case "info":
			info, err := c.Info()
			if err != nil {
				reply("err %s", err)
			} else {
				encoded, _ := json.Marshal(info)
				reply("info %s", encoded)
			}
		case "quit":
			c.Disconnect()
			return
		default:
			reply("err unknown driver command %q", words[0])
		}
	}
}
'''

STORES = ["memory", "sqlite"]


class GoTools(NamedTuple):
    cli: str  # the original's `mqmq` tool
    driver: str  # DRIVER, built against the original's client library


def _go_source() -> Path:
    source = os.environ.get("MQMQ_GO_SRC")
    if not source:
        pytest.skip("MQMQ_GO_SRC is not set: point it at a checkout of github.com/leobcn/mqmq "
                    "(see benchmarks/README.md, 'The original Go server')")
    path = Path(source)
    if not (path / "client.go").is_file():
        pytest.skip(f"MQMQ_GO_SRC={source} holds no client.go: not the Go mqmq's source")
    return path


def _go_build(go: str, directory: Path, package: str, output: Path) -> None:
    env = dict(os.environ, GOFLAGS="-mod=mod", GOPROXY="off", GOWORK="off", GO111MODULE="on",
               CGO_ENABLED="0")
    result = subprocess.run([go, "build", "-o", str(output), package], cwd=directory, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"go build {package} failed:\n{result.stdout.decode(errors='replace')}")


@pytest.fixture(scope="session")
def go_tools(tmp_path_factory: pytest.TempPathFactory) -> GoTools:
    cli = os.environ.get("MQMQ_GO_BIN") or shutil.which("mqmq-go")
    if cli is not None and not os.access(cli, os.X_OK):
        pytest.skip(f"MQMQ_GO_BIN={cli} is not an executable")
    source = _go_source()
    go = os.environ.get("GO") or shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (`go` on PATH, or $GO) to build the Go client driver")
    # The library as it is, in a module of our own (the original has no go.mod).
    tree = tmp_path_factory.mktemp("go-mqmq")
    for path in source.glob("*.go"):
        if not path.name.endswith("_test.go"):
            shutil.copy(path, tree / path.name)
    (tree / "go.mod").write_text("module github.com/disintegration/mqmq\n\ngo 1.19\n")
    (tree / "cmd" / "goclient").mkdir(parents=True)
    (tree / "cmd" / "goclient" / "main.go").write_text(DRIVER)
    _go_build(go, tree, "./cmd/goclient", tree / "goclient")
    if cli is None:
        shutil.copytree(source / "cmd" / "mqmq", tree / "cmd" / "mqmq")
        _go_build(go, tree, "./cmd/mqmq", tree / "mqmq-go")
        cli = str(tree / "mqmq-go")
    return GoTools(cli=cli, driver=str(tree / "goclient"))


class GoClient:
    """One connection of the Go client library, through :data:`DRIVER`."""

    def __init__(self, procs: Processes, driver: str, addr: str) -> None:
        self.process = procs.spawn(driver, addr, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buffer = b""

    def _line(self) -> str:
        assert self.process.stdout is not None
        give_up = time.monotonic() + COMMAND_TIMEOUT
        while b"\n" not in self._buffer:
            left = give_up - time.monotonic()
            if left <= 0:
                pytest.fail("the Go client gave no answer in time")
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 1 << 20)
                if not chunk:
                    pytest.fail(f"the Go client exited: {Processes.output(self.process)[1]}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def send(self, *words: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(" ".join(words).encode() + b"\n")
        self.process.stdin.flush()

    def answer(self) -> list[str]:
        return self._line().split(" ", 1)

    def put(self, queue: bytes, message: bytes) -> None:
        self.send("put", queue.hex(), message.hex())
        assert self.answer() == ["ok"]

    def send_get(self, queue: bytes, timeout_ms: int) -> None:
        self.send("get", queue.hex(), str(timeout_ms))

    def got(self) -> tuple[Optional[bytes], float]:
        """A ``Get``'s outcome: the message (None for ErrTimeout) and how long it took, in s."""
        words = self.answer()
        if words[0] == "timeout":
            return None, int(words[1]) / 1e6
        assert words[0] == "msg", words
        message, elapsed = words[1].split(" ")
        return bytes.fromhex(message), int(elapsed) / 1e6

    def get(self, queue: bytes, timeout_ms: int = 1000) -> Optional[bytes]:
        self.send_get(queue, timeout_ms)
        return self.got()[0]

    def info(self) -> dict:
        self.send("info")
        kind, encoded = self.answer()
        assert kind == "info", encoded
        return json.loads(encoded)

    def quit(self) -> None:
        self.send("quit")
        assert self.process.wait(COMMAND_TIMEOUT) == 0


class Delivery(NamedTuple):
    message: bytes
    id: bytes
    deliveries: int


class Ext:
    """A blocking connection speaking the extension (benchmarks/crash.py's framing)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=COMMAND_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, *values: bytes) -> None:
        self.sock.sendall(crash.frame(*values))

    def reply(self) -> list[bytes]:
        return crash.read_reply(self.sock)

    def request(self, *values: bytes) -> list[bytes]:
        self.send(*values)
        return self.reply()

    def ok(self, *values: bytes) -> None:
        reply = self.request(*values)
        assert reply == [b"OK"], (values, reply)

    def put(self, queue: bytes, message: bytes) -> None:
        self.ok(b"Put", queue, message)

    def delivery(self) -> Optional[Delivery]:
        reply = self.reply()
        if reply == [b"Timeout"]:
            return None
        assert reply[0] == b"OK" and len(reply) == 4, reply
        return Delivery(reply[1], reply[2], int(reply[3]))

    def reserve(self, queue: bytes, timeout_ms: int = 1000, lease_ms: int = 30000) -> Optional[Delivery]:
        self.send(b"Reserve", queue, b"%d" % timeout_ms, b"%d" % lease_ms)
        return self.delivery()

    def take(self, queue: bytes) -> Delivery:
        """A ``Reserve`` that must deliver."""
        delivery = self.reserve(queue)
        assert delivery is not None, f"nothing to reserve on {queue!r}"
        return delivery

    def kick(self, queue: bytes, count: int) -> int:
        reply = self.request(b"Kick", queue, b"%d" % count)
        assert reply[0] == b"OK", reply
        return int(reply[1])

    def info(self) -> dict:
        reply = self.request(b"Info")
        assert reply[0] == b"OK", reply
        return json.loads(reply[1])

    def close(self) -> None:
        self.sock.close()


class Churn(threading.Thread):
    """Extension traffic on a queue of its own, cycle after cycle, until stopped;
    each cycle leaves the queue empty, nothing reserved, nothing buried."""

    def __init__(self, port: int, queue: bytes) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.queue = queue
        self.cycles = 0
        self.errors: list[str] = []
        self._changed = threading.Condition()
        self._pause = False
        self._idle = False
        self._done = False
        self._stopping = False

    def run(self) -> None:
        try:
            ext = Ext(self.port)
            try:
                while True:
                    with self._changed:
                        while self._pause and not self._stopping:
                            self._idle = True
                            self._changed.notify_all()
                            self._changed.wait()
                        self._idle = False
                        if self._stopping:
                            break
                    self.cycle(ext, self.cycles)
                    with self._changed:
                        self.cycles += 1
                        self._changed.notify_all()
            finally:
                ext.close()
        except BaseException:
            self.errors.append(traceback.format_exc())
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def cycle(self, ext: Ext, n: int) -> None:
        q = self.queue
        a, b, c = (b"churn %d %s" % (n, letter) for letter in (b"a", b"b", b"c"))
        for message in (a, b, c):
            ext.put(q, message)
        ra, rb, rc = ext.take(q), ext.take(q), ext.take(q)
        assert (ra.message, rb.message, rc.message) == (a, b, c)
        ext.ok(b"Touch", q, rb.id, b"30000")
        ext.ok(b"Release", q, ra.id, b"0")
        ext.ok(b"Bury", q, rc.id)
        again = ext.take(q)
        assert again.message == a and again.deliveries == 2
        ext.ok(b"Ack", q, again.id)
        ext.ok(b"Ack", q, rb.id)
        assert ext.kick(q, 1) == 1
        kicked = ext.take(q)
        assert kicked.message == c
        ext.ok(b"Ack", q, kicked.id)
        assert ext.reserve(q, timeout_ms=1) is None

    def _wait(self, condition, what: str) -> None:  # type: ignore[no-untyped-def]
        with self._changed:
            if not self._changed.wait_for(lambda: condition() or self._done, COMMAND_TIMEOUT):
                pytest.fail(f"extension traffic: {what} did not happen in time")
        assert not self.errors, self.errors[0]

    def wait_cycles(self, count: int) -> None:
        """Until ``count`` cycles have run (a poll on a condition, not a sleep)."""
        self._wait(lambda: self.cycles >= count, f"{count} cycles")

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Between cycles: the churn queue is empty while this holds."""
        with self._changed:
            self._pause = True
            self._changed.notify_all()
        self._wait(lambda: self._idle, "a pause")
        try:
            yield
        finally:
            with self._changed:
                self._pause = False
                self._changed.notify_all()

    def stop(self) -> int:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self.join(COMMAND_TIMEOUT)
        assert not self.is_alive(), "the extension traffic did not stop"
        assert not self.errors, self.errors[0]
        return self.cycles


@dataclass
class Setup:
    procs: Processes
    server: subprocess.Popen
    addr: str
    port: int
    tools: GoTools
    store_options: tuple[str, ...]


@pytest.fixture(params=STORES)
def setup(request: pytest.FixtureRequest, procs: Processes, go_tools: GoTools,
          tmp_path: Path) -> Iterator[Setup]:
    options: tuple[str, ...] = ()
    if request.param == "sqlite":
        options = ("--store", f"sqlite:{tmp_path / 'queues.db'}")
    server, addr, port = procs.start_server(*options)
    setup = Setup(procs, server, addr, port, go_tools, options)
    yield setup
    assert setup.server.poll() is None, f"the server died: {Processes.output(setup.server)[1]}"


@contextmanager
def churning(port: int, queue: bytes = b"ext-churn") -> Iterator[Churn]:
    churn = Churn(port, queue)
    churn.start()
    try:
        yield churn
    finally:
        churn.stop()


def original_view(info: dict) -> dict:
    """What the original's ServerInfo holds of an Info JSON: its four keys, and
    each queue's NumMessages (Go's json.Unmarshal drops unknown keys)."""
    return {
        "NumConnections": info["NumConnections"],
        "NumQueues": info["NumQueues"],
        "NumMessages": info["NumMessages"],
        "Queues": {name: {"NumMessages": q["NumMessages"]} for name, q in info["Queues"].items()},
    }


def cli_info(setup: Setup) -> tuple[dict, str]:
    """``mqmq-go info -addr ADDR``'s output, parsed back into original_view's shape."""
    result = setup.procs.run(setup.tools.cli, "info", "-addr", setup.addr)
    text = result.stdout.decode("utf-8")
    assert result.returncode == 0, text + result.stderr.decode(errors="replace")
    match = re.fullmatch(r"Number of connections: (\d+)\nNumber of queues: (\d+)\n"
                         r"Number of messages: (\d+)\n((?:Queues:\n(?:        .*: \d+\n)*)?)", text)
    assert match, repr(text)
    queues = {}
    for line in match.group(4).splitlines()[1:]:
        name, count = line[8:].rsplit(": ", 1)
        queues[name] = {"NumMessages": int(count)}
    parsed = {"NumConnections": int(match.group(1)), "NumQueues": int(match.group(2)),
              "NumMessages": int(match.group(3)), "Queues": queues}
    return parsed, text


# Messages that must come back byte for byte: empty, binary, not UTF-8, large.
_rng = random.Random(20261127)
ODD_MESSAGES = [
    b"",
    b"\x00",
    bytes(range(256)),
    b"\xff\xfe not utf-8 \xc3\x28",
    "h\u00e9llo \u2028 <&> \U0001f600".encode(),
    b"OK",
    b"Timeout",
    b"\x00\x00\x00\x04Put\x00",  # looks like framing
    bytes(_rng.getrandbits(8) for _ in range(65536)),
    bytes(_rng.getrandbits(8) for _ in range(1 << 20)),
]


def test_info_before_any_extension_is_the_originals(setup: Setup) -> None:
    """Before anything was reserved or buried, Info is the original's: no extended
    keys, and the Go client and tool read it as the Python client does."""
    go = GoClient(setup.procs, setup.tools.driver, setup.addr)
    go.put(b"plain", b"one")
    go.put(b"plain", b"two")
    asker = Ext(setup.port)  # held open: every count below is exact
    raw = asker.info()
    assert "NumReserved" not in raw and "NumReserved" not in raw["Queues"]["plain"]
    expected = {"NumConnections": 2, "NumQueues": 1, "NumMessages": 2,
                "Queues": {"plain": {"NumMessages": 2}}}
    assert raw == expected
    assert go.info() == expected
    parsed, _ = cli_info(setup)
    assert parsed == dict(expected, NumConnections=3)  # the tool's own connection
    assert [go.get(b"plain"), go.get(b"plain")] == [b"one", b"two"]
    asker.close()
    go.quit()


def test_go_round_trip_fifo_while_extension_runs(setup: Setup) -> None:
    """Go's Put and Get on its own queues, byte for byte and first in first out,
    with extension traffic on another queue between its Puts and its Gets."""
    go = GoClient(setup.procs, setup.tools.driver, setup.addr)
    with churning(setup.port) as churn:
        churn.wait_cycles(2)  # the extended Info keys exist from here on
        assert "NumReserved" in raw_info(setup.port)
        queues = [b"go-fifo", b"", b"go-\xff\xfe", b"q" * 1024]
        numbered = [b"message #%d" % i for i in range(300)]
        for message in ODD_MESSAGES + numbered:
            go.put(b"go-fifo", message)
        for queue in queues[1:]:
            go.put(queue, b"in " + queue)
        started = churn.cycles
        churn.wait_cycles(started + 2)  # extension traffic while Go's messages wait
        got = [go.get(b"go-fifo") for _ in range(len(ODD_MESSAGES) + len(numbered))]
        assert got == ODD_MESSAGES + numbered
        for queue in queues[1:]:
            assert go.get(queue, 0) == b"in " + queue  # timeout 0 with a message: OK at once
        for queue in queues:
            assert go.get(queue, 0) is None
        # Long-waiting Gets are answered by a Put from the other side.
        ext = Ext(setup.port)
        go.send_get(b"go-wait", 10000)
        ext.put(b"go-wait", b"woken")
        assert go.got()[0] == b"woken"
        ext.close()
        assert churn.cycles > started
    go.quit()


def test_go_get_timeouts_unchanged(setup: Setup) -> None:
    """ErrTimeout after the timeout asked, 0 and negative meaning 1 ms, whether
    or not the queue's messages are reserved or buried by someone else."""
    go = GoClient(setup.procs, setup.tools.driver, setup.addr)
    ext = Ext(setup.port)
    with churning(setup.port):
        for timeout_ms in (0, -5, 1):
            go.send_get(b"empty", timeout_ms)
            message, elapsed = go.got()
            assert message is None and elapsed < 1.0
        go.send_get(b"empty", 300)
        message, elapsed = go.got()
        assert message is None and 0.299 <= elapsed < 0.3 + COMMAND_TIMEOUT / 2
        # A queue whose only messages are reserved or buried is empty to Get.
        go.put(b"held", b"reserved")
        go.put(b"held", b"buried")
        reserved, buried = ext.take(b"held"), ext.take(b"held")
        ext.ok(b"Bury", b"held", buried.id)
        go.send_get(b"held", 200)
        message, elapsed = go.got()
        assert message is None and elapsed >= 0.199
        ext.ok(b"Ack", b"held", reserved.id)
        assert ext.kick(b"held", 10) == 1
        assert go.get(b"held") == b"buried"
    ext.close()
    go.quit()


def test_go_messages_reserved_by_extension(setup: Setup) -> None:
    """Go puts, Python reserves and acks, releases, buries, kicks on the same
    queue; Go's Gets see exactly what is ready, in order, intact; acked
    messages never come back."""
    go = GoClient(setup.procs, setup.tools.driver, setup.addr)
    ext = Ext(setup.port)
    q = b"shared"
    m = [b"go %d " % i + ODD_MESSAGES[i] for i in range(6)]
    with churning(setup.port):
        for message in m:
            go.put(q, message)
        d = [ext.take(q) for _ in range(4)]
        assert [(x.message, x.deliveries) for x in d] == [(message, 1) for message in m[:4]]
        assert go.info()["Queues"][q.decode()] == {"NumMessages": 2}
        assert raw_info(setup.port)["Queues"]["shared"] == {
            "NumMessages": 2, "NumReserved": 4, "NumBuried": 0}
        assert go.get(q) == m[4]
        ext.ok(b"Ack", q, d[0].id)
        ext.ok(b"Release", q, d[1].id, b"0")  # back to the front
        ext.ok(b"Bury", q, d[2].id)
        assert go.get(q) == m[1]
        assert go.get(q) == m[5]
        assert go.get(q, 100) is None  # d[2] buried, d[3] reserved
        assert ext.kick(q, 5) == 1
        assert go.get(q) == m[2]
        ext.ok(b"Ack", q, d[3].id)
        assert go.get(q, 100) is None
        assert ext.request(b"Ack", q, d[0].id) == [b"Error", b"REQUEST_UNKNOWN_ID"]
        assert raw_info(setup.port)["Queues"]["shared"] == {
            "NumMessages": 0, "NumReserved": 0, "NumBuried": 0}

        # A Reserve waiting when Go puts: the Go message arrives intact, is acked.
        ext.send(b"Reserve", b"handoff", b"10000", b"30000")
        go.put(b"handoff", ODD_MESSAGES[-1])
        waited = ext.delivery()
        assert waited is not None and waited.message == ODD_MESSAGES[-1]
        ext.ok(b"Ack", b"handoff", waited.id)
        # A Go Get waiting when Python releases: Go gets the message.
        go.put(b"wake", b"to be released")
        held = ext.take(b"wake")
        go.send_get(b"wake", 10000)
        ext.ok(b"Release", b"wake", held.id, b"0")
        assert go.got()[0] == b"to be released"
        # A reservation whose connection closes unacked goes back to Go.
        go.put(b"orphan", b"first")
        go.put(b"orphan", b"second")
        other = Ext(setup.port)
        assert other.take(b"orphan").message == b"first"
        other.close()
        wait_until(lambda: raw_info(setup.port)["Queues"]["orphan"]["NumReserved"] == 0)
        go.send_get(b"orphan", 10000)
        assert go.got()[0] == b"first"
        assert go.get(b"orphan") == b"second"
        assert go.get(b"handoff", 100) is None
    ext.close()
    go.quit()


def test_go_info_with_extended_keys(setup: Setup) -> None:
    """With NumReserved/NumBuried in Info, the Go client and tool read the
    original's four figures exactly as the server counts them (NumMessages:
    ready messages only)."""
    go = GoClient(setup.procs, setup.tools.driver, setup.addr)
    ext = Ext(setup.port)
    with churning(setup.port) as churn:
        churn.wait_cycles(1)
        for message in (b"r", b"b", b"ready 1", b"ready 2"):
            go.put(b"mixed", message)
        reserved, buried = ext.take(b"mixed"), ext.take(b"mixed")
        ext.ok(b"Bury", b"mixed", buried.id)
        go.put(b"go \xff <&>", b"x")
        with churn.paused():
            raw = ext.info()
            assert raw["NumReserved"] == 1 and raw["NumBuried"] == 1
            assert raw["Queues"]["mixed"] == {"NumMessages": 2, "NumReserved": 1, "NumBuried": 1}
            # Connections: the Go client, ext, the churn's.
            expected = original_view(raw)
            assert expected["NumConnections"] == 3
            assert go.info() == expected
            parsed, text = cli_info(setup)
            assert parsed == dict(expected, NumConnections=4), text  # and the tool's
            assert "        go \ufffd <&>: 1\n" in text
    ext.close()
    go.quit()


@pytest.mark.parametrize("setup", ["sqlite"], indirect=True)
def test_sqlite_restart_after_go_and_extension(setup: Setup) -> None:
    """On a durable store, killed (SIGKILL) while Python holds a Go message
    reserved: after a restart the one Python acked stays gone, the reserved
    one is back in front, and the Go client gets them all intact, in order."""
    go = GoClient(setup.procs, setup.tools.driver, setup.addr)
    ext = Ext(setup.port)
    with churning(setup.port):
        for message in ODD_MESSAGES:
            go.put(b"durable", message)
        acked, held = ext.take(b"durable"), ext.take(b"durable")
        ext.ok(b"Ack", b"durable", acked.id)
        assert held.message == ODD_MESSAGES[1]
    go.quit()
    setup.server.kill()  # with the reservation held
    setup.server.wait()
    ext.close()
    setup.server, setup.addr, setup.port = setup.procs.start_server(*setup.store_options)
    go = GoClient(setup.procs, setup.tools.driver, setup.addr)
    got = [go.get(b"durable") for _ in ODD_MESSAGES[1:]]
    assert got == ODD_MESSAGES[1:]
    assert go.get(b"durable", 100) is None
    assert original_view(raw_info(setup.port))["Queues"]["durable"] == {"NumMessages": 0}
    go.quit()
