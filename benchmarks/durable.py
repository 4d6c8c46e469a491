#!/usr/bin/env python3
"""The durable store's figures (the project's issue 10), each beside a floor taken in the same run.

    python benchmarks/durable.py [--only throughput,redis,restart,sync,memory]
        [--runs N] [--quick] [--many N] [--json FILE]

Parts (see benchmarks/README.md, "The durable store"):

- ``throughput``: 16 producer connections pipelining ``Put``s and 16
  consumer connections pipelining ``Get``s (16 in flight on each), 100-byte
  messages, all on one queue, at the same time; messages delivered per
  second, for the memory store and SQLite with ``--fsync always``,
  ``everysec`` and ``no``, and for the floor server (the ceiling).
- ``redis``: ``redis-benchmark -t lpush -c 16 -d 100`` against a
  ``redis-server`` with ``--appendonly yes --appendfsync always`` started
  here, beside mqmq (SQLite, ``always``) and the floor driven the same way:
  16 connections, one ``Put`` in flight on each.
- ``restart``: an SQLite store filled with 1,000,000 messages, the server
  stopped (SIGTERM) and started again; seconds from the process's start to
  the first ``Info`` answered, and its RSS then.  The floor: the same
  command on an empty database.
- ``sync``: one connection, ``Put`` then ``Get``, one request at a time: µs
  per pair for the memory store and SQLite ``always``, beside the floor, and
  the time of one commit (an SQLite commit and an ``fsync`` in the same
  directory, medians of 100).
- ``memory``: RSS with N messages queued in an SQLite store (``--many N``,
  default 1,000,000), beside the same server empty.

Every server is started here, on a loopback port, with a database in a
temporary directory under /tmp that is deleted afterwards.  The load comes
from ``loadgen`` (``loadgen.c``, built by bench.py's rules into
``benchmarks/build/``).  A count that does not add up (a message lost or
delivered twice, a reply that is not the expected one) is an error: the part
goes on, and the exit status is 1.  Targets are shown, never enforced.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)


def _load_bench() -> ModuleType:
    """bench.py, next to this file, by path (as the tests load it): its wire, builds and helpers."""
    name = "mqmq_bench"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "bench.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
BenchError = bench.BenchError

PARTS = ("throughput", "redis", "restart", "sync", "memory")
MESSAGE_SIZE = 100
#: The throughput part: connections of each kind, and requests in flight on each.
PRODUCERS = 16
CONSUMERS = 16
WINDOW = 16
#: Every Get's timeout: a consumer's Get answered Timeout is sent again.
GET_TIMEOUT_MS = 1000
#: Requests in flight while filling a store (restart, memory).
FILL_WINDOW = 128
#: redis-benchmark's connections (-c), one request in flight on each.
REDIS_CLIENTS = 16
#: Samples of a commit's time.
COMMIT_SAMPLES = 100
#: Longest a server may take to answer its first Info after it is started.
RESTART_TIMEOUT_S = 300.0
#: Generator CPU (cores) above which a note warns that it may be the limit.
GENERATOR_BUSY = 0.9
#: The project's issue 10, shown beside the figures.
TARGET_ALWAYS_RATE = 25_000
TARGET_EVERYSEC_RATIO = 0.70
TARGET_RESTART_S = 5.0
TARGET_MANY_MB = 100.0
TARGET_MANY_COUNT = 10_000_000


@dataclass(frozen=True)
class Counts:
    #: Messages put and delivered per throughput run (per store).
    throughput: int = 200_000
    #: Put+Get pairs per sync run, after untimed warm-up pairs.
    sync_pairs: int = 10_000
    sync_warmup_pairs: int = 500
    #: Messages queued before the restart.
    restart: int = 1_000_000
    #: Messages queued for the memory part (--many).
    many: int = 1_000_000
    #: LPUSHes / Puts in the Redis comparison.
    redis: int = 200_000

    def scaled(self, divisor: int) -> Counts:
        return Counts(**{k: max(1, v // divisor) for k, v in asdict(self).items()})


@dataclass(frozen=True)
class StoreConfig:
    """One way of running our server: a label, and its --store / --fsync."""

    label: str
    kind: str  # "memory" or "sqlite"
    fsync: Optional[str] = None

    def options(self, database: Optional[str]) -> list[str]:
        if self.kind == "memory":
            return ["--store", "memory:"]
        assert database is not None and self.fsync is not None
        return ["--store", f"sqlite:{database}", "--fsync", self.fsync]


MEMORY = StoreConfig("memory", "memory")
ALWAYS = StoreConfig("sqlite always", "sqlite", "always")
EVERYSEC = StoreConfig("sqlite everysec", "sqlite", "everysec")
NO_FSYNC = StoreConfig("sqlite no", "sqlite", "no")
THROUGHPUT_STORES = (MEMORY, ALWAYS, EVERYSEC, NO_FSYNC)
SYNC_STORES = (MEMORY, ALWAYS)
FLOOR = "floor"


# --- Processes ----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LISTENING = re.compile(r"starting server: (127\.0\.0\.1:\d+)")


def server_environment() -> dict[str, str]:
    """The checkout first on PYTHONPATH: the server measured is this tree's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return env


