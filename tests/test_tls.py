"""TLS with client certificates: ``--cert``, ``--key``, ``--ca`` on the server
and on the ``mqmq`` command, and Twisted's own ``ssl:``/``tls:`` endpoints.

Certificates are made for each run (tests/certificates.py): a client whose
certificate the CA signed gets in; one with none, or one another CA signed,
is refused by the handshake, and the server logs whom it refused and why.
"""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Optional

import pytest
import pytest_twisted  # type: ignore[import-untyped]

pytest.importorskip("OpenSSL", reason="TLS needs pyOpenSSL (pip install '.[test]' brings it)")

from twisted.internet import reactor  # noqa: E402
from twisted.internet.endpoints import clientFromString  # noqa: E402
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher  # noqa: E402
from twisted.python import usage  # noqa: E402
from zope.interface import provider  # noqa: E402

import certificates  # noqa: E402
from conftest import Processes, assert_one_error_line, bin_path, stop  # noqa: E402
from mqmq import cli, errors  # noqa: E402
from mqmq.client import MQClient, connect, connect_endpoint  # noqa: E402
from mqmq.server import tap  # noqa: E402
from mqmq.server.service import MQService  # noqa: E402
from mqmq.tls import TLSFileError, client_tls, server_tls  # noqa: E402

EXIT_FAILURE = 1
EXIT_USAGE = 2

NO_CERTIFICATE = "peer did not return a certificate"
UNKNOWN_CA = "certificate verify failed"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> certificates.Files:
    return certificates.make(tmp_path_factory.mktemp("tls"))


def tls_options(files: certificates.Files) -> list[str]:
    return ["--cert", str(files.server_cert), "--key", str(files.server_key), "--ca", str(files.ca)]


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The text of every event logged while the test runs (a failure's as
    ``failure: ...``)."""
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))
        if event.get("log_failure") is not None:
            lines.append(f"failure: {event['log_failure'].getTraceback()}")

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest_twisted.async_yield_fixture
async def tls_server(files: certificates.Files) -> AsyncIterator[tuple[MQService, str]]:
    """The server ``--addr 127.0.0.1:0 --cert --key --ca`` makes, in this process."""
    options = tap.Options()
    options.parseOptions(["--addr", "127.0.0.1:0", *tls_options(files)])
    server = tap.make_server(options, reactor)
    server.startService()
    try:
        yield server, f"127.0.0.1:{server.ports[0].getHost().port}"
    finally:
        await server.stopService()


async def refused(address: str, tls: Any) -> tuple[errors.MQError, MQClient]:
    """Connect with ``tls`` and Put: the error the Put fails with, and the client."""
    client = await connect(reactor, address, tls=tls)
    client.local_port = client.transport.getHost().port  # type: ignore[attr-defined]
    with pytest.raises(errors.ConnectionClosed) as failed:
        await client.put(b"q", b"should not arrive")
    return failed.value, client


def refusal(logged: list[str], client: MQClient) -> str:
    """The server's one log line refusing ``client``."""
    port = client.local_port  # type: ignore[attr-defined]
    lines = [line for line in logged if line.startswith(f"refused 127.0.0.1:{port}: ")]
    assert len(lines) == 1, logged
    return lines[0]


# --- in this process ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_client_certificate_signed_by_the_ca_gets_in(
    tls_server: tuple[MQService, str], files: certificates.Files, logged: list[str]
) -> None:
    server, address = tls_server
    tls = client_tls("127.0.0.1", str(files.client_cert), str(files.client_key), str(files.ca))
    client = await connect(reactor, address, tls=tls)
    await client.put(b"q", b"secret")
    assert await client.get(b"q") == b"secret"
    # The connection really is TLS, with the client's certificate.
    peer = client.transport.getPeerCertificate().to_cryptography()
    assert peer.subject.rfc4514_string() == "CN=localhost"
    await client.disconnect()
    assert not [line for line in logged if line.startswith("refused")]


