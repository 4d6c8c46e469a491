"""``twistd mqmq``: options and the service they make."""

from __future__ import annotations

import inspect
import math
import os
import resource
import signal
import sys
from dataclasses import fields
from types import FrameType, ModuleType
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar, Union

import twisted
from twisted.application import app, service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint, _parse, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.logfile import BaseLogFile

from mqmq import __version__
from mqmq.address import DEFAULT_ADDRESS, describe, parse_address
from mqmq.wire.codec import max_frame_length
from mqmq.wire.info import encode_info
from mqmq.broker.limits import MAX_INFO_BYTES, Limits, parse_size
from mqmq.server.logs import LOG_FORMATS, LOG_LEVELS, log_through_twistd
from mqmq.server.service import MQService
from mqmq.stores import STORE_FORMS, parse_store_description, store_from_description
from mqmq.stores.sqlite import FSYNC_POLICIES

_DEFAULTS = Limits()
# A frame's length is a uint32, and must have room for Put and a queue name.
_LARGEST_MESSAGE = 2**32 - 1 - max_frame_length(0)
# The smallest Info reply there is: one connection (the one asking), no queue.
_SMALLEST_INFO = len(encode_info(1, 0, {}))

#: Permissions of a UNIX socket whose ``--listen`` description gives no
#: ``mode=``: its owner and group may connect, others not (Twisted's own
#: default, 0666, lets every local user in).
UNIX_SOCKET_MODE = 0o660

# twistd before Twisted 26.10 prints a usage error and exits with status 0
# (twisted#12656); Python 3.9, and so PyPy 3.9, gets Twisted 26.4 at most.
_TWISTD_EXITS_0_ON_USAGE_ERRORS = (twisted.version.major, twisted.version.minor) < (26, 10)

# Modules Twisted's TLS needs; the ``tls`` extra installs them.
_TLS_MODULES = {"OpenSSL", "cryptography", "service_identity"}