def process_cpu(pid: int) -> Optional[float]:
    """User + system CPU seconds of a process (all its threads), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def free_port() -> int:
    """A loopback port free at this moment (for servers that cannot be started on port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server subprocess of ours, the floor, or redis-server, with its output in a log file."""

    def __init__(self, label: str, argv: list[str], env: Optional[dict[str, str]] = None) -> None:
        self.label = label
        self.argv = argv
        self.env = env
        handle, self.log_path = tempfile.mkstemp(prefix="mqmq-durable-", suffix=".log")
        os.close(handle)
        #: perf_counter() just before the process was started.
        self.started_at = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, start_new_session=True,
                                         preexec_fn=bench.die_with_parent)
        self.address = ""

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def command(self) -> str:
        """The command line, as someone would type it to run this server again."""
        words = [self.argv[0] if self.argv[0] != sys.executable else "python", *self.argv[1:]]
        prefix = "PYTHONPATH=<checkout> " if self.env is not None else ""
        return prefix + " ".join(shlex.quote(word) for word in words)

    def output(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        text = self.output().rstrip().splitlines()[-lines:]
        return "\n".join("    " + line for line in text) or "    (no output)"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the {self.label} server exited (status {self.proc.returncode}); "
                             f"command: {self.command()}\n  its last output:\n{self.tail()}")

    def wait_logged_address(self, timeout: float = 60.0) -> str:
        """Wait for ``starting server: ADDR`` in its log (mqmq, the floor); the address."""
        deadline = time.monotonic() + timeout
        while True:
            match = _LISTENING.search(self.output())
            if match:
                self.address = match.group(1)
                return self.address
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"the {self.label} server did not log 'starting server' within {timeout:g} s; "
                                 f"command: {self.command()}\n  its output:\n{self.tail()}")
            time.sleep(0.02)

    def rss(self) -> Optional[int]:
        return bench.read_rss(self.pid) if self.proc.poll() is None else None

    def cpu(self) -> Optional[float]:
        return process_cpu(self.pid)

    def stop(self) -> float:
        """SIGTERM, and wait for it to exit (SIGKILL after 60 s); seconds it took."""
        began = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        took = time.perf_counter() - began
        try:
            os.unlink(self.log_path)
        except OSError:
            pass
        return took


def remove_database(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


def database_bytes(path: str) -> int:
    return sum(os.path.getsize(path + suffix) for suffix in ("", "-wal")
               if os.path.exists(path + suffix))


# --- The benchmark -------------------------------------------------------------------------


@dataclass
class Durable:
    counts: Counts
    loadgen_path: str
    floor_path: str
    directory: str
    token: str = field(default_factory=lambda: os.urandom(3).hex())
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    _databases: int = 0

    # Servers ---------------------------------------------------------------------------

    def database(self, label: str) -> str:
        self._databases += 1
        return os.path.join(self.directory, f"{label.replace(' ', '-')}-{self._databases}.db")

    def mqmq_argv(self, config: StoreConfig, database: Optional[str], address: str = "127.0.0.1:0") -> list[str]:
        return [sys.executable, "-m", "mqmq", "start", "-addr", address,
                "--max-queued-bytes", "0", "--max-queued-messages", "0", *config.options(database)]

    def start_mqmq(self, config: StoreConfig, database: Optional[str], address: str = "127.0.0.1:0") -> Server:
        server = Server(f"mqmq ({config.label})", self.mqmq_argv(config, database, address), server_environment())
        self.servers.append(server)
        server.wait_logged_address()
        return server

    def start_floor(self) -> Server:
        server = Server("floor", [self.floor_path, "127.0.0.1:0"])
        self.servers.append(server)
        server.wait_logged_address()
        return server

    def stop(self, server: Server) -> float:
        took = server.stop()
        if server in self.servers:
            self.servers.remove(server)
        return took

    def stop_all(self) -> None:
        for server in list(self.servers):
            self.stop(server)

    # Helpers ---------------------------------------------------------------------------

    def queue(self, part: str, run: int) -> bytes:
        return f"durable-{self.token}.{part}.{run}.{MESSAGE_SIZE}".encode()

    def loadgen(self, server: Server, mode: str, queue: bytes, *options: Any) -> dict[str, Any]:
        """Run the generator against a server; its figures, with its command and the server's CPU."""
        argv = [self.loadgen_path, mode, "--addr", server.address, "--queue", queue.decode(), *map(str, options)]
        cpu_before, began = server.cpu(), time.perf_counter()
        result: dict[str, Any] = bench.run_loadgen(self.loadgen_path, server.address, mode, queue, *options)
        wall, cpu_after = time.perf_counter() - began, server.cpu()
        if cpu_before is not None and cpu_after is not None and wall > 0:
            # Over the generator's whole run (connecting included): a slight underestimate.
            result["server_cpu_frac"] = (cpu_after - cpu_before) / wall
        result["generator_command"] = " ".join(shlex.quote(word) for word in argv)
        result["server_command"] = server.command()
        if server.label != "floor" and (result.get("cpu_frac") or 0) >= GENERATOR_BUSY:
            # (Against the floor a busy generator is expected: the floor's figure is the
            # ceiling of this generator on this machine.)
            self.notes.append(f"{mode} against {server.label}: the generator used {result['cpu_frac']:.2f} "
                              f"of a core: it may have been the limit")
        return result

    @staticmethod
    def queued(server: Server, queue: bytes) -> int:
        """Messages on a queue, by Info (a queue Info does not list holds none)."""
        entry = bench.info(server.address).get("Queues", {}).get(queue.decode())
        return 0 if entry is None else int(entry.get("NumMessages", 0))

    def expect_queued(self, server: Server, queue: bytes, expected: int, when: str) -> None:
        found = self.queued(server, queue)
        if found != expected:
            raise BenchError(f"Info counts {found:,} messages on {queue.decode()} {when}; expected {expected:,}")

    def attempt(self, what: str, action: Callable[[], dict[str, Any]]) -> Optional[dict[str, Any]]:
        """Run one measure; on BenchError record it, stop its servers, and go on."""
        try:
            return action()
        except BenchError as error:
            self.errors.append(f"{what}: {error}")
            print(f"  ERROR {what}: {error}", flush=True)
            self.stop_all()
            return None

    # 1. Durable throughput --------------------------------------------------------------

    def throughput_once(self, target: str, run: int) -> dict[str, Any]:
        total = self.counts.throughput
        config = next((c for c in THROUGHPUT_STORES if c.label == target), None)
        database = self.database(target) if config is not None and config.kind == "sqlite" else None
        server = self.start_floor() if config is None else self.start_mqmq(config, database)
        queue = self.queue("throughput", run)
        result = self.loadgen(server, "consumers", queue, "--total", total, "--producers", PRODUCERS,
                              "--consumers", CONSUMERS, "--window", WINDOW, "--consumer-window", WINDOW,
                              "--get-timeout", GET_TIMEOUT_MS)
        if result["puts_acknowledged"] != total or result["delivered"] != total:
            raise BenchError(f"{result['puts_acknowledged']:,} Puts acknowledged and {result['delivered']:,} "
                             f"messages delivered; expected {total:,} of each")
        if config is not None:
            if result["extra_replies"]:
                raise BenchError(f"{result['extra_replies']:,} messages delivered beyond the {total:,} put: "
                                 f"duplicates")
            self.expect_queued(server, queue, 0, "after every message was delivered")
        result["server_rss_mb"] = bench._mb(server.rss())
        if database is not None:
            result["database_mb"] = database_bytes(database) / 1e6
        self.stop(server)
        if database is not None:
            remove_database(database)
        return result

    # 2. Redis ------------------------------------------------------------------------------

    def redis_once(self, run: int) -> dict[str, Any]:
        """redis-benchmark LPUSH against an appendfsync-always redis-server started here."""
        total = self.counts.redis
        directory = tempfile.mkdtemp(prefix="redis-", dir=self.directory)
        port = free_port()
        server = Server("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                                  "--dir", directory, "--appendonly", "yes", "--appendfsync", "always",
                                  "--save", "", "--daemonize", "no", "--logfile", ""])
        self.servers.append(server)
        server.address = f"127.0.0.1:{port}"
        try:
            wait_for_redis(server, port)
            argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "lpush",
                    "-c", str(REDIS_CLIENTS), "-d", str(MESSAGE_SIZE), "-n", str(total), "-q"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            server_cpu0, began = server.cpu(), time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, timeout=bench.JOB_TIMEOUT_S,
                                  preexec_fn=bench.die_with_parent)
            wall = time.perf_counter() - began
            server_cpu1 = server.cpu()
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode != 0:
                raise BenchError(f"redis-benchmark exited {done.returncode}: {done.stderr.strip()[:300]}")
            matches = re.findall(r"LPUSH: ([\d.]+) requests per second(?:, p50=([\d.]+) msec)?", done.stdout)
            if not matches:
                raise BenchError(f"redis-benchmark printed no LPUSH rate: {done.stdout.strip()[-300:]!r}")
            rate, p50 = matches[-1]
            length = redis_llen(port, b"mylist")
            if length != total:
                raise BenchError(f"after {total:,} LPUSHes redis holds {length:,} items in mylist")
            generator_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            return {"rate": float(rate), "p50_us": float(p50) * 1000 if p50 else None, "requests": total,
                    "cpu_frac": generator_cpu / wall if wall > 0 else None,
                    "server_cpu_frac": (server_cpu1 - server_cpu0) / wall
                    if server_cpu0 is not None and server_cpu1 is not None and wall > 0 else None,
                    "generator_command": " ".join(shlex.quote(word) for word in argv),
                    "server_command": server.command(), "redis_version": redis_version()}
        finally:
            self.stop(server)
            shutil.rmtree(directory, ignore_errors=True)

    def puts_like_redis_once(self, target: str, run: int) -> dict[str, Any]:
        """Our server (SQLite, always) or the floor, driven as redis-benchmark drives Redis:
        16 connections, one Put in flight on each."""
        each = max(1, self.counts.redis // REDIS_CLIENTS)
        database = self.database("redis-shape") if target != FLOOR else None
        server = self.start_floor() if target == FLOOR else self.start_mqmq(ALWAYS, database)
        queue = self.queue("puts16", run)
        result = self.loadgen(server, "stream", queue, "--conns", REDIS_CLIENTS, "--window", 1,
                              "--phase", f"puts:{each}")
        if result["requests"] != each * REDIS_CLIENTS:
            raise BenchError(f"{result['requests']:,} Puts answered; expected {each * REDIS_CLIENTS:,}")
        if target != FLOOR:
            self.expect_queued(server, queue, each * REDIS_CLIENTS, "after the Puts")
        self.stop(server)
        if database is not None:
            remove_database(database)
        return result

    # 3 and 5. Filled, stopped, restarted -------------------------------------------------------

    def time_start(self, argv_address: str, database: str, queue: bytes, expected: int) -> dict[str, Any]:
        """Start our server (SQLite, always) on ``argv_address`` with ``database``; time to its first Info."""
        server = Server("mqmq (sqlite always, restarted)", self.mqmq_argv(ALWAYS, database, argv_address),
                        server_environment())
        self.servers.append(server)
        server.address = argv_address
        seconds, answer = first_info(server, argv_address)
        rss = server.rss()
        entry = answer.get("Queues", {}).get(queue.decode()) if expected else None
        found = 0 if entry is None else int(entry.get("NumMessages", 0))
        if found != expected:
            self.stop(server)
            raise BenchError(f"after the restart Info counts {found:,} messages on {queue.decode()}; "
                             f"expected {expected:,}")
        stop_s = self.stop(server)
        return {"start_s": seconds, "rss_mb": bench._mb(rss), "stop_s": stop_s, "command": server.command()}

    def fill_and_restart(self, count: int, restarts: int, part: str) -> dict[str, Any]:
        """Fill a fresh SQLite store with ``count`` messages, then stop and start it ``restarts`` times.

        Beside each restart, the floor: the same command on an empty database.
        """
        database = self.database(part)
        server = self.start_mqmq(ALWAYS, database)
        address = server.address
        rss_empty = server.rss()
        queue = self.queue(part, 0)
        fill = self.loadgen(server, "stream", queue, "--window", FILL_WINDOW, "--phase", f"puts:{count}")
        if fill["requests"] != count:
            raise BenchError(f"{fill['requests']:,} Puts answered while filling; expected {count:,}")
        self.expect_queued(server, queue, count, "after the fill")
        rss_full = server.rss()
        result: dict[str, Any] = {
            "messages": count, "fill_rate": fill["rate"], "fill_cpu_frac": fill["cpu_frac"],
            "fill_server_cpu_frac": fill.get("server_cpu_frac"),
            "rss_empty_mb": bench._mb(rss_empty), "rss_full_mb": bench._mb(rss_full),
            "bytes_per_message": (rss_full - rss_empty) / count if rss_full and rss_empty else None,
            "database_mb": database_bytes(database) / 1e6,
            "server_command": server.command(), "generator_command": fill["generator_command"],
        }
        result["first_stop_s"] = self.stop(server)
        result["database_mb_after_stop"] = database_bytes(database) / 1e6
        runs = []
        for run in range(restarts):
            full = self.time_start(address, database, queue, count)
            empty_database = self.database(f"{part}-empty")
            empty = self.time_start(f"127.0.0.1:{free_port()}", empty_database, queue, 0)
            remove_database(empty_database)
            runs.append({"run": run, "restart_s": full["start_s"], "rss_after_restart_mb": full["rss_mb"],
                         "stop_s": full["stop_s"], "floor_restart_s": empty["start_s"],
                         "floor_rss_mb": empty["rss_mb"], "restart_command": full["command"]})
            print(f"  restart {run + 1}/{restarts}: {full['start_s']:.2f} s to the first Info with "
                  f"{count:,} messages (empty database: {empty['start_s']:.2f} s); RSS "
                  f"{fmt(full['rss_mb'])} MB", flush=True)
        remove_database(database)
        result["runs"] = runs
        result["median"] = median_of(runs)
        return result

    # 4. Sync latency -----------------------------------------------------------------------------

    def sync_once(self, target: str, run: int) -> dict[str, Any]:
        pairs = self.counts.sync_pairs
        config = next((c for c in SYNC_STORES if c.label == target), None)
        database = self.database(target) if config is not None and config.kind == "sqlite" else None
        server = self.start_floor() if config is None else self.start_mqmq(config, database)
        queue = self.queue("sync", run)
        result = self.loadgen(server, "stream", queue, "--window", 1, "--phase", f"pairs:{2 * pairs}",
                              "--warmup-pairs", self.counts.sync_warmup_pairs, "--get-timeout", GET_TIMEOUT_MS)
        if result["requests"] != 2 * pairs:
            raise BenchError(f"{result['requests']:,} requests answered; expected {2 * pairs:,}")
        if config is not None:
            self.expect_queued(server, queue, 0, "after the sync pairs")
        result["us_per_pair"] = result["elapsed_s"] * 1e6 / pairs
        self.stop(server)
        if database is not None:
            remove_database(database)
        return result

    def commit_times(self) -> dict[str, Any]:
        """Medians of COMMIT_SAMPLES: an fsync of a small file, and a one-row SQLite commit
        (WAL, synchronous=FULL, as --fsync always), both in the databases' directory."""
        path = os.path.join(self.directory, "fsync-probe")
        samples = []
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(COMMIT_SAMPLES):
                os.write(handle, b"x" * MESSAGE_SIZE)
                began = time.perf_counter()
                os.fsync(handle)
                samples.append(time.perf_counter() - began)
        finally:
            os.close(handle)
            os.unlink(path)
        database = self.database("commit-probe")
        commits = []
        db = sqlite3.connect(database, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL").fetchall()  # read: PyPy resets a statement only then
            db.execute("PRAGMA synchronous = FULL")
            db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
            body = b"x" * MESSAGE_SIZE
            for _ in range(COMMIT_SAMPLES):
                began = time.perf_counter()
                db.execute("BEGIN")
                db.execute("INSERT INTO messages (body) VALUES (?)", (body,))
                db.execute("COMMIT")
                commits.append(time.perf_counter() - began)
        finally:
            db.close()
            remove_database(database)
        return {"fsync_us": statistics.median(samples) * 1e6, "sqlite_commit_us": statistics.median(commits) * 1e6}


def wait_for_redis(server: Server, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"redis-server did not answer PING within {timeout:g} s:\n{server.tail()}")
        time.sleep(0.05)


def redis_llen(port: int, key: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"*2\r\n$4\r\nLLEN\r\n$%d\r\n%s\r\n" % (len(key), key))
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                break
            reply += chunk
    if not reply.startswith(b":"):
        raise BenchError(f"LLEN was answered {reply[:60]!r}")
    return int(reply[1:].strip())


def redis_version() -> Optional[str]:
    try:
        done = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\S+)", done.stdout)
    return match.group(1) if match else done.stdout.strip() or None


def first_info(server: Server, address: str) -> tuple[float, dict[str, Any]]:
    """Connect again and again until an Info is answered: seconds from the process's start, and the Info."""
    host, port = bench.split_address(address)
    deadline = time.perf_counter() + RESTART_TIMEOUT_S
    while True:
        server.check_alive()
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                sock.settimeout(max(1.0, deadline - time.perf_counter()))
                values = bench.call(sock, bench.INFO_REQUEST)
                answered = time.perf_counter()
        except (OSError, BenchError):
            if time.perf_counter() > deadline:
                raise BenchError(f"no Info answered within {RESTART_TIMEOUT_S:g} s of starting "
                                 f"{server.command()}:\n{server.tail()}") from None
            time.sleep(0.002)
            continue
        if len(values) < 2 or values[0] != b"OK":
            raise BenchError(f"Info was answered {values[:1]!r} after the restart")
        return answered - server.started_at, dict(json.loads(values[1]))


# --- Figures ----------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = {key for run in runs for key in run} - {"run"}
    merged: dict[str, Any] = {}
    for key in sorted(keys):
        values = [v for v in (run.get(key) for run in runs) if isinstance(v, (int, float))
                  and not isinstance(v, bool)]
        if values:
            merged[key] = statistics.median(values)
    return merged


def fmt(value: Any) -> str:
    formatted: str = bench.fmt(value)
    return formatted


def verdict(met: Optional[bool]) -> str:
    return "" if met is None else ("met" if met else "MISSED")


def same_run_ratios(first: list[dict[str, Any]], second: list[dict[str, Any]], key: str) -> Optional[float]:
    """Median over runs of first[key] / second[key], run i of each taken together."""
    by_run = {run["run"]: run for run in second}
    ratios = [a[key] / by_run[a["run"]][key] for a in first
              if a["run"] in by_run and a.get(key) and by_run[a["run"]].get(key)]
    return statistics.median(ratios) if ratios else None


@dataclass
class Table:
    rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)

    def add(self, part: str, figure: str, value: Any, floor: Any = None, ratio: Optional[float] = None,
            target: str = "") -> None:
        self.parts.append(part)
        first = len(self.parts) == 1 or self.parts[-2] != part
        self.rows.append((part if first else "", figure, fmt(value),
                          "" if floor is None else fmt(floor),
                          "" if ratio is None else f"{ratio:.2f}×", target))

    def print(self) -> None:
        head = f"{'part':<11} {'figure':<44} {'value':>11} {'floor':>11} {'÷ floor':>8}  target (issue 10)"
        print(head)
        print("-" * len(head))
        for part, figure, value, floor, ratio, target in self.rows:
            print(f"{part:<11} {figure:<44} {value:>11} {floor:>11} {ratio:>8}  {target}".rstrip())


