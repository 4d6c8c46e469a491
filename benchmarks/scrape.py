"""Does scraping disturb serving?  ``/metrics`` and ``/stats`` of a server
holding many queues (100,000 by default), and a client's latency while it is
scraped without pause.

    python benchmarks/scrape.py [--queues 100000] [--seconds 5] [--json FILE]

In one run, against one ``mqmq start --http`` server (memory store):

1. ``--queues`` queues are made, each holding one message (and one queue
   more, holding more, so the largest-queues list has a clear first);
2. ``/metrics`` and ``/stats`` are fetched 10 times each: the time of a
   scrape (wall, to the last byte) and its size;
3. the compiled load generator (``loadgen stream --window 1``: one
   connection, ``Put`` then ``Get``, one request at a time) measures
   latency for ``--seconds``: against the floor (``floor.c``, which answers
   at once), against the server left alone, and against the server while
   another process scrapes ``/metrics`` back to back (far more often than
   any Prometheus would: each scrape starts as the last ends).

A scrape walks the queues a slice per reactor turn (``QUEUES_PER_TURN``):
what a request waits behind is one slice, not the whole walk, and the
``max`` latency under scraping shows the longest such wait.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import socket
import sys
import time
import urllib.request
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402  (the benchmarks' shared tools, beside this file)

_HTTP = re.compile(r"serving metrics and the dashboard over HTTP: (\S+)")


def fill(address: str, queues: int) -> None:
    """One message in each of ``queues`` queues, and 50 in one more, pipelined."""
    with bench.connect(address, 60) as sock:
        requests = [bench.frame(b"Put", b"q%06d" % n, b"m" * 32) for n in range(queues)]
        requests += [bench.frame(b"Put", b"largest", b"m" * 32)] * 50
        ok = bench.frame(b"OK")
        for start in range(0, len(requests), 1000):
            chunk = requests[start:start + 1000]
            sock.sendall(b"".join(chunk))
            expected = ok * len(chunk)
            got = bench._recv_exactly(sock, len(expected))
            if got != expected:
                raise bench.BenchError(bench.describe_unexpected(got, expected, 0))


def fetch(url: str) -> tuple[float, int]:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        size = len(response.read())
    return time.perf_counter() - began, size


def scrape_until(url: str, stop: Any, count: Any, interval: float) -> None:
    """Scrape ``url`` every ``interval`` seconds (0: back to back) until ``stop`` is set."""
    while not stop.is_set():
        began = time.monotonic()
        fetch(url)
        with count.get_lock():
            count.value += 1
        stop.wait(max(0.0, interval - (time.monotonic() - began)))


def latency(loadgen: str, address: str, pairs: int) -> dict[str, Any]:
    return bench.run_loadgen(loadgen, address, "stream", b"latency", "--window", 1,
                             "--phase", f"pairs:{pairs}", "--warmup-pairs", 500)


def pairs_for(loadgen: str, address: str, seconds: float) -> int:
    """Pairs that take about ``seconds`` one at a time against ``address``."""
    probe = latency(loadgen, address, 2000)
    return max(2000, int(seconds * probe["requests"] / probe["elapsed_s"] / 2))


def summary(result: dict[str, Any]) -> dict[str, float]:
    return {key: result[key] for key in ("rate", "p50_us", "p99_us", "max_us")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=5.0, help="each latency measurement's length")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    tools = bench.build_tools(quiet=True)
    floor = bench.start_floor(tools["floor"])
    server = bench._started("mqmq", [
        sys.executable, "-m", "mqmq", "start", "-addr", "127.0.0.1:0", "--http", "tcp:0:interface=127.0.0.1",
        "--max-queues", "0", "--max-queued-bytes", "0", "--max-queued-messages", "0",
    ])
    report: dict[str, Any] = {"machine": bench.machine(), "queues": args.queues}
    try:
        http = _HTTP.search(server.output())
        if http is None:
            raise bench.BenchError(f"the server did not say where it serves HTTP:\n{server.tail()}")
        base = f"http://{http.group(1)}"
        began = time.perf_counter()
        fill(server.address, args.queues)
        report["fill_s"] = time.perf_counter() - began
        print(f"{args.queues:,} queues made in {report['fill_s']:.1f} s; RSS {server.rss() or 0:,} bytes")

        for path in ("/metrics", "/stats"):
            times, size = [], 0
            for _ in range(10):
                seconds, size = fetch(base + path)
                times.append(seconds)
            times.sort()
            report[path] = {"median_ms": times[5] * 1000, "max_ms": times[-1] * 1000, "bytes": size}
            print(f"{path}: median {times[5] * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms, {size:,} bytes")

        pairs = pairs_for(tools["loadgen"], server.address, args.seconds)
        report["pairs"] = pairs
        report["floor"] = summary(latency(tools["loadgen"], floor.address, pairs))
        report["alone"] = summary(latency(tools["loadgen"], server.address, pairs))
        for key, path, interval in (("every_second", "/stats", 1.0), ("back_to_back", "/metrics", 0.0)):
            stop, count = multiprocessing.Event(), multiprocessing.Value("l", 0)
            scraper = multiprocessing.Process(target=scrape_until, args=(base + path, stop, count, interval))
            scraper.start()
            try:
                time.sleep(0.5)  # the first scrape under way
                report[key] = summary(latency(tools["loadgen"], server.address, pairs))
            finally:
                stop.set()
                scraper.join(120)
            report[key]["scrapes"] = count.value
        server.check_alive()
    finally:
        server.stop()
        floor.stop()

    print(f"\nlatency of Put+Get, one at a time, {pairs:,} pairs each ({args.queues:,} queues held):")
    print(f"{'':32} {'pairs/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'max µs':>9}")
    for key, label in (("floor", "floor"), ("alone", "mqmq, not scraped"),
                       ("every_second", f"/stats every 1 s ({report['every_second']['scrapes']})"),
                       ("back_to_back", f"/metrics back to back ({report['back_to_back']['scrapes']})")):
        row = report[key]
        print(f"{label:32} {row['rate'] / 2:>9,.0f} {row['p50_us']:>8,.0f} {row['p99_us']:>8,.0f} "
              f"{row['max_us']:>9,.0f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
