"""The ``mqmq`` command: run a server, or talk to one from a shell."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from types import FrameType
from typing import Any, Callable, NoReturn, Optional, Sequence, TextIO

from twisted.application import reactors
from twisted.internet import defer, task
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    globalLogBeginner,
)
from twisted.python import usage
from zope.interface import provider

from mqmq import errors
from mqmq.server import tap
from mqmq.server.logs import json_observer
from mqmq.server import reactor as lean_reactor
from mqmq.address import DEFAULT_ADDRESS, parse_address
from mqmq.client import MQClient, connect
from mqmq.wire.codec import MAX_MESSAGE_LENGTH, MAX_QUEUE_NAME_LENGTH

#: Exit status of ``mqmq get`` when no message arrived before the timeout.
EXIT_TIMEOUT = 3
#: Exit status for a failure: refused connection, server error and the like.
EXIT_FAILURE = 1
#: Exit status for bad arguments.
EXIT_USAGE = 2
#: Exit status after Ctrl-C (SIGINT), as the shell reports a command it ended.
EXIT_INTERRUPTED = 128 + signal.SIGINT

log = Logger(namespace="mqmq")

#: Bytes read from standard input at a time.
_READ_SIZE = 1024 * 1024

# Go's signal names, as the original logs them.
_SIGNAL_NAMES = {signal.SIGINT: "interrupt", signal.SIGTERM: "terminated", signal.SIGHUP: "hangup"}

_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration such as ``300ms``, ``1.5s`` or ``1m30s``.

    :raises ValueError: for anything Go's ``time.ParseDuration`` refuses.
    """
    body = text.lstrip("+-")
    sign = -1.0 if text.startswith("-") else 1.0
    if body == "0":
        return 0.0
    seconds = 0.0
    position = 0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        if match is None or match.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r} (want e.g. 500ms, 2s, 1m30s)")
        seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not body or len(text) - len(body) > 1:
        raise ValueError(f"invalid duration {text!r} (want e.g. 500ms, 2s, 1m30s)")
    return sign * seconds


class _AddressOptions(tap.VersionOption, usage.Options):
    optParameters: list[list[Any]] = [
        ["addr", "a", DEFAULT_ADDRESS, "Server address HOST:PORT."],
        ["cert", None, None, "Connect with TLS, presenting this PEM client certificate."],
        ["key", None, None, "The private key of --cert, PEM. [default: found in the --cert file]"],
        ["ca", None, None,
         "Connect with TLS, trusting a server certificate that a CA in this PEM file "
         "signed (it must name the --addr host); with --cert alone, the system's CAs."],
    ]

    def postOptions(self) -> None:
        if not self["addr"]:
            raise usage.UsageError("--addr is empty (want HOST:PORT)")
        try:
            address = parse_address(self["addr"])
        except ValueError as error:
            raise usage.UsageError(str(error)) from None
        self["tls"] = _client_tls(address.host or "127.0.0.1", self["cert"], self["key"], self["ca"])


def _client_tls(
    host: str, cert: Optional[str], key: Optional[str], ca: Optional[str]
) -> Optional[IOpenSSLClientConnectionCreator]:
    """``--cert``, ``--key``, ``--ca``: how to connect with TLS, or None for plain TCP."""
    if cert is None and ca is None:
        if key is not None:
            raise usage.UsageError("--key needs --cert (the client's certificate)")
        return None
    tls = tap.import_tls("--cert" if cert is not None else "--ca")
    try:
        return tls.client_tls(host, cert, key, ca)
    except tls.TLSFileError as error:
        raise usage.UsageError(f"{tap.TLS_OPTIONS[error.role]} {error}") from None


def _queue_name(text: str) -> bytes:
    # The bytes the shell passed, even where they are not UTF-8 (os.fsencode
    # undoes the surrogate escapes Python decoded them with).
    name = os.fsencode(text)
    if len(name) > MAX_QUEUE_NAME_LENGTH:
        raise usage.UsageError(
            f"queue name of {len(name)} bytes, longest is {MAX_QUEUE_NAME_LENGTH}"
        )
    return name


_MAX_MESSAGE_OPTION = [
    "max-message-bytes", None, MAX_MESSAGE_LENGTH,
    "Largest message to send or take, for servers that allow more than the "
    "protocol's 32 MiB.", tap.message_size_option,
]