@pytest.mark.parametrize(
    "who, why",
    [("no-certificate", NO_CERTIFICATE), ("another-ca", UNKNOWN_CA)],
)
@pytest_twisted.ensureDeferred
async def test_strangers_are_refused_and_logged(
    tls_server: tuple[MQService, str], files: certificates.Files, logged: list[str],
    who: str, why: str,
) -> None:
    server, address = tls_server
    if who == "no-certificate":
        tls = client_tls("127.0.0.1", ca=str(files.ca))
    else:
        tls = client_tls("127.0.0.1", str(files.stranger_cert), str(files.stranger_key), str(files.ca))
    error, stranger = await refused(address, tls)
    line = refusal(logged, stranger)
    assert line.endswith(f"TLS handshake failed: {why}"), line

    # Nothing else broke: a client with a good certificate still gets in,
    # and the message the stranger sent never arrived.
    good = await connect(reactor, address, tls=client_tls(
        "127.0.0.1", str(files.client_cert), str(files.client_key), str(files.ca)))
    info = await good.info()
    assert info.num_messages == 0
    assert info.num_connections == 1
    await good.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_plain_tcp_client_is_refused(
    tls_server: tuple[MQService, str], logged: list[str]
) -> None:
    _, address = tls_server
    _, client = await refused(address, None)
    assert "TLS handshake failed" in refusal(logged, client)


@pytest_twisted.ensureDeferred
async def test_the_client_refuses_a_server_its_ca_did_not_sign(
    tls_server: tuple[MQService, str], files: certificates.Files
) -> None:
    _, address = tls_server
    tls = client_tls("127.0.0.1", str(files.client_cert), str(files.client_key), str(files.other_ca))
    error, _ = await refused(address, tls)
    assert UNKNOWN_CA in str(error)


@pytest.mark.parametrize("name", ["127.0.0.1", "mq.example.com"])
@pytest_twisted.ensureDeferred
async def test_the_client_refuses_a_server_certificate_that_names_no_host(
    files: certificates.Files, name: str
) -> None:
    # Signed by the right CA, even with the address as its common name, but
    # naming no host (no subjectAltName): it could be any of the CA's
    # certificates, a client's among them.
    options = tap.Options()
    options.parseOptions(["--addr", "127.0.0.1:0", "--cert", str(files.bare_cert), "--key", str(files.bare_key)])
    server = tap.make_server(options, reactor)
    server.startService()
    try:
        port = server.ports[0].getHost().port
        client = await connect(reactor, f"127.0.0.1:{port}", tls=client_tls(name, ca=str(files.ca)))
        with pytest.raises(errors.ConnectionClosed):
            await client.put(b"q", b"must not reach a server that could be anyone")
        assert (await server.broker.get(b"q", 0.01).addErrback(lambda _: None)) is None
    finally:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_shakes_hands_is_closed_and_logged(
    files: certificates.Files, logged: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mqmq.tls
    from twisted.internet import defer
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    monkeypatch.setattr(mqmq.tls, "HANDSHAKE_SECONDS", 0.2)
    options = tap.Options()
    options.parseOptions(["--addr", "127.0.0.1:0", *tls_options(files)])
    server = tap.make_server(options, reactor)
    server.startService()
    try:
        closed: defer.Deferred[None] = defer.Deferred()

        class Silent(Protocol):
            def connectionLost(self, reason: Any = None) -> None:
                closed.callback(None)

        port = server.ports[0].getHost().port
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Silent())
        await closed.addTimeout(5, reactor)
        assert [line for line in logged if "no TLS handshake within 0.2 s" in line]
        assert server.broker.num_connections == 0
    finally:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_a_connection_over_the_limit_is_closed(files: certificates.Files, logged: list[str]) -> None:
    options = tap.Options()
    options.parseOptions(["--addr", "127.0.0.1:0", "--max-connections", "1", *tls_options(files)])
    server = tap.make_server(options, reactor)
    server.startService()
    try:
        address = f"127.0.0.1:{server.ports[0].getHost().port}"
        tls = client_tls("127.0.0.1", str(files.client_cert), str(files.client_key), str(files.ca))
        first = await connect(reactor, address, tls=tls)
        await first.put(b"q", b"1")
        second = await connect(reactor, address, tls=tls)
        with pytest.raises(errors.ConnectionClosed):
            await second.put(b"q", b"2")
        assert (await first.info()).num_messages == 1
        await first.disconnect()
        assert any(line.startswith("refused a connection from 127.0.0.1:") for line in logged), logged
        assert not [line for line in logged if line.startswith("failure: ")], logged
    finally:
        await server.stopService()


