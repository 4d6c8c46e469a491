"""The benchmark's compiled tools build and count right: a smoke run, no timing.

benchmarks/loadgen.c and benchmarks/floor.c are built with the system's C
compiler (skipped, saying so, when there is none), then driven against a real
``mqmq start`` on a port it chose and against the floor: every message put
must be got, every request answered, and Info must agree.  Figures are never
checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import load_benchmark, run_keeping_signals

bench = load_benchmark("bench")


@pytest.fixture(scope="module")
def servers(tools: dict[str, str]) -> Iterator[dict[str, Any]]:
    ours = bench.start_mqmq()
    try:
        floor = bench.start_floor(tools["floor"])
        try:
            yield {"mqmq": ours, "floor": floor}
        finally:
            floor.stop()
    finally:
        ours.stop()


def queued(address: str, queue: bytes) -> int:
    return int(bench.info(address)["Queues"][queue.decode()]["NumMessages"])


def load(tools: dict[str, str], address: str, mode: str, queue: bytes, *options: Any) -> dict[str, Any]:
    return bench.run_loadgen(tools["loadgen"], address, mode, queue, *options, timeout=60)


@pytest.mark.parametrize("target", ["mqmq", "floor"])
def test_streams_answer_every_request(tools: dict[str, str], servers: dict[str, Any], target: str) -> None:
    address = servers[target].address
    sync = load(tools, address, "stream", b"t-sync.100", "--phase", "pairs:200", "--warmup-pairs", 10)
    steady = load(tools, address, "stream", b"t-steady.100", "--window", 16,
                  "--phase", "pairs:1000")
    burst = load(tools, address, "stream", b"t-burst.100", "--window", 128,
                 "--phase", "puts:700", "--phase", "gets:700")
    many = load(tools, address, "stream", b"t-many.100", "--conns", 8, "--window", 4,
                "--phase", "pairs:100")
    large = load(tools, address, "stream", b"t-large.1048576", "--phase", "pairs:4")
    assert [sync["requests"], steady["requests"], burst["requests"], many["requests"], large["requests"]] == [
        200, 1000, 1400, 800, 4]
    for result in (sync, steady, burst, many, large):
        assert result["p50_us"] is not None and result["p50_us"] <= result["p99_us"]
        assert result["cpu_s"] >= 0
    if target == "mqmq":
        for queue in (b"t-sync.100", b"t-steady.100", b"t-burst.100", b"t-many.100", b"t-large.1048576"):
            assert queued(address, queue) == 0


def test_what_is_put_stays_until_it_is_got(tools: dict[str, str], servers: dict[str, Any]) -> None:
    address = servers["mqmq"].address
    queue = b"t-fill.100"
    assert load(tools, address, "stream", queue, "--window", 128, "--phase", "puts:3000")["requests"] == 3000
    assert queued(address, queue) == 3000
    assert load(tools, address, "stream", queue, "--window", 128, "--phase", "gets:3000")["requests"] == 3000
    assert queued(address, queue) == 0


@pytest.mark.parametrize("multiplex", [False, True])
@pytest.mark.parametrize("target", ["mqmq", "floor"])
def test_consumers_get_every_message_put(tools: dict[str, str], servers: dict[str, Any], target: str,
                                         multiplex: bool) -> None:
    address = servers[target].address
    queue = f"t-consumers-{target}-{multiplex}.100".encode()
    result = load(tools, address, "consumers", queue, "--total", 2000, "--producers", 4, "--consumers", 4,
                  *(["--multiplex"] if multiplex else []))
    assert result["puts_acknowledged"] == 2000
    assert result["delivered"] == 2000
    if target == "mqmq":
        assert result["extra_replies"] == 0  # the floor answers every Get; the server must not
        assert queued(address, queue) == 0


def test_a_wrong_reply_is_an_error(tools: dict[str, str], servers: dict[str, Any]) -> None:
    # The floor answers a Get on "t-empty.100" with a message; against mqmq the
    # queue is empty and the Get gets Timeout: messages missing.
    with pytest.raises(bench.BenchError, match="answered Timeout"):
        load(tools, servers["mqmq"].address, "stream", b"t-empty.100", "--phase", "gets:1",
             "--get-timeout", 0)


def test_idle_connections_are_counted(tools: dict[str, str], servers: dict[str, Any]) -> None:
    ours = servers["mqmq"]
    result = load(tools, ours.address, "stream", b"t-idle.100", "--phase", "pairs:100",
                  "--idle", 20, "--expect-conns", "--rss-pid", ours.pid)
    assert result["requests"] == 100
    assert result["connections_seen"] >= 21
    assert result["rss_with_idle"] > 0


def test_bench_runs_every_workload_clean(tools: dict[str, str], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "BUILD_DIR", str(Path(tools["loadgen"]).parent))
    out = tmp_path / "results.json"
    status = run_keeping_signals(bench.main, [
        "--divide", "1000", "--json", str(out), "--chart", str(tmp_path / "chart.png"),
        "--workloads", "sync,steady,consumers,fan,pipelined,memory,large,idle,scaling"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["errors"] == [], printed
    assert status == 0
    workloads = report["workloads"]
    assert set(workloads) == {"sync", "steady", "consumers", "fan", "pipelined", "memory", "large", "idle"}
    for name, entry in workloads.items():
        assert entry["mqmq"]["runs"] and entry["floor"]["runs"], name
    assert workloads["sync"]["ratio_to_floor"]["us_per_pair"]["median"] > 0
    for name in ("consumers", "fan"):
        assert workloads[name]["mqmq"]["median"]["requests"] == report["settings"]["counts"][name]
    assert workloads["memory"]["mqmq"]["median"]["rss_full_mb"] > 0
    assert set(report["scaling"]) == {str(c) for c in bench.SCALING_CONNECTIONS}
    assert "mqmq ÷ floor" in printed