#: The reactor ``mqmq start`` runs on unless told otherwise.
DEFAULT_REACTOR = "mqmq-epoll" if lean_reactor.available() else "default"


class StartOptions(tap.Options):
    synopsis = "[options]"
    longdesc = (
        "Runs the server until SIGINT or SIGTERM; SIGHUP is logged and the "
        "server serves on."
    )

    def __init__(self) -> None:
        super().__init__()
        self["reactor"] = DEFAULT_REACTOR

    @tap.one_line_help
    def opt_reactor(self, name: str) -> None:
        """The Twisted reactor to run on, as twistd -r names them (twistd
        --help-reactors lists them); mqmq-epoll, the default on Linux, is
        epoll without the per-event logging context. [default: %s]"""
        known = {installer.shortName for installer in reactors.getReactorTypes()}
        if name not in known | {"mqmq-epoll"}:
            raise usage.UsageError(
                f"unknown reactor {name!r} (one of: {', '.join(sorted(known))})"
            )
        if name == "mqmq-epoll" and not lean_reactor.available():
            raise usage.UsageError("the mqmq-epoll reactor needs epoll (Linux)")
        self["reactor"] = name

    opt_reactor.__doc__ = (opt_reactor.__doc__ or "") % DEFAULT_REACTOR


class InfoOptions(_AddressOptions):
    synopsis = "[--addr HOST:PORT]"
    longdesc = "Prints the server's connections, queues and message counts."


class PutOptions(_AddressOptions):
    synopsis = "[--addr HOST:PORT] [--max-message-bytes SIZE] QUEUE [MESSAGE]"
    longdesc = "Puts MESSAGE (standard input when MESSAGE is - or missing) on QUEUE."
    optParameters: list[list[Any]] = [_MAX_MESSAGE_OPTION]

    def parseArgs(self, queue: str, message: Optional[str] = None) -> None:  # type: ignore[override]
        self["queue"] = _queue_name(queue)
        self["message"] = None if message in (None, "-") else os.fsencode(message)

    def postOptions(self) -> None:
        super().postOptions()
        message = self["message"]
        if message is not None and len(message) > self["max-message-bytes"]:
            raise usage.UsageError(
                f"message too large: {len(message)} bytes, "
                f"--max-message-bytes is {self['max-message-bytes']}"
            )


class GetOptions(_AddressOptions):
    synopsis = "[--addr HOST:PORT] [--timeout DURATION] [--no-ack] [--max-message-bytes SIZE] QUEUE"
    longdesc = (
        "Takes the oldest message of QUEUE and writes its bytes to standard "
        "output, waiting up to DURATION for one. Exits with status "
        f"{EXIT_TIMEOUT} if none arrived in time. The message is reserved, and "
        "acknowledged only once written and flushed: if writing fails it goes "
        "back to the queue. A server without acknowledged delivery (the "
        "original mqmq) is asked with a plain Get."
    )
    optParameters: list[list[Any]] = [
        ["timeout", "t", "0s", "How long to wait for a message: a Go duration such as 500ms, 5s, 1m."],
        _MAX_MESSAGE_OPTION,
    ]
    optFlags = [
        ["no-ack", None, "Take it with a plain Get: removed as it is sent, whatever becomes of it."],
    ]

    def parseArgs(self, queue: str) -> None:  # type: ignore[override]
        self["queue"] = _queue_name(queue)

    def postOptions(self) -> None:
        super().postOptions()
        try:
            self["seconds"] = parse_duration(self["timeout"])
        except ValueError as error:
            raise usage.UsageError(str(error)) from None
        if self["seconds"] > 3600:
            raise usage.UsageError(f"timeout {self['timeout']} is above one hour")


class KickOptions(_AddressOptions):
    synopsis = "[--addr HOST:PORT] QUEUE [COUNT]"
    longdesc = ("Brings back up to COUNT (default 1) buried messages of QUEUE, the oldest "
                "first, to its back; prints how many came back.")

    def parseArgs(self, queue: str, count: str = "1") -> None:  # type: ignore[override]
        self["queue"] = _queue_name(queue)
        if not (count.isascii() and count.isdigit()) or int(count) < 1:
            raise usage.UsageError(f"COUNT must be a whole number of messages, 1 or more, not {count!r}")
        self["count"] = int(count)