async def round_trip(endpoint: Any, message: bytes) -> str:
    """Put and get ``message`` over a client endpoint; the server certificate's subject."""
    client = await connect_endpoint(endpoint)
    await client.put(b"q", message)
    assert await client.get(b"q") == message
    subject = client.transport.getPeerCertificate().to_cryptography().subject.rfc4514_string()
    await client.disconnect()
    return str(subject)


@pytest_twisted.ensureDeferred
async def test_twisted_ssl_and_tls_endpoint_strings(files: certificates.Files, tmp_path: Path) -> None:
    # --listen ssl:... on the server, a tls: client endpoint through connect_endpoint.
    description = tap.listen_description(
        f"ssl:0:interface=127.0.0.1:certKey={files.server_cert}:privateKey={files.server_key}")
    server = MQService(reactor, [description])
    server.startService()
    try:
        roots = tmp_path / "roots"
        roots.mkdir()
        shutil.copy(files.ca, roots / "ca.pem")
        port = server.ports[0].getHost().port
        endpoint = clientFromString(
            reactor, f"tls:127.0.0.1:{port}:trustRoots={roots}"
            f":certificate={files.client_cert}:privateKey={files.client_key}")
        assert await round_trip(endpoint, b"over tls:") == "CN=localhost"
    finally:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_twisted_tls_server_and_ssl_client_endpoint_strings(files: certificates.Files, tmp_path: Path) -> None:
    # --listen tls:DIRECTORY (Twisted's: a PEM file per host name, served by
    # SNI) on the server, an ssl: client endpoint through connect_endpoint.
    pems = tmp_path / "pems"
    pems.mkdir()
    (pems / "localhost.pem").write_bytes(files.server_key.read_bytes() + files.server_cert.read_bytes())
    server = MQService(reactor, [tap.listen_description(f"tls:{pems}:port=0:interface=\\:\\:1")])
    server.startService()
    try:
        port = server.ports[0].getHost().port
        endpoint = clientFromString(
            reactor, f"ssl:host=\\:\\:1:port={port}:caCertsDir={files.ca.parent}"
            f":certKey={files.client_cert}:privateKey={files.client_key}")
        assert await round_trip(endpoint, b"over tls: and ssl:") == "CN=localhost"
    finally:
        await server.stopService()


# --- files that cannot be used --------------------------------------------------------


def bad_files(files: certificates.Files, tmp_path: Path) -> dict[str, Path]:
    combined = tmp_path / "combined.pem"
    combined.write_bytes(files.server_cert.read_bytes() + files.server_key.read_bytes())
    encrypted = tmp_path / "encrypted.key"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"password")))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    return {"combined": combined, "encrypted": encrypted, "garbage": garbage, "broken": broken}


@pytest.mark.parametrize(
    "cert, key, ca, option, said",
    [
        ("missing", "server_key", None, "--cert", "cannot read it: No such file or directory"),
        ("garbage", "server_key", None, "--cert", "no PEM certificate in it"),
        ("broken", "server_key", None, "--cert", "not a valid PEM certificate"),
        ("server_cert", None, None, "--cert", "no PEM private key in it, and no key file was given"),
        ("server_cert", "garbage", None, "--key", "no PEM private key in it"),
        ("server_cert", "encrypted", None, "--key", "the private key is encrypted"),
        ("server_cert", "client_key", None, "--key", "does not match the certificate in"),
        ("server_cert", "server_key", "garbage", "--ca", "no PEM certificate in it"),
        ("server_cert", "server_key", "missing", "--ca", "cannot read it"),
    ],
)
def test_files_that_cannot_be_used_are_usage_errors(
    files: certificates.Files, tmp_path: Path,
    cert: str, key: Optional[str], ca: Optional[str], option: str, said: str,
) -> None:
    paths = {**bad_files(files, tmp_path), "missing": tmp_path / "missing.pem",
             **{name: getattr(files, name) for name in ("server_cert", "server_key", "client_key")}}
    arguments = ["--addr", "127.0.0.1:0", "--cert", str(paths[cert])]
    arguments += ["--key", str(paths[key])] if key else []
    arguments += ["--ca", str(paths[ca])] if ca else []
    with pytest.raises(usage.UsageError) as error:
        tap.Options().parseOptions(arguments)
    named = {"--cert": cert, "--key": key, "--ca": ca}[option]
    assert str(error.value).startswith(f"{option} {paths[named]}: "), error.value
    assert said in str(error.value)


