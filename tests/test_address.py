"""HOST:PORT addresses, as the original's -addr flag takes them."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from mqmq import address
from mqmq.address import DEFAULT_ADDRESS, Address, describe, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:47774", Address("127.0.0.1", 47774)),
        ("[::1]:80", Address("::1", 80)),
        (":5000", Address("", 5000)),
        ("localhost:0", Address("localhost", 0)),
        ("", parse_address(DEFAULT_ADDRESS)),
    ],
)
def test_parse(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["nonsense", "127.0.0.1", "::1:80", "host:port", "h:65536", "h:-1"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="address"):
        parse_address(text)


def test_str_brackets_ipv6() -> None:
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("127.0.0.1", 80)) == "127.0.0.1:80"


def test_describe() -> None:
    assert describe(IPv4Address("TCP", "10.0.0.1", 5)) == "10.0.0.1:5"
    assert describe(IPv6Address("TCP", "::1", 5)) == "[::1]:5"
    assert describe(UNIXAddress(b"/tmp/mq.sock")) == "unix:/tmp/mq.sock"


def test_server_endpoint_names_the_interface_and_a_deep_backlog() -> None:
    assert parse_address("[::1]:47774").server_endpoint() == (
        r"tcp:port=47774:interface=\:\:1:backlog=4096"
    )


def test_an_empty_host_listens_on_every_interface_dual_stack_where_there_is_ipv6(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Checked without listening: tests stay on loopback.
    monkeypatch.setattr(address, "_ipv6_available", lambda: True)
    assert Address("", 5).server_endpoint() == r"tcp:port=5:interface=\:\::backlog=4096"
    monkeypatch.setattr(address, "_ipv6_available", lambda: False)
    assert Address("", 5).server_endpoint() == "tcp:port=5:interface=0.0.0.0:backlog=4096"
