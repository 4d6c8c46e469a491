#!/usr/bin/env python3
"""Queues in Redis (the project's issue 13): scaling with servers, and one server against the memory store.

    python benchmarks/redis.py [--only servers,stores] [--servers 1,2,4] [--cluster]
        [--runs N] [--messages N] [--warmup N] [--python EXE]
        [--json FILE] [--chart FILE.png] [--quick | --divide N]

Parts (see benchmarks/README.md, "Queues in Redis"):

- ``servers``: one ``redis-server`` (a temporary directory of its own,
  ``--save ''``, ``--appendonly yes --appendfsync everysec``, a free
  loopback port), and for each N of ``--servers``: N ``mqmq start --store
  redis://…`` servers on it, all with the same ``--redis-prefix`` (they share
  their queues), each driven by a ``loadgen consumers --multiplex`` of its
  own (the fan workload: 4 producers pipelining ``Put``s, 4 consumers on one
  thread each waiting on one ``Get``), all N generators at once, each on a
  queue of its own: a generator audits that its consumers got exactly what
  its producers put, which it could not do on a queue another generator
  also feeds.  So each queue is used through one server: what grows with N
  is the load on the one Redis, not messages crossing servers (a ``Put`` on
  one server waking a ``Get`` on another goes through a shard-channel
  publish, which this part does not exercise).  The N generators share the
  point's messages.  Figures: the
  sum of the generators' messages/s, the consumers' ``Get`` wait (the median
  of the generators' p50s, the worst of their p99s), each mqmq server's CPU
  (``/proc/PID/stat``), Redis's (``INFO cpu``), the generators' (their own
  count) and the whole machine's (``/proc/stat``, everyone's work), in
  cores, over the timed part; and where the limit is.  ``--cluster``: the
  same against a three-master Redis Cluster (``redis+cluster://``).
- ``stores``: the consumers workload (4 producers pipelining, 4 consumers
  each a blocking thread waiting on one ``Get``) against one mqmq server on
  ``--store memory:`` and one on ``--store redis://…`` (the same Redis), in
  the same run; messages/s of each and redis ÷ memory (issue 13's target:
  ≥ 0.5).

Every figure stands beside the floor's (``floor.c``, which answers every
frame at once and keeps nothing) driven the same way in the same run.  For
N servers the floor is N floor processes, each driven by its own generator:
the same processes on the same cores as the mqmq point, minus Redis, so
the floor's figure is what N generators can push through N servers that
cost nothing.  One floor serving all N generators would be capped by its
one thread: at N = 4 it would understate the ceiling and flatter mqmq's
ratio.

Every server is started here with the checkout first on ``PYTHONPATH`` (the
code measured is this tree's), on loopback ports it chose itself (port 0;
Redis, which cannot, on a port found free, tried again if taken), storage
limits off.  They and the generators are stopped on every exit, Ctrl-C
included, and die with this process even when it is killed (Linux
``PR_SET_PDEATHSIG``, bench.py's).  A count that does not add up (a message
lost or delivered twice, a reply that is not the expected one, Redis still
holding a queue's messages) is an error: the run goes on, the exit status is
1.  Targets are shown, never enforced.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from types import ModuleType
from typing import Any, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str) -> ModuleType:
    """A tool next to this file, by path, under the name the tests give it (``mqmq_NAME``)."""
    module_name = f"mqmq_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(HERE, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


durable = _load("durable")
bench = durable.bench
BenchError: Any = bench.BenchError
Server = durable.Server

PARTS = ("servers", "stores")
MESSAGE_SIZE = 100
#: Each generator: producer connections, consumer connections, Puts in flight per producer.
PRODUCERS = 4
CONSUMERS = 4
WINDOW = 128
#: A consumer's Get waits this long; one answered Timeout is sent again (and counted).
GET_TIMEOUT_MS = 1000
DEFAULT_SERVERS = (1, 2, 4)
CLUSTER_MASTERS = 3
#: Cores of use at which a process counts as the limit (Redis's main thread, an
#: mqmq server), and the share of the machine's cores at which the machine does.
BUSY = 0.9
#: Redis's own settings here: persistence as the README's table recommends.
REDIS_OPTIONS = ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
#: Issue 13: one mqmq server on Redis against the same server on the memory store.
TARGET_REDIS_TO_MEMORY = 0.5
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Counts:
    #: Messages per point of the servers part, shared by its generators.
    servers: int = 100_000
    #: Messages per store in the stores part.
    stores: int = 100_000
    #: Untimed messages per generator before each measure (the servers
    #: connect to Redis, load their script and subscribe).
    warmup: int = 2_000

    def scaled(self, divisor: int) -> Counts:
        return Counts(**{k: max(1, v // divisor) for k, v in asdict(self).items()})


# --- Redis ------------------------------------------------------------------------------------


class RedisReplyError(BenchError):
    """Redis answered a command with an error."""


def _encode(args: Sequence[Any]) -> bytes:
    words = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def _read_reply(reader: Any) -> Any:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise BenchError(f"Redis closed the connection (read {line[:60]!r})")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisReplyError(rest.decode("utf-8", "replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise BenchError(f"Redis sent {line[:60]!r}")


def redis_call(address: str, *args: Any, timeout: float = 10.0) -> Any:
    """One command on a fresh connection: its reply (RESP2), or RedisReplyError."""
    host, port = bench.split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_encode(args))
            with sock.makefile("rb") as reader:
                return _read_reply(reader)
    except OSError as error:
        raise BenchError(f"Redis at {address}: {error}") from None


def redis_info(address: str, section: str) -> dict[str, str]:
    text = redis_call(address, "INFO", section).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


@dataclass
class RedisSample:
    """What Redis has done so far, summed over its nodes."""

    cpu: list[float]  # per node: user + system, every thread
    main_thread: list[float]  # per node: the thread that runs commands and scripts
    children: float  # forks (AOF rewrites): their CPU
    scripts: int  # EVALSHA and EVAL calls
    forks: int


@dataclass
class Deployment:
    """One Redis, or a Redis Cluster's masters, started here."""

    label: str  # "redis" or "cluster"
    nodes: list[Any]  # durable.Server, .address set
    url: str

    def sample(self) -> RedisSample:
        cpu, main, children, scripts, forks = [], [], 0.0, 0, 0
        for node in self.nodes:
            info = redis_info(node.address, "everything")
            cpu.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
            main.append(float(info.get("used_cpu_user_main_thread", info["used_cpu_user"]))
                        + float(info.get("used_cpu_sys_main_thread", info["used_cpu_sys"])))
            children += float(info["used_cpu_user_children"]) + float(info["used_cpu_sys_children"])
            forks += int(info.get("total_forks", 0))
            for command in ("evalsha", "eval"):
                stats = info.get(f"cmdstat_{command}", "")
                match = re.search(r"calls=(\d+)", stats)
                scripts += int(match.group(1)) if match else 0
        return RedisSample(cpu, main, children, scripts, forks)

    def held(self, prefix: str, queue: bytes) -> tuple[int, int]:
        """Ready ids and stored bodies of a queue, asked of the node that serves its slot."""
        key = prefix.encode() + b"{q:" + queue + b"}:"
        for node in self.nodes:
            try:
                return (int(redis_call(node.address, "LLEN", key + b"ready")),
                        int(redis_call(node.address, "HLEN", key + b"body")))
            except RedisReplyError as error:
                if not str(error).startswith(("MOVED", "ASK")):
                    raise
        raise BenchError(f"no Redis node serves {key.decode()}")

    def commands(self) -> list[str]:
        return [node.command() for node in self.nodes]


