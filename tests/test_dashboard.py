"""The dashboard at ``/`` in a real browser: Debian's headless Chromium, driven
by Selenium, against ``twistd mqmq --http`` run as a subprocess, with
messages put, reserved, acknowledged and got over a plain socket."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import signal
import socket
import struct
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import Processes, stop
from mqmq.wire.codec import decode_payload, encode_frame
from support import read_exactly

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install chromium chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install '.[test]'")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

#: What ``twistd mqmq --http`` logs once its web site listens.
SERVING = re.compile(r"serving metrics and the dashboard over HTTP: 127\.0\.0\.1:(\d+)")
#: The page polls /stats every second: anything it shows comes within this.
WAIT = 10.0
DESKTOP = (1280, 800)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module (Selenium Manager is never run: the
    driver's path is given)."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 # Nothing but the page under test: this machine's network is closed.
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Server:
    """A ``twistd mqmq --http`` subprocess: its port and its web site's."""

    def __init__(self, procs: Processes, *options: str) -> None:
        self.procs = procs
        self.process, _, self.port = procs.start_twistd(*options)
        self.http_port = self._logged_http_port()

    def _logged_http_port(self) -> int:
        give_up = time.monotonic() + WAIT
        while time.monotonic() < give_up:
            match = SERVING.search(self.procs.output(self.process)[0].decode("utf-8", "replace"))
            if match:
                return int(match.group(1))
            time.sleep(0.01)
        pytest.fail(f"no HTTP port logged:\n{self.procs.output(self.process)}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"


class Client:
    """A blocking client on a plain socket, speaking the wire protocol."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)

    def send(self, *values: bytes) -> None:
        self.sock.sendall(encode_frame(values))

    def reply(self) -> list[bytes]:
        (length,) = struct.unpack(">I", read_exactly(self.sock, 4))
        return decode_payload(read_exactly(self.sock, length))

    def ask(self, *values: bytes) -> list[bytes]:
        self.send(*values)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(procs: Processes) -> Server:
    return Server(procs, "--http", "tcp:0:interface=127.0.0.1")


@pytest.fixture
def page(browser: Any, server: Server) -> Any:
    """The dashboard of a fresh server, open at desktop size."""
    return open_page(browser, server)


def open_page(browser: Any, server: Server) -> Any:
    browser.set_window_size(*DESKTOP)
    browser.get(server.url)
    return browser


def wait_for(driver: Any, condition: Callable[[], Any], what: Callable[[], str]) -> Any:
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(lambda _: condition())
    except TimeoutException:
        pytest.fail(f"within {WAIT} s, the page did not show {what()}")


def text(driver: Any, element_id: str) -> str:
    """An element's text, as written (before CSS's text-transform)."""
    return driver.find_element(By.ID, element_id).get_property("textContent")


def shows(driver: Any, **expected: str) -> None:
    """Waits until the elements with these ids (``_`` for ``-``) read so."""
    wanted = {name.replace("_", "-"): value for name, value in expected.items()}
    wait_for(driver, lambda: all(text(driver, key) == value for key, value in wanted.items()),
             lambda: f"{wanted}, but {({key: text(driver, key) for key in wanted})}")


def queue_rows(driver: Any) -> list[list[str]]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#queues tr')]"
        ".map((row) => [...row.cells].map((cell) => cell.textContent))")


def shows_row(driver: Any, row: list[str]) -> None:
    wait_for(driver, lambda: row in queue_rows(driver),
             lambda: f"the queue row {row} in {queue_rows(driver)}")


def number(shown: str) -> float:
    return float(shown.replace(",", "")) if shown not in ("", "–") else 0.0


def test_shows_what_the_server_does(page: Any, server: Server, tmp_path: Path) -> None:
    shows(page, status="Live", store_kind="memory", store_health="healthy", store_durable="no",
          connections_current="0", puts_total="0", deliveries_total="0", acks_total="0",
          errors_total="0", waiting="0", messages_ready="0")
    assert page.find_element(By.ID, "no-queues").is_displayed()
    assert text(page, "memory").endswith("MiB")

    client = Client(server.port)
    evil = b"<img src=x onerror=document.title='pwned'>"
    for body in (b"one", b"two", b"three"):
        assert client.ask(b"Put", b"jobs", body) == [b"OK"]
    assert client.ask(b"Put", evil, b"x") == [b"OK"]
    reserved = client.ask(b"Reserve", b"jobs", b"1000", b"60000")
    assert reserved[:2] == [b"OK", b"one"]
    assert client.ask(b"Get", b"jobs", b"soon") == [b"Error", b"REQUEST_BAD_TIMEOUT"]
    waiter = Client(server.port)
    waiter.send(b"Get", b"idle", b"30000")
    shows(page, connections_current="2", connections_total="2", puts_total="4", deliveries_total="1",
          errors_total="1", waiting="1", messages_ready="3", messages_reserved="1")
    shows_row(page, ["jobs", "2", "1", "0", "0"])
    shows_row(page, ["idle", "0", "0", "0", "1"])
    # A queue name is data, shown as its text: no element made from it.
    shows_row(page, [evil.decode(), "1", "0", "0", "0"])
    assert page.execute_script("return document.querySelectorAll('#queues img').length") == 0
    assert page.title == "mqmq"
    assert "REQUEST_BAD_TIMEOUT 1" in text(page, "errors-extra")
    wait_for(page, lambda: text(page, "puts-peak") != "peak 0/s", lambda: "a peak of puts on the chart")
    assert page.find_element(By.CSS_SELECTOR, "#rate-puts .line").get_attribute("d").startswith("M")

    assert client.ask(b"Ack", b"jobs", reserved[2]) == [b"OK"]
    assert client.ask(b"Get", b"jobs", b"1000") == [b"OK", b"two"]
    assert client.ask(b"Put", b"idle", b"at last") == [b"OK"]
    assert waiter.reply() == [b"OK", b"at last"]
    waiter.close()
    shows(page, connections_current="1", acks_total="1", deliveries_total="3", puts_total="5",
          waiting="0", messages_reserved="0", messages_ready="2")
    shows_row(page, ["jobs", "1", "0", "0", "0"])
    shows_row(page, ["idle", "0", "0", "0", "0"])
    wait_for(page, lambda: text(page, "acks-peak") != "peak 0/s", lambda: "a peak of acks on the chart")

    # While messages flow, the rates are above zero (a Put and a Get per look).
    def flowing() -> bool:
        assert client.ask(b"Put", b"flow", b"x") == [b"OK"]
        assert client.ask(b"Get", b"flow", b"1000") == [b"OK", b"x"]
        return number(text(page, "puts-rate")) > 0 and number(text(page, "deliveries-rate")) > 0

    wait_for(page, flowing, lambda: "rates above zero")
    png = page.get_screenshot_as_png()
    (tmp_path / "dashboard.png").write_bytes(png)
    width, height, colours = png_colours(png)
    size = page.execute_script("return [innerWidth * devicePixelRatio, innerHeight * devicePixelRatio]")
    assert [width, height] == size
    # A blank or unstyled page has a handful of colours; charts and text have many.
    assert len(colours) > 50, len(colours)

    # On a phone: one column, and a long queue name wraps rather than widen the page.
    long_name = "q" * 300
    assert client.ask(b"Put", long_name.encode(), b"x") == [b"OK"]
    shows_row(page, [long_name, "1", "0", "0", "0"])
    page.set_window_size(390, 844)
    wait_for(page, lambda: page.execute_script("return innerWidth") <= 390, lambda: "a phone's width")
    widths = page.execute_script("return [document.documentElement.scrollWidth, innerWidth]")
    assert widths[0] <= widths[1], f"scrolls sideways on a phone: {widths}"
    boxes = page.execute_script(
        "return [...document.querySelectorAll('.card')].map((card) => card.getBoundingClientRect().toJSON())")
    assert len(boxes) == 9
    assert all(box["left"] >= 0 and box["right"] <= widths[1] for box in boxes), boxes
    client.close()


def test_shows_disconnected_while_the_server_is_down_and_recovers(
    browser: Any, procs: Processes, tmp_path: Path
) -> None:
    database = tmp_path / "queues.db"
    server = Server(procs, "--http", "tcp:0:interface=127.0.0.1", "--store", f"sqlite:{database}")
    page = open_page(browser, server)
    client = Client(server.port)
    assert client.ask(b"Put", b"jobs", b"one") == [b"OK"]
    shows(page, status="Live", puts_total="1", store_durable="yes", store_health="healthy",
          store_last_error="none", store_kind=f"sqlite:{database} (fsync always)")
    wait_for(page, lambda: number(text(page, "store-commits")) > 0, lambda: "the store's commits")
    client.close()
    banner = page.find_element(By.ID, "banner")
    assert not banner.is_displayed()
    with urllib.request.urlopen(server.url + "stats", timeout=WAIT) as answer:
        stats = json.load(answer)

    stop(server.process, signal.SIGTERM)
    shows(page, status="Disconnected")
    assert page.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "disconnected"
    assert banner.is_displayed() and "Retrying" in banner.text
    assert text(page, "puts-total") == "1", "the last numbers stay meanwhile"
    assert text(page, "puts-rate") == "–", "no rate is known meanwhile"

    # The page keeps asking: once /stats answers on that port again (here a
    # stand-in, quicker to start than a server), it is live again.
    stats["commands"]["put"] = 1234
    with serving_stats(server.http_port, json.dumps(stats).encode()):
        shows(page, status="Live", puts_total="1,234")
        assert not banner.is_displayed()


@contextlib.contextmanager
def serving_stats(port: int, stats: bytes) -> Iterator[None]:
    """``stats`` served as ``/stats`` on ``port``, from a thread."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/stats"
            self.send_response(200 if found else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(stats) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(stats)

        def log_message(self, *args: Any) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        web.shutdown()
        web.server_close()
        thread.join()


def png_colours(png: bytes) -> tuple[int, int, set[bytes]]:
    """A PNG's width, height and distinct pixel colours (8-bit RGB or RGBA,
    not interlaced: what Chromium writes), decoded with zlib alone."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks: dict[bytes, bytes] = {}
    offset = 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset:offset + 4])
        kind = png[offset + 4:offset + 8]
        chunks[kind] = chunks.get(kind, b"") + png[offset + 8:offset + 8 + length]
        offset += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour_type, interlace) in ((8, 2, 0), (8, 6, 0)), (depth, colour_type, interlace)
    channels = 3 if colour_type == 2 else 4
    stride = width * channels
    data = zlib.decompress(chunks[b"IDAT"])
    assert len(data) == height * (stride + 1)
    colours: set[bytes] = set()
    above = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = unfilter(data[start], bytearray(data[start + 1:start + 1 + stride]), above, channels)
        pixels = bytes(row)
        colours.update(pixels[x:x + channels] for x in range(0, stride, channels))
        above = row
    return width, height, colours


def unfilter(kind: int, row: bytearray, above: bytearray, left: int) -> bytearray:
    """One scanline with its PNG filter undone (``left``: bytes per pixel)."""
    if kind == 1:
        for i in range(left, len(row)):
            row[i] = (row[i] + row[i - left]) & 0xFF
    elif kind == 2:
        row = bytearray((a + b) & 0xFF for a, b in zip(row, above))
    elif kind == 3:
        for i in range(len(row)):
            row[i] = (row[i] + ((row[i - left] if i >= left else 0) + above[i]) // 2) & 0xFF
    elif kind == 4:
        for i in range(len(row)):
            a = row[i - left] if i >= left else 0
            b = above[i]
            c = above[i - left] if i >= left else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    else:
        assert kind == 0, f"unknown PNG filter {kind}"
    return row