class Options(tap.VersionOption, usage.Options):
    synopsis = "mqmq"
    longdesc = (
        "Usage: mqmq COMMAND [options]; mqmq COMMAND --help for each. "
        "Long options may be written Go-style, with one dash: -addr HOST:PORT."
    )
    subCommands = [
        ["start", None, StartOptions, "Run a server."],
        ["info", None, InfoOptions, "Show a server's connections, queues and messages."],
        ["put", None, PutOptions, "Put a message on a queue."],
        ["get", None, GetOptions, "Take a message from a queue."],
        ["kick", None, KickOptions, "Bring buried messages back to a queue."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("missing command: one of start, info, put, get, kick")


def _go_style_flags(argv: Sequence[str]) -> list[str]:
    """Accept the original's one-dash long flags (``-addr``) beside ``--addr``."""
    return [
        "-" + argument if re.match(r"-[a-z][a-z-]+(=|\Z)", argument) else argument
        for argument in argv
    ]


@provider(ILogObserver)
def _go_log_line(event: dict[str, Any], stream: TextIO = sys.stderr) -> None:
    # Go's log package: "2009/11/10 23:00:00 INFO: message".
    level = event.get("log_level", LogLevel.info)
    label = {LogLevel.warn: "WARNING", LogLevel.error: "ERROR", LogLevel.critical: "ERROR"}.get(
        level, level.name.upper()
    )
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(event.get("log_time", time.time())))
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None and level >= LogLevel.error:
        text += f": {failure.getErrorMessage()}"
    stream.write(f"{stamp} {label}: {text}\n")
    stream.flush()


def _install_reactor(name: str) -> None:
    if "twisted.internet.reactor" in sys.modules:
        return  # one was installed already (embedded, or in a test): keep it
    if name == "mqmq-epoll":
        lean_reactor.install()
    else:
        reactors.installReactor(name)


def _start(options: StartOptions) -> NoReturn:
    _install_reactor(options["reactor"])
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor

    # Twisted's own chatter (a factory starting ...) from warnings up; ours
    # from the level asked for (info by default).
    level = LogLevel.levelWithName(options["log-level"])
    levels = LogLevelFilterPredicate(defaultLogLevel=max(level, LogLevel.warn))
    levels.setLogLevelForNamespace("mqmq", level)
    write: ILogObserver = json_observer(sys.stderr) if options["log-format"] == "json" else _go_log_line
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(write, [levels])], redirectStandardIO=False)
    server = tap.make_server(options, reactor)

    def stop(signal_name: str) -> None:
        log.info("received signal: {signal}", signal=signal_name)
        stopping = defer.maybeDeferred(server.stopService)
        stopping.addBoth(lambda _: reactor.stop())

    def on_signal(number: int, _frame: Optional[FrameType]) -> None:
        name = _SIGNAL_NAMES.get(signal.Signals(number), signal.Signals(number).name)
        reactor.callFromThread(stop, name)

    def on_hangup(_number: int, _frame: Optional[FrameType]) -> None:
        # Logging goes to standard error: there is no log file to reopen.
        reactor.callFromThread(log.info, "received signal: {signal}", signal="hangup")

    # Before listening: a signal sent as soon as the port accepts must still
    # stop the server in order, not kill it with the default action.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        server.privilegedStartService()
        server.startService()
    except Exception as error:  # a taken port, a port not ours to take: say so and leave
        _fail(f"cannot start server: {error}")
    addresses = tap.addresses(server)
    tap.log_started(log, server)
    reactor.run(installSignalHandlers=False)
    log.info("server stopped: {address}", address=addresses)
    raise SystemExit(0)


def _write_output(write: Callable[[], object]) -> None:
    """Write to standard output and flush; a failure is one ``mqmq:`` line."""
    failed = _try_output(write)
    if failed is not None:
        _fail(failed)


def _try_output(write: Callable[[], object]) -> Optional[str]:
    """Write to standard output and flush; what went wrong, if anything."""
    try:
        write()
        sys.stdout.flush()
    except OSError as error:
        # What could not go out stays in Python's buffers; at exit Python
        # would try again and print "Exception ignored".  Send it nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return f"cannot write to standard output: {error.strerror or error}"
    return None


#: Seconds ``mqmq get`` holds a reservation while it writes the message out.
GET_LEASE = 300.0


