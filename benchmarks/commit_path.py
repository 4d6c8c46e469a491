"""Where a synchronous ``Put`` + ``Get`` spends its time on the SQLite store.

durable.py's ``sync`` part times the pair from outside.  This runs the
server in this process instead (``MQService`` on the ``mqmq-epoll`` reactor,
loopback, port 0), drives it with the compiled load generator exactly as
``sync`` does (``loadgen stream --window 1``, a Put, its OK, a Get, its
message), once on the memory store and once on SQLite, and takes the
store's own timing of each commit (``SqliteStore.commit_observer``): how
long a change waited for its batch to be handed over, the trip to the
writer thread, the transaction with its sync, and the trip back.

Each pair waits for two commits, so what ``--fsync always`` adds to the
memory store's pair should be about twice the sum of the four; the report
shows both, and how much of it is the hand-overs rather than the disk.
Beside them, a no-op call's round trip to a thread and back, through the
store's ``WorkerThread`` and through Twisted's ``deferToThreadPool``.

    python benchmarks/commit_path.py [--pairs 5000] [--fsync always]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
#: No-op round trips timed per way of reaching a thread (the first tenth untimed).
HOP_SAMPLES = 2500
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's mqmq
sys.path.insert(0, HERE)  # bench.py beside it: its build of the load generator


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5000, help="timed pairs per store (default 5000)")
    parser.add_argument("--warmup-pairs", type=int, default=500)
    parser.add_argument("--fsync", default="always", choices=("always", "everysec", "no"))
    options = parser.parse_args(argv)

    from mqmq.server.reactor import install

    reactor = install()
    from twisted.internet import defer, threads, utils
    from twisted.python.threadpool import ThreadPool

    from mqmq.broker.limits import Limits
    from mqmq.server.service import MQService
    from mqmq.stores.sqlite import CommitTimes, SqliteStore
    from mqmq.stores.worker import WorkerThread

    import bench

    loadgen = bench.build_tools()["loadgen"]
    directory = tempfile.mkdtemp(prefix="mqmq-commit-path-")
    results: dict[str, Any] = {}
    commits: list[CommitTimes] = []

    async def run_one(label: str, store: Optional[SqliteStore]) -> None:
        service = MQService(reactor, ["tcp:0:interface=127.0.0.1"], Limits(), store)
        service.privilegedStartService()
        service.startService()
        address = f"127.0.0.1:{service.ports[0].getHost().port}"
        # A child process the reactor watches: no thread of ours waits on it.
        output = await utils.getProcessOutput(loadgen, [
            "stream", "--addr", address, "--queue", "commit-path", "--window", "1",
            "--phase", f"pairs:{2 * options.pairs}", "--warmup-pairs", str(options.warmup_pairs),
            "--get-timeout", "1000",
        ], env=os.environ, errortoo=False)
        result = json.loads(output)
        await service.stopService()
        results[label] = result["elapsed_s"] * 1e6 / options.pairs

    hops: dict[str, float] = {}

    async def round_trips(label: str, run: Any) -> None:
        # A no-op call to another thread and its answer in the reactor thread.
        samples = []
        for _ in range(HOP_SAMPLES):
            began = time.perf_counter()
            await run(lambda: None)
            samples.append(time.perf_counter() - began)
        hops[label] = statistics.median(samples[HOP_SAMPLES // 10:]) * 1e6

    async def run_all() -> None:
        try:
            worker = WorkerThread(reactor, "commit-path-hops")
            worker.start()
            pool = ThreadPool(1, 1, "commit-path-hops")
            pool.start()
            try:
                await round_trips("WorkerThread (the store's)", worker.run)
                await round_trips("deferToThreadPool (Twisted's)",
                                  lambda call: threads.deferToThreadPool(reactor, pool, call))
            finally:
                worker.stop()
                pool.stop()
            await run_one("memory", None)
            store = SqliteStore(os.path.join(directory, "queues.db"), options.fsync, reactor)
            store.commit_observer = commits.append
            await run_one("sqlite", store)
        finally:
            reactor.stop()

    started = time.strftime("%Y-%m-%d %H:%M")
    failures: list[Any] = []
    reactor.callWhenRunning(lambda: defer.ensureDeferred(run_all()).addErrback(failures.append))
    reactor.run()
    shutil.rmtree(directory, ignore_errors=True)
    if failures:
        print(f"commit_path: {failures[0].getErrorMessage()}", file=sys.stderr)
        return 1
    # The timed pairs' commits: those after the warm-up's (two a pair).
    timed = commits[2 * options.warmup_pairs:] or commits

    def us(values: list[float]) -> float:
        return statistics.fmean(values) * 1e6

    def median_us(values: list[float]) -> float:
        return statistics.median(values) * 1e6

    fields = {
        "gathering (change to hand-over)": [c.gathering for c in timed],
        "to the writer thread": [c.to_thread for c in timed],
        "the transaction, sync included": [c.committing for c in timed],
        "back to the reactor thread": [c.back for c in timed],
    }
    # Means, as the pairs' time is a mean; medians beside them.
    per_commit = sum(us(values) for values in fields.values())
    added = results["sqlite"] - results["memory"]
    hand_overs = us(fields["to the writer thread"]) + us(fields["back to the reactor thread"])
    print(f"commit_path, {started}, {options.pairs:,} pairs after {options.warmup_pairs:,}, "
          f"--fsync {options.fsync}, {sys.implementation.name} {sys.version.split()[0]}")
    print(f"  µs per Put+Get, memory store          {results['memory']:9.1f}")
    print(f"  µs per Put+Get, SQLite                {results['sqlite']:9.1f}")
    print(f"  added by the store                    {added:9.1f}  (two commits: {2 * per_commit:.1f}; "
          f"{len(timed):,} commits timed)")
    print(f"  one commit (µs):                          mean   median")
    for name, values in fields.items():
        print(f"    {name:36s}{us(values):9.1f}{median_us(values):9.1f}")
    print(f"    {'sum':36s}{per_commit:9.1f}")
    print(f"  of each commit, the two hand-overs between threads take {hand_overs:.1f} µs and the "
          f"transaction {us(fields['the transaction, sync included']):.1f}")
    print("  a no-op call's round trip to a thread and back, median (µs):")
    for name, value in hops.items():
        print(f"    {name:36s}{value:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