def test_a_combined_certificate_and_key_file_needs_no_key_option(
    files: certificates.Files, tmp_path: Path
) -> None:
    combined = bad_files(files, tmp_path)["combined"]
    assert server_tls(str(combined), ca=str(files.ca)).requireCertificate
    options = tap.Options()
    options.parseOptions(["--cert", str(combined)])
    assert options["tls"] is not None


@pytest.mark.parametrize(
    "arguments, said",
    [
        (["--key", "k.pem"], "--key needs --cert"),
        (["--ca", "ca.pem"], "--ca needs --cert"),
        (["--listen", "tcp:0", "--cert", "c.pem"], "--cert serves TLS on --addr: give --addr too"),
    ],
)
def test_tls_options_without_what_they_need(arguments: list[str], said: str) -> None:
    with pytest.raises(usage.UsageError, match=re.escape(said)):
        tap.Options().parseOptions(arguments)


def test_a_key_without_a_certificate_on_the_client(files: certificates.Files) -> None:
    with pytest.raises(TLSFileError, match="without its certificate"):
        client_tls("127.0.0.1", key=str(files.client_key))


def test_without_tls_options_the_server_listens_on_plain_tcp() -> None:
    options = tap.Options()
    options.parseOptions(["--addr", "127.0.0.1:0"])
    assert options["tls"] is None
    assert tap.server_endpoints(options, reactor) == options["endpoints"]


# --- as a user runs them -----------------------------------------------------------------


def client_options(files: certificates.Files, who: str = "client") -> list[str]:
    """The ``mqmq`` command's TLS options, Go-style (one dash) as the original's flags."""
    if who == "nobody":
        return ["-ca", str(files.ca)]
    return ["-cert", str(getattr(files, f"{who}_cert")), "-key", str(getattr(files, f"{who}_key")),
            "-ca", str(files.ca)]


def test_twistd_with_client_certificates(procs: Processes, files: certificates.Files) -> None:
    process, addr, _ = procs.start_twistd(*tls_options(files))

    put = procs.mqmq("put", "-addr", addr, *client_options(files), "q", "hello")
    assert put.returncode == 0, put.stderr
    get = procs.mqmq("get", "--addr", addr, "--cert", str(files.client_cert),
                     "--key", str(files.client_key), "--ca", str(files.ca), "q")
    assert (get.returncode, get.stdout) == (0, b"hello"), get.stderr

    for who, why in (("nobody", "certificate required"), ("stranger", "unknown ca")):
        result = procs.mqmq("put", "-addr", addr, *client_options(files, who), "q", "no")
        assert result.returncode == EXIT_FAILURE
        assert why in assert_one_error_line(result)

    assert stop(process, signal.SIGTERM) in (0, -signal.SIGTERM)
    log = procs.output(process)[0].decode("utf-8", "replace")
    assert "Traceback" not in log
    refusals = re.findall(r"#info\] refused 127\.0\.0\.1:\d+: TLS handshake failed: (.*)", log)
    assert refusals == [NO_CERTIFICATE, UNKNOWN_CA], log