def size_option(text: str) -> int:
    """A size option's bytes (``512KiB``, ``32MiB`` ...), or a usage error."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise usage.UsageError(str(error)) from None


def message_size_option(text: str) -> int:
    """``--max-message-bytes``: a size from 1 byte to what a frame can carry."""
    size = size_option(text)
    if size == 0:
        raise usage.UsageError("--max-message-bytes 0 would refuse every message but empty ones")
    if size > _LARGEST_MESSAGE:
        raise usage.UsageError(f"--max-message-bytes may be {_LARGEST_MESSAGE} at most")
    return size


def _count(text: str) -> int:
    if not text.isdigit():
        raise usage.UsageError(f"{text!r} is not a whole number")
    return int(text)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < math.inf:
        raise usage.UsageError(f"{text!r} is not a number of seconds")
    return seconds


def _positive_seconds(text: str) -> float:
    seconds = _seconds(text)
    if not seconds:
        raise usage.UsageError(f"{text!r}: want more than 0 seconds")
    return seconds


_positive_seconds.coerceDoc = ""  # type: ignore[attr-defined]
size_option.coerceDoc = "A size in bytes; KiB, MiB, GiB (and kB, MB, GB) may follow."  # type: ignore[attr-defined]
message_size_option.coerceDoc = size_option.coerceDoc  # type: ignore[attr-defined]
_count.coerceDoc = ""  # type: ignore[attr-defined]
_seconds.coerceDoc = ""  # type: ignore[attr-defined]


def listen_description(description: str, option: str = "--listen") -> str:
    """A ``--listen`` endpoint description, checked as Twisted will read it.

    A UNIX socket given no ``mode=`` gets :data:`UNIX_SOCKET_MODE`.

    :raises usage.UsageError: naming the description and what is wrong.
    """
    from twisted.internet import reactor

    try:
        # Builds the endpoint without listening: its arguments are checked,
        # and a TLS endpoint imports pyOpenSSL and reads its certificate.
        endpoint = serverFromString(reactor, description)
    except ImportError as error:
        if (error.name or "").partition(".")[0] in _TLS_MODULES:
            raise usage.UsageError(
                f"{option} {description!r}: TLS needs pyOpenSSL, which is not installed: "
                f"pip install 'mqmq[tls]'"
            ) from None
        raise usage.UsageError(f"{option} {description!r}: {error}") from None
    except OSError as error:  # a TLS certificate or key that cannot be read
        raise usage.UsageError(f"{option} {description!r}: {error}") from None
    except Exception as error:  # whatever an endpoint parser raises: ValueError, TypeError ...
        raise usage.UsageError(
            f"{option} {description!r}: not a valid endpoint description ({error})"
        ) from None
    # Twisted's own parser, to see the description exactly as it does.
    arguments, keywords = _parse(description)
    if isinstance(endpoint, UNIXServerEndpoint):
        # A mode may also come positionally, after the path.
        if "mode" not in keywords and len(arguments) < 3:
            return f"{description}:mode={UNIX_SOCKET_MODE:o}"
    elif arguments and arguments[0] == "tls" and len(arguments) > 1:
        # Twisted reads a tls: directory only as clients connect: a wrong
        # one would fail every handshake, with a warning each time.
        directory = arguments[1]
        if not os.path.isdir(directory):
            raise usage.UsageError(f"{option} {description!r}: no such directory: {directory}")
        if not any(name.endswith(".pem") for name in os.listdir(directory)):
            raise usage.UsageError(f"{option} {description!r}: no HOSTNAME.pem file in {directory}")
    return description


#: The option that names each file of :class:`mqmq.tls.TLSFileError`'s ``role``.
TLS_OPTIONS = {"certificate": "--cert", "key": "--key", "ca": "--ca"}


def import_tls(option: str) -> ModuleType:
    """:mod:`mqmq.tls`, or a usage error saying that ``option`` needs pyOpenSSL."""
    try:
        from mqmq import tls
    except ImportError as error:
        if (error.name or "").partition(".")[0] in _TLS_MODULES:
            raise usage.UsageError(f"{option}: TLS needs pyOpenSSL, which is not installed: "
                                   f"pip install 'mqmq[tls]'") from None
        raise
    return tls


def server_tls_option(
    cert: Optional[str], key: Optional[str], ca: Optional[str], has_addr: bool
) -> Optional[Any]:
    """``--cert``, ``--key``, ``--ca``: the TLS options of the ``--addr``
    listener (a ``CertificateOptions``), or None for plain TCP.

    :raises usage.UsageError: naming the option and the file, and what is wrong.
    """
    if cert is None:
        for name, value in (("--key", key), ("--ca", ca)):
            if value is not None:
                raise usage.UsageError(f"{name} needs --cert (the server's certificate)")
        return None
    if not has_addr:
        raise usage.UsageError("--cert serves TLS on --addr: give --addr too "
                               "(--listen endpoints are used as written)")
    tls = import_tls("--cert")
    try:
        return tls.server_tls(cert, key, ca)
    except tls.TLSFileError as error:
        raise usage.UsageError(f"{TLS_OPTIONS[error.role]} {error}") from None


_Method = TypeVar("_Method", bound=Callable[..., Any])


def one_line_help(method: _Method) -> _Method:
    """An option method whose docstring, its help, is printed as one paragraph
    (usage.Options keeps a docstring's line breaks and indentation)."""
    method.__doc__ = " ".join((method.__doc__ or "").split())
    return method


class VersionOption:
    """``--version`` says mqmq's version, not Twisted's."""

    def opt_version(self) -> None:
        """Display the mqmq version and exit."""
        sys.stdout.write(f"mqmq {__version__}\n")
        raise SystemExit(0)


class Options(VersionOption, usage.Options):
    """Options of the mqmq server, for ``twistd mqmq`` and ``mqmq start``."""

    synopsis = "[options]"
    longdesc = (
        "Runs an mqmq message-queue server, wire-compatible with the original "
        "Go mqmq. By default it listens on " + DEFAULT_ADDRESS + ". "
        "SIGHUP reopens the log file (as logrotate expects) and the server "
        "serves on."
    )

    optParameters: list[list[Any]] = [
        ["addr", "a", None,
         f"Listen on HOST:PORT ([HOST]:PORT for IPv6; an empty HOST for every "
         f"interface). [default: {DEFAULT_ADDRESS}, unless --listen is given]"],
        ["max-message-bytes", None, _DEFAULTS.max_message_bytes,
         "Largest message a Put may carry; a larger one is refused with "
         "REQUEST_MESSAGE_TOO_LARGE.", message_size_option],
        ["max-connections", None, _DEFAULTS.max_connections,
         "Most open client connections; a connection beyond is closed at once. "
         "0: no limit.", _count],
        ["max-queued-bytes", None, _DEFAULTS.max_queued_bytes,
         "Most bytes of messages held in all queues; a Put beyond is refused with "
         "SERVER_STORAGE_FULL. 0: no limit.", size_option],
        ["max-queued-messages", None, _DEFAULTS.max_queued_messages,
         "Most messages held in all queues; a Put beyond is refused with "
         "SERVER_STORAGE_FULL. 0: no limit.", _count],
        ["max-queues", None, _DEFAULTS.max_queues,
         "Most queues; a Put or Get naming a new queue beyond is refused with "
         "SERVER_TOO_MANY_QUEUES. 0: no limit.", _count],
        ["idle-timeout", None, _DEFAULTS.idle_timeout,
         "Close a connection silent for this many seconds with no Get waiting. "
         "0: never.", _seconds],
        ["max-pending-bytes", None, _DEFAULTS.max_pending_bytes,
         "Bytes of requests buffered behind a waiting Get before the server stops "
         "reading from that connection.", size_option],
        ["max-info-bytes", None, _DEFAULTS.max_info_bytes,
         "Largest Info reply; a larger one is refused with SERVER_INFO_TOO_LARGE "
         "(the default is the most one frame can carry).", size_option],
        ["max-deliveries", None, _DEFAULTS.max_deliveries,
         "Bury a message rather than hand it out (by Get or Reserve) once more after "
         "this many times: a poison message stops coming back; Kick brings buried "
         "ones back. 0: no limit.", _count],
        ["store", None, "memory:",
         f"Where messages are kept: {STORE_FORMS}. memory: holds them in this "
         "process only; sqlite:PATH keeps them in an SQLite database, across "
         "restarts and crashes; redis:// and redis+cluster:// keep them in Redis, "
         "shared by every mqmq server pointed at it."],
        ["redis-prefix", None, "mqmq:",
         "With a Redis store: the prefix of every key; servers with the same Redis "
         "and prefix share their queues."],
        ["redis-timeout", None, 2.0,
         "With a Redis store: seconds to wait for Redis before a request is refused "
         "with SERVER_STORAGE_ERROR.", _positive_seconds],
        ["log-format", None, "text",
         "How log lines are written: text, or json (one JSON object per line, "
         "for log shippers)."],
        ["log-level", None, "info",
         "The least level logged: debug, info, warn, error or critical."],
        ["fsync", None, "always",
         "With a durable store, when written messages reach the disk: always (before "
         "OK is answered), everysec (within a second), no (when the OS likes)."],
        ["cert", None, None,
         "Serve TLS on --addr with this PEM certificate (any intermediate ones "
         "after it). --listen endpoints are used as written."],
        ["key", None, None,
         "The private key of --cert, PEM. [default: found in the --cert file]"],
        ["ca", None, None,
         "With --cert: require every client to present a certificate signed by a "
         "CA in this PEM file; the TLS handshake refuses (and logs) all others."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["http"] = None

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if not _TWISTD_EXITS_0_ON_USAGE_ERRORS or not isinstance(
                getattr(self, "parent", None), app.ServerOptions
            ):
                raise
            # Printed as twistd prints it, but with the status 1 that the
            # README promises: a script or a service manager would take a
            # bad option for success.
            print(self.parent)
            print(f"{' '.join(sys.argv[0:2])}: {error}")
            raise SystemExit(1) from None

    @one_line_help
    def opt_listen(self, description: str) -> None:
        """Also listen on a Twisted endpoint (tcp6:, unix:, ssl: ...); repeatable.
        A unix: socket without mode= gets mode 660."""
        self["listen"].append(listen_description(description))

    opt_l = opt_listen

    @one_line_help
    def opt_http(self, description: str) -> None:
        """Serve metrics (/metrics, Prometheus's format), /stats (JSON) and the
        dashboard (/) over HTTP on a Twisted endpoint, e.g.
        tcp:9477:interface=127.0.0.1. [default: off]"""
        self["http"] = listen_description(description, "--http")

    def postOptions(self) -> None:
        endpoints: list[str] = list(self["listen"])
        if self["addr"] == "":
            raise usage.UsageError("--addr is empty (want HOST:PORT)")
        if self["addr"] is not None or not endpoints:
            try:
                address = parse_address(self["addr"] or DEFAULT_ADDRESS)
            except ValueError as error:
                raise usage.UsageError(str(error)) from None
            self["address"] = address
            endpoints.insert(0, address.server_endpoint())
        self["endpoints"] = endpoints
        if self["max-info-bytes"] < _SMALLEST_INFO:
            raise usage.UsageError(
                f"--max-info-bytes {self['max-info-bytes']} would refuse every Info "
                f"(the smallest reply is {_SMALLEST_INFO} bytes)"
            )
        if self["max-info-bytes"] > MAX_INFO_BYTES:
            raise usage.UsageError(f"--max-info-bytes may be {MAX_INFO_BYTES} at most")
        self._check_one_of("log-format", LOG_FORMATS)
        self._check_one_of("log-level", LOG_LEVELS)
        parent = getattr(self, "parent", None)
        if isinstance(parent, app.ServerOptions):
            self._log_through_twistd(parent)
        self._check_one_of("fsync", FSYNC_POLICIES)
        try:
            parse_store_description(self["store"])
        except ValueError as error:
            raise usage.UsageError(str(error)) from None
        self["limits"] = Limits(**{
            field.name: self[field.name.replace("_", "-")] for field in fields(Limits)
        })
        self["tls"] = server_tls_option(
            self["cert"], self["key"], self["ca"], has_addr="address" in self
        )

    def _check_one_of(self, name: str, choices: Sequence[str]) -> None:
        if self[name] not in choices:
            raise usage.UsageError(f"--{name} {self[name]!r}: want one of {', '.join(choices)}")

    def _log_through_twistd(self, twistd: app.ServerOptions) -> None:
        # twistd makes its log observer once the options are read, from
        # its own "logger" option if set: ours wraps the one it would make.
        if twistd.get("logger") is not None:
            return  # the user's own --logger has the last word
        if self["log-format"] == "json" and twistd.get("syslog"):
            raise usage.UsageError("--log-format json writes lines to a file or standard output, not to syslog")
        twistd["logger"] = log_through_twistd(twistd, self["log-format"], self["log-level"])


def _allow_open_files(count: int) -> None:
    # Each TCP connection is two file descriptors (the second tells, after
    # the connection broke, which replies the peer acknowledged: see
    # mqmq.server.writer); the usual soft limit of 1024 would refuse connections
    # long before --max-connections does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * count + 64 if count else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


def server_endpoints(options: Options, reactor: Any) -> list[Union[str, IStreamServerEndpoint]]:
    """Where the server listens: ``--addr`` (first, and TLS with ``--cert``), then ``--listen``."""
    endpoints: list[Union[str, IStreamServerEndpoint]] = list(options["endpoints"])
    if options["tls"] is not None:
        from mqmq.tls import TLSServerEndpoint

        endpoints[0] = TLSServerEndpoint(serverFromString(reactor, options["endpoints"][0]), options["tls"])
    return endpoints


def make_server(options: Options, reactor: Any) -> MQService:
    """The server the options describe: a broker listening on every endpoint."""
    limits: Limits = options["limits"]
    _allow_open_files(limits.max_connections)
    store = store_from_description(options["store"], options["fsync"], reactor,
                                   options["redis-prefix"], options["redis-timeout"])
    server = MQService(reactor, server_endpoints(options, reactor), limits, store)
    if options["http"] is not None:
        from mqmq.web.site import site

        server.serve_also(serverFromString(reactor, options["http"]), site(server))
    return server


def addresses(server: MQService) -> str:
    """Where ``server`` listens, as people write it: ``127.0.0.1:47774, unix:/path``."""
    return ", ".join(describe(port.getHost()) for port in server.ports)


def log_started(log: Logger, server: MQService) -> None:
    """Say where a server that has started serves."""
    log.info("starting server: {address}", address=addresses(server))
    for port in server.other_ports:
        log.info("serving metrics and the dashboard over HTTP: {address}", address=describe(port.getHost()))


class StartFailed(SystemExit, Exception):
    """The server could not start; the reason is logged already.

    An ``Exception``, so that ``twistd`` cleans up as after any failed start
    (removes its PID file, tells a daemon's waiting parent); a
    ``SystemExit``, so that the process then ends with status 1 and no
    traceback.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(1)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def _twistd_log_file() -> Optional[BaseLogFile]:
    """The log file ``twistd`` writes to, if it writes to one.

    ``twistd`` keeps it nowhere public: only its SIGUSR1 handler, which
    rotates it, holds it.  None when logging to standard output or syslog.
    """
    handler = signal.getsignal(signal.SIGUSR1)
    if not inspect.isfunction(handler):
        return None
    for value in inspect.getclosurevars(handler).nonlocals.values():
        if isinstance(value, BaseLogFile):
            return value
    return None


_SignalHandler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


class TwistdServer(service.MultiService):
    """The server as ``twistd mqmq`` runs it, as a daemon should run.

    A failed start is one error line in the log and exit status 1.  SIGHUP
    reopens twistd's log file (after logrotate moved it away) and the server
    serves on.  These are the process's business, so they live here and
    not in :class:`~mqmq.server.service.MQService`, which applications embed.
    """

    log = Logger()

    def __init__(self, server: MQService) -> None:
        super().__init__()
        self.server = server
        server.setServiceParent(self)
        self._log_file: Optional[BaseLogFile] = None
        self._previous_hangup: _SignalHandler = None

    def privilegedStartService(self) -> None:
        # Before listening: a SIGHUP as soon as the port accepts must not kill.
        self._log_file = _twistd_log_file()
        self._previous_hangup = signal.signal(signal.SIGHUP, self._hangup)
        try:
            super().privilegedStartService()
        except Exception as error:
            self._cannot_start(error)

    def startService(self) -> None:
        try:
            super().startService()
        except Exception as error:
            self._cannot_start(error)
        log_started(self.log, self.server)

    def _cannot_start(self, error: Exception) -> NoReturn:
        self.log.error("cannot start server: {error}", error=error)
        raise StartFailed(str(error))

    def stopService(self) -> defer.Deferred[None]:
        stopped = defer.maybeDeferred(super().stopService)

        def restore_hangup(result: object) -> object:
            # Not before: a SIGHUP while connections close must not kill.
            previous = self._previous_hangup
            signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
            return result

        return stopped.addBoth(restore_hangup).addCallback(lambda _: None)

    def _hangup(self, number: int, frame: Optional[FrameType]) -> None:
        self.server.reactor.callFromThread(self._reopen_log)

    def _reopen_log(self) -> None:
        log_file = self._log_file
        if log_file is None:
            self.log.info("received SIGHUP: no log file to reopen, serving on")
            return
        # Reopening closes the file first: if the new one cannot be made, keep the old.
        exists = os.path.exists(log_file.path)
        if not os.access(log_file.path if exists else log_file.directory, os.W_OK):
            self.log.error("received SIGHUP: cannot reopen the log file {path}: not writable; "
                           "still writing to the one open", path=log_file.path)
            return
        log_file.reopen()
        self.log.info("received SIGHUP: reopened the log file {path}, serving on", path=log_file.path)


def makeService(options: Options, reactor: Optional[Any] = None) -> TwistdServer:
    """The server ``twistd mqmq`` runs."""
    if reactor is None:
        from twisted.internet import reactor
    return TwistdServer(make_server(options, reactor))
