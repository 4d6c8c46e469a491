"""TLS from PEM files: a server that may require client certificates, and a client.

Needs pyOpenSSL (``pip install 'mqmq[tls]'``); nothing else in mqmq imports
this module before TLS is asked for.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable, Optional, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import defer, ssl
from twisted.internet.protocol import connectionDone
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mqmq.address import describe

_T = TypeVar("_T")

# A combined file may hold a certificate and its key: the key's own block.
_PRIVATE_KEY_BLOCK = re.compile(
    rb"-----BEGIN ((?:[A-Z]+ )?)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.DOTALL
)


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be used.

    ``role`` says which it was given as (``"certificate"``, ``"key"`` or
    ``"ca"``), ``path`` which file; the message names the file and the problem.
    """

    def __init__(self, role: str, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.role = role
        self.path = path
        self.problem = problem


def parse_certificates(data: bytes) -> list[x509.Certificate]:
    """Every PEM certificate in ``data``, in order.

    :raises ValueError: when there is none, or one is not valid.
    """
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError("no PEM certificate in it")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise ValueError(f"not a valid PEM certificate ({error})") from None


def parse_private_key(data: bytes) -> PrivateKeyTypes:
    """The first PEM private key in ``data`` (which may hold certificates too).

    :raises ValueError: when there is none, it is not valid, or it is encrypted.
    """
    block = _PRIVATE_KEY_BLOCK.search(data)
    if block is None:
        raise ValueError("no PEM private key in it")
    try:
        return serialization.load_pem_private_key(block.group(0), password=None)
    except TypeError:  # cryptography's way to say it wants a password
        raise ValueError("the private key is encrypted; "
                         "decrypt it first: openssl pkey -in KEY -out PLAIN-KEY") from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not a valid PEM private key ({error})") from None


def _load(role: str, path: str, parse: Callable[[bytes], _T]) -> _T:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise TLSFileError(role, path, f"cannot read it: {error.strerror or error}") from None
    try:
        return parse(data)
    except ValueError as error:
        raise TLSFileError(role, path, str(error)) from None


def _public_der(key: Any) -> bytes:
    public_bytes: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public_bytes


def _identity(certificate: str, key: Optional[str]) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    """A certificate (its chain after it) and its key, checked to match."""
    chain = _load("certificate", certificate, parse_certificates)
    if key is None:
        try:
            private_key = _load("certificate", certificate, parse_private_key)
        except TLSFileError as error:
            raise TLSFileError("certificate", certificate,
                               f"{error.problem}, and no key file was given") from None
    else:
        private_key = _load("key", key, parse_private_key)
    if _public_der(chain[0].public_key()) != _public_der(private_key.public_key()):
        raise TLSFileError("certificate" if key is None else "key", key or certificate,
                           f"the private key does not match the certificate in {certificate}")
    return chain, private_key


def _trust(ca: str) -> Any:
    authorities = _load("ca", ca, parse_certificates)
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(authority)) for authority in authorities]
    )


def _identity_options(chain: list[x509.Certificate], key: PrivateKeyTypes) -> dict[str, Any]:
    # Given to pyOpenSSL as cryptography's objects, which it prefers (it
    # deprecates its own X509 and PKey), though Twisted's annotations say otherwise.
    return {"privateKey": key, "certificate": chain[0], "extraCertChain": chain[1:]}


def server_tls(certificate: str, key: Optional[str] = None, ca: Optional[str] = None) -> ssl.CertificateOptions:
    """A TLS server's options, from PEM files.

    ``certificate`` holds the server's certificate, then any intermediate
    ones; ``key`` its private key (by default, found in ``certificate``).
    With ``ca``, the server asks every client for a certificate signed by one
    of the CAs in that file, and refuses the handshake of clients without one.

    :raises TLSFileError: for a file that cannot be read or used.
    """
    chain, private_key = _identity(certificate, key)
    trust = None if ca is None else _trust(ca)
    # A trust root makes the server require a client certificate signed by it.
    options = ssl.CertificateOptions(trustRoot=trust, **_identity_options(chain, private_key))
    try:
        options.getContext()  # now, not at the first connection
    except SSL.Error as error:  # e.g. a key too weak for OpenSSL's security level
        raise TLSFileError("certificate", certificate, f"OpenSSL refuses it: {_openssl_says(error)}") from None
    return options


def client_tls(
    hostname: str,
    certificate: Optional[str] = None,
    key: Optional[str] = None,
    ca: Optional[str] = None,
) -> IOpenSSLClientConnectionCreator:
    """A TLS client's options, from PEM files, for :func:`mqmq.client.connect`.

    The server's certificate must name ``hostname`` (a DNS name, or an IP
    address in its subjectAltName) and be signed by a CA in ``ca``, or by
    one the system trusts when ``ca`` is None.  With ``certificate`` (and
    ``key``, by default found in it), the client presents that certificate.

    :raises TLSFileError: for a file that cannot be read or used.
    """
    if key is not None and certificate is None:
        raise TLSFileError("key", key, "a private key without its certificate")
    trust = None if ca is None else _trust(ca)
    identity = None if certificate is None else _identity_options(*_identity(certificate, key))
    if identity is not None:
        try:  # now, not at the first connection
            ssl.CertificateOptions(**identity).getContext()
        except SSL.Error as error:  # e.g. a key too weak for OpenSSL's security level
            raise TLSFileError("certificate", str(certificate), f"OpenSSL refuses it: {_openssl_says(error)}") from None
    options = ssl.optionsForClientTLS(hostname, trustRoot=trust, extraCertificateOptions=identity)
    return _ServerNameChecked(hostname, options)


