"""Instructions the server executes per synchronous ``Put``+``Get`` pair.

    python benchmarks/instructions.py [--reactor mqmq-epoll|epoll|...] [--pairs 3000]

Counts with ``valgrind --tool=callgrind`` (Debian's valgrind package), which
counts instructions, not seconds: the figure is the same on a busy machine
and a quiet one, so a change to the server's per-request path can be weighed
exactly.  The server (``python -m mqmq start`` on a loopback port 0, on the
reactor asked for) runs under callgrind twice, once driven with a few pairs
and once with ``--pairs`` more; the difference divided by ``--pairs`` is
what one more pair costs, start-up and shut-down left out.  The client is a
plain blocking socket in this process, not counted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

_UINT32 = struct.Struct(">I")


def _frame(*values: bytes) -> bytes:
    payload = b"".join(_UINT32.pack(len(value)) + value for value in values)
    return _UINT32.pack(len(payload)) + payload


def _read_frame(sock: socket.socket) -> None:
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        header += chunk
    (length,) = _UINT32.unpack(header)
    while length:
        chunk = sock.recv(length)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        length -= len(chunk)


def count(reactor: str, pairs: int, directory: str) -> int:
    """Instructions a server run driven with ``pairs`` Put+Get pairs executed."""
    out = os.path.join(directory, f"callgrind.{reactor}.{pairs}")
    log = os.path.join(directory, f"valgrind.{reactor}.{pairs}")
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", f"--log-file={log}",
         sys.executable, "-m", "mqmq", "start", "-addr", "127.0.0.1:0", "--reactor", reactor],
        stderr=subprocess.PIPE, text=True,
    )
    assert server.stderr is not None
    port = 0
    for line in server.stderr:
        match = re.search(r"starting server: 127\.0\.0\.1:(\d+)", line)
        if match:
            port = int(match.group(1))
            break
    if not port:
        raise SystemExit(f"the server did not start: {server.wait()}")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        put, get = _frame(b"Put", b"q", b"x" * 100), _frame(b"Get", b"q", b"1000")
        for _ in range(pairs):
            sock.sendall(put)
            _read_frame(sock)
            sock.sendall(get)
            _read_frame(sock)
    server.send_signal(signal.SIGTERM)
    server.communicate(timeout=120)
    with open(log) as text:
        match = re.search(r"Collected : (\d+)", text.read())
    if match is None:
        raise SystemExit(f"no instruction count in {log}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reactor", default="mqmq-epoll", help="as mqmq start --reactor takes it")
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--base", type=int, default=300, help="pairs of the run subtracted")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind: apt-get install valgrind")
    with tempfile.TemporaryDirectory() as directory:
        started = time.monotonic()
        base = count(args.reactor, args.base, directory)
        full = count(args.reactor, args.base + args.pairs, directory)
    per_pair = (full - base) / args.pairs
    print(f"reactor {args.reactor}: {per_pair:,.0f} instructions per Put+Get pair "
          f"({args.pairs} pairs; {time.monotonic() - started:.0f} s under valgrind)")


if __name__ == "__main__":
    main()
