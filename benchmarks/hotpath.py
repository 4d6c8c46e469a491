"""CPU per request on the server's hot path, with no sockets and no reactor.

    python benchmarks/hotpath.py [--requests 200000] [--profile]

Feeds pre-encoded ``Put`` frames, then ``Get`` frames, in 64 KiB segments to
one server protocol whose transport discards what it is given, and reports
microseconds per request: the framing, dispatch, broker and reply-building
cost that every workload pays.  Then as many ``Put``\ s again, taken with
``Reserve`` and ``Ack`` pairs (the memory store gives ids 1, 2, ... in the
order it hands messages out, so the ``Ack``\ s are encoded beforehand):
microseconds per message taken, beside a ``Get``'s.  ``--profile`` prints a cProfile of the same
run, sorted by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import Sequence

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mqmq.broker.broker import Broker
from mqmq.wire.codec import encode_frame
from mqmq.broker.limits import Limits
from mqmq.server.protocol import MQServerFactory, MQServerProtocol


class _DiscardingTransport(StringTransport):
    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: Sequence[bytes]) -> None:
        pass


def _feed(protocol: MQServerProtocol, stream: bytes) -> float:
    started = time.perf_counter()
    for offset in range(0, len(stream), 65536):
        protocol.dataReceived(stream[offset : offset + 65536])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--message-bytes", type=int, default=100)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    broker = Broker(Clock(), Limits(max_queued_bytes=0, max_queued_messages=0))
    protocol = MQServerFactory(broker).buildProtocol(None)
    assert protocol is not None
    protocol.makeConnection(_DiscardingTransport())
    message = b"x" * args.message_bytes
    puts = encode_frame([b"Put", b"bench", message]) * args.requests
    gets = encode_frame([b"Get", b"bench", b"0"]) * args.requests

    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    put_seconds = _feed(protocol, puts)
    get_seconds = _feed(protocol, gets)
    if profiler:
        profiler.disable()
    assert broker.num_messages == 0, "every Put must have been taken by a Get"
    _feed(protocol, puts)
    pairs = b"".join(encode_frame([b"Reserve", b"bench", b"0"]) + encode_frame([b"Ack", b"bench", b"%d" % n])
                     for n in range(1, args.requests + 1))
    if profiler:
        profiler.enable()
    pair_seconds = _feed(protocol, pairs)
    if profiler:
        profiler.disable()
    assert broker.num_messages == broker.num_reserved == 0, "every message reserved and acked"
    get_us, pair_us = get_seconds / args.requests * 1e6, pair_seconds / args.requests * 1e6
    print(f"Put: {put_seconds / args.requests * 1e6:.2f} µs per request")
    print(f"Get: {get_us:.2f} µs per request")
    print(f"Reserve + Ack: {pair_us:.2f} µs per message taken (a Get's {get_us:.2f}: {get_us / pair_us:.2f}x "
          f"the messages per second of CPU)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
