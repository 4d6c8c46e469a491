"""Shared fixtures: subprocess environments, servers on ports they chose, refused addresses."""

from __future__ import annotations

import json
import importlib.util
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import AsyncIterator, Callable, Iterator, Optional, Union

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from hypothesis import settings

from mqmq.server import reactor as lean_reactor

# The in-process tests run on the reactor `mqmq start` runs on by default,
# mqmq.server.reactor's LeanEPollReactor (pytest-twisted accepts it: it is an
# EPollReactor); MQMQ_TEST_REACTOR=default keeps Twisted's own.  Installed
# before anything imports twisted.internet.reactor.
TEST_REACTOR = os.environ.get("MQMQ_TEST_REACTOR", "mqmq-epoll")
if TEST_REACTOR == "mqmq-epoll" and lean_reactor.available():
    lean_reactor.install()

from twisted.internet import reactor  # noqa: E402  (after the install above)

from mqmq.server.service import MQService  # noqa: E402
from support import read_exactly  # noqa: E402
# The session's real Redis servers, for every module (the Redis store's
# wire tests among them).
from redis_support import redis_cluster, redis_prefix, redis_server  # noqa: E402,F401

# Machines are shared and noisy: no per-example time limit, which would fail
# a correct test on a slow moment.  Examples stay small, so runs stay short.
settings.register_profile("mqmq", deadline=None, print_blob=True)
settings.load_profile("mqmq")

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Longest a server may take to start listening.
START_DEADLINE = 10.0

#: What ``mqmq start`` and ``twistd mqmq`` log once listening, naming the
#: port they got (they are started on port 0: no port is guessed).
STARTED = re.compile(r"starting server: 127\.0\.0\.1:(\d+)")


