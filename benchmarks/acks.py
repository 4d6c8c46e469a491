#!/usr/bin/env python3
"""Acknowledged delivery's cost (the project's issue 11): Reserve + Ack pairs beside Get alone.

    python benchmarks/acks.py [--runs 3] [--count 200000] [--window 64] [--quick] [--json FILE]

One connection keeps a steady pipeline (``--window`` requests in flight;
after each read, one request per reply it brought) against a queue filled
beforehand with ``--count`` 100-byte messages, and takes them all:

- ``get``: with ``Get`` alone (one request a message);
- ``acks``: with ``Reserve`` and its ``Ack`` (two requests a message: each
  ``Reserve``'s reply brings the id its ``Ack`` sends back; ``Ack``\\ s go
  out before new ``Reserve``\\ s, and the window counts both).

Figures are messages taken per second (the fill is not timed), for the
memory store (the target: ``acks`` at least 60% of ``get``) and, for
reference, SQLite with ``--fsync always``; each beside the floor server
(``floor.c``, which answers every request at once) driven the same way in
the same run, which is what this load generator can do on this machine.
After each run the server must hold nothing (Info): every message taken
once, every reservation acked.  The load comes from ``loadgen`` (built by
bench.py's rules into ``benchmarks/build/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from types import ModuleType
from typing import Any, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_RATIO = 0.60


def _load_durable() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mqmq_durable", os.path.join(HERE, "durable.py"))
    assert spec is not None and spec.loader is not None
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


durable = _load_durable()
bench = durable.bench
MESSAGE_SIZE = 100


def take_all(runner: Any, server: Any, queue: bytes, how: str, count: int, window: int) -> dict[str, Any]:
    """Fill ``queue`` (unless the floor), then take ``count`` messages by ``how``
    (``gets`` or ``acks``); the generator's figures, with ``messages_per_s``."""
    if server.label != "floor":
        runner.loadgen(server, "stream", queue, "--window", window, "--phase", f"puts:{count}")
        runner.expect_queued(server, queue, count, "after the fill")
    result = runner.loadgen(server, "stream", queue, "--window", window, "--phase", f"{how}:{count}")
    per_message = 2 if how == "acks" else 1
    result["messages_per_s"] = result["rate"] / per_message
    if server.label != "floor":
        runner.expect_queued(server, queue, 0, f"after the {how}")
        reserved = bench.info(server.address).get("NumReserved", 0)
        if reserved:
            raise durable.BenchError(f"Info counts {reserved} reserved messages after the acks")
    return result


def measure(runner: Any, target: str, run: int, count: int, window: int) -> dict[str, Any]:
    if target == "floor":
        server = runner.start_floor()
    else:
        config = durable.MEMORY if target == "memory" else durable.ALWAYS
        server = runner.start_mqmq(config, None if target == "memory" else runner.database(target))
    try:
        figures: dict[str, Any] = {"run": run}
        for how in ("gets", "acks"):
            queue = f"acks-{runner.token}.{how}.{run}.{MESSAGE_SIZE}".encode()
            result = take_all(runner, server, queue, how, count, window)
            figures[how] = result
            print(f"  {target:<14} run {run}: {how:<4} {result['messages_per_s']:>11,.0f} msg/s  "
                  f"(p50 {result['p50_us']:.0f} µs, p99 {result['p99_us']:.0f} µs per request; "
                  f"generator {result['cpu_frac']:.2f} of a core)", flush=True)
        return figures
    finally:
        runner.stop(server)


def median(runs: list[dict[str, Any]], how: str, key: str = "messages_per_s") -> Optional[float]:
    values = [run[how][key] for run in runs if how in run]
    return statistics.median(values) if values else None


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each target; medians reported")
    parser.add_argument("--count", type=int, default=200_000, help="messages taken per run and way")
    parser.add_argument("--window", type=int, default=64, help="requests in flight on the connection")
    parser.add_argument("--targets", default="memory,sqlite,floor",
                        help="comma-separated, from memory, sqlite (fsync always) and floor")
    parser.add_argument("--quick", action="store_true", help="--count divided by 10, one run: a smoke run")
    parser.add_argument("--json", metavar="FILE", help="write every figure, run and command as JSON")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.targets or set(args.targets) - {"memory", "sqlite", "floor"}:
        parser.error("--targets: choose from memory, sqlite, floor")
    if args.quick:
        args.count, args.runs = max(1, args.count // 10), 1
    if args.runs < 1 or args.count < 1 or args.window < 1:
        parser.error("--runs, --count and --window must be at least 1")
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        tools = bench.build_tools(bench.BUILD_DIR)
    except durable.BenchError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    directory = tempfile.mkdtemp(prefix="mqmq-acks-", dir="/tmp")
    runner = durable.Durable(durable.Counts(), tools["loadgen"], tools["floor"], directory)
    box = bench.machine()
    print(f"mqmq acknowledged-delivery benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"machine: {box['nproc']} CPUs (nproc), {box['cpu_model']}, {box['kernel']}; "
          f"python {box['python']}; mqmq commit {box['mqmq_commit']}")
    print(f"one connection, {args.window} requests in flight, {args.count:,} {MESSAGE_SIZE}-byte messages "
          f"per run and way, {args.runs} runs\n", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {target: [] for target in args.targets}
    try:
        for run in range(1, args.runs + 1):
            for target in args.targets:
                result = runner.attempt(f"{target} run {run}",
                                        lambda: measure(runner, target, run, args.count, args.window))
                if result is not None:
                    runs[target].append(result)
    except KeyboardInterrupt:
        runner.errors.append("interrupted")
    finally:
        runner.stop_all()
        shutil.rmtree(directory, ignore_errors=True)
    print()
    summary: dict[str, Any] = {}
    floor_gets, floor_acks = median(runs.get("floor", []), "gets"), median(runs.get("floor", []), "acks")
    for target in args.targets:
        gets, acks = median(runs[target], "gets"), median(runs[target], "acks")
        ratios = [run["acks"]["messages_per_s"] / run["gets"]["messages_per_s"] for run in runs[target]]
        ratio = statistics.median(ratios) if ratios else None
        summary[target] = {"gets_per_s": gets, "acks_per_s": acks, "acks_over_gets": ratio}
        shown = "" if ratio is None else f"  Reserve+Ack ÷ Get {ratio:.2f}"
        if target == "memory" and ratio is not None:
            shown += f"  (target ≥ {TARGET_RATIO:.2f}: {'met' if ratio >= TARGET_RATIO else 'MISSED'})"
        print(f"{target:<7} Get {bench.fmt(gets):>11} msg/s   Reserve+Ack {bench.fmt(acks):>11} msg/s{shown}")
    if floor_gets and floor_acks:
        print(f"(floor: Get {bench.fmt(floor_gets)}, Reserve+Ack {bench.fmt(floor_acks)} msg/s: the "
              f"generator's ceiling here)")
    for note in runner.notes:
        print(f"note: {note}")
    for error in runner.errors:
        print(f"ERROR: {error}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": box, "args": {k: v for k, v in vars(args).items()}, "summary": summary,
                       "runs": runs, "notes": runner.notes, "errors": runner.errors}, out, indent=1)
    return 1 if runner.errors else 0


if __name__ == "__main__":
    sys.exit(main())