async def _get(reactor: Any, client: MQClient, sub: usage.Options) -> MQClient:
    """``mqmq get``: reserve, write, then ack (or a plain Get); returns the
    client to disconnect (a new one if the server refused Reserve)."""
    try:
        if not sub["no-ack"]:
            try:
                delivery = await client.reserve(sub["queue"], sub["seconds"], GET_LEASE)
            except errors.AcknowledgedDeliveryUnsupported:
                # The original server closed the connection: ask again, plainly.
                client = await connect(
                    reactor, sub["addr"], max_message_bytes=sub["max-message-bytes"], tls=sub["tls"]
                )
            else:
                failed = _try_output(lambda: sys.stdout.buffer.write(delivery.message))
                if failed is not None:
                    # Not written: back to its queue for someone else.
                    await delivery.release()
                    await client.disconnect()
                    _fail(failed + " (the message was given back to the server)")
                await delivery.ack()
                return client
        message_bytes = await client.get(sub["queue"], sub["seconds"])
    except errors.GetTimeout:
        await client.disconnect()
        raise SystemExit(EXIT_TIMEOUT)
    _write_output(lambda: sys.stdout.buffer.write(message_bytes))
    return client


def _read_message(limit: int) -> bytes:
    """Standard input, up to ``limit`` bytes; more is refused before it is read."""
    # In pieces, from the descriptor itself: sys.stdin.buffer.read(limit + 1)
    # would set aside the whole limit at once.
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            chunk = os.read(0, min(_READ_SIZE, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        _fail(f"cannot read standard input: {error.strerror or error}")
    if size > limit:
        _fail(f"message too large: more than {limit} bytes (--max-message-bytes)")
    return b"".join(chunks)


def _server_error(error: errors.MQError, command: Optional[str], message_size: int) -> str:
    if isinstance(error, errors.ServerError) and error.error_type == errors.MESSAGE_TOO_LARGE:
        return f"message too large: the server refused {message_size} bytes ({error.error_type})"
    if isinstance(error, errors.ConnectionClosed) and command == "put" and message_size > MAX_MESSAGE_LENGTH:
        # Frames past the protocol's largest close the connection, unanswered.
        return (f"message too large: the server closed the connection on {message_size} bytes "
                f"(the protocol's limit is {MAX_MESSAGE_LENGTH})")
    return str(error)


async def _client_command(reactor: Any, options: usage.Options, message: Optional[bytes]) -> None:
    command = options.subCommand
    sub = options.subOptions
    try:
        client: MQClient = await connect(
            reactor, sub["addr"], max_message_bytes=sub.get("max-message-bytes", MAX_MESSAGE_LENGTH),
            tls=sub["tls"],
        )
    except Exception as error:
        _fail(f"cannot connect to {sub['addr']}: {error}")
    try:
        if command == "info":
            text = (await client.info()).format_text()
            _write_output(lambda: sys.stdout.write(text))
        elif command == "put":
            assert message is not None
            await client.put(sub["queue"], message)
        elif command == "get":
            client = await _get(reactor, client, sub)
        elif command == "kick":
            kicked = await client.kick(sub["queue"], sub["count"])
            _write_output(lambda: sys.stdout.write(f"{kicked}\n"))
        await client.disconnect()
    except errors.MQError as error:
        _fail(_server_error(error, command, len(message or b"")))


def _fail(message: str, status: int = EXIT_FAILURE) -> NoReturn:
    sys.stderr.write(f"mqmq: {message}\n")
    raise SystemExit(status)


def _interrupted(_number: int, _frame: Optional[FrameType]) -> NoReturn:
    # Ctrl-C ends a client command at once and quietly, as it does a shell
    # tool, wherever it is: reading standard input, connecting, waiting.
    # Not through the reactor, which would go on reading standard input,
    # or report the connection it closes as a failure.
    os._exit(EXIT_INTERRUPTED)


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Entry point of the ``mqmq`` command."""
    options = Options()
    try:
        options.parseOptions(_go_style_flags(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as error:
        _fail(f"{error} (see mqmq --help)", EXIT_USAGE)
    if options.subCommand == "start":
        _start(options.subOptions)
    # Left alone when ignored, as in a background job of a script.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)
    message: Optional[bytes] = None
    if options.subCommand == "put":
        # Read before the reactor runs: a blocking read inside it would hold
        # up everything, Ctrl-C included.
        message = options.subOptions["message"]
        if message is None:
            message = _read_message(options.subOptions["max-message-bytes"])
    task.react(lambda reactor: defer.ensureDeferred(_client_command(reactor, options, message)))
    raise AssertionError("react() returned")  # pragma: no cover
