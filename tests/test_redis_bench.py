"""The Redis benchmark runs clean and reports every figure: a smoke run, no timing.

benchmarks/redis.py is loaded by path, as tests/test_durable_bench.py loads
durable.py, and run with a large ``--divide`` against the servers it starts
itself: one ``redis-server`` and a three-master Redis Cluster, 1 and 2 mqmq
servers on each, the floor, and one server on the memory store.  Every
measure must finish without an error (each generator's consumers got exactly
what its producers put, and Redis holds nothing afterwards) and the JSON must
carry every figure the README names.  Figures are never compared with
anything.  Skips without a C compiler or without ``redis-server``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import load_benchmark, run_keeping_signals
from redis_support import require_redis

redis_bench = load_benchmark("redis")
bench = redis_bench.bench


def check_point(run: dict[str, Any], servers: int, messages: int, behind_redis: bool) -> None:
    assert run["servers"] == servers
    assert run["delivered"] == messages
    assert len(run["generators"]) == servers
    assert run["rate"] > 0 and run["put_rate"] > 0
    assert 0 < run["get_p50_us"] <= run["get_p99_us"]
    assert run["get_timeouts"] >= 0
    assert len(run["server_cpu_each"]) == servers
    assert all(cpu is not None and cpu >= 0 for cpu in run["server_cpu_each"])
    assert run["generator_cpu"] > 0 and run["machine_cpu"] > 0 and run["our_cpu"] > 0
    assert isinstance(run["limit"], str) and run["limit"]
    assert len(run["server_commands"]) == len(run["generator_commands"]) == servers
    if behind_redis:
        assert run["redis_cpu"] >= 0 and run["redis_main_thread_cpu"] >= 0
        assert run["redis_scripts_per_message"] > 0 and run["redis_cpu_us_per_message"] >= 0
    else:
        assert "redis_cpu" not in run


def test_a_smoke_run_is_clean_and_reports_every_figure(tools: dict[str, str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    require_redis()
    monkeypatch.setattr(bench, "BUILD_DIR", str(Path(tools["loadgen"]).parent))
    out, chart = tmp_path / "redis.json", tmp_path / "redis.png"
    status = run_keeping_signals(redis_bench.main, ["--divide", "200", "--servers", "1,2", "--cluster",
                                                    "--json", str(out), "--chart", str(chart)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["errors"] == [], printed
    assert status == 0
    messages = report["settings"]["counts"]["servers"]

    servers = report["parts"]["servers"]
    assert set(servers) == {"redis", "cluster"}
    for label, points in servers.items():
        assert set(points) == {"1", "2"}, label
        for count, point in points.items():
            [ours] = point["mqmq"]["runs"]
            [floor] = point["floor"]["runs"]
            check_point(ours, int(count), messages, behind_redis=True)
            check_point(floor, int(count), messages, behind_redis=False)
            assert point["ratio_to_floor"]["median"] > 0
            assert point["mqmq"]["median"]["rate"] == ours["rate"]
            assert point["mqmq"]["median"]["limit"]
    # The cluster's three nodes are counted one by one.
    assert len(servers["cluster"]["2"]["mqmq"]["runs"][0]["redis_main_thread_cpu_each"]) == 3

    stores = report["parts"]["stores"]
    for label in ("floor", "memory", "redis"):
        [run] = stores[label]["runs"]
        check_point(run, 1, report["settings"]["counts"]["stores"], behind_redis=label == "redis")
    for ratio in ("redis_to_memory", "memory_to_floor", "redis_to_floor"):
        assert stores[ratio]["median"] > 0, ratio
    assert report["targets"] == {"stores.redis_to_memory": ">= 0.5"}

    assert "redis ÷ memory:" in printed
    assert "limit" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert chart.stat().st_size > 0
    else:
        assert any("matplotlib" in note for note in report["notes"])


@pytest.mark.parametrize("figures, limit", [
    ({"redis_main_thread_cpu": 0.97, "machine_cpu": 1.5, "server_cpu_max": 0.5, "generator_cpu": 0.1},
     "Redis (its thread 0.97 cores)"),
    ({"redis_main_thread_cpu": 0.5, "machine_cpu": 1.95, "server_cpu_max": 0.5, "generator_cpu": 0.1},
     "the machine (1.95 of 2 cores busy)"),
    ({"redis_main_thread_cpu": 0.3, "machine_cpu": 1.5, "server_cpu_max": 0.99, "generator_cpu": 0.1},
     "an mqmq server (0.99 cores: its one thread)"),
    ({"redis_main_thread_cpu": 0.95, "machine_cpu": 1.9, "server_cpu_max": 0.5, "generator_cpu": 0.1},
     "Redis (its thread 0.95 cores); the machine (1.90 of 2 cores busy)"),
    ({"machine_cpu": 1.2, "server_cpu_max": 0.6, "generator_cpu": 0.1},
     "no process full (waiting: round trips, wake-ups; the machine 1.20 of 2 cores busy)"),
])
def test_the_limit_is_what_is_full(figures: dict[str, Any], limit: str) -> None:
    assert redis_bench.limit(figures, 2) == limit
