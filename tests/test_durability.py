"""The SQLite store as users meet it: ``mqmq start --store sqlite:PATH`` in a
subprocess on a loopback port, killed with SIGKILL, starved of disk."""

from __future__ import annotations

import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import task

from conftest import Processes, assert_one_error_line, bin_path, load_benchmark, logged_port, stop
from mqmq.broker.broker import Broker
from wire import sqlite_store




crash = load_benchmark("crash")


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_nothing_acknowledged_is_lost_across_kill_9_cycles(tmp_path: Path, fsync: str) -> None:
    report = crash.run(cycles=4, producers=3, consumers=3, queues=2, fsync=fsync, seed=9,
                       directory=str(tmp_path), least_s=0.3, most_s=0.8)
    assert report.problems == []
    assert report.acknowledged > 100
    assert report.duplicates == report.unknown == report.order_violations == 0
    assert report.lost_to_cut_gets <= report.gets_cut


class Client:
    """A blocking client on a plain socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def ask(self, *values: bytes) -> list[bytes]:
        self.sock.sendall(crash.frame(*values))
        return crash.read_reply(self.sock)

    def close(self) -> None:
        self.sock.close()


def start_limited(procs: Processes, database: Path, file_size: int) -> tuple[subprocess.Popen, int]:
    """A server that may write files of ``file_size`` bytes at most (RLIMIT_FSIZE)."""

    def limit() -> None:
        # Past the limit a write fails with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, resource.RLIM_INFINITY))

    stem = procs.directory / "limited"
    with open(f"{stem}.err", "wb") as err:
        process = subprocess.Popen(
            [bin_path("mqmq"), "start", "-addr", "127.0.0.1:0", "--store", f"sqlite:{database}"],
            env=procs.env, cwd=procs.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=err, preexec_fn=limit,
        )
    procs.started.append(process)
    port = logged_port(lambda: Path(f"{stem}.err").read_text(errors="replace"), process)
    return process, port


def test_a_full_disk_refuses_new_messages_keeps_the_stored_ones_and_recovers(
    procs: Processes, tmp_path: Path
) -> None:
    database = tmp_path / "q.db"
    process, port = start_limited(procs, database, 640 * 1024)
    client = Client(port)
    stored = []
    body = random.Random(1).randbytes(32 * 1024)
    for number in range(200):
        reply = client.ask(b"Put", b"q", b"%04d" % number + body)
        if reply != [b"OK"]:
            assert reply == [b"Error", b"SERVER_STORAGE_ERROR"]
            break
        stored.append(b"%04d" % number + body)
    else:
        pytest.fail("200 Puts of 32 KiB fit in 640 KiB of file")
    assert stored, "not even one Put fitted"
    # While the disk fails, new messages are refused at once ...
    assert client.ask(b"Put", b"q", b"more") == [b"Error", b"SERVER_STORAGE_ERROR"]
    assert client.ask(b"Put", b"other", b"more") == [b"Error", b"SERVER_STORAGE_ERROR"]
    # ... and every stored one is still delivered, in order.  (Slowly: while
    # writes fail, replies held for the store wait for the next attempt,
    # once a second, and a connection holds 64 KiB of them at most.)
    first_half = len(stored) // 2
    client.sock.sendall(crash.frame(b"Get", b"q", b"1000") * first_half)
    for message in stored[:first_half]:
        assert crash.read_reply(client.sock) == [b"OK", message]
    # The disk has room again: the server takes writes by itself.
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    deadline = time.monotonic() + 10
    while client.ask(b"Put", b"q", b"after") != [b"OK"]:
        assert time.monotonic() < deadline, "the server did not take writes again"
        time.sleep(0.2)
    for message in stored[first_half:]:
        assert client.ask(b"Get", b"q", b"1000") == [b"OK", message]
    assert client.ask(b"Get", b"q", b"1000") == [b"OK", b"after"]
    client.close()
    assert process.poll() is None
    err = (tmp_path / "limited.err").read_text()
    assert "cannot write to the database" in err and "takes writes again" in err
    assert "Traceback" not in err
    # Nothing OK'd and not taken is lost: after a kill, only what was left.
    process.send_signal(signal.SIGKILL)
    process.wait()
    again, _, port = procs.start_server("--store", f"sqlite:{database}")
    client = Client(port)
    assert client.ask(b"Get", b"q", b"10") == [b"Timeout"]
    client.close()
    stop(again, signal.SIGTERM)


def test_a_torn_wal_recovers_to_the_last_whole_transaction(procs: Processes, tmp_path: Path) -> None:
    database = tmp_path / "q.db"
    process, _, port = procs.start_server("--store", f"sqlite:{database}")
    client = Client(port)
    sent = [b"message %d" % number for number in range(300)]
    for message in sent:
        assert client.ask(b"Put", b"q", message) == [b"OK"]
    process.send_signal(signal.SIGKILL)
    process.wait()
    client.close()
    wal = Path(f"{database}-wal")
    size = wal.stat().st_size
    assert size > 4096
    rng = random.Random(3)
    for cut in [size - 1, size - 4000, *(rng.randrange(32, size) for _ in range(6))]:
        copy = tmp_path / f"cut{cut}"
        copy.mkdir()
        shutil.copy(database, copy / "q.db")
        shutil.copy(wal, copy / "q.db-wal")
        with open(copy / "q.db-wal", "r+b") as torn:
            torn.truncate(cut)
        clock = task.Clock()
        broker = Broker(clock, store=sqlite_store(copy / "q.db")(clock))
        broker.startService()
        recovered = []
        while (message := broker.take(b"q")) is not None:
            recovered.append(message)
        assert recovered == sent[: len(recovered)], f"cut at {cut}: not a prefix of what was put"
        if cut == size - 1:
            assert len(recovered) >= len(sent) - 1
        clock.advance(0)
        broker.store.stop()


def test_a_damaged_database_stops_the_start_with_one_line(procs: Processes, tmp_path: Path) -> None:
    database = tmp_path / "q.db"
    database.write_bytes(b"garbage " * 1000)
    result = procs.mqmq("start", "-addr", "127.0.0.1:0", "--store", f"sqlite:{database}")
    assert result.returncode == 1
    line = assert_one_error_line(result)
    assert "not a database" in line and str(database) in line
    assert database.read_bytes() == b"garbage " * 1000  # left as it was


def test_a_database_from_a_newer_version_stops_twistd(procs: Processes, tmp_path: Path) -> None:
    database = tmp_path / "q.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE queues (id INTEGER)")
        db.execute("PRAGMA user_version = 7")
    result = procs.run(bin_path("twistd"), "-n", "--pidfile=", "mqmq", "--addr", "127.0.0.1:0",
                       "--store", f"sqlite:{database}")
    assert result.returncode == 1
    output = result.stdout.decode() + result.stderr.decode()
    assert "newer mqmq" in output and "Traceback" not in output


@pytest.mark.parametrize("options, complaint", [
    (["--store", "sqlite:"], "needs the database's path"),
    (["--store", "mongodb://x"], "unknown kind"),
    (["--store", "redis://x:notaport"], "the port 'notaport' is not a number"),
    (["--store", "redis+cluster://"], "a host is missing"),
    (["--store", "redis://127.0.0.1:1/0", "--redis-timeout", "0"], "want more than 0 seconds"),
    (["--store", "memory:x"], "takes nothing after the colon"),
    (["--store", "sqlite:/tmp/x.db", "--fsync", "sometimes"], "--fsync 'sometimes'"),
])
def test_bad_store_options_are_one_line(procs: Processes, options: list[str], complaint: str) -> None:
    result = procs.mqmq("start", "-addr", "127.0.0.1:0", *options)
    assert result.returncode != 0
    assert complaint in assert_one_error_line(result)


def test_messages_survive_a_clean_restart_of_twistd(procs: Processes, tmp_path: Path) -> None:
    database = tmp_path / "q.db"
    process, _, port = procs.start_twistd("--store", f"sqlite:{database}", "--fsync", "everysec")
    client = Client(port)
    for number in range(50):
        assert client.ask(b"Put", b"q%d" % (number % 3), b"m%d" % number) == [b"OK"]
    client.close()
    assert stop(process, signal.SIGTERM) in (0, -signal.SIGTERM)
    process, _, port = procs.start_twistd("--store", f"sqlite:{database}")
    client = Client(port)
    info = client.ask(b"Info")
    assert info[0] == b"OK" and b'"NumMessages":50' in info[1]
    for number in range(50):
        assert client.ask(b"Get", b"q%d" % (number % 3)) == [b"OK", b"m%d" % number]
    client.close()
    assert stop(process, signal.SIGTERM) in (0, -signal.SIGTERM)


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("RLIMIT_FSIZE and prlimit as on Linux")