# --- Main ---------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The durable store's figures (issue 10), each beside a floor measured in the same run.",
        epilog="See benchmarks/README.md, 'The durable store (durable.py)'.")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts, from {','.join(PARTS)} (default: all)")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat each part N times (memory: once) and report medians")
    parser.add_argument("--quick", action="store_true", help="every count divided by 10: a smoke run")
    parser.add_argument("--divide", type=int, default=None, metavar="N",
                        help="every count divided by N (the tests use 100)")
    parser.add_argument("--many", type=int, default=Counts.many, metavar="N",
                        help="messages queued for the memory part (default 1,000,000; 10000000 for "
                             "the issue's target)")
    parser.add_argument("--json", metavar="FILE", help="write every figure, run and command as JSON")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown or not args.parts:
        parser.error(f"unknown part {', '.join(unknown) or '(none)'}: choose from {','.join(PARTS)}")
    if args.runs < 1:
        parser.error("--runs must be 1 or more")
    if args.many < 1:
        parser.error("--many must be 1 or more")
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_throughput(durable: Durable, runs: int) -> dict[str, Any]:
    targets = [FLOOR, *(config.label for config in THROUGHPUT_STORES)]
    found: dict[str, list[dict[str, Any]]] = {target: [] for target in targets}
    for run in range(runs):
        for target in targets:
            result = durable.attempt(f"throughput ({target})", lambda: durable.throughput_once(target, run))
            if result is None:
                continue
            result["run"] = run
            found[target].append(result)
            print(f"  throughput {target:<16} {result['rate']:>10,.0f} msg/s (puts {result['put_rate']:,.0f}/s); "
                  f"Get wait p50 {fmt(result['get_p50_us'])} µs, p99 {fmt(result['get_p99_us'])} µs; "
                  f"{result['get_timeouts']} Timeouts; generator CPU {fmt(result['cpu_frac'])}, "
                  f"server CPU {fmt(result.get('server_cpu_frac'))}", flush=True)
    return {target: {"runs": runs_, "median": median_of(runs_)} for target, runs_ in found.items()}


