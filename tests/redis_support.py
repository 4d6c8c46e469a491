"""Real Redis servers for the tests: one server and a three-master cluster,
each a ``redis-server`` subprocess on free loopback ports, in a directory of
its own; session fixtures, and unique key prefixes so tests sharing them
keep apart (nothing is ever flushed).

conftest.py imports the fixtures, so every module has them; a test module
must not import them again: pytest would then start a second server."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

#: Longest a server (or the cluster) may take to answer once started.
READY_DEADLINE = 15.0

_counter = itertools.count()


def redis_installed() -> bool:
    """True if ``redis-server`` and ``redis-cli`` are on the PATH."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def require_redis() -> None:
    """Skip the test without ``redis-server``; under CI (``$CI`` set), fail instead."""
    if redis_installed():
        return
    if os.environ.get("CI"):
        pytest.fail("redis-server (and redis-cli) must be installed under CI: apt-get install redis-server")
    pytest.skip("redis-server is not installed")


def free_port() -> int:
    """A loopback port nothing listens on right now (it may be taken before it is used)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unique_prefix(label: str = "t") -> bytes:
    """A key prefix no other test of this session (or process) uses."""
    label = label.replace("{", "(").replace("}", ")")  # braces would pick the cluster slot
    return b"%s:%d:%d:" % (label.encode()[:40], os.getpid(), next(_counter))


def ping(port: int, timeout: float = 1.0) -> bool:
    """True if a Redis on ``port`` answers PING with PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def cli(port: int, *args: str, check: bool = True) -> str:
    """``redis-cli -p PORT ARGS``: its output, as text."""
    result = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                            capture_output=True, text=True, timeout=READY_DEADLINE)
    if check and (result.returncode != 0 or result.stdout.startswith("ERR")):
        raise AssertionError(f"redis-cli {' '.join(args)}: {result.stdout}{result.stderr}")
    return result.stdout.strip()


class RedisServer:
    """One ``redis-server`` subprocess: append-only file, no snapshots, loopback only."""

    def __init__(self, directory: Path, options: Sequence[str] = ()) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.options = list(options)
        self.host = "127.0.0.1"
        self.port = 0
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._starts = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log(self) -> str:
        path = self.directory / f"redis-{self._starts}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, port: Optional[int] = None, extra: Sequence[str] = ()) -> None:
        """Start on ``port`` (a free one if None) and wait until PING answers;
        a port taken meanwhile is replaced by another free one, unless given."""
        for _ in range(5):
            self.port = free_port() if port is None else port
            if self._spawn(extra):
                return
            if "Address already in use" not in self.log or port is not None:
                break
        raise AssertionError(f"redis-server did not start on port {self.port}:\n{self.log}")

    def _spawn(self, extra: Sequence[str]) -> bool:
        self._starts += 1
        log = open(self.directory / f"redis-{self._starts}.log", "wb")
        with log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.directory), "--save", "", "--appendonly", "yes",
                 "--appendfsync", "everysec", "--daemonize", "no", "--protected-mode", "no",
                 *self.options, *extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        give_up = time.monotonic() + READY_DEADLINE
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                return False
            if ping(self.port):
                return True
            time.sleep(0.01)
        self.kill()
        return False

    def stop(self) -> None:
        """SIGTERM (Redis writes its append-only file and exits); SIGKILL after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: as a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, extra: Sequence[str] = ()) -> None:
        """Stop, then start again on the same port, with the same data."""
        self.stop()
        self.start(self.port, extra)

    def cli(self, *args: str, check: bool = True) -> str:
        return cli(self.port, *args, check=check)


class RedisCluster:
    """Three masters (and ``replicas`` replicas of each), every slot assigned."""

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 0,
                 node_timeout_ms: int = 2000, options: Sequence[str] = ()) -> None:
        self.nodes = [
            RedisServer(directory / f"node{index}", [
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), *options,
            ])
            for index in range(masters * (1 + replicas))
        ]
        self.replicas = replicas
        self.bus_ports: dict[RedisServer, int] = {}

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [(node.host, node.port) for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            # The cluster bus's port is PORT + 10000 unless set: set it to a free one.
            self.bus_ports[node] = free_port()
            node.start(extra=["--cluster-port", str(self.bus_ports[node])])
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(node.address for node in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=READY_DEADLINE * 2,
        )
        self.wait_ok()

    def wait_ok(self, nodes: Optional[Sequence[RedisServer]] = None) -> None:
        """Wait until every node (or those given) says ``cluster_state:ok`` and agrees on the slots."""
        give_up = time.monotonic() + READY_DEADLINE
        for node in nodes or self.nodes:
            while "cluster_state:ok" not in node.cli("CLUSTER", "INFO", check=False):
                if time.monotonic() > give_up:
                    raise AssertionError(f"the cluster is not ok:\n{node.cli('CLUSTER', 'INFO', check=False)}")
                time.sleep(0.05)

    def restart(self, node: RedisServer) -> None:
        """Start a stopped or killed node again, on its ports, with its nodes.conf."""
        node.stop()
        node.start(node.port, extra=["--cluster-port", str(self.bus_ports[node])])
        self.wait_ok()

    def owner(self, slot: int) -> RedisServer:
        """The master serving ``slot``, as the first node says."""
        return self.owners()[slot]

    def owners(self) -> list[RedisServer]:
        """The master serving each slot, as the first node says."""
        by_port = {node.port: node for node in self.nodes}
        owners: list[Optional[RedisServer]] = [None] * 16384
        for line in self.nodes[0].cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            node = by_port.get(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
            for part in fields[8:]:
                if not part.startswith("["):  # [slot->-id]: being moved
                    low, _, high = part.partition("-")
                    owners[int(low) : int(high or low) + 1] = [node] * (int(high or low) + 1 - int(low))
        if None in owners:
            raise AssertionError(f"slot {owners.index(None)} has no master")
        return owners  # type: ignore[return-value]

    def node_id(self, node: RedisServer) -> str:
        return node.cli("CLUSTER", "MYID")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis server shared by the session's tests: keep to keys of
    :func:`unique_prefix`, and leave it running (restart it if you stop it)."""
    require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A three-master Redis Cluster shared by the session's tests (see :func:`redis_server`)."""
    require_redis()
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> bytes:
    """A key prefix of this test's own."""
    return unique_prefix(request.node.name)