def test_start_refuses_a_plain_client_and_logs_it(procs: Processes, files: certificates.Files) -> None:
    # Serving as twistd mqmq does (the same options, the same server); what
    # differs is the log, which must let the refusals through.
    process, addr, _ = procs.start_server(*tls_options(files))
    plain = procs.mqmq("info", "-addr", addr)
    assert plain.returncode == EXIT_FAILURE
    assert_one_error_line(plain)

    assert stop(process, signal.SIGTERM) == 0
    stderr = procs.output(process)[1]
    assert "Traceback" not in stderr
    assert len(re.findall(r"INFO: refused 127\.0\.0\.1:\d+: TLS handshake failed: .+", stderr)) == 1, stderr


@pytest.mark.parametrize(
    "arguments, said",
    [
        (["start", "--cert", "missing.pem"], "--cert missing.pem: cannot read it"),
        (["info", "-ca", "missing.pem"], "--ca missing.pem: cannot read it"),
        (["put", "-key", "client.key", "q", "m"], "--key needs --cert"),
    ],
    ids=["start", "client", "client-key-alone"],
)
def test_a_bad_tls_option_is_one_usage_error_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    arguments: list[str], said: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.main(arguments)
    assert exited.value.code == EXIT_USAGE
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"mqmq: {said}: No such file or directory (see mqmq --help)\n"
                          if "cannot read" in said else f"mqmq: {said} (the client's certificate) "
                          "(see mqmq --help)\n")


def test_twistd_with_a_key_not_matching_says_why(procs: Processes, files: certificates.Files) -> None:
    result = procs.run(bin_path("twistd"), "-n", "--pidfile=", "mqmq", "--addr", "127.0.0.1:0",
                       "--cert", str(files.server_cert), "--key", str(files.client_key))
    assert result.returncode != 0
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert "Traceback" not in output
    assert f"--key {files.client_key}: the private key does not match" in output.splitlines()[-1], output



def _tls_socket(files: certificates.Files, port: int) -> Any:
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(files.ca))
    context.load_cert_chain(str(files.client_cert), str(files.client_key))
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                               server_hostname="127.0.0.1")


def test_a_tls_consumer_gone_behind_unread_data_never_takes_a_message(
    procs: Processes, files: certificates.Files
) -> None:
    # As tests/test_departed_tcp.py's, over TLS: the consumer's FIN waits
    # behind data the server will not read, so only the kernel (TCP_INFO on
    # the socket under the TLS layer) can tell it has gone.
    import ssl
    import time

    from mqmq.wire.codec import decode_payload, encode_frame
    from support import read_exactly

    def request(sock: Any, *fields: bytes) -> list[bytes]:
        sock.sendall(encode_frame(list(fields)))
        return decode_payload(read_exactly(sock, int.from_bytes(read_exactly(sock, 4), "big")))

    _, _, port = procs.start_server(*tls_options(files), "--max-pending-bytes", "65536")
    consumer = _tls_socket(files, port)
    consumer.sendall(encode_frame([b"Get", b"q", b"3600000"]))
    consumer.setblocking(False)
    junk, blocked_since = encode_frame([b"Put", b"junk", b"x" * 4000]), None
    while blocked_since is None or time.monotonic() - blocked_since < 0.3:
        try:
            consumer.send(junk)
            blocked_since = None
        except (BlockingIOError, ssl.SSLWantWriteError):
            blocked_since = blocked_since or time.monotonic()
            time.sleep(0.01)
    consumer.close()  # (no close_notify: as a process that died)
    with _tls_socket(files, port) as producer:
        assert request(producer, b"Put", b"q", b"acknowledged") == [b"OK"]
        got = request(producer, b"Get", b"q", b"5000")
    assert got == [b"OK", b"acknowledged"]


def test_a_key_too_weak_for_openssl_is_a_usage_error_not_a_failure_per_connection(tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    (tmp_path / "weak.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "weak.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(usage.UsageError, match="OpenSSL refuses it"):
        tap.Options().parseOptions(["--addr", "127.0.0.1:0", "--cert", str(tmp_path / "weak.pem"),
                                    "--key", str(tmp_path / "weak.key")])
    with pytest.raises(TLSFileError, match="OpenSSL refuses it"):
        client_tls("127.0.0.1", str(tmp_path / "weak.pem"), str(tmp_path / "weak.key"))
