"""The soak tool's at-least-once mode runs clean, as users run it: a short
run in a subprocess against servers it starts (memory; SQLite with SIGKILL
cycles, which covers SQLite without them too).  The audit is the tool's own (every acknowledged Put acked exactly
once, every redelivery accounted for); this checks it passed and saw the
kills and redeliveries it is there to survive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def soak(subprocess_env: dict[str, str], *options: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "soak.py"), "--json", "--reserve", "--seed", "7",
         "--producers", "2", "--consumers", "3", "--drop-rate", "0.1", *options],
        env=subprocess_env, capture_output=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    audit: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
    return audit


def test_at_least_once_on_the_memory_store(subprocess_env: dict[str, str]) -> None:
    audit = soak(subprocess_env, "--duration", "1.5")
    assert audit["passed"] is True
    assert audit["missing"] == audit["acked_twice"] == audit["unaccounted"] == 0
    assert audit["consumer_drops"] and audit["redelivered"]


def test_at_least_once_on_the_sqlite_store_killed_with_sigkill(subprocess_env: dict[str, str],
                                                               tmp_path: Path) -> None:
    audit = soak(subprocess_env, "--duration", "3", "--store", f"sqlite:{tmp_path / 'soak.db'}",
                 "--kill-every", "1")
    assert audit["passed"] is True
    assert audit["missing"] == audit["acked_twice"] == audit["unaccounted"] == 0
    assert audit["redelivered"] and audit["server_kills"]


def test_kill_cycles_need_a_durable_store(subprocess_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "soak.py"), "--reserve", "--kill-every", "1"],
        env=subprocess_env, capture_output=True, timeout=60,
    )
    assert result.returncode == 2
    assert b"--kill-every needs --reserve and a durable --store" in result.stderr