def run_sync(durable: Durable, runs: int) -> dict[str, Any]:
    targets = [FLOOR, *(config.label for config in SYNC_STORES)]
    found: dict[str, list[dict[str, Any]]] = {target: [] for target in targets}
    commits: list[dict[str, Any]] = []
    for run in range(runs):
        probe = durable.commit_times()
        probe["run"] = run
        commits.append(probe)
        print(f"  commit: SQLite {probe['sqlite_commit_us']:.0f} µs, fsync {probe['fsync_us']:.0f} µs "
              f"(medians of {COMMIT_SAMPLES})", flush=True)
        for target in targets:
            result = durable.attempt(f"sync ({target})", lambda: durable.sync_once(target, run))
            if result is None:
                continue
            result["run"] = run
            found[target].append(result)
            print(f"  sync {target:<16} {result['us_per_pair']:>8.1f} µs per Put+Get; p50 {fmt(result['p50_us'])} µs, "
                  f"p99 {fmt(result['p99_us'])} µs; generator CPU {fmt(result['cpu_frac'])}", flush=True)
    report: dict[str, Any] = {target: {"runs": runs_, "median": median_of(runs_)} for target, runs_ in found.items()}
    report["commit"] = {"runs": commits, "median": median_of(commits)}
    return report


def run_redis(durable: Durable, runs: int) -> dict[str, Any]:
    missing = [name for name in ("redis-server", "redis-benchmark") if shutil.which(name) is None]
    report: dict[str, Any] = {}
    targets = [FLOOR, ALWAYS.label]
    found: dict[str, list[dict[str, Any]]] = {target: [] for target in [*targets, "redis"]}
    if missing:
        note = (f"redis: {' and '.join(missing)} not found (Debian: apt-get install redis-server): "
                f"the Redis line is skipped")
        print(f"  note: {note}", flush=True)
        durable.notes.append(note)
        report["skipped"] = note
    for run in range(runs):
        if not missing:
            result = durable.attempt("redis", lambda: durable.redis_once(run))
            if result is not None:
                result["run"] = run
                found["redis"].append(result)
                print(f"  redis LPUSH, appendfsync always {result['rate']:>10,.0f} req/s; "
                      f"redis-benchmark CPU {fmt(result['cpu_frac'])}, redis-server CPU "
                      f"{fmt(result['server_cpu_frac'])}", flush=True)
        for target in targets:
            result = durable.attempt(f"redis shape ({target})", lambda: durable.puts_like_redis_once(target, run))
            if result is None:
                continue
            result["run"] = run
            found[target].append(result)
            print(f"  16 × 1 Put, {target:<16} {result['rate']:>10,.0f} req/s; p50 {fmt(result['p50_us'])} µs; "
                  f"generator CPU {fmt(result['cpu_frac'])}, server CPU {fmt(result.get('server_cpu_frac'))}",
                  flush=True)
    for target, runs_ in found.items():
        if runs_ or target != "redis":
            report[target] = {"runs": runs_, "median": median_of(runs_)}
    return report


