"""The SQLite store: every queue in one SQLite database (WAL mode), written by group commit in a thread.

The reactor thread never writes.  Changes made while handling requests
(a message added, taken, put back; a queue made or forgotten) are recorded
in the open :class:`~mqmq.stores.base.Batch`; at the next turn of the
reactor the batch goes to the store's one writer thread as one
transaction.  While it is written the next batch gathers, so a busy server
writes large transactions and an idle one small ones (group commit).
Replies that depend on a batch are sent when it is written.

Each queue keeps a window of its oldest messages in memory (read back at
start-up, refilled by a reader thread), so ``Get`` never waits for the disk.

Acknowledged delivery is durable too: a reserved message keeps its row,
its deliveries counted there, until it is acked; released, it is moved to
the front; buried, it moves to the ``buried`` table, and kicked, back to the
back of ``messages``.  After a restart reserved messages are ready again
where they were (at the front) with their counts, and buried ones buried.
``Ack``, ``Release``, ``Bury`` and ``Kick`` are answered once written, as a
``Put`` is.

``--fsync`` decides when a written batch reaches the disk:

- ``always``: each commit is synced (SQLite's ``synchronous=FULL``) before
  its replies go out;
- ``everysec``: commits are not synced (``synchronous=NORMAL``) and the
  database and its WAL are synced once a second;
- ``no``: commits are not synced; the OS writes when it likes (SQLite still
  syncs when it checkpoints the WAL into the database).

With every setting a reply waits for the commit, so a crash of the process
(kill -9) loses nothing answered ``OK``.

When a write fails (disk full, I/O error) the messages the batch added are
dropped and their ``Put``s answered ``SERVER_STORAGE_ERROR``; the rest of
it (removals, messages put back, queues) is kept and tried again once a
second, new ``Put``s are refused meanwhile, and messages already stored
are still delivered.  The first write that succeeds ends it.
"""

from __future__ import annotations

import os
import sqlite3
from collections import deque
from array import array
from itertools import chain
from time import perf_counter
from typing import Any, Callable, Iterable, NamedTuple, Optional, cast

from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqmq.errors import StoreError
from mqmq.stores.base import Batch, Entry, StoredQueue
from mqmq.stores.health import StoreHealth
from mqmq.stores.worker import WorkerThread

#: The layout this code writes (``PRAGMA user_version``); a database with a
#: higher one came from a newer mqmq and is refused.
SCHEMA_VERSION = 2
FSYNC_POLICIES = ("always", "everysec", "no")
#: Message ids are reserved this many at a time in the database.
ID_BLOCK = 100_000
#: While writes fail, how often they are tried again (seconds).
RETRY_SECONDS = 1.0
#: With ``everysec``, how often written data is synced (seconds).
SYNC_SECONDS = 1.0
#: A queue's window: at most this many of its oldest messages, and this many
#: bytes of them (but always one), are kept in memory; the rest on disk.
WINDOW_MESSAGES = 2000
WINDOW_BYTES = 1024 * 1024
#: The window is refilled from the disk when it holds this many or fewer.
WINDOW_REFILL_BELOW = WINDOW_MESSAGES // 2

_SCHEMA = """
CREATE TABLE queues (
    id INTEGER PRIMARY KEY,
    name BLOB NOT NULL UNIQUE
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    queue INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX messages_in_order ON messages (queue, pos);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('next_id', 1);
"""

#: From layout 1 to 2 (acknowledged delivery): how many times each message
#: was handed out, and the buried messages, in the order they were buried
#: (``seq``).  A reserved message stays in ``messages`` (at the front, where
#: it was taken from) until it is acked: after a restart it is ready again.
_SCHEMA_2 = """
ALTER TABLE messages ADD COLUMN deliveries INTEGER NOT NULL DEFAULT 0;
CREATE TABLE buried (
    id INTEGER PRIMARY KEY,
    queue INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    deliveries INTEGER NOT NULL
);
CREATE INDEX buried_in_order ON buried (queue, seq);
"""


#: Most rows written by one statement.  The writer thread needs the GIL to
#: bind a statement's values and gives it up while SQLite runs it: one
#: statement a row (executemany) meant waiting for the reactor thread's GIL
#: once a row.  Measured with 16 pipelining producers and 16 consumers
#: (benchmarks/durable.py's workload, --fsync always): the writer thread's
#: time in its statements went from 5.0 to 4.3 s for 200,000 messages.
ROWS_PER_STATEMENT = 128


#: A message's row: id, queue, pos, body, deliveries.
_Row = tuple[int, int, int, bytes, int]


def _insert_rows(db: sqlite3.Connection, rows: list[_Row]) -> None:
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start:start + ROWS_PER_STATEMENT]
        db.execute("INSERT INTO messages (id, queue, pos, body, deliveries) VALUES "
                   + ",".join(["(?,?,?,?,?)"] * len(chunk)), list(chain.from_iterable(chunk)))


def _delete_rows(db: sqlite3.Connection, ids: list[int]) -> None:
    for start in range(0, len(ids), ROWS_PER_STATEMENT):
        chunk = ids[start:start + ROWS_PER_STATEMENT]
        db.execute("DELETE FROM messages WHERE id IN (" + ",".join(["?"] * len(chunk)) + ")", chunk)


