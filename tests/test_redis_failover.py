"""A Redis Cluster master killed under an mqmq server, as users meet it: a
replica takes over, and the server goes on by itself.

Three masters with a replica each (``redis-cli --cluster create
--cluster-replicas 1``), an ``mqmq start --store redis+cluster://…`` on
a real port, queues on every master.  The master of one queue's slot is
killed with SIGKILL: until its replica is promoted, requests on that queue
are answered ``SERVER_STORAGE_ERROR`` (never ``OK``), the other queues
answer as before (with ``cluster-require-full-coverage no``; by default
Redis refuses every slot meanwhile), and once promoted the queue answers ``OK`` again, with
the messages put before the kill (loopback replication is all but
immediate; the test waits for the replica to have them before the kill).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from mqmq.wire.codec import decode_payload, encode_frame
from redis_support import READY_DEADLINE, RedisCluster, RedisServer, require_redis
from support import read_exactly

#: The cluster's node timeout (ms): how long before a replica takes over.
NODE_TIMEOUT_MS = 1000


class ReplicatedCluster(RedisCluster):
    """Three masters and three replicas, every slot assigned."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS, options=[
            # (By default a cluster missing a master refuses every slot,
            # CLUSTERDOWN, until its replica takes over.)
            "--cluster-require-full-coverage", "no",
            # Replicas sync at once, not after Redis's 5 s wait for others.
            "--repl-diskless-sync-delay", "0",
        ])

    def start(self) -> None:
        super().start()
        # A replica that never synced does not take over: wait for each.
        give_up = time.monotonic() + READY_DEADLINE
        for node in self.nodes:
            while "role:slave" in node.cli("INFO", "replication") and \
                    "master_link_status:up" not in node.cli("INFO", "replication"):
                assert time.monotonic() < give_up, node.cli("INFO", "replication")
                time.sleep(0.05)


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[ReplicatedCluster]:
    require_redis()
    cluster = ReplicatedCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def request(sock: socket.socket, *values: bytes) -> list[bytes]:
    sock.sendall(encode_frame(list(values)))
    size = int.from_bytes(read_exactly(sock, 4), "big")
    return list(decode_payload(read_exactly(sock, size)))


def synced(master: RedisServer) -> None:
    """Wait until the master's replica has all it acknowledged."""
    give_up = time.monotonic() + READY_DEADLINE
    while True:
        info = dict(line.split(":", 1) for line in master.cli("INFO", "replication").splitlines() if ":" in line)
        replica = dict(part.split("=", 1) for part in info.get("slave0", "offset=-1").split(","))
        if int(replica["offset"]) >= int(info["master_repl_offset"]):
            return
        assert time.monotonic() < give_up, info
        time.sleep(0.01)


def slot_of(node: RedisServer, key: str) -> int:
    return int(node.cli("CLUSTER", "KEYSLOT", key))


def test_a_killed_master_s_queues_refuse_then_answer_again_once_its_replica_takes_over(
    replicated: ReplicatedCluster, procs: Any
) -> None:
    seeds = ",".join(node.address for node in replicated.nodes[:3])
    _, _, port = procs.start_server("--store", f"redis+cluster://{seeds}", "--redis-timeout", "1")
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(30)
    queues = [b"queue-%d" % n for n in range(12)]
    for name in queues:
        assert request(sock, b"Put", name, b"before") == [b"OK"]
    # The master of the first queue's slot dies; the others' queues must not notice.
    owners = replicated.owners()
    doomed_queue = queues[0]
    doomed = owners[slot_of(replicated.nodes[0], "mqmq:{q:%s}:ready" % doomed_queue.decode())]
    others = [name for name in queues
              if owners[slot_of(replicated.nodes[0], "mqmq:{q:%s}:ready" % name.decode())] is not doomed]
    assert others
    # Its replica has what it acknowledged (loopback replication), then the kill.
    synced(doomed)
    doomed.kill()
    refused = answered = 0
    give_up = time.monotonic() + 20
    while time.monotonic() < give_up:
        reply = request(sock, b"Put", doomed_queue, b"during")
        if reply == [b"OK"]:
            answered += 1
            break
        assert reply == [b"Error", b"SERVER_STORAGE_ERROR"], reply
        refused += 1
        for name in others[:2]:
            assert request(sock, b"Put", name, b"meanwhile") == [b"OK"]
        time.sleep(0.1)
    assert answered, f"the queue never answered OK again ({refused} refusals)"
    assert refused, "the kill went unnoticed: no request was refused"
    # What was put before the kill is still there, in order, and the new one after it.
    assert request(sock, b"Get", doomed_queue, b"1000") == [b"OK", b"before"]
    assert request(sock, b"Get", doomed_queue, b"1000") == [b"OK", b"during"]
    assert request(sock, b"Get", others[0], b"1000") == [b"OK", b"before"]
