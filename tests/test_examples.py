"""The examples under examples/ run as written, and the README shows them as they are.

The client examples run against a server on a port the system chose; the
embedding examples (and the systemd unit's command) serve as subprocesses
until they are stopped with a signal; the testing example runs under pytest.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from conftest import REPO_ROOT, bin_path, default_signals
from support import read_exactly

EXAMPLES = REPO_ROOT / "examples"
README = REPO_ROOT / "README.md"
#: Longest a process may take to start serving, to stop, or to run through.
DEADLINE = 30.0

# A link naming an example file, then a blank line, then a fenced code block.
SHOWN_EXAMPLE = re.compile(
    r"\[`(examples/[^`]+)`\]\(\1\)\):\n\n```python\n(.*?)^```$", re.DOTALL | re.MULTILINE
)


# -- the README shows each example as it is ------------------------------------


def shown_examples() -> dict[str, str]:
    return {name: code for name, code in SHOWN_EXAMPLE.findall(README.read_text())}


def example_files() -> list[str]:
    return sorted(
        f"examples/{path.name}" for path in EXAMPLES.iterdir() if path.suffix in (".py", ".tac")
    )


def test_the_readme_shows_every_example() -> None:
    assert sorted(shown_examples()) == example_files()


@pytest.mark.parametrize("name", example_files())
def test_the_readme_shows_the_example_as_it_is(name: str) -> None:
    assert shown_examples()[name] == (REPO_ROOT / name).read_text()


def test_every_python_block_in_the_readme_is_an_example() -> None:
    blocks = re.findall(r"^```python$", README.read_text(), re.MULTILINE)
    assert len(blocks) == len(shown_examples())


# -- running them ----------------------------------------------------------------


class Spawned:
    """A subprocess whose output goes to files, read while it runs."""

    def __init__(self, argv: list[str], env: dict[str, str], directory: Path, name: str) -> None:
        self.out_path = directory / f"{name}.out"
        self.err_path = directory / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                argv, env=env, cwd=directory, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                preexec_fn=default_signals,
            )

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first match of ``pattern`` in the output, once it has been written."""
        give_up = time.monotonic() + DEADLINE
        while True:
            found = re.search(pattern, self.output(), re.MULTILINE)
            if found:
                return found
            if self.process.poll() is not None:
                pytest.fail(f"exited with {self.process.returncode} first:\n{self.output()}")
            if time.monotonic() > give_up:
                pytest.fail(f"{pattern!r} not seen within {DEADLINE} s:\n{self.output()}")
            time.sleep(0.02)

    def stop(self, signal_number: int) -> int:
        self.process.send_signal(signal_number)
        return self.process.wait(DEADLINE)


@pytest.fixture
def spawn(subprocess_env: dict[str, str], tmp_path: Path) -> Iterator:
    started: list[Spawned] = []

    def start(*argv: str, env: Optional[dict[str, str]] = None) -> Spawned:
        spawned = Spawned(list(argv), {**subprocess_env, **(env or {})}, tmp_path,
                          f"process{len(started)}")
        started.append(spawned)
        return spawned

    yield start
    for spawned in started:
        if spawned.process.poll() is None:
            spawned.process.kill()
            spawned.process.wait()


def run_example(env: dict[str, str], name: str, *arguments: str) -> str:
    """Run an example to its end; its standard output."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *arguments],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=DEADLINE,
        preexec_fn=default_signals,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def raw_info(family: socket.AddressFamily, address: object) -> dict:
    """The server's Info, asked over a plain socket (no mqmq code)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(address)
        sock.sendall(b"\x00\x00\x00\x08\x00\x00\x00\x04Info")
        (length,) = struct.unpack(">I", read_exactly(sock, 4))
        payload = read_exactly(sock, length)
    assert payload[:6] == b"\x00\x00\x00\x02OK"
    return json.loads(payload[10:])


def test_producer_and_consumer(spawn, subprocess_env: dict[str, str]) -> None:
    server = spawn(sys.executable, "-m", "mqmq", "start", "-addr", "127.0.0.1:0")
    address = server.wait_for(r"starting server: (127\.0\.0\.1:\d+)$").group(1)

    assert run_example(subprocess_env, "producer.py", address) == ""
    host, port = address.split(":")
    assert raw_info(socket.AF_INET, (host, int(port)))["Queues"] == {"MyQueue": {"NumMessages": 10}}

    consumed = run_example(subprocess_env, "consumer.py", address)
    assert consumed.splitlines() == [f"Message {i}" for i in range(10)]
    assert raw_info(socket.AF_INET, (host, int(port)))["NumMessages"] == 0
    assert server.stop(signal.SIGINT) == 0