def build_table(parts: dict[str, Any], counts: Counts) -> Table:
    table = Table()

    def median(part: str, target: str, key: str) -> Any:
        return parts.get(part, {}).get(target, {}).get("median", {}).get(key)

    def runs_of(part: str, target: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = parts.get(part, {}).get(target, {}).get("runs", [])
        return runs

    if "throughput" in parts:
        for config in THROUGHPUT_STORES:
            rate = median("throughput", config.label, "rate")
            floor = median("throughput", FLOOR, "rate")
            ratio = same_run_ratios(runs_of("throughput", config.label), runs_of("throughput", FLOOR), "rate")
            target = ""
            if config is ALWAYS and rate is not None:
                target = f"≥ {TARGET_ALWAYS_RATE:,}: {verdict(rate >= TARGET_ALWAYS_RATE)}"
            if config is EVERYSEC:
                to_memory = same_run_ratios(runs_of("throughput", EVERYSEC.label),
                                            runs_of("throughput", MEMORY.label), "rate")
                if to_memory is not None:
                    target = (f"≥ {TARGET_EVERYSEC_RATIO:.2f}× memory: {to_memory:.2f}×, "
                              f"{verdict(to_memory >= TARGET_EVERYSEC_RATIO)}")
            table.add("throughput", f"msg/s delivered, {config.label}", rate, floor, ratio, target)
        for config in THROUGHPUT_STORES:
            table.add("throughput", f"generator CPU (cores), {config.label}",
                      median("throughput", config.label, "cpu_frac"),
                      median("throughput", FLOOR, "cpu_frac"))
    if "redis" in parts:
        redis = parts["redis"]
        if "redis" in redis:
            table.add("redis", "LPUSH/s, redis appendfsync always", median("redis", "redis", "rate"),
                      target="(comparison)")
            table.add("redis", "redis-benchmark CPU (cores)", median("redis", "redis", "cpu_frac"))
        else:
            table.add("redis", "LPUSH/s, redis appendfsync always", None,
                      target=redis.get("skipped", "no figure: see the errors"))
        table.add("redis", f"Put/s, sqlite always, {REDIS_CLIENTS} conns × 1", median("redis", ALWAYS.label, "rate"),
                  median("redis", FLOOR, "rate"),
                  same_run_ratios(runs_of("redis", ALWAYS.label), runs_of("redis", FLOOR), "rate"))
        table.add("redis", "generator CPU (cores), sqlite always", median("redis", ALWAYS.label, "cpu_frac"),
                  median("redis", FLOOR, "cpu_frac"))
    if "restart" in parts and parts["restart"]:
        restart = parts["restart"]
        seconds = restart.get("median", {}).get("restart_s")
        floor_s = restart.get("median", {}).get("floor_restart_s")
        ratios = [r["restart_s"] / r["floor_restart_s"] for r in restart.get("runs", []) if r.get("floor_restart_s")]
        target = ""
        if seconds is not None:
            target = f"≤ {TARGET_RESTART_S:g} s" + (
                f": {verdict(seconds <= TARGET_RESTART_S)}" if restart["messages"] == 1_000_000
                else f" (at 1M messages; {restart['messages']:,} here)")
        table.add("restart", f"s to first Info, {restart['messages']:,} msgs", seconds, floor_s,
                  statistics.median(ratios) if ratios else None, target)
        table.add("restart", "MB resident after restart", restart.get("median", {}).get("rss_after_restart_mb"),
                  restart.get("median", {}).get("floor_rss_mb"))
        table.add("restart", "MB resident before the stop (full)", restart.get("rss_full_mb"),
                  restart.get("rss_empty_mb"))
        table.add("restart", "s from SIGTERM to exit (full)", restart.get("first_stop_s"))
        table.add("restart", "fill Put/s (window 128)", restart.get("fill_rate"))
        table.add("restart", "MB on disk (database + WAL)", restart.get("database_mb"))
    if "sync" in parts:
        memory = median("sync", MEMORY.label, "us_per_pair")
        always = median("sync", ALWAYS.label, "us_per_pair")
        commit = parts["sync"].get("commit", {}).get("median", {})
        sqlite_commit = commit.get("sqlite_commit_us")
        for config in SYNC_STORES:
            value = median("sync", config.label, "us_per_pair")
            target = ""
            if config is ALWAYS and None not in (memory, always, sqlite_commit):
                bound = memory + 2 * sqlite_commit
                target = f"≤ memory + 2 commits = {bound:,.0f}: {verdict(always <= bound)}"
            table.add("sync", f"µs per Put+Get, {config.label}", value, median("sync", FLOOR, "us_per_pair"),
                      same_run_ratios(runs_of("sync", config.label), runs_of("sync", FLOOR), "us_per_pair"), target)
        if memory is not None and always is not None:
            extra = always - memory
            per_commit = f" = {extra / sqlite_commit:.2f} commits" if sqlite_commit else ""
            table.add("sync", "µs added by always (always − memory)", extra, target=per_commit.strip(" ="))
        table.add("sync", "µs per SQLite commit (WAL, FULL), median", sqlite_commit)
        table.add("sync", "µs per fsync of a small file, median", commit.get("fsync_us"))
    if "memory" in parts and parts["memory"]:
        memory_part = parts["memory"]
        messages = memory_part["messages"]
        full = memory_part.get("rss_full_mb")
        target = f"≤ {TARGET_MANY_MB:g} MB at 10M"
        if messages == TARGET_MANY_COUNT and full is not None:
            target += f": {verdict(full <= TARGET_MANY_MB)}"
        table.add("memory", f"MB resident, {messages:,} msgs queued", full, memory_part.get("rss_empty_mb"),
                  target=target)
        table.add("memory", "MB resident after a restart",
                  memory_part.get("median", {}).get("rss_after_restart_mb"),
                  memory_part.get("median", {}).get("floor_rss_mb"))
        table.add("memory", "bytes per message (full − empty)", memory_part.get("bytes_per_message"))
        table.add("memory", "MB on disk (database + WAL)", memory_part.get("database_mb"))
    return table


def print_commands(parts: dict[str, Any]) -> None:
    """One server and one generator command per figure kind: what produced the figures."""
    print("commands (the last run's; <checkout> is this repository, ports as the servers chose):")
    seen: set[str] = set()

    def show(label: str, command: Optional[str]) -> None:
        if command and command not in seen:
            seen.add(command)
            print(f"  {label}: {command}")

    for part in ("throughput", "redis", "sync"):
        for target, entry in parts.get(part, {}).items():
            if isinstance(entry, dict) and entry.get("runs"):
                last = entry["runs"][-1]
                show(f"{part} {target} server", last.get("server_command"))
                show(f"{part} {target} generator", last.get("generator_command"))
    for part in ("restart", "memory"):
        entry = parts.get(part)
        if entry:
            show(f"{part} server", entry.get("server_command"))
            show(f"{part} fill", entry.get("generator_command"))
            if entry.get("runs"):
                show(f"{part} restart", entry["runs"][-1].get("restart_command"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        tools = bench.build_tools(bench.BUILD_DIR)
    except BenchError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    divisor = args.divide or (10 if args.quick else 1)
    counts = Counts(many=args.many).scaled(divisor)
    directory = tempfile.mkdtemp(prefix="mqmq-durable-", dir="/tmp")
    durable = Durable(counts, tools["loadgen"], tools["floor"], directory)
    box = bench.machine()
    print(f"mqmq durable-store benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"machine: {box['nproc']} CPUs (nproc), {box['cpu_model']}, {box['memory_gb']} GiB, {box['kernel']}")
    print(f"python:  {box['python']} ({sys.executable})")
    load = box["load_average_at_start"]
    if load:
        busy = "  (busy: other work on the machine will skew the figures)" if load[0] > 0.5 else ""
        print(f"load:    {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min){busy}")
    if box["mqmq_commit"]:
        print(f"mqmq:    commit {box['mqmq_commit']}")
    print(f"counts:  {f'divided by {divisor}' if divisor > 1 else 'full'}; runs: {args.runs}; {MESSAGE_SIZE}-byte "
          f"messages; databases in {directory}")
    print()
    parts: dict[str, Any] = {}
    shared_fill: Optional[dict[str, Any]] = None
    try:
        for part in args.parts:
            print(f"{part}:", flush=True)
            if part == "throughput":
                parts[part] = run_throughput(durable, args.runs)
            elif part == "redis":
                parts[part] = run_redis(durable, args.runs)
            elif part == "sync":
                parts[part] = run_sync(durable, args.runs)
            elif part == "restart":
                result = durable.attempt("restart", lambda: durable.fill_and_restart(
                    counts.restart, args.runs, "restart"))
                parts[part] = result or {}
                shared_fill = result
            elif part == "memory":
                if shared_fill is not None and shared_fill["messages"] == counts.many:
                    # The restart part filled a store with as many messages: the same figures.
                    parts[part] = shared_fill
                    durable.notes.append("memory: the figures of the restart part's store "
                                         f"({counts.many:,} messages), not a second fill")
                    print(f"  the restart part's store held {counts.many:,} messages: its figures", flush=True)
                else:
                    result = durable.attempt("memory", lambda: durable.fill_and_restart(counts.many, 1, "memory"))
                    parts[part] = result or {}
                if parts[part]:
                    print(f"  memory: {fmt(parts[part]['rss_full_mb'])} MB resident with "
                          f"{parts[part]['messages']:,} messages (empty: {fmt(parts[part]['rss_empty_mb'])} MB)",
                          flush=True)
    except KeyboardInterrupt:
        durable.errors.append("interrupted")
        print("\ninterrupted", flush=True)
    finally:
        durable.stop_all()
        shutil.rmtree(directory, ignore_errors=True)
    print()
    build_table(parts, counts).print()
    print("(÷ floor: the median over runs of the figure over the floor's of the same run. Floors: throughput,")
    print(" sync and redis: the floor server (floor.c) driven the same way; restart: the same command on an")
    print(" empty database; MB resident: the same server empty)")
    print()
    print_commands(parts)
    for note in durable.notes:
        print(f"note: {note}")
    report = {"machine": box, "settings": {
        "quick": args.quick, "divided_by": divisor, "runs": args.runs, "counts": asdict(counts),
        "message_size": MESSAGE_SIZE, "throughput": {
            "producers": PRODUCERS, "consumers": CONSUMERS, "window": WINDOW, "queues": 1,
            "get_timeout_ms": GET_TIMEOUT_MS},
        "fill_window": FILL_WINDOW, "redis_clients": REDIS_CLIENTS, "commit_samples": COMMIT_SAMPLES,
        "generator": {"loadgen": tools["loadgen"], "floor": tools["floor"], "cflags": bench.CFLAGS}},
        "parts": parts, "errors": durable.errors, "notes": durable.notes,
        "targets": {"throughput.sqlite always.rate": f">= {TARGET_ALWAYS_RATE}",
                    "throughput.sqlite everysec.rate": f">= {TARGET_EVERYSEC_RATIO} x memory",
                    "restart.restart_s": f"<= {TARGET_RESTART_S} at 1,000,000 messages",
                    "sync.sqlite always.us_per_pair": "<= memory + 2 x sqlite_commit_us",
                    "memory.rss_full_mb": f"<= {TARGET_MANY_MB} at {TARGET_MANY_COUNT:,} messages"}}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
        print(f"json:  {args.json}")
    if durable.errors:
        print(f"\n{len(durable.errors)} error(s):")
        for problem in durable.errors:
            print(f"  - {problem}")
        sys.stdout.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