def redis_argv(port: int, directory: str, extra: Sequence[str] = ()) -> list[str]:
    return ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", directory,
            *REDIS_OPTIONS, "--daemonize", "no", "--protected-mode", "no", "--logfile", "", *extra]


def start_redis_node(label: str, directory: str, cluster: bool = False) -> Any:
    """redis-server on a free loopback port (another one if it was taken meanwhile), answering PING."""
    os.makedirs(directory, exist_ok=True)
    for _ in range(5):
        port = durable.free_port()
        extra = (["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                  "--cluster-port", str(durable.free_port()), "--cluster-node-timeout", "5000"]
                 if cluster else [])
        node = Server(label, redis_argv(port, directory, extra))
        node.address = f"127.0.0.1:{port}"
        try:
            durable.wait_for_redis(node, port, READY_TIMEOUT_S)
            return node
        except BenchError:
            taken = "Address already in use" in node.output()
            node.stop()
            if not taken:
                raise
    raise BenchError("redis-server found no free port in 5 tries")


def start_cluster(directory: str) -> list[Any]:
    """Three masters, no replicas, every slot assigned, the cluster ok on each."""
    nodes: list[Any] = []
    try:
        for index in range(CLUSTER_MASTERS):
            nodes.append(start_redis_node(f"redis cluster node {index}", os.path.join(directory, f"node{index}"),
                                          cluster=True))
        done = subprocess.run(["redis-cli", "--cluster", "create", *(n.address for n in nodes),
                               "--cluster-replicas", "0", "--cluster-yes"],
                              capture_output=True, text=True, timeout=60, preexec_fn=bench.die_with_parent)
        if done.returncode != 0:
            raise BenchError(f"redis-cli --cluster create failed: {(done.stdout + done.stderr).strip()[-400:]}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        for node in nodes:
            while b"cluster_state:ok" not in redis_call(node.address, "CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise BenchError(f"the Redis Cluster is not ok after {READY_TIMEOUT_S:g} s")
                time.sleep(0.05)
        return nodes
    except BaseException:
        for node in nodes:
            node.stop()
        raise


# --- CPU --------------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy() -> Optional[float]:
    """CPU seconds the whole machine has spent busy (every process, everyone's), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _per_second(before: Optional[float], after: Optional[float], wall: float) -> Optional[float]:
    return None if before is None or after is None or wall <= 0 else (after - before) / wall


# --- The benchmark ------------------------------------------------------------------------------


@dataclass
class Target:
    """What one measure drives: servers of one kind, and the Redis behind them if any."""

    label: str  # "redis", "cluster", "memory", "floor"
    servers: list[Any]
    deployment: Optional[Deployment] = None

    @property
    def floor(self) -> bool:
        return self.label == "floor"


@dataclass
class RedisBench:
    counts: Counts
    loadgen_path: str
    floor_path: str
    python: str
    prefix: str
    token: str = field(default_factory=lambda: os.urandom(3).hex())
    nproc: int = field(default_factory=lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else (os.cpu_count() or 1))
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Every server and generator running, for stop_all.
    running: list[Any] = field(default_factory=list)
    generators: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # Processes -----------------------------------------------------------------------------

    def mqmq_argv(self, store: str) -> list[str]:
        options = ["--store", store]
        if store.startswith("redis"):
            options += ["--redis-prefix", self.prefix]
        return [self.python, "-m", "mqmq", "start", "-addr", "127.0.0.1:0",
                "--max-queued-bytes", "0", "--max-queued-messages", "0", *options]

    def start_servers(self, label: str, argvs: list[list[str]]) -> list[Any]:
        """Start them all at once, then wait for each to log its address."""
        env = durable.server_environment()
        servers = []
        for index, argv in enumerate(argvs):
            server = Server(f"{label} {index + 1}" if len(argvs) > 1 else label, argv,
                            None if argv[0] == self.floor_path else env)
            self.running.append(server)
            servers.append(server)
        try:
            for server in servers:
                server.wait_logged_address(READY_TIMEOUT_S)
        except BaseException:
            for server in servers:
                server.stop()
                self.running.remove(server)
            raise
        return servers

    def start_target(self, label: str, count: int, deployment: Optional[Deployment]) -> Target:
        if label == "floor":
            argvs = [[self.floor_path, "127.0.0.1:0"] for _ in range(count)]
        else:
            store = "memory:" if deployment is None else deployment.url
            argvs = [self.mqmq_argv(store) for _ in range(count)]
        name = "floor" if label == "floor" else f"mqmq ({label})"
        return Target(label, self.start_servers(name, argvs), deployment)

    def stop_target(self, target: Target) -> None:
        # Every one told first, so that they stop together rather than one after another.
        for server in target.servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in target.servers:
            try:
                server.proc.wait(60)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
            self.log_problems(target, server)
            server.stop()
            if server in self.running:
                self.running.remove(server)

    def log_problems(self, target: Target, server: Any) -> None:
        """A server's warnings and errors (its log is deleted once it stops): into the notes, counted."""
        if target.floor:
            return
        lines = [line for line in server.output().splitlines()
                 if re.search(r"\b(WARNING|ERROR|CRITICAL):|Traceback", line)]
        if lines:
            shown = "\n    ".join(line[:300] for line in lines[:5])
            more = f"\n    … and {len(lines) - 5} more" if len(lines) > 5 else ""
            self.notes.append(f"{server.label} logged {len(lines)} warning or error line(s):\n    {shown}{more}")

    def stop_all(self) -> None:
        for process in self.generators:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.generators.clear()
        for server in reversed(self.running):
            server.stop()
        self.running.clear()

    # Generators ---------------------------------------------------------------------------

    def generator_argv(self, server: Any, queue: bytes, total: int, multiplex: bool) -> list[str]:
        return [self.loadgen_path, "consumers", "--addr", server.address, "--queue", queue.decode(),
                "--total", str(total), "--producers", str(PRODUCERS), "--consumers", str(CONSUMERS),
                "--window", str(WINDOW), "--get-timeout", str(GET_TIMEOUT_MS),
                *(["--multiplex"] if multiplex else [])]

    def run_generators(self, argvs: list[list[str]]) -> list[dict[str, Any]]:
        """Start every generator at once; each one's JSON, or BenchError naming the first that failed."""
        started = []
        for argv in argvs:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, preexec_fn=bench.die_with_parent)
            self.generators.append(process)
            started.append(process)
        deadline = time.monotonic() + bench.JOB_TIMEOUT_S
        results, problems = [], []
        try:
            for index, process in enumerate(started):
                try:
                    out, err = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise BenchError(f"a load generator did not finish within {bench.JOB_TIMEOUT_S:g} s") from None
                if process.returncode != 0:
                    problems.append(f"generator {index + 1} of {len(started)}: "
                                    f"{err.decode(errors='replace').strip() or f'exit status {process.returncode}'}")
                    continue
                try:
                    results.append(dict(json.loads(out)))
                except ValueError:
                    problems.append(f"generator {index + 1} printed {out[:200]!r}")
        finally:
            for process in started:
                if process.poll() is None:
                    process.kill()
                process.wait()
                self.generators.remove(process)
        if problems:
            raise BenchError("; ".join(problems))
        return results

    # One measure -----------------------------------------------------------------------------

    def queue(self, what: str, run: int, index: int) -> bytes:
        return f"redis-{self.token}.{what}.{run}.{index}.{MESSAGE_SIZE}".encode()

    def drive(self, target: Target, what: str, run: int, total: int, multiplex: bool) -> dict[str, Any]:
        """One generator per server, all at once, ``total`` messages shared among them; the figures."""
        servers = target.servers
        total = max(total, len(servers))  # (a tiny --divide: at least one message per generator)
        each = [total // len(servers) + (i < total % len(servers)) for i in range(len(servers))]
        warm = [self.generator_argv(s, self.queue(f"{what}-warmup", run, i), self.counts.warmup, multiplex)
                for i, s in enumerate(servers)]
        self.audit(target, self.run_generators(warm), [self.counts.warmup] * len(servers),
                   [self.queue(f"{what}-warmup", run, i) for i in range(len(servers))])
        queues = [self.queue(what, run, i) for i in range(len(servers))]
        argvs = [self.generator_argv(s, q, n, multiplex) for s, q, n in zip(servers, queues, each)]

        redis0 = target.deployment.sample() if target.deployment else None
        busy0, cpu0 = machine_busy(), [s.cpu() for s in servers]
        began = time.perf_counter()
        results = self.run_generators(argvs)
        wall = time.perf_counter() - began
        busy1, cpu1 = machine_busy(), [s.cpu() for s in servers]
        redis1 = target.deployment.sample() if target.deployment else None

        self.audit(target, results, each, queues)
        server_cpu = [_per_second(a, b, wall) for a, b in zip(cpu0, cpu1)]
        known = [c for c in server_cpu if c is not None]
        delivered = sum(r["delivered"] for r in results)
        figures: dict[str, Any] = {
            "servers": len(servers), "delivered": delivered,
            "rate": sum(r["rate"] for r in results),
            "rate_over_wall": delivered / wall,
            "put_rate": sum(r["put_rate"] for r in results),
            "get_p50_us": statistics.median(r["get_p50_us"] for r in results),
            "get_p99_us": max(r["get_p99_us"] for r in results),
            "get_timeouts": sum(r["get_timeouts"] for r in results),
            "wall_s": wall, "longest_generator_s": max(r["elapsed_s"] for r in results),
            "server_cpu_each": server_cpu,
            "server_cpu": sum(known) if known else None,
            "server_cpu_max": max(known) if known else None,
            "generator_cpu": sum(r["cpu_s"] for r in results) / wall,
            "machine_cpu": _per_second(busy0, busy1, wall),
            "generators": results,
            "server_commands": [s.command() for s in servers],
            "generator_commands": [" ".join(shlex.quote(w) for w in argv) for argv in argvs],
        }
        if redis0 is not None and redis1 is not None:
            main = [(b - a) / wall for a, b in zip(redis0.main_thread, redis1.main_thread)]
            figures.update(
                redis_cpu=sum(b - a for a, b in zip(redis0.cpu, redis1.cpu)) / wall,
                redis_main_thread_cpu=max(main), redis_main_thread_cpu_each=main,
                redis_fork_cpu=(redis1.children - redis0.children) / wall,
                redis_forks=redis1.forks - redis0.forks,
                redis_scripts_per_message=(redis1.scripts - redis0.scripts) / delivered if delivered else None,
                redis_cpu_us_per_message=sum(b - a for a, b in zip(redis0.cpu, redis1.cpu)) * 1e6 / delivered
                if delivered else None)
            if figures["redis_forks"]:
                self.notes.append(f"{what} run {run + 1}: Redis forked {figures['redis_forks']} time(s) during the "
                                  f"measure (an AOF rewrite): its CPU is in redis_fork_cpu, not redis_cpu")
        figures["our_cpu"] = sum(v for v in (figures["server_cpu"], figures.get("redis_cpu"),
                                             figures["generator_cpu"]) if v is not None)
        figures["limit"] = limit(figures, self.nproc)
        if figures["get_timeouts"] and not target.floor:
            self.notes.append(f"{what} run {run + 1} ({target.label}): {figures['get_timeouts']:,} Gets answered "
                              f"Timeout (a consumer waited {GET_TIMEOUT_MS} ms with producers still putting)")
        return figures

    def audit(self, target: Target, results: list[dict[str, Any]], expected: list[int],
              queues: list[bytes]) -> None:
        """Every message put delivered once, and nothing left on the queues (Info; Redis itself)."""
        for index, (result, total, queue) in enumerate(zip(results, expected, queues)):
            where = f"generator {index + 1} ({queue.decode()})"
            if result["puts_acknowledged"] != total or result["delivered"] != total:
                raise BenchError(f"{where}: {result['puts_acknowledged']:,} Puts acknowledged and "
                                 f"{result['delivered']:,} messages delivered; expected {total:,} of each")
            if target.floor:
                continue
            if result["extra_replies"]:
                raise BenchError(f"{where}: {result['extra_replies']:,} messages delivered beyond the "
                                 f"{total:,} put: duplicates")
            listed = bench.info(target.servers[index].address).get("Queues", {}).get(queue.decode())
            count = 0 if listed is None else int(listed.get("NumMessages", 0))
            if count:
                raise BenchError(f"{where}: Info counts {count:,} messages left after every one was delivered")
            if target.deployment is not None:
                ready, bodies = target.deployment.held(self.prefix, queue)
                if ready or bodies:
                    raise BenchError(f"{where}: Redis still holds {ready:,} ready ids and {bodies:,} bodies "
                                     f"after every message was delivered")

    def attempt(self, what: str, target_label: str, count: int, deployment: Optional[Deployment],
                run: int, total: int, multiplex: bool) -> Optional[dict[str, Any]]:
        """Start the servers, drive them, stop them; None (and an error recorded) if it failed."""
        target: Optional[Target] = None
        try:
            target = self.start_target(target_label, count, deployment)
            figures = self.drive(target, what, run, total, multiplex)
            for server in target.servers:
                server.check_alive()
            figures["run"] = run
            return figures
        except BenchError as error:
            message = f"{what} ({target_label}, {count} server{'s' if count > 1 else ''}) run {run + 1}: {error}"
            if target is not None:
                dead = [s for s in target.servers if s.proc.poll() is not None]
                for server in dead:
                    message += f"\n  {server.label} exited ({server.proc.returncode}):\n{server.tail()}"
            self.errors.append(message)
            print(f"  ERROR {message}", flush=True)
            return None
        finally:
            if target is not None:
                self.stop_target(target)


def limit(figures: dict[str, Any], nproc: int) -> str:
    """Where the limit is, from the CPU figures: Redis's thread, the machine, an mqmq server, the
    generators; every one that is full, the first deciding; or nobody full (the time goes in waiting)."""
    redis = figures.get("redis_main_thread_cpu")
    machine, server = figures.get("machine_cpu"), figures.get("server_cpu_max")
    generators = figures.get("generator_cpu")
    full = []
    if redis is not None and redis >= BUSY:
        full.append(f"Redis (its thread {redis:.2f} cores)")
    if machine is not None and machine >= BUSY * nproc:
        full.append(f"the machine ({machine:.2f} of {nproc} cores busy)")
    if server is not None and server >= BUSY:
        full.append(f"an mqmq server ({server:.2f} cores: its one thread)")
    if generators is not None and generators >= BUSY * figures.get("servers", 1):
        full.append(f"the generators ({generators:.2f} cores)")
    if full:
        return "; ".join(full)
    shown = "" if machine is None else f"; the machine {machine:.2f} of {nproc} cores busy"
    return f"no process full (waiting: round trips, wake-ups{shown})"


# --- Reporting ---------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], nproc: int) -> dict[str, Any]:
    median: dict[str, Any] = durable.median_of(runs)
    each = [r["server_cpu_each"] for r in runs if r.get("server_cpu_each")]
    if each and all(len(e) == len(each[0]) for e in each):
        median["server_cpu_each"] = [statistics.median(v for v in column if v is not None)
                                     if any(v is not None for v in column) else None
                                     for column in zip(*each)]
    if runs:
        median["limit"] = limit(median, nproc)
    return {"runs": runs, "median": median}


def ratio(first: list[dict[str, Any]], second: list[dict[str, Any]], key: str = "rate") -> dict[str, Any]:
    by_run = {run["run"]: run for run in second}
    runs = [a[key] / by_run[a["run"]][key] for a in first
            if a["run"] in by_run and a.get(key) and by_run[a["run"]].get(key)]
    return {"runs": runs, "median": statistics.median(runs) if runs else None}


def fmt(value: Any) -> str:
    formatted: str = bench.fmt(value)
    return formatted


def cores(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}"


def progress(what: str, label: str, run: int, runs: int, figures: dict[str, Any]) -> None:
    parts = [f"{figures['rate']:>9,.0f} msg/s", f"Get wait p50 {fmt(figures['get_p50_us'])} µs, "
             f"p99 {fmt(figures['get_p99_us'])} µs"]
    cpu = [f"servers {'+'.join(cores(c) for c in figures['server_cpu_each'])}"]
    if "redis_cpu" in figures:
        cpu.append(f"Redis {cores(figures['redis_cpu'])}")
    cpu += [f"generators {cores(figures['generator_cpu'])}",
            f"ours {cores(figures['our_cpu'])} of the machine's {cores(figures['machine_cpu'])}"]
    parts.append("CPU " + ", ".join(cpu))
    if figures["get_timeouts"]:
        parts.append(f"{figures['get_timeouts']:,} Timeouts")
    where = f"run {run + 1}/{runs} " if runs > 1 else ""
    print(f"  {where}{what:<16} {label:<22} " + "; ".join(parts) + f"; limit: {figures['limit']}", flush=True)


def print_servers(part: dict[str, Any], nproc: int) -> None:
    head = (f"{'store':<8} {'servers':>7} {'msg/s':>9} {'floor':>9} {'÷ floor':>8} {'Get p50 µs':>10} "
            f"{'p99 µs':>8} {'mqmq CPU':>14} {'Redis CPU':>13} {'gens':>5} {'ours/all':>9}  limit")
    print(head)
    print("-" * len(head))
    for label in ("redis", "cluster"):
        for count, point in part.get(label, {}).items():
            ours = point.get("mqmq", {}).get("median", {})
            floor = point.get("floor", {}).get("median", {})
            each = ours.get("server_cpu_each") or []
            shown = "+".join(cores(c) for c in each) if len(each) <= 2 else \
                f"{cores(ours.get('server_cpu'))} (≤{cores(ours.get('server_cpu_max'))})"
            redis = cores(ours.get("redis_cpu"))
            if label == "cluster" and ours.get("redis_main_thread_cpu") is not None:
                redis += f" (≤{cores(ours['redis_main_thread_cpu'])})"
            print(f"{label:<8} {count:>7} {fmt(ours.get('rate')):>9} {fmt(floor.get('rate')):>9} "
                  f"{_times(point.get('ratio_to_floor', {}).get('median')):>8} {fmt(ours.get('get_p50_us')):>10} "
                  f"{fmt(ours.get('get_p99_us')):>8} {shown:>14} {redis:>13} "
                  f"{cores(ours.get('generator_cpu')):>5} {both(ours):>9}  {ours.get('limit', '')}")
            if floor:
                print(f"{'':<8} {'':>7} {'(floor':>9} {'':>9} {'':>8} {fmt(floor.get('get_p50_us')):>10} "
                      f"{fmt(floor.get('get_p99_us')):>8} {cores(floor.get('server_cpu')):>14} {'':>13} "
                      f"{cores(floor.get('generator_cpu')):>5} {both(floor):>9}  "
                      f"{floor.get('limit', '')})")
    print("(medians over runs. msg/s: the N generators' rates summed; ÷ floor: the median of the per-run ratios\n"
          " to N floors driven the same way; Get p50: the median of the generators' p50s, p99: the worst of theirs.\n"
          " CPU in cores over the timed part: each mqmq server (or their sum, ≤ the busiest), Redis (the process;\n"
          " cluster: all nodes, ≤ the busiest node's thread), the generators, and ours (all of those) against the\n"
          f" whole machine's ({nproc} cores, everyone's work, from /proc/stat). Under each point, the floor's own.)")


def print_stores(part: dict[str, Any]) -> None:
    head = (f"{'store':<8} {'msg/s':>9} {'÷ floor':>8} {'Get p50 µs':>10} {'p99 µs':>8} {'server CPU':>10} "
            f"{'Redis':>6} {'gens':>5} {'ours/all':>9}  limit")
    print(head)
    print("-" * len(head))
    for label in ("floor", "memory", "redis"):
        entry = part.get(label, {}).get("median", {})
        if not entry:
            continue
        to_floor = "" if label == "floor" else _times(part.get(f"{label}_to_floor", {}).get("median"))
        print(f"{label:<8} {fmt(entry.get('rate')):>9} {to_floor:>8} {fmt(entry.get('get_p50_us')):>10} "
              f"{fmt(entry.get('get_p99_us')):>8} {cores(entry.get('server_cpu')):>10} "
              f"{cores(entry.get('redis_cpu')) if 'redis_cpu' in entry else '':>6} "
              f"{cores(entry.get('generator_cpu')):>5} {both(entry):>9}  {entry.get('limit', '')}")
    print("(medians over runs; ÷ floor: the median of the per-run ratios to the floor; CPU in cores, as above)")
    value = part.get("redis_to_memory", {}).get("median")
    if value is not None:
        verdict = "met" if value >= TARGET_REDIS_TO_MEMORY else "MISSED"
        print(f"redis ÷ memory: {value:.2f}× (the median of the per-run ratios; issue 13's target "
              f"≥ {TARGET_REDIS_TO_MEMORY}: {verdict})")
    redis = part.get("redis", {}).get("median", {})
    if redis.get("redis_scripts_per_message") is not None:
        print(f"Redis per message delivered: {redis['redis_scripts_per_message']:.2f} scripts, "
              f"{redis['redis_cpu_us_per_message']:.1f} µs of its CPU")


def both(figures: dict[str, Any]) -> str:
    """Our processes' CPU over the whole machine's, in cores."""
    return f"{cores(figures.get('our_cpu'))}/{cores(figures.get('machine_cpu'))}"


def _times(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}×"


def write_chart(path: str, part: dict[str, Any], nproc: int, info_line: str) -> Optional[str]:
    """Messages/s against servers (mqmq per Redis kind, and the floor), and below it the CPU in cores."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'): no chart written"
    labels = [label for label in ("redis", "cluster") if part.get(label)]
    counts = sorted({int(c) for label in labels for c in part[label]})
    if not counts:
        return "no servers figures: no chart written"
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7.2), dpi=120, sharex=True,
                                         gridspec_kw={"height_ratios": [3, 2]})
    names = {"redis": "mqmq, one Redis", "cluster": f"mqmq, Redis Cluster ({CLUSTER_MASTERS} masters)"}
    colours = {"redis": "#1f77b4", "cluster": "#2ca02c"}
    floor_done = False
    for label in labels:
        points = part[label]
        xs = [c for c in counts if points.get(str(c), {}).get("mqmq", {}).get("median", {}).get("rate")]
        ys = [points[str(c)]["mqmq"]["median"]["rate"] for c in xs]
        top.plot(xs, ys, color=colours[label], marker="o", linewidth=2.2, label=names[label])
        for x, y in zip(xs, ys):
            redis = points[str(x)]["mqmq"]["median"].get("redis_main_thread_cpu")
            text = f"{y:,.0f}" + ("" if redis is None else f"\nRedis {redis:.2f} cores")
            # The lower line's label under it, the other's over it.
            others = [part[o].get(str(x), {}).get("mqmq", {}).get("median", {}).get("rate") or 0
                      for o in labels if o != label]
            below = all(y <= other for other in others)
            top.annotate(text, (x, y), textcoords="offset points", xytext=(0, -26 if below else 8),
                         ha="center", fontsize=7.5, color=colours[label])
        if not floor_done:
            fx = [c for c in counts if points.get(str(c), {}).get("floor", {}).get("median", {}).get("rate")]
            fy = [points[str(c)]["floor"]["median"]["rate"] for c in fx]
            if fx:
                floor_done = True
                top.plot(fx, fy, color="#7f7f7f", marker="s", linewidth=1.6, linestyle="--",
                         label="floor: N floor servers, driven the same way (the generators' ceiling)")
                for x, y in zip(fx, fy):
                    top.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center",
                                 fontsize=7.5, color="#7f7f7f")
    top.set_yscale("log")
    low, high = top.get_ylim()
    top.set_ylim(low / 1.8, high * 1.5)  # room for the labels under and over the lines
    top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    # Minor ticks labelled at 2 and 5 times a power of ten only.
    top.yaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:,.0f}" if v > 0 and f"{v:.0e}"[0] in "25" else ""))
    top.tick_params(axis="y", which="minor", labelsize=7)
    top.set_ylabel("messages/s (log scale), all generators")
    top.set_title("mqmq on Redis: fan workload, one generator per server", fontsize=12)
    top.grid(True, which="both", alpha=0.3)
    top.legend(loc="best", fontsize=8, framealpha=0.9)

    bars = [("redis_main_thread_cpu", "Redis (the busiest thread)", "#ff7f0e"),
            ("server_cpu", "mqmq servers (all)", "#1f77b4"),
            ("generator_cpu", "generators", "#9467bd"),
            ("machine_cpu", "machine (everyone's)", "#c7c7c7")]
    # One Redis's figures; with a cluster, its busiest node's thread beside them.
    series = [("redis", *bar) for bar in bars] if "redis" in labels else []
    if "cluster" in labels:
        series.insert(1, ("cluster", "redis_main_thread_cpu", "Redis Cluster (the busiest node's thread)",
                          "#2ca02c"))
    width = 0.16
    for offset, (label, key, name, colour) in enumerate(series):
        places: list[float] = []
        heights: list[float] = []
        for c in counts:
            value = part[label].get(str(c), {}).get("mqmq", {}).get("median", {}).get(key)
            if value is not None:
                places.append(c * 2 ** ((offset - (len(series) - 1) / 2) * width))
                heights.append(value)
        bottom.bar(places, heights, width=[x * 0.1 for x in places], color=colour, label=name)
    for level, text, colour in ((1.0, "1 core: Redis's thread (or one mqmq server) is full", "#d62728"),
                                (nproc, f"{nproc} cores: the machine is full", "#555555")):
        bottom.axhline(level, color=colour, linestyle=":", linewidth=1.2)
        bottom.annotate(text, (counts[-1] * 1.5, level), textcoords="offset points", xytext=(0, 3),
                        ha="right", fontsize=7, color=colour)
    bottom.set_ylim(0, max(nproc * 1.6, bottom.get_ylim()[1] * 1.3))
    bottom.set_ylabel("CPU, cores (mqmq on one Redis)" if len(labels) == 1 and labels[0] == "redis"
                      else "CPU, cores")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(counts)
    bottom.set_xticklabels([str(c) for c in counts])
    bottom.set_xlim(counts[0] / 1.6, counts[-1] * 1.6)
    bottom.set_xlabel("mqmq servers sharing the queues' Redis (each driven by its own generator)")
    bottom.grid(True, axis="y", alpha=0.3)
    bottom.legend(loc="upper center", ncol=3, frameon=False, fontsize=7)
    figure.text(0.99, 0.005, info_line, ha="right", va="bottom", fontsize=7, color="#555555")
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return None


# --- Main ------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="mqmq with its queues in Redis (issue 13): scaling with servers, and one server "
                    "against the memory store, each beside the floor measured in the same run.",
        epilog="See benchmarks/README.md, 'Queues in Redis (redis.py)'.")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts, from {','.join(PARTS)} (default: both)")
    parser.add_argument("--servers", default=",".join(map(str, DEFAULT_SERVERS)), metavar="N,N,…",
                        help="numbers of mqmq servers sharing one Redis (default: 1,2,4)")
    parser.add_argument("--cluster", action="store_true",
                        help=f"also run the servers part against a {CLUSTER_MASTERS}-master Redis Cluster")
    parser.add_argument("--runs", type=int, default=1, help="repeat every measure N times and report medians")
    parser.add_argument("--messages", type=int, metavar="N",
                        help=f"messages per point and per store (default {Counts.servers:,}; "
                             f"divided by --divide / --quick)")
    parser.add_argument("--warmup", type=int, metavar="N",
                        help=f"untimed messages per generator before each measure (default {Counts.warmup:,}; "
                             f"divided too; more for a PyPy server's JIT)")
    parser.add_argument("--json", metavar="FILE", help="write every figure, run and command as JSON")
    parser.add_argument("--chart", metavar="FILE.png",
                        help="throughput against servers, with the floor and the CPU (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="every count divided by 10: a smoke run")
    parser.add_argument("--divide", type=int, metavar="N", help="every count divided by N (the tests use 200)")
    parser.add_argument("--python", default=sys.executable, metavar="EXE",
                        help="the Python that runs the mqmq servers (default: this one), e.g. a PyPy venv's")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown or not args.parts:
        parser.error(f"unknown part {', '.join(unknown) or '(none)'}: choose from {','.join(PARTS)}")
    try:
        args.server_counts = sorted({int(n) for n in args.servers.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--servers wants numbers separated by commas, not {args.servers!r}")
    if not args.server_counts or args.server_counts[0] < 1:
        parser.error("--servers wants numbers of 1 or more")
    if args.runs < 1:
        parser.error("--runs must be 1 or more")
    if args.divide is not None and args.divide < 1:
        parser.error("--divide must be 1 or more")
    if args.messages is not None and args.messages < 1:
        parser.error("--messages must be 1 or more")
    if args.warmup is not None and args.warmup < 1:
        parser.error("--warmup must be 1 or more")
    if os.sep in args.python:
        args.python = os.path.abspath(args.python)
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_servers_part(rb: RedisBench, deployment: Deployment, counts_of_servers: list[int],
                     runs: int) -> dict[str, Any]:
    found: dict[int, dict[str, list[dict[str, Any]]]] = {n: {"mqmq": [], "floor": []} for n in counts_of_servers}
    for run in range(runs):
        for count in counts_of_servers:
            for target in (deployment.label, "floor"):
                figures = rb.attempt(f"servers-{deployment.label}", target, count,
                                     deployment if target != "floor" else None, run, rb.counts.servers, True)
                if figures is None:
                    continue
                found[count]["mqmq" if target != "floor" else "floor"].append(figures)
                progress(f"{count} server{'s' if count > 1 else ''}", target if target == "floor" else
                         f"mqmq ({deployment.label})", run, runs, figures)
    part: dict[str, Any] = {}
    for count, entry in found.items():
        point = {name: summarize(runs_, rb.nproc) for name, runs_ in entry.items()}
        point["ratio_to_floor"] = ratio(entry["mqmq"], entry["floor"])
        part[str(count)] = point
    return part


def run_stores_part(rb: RedisBench, deployment: Deployment, runs: int) -> dict[str, Any]:
    found: dict[str, list[dict[str, Any]]] = {"floor": [], "memory": [], "redis": []}
    for run in range(runs):
        for label in found:
            figures = rb.attempt("stores", label, 1, deployment if label == "redis" else None, run,
                                 rb.counts.stores, False)
            if figures is not None:
                found[label].append(figures)
                progress("one server", label if label == "floor" else f"mqmq ({label})", run, runs, figures)
    part: dict[str, Any] = {label: summarize(runs_, rb.nproc) for label, runs_ in found.items()}
    part["redis_to_memory"] = ratio(found["redis"], found["memory"])
    part["memory_to_floor"] = ratio(found["memory"], found["floor"])
    part["redis_to_floor"] = ratio(found["redis"], found["floor"])
    return part


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    missing = [name for name in ("redis-server", *(["redis-cli"] if args.cluster else []))
               if shutil.which(name) is None]
    if missing:
        print(f"ERROR: {' and '.join(missing)} not found (Debian: apt-get install redis-server)", file=sys.stderr)
        return 1
    try:
        tools = bench.build_tools(bench.BUILD_DIR)
    except BenchError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    divisor = args.divide or (10 if args.quick else 1)
    base = Counts()
    if args.messages is not None:
        base = replace(base, servers=args.messages, stores=args.messages)
    if args.warmup is not None:
        base = replace(base, warmup=args.warmup)
    counts = base.scaled(divisor)
    directory = tempfile.mkdtemp(prefix="mqmq-redis-bench-", dir="/tmp")
    token = os.urandom(3).hex()
    rb = RedisBench(counts, tools["loadgen"], tools["floor"], args.python, f"mqmq-bench-{token}:", token)
    box = bench.machine()
    print(f"mqmq on Redis benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"machine: {box['nproc']} CPUs (nproc), {box['cpu_model']}, {box['memory_gb']} GiB, {box['kernel']}")
    print(f"python:  {box['python']} ({sys.executable}); servers run on {args.python}")
    load = box["load_average_at_start"]
    if load:
        busy = "  (busy: other work on the machine will skew the figures)" if load[0] > 0.5 else ""
        print(f"load:    {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min){busy}")
    if box["mqmq_commit"]:
        print(f"mqmq:    commit {box['mqmq_commit']}")
    print(f"redis:   {durable.redis_version()}, {' '.join(REDIS_OPTIONS)}; key prefix {rb.prefix}")
    print(f"counts:  {f'divided by {divisor}' if divisor > 1 else 'full'}; runs: {args.runs}; "
          f"{counts.servers:,} messages per point, {counts.stores:,} per store, {counts.warmup:,} warm-up "
          f"per generator; {MESSAGE_SIZE}-byte messages")
    print()
    parts: dict[str, Any] = {}
    deployments: dict[str, Deployment] = {}
    nodes: list[Any] = []
    try:
        redis = start_redis_node("redis", os.path.join(directory, "redis"))
        nodes.append(redis)
        deployments["redis"] = Deployment("redis", [redis], f"redis://{redis.address}/0")
        print(f"redis-server at {redis.address} (pid {redis.pid}): {redis.command()}")
        if "servers" in args.parts and args.cluster:
            cluster = start_cluster(os.path.join(directory, "cluster"))
            nodes += cluster
            deployments["cluster"] = Deployment("cluster", cluster,
                                                "redis+cluster://" + ",".join(n.address for n in cluster))
            print(f"Redis Cluster: {', '.join(n.address for n in cluster)}")
        print()
        for part in args.parts:
            if part == "servers":
                print("servers: fan (4 producers pipelining, 4 consumers on one thread), one generator and one "
                      "queue per mqmq server", flush=True)
                parts[part] = {}
                for label, deployment in deployments.items():
                    parts[part][label] = run_servers_part(rb, deployment, args.server_counts, args.runs)
            else:
                print("stores: consumers (4 producers pipelining, 4 consumers each a blocking thread), "
                      "one mqmq server", flush=True)
                parts[part] = run_stores_part(rb, deployments["redis"], args.runs)
            print()
    except BenchError as error:
        rb.errors.append(str(error))
        print(f"\nERROR: {error}", flush=True)
    except KeyboardInterrupt:
        rb.errors.append("interrupted")
        print("\ninterrupted", flush=True)
    finally:
        rb.stop_all()
        for node in nodes:
            node.stop()
        shutil.rmtree(directory, ignore_errors=True)
    if parts.get("servers"):
        print_servers(parts["servers"], rb.nproc)
        print()
    if parts.get("stores"):
        print_stores(parts["stores"])
        print()
    if args.chart and parts.get("servers"):
        line = (f"{box['nproc']} CPUs, {box['cpu_model']}, servers on {box['python']}; "
                + (f"counts divided by {divisor}" if divisor > 1 else f"median of {args.runs} run(s)")
                + f"; {time.strftime('%Y-%m-%d')}")
        problem = write_chart(args.chart, parts["servers"], rb.nproc, line)
        if problem:
            rb.notes.append(problem)
        else:
            print(f"chart: {args.chart}")
    for note in rb.notes:
        print(f"note: {note}")
    report = {
        "machine": box,
        "settings": {
            "quick": args.quick, "divided_by": divisor, "runs": args.runs, "counts": asdict(counts),
            "servers": args.server_counts, "cluster": args.cluster, "message_size": MESSAGE_SIZE,
            "generator": {"producers": PRODUCERS, "consumers": CONSUMERS, "window": WINDOW,
                          "get_timeout_ms": GET_TIMEOUT_MS, "loadgen": tools["loadgen"], "floor": tools["floor"],
                          "cflags": bench.CFLAGS},
            "servers_workload": "fan (loadgen consumers --multiplex)",
            "stores_workload": "consumers (loadgen consumers)",
            "server_python": args.python, "redis_prefix": rb.prefix,
            "redis": {"version": durable.redis_version(), "options": REDIS_OPTIONS,
                      "commands": {label: d.commands() for label, d in deployments.items()},
                      "urls": {label: d.url for label, d in deployments.items()}},
            "busy": BUSY, "nproc": rb.nproc},
        "parts": parts, "errors": rb.errors, "notes": rb.notes,
        "targets": {"stores.redis_to_memory": f">= {TARGET_REDIS_TO_MEMORY}"},
    }
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
        print(f"json:  {args.json}")
    if rb.errors:
        print(f"\n{len(rb.errors)} error(s):")
        for problem in rb.errors:
            print(f"  - {problem}")
        sys.stdout.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