@pytest.fixture(params=["memory", "sqlite", "redis"])
def both_stores(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """Runs a module's fake-transport servers (``wire.Server``) on each store,
    memory, SQLite and Redis (a real redis-server, each command answered at
    once): ``pytestmark = pytest.mark.usefixtures("both_stores")``."""
    if request.param == "sqlite":
        memory_only = request.node.get_closest_marker("memory_only")
        if memory_only is not None:
            pytest.skip(f"on the memory store only: {memory_only.args[0]}")
        monkeypatch.setenv("MQMQ_TEST_STORE", "sqlite")
        # Each server's database in a directory of its own under pytest's.
        monkeypatch.setenv("MQMQ_TEST_STORE_DIR", str(tmp_path_factory.mktemp("stores")))
    elif request.param == "redis":
        for marker in ("memory_only", "not_redis"):
            reason = request.node.get_closest_marker(marker)
            if reason is not None:
                pytest.skip(f"not on the Redis store: {reason.args[0]}")
        server = request.getfixturevalue("redis_server")
        monkeypatch.setenv("MQMQ_TEST_STORE", "redis")
        monkeypatch.setenv("MQMQ_TEST_REDIS", f"127.0.0.1:{server.port}")
    else:
        monkeypatch.delenv("MQMQ_TEST_STORE", raising=False)
    return str(request.param)


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The benchmarks' compiled load generator and floor (``loadgen``, ``floor``),
    built once from scratch, away from benchmarks/build/; skips without a C compiler."""
    bench = load_benchmark("bench")
    if bench.find_compiler() is None:
        pytest.skip("no C compiler found (cc, gcc or clang, or $CC): the benchmark's load "
                    "generator and floor server are C")
    return dict(bench.build_tools(str(tmp_path_factory.mktemp("bench-build")), quiet=True))


def run_keeping_signals(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """A benchmark tool's ``main(argv)``, which sets its own SIGTERM and SIGHUP
    handlers: the test process gets its own back afterwards."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return main(argv)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def load_benchmark(name: str) -> ModuleType:
    """A tool of ``benchmarks/`` (``bench``, ``crash``, ``durable`` ...), imported by its path."""
    spec = importlib.util.spec_from_file_location(f"mqmq_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def bin_path(name: str) -> str:
    """A console script installed beside this Python (twistd, mqmq)."""
    return str(Path(sys.executable).parent / name)


def default_signals() -> None:
    """``preexec_fn`` for servers the tests signal: default signal handling.

    A child inherits ignored signals: run as a background job, pytest has
    SIGINT ignored, and so would ``twistd`` (which then leaves it ignored).
    """
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def logged_port(
    read_log: Callable[[], str], process: subprocess.Popen, deadline: float = START_DEADLINE
) -> int:
    """The port a server started on ``127.0.0.1:0`` logged it got."""
    give_up = time.monotonic() + deadline
    while True:
        match = STARTED.search(read_log())
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            pytest.fail(f"server exited with status {process.returncode} before listening:\n"
                        f"{read_log()}")
        if time.monotonic() > give_up:
            pytest.fail(f"the server did not log its port within {deadline} s:\n{read_log()}")
        time.sleep(0.01)


@pytest.fixture
def refused_address() -> Iterator[str]:
    """``127.0.0.1:PORT`` where connections are refused for the whole test.

    The port is bound but not listening, so nothing else can take it.
    """
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield "127.0.0.1:%d" % holder.getsockname()[1]


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for entry points run as subprocesses, using this checkout.

    The checkout goes first on PYTHONPATH, so ``mqmq`` and ``twistd`` (which
    scans ``twisted/plugins`` on sys.path) run the code under test.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


#: A client command against a running server should finish well within this.
COMMAND_TIMEOUT = 15.0

Argument = Union[str, bytes]


class Processes:
    """Starts subprocesses with the checkout's environment; kills leftovers."""

    def __init__(self, env: dict[str, str], directory: Path) -> None:
        self.env = env
        self.directory = directory
        self.started: list[subprocess.Popen] = []
        self._count = 0

    def spawn(
        self, *argv: Argument, stdin: Optional[int] = subprocess.DEVNULL,
        stdout: Optional[int] = None,
    ) -> subprocess.Popen:
        """Start ``argv``; its stdout and stderr go to files (see :meth:`output`)."""
        self._count += 1
        stem = self.directory / f"proc{self._count}"
        with open(f"{stem}.out", "wb") as out, open(f"{stem}.err", "wb") as err:
            process = subprocess.Popen(
                argv, env=self.env, cwd=self.directory, stdin=stdin,
                stdout=out if stdout is None else stdout, stderr=err,
                preexec_fn=default_signals,
            )
        process.stem = stem  # type: ignore[attr-defined]
        self.started.append(process)
        return process

    @staticmethod
    def output(process: subprocess.Popen) -> tuple[bytes, str]:
        """What ``process`` wrote so far: stdout bytes, stderr text."""
        stem = process.stem  # type: ignore[attr-defined]
        return (
            Path(f"{stem}.out").read_bytes(),
            Path(f"{stem}.err").read_text(errors="replace"),
        )

    def run(self, *argv: Argument, input: Optional[bytes] = None,
            stdout: Optional[int] = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv,
            env=self.env,
            cwd=self.directory,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE,
            timeout=COMMAND_TIMEOUT,
            preexec_fn=default_signals,
        )

    def mqmq(self, *args: Argument, input: Optional[bytes] = None,
             stdout: Optional[int] = None) -> subprocess.CompletedProcess:
        return self.run(bin_path("mqmq"), *args, input=input, stdout=stdout)

    def start_server(self, *options: str, flag: str = "-addr") -> tuple[subprocess.Popen, str, int]:
        """``mqmq start`` on a port of its choosing: the process, its address and port."""
        process = self.spawn(bin_path("mqmq"), "start", flag, "127.0.0.1:0", *options)
        port = logged_port(lambda: self.output(process)[1], process)
        return process, f"127.0.0.1:{port}", port

    def start_twistd(self, *options: str) -> tuple[subprocess.Popen, str, int]:
        """``twistd -n mqmq`` on a port of its choosing, logging to stdout."""
        process = self.spawn(bin_path("twistd"), "-n", "--pidfile=", "mqmq",
                             "--addr", "127.0.0.1:0", *options)
        port = logged_port(lambda: self.output(process)[0].decode("utf-8", "replace"), process)
        return process, f"127.0.0.1:{port}", port

    def kill_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def procs(subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(subprocess_env, tmp_path)
    try:
        yield processes
    finally:
        processes.kill_all()


@pytest.fixture
def server(procs: Processes) -> Iterator[tuple[str, int]]:
    """A running ``mqmq start`` server: its address and port."""
    process, addr, port = procs.start_server()
    yield addr, port
    assert process.poll() is None, "the server died during the test"


def assert_one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``mqmq:`` line a failed command wrote, with nothing on stdout."""
    stderr = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mqmq:"), stderr
    assert not result.stdout
    return lines[0]


def _frame(*values: bytes) -> bytes:
    payload = b"".join(struct.pack(">I", len(value)) + value for value in values)
    return struct.pack(">I", len(payload)) + payload


def raw_info(port: int) -> dict:
    """The server's Info JSON, fetched over a plain socket (no mqmq client code)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_frame(b"Info"))
        (length,) = struct.unpack(">I", read_exactly(sock, 4))
        payload = read_exactly(sock, length)
        sock.sendall(_frame(b"Quit"))
    values = []
    while payload:
        (size,) = struct.unpack(">I", payload[:4])
        values.append(payload[4 : 4 + size])
        payload = payload[4 + size :]
    assert values[0] == b"OK"
    return json.loads(values[1])


def wait_until(condition: Callable[[], bool], deadline: float = START_DEADLINE) -> None:
    give_up = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail("condition not met in time")
        time.sleep(0.02)


def stop(process: subprocess.Popen, signal_number: int) -> int:
    """Send a signal; the exit status, which must come within 5 s."""
    process.send_signal(signal_number)
    try:
        return process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process still running 5 s after signal {signal_number}")


@pytest_twisted.async_yield_fixture
async def loopback_service() -> AsyncIterator[MQService]:
    """A server in this process, on the global reactor, on a loopback port
    the system chose (``service.ports[0].getHost().port``)."""
    service = MQService(reactor, ["tcp:0:interface=127.0.0.1"])
    service.startService()
    try:
        yield service
    finally:
        await service.stopService()