def _move_rows(db: sqlite3.Connection, moves: list[tuple[int, int, int, int]]) -> None:
    for kind, message_id, place, deliveries in moves:
        if kind == _BURY:
            db.execute("INSERT INTO buried (id, queue, seq, body, deliveries) "
                       "SELECT id, queue, ?, body, ? FROM messages WHERE id = ?", (place, deliveries, message_id))
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        else:
            db.execute("INSERT INTO messages (id, queue, pos, body, deliveries) "
                       "SELECT id, queue, ?, body, 0 FROM buried WHERE id = ?", (place, message_id))
            db.execute("DELETE FROM buried WHERE id = ?", (message_id,))


def _update_rows(db: sqlite3.Connection, updates: dict[int, tuple[Optional[int], int]]) -> None:
    moved = [(pos, deliveries, i) for i, (pos, deliveries) in updates.items() if pos is not None]
    if moved:
        db.executemany("UPDATE messages SET pos = ?, deliveries = ? WHERE id = ?", moved)
    if len(moved) < len(updates):
        db.executemany("UPDATE messages SET deliveries = ? WHERE id = ?",
                       [(deliveries, i) for i, (pos, deliveries) in updates.items() if pos is None])


class SqliteQueue:
    """One queue: a window of its oldest messages in memory, the rest on disk.

    ``pos`` orders a queue's rows: new messages go after the last, messages
    put back before the first.  While the queue is short every message is
    in the window.  Once the window holds :data:`WINDOW_MESSAGES` messages
    or :data:`WINDOW_BYTES` bytes, new messages *spill*: they are kept in
    memory only until the batch that writes them is written, and from then
    on are on disk alone.  As consumers drain the window it is refilled
    from the disk, oldest first, then from the spilled messages not yet
    written.  So memory does not grow with what a queue holds.

    A read from the disk (at most a window) runs in the store's reader
    thread, started when the window is down to :data:`WINDOW_REFILL_BELOW`
    messages, so the reactor never waits for the disk.  Should consumers
    empty the window before the read is back, :meth:`pop` answers ``None``
    and the store calls ``arrived`` once the messages are in.

    Acknowledged delivery: a reserved message keeps its row (its deliveries
    counted there) until it is acked, and a released one goes back to the
    front of the window with a new ``pos`` before the first.  A buried one
    moves to the ``buried`` table; only its id and size stay in memory.
    Kicked back, it goes to the back as a message whose body is on disk
    alone (spilled without a body): it is read like any other.
    """

    __slots__ = ("name", "queue_id", "num_bytes", "_ids", "_messages", "_window_bytes",
                 "_delivered", "_spilled", "_on_disk", "_tail_pos", "_front", "_back", "_store",
                 "_reading", "_starved", "_buried_ids", "_buried_sizes", "_buried_first",
                 "buried_bytes", "_buried_seq")

    def __init__(self, store: SqliteStore, name: bytes, queue_id: int) -> None:
        self.name = name
        self.queue_id = queue_id
        #: Bytes of all its ready messages: in the window, spilled and on disk.
        self.num_bytes = 0
        # The window, oldest first.
        self._ids: deque[int] = deque()
        self._messages: deque[bytes] = deque()
        self._window_bytes = 0
        # How many times the messages in the window were handed out, for
        # those that were (released, or read back after a restart).
        self._delivered: dict[int, int] = {}
        # Spilled messages whose batch is not yet written: (id, pos, message,
        # batch); message None for a kicked one (its body is on disk).
        self._spilled: deque[tuple[int, int, Optional[bytes], Batch]] = deque()
        # Messages on disk alone, after the window and before the spilled ones.
        self._on_disk = 0
        # The pos of the newest message read into the window: the disk is
        # read after it.
        self._tail_pos = 0
        self._front = 0
        self._back = 0
        self._store = store
        # A read from the disk is on its way.
        self._reading = False
        # pop() answered None while messages were on disk: the store owes
        # the broker an `arrived`.
        self._starved = False
        # Buried messages, oldest first, from _buried_first on: ids and sizes.
        self._buried_ids = array("q")
        self._buried_sizes = array("q")
        self._buried_first = 0
        #: Bytes of its buried messages.
        self.buried_bytes = 0
        self._buried_seq = 0

    def __len__(self) -> int:
        return len(self._messages) + len(self._spilled) + self._on_disk

    def push(self, message: bytes) -> int:
        store = self._store
        message_id = store._next_id
        store._next_id = message_id + 1
        self._back = pos = self._back + 1
        size = len(message)
        self.num_bytes += size
        if self._on_disk or self._spilled or (
            self._messages and (len(self._messages) >= WINDOW_MESSAGES
                                or self._window_bytes + size > WINDOW_BYTES)
        ):
            write = store._record_insert(message_id, (message_id, self.queue_id, pos, message, 0), fresh=True)
            self._spilled.append((message_id, pos, message, write.batch))
            write.spilled.add(self)
            return message_id
        self._ids.append(message_id)
        self._messages.append(message)
        self._window_bytes += size
        self._tail_pos = pos
        store._record_insert(message_id, (message_id, self.queue_id, pos, message, 0), fresh=True)
        return message_id

    def push_front(self, message: bytes) -> None:
        store = self._store
        message_id = store._next_id
        store._next_id = message_id + 1
        self._to_front(message_id, message)
        store._record_insert(message_id, (message_id, self.queue_id, self._front, message, 0), fresh=False)

    def _to_front(self, message_id: int, message: bytes) -> None:
        # (_tail_pos stays: rows before it that are not in the window are
        # gone or reserved, and a read must never take a reserved one.)
        self._front -= 1
        self._ids.appendleft(message_id)
        self._messages.appendleft(message)
        self._window_bytes += len(message)
        self.num_bytes += len(message)

    def pop(self) -> Optional[bytes]:
        taken = self._take()
        if taken is None:
            return None
        message_id, message = taken
        self._delivered.pop(message_id, None)
        self._store._record_delete(message_id)
        return message

    def _take(self) -> Optional[tuple[int, bytes]]:
        """The oldest message at hand, out of the window (nothing recorded)."""
        messages = self._messages
        if len(messages) <= WINDOW_REFILL_BELOW and (self._on_disk or self._spilled) and not self._reading:
            self._refill()
        if not messages:
            if self._on_disk or self._spilled:
                # Owed an `arrived` once they are in (read, or written and
                # then read: a kicked message's body is on disk alone).
                self._starved = True
            return None
        message_id = self._ids.popleft()
        message = messages.popleft()
        self._window_bytes -= len(message)
        self.num_bytes -= len(message)
        return message_id, message

    def _refill(self) -> None:
        """Fill the window from the disk (a read, maybe in another thread),
        or, once nothing is on disk alone, from the spilled messages."""
        if not self._on_disk:
            self._take_spilled()
            return
        room = WINDOW_MESSAGES - len(self._messages)
        if room > 0:
            self._reading = True
            self._store._read_for(self, room, WINDOW_BYTES - self._window_bytes)

    def _take_spilled(self) -> None:
        spilled = self._spilled
        room = WINDOW_MESSAGES - len(self._messages)
        while spilled and room > 0:
            message_id, pos, message, _ = spilled[0]
            if message is None or (self._messages and self._window_bytes + len(message) > WINDOW_BYTES):
                break  # (a kicked one: read once written)
            spilled.popleft()
            self._take_in(message_id, pos, message, 0)
            room -= 1

    def _read_done(self, rows: list[tuple[int, int, bytes, int]]) -> None:
        """Take in what a read found: the oldest messages after the window."""
        self._reading = False
        spilled = self._spilled
        for message_id, pos, body, deliveries in rows:
            if spilled and spilled[0][0] == message_id:
                # Written a moment ago; the news has not reached us yet.
                spilled.popleft()
            else:
                self._on_disk -= 1
            self._take_in(message_id, pos, body, deliveries)
        if not self._on_disk:
            # Older messages are all in: the spilled ones may follow.
            self._take_spilled()
        self._tell_if_starved()

    def _tell_if_starved(self) -> None:
        if self._starved and self._messages:
            self._starved = False
            # From the reactor, not from within the broker's call that may
            # have run this read at once.
            self._store._reactor.callLater(0, self._store._tell_arrived, self.name)

    def _take_in(self, message_id: int, pos: int, message: bytes, deliveries: int) -> None:
        self._ids.append(message_id)
        self._messages.append(message)
        self._window_bytes += len(message)
        self._tail_pos = pos
        if deliveries:
            self._delivered[message_id] = deliveries

    def _written(self) -> None:
        """Spilled messages whose batch is written are on disk alone now."""
        spilled = self._spilled
        while spilled and spilled[0][3].done:
            spilled.popleft()
            self._on_disk += 1
        if self._starved and self._on_disk and not self._reading:
            self._refill()

    def _drop(self, message_id: int) -> Optional[bytes]:
        """Remove a message whose Put was not written; it is near the back."""
        spilled = self._spilled
        for index in range(len(spilled) - 1, -1, -1):
            if spilled[index][0] == message_id:
                message = spilled[index][2]
                if message is None:
                    return None  # kicked: it had been taken, and is kept
                del spilled[index]
                self.num_bytes -= len(message)
                return message
        ids = self._ids
        for index in range(len(ids) - 1, -1, -1):
            if ids[index] == message_id:
                del ids[index]
                message = self._messages[index]
                del self._messages[index]
                self._window_bytes -= len(message)
                self.num_bytes -= len(message)
                return message
        return None

    # Acknowledged delivery ------------------------------------------------------

    def front_deliveries(self) -> int:
        return self._delivered.get(self._ids[0], 0) if self._ids else 0

    def reserve(self) -> Optional[Entry]:
        taken = self._take()
        if taken is None:
            return None
        message_id, message = taken
        deliveries = self._delivered.pop(message_id, 0) + 1
        self._store._record_update(message_id, None, deliveries)
        return Entry(message_id, message, deliveries)

    def reserve_new(self, message: bytes) -> Entry:
        store = self._store
        message_id = store._next_id
        store._next_id = message_id + 1
        # At the front (where a reserved message is ready again after a
        # restart), and before the window: never read into it.
        self._front -= 1
        store._record_insert(message_id, (message_id, self.queue_id, self._front, message, 1), fresh=False)
        return Entry(message_id, message, 1)

    def reserve_again(self, entry: Entry) -> Entry:
        deliveries = entry.deliveries + 1
        self._store._record_update(entry.message_id, None, deliveries)
        return entry._replace(deliveries=deliveries)

    def ack(self, entry: Entry) -> None:
        self._store._record_delete(entry.message_id)

    def release(self, entry: Entry) -> None:
        self._to_front(entry.message_id, entry.message)
        if entry.deliveries:
            self._delivered[entry.message_id] = entry.deliveries
        self._store._record_update(entry.message_id, self._front, entry.deliveries)

    def bury(self, entry: Entry) -> None:
        self._buried_seq += 1
        self._buried_ids.append(entry.message_id)
        self._buried_sizes.append(len(entry.message))
        self.buried_bytes += len(entry.message)
        self._store._record_move(_BURY, entry.message_id, self._buried_seq, entry.deliveries)

    def bury_front(self) -> None:
        deliveries = self.front_deliveries()
        taken = self._take()
        assert taken is not None
        message_id, message = taken
        self._delivered.pop(message_id, None)
        self.bury(Entry(message_id, message, deliveries))

    @property
    def num_buried(self) -> int:
        """How many of its messages are buried."""
        return len(self._buried_ids) - self._buried_first

    def kick(self, most: int) -> int:
        kicked = min(most, self.num_buried)
        if not kicked:
            return 0
        store = self._store
        first = self._buried_first
        write = store._open_write()
        for index in range(first, first + kicked):
            message_id, size = self._buried_ids[index], self._buried_sizes[index]
            self._back = pos = self._back + 1
            self.num_bytes += size
            self.buried_bytes -= size
            store._record_move(_KICK, message_id, pos, 0)
            # Its body is on disk: read (as the messages after the window)
            # once this batch is written.
            self._spilled.append((message_id, pos, None, write.batch))
        write.spilled.add(self)
        self._buried_first = first + kicked
        if self._buried_first * 2 >= len(self._buried_ids):
            del self._buried_ids[:self._buried_first]
            del self._buried_sizes[:self._buried_first]
            self._buried_first = 0
        return kicked

    def _recovered_buried(self, message_id: int, size: int, seq: int) -> None:
        self._buried_ids.append(message_id)
        self._buried_sizes.append(size)
        self.buried_bytes += size
        self._buried_seq = seq


