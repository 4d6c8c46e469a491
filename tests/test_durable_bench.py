"""The durable-store benchmark runs clean: a smoke run, no timing.

benchmarks/durable.py is loaded by path, as tests/test_bench_tools.py loads
bench.py, and run with ``--quick`` on the throughput, restart and sync parts
against servers it starts itself (memory and SQLite stores, the floor):
every part must finish without an error (counts that add up: every message
put delivered once, the store holding them all after a restart) and print
a positive figure.  The load generator's ``--consumer-window`` mode, which
the throughput part adds, is also driven on its own with Gets that time out.
Figures are never compared with anything.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import load_benchmark, run_keeping_signals

durable = load_benchmark("durable")
bench = durable.bench


@pytest.fixture
def runner(tools: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """A Durable with no parts run, its databases under tmp_path; its servers stopped afterwards."""
    runner = durable.Durable(durable.Counts(), tools["loadgen"], tools["floor"], str(tmp_path))
    try:
        yield runner
    finally:
        runner.stop_all()


@pytest.mark.parametrize("target", ["memory", "floor"])
def test_pipelined_consumers_resend_gets_that_time_out(runner: Any, target: str) -> None:
    # Two producers with one Put in flight each cannot keep 16 x 16 Gets
    # busy: with a 1 ms timeout many Gets come back Timeout and are sent
    # again.  Every message must still be delivered exactly once.
    server = runner.start_floor() if target == "floor" else runner.start_mqmq(durable.MEMORY, None)
    queue = b"t-window.100"
    result = runner.loadgen(server, "consumers", queue, "--total", 3000, "--producers", 2, "--window", 1,
                            "--consumers", 16, "--consumer-window", 16, "--get-timeout", 1)
    assert result["puts_acknowledged"] == 3000
    assert result["delivered"] == 3000
    assert result["get_timeouts"] >= 0
    if target == "memory":
        assert result["extra_replies"] == 0
        assert runner.queued(server, queue) == 0


def test_a_quick_run_is_clean_and_every_figure_positive(tools: dict[str, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "BUILD_DIR", str(Path(tools["loadgen"]).parent))
    out = tmp_path / "durable.json"
    status = run_keeping_signals(durable.main, ["--divide", "100", "--only", "throughput,restart,sync",
                                                "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["errors"] == [], printed
    assert status == 0
    parts = report["parts"]
    assert set(parts) == {"throughput", "restart", "sync"}

    throughput = parts["throughput"]
    assert set(throughput) == {"floor", "memory", "sqlite always", "sqlite everysec", "sqlite no"}
    for target, entry in throughput.items():
        [run] = entry["runs"]
        assert run["delivered"] == report["settings"]["counts"]["throughput"], target
        assert run["rate"] > 0 and run["cpu_frac"] > 0, target

    restart = parts["restart"]
    assert restart["messages"] == report["settings"]["counts"]["restart"]
    [run] = restart["runs"]
    for key in ("restart_s", "rss_after_restart_mb", "floor_restart_s", "floor_rss_mb"):
        assert run[key] > 0, key
    for key in ("fill_rate", "rss_full_mb", "rss_empty_mb", "database_mb"):
        assert restart[key] > 0, key

    sync = parts["sync"]
    for target in ("floor", "memory", "sqlite always"):
        assert sync[target]["median"]["us_per_pair"] > 0, target
    assert sync["commit"]["median"]["sqlite_commit_us"] > 0
    assert sync["commit"]["median"]["fsync_us"] > 0

    assert "msg/s delivered, sqlite always" in printed
    assert "s to first Info" in printed
    assert "µs per Put+Get, sqlite always" in printed


def test_the_commit_path_tool_accounts_for_what_a_durable_store_adds(tools: dict[str, str]) -> None:
    # benchmarks/commit_path.py runs a server in its own process (its own
    # reactor): run it as a user would, on a few pairs.
    import os
    import subprocess

    environment = dict(os.environ, MQMQ_BENCH_BUILD_DIR=str(Path(tools["loadgen"]).parent))
    done = subprocess.run([sys.executable, str(Path(durable.HERE) / "commit_path.py"), "--pairs", "200",
                           "--warmup-pairs", "20"], capture_output=True, text=True, timeout=300,
                          env=environment)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    figures = {match.group(1) for line in lines if (match := re.match(r" {4}(\S.*?) {2,}[\d.]+", line))}
    assert figures == {"gathering (change to hand-over)", "to the writer thread",
                       "the transaction, sync included", "back to the reactor thread", "sum",
                       "WorkerThread (the store's)", "deferToThreadPool (Twisted's)"}
    assert any("µs per Put+Get, SQLite" in line for line in lines)
    assert any(re.search(r"\(two commits: [\d.]+; [1-9][\d,]* commits timed\)", line) for line in lines), lines