def _openssl_says(error: SSL.Error) -> str:
    errors = error.args[0] if error.args else None
    if isinstance(errors, list):
        said = [str(item[-1]) for item in errors if isinstance(item, tuple) and item]
        if said:
            return "; ".join(said)
    return str(error)


@implementer(IOpenSSLClientConnectionCreator)
class _ServerNameChecked:
    """Twisted's client TLS, whose check of the server's name also refuses a
    certificate that names no host at all.

    (Twisted's check fails the handshake on service_identity's
    ``VerificationError`` only; a certificate without subjectAltName raises
    ``CertificateError``, which it logs and lets through.)
    """

    log = Logger()

    def __init__(self, hostname: str, options: IOpenSSLClientConnectionCreator) -> None:
        self._options = options
        try:
            ipaddress.ip_address(hostname)
            self._server: Any = IPAddress_ID(hostname)
        except ValueError:
            self._server = DNS_ID(hostname)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        # In place of Twisted's own check (it sent the server name already).
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verifier(tlsProtocol))
        return connection

    def _verifier(self, tlsProtocol: Any) -> Callable[[SSL.Connection, Any, int, int, int], bool]:
        def verify(connection: SSL.Connection, certificate: Any, error: int, depth: int, ok: int) -> bool:
            if not ok or depth != 0:
                return bool(ok)  # the chain is OpenSSL's to judge; the name is ours
            try:
                verify_service_identity(extract_patterns(certificate), [self._server], [])
            except (VerificationError, CertificateError):
                tlsProtocol.failVerification(Failure())
                return False
            except BaseException:  # raised into OpenSSL, it would be lost: refuse, and say why
                self.log.failure("checking the server's certificate failed")
                return False
            return True

        return verify


def handshake_error(reason: Failure) -> str:
    """Why a TLS handshake failed, as OpenSSL says it (``certificate verify failed``)."""
    if reason.check(SSL.Error):
        return _openssl_says(reason.value)
    return reason.getErrorMessage()


#: Seconds a client has to finish its TLS handshake once connected.
HANDSHAKE_SECONDS = 10.0


class _ServerTLSProtocol(BufferingTLSTransport):
    """Twisted's server side of TLS, logging the clients whose handshake failed."""

    log = Logger()

    _handshake_timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        # A client that never finishes its handshake (or never starts it)
        # must not hold one of --max-connections' places for ever.
        self._handshake_timer = self.factory._clock.callLater(HANDSHAKE_SECONDS, self._handshake_too_slow)
        super().makeConnection(transport)

    def _handshake_too_slow(self) -> None:
        self._handshake_timer = None
        if not self._handshakeDone:
            self.log.info("refused {peer}: no TLS handshake within {seconds:g} s",
                          peer=describe(self.getPeer()), seconds=HANDSHAKE_SECONDS)
            transport: Any = self.transport
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        # Twisted's own state: a failed handshake leaves _handshakeDone false
        # and keeps its OpenSSL error in _reason, which the wrapped protocol
        # gets instead of the TCP reason.
        if not self._handshakeDone:
            failure: Failure = self._reason or reason
            peer = describe(self.getPeer())
            if failure.check(SSL.Error):
                self.log.info("refused {peer}: TLS handshake failed: {why}",
                              peer=peer, why=handshake_error(failure))
            else:  # gone before the handshake: a port check, a client that gave up
                self.log.debug("{peer} left before the TLS handshake: {why}",
                               peer=peer, why=failure.getErrorMessage())
        super().connectionLost(reason)


class _ServerTLSFactory(TLSMemoryBIOFactory):
    protocol = _ServerTLSProtocol

    def buildProtocol(self, addr: Any) -> Any:
        # A connection the wrapped factory refuses (too many open) is closed
        # at once, as without TLS; Twisted's own would wrap None.
        wrapped = self.wrappedFactory.buildProtocol(addr)
        return None if wrapped is None else self.protocol(self, wrapped)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """TLS over another server endpoint (TCP, UNIX socket ...).

    Unlike Twisted's ``ssl:`` endpoint it takes any options, among them ones
    that require client certificates (:func:`server_tls` with ``ca``), and it
    logs each client refused by the handshake, naming it and why.
    """

    def __init__(self, endpoint: IStreamServerEndpoint,
                 options: IOpenSSLServerConnectionCreator | ssl.CertificateOptions) -> None:
        self.endpoint = endpoint
        self.options = options

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        listening: defer.Deferred[IListeningPort] = self.endpoint.listen(
            _ServerTLSFactory(self.options, False, protocolFactory)
        )
        return listening
