"""What ``Info`` costs the server under attack: memory, and other clients' wait.

Runs ``mqmq start`` on a free loopback port (port 0, read from its log),
fills it with queues whose names make ``Info`` as large as possible, then has
clients ask for ``Info`` and never read the reply, while a probe client times
``Put``+``Get`` round trips.  Reports the server's resident memory (now and
peak, from /proc) and the probe's round trips.

    python benchmarks/info_attack.py                 # every scenario
    python benchmarks/info_attack.py --scenario huge

Scenarios (from the issue that found the attack):
  huge    100,000 queues named with 1,024 bytes of invalid UTF-8: Info would
          be 616 MB (the original's Go encoder writes each byte as \\ufffd).
  frame   32,500 queues with 1,024-byte ASCII names: Info just over the
          protocol's largest frame.
  under   5,000 queues named with 1,024 bytes of invalid UTF-8: a 31 MB
          Info, under the limit, so it is built and sent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from typing import Optional

_UINT32 = struct.Struct(">I")

SCENARIOS = {
    "huge": (100_000, lambda index: b"%06d" % index + b"\xff" * 1018),
    "frame": (32_500, lambda index: b"%06d" % index + b"n" * 1018),
    "under": (5_000, lambda index: b"%06d" % index + b"\xff" * 1018),
}


def frame(*values: bytes) -> bytes:
    payload = b"".join(_UINT32.pack(len(value)) + value for value in values)
    return _UINT32.pack(len(payload)) + payload


def read_exactly(sock: socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = sock.recv(min(count, 1 << 20))
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> list[bytes]:
    (length,) = _UINT32.unpack(read_exactly(sock, 4))
    payload = read_exactly(sock, length)
    values, offset = [], 0
    while offset < len(payload):
        (size,) = _UINT32.unpack_from(payload, offset)
        values.append(payload[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return values


def memory(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of a process, in MB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_server() -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "mqmq", "start", "-addr", "127.0.0.1:0",
         "--max-queued-messages", "0", "--max-queued-bytes", "0"],
        stderr=subprocess.PIPE, text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"starting server: 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, int(match.group(1))
    raise SystemExit(f"the server did not start: {process.wait()}")


def probe(port: int) -> None:
    """Time Put+Get round trips until standard input closes; print figures.

    Run in a process of its own, so that nothing the attacking clients do
    in this one delays it.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stopping = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stopping.set()), daemon=True).start()
    request = frame(b"Put", b"probe", b"x") + frame(b"Get", b"probe", b"1000")
    rtts: list[float] = []
    while not stopping.is_set():
        started = time.perf_counter()
        sock.sendall(request)
        read_frame(sock)
        read_frame(sock)
        rtts.append(time.perf_counter() - started)
        time.sleep(0.002)
    rtts.sort()
    print(json.dumps({
        "round_trips": len(rtts),
        "median_ms": round(statistics.median(rtts) * 1000, 2),
        "p99_ms": round(rtts[int(len(rtts) * 0.99)] * 1000, 2),
        "max_ms": round(rtts[-1] * 1000, 2),
    }))


class Probe:
    """A :func:`probe` in a subprocess."""

    def __init__(self, port: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--probe", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def stop(self) -> dict[str, float]:
        out, _ = self.process.communicate("")
        figures: dict[str, float] = json.loads(out)
        return figures


def run(scenario: str, hoarders: int) -> dict[str, object]:
    count, name_of = SCENARIOS[scenario]
    process, port = start_server()
    try:
        empty_rss, _ = memory(process.pid)
        filler = socket.create_connection(("127.0.0.1", port))
        started = time.perf_counter()
        batch = 1000
        for first in range(0, count, batch):
            filler.sendall(b"".join(frame(b"Put", name_of(i), b"") for i in range(first, min(count, first + batch))))
            for _ in range(first, min(count, first + batch)):
                assert read_frame(filler) == [b"OK"]
        fill_seconds = time.perf_counter() - started
        filled_rss, _ = memory(process.pid)

        probe = Probe(port)
        time.sleep(0.5)
        # One Info, read: how long until its answer, and what it is.
        started = time.perf_counter()
        filler.sendall(frame(b"Info"))
        reply = read_frame(filler)
        info_seconds = time.perf_counter() - started
        answer = reply[1].decode() if reply[0] == b"Error" else f"OK, {len(reply[1]):,} bytes"

        # Clients that ask once and never read.
        stalled = []
        for _ in range(hoarders):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(frame(b"Info"))
            stalled.append(sock)
        time.sleep(5)
        rss, peak = memory(process.pid)
        probe_figures = probe.stop()
        for sock in stalled:
            sock.close()
        filler.close()
        return {
            "scenario": scenario,
            "queues": count,
            "fill_seconds": round(fill_seconds, 2),
            "info_answer": answer,
            "info_seconds": round(info_seconds, 3),
            "rss_empty_mb": round(empty_rss, 1),
            "rss_filled_mb": round(filled_rss, 1),
            "hoarders": hoarders,
            "rss_with_hoarders_mb": round(rss, 1),
            "peak_rss_mb": round(peak, 1),
            "probe": probe_figures,
        }
    finally:
        process.terminate()
        process.wait()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--hoarders", type=int, default=8, help="clients asking Info and never reading")
    parser.add_argument("--probe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.probe:
        probe(options.probe)
        return
    for scenario in options.scenario or ["huge", "frame", "under"]:
        print(json.dumps(run(scenario, options.hoarders)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