def test_a_worker_acknowledges_what_it_handled(spawn, subprocess_env: dict[str, str]) -> None:
    server = spawn(sys.executable, "-m", "mqmq", "start", "-addr", "127.0.0.1:0")
    address = server.wait_for(r"starting server: (127\.0\.0\.1:\d+)$").group(1)
    assert run_example(subprocess_env, "producer.py", address) == ""
    handled = run_example(subprocess_env, "worker.py", address)
    assert handled.splitlines() == [f"Message {i}" for i in range(10)]
    host, port = address.split(":")
    info = raw_info(socket.AF_INET, (host, int(port)))
    assert (info["NumMessages"], info["NumReserved"]) == (0, 0)
    assert server.stop(signal.SIGINT) == 0


def test_embed_service_tac(spawn, tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    path = tmp_path / "mqmq.sock"
    server = spawn(
        bin_path("twistd"), "-n", "--pidfile=", "-y", str(EXAMPLES / "embed_service.tac"),
        env={"MQMQ_LISTEN": f"tcp:0:interface=127.0.0.1 unix:{path}:mode=660"},
    )
    port = server.wait_for(r"starting on (\d+)$").group(1)
    server.wait_for(r"starting on '.*mqmq\.sock'$")
    assert path.stat().st_mode & 0o777 == 0o660

    run_example(subprocess_env, "producer.py", f"127.0.0.1:{port}")
    # One broker behind both endpoints.
    assert raw_info(socket.AF_UNIX, str(path))["Queues"] == {"MyQueue": {"NumMessages": 10}}

    # twistd stops cleanly, then re-raises the signal, by Twisted's design.
    assert server.stop(signal.SIGTERM) == -signal.SIGTERM
    assert "Server Shut Down." in server.output()
    assert "Traceback" not in server.output()


def test_embed_endpoint(spawn, subprocess_env: dict[str, str]) -> None:
    server = spawn(sys.executable, str(EXAMPLES / "embed_endpoint.py"), "tcp:0:interface=127.0.0.1")
    port = int(server.wait_for(r"^serving on .*port=(\d+)").group(1))

    run_example(subprocess_env, "producer.py", f"127.0.0.1:{port}")
    assert raw_info(socket.AF_INET, ("127.0.0.1", port))["NumMessages"] == 10
    assert server.stop(signal.SIGINT) == 0
    assert "Traceback" not in server.output()


def test_in_process(subprocess_env: dict[str, str]) -> None:
    assert run_example(subprocess_env, "in_process.py").splitlines() == [
        "resize photo 42",
        "no more jobs",
        "ServerInfo(num_connections=0, num_queues=1, num_messages=0, queues={'jobs': 0}, "
        "num_reserved=0, num_buried=0, reserved={}, buried={})",
    ]


def test_the_memory_server_example_passes_under_pytest(subprocess_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(EXAMPLES / "test_with_memory_server.py")],
        env=subprocess_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=DEADLINE * 2,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^3 passed", result.stdout, re.MULTILINE), result.stdout


# -- the systemd unit ----------------------------------------------------------------

UNIT = REPO_ROOT / "contrib" / "mqmq.service"


def unit_command() -> list[str]:
    """The unit's ExecStart, with this checkout's twistd."""
    (line,) = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    argv = line.removeprefix("ExecStart=").split()
    assert argv[0] == "/opt/mqmq/bin/twistd"
    return [bin_path("twistd"), *argv[1:]]


def test_the_systemd_unit_command_serves(spawn, tmp_path: Path) -> None:
    command = unit_command()
    assert command[1:] == ["-n", "--pidfile=", "mqmq", "--store", "sqlite:/var/lib/mqmq/queues.db"]
    # Its own database and port instead of the system's (--listen alone: only there).
    command[-1] = f"sqlite:{tmp_path / 'queues.db'}"
    server = spawn(*command, "--listen", "tcp:0:interface=127.0.0.1")
    port = int(server.wait_for(r"starting on (\d+)$").group(1))
    assert raw_info(socket.AF_INET, ("127.0.0.1", port))["NumConnections"] == 1
    server.stop(signal.SIGTERM)
    assert (tmp_path / "queues.db").exists()
    assert not list(Path(server.out_path.parent).glob("*.pid"))  # --pidfile= writes none
    assert "Traceback" not in server.output()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_systemd_unit_is_valid(tmp_path: Path) -> None:
    unit = tmp_path / "mqmq.service"
    unit.write_text(UNIT.read_text().replace("/opt/mqmq/bin/twistd", bin_path("twistd")))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=DEADLINE
    )
    assert result.returncode == 0, result.stderr
    assert "mqmq.service" not in result.stderr, result.stderr
