"""``--http``: /metrics, /stats and the dashboard served over real loopback
HTTP, in this process and from ``twistd mqmq`` and ``mqmq start`` as users run them."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any, AsyncIterator

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.client import Agent, readBody

from conftest import Processes, assert_one_error_line, bin_path
from mqmq.client import connect
from mqmq.server.service import MQService
from mqmq.web.site import site
from mqmq.wire.codec import encode_frame
from support import read_exactly

# Twisted's own Agent: its response transport lacks abortConnection, and readBody says so.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")

SERVING_HTTP = re.compile(r"serving metrics and the dashboard over HTTP: 127\.0\.0\.1:(\d+)")


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest_twisted.async_yield_fixture
async def service() -> AsyncIterator[MQService]:
    service = MQService(reactor, ["tcp:0:interface=127.0.0.1"])
    service.serve_also(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), site(service))
    service.startService()
    try:
        yield service
    finally:
        await service.stopService()


async def fetch(service: MQService, path: str) -> tuple[int, dict[str, Any], bytes]:
    port = service.other_ports[0].getHost().port
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode("ascii"))
    body = await readBody(response)
    headers = {name.decode().lower(): values[0].decode() for name, values in response.headers.getAllRawHeaders()}
    return response.code, headers, body


@pytest_twisted.ensureDeferred
async def test_metrics_and_stats_follow_the_traffic(service: MQService) -> None:
    client = await connect(reactor, f"127.0.0.1:{service.ports[0].getHost().port}")
    try:
        for n in range(5):
            await client.put("jobs", b"job %d" % n)
        delivery = await client.reserve("jobs")
        await delivery.ack()
        await client.get("jobs")
        code, headers, body = await fetch(service, "/metrics")
        assert code == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        metrics = metric_values(body.decode("utf-8"))
        assert metrics[("mqmq_requests_total", (("command", "put"),))] == 5
        assert metrics[("mqmq_requests_total", (("command", "ack"),))] == 1
        assert metrics[("mqmq_deliveries_total", ())] == 2
        assert metrics[("mqmq_messages", (("state", "ready"),))] == 3
        assert metrics[("mqmq_queue_messages", (("queue", "jobs"), ("state", "ready")))] == 3
        assert metrics[("mqmq_connections", ())] == 1
        assert metrics[("mqmq_received_bytes_total", ())] > 0
        assert metrics[("process_resident_memory_bytes", ())] > 1_000_000

        code, headers, body = await fetch(service, "/stats")
        assert code == 200 and headers["content-type"] == "application/json"
        stats = json.loads(body)
        assert stats["commands"]["put"] == 5
        assert stats["messages"]["ready"] == 3
        assert stats["queues"]["largest"] == [
            {"name": "jobs", "ready": 3, "reserved": 0, "buried": 0, "waiting": 0}
        ]
        assert stats["store"] == {"kind": "memory", "durable": False, "healthy": True, "failure": None}
        assert stats["memory"]["resident_bytes"] > 1_000_000
    finally:
        await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_dashboard_is_the_index_and_other_paths_are_not_found(service: MQService) -> None:
    code, headers, body = await fetch(service, "/")
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert b"<title>" in body
    assert headers["content-security-policy"].startswith("default-src 'self'")
    assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-cache"
    for path in ("/dashboard.js", "/dashboard.css", "/index.html"):
        code, headers, _ = await fetch(service, path)
        assert code == 200 and headers["x-content-type-options"] == "nosniff", path
    for path in ("/nothing-here", "/index.html%00", "/%00", "/../site.py", "/dashboard.js/x"):
        code, _, _ = await fetch(service, path)
        assert code == 404, path


def _http_port(read_log: Any, process: subprocess.Popen) -> int:
    give_up = time.monotonic() + 20
    while time.monotonic() < give_up:
        match = SERVING_HTTP.search(read_log())
        if match:
            return int(match.group(1))
        assert process.poll() is None, read_log()
        time.sleep(0.02)
    pytest.fail(f"no HTTP port logged:\n{read_log()}")


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return bytes(response.read())


def _put(port: int, queue: bytes, message: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(encode_frame([b"Put", queue, message]))
        assert read_exactly(connection, 10) == encode_frame([b"OK"])


@pytest.mark.parametrize("command", ["twistd", "start"])
def test_the_commands_serve_metrics_where_the_log_says(procs: Processes, command: str, tmp_path: Any) -> None:
    options = ["--http", "tcp:0:interface=127.0.0.1", "--store", f"sqlite:{tmp_path / 'q.db'}"]
    if command == "twistd":
        process, _, port = procs.start_twistd(*options)

        def read_log() -> str:
            return procs.output(process)[0].decode("utf-8", "replace")
    else:
        process, _, port = procs.start_server(*options)

        def read_log() -> str:
            return procs.output(process)[1]
    http_port = _http_port(read_log, process)
    assert http_port != port
    _put(port, b"work", b"x" * 100)
    metrics = metric_values(_get(http_port, "/metrics").decode("utf-8"))
    assert metrics[("mqmq_requests_total", (("command", "put"),))] == 1
    assert metrics[("mqmq_store_commits_total", ())] >= 1
    assert metrics[("mqmq_store_commit_seconds_count", ())] == metrics[("mqmq_store_commits_total", ())]
    assert json.loads(_get(http_port, "/stats"))["messages"] == {
        "ready": 1, "reserved": 0, "buried": 0, "bytes": 100,
    }
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(http_port, "/metrics/more")
    assert refused.value.code == 404


def test_a_bad_http_endpoint_is_a_usage_error(procs: Processes) -> None:
    result = procs.mqmq("start", "--http", "tcp:notaport")
    assert result.returncode == 2
    line = assert_one_error_line(result)
    assert "--http" in line and "tcp:notaport" in line
    result = procs.run(bin_path("twistd"), "-n", "--pidfile=", "mqmq", "--http", "bogus:1")
    assert result.returncode != 0
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert "Traceback" not in output and "--http 'bogus:1'" in output.splitlines()[-1]
