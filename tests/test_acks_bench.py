"""The acknowledged-delivery benchmark runs clean: a smoke run, no timing.

benchmarks/acks.py is loaded by path and run with ``--quick`` against the
servers it starts (memory, SQLite, the floor): every run must take every
message once and leave nothing reserved (the tool checks with Info and
records an error otherwise), and print positive figures.  The load
generator's ``acks`` phase is also driven on its own: an id from each
``Reserve`` reply goes back in its ``Ack``.  Figures are never compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark, run_keeping_signals

acks = load_benchmark("acks")
durable = acks.durable
bench = durable.bench


def test_a_quick_run_is_clean_and_every_figure_positive(tools: dict[str, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "BUILD_DIR", str(Path(tools["loadgen"]).parent))
    out = tmp_path / "acks.json"
    status = run_keeping_signals(acks.main, ["--quick", "--count", "20000", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["errors"] == [], printed
    assert status == 0
    for target in ("memory", "sqlite", "floor"):
        figures = report["summary"][target]
        assert figures["gets_per_s"] > 0 and figures["acks_per_s"] > 0, target
        [run] = report["runs"][target]
        assert run["acks"]["requests"] == 2 * 2000, target  # a Reserve and an Ack a message
    assert "Reserve+Ack ÷ Get" in printed


def test_the_generator_acks_the_id_each_reserve_brought(tools: dict[str, str], tmp_path: Path) -> None:
    runner = durable.Durable(durable.Counts(), tools["loadgen"], tools["floor"], str(tmp_path))
    try:
        server = runner.start_mqmq(durable.MEMORY, None)
        queue = b"t-acks.300"
        # More in flight than messages at first: the window holds Reserves and Acks.
        result = runner.loadgen(server, "stream", queue, "--window", 16,
                                "--phase", "puts:500", "--phase", "acks:500", "--phase", "puts:3")
        assert result["requests"] == 500 + 2 * 500 + 3
        assert runner.queued(server, queue) == 3
        assert bench.info(server.address)["NumReserved"] == 0
    finally:
        runner.stop_all()