#: Moves of a message between the tables (_Write.moves).
_BURY = 0
_KICK = 1


class CommitTimes(NamedTuple):
    """Where the time of one written batch went, in seconds (``time.perf_counter``).

    ``gathering``: from the first change to the batch's hand-over to the
    writer thread (the rest of the reactor's turn, or the previous write);
    ``to_thread``: until the writer thread began it; ``committing``: the
    transaction, sync included; ``back``: until the reactor thread had the
    news and the replies could go.
    """

    gathering: float
    to_thread: float
    committing: float
    back: float
    #: Rows written (messages added and removed, queues made and dropped).
    rows: int


class _Write:
    """One batch's changes, as handed to the writer thread."""

    __slots__ = ("batch", "new_queues", "inserts", "fresh", "deletes", "updates", "moves", "moved",
                 "dropped_queues", "next_id", "spilled", "opened", "handed", "began", "ended")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        # When (time.perf_counter) it was opened, handed to the writer
        # thread, and its transaction began and ended there: CommitTimes.
        self.opened = perf_counter()
        self.handed = self.began = self.ended = 0.0
        self.new_queues: list[tuple[int, bytes]] = []
        # Message id -> row; a message taken in the batch that added it
        # never reaches the disk.
        self.inserts: dict[int, _Row] = {}
        #: Ids of the messages added by Puts (not put back) in this batch.
        self.fresh: set[int] = set()
        self.deletes: list[int] = []
        # Acknowledged delivery: message id -> (new pos or None, deliveries),
        # written after the inserts and moves; and moves between the
        # messages and buried tables, in order: (_BURY or _KICK, id, seq or
        # pos, deliveries).
        self.updates: dict[int, tuple[Optional[int], int]] = {}
        self.moves: list[tuple[int, int, int, int]] = []
        self.moved: set[int] = set()
        self.dropped_queues: list[int] = []
        self.next_id = 0
        #: Queues with messages spilled in this batch (SqliteQueue._written).
        self.spilled: set[SqliteQueue] = set()


class SqliteStore:
    """Queues in an SQLite database; see the module's docstring.

    :param path: the database file, created if missing, readable and
        writable by its owner only (mode 0600: it holds every message); the
        WAL and shared-memory files SQLite makes beside it get its mode.
    :param fsync: ``always``, ``everysec`` or ``no``.
    :param reactor: runs the writer thread's results and the timers.
    :param run_writes: how a write is run: by default in the store's one
        writer thread (:class:`WorkerThread`); tests pass a function that
        runs it at once (``defer.maybeDeferred``), to drive the store with a
        ``task.Clock``.
    :param run_reads: how a read of messages from the disk is run: by
        default in the store's one reader thread; at once when ``run_writes``
        is given, unless this says otherwise.
    """

    log = Logger()
    durable = True
    acknowledged_delivery = True
    #: Its queues are its own (not shared with other servers).
    remote = False

    def __init__(
        self,
        path: str,
        fsync: str = "always",
        reactor: Any = None,
        run_writes: Optional[Callable[..., Deferred[Any]]] = None,
        run_reads: Optional[Callable[..., Deferred[Any]]] = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        self.path = path
        self.fsync = fsync
        # The global reactor, if none is given, once opened: not before
        # twistd has installed the one it was asked for.
        self._reactor: Any = reactor
        self.pending: Optional[Batch] = None
        self.failure: Optional[str] = None
        self._write: Optional[_Write] = None
        self._writing = False
        # The write handed to the writer thread, until it is done.
        self._in_flight: Optional[_Write] = None
        #: Transactions written, and the changes (rows) they held, since start.
        self.commits = 0
        self.rows_written = 0
        #: Called with each written batch's CommitTimes, if set (once per
        #: commit, never per message): for metrics and benchmarks.
        self.commit_observer: Optional[Callable[[CommitTimes], object]] = None
        #: Commits, their sizes and times, the last error: for metrics.
        self.health = StoreHealth()
        # The call of _write_pending due at the end of this turn, if any.
        self._scheduled: Any = None
        self._retry: Any = None
        # Reads tried again after a failure (_read_failed), by queue.
        self._read_retries: dict[SqliteQueue, Any] = {}
        self._syncer: Optional[task.LoopingCall] = None
        self._unsynced = False
        self._stopping: Optional[Deferred[None]] = None
        self._queues: dict[bytes, SqliteQueue] = {}
        self._queues_by_id: dict[int, SqliteQueue] = {}
        self._next_id = 1
        # The next id the database has: every id handed out is below it.
        self._id_mark = 1
        self._next_queue_id = 1
        self._writer: Optional[WorkerThread] = None
        self._reader_thread: Optional[WorkerThread] = None
        if run_reads is None and run_writes is not None:
            run_reads = maybeDeferred
        self._run_reads = run_reads
        self._run_writes = run_writes
        self._db: Optional[sqlite3.Connection] = None
        self._reader: Optional[sqlite3.Connection] = None

    def open(self) -> None:
        """Open the database and read every queue back.

        :raises StoreError: it cannot be opened or read, is damaged, or was
            written by a newer mqmq.
        """
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        self._db = self._open()
        try:
            # Reads of the messages that are on disk alone (at start-up, then
            # in the reader thread: SqliteQueue._refill); in WAL mode they
            # never wait for the writer.
            self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            self._db.close()
            raise StoreError(f"cannot open the database {self.path}: {error}") from None
        self._recover()

    # Opening and recovery ----------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        path = self.path
        try:
            # Made here, not by SQLite (0644 less the umask): it holds every message.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as error:
            raise StoreError(f"cannot open the database {path}: {error.strerror}") from None
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open the database {path}: {error}") from None
        try:
            version = db.execute("PRAGMA user_version").fetchall()[0][0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the database {path} was written by a newer mqmq (layout {version}; "
                    f"this one reads up to {SCHEMA_VERSION})"
                )
            if version == 0 and tables:
                raise StoreError(f"{path} is an SQLite database, but not an mqmq one")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
            if mode != "wal":
                raise StoreError(f"cannot put the database {path} in WAL mode (it stays {mode!r})")
            db.execute(f"PRAGMA synchronous = {'FULL' if self.fsync == 'always' else 'NORMAL'}")
            if version == 0:
                db.executescript(f"BEGIN; {_SCHEMA} {_SCHEMA_2} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            else:
                check = [row[0] for row in db.execute("PRAGMA quick_check")]
                if check != ["ok"]:
                    raise StoreError(f"the database {path} is damaged: {'; '.join(check[:5])}")
                if version == 1:
                    # Written before acknowledged delivery: no message was
                    # handed out yet, and none is buried.
                    db.executescript(f"BEGIN; {_SCHEMA_2} PRAGMA user_version = 2; COMMIT;")
        except sqlite3.Error as error:
            db.close()
            raise StoreError(f"cannot use the database {path}: {error}") from None
        except StoreError:
            db.close()
            raise
        return db

    def _recover(self) -> None:
        db = self._reader
        assert db is not None
        try:
            for queue_id, name in db.execute("SELECT id, name FROM queues ORDER BY name"):
                queue = SqliteQueue(self, bytes(name), queue_id)
                self._queues[queue.name] = queue
                self._queues_by_id[queue_id] = queue
                self._next_queue_id = max(self._next_queue_id, queue_id + 1)
            by_id = self._queues_by_id
            for queue_id, count, size, first, last in db.execute(
                "SELECT queue, count(*), sum(length(body)), min(pos), max(pos) FROM messages GROUP BY queue"
            ):
                owner = by_id.get(queue_id)
                if owner is None:
                    raise StoreError(f"the database {self.path} is damaged: "
                                     f"{count} messages belong to no queue")
                owner._front, owner._back, owner._tail_pos = first, last, first - 1
                owner.num_bytes = size
                owner._on_disk = count
                owner._read_done(self._read(queue_id, owner._tail_pos, WINDOW_MESSAGES, WINDOW_BYTES))
            for queue_id, message_id, size, seq in db.execute(
                "SELECT queue, id, length(body), seq FROM buried ORDER BY queue, seq"
            ):
                owner = by_id.get(queue_id)
                if owner is None:
                    raise StoreError(f"the database {self.path} is damaged: "
                                     f"a buried message belongs to no queue")
                owner._recovered_buried(message_id, size, seq)
            (stored_next,) = db.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchall()[0]
            (highest,) = db.execute("SELECT max(coalesce((SELECT max(id) FROM messages), 0), "
                                    "coalesce((SELECT max(id) FROM buried), 0))").fetchall()[0]
        except (sqlite3.Error, StoreError) as error:
            db.close()
            assert self._db is not None
            self._db.close()
            if isinstance(error, StoreError):
                raise
            raise StoreError(f"cannot read the database {self.path}: {error}") from None
        self._next_id = max(stored_next, highest + 1)
        self._id_mark = stored_next

    def _read(self, queue_id: int, after_pos: int, most: int,
              most_bytes: int) -> list[tuple[int, int, bytes, int]]:
        """The oldest messages of a queue after ``after_pos``: at most ``most``,
        and ``most_bytes`` bytes but for the first; (id, pos, body, deliveries)."""
        rows: list[tuple[int, int, bytes, int]] = []
        size = 0
        assert self._reader is not None
        cursor = self._reader.execute(
            "SELECT id, pos, body, deliveries FROM messages WHERE queue = ? AND pos > ? ORDER BY pos LIMIT ?",
            (queue_id, after_pos, most),
        )
        try:
            for message_id, pos, body, deliveries in cursor:
                size += len(body)
                if rows and size > most_bytes:
                    break
                rows.append((message_id, pos, bytes(body), deliveries))
        finally:
            # Not left open: an open read holds its snapshot (PyPy closes
            # it only when collected), hiding new rows and stalling the
            # WAL's checkpoints.
            cursor.close()
        return rows

    def _read_for(self, queue: SqliteQueue, most: int, most_bytes: int) -> None:
        """Read the oldest messages of ``queue`` that are on disk alone, for its window."""
        run: Callable[..., Deferred[Any]] = (
            self._run_reads
            or (self._reader_thread.run if self._reader_thread is not None else None)
            or maybeDeferred  # not started yet: at once
        )
        reading = run(self._read, queue.queue_id, queue._tail_pos, most, most_bytes)
        reading.addCallbacks(queue._read_done, self._read_failed, errbackArgs=(queue,))

    def _read_failed(self, reason: Failure, queue: SqliteQueue) -> None:
        queue._reading = False
        self.health.failed(f"cannot read from the database: {reason.value}", self._reactor.seconds(),
                           writing=False)
        self.log.error("cannot read messages from the database {path}: {error}; trying again "
                       "in {seconds:g} s", path=self.path, error=reason.value, seconds=RETRY_SECONDS)
        # They stay on disk; a Get that found none at hand waits for them.
        if self._stopping is None and queue not in self._read_retries:
            self._read_retries[queue] = self._reactor.callLater(RETRY_SECONDS, self._read_again, queue)

    def _read_again(self, queue: SqliteQueue) -> None:
        self._read_retries.pop(queue, None)
        if (self._stopping is None and not queue._reading and queue._on_disk
                and self._queues_by_id.get(queue.queue_id) is queue):
            queue._refill()

    def recovered(self) -> Iterable[SqliteQueue]:
        return list(self._queues.values())

    def describe(self) -> str:
        return f"sqlite:{self.path} (fsync {self.fsync})"

    # Queues ------------------------------------------------------------------

    def queue(self, name: bytes) -> SqliteQueue:
        queue_id = self._next_queue_id
        self._next_queue_id += 1
        queue = SqliteQueue(self, name, queue_id)
        self._queues[name] = queue
        self._queues_by_id[queue_id] = queue
        self._open_write().new_queues.append((queue_id, name))
        return queue

    def forget(self, stored: StoredQueue) -> None:
        queue = cast(SqliteQueue, stored)
        self._queues.pop(queue.name, None)
        self._queues_by_id.pop(queue.queue_id, None)
        write = self._open_write()
        for index, (queue_id, _) in enumerate(write.new_queues):
            if queue_id == queue.queue_id:
                # Made and forgotten in one batch: the disk never sees it.
                del write.new_queues[index]
                return
        write.dropped_queues.append(queue.queue_id)

    # Recording changes ---------------------------------------------------------

    def _open_write(self) -> _Write:
        write = self._write
        if write is None:
            self.pending = batch = Batch()
            write = self._write = _Write(batch)
            if self._scheduled is None and self.failure is None:
                # (Also while a write runs: a batch with nothing to write
                # is done at the end of the turn, without waiting for it.)
                self._scheduled = self._reactor.callLater(0, self._write_pending)
        return write

    def _record_insert(self, message_id: int, row: _Row, fresh: bool) -> _Write:
        write = self._write or self._open_write()
        write.inserts[message_id] = row
        if fresh:
            write.fresh.add(message_id)
        return write

    def _record_delete(self, message_id: int) -> None:
        write = self._write or self._open_write()
        if write.updates:
            write.updates.pop(message_id, None)
        if write.inserts.pop(message_id, None) is not None:
            write.fresh.discard(message_id)
        else:
            write.deletes.append(message_id)

    def _taken(self, message_id: int) -> None:
        """A message is handed out: should the write that adds it fail, it
        is kept (written by the retry), its Put not refused."""
        for write in (self._in_flight, self._write):
            if write is not None:
                write.fresh.discard(message_id)

    def _record_update(self, message_id: int, pos: Optional[int], deliveries: int) -> None:
        """A message's deliveries, and its pos if not None, change."""
        self._taken(message_id)
        write = self._write or self._open_write()
        row = write.inserts.get(message_id)
        if row is not None and message_id not in write.moved:
            # Added in this batch: written as it is now.
            write.inserts[message_id] = (row[0], row[1], row[2] if pos is None else pos, row[3], deliveries)
            return
        if pos is None:
            previous = write.updates.get(message_id)
            if previous is not None:
                pos = previous[0]
        write.updates[message_id] = (pos, deliveries)

    def _record_move(self, kind: int, message_id: int, place: int, deliveries: int) -> None:
        """A message is buried (``place`` its seq) or kicked back (``place`` its pos)."""
        self._taken(message_id)
        write = self._write or self._open_write()
        write.updates.pop(message_id, None)
        write.moves.append((kind, message_id, place, deliveries))
        write.moved.add(message_id)

    # Writing -------------------------------------------------------------------

    def _write_pending(self) -> None:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()  # called by the retry timer, or directly
        self._scheduled = None
        write = self._write
        if write is not None and self.failure is None and not (
            write.inserts or write.deletes or write.new_queues or write.dropped_queues or write.spilled
            or write.updates or write.moves
        ):
            # Nothing to write: every message it added was taken in the
            # same batch (handed to a waiting Get).  Its replies may go now,
            # without a trip to the writer thread for an empty transaction,
            # and without waiting for a write in progress: they depend on
            # nothing in it (a connection's replies keep their order anyway,
            # each waiting behind the ones before it).
            self._write = None
            self.pending = None
            write.batch.finish()
            if not self._writing:
                self._after_write()
            return
        if self._writing:
            return
        if write is None:
            if self.failure is None:
                return
            # Failing with nothing to write: a write of the counter alone
            # finds out whether the disk is back.
            write = self._open_write()
        self._write = None
        self.pending = None
        if self._next_id > self._id_mark or self.failure is not None:
            # The ids handed out stay below what the database says is next,
            # written once per ID_BLOCK ids rather than with every commit.
            # (While failing, it is written anyway: an empty transaction
            # would not show whether the disk is back.)
            write.next_id = self._next_id + ID_BLOCK
        self._writing = True
        self._in_flight = write
        write.handed = perf_counter()
        writing = self._run(self._commit, write)
        writing.addCallbacks(self._written, self._write_failed, callbackArgs=(write,), errbackArgs=(write,))

    def _commit(self, write: _Write) -> None:
        # In the writer thread: the only code that touches the database
        # once the store has started.
        db = self._db
        assert db is not None
        write.began = perf_counter()
        try:
            db.execute("BEGIN IMMEDIATE")
            # Forgotten queues first: a name forgotten and made again in one
            # write must not meet its old row (and OR REPLACE, whatever the
            # order a failed write's retry put them in: a forgotten queue is
            # empty).
            if write.dropped_queues:
                db.executemany("DELETE FROM queues WHERE id = ?", [(i,) for i in write.dropped_queues])
            if write.new_queues:
                db.executemany("INSERT OR REPLACE INTO queues (id, name) VALUES (?, ?)", write.new_queues)
            if write.inserts:
                _insert_rows(db, list(write.inserts.values()))
            if write.moves:
                _move_rows(db, write.moves)
            if write.updates:
                _update_rows(db, write.updates)
            if write.deletes:
                _delete_rows(db, write.deletes)
            if write.next_id:
                db.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (write.next_id,))
            db.execute("COMMIT")
            write.ended = perf_counter()
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def _written(self, _: object, write: _Write) -> None:
        answered = perf_counter()
        self._writing = False
        self._in_flight = None
        self._unsynced = True
        self.commits += 1
        if write.next_id:
            self._id_mark = write.next_id
        rows = (len(write.new_queues) + len(write.inserts) + len(write.deletes) + len(write.dropped_queues)
                + len(write.updates) + len(write.moves))
        self.rows_written += rows
        self.health.committed(rows, write.ended - write.began)
        if self.commit_observer is not None:
            self.commit_observer(CommitTimes(write.handed - write.opened, write.began - write.handed,
                                             write.ended - write.began, answered - write.ended, rows))
        if self.failure is not None:
            self.log.info("the database {path} takes writes again", path=self.path)
            self.failure = None
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            self._retry = None
        write.batch.finish()
        for queue in write.spilled:
            queue._written()
        self._after_write()

    def _write_failed(self, reason: Failure, write: _Write) -> None:
        self._writing = False
        self._in_flight = None
        error = reason.value
        if not isinstance(error, (sqlite3.Error, OSError)):
            self.log.failure("writing to the database {path} failed", reason, path=self.path)
        elif self.failure is None:
            self.log.error("cannot write to the database {path}: {error}; refusing new messages "
                           "until it can", path=self.path, error=error)
        self.failure = f"cannot write to the database: {error}"
        self.health.failed(self.failure, self._reactor.seconds())
        # The messages the batch added and nobody has taken since were never
        # stored: out of memory too, and their Puts answered with an error.
        # One taken since is on its way to a consumer (its reply waits for a
        # later write): it is stored with the retry, and its Put answered
        # once that is written, as the reply to the consumer.
        refused = set()
        for message_id in write.fresh:
            queue = self._queues_by_id.get(write.inserts[message_id][1])
            message = queue._drop(message_id) if queue is not None else None
            if message is not None:
                refused.add(message_id)
                if self.dropped is not None and queue is not None:
                    self.dropped(queue.name, message)
        # The rest was already promised: it goes first in the next write.
        kept = self._write
        retry = self._write = _Write(kept.batch if kept is not None else Batch())
        self.pending = retry.batch
        retry.new_queues = write.new_queues + (kept.new_queues if kept else [])
        retry.inserts = {i: row for i, row in write.inserts.items() if i not in refused}
        retry.fresh = write.fresh - refused
        retry.deletes = list(write.deletes)
        retry.moves = list(write.moves)
        retry.moved = set(write.moved)
        retry.updates = dict(write.updates)
        retry.dropped_queues = list(write.dropped_queues)
        retry.spilled = set(write.spilled)
        if kept is not None:
            retry.inserts.update(kept.inserts)
            retry.fresh |= kept.fresh
            retry.deletes += kept.deletes
            # (A later move makes an earlier change of the message moot.)
            for message_id in kept.moved:
                retry.updates.pop(message_id, None)
            for message_id, (pos, deliveries) in kept.updates.items():
                earlier = retry.updates.get(message_id)
                if pos is None and earlier is not None:
                    pos = earlier[0]  # (a move to the front, then a count)
                retry.updates[message_id] = (pos, deliveries)
            retry.moves += kept.moves
            retry.moved |= kept.moved
            retry.dropped_queues += kept.dropped_queues
            retry.spilled |= kept.spilled
        # Replies held for this batch: refused Puts are answered now; the
        # rest (messages whose removal is not written, Puts now in the
        # retry) wait for the retry's write.
        write.batch.retry = retry.batch
        write.batch.finish(frozenset(refused))
        if self._stopping is not None:
            self._stopped()
            return
        # The next write waits for the retry: not for a call already due.
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = self._reactor.callLater(RETRY_SECONDS, self._write_pending)

    def _after_write(self) -> None:
        if self._write is not None and self.failure is None:
            self._write_pending()
        elif self._stopping is not None and self._write is None:
            self._stopped()

    #: Called with (queue name, message) for each message dropped because
    #: its Put was not written; the broker sets it to keep its counts.
    dropped: Optional[Callable[[bytes, bytes], object]] = None
    #: Called with a queue's name when messages it had to read from the
    #: disk, after a pop() found none at hand, are in; set by the broker.
    arrived: Optional[Callable[[bytes], object]] = None

    def _tell_arrived(self, name: bytes) -> None:
        if self.arrived is not None and self._stopping is None:
            self.arrived(name)

    def _run(self, function: Callable[..., None], *args: Any) -> Deferred[None]:
        if self._run_writes is not None:
            return self._run_writes(function, *args)
        assert self._writer is not None
        return self._writer.run(function, *args)

    # Syncing (everysec) ----------------------------------------------------------

    def _sync(self) -> None:
        # Queued behind any write in progress (one writer thread).
        if not self._unsynced:
            return
        self._unsynced = False
        began = perf_counter()
        syncing = self._run(self._sync_files)
        syncing.addCallbacks(lambda _: self.health.sync_seconds.observe(perf_counter() - began),
                             self._sync_failed)

    def _sync_failed(self, reason: Failure) -> None:
        self.log.error("syncing the database {path} failed: {error}", path=self.path, error=reason.value)
        self.health.failed(f"cannot sync the database: {reason.value}", self._reactor.seconds(),
                           writing=False)

    def _sync_files(self) -> None:
        for path in (self.path + "-wal", self.path):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # Starting and stopping -------------------------------------------------------

    def start(self) -> None:
        if self._run_writes is None:
            self._writer = WorkerThread(self._reactor, "mqmq-sqlite-writer")
            self._writer.start()
        if self._run_reads is None:
            self._reader_thread = WorkerThread(self._reactor, "mqmq-sqlite-reader")
            self._reader_thread.start()
        if self.fsync == "everysec":
            self._syncer = task.LoopingCall(self._sync)
            self._syncer.clock = self._reactor
            self._syncer.start(SYNC_SECONDS, now=False)

    def stop(self) -> Deferred[None]:
        """Write what is pending, sync, and close the database."""
        if self._stopping is not None:
            return self._stopping
        self._stopping = Deferred()
        if self._syncer is not None and self._syncer.running:
            self._syncer.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
            self._retry = None
        for retry in self._read_retries.values():
            if retry.active():
                retry.cancel()
        self._read_retries.clear()
        if self._writing:
            pass  # _written or _write_failed goes on from here
        elif self._write is not None and self.failure is None:
            self._write_pending()
        else:
            self._stopped()
        return self._stopping

    def _stopped(self) -> None:
        stopping = self._stopping
        assert stopping is not None
        if self._write is not None:
            self.log.error("stopping with changes the database {path} did not take "
                           "(removals of delivered messages, put-backs): {error}",
                           path=self.path, error=self.failure)
        for worker in (self._writer, self._reader_thread):
            if worker is not None:
                worker.stop()
        for db in (self._db, self._reader):
            if db is not None:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
        if not stopping.called:
            stopping.callback(None)
