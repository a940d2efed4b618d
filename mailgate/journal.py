"""The SMTP acceptance journal (SQLite deployments only).

SQLite has one writer per database file. If the SMTP listener committed its
inbound row to the main database, every 250 would wait behind the ingest
worker's transaction (measured: p50 18 ms, p99 0.5 s under load). So on SQLite
the listener commits to this small journal database instead: one row holding
the raw bytes and the envelope, committed with synchronous=FULL, and only then
is 250 answered. Sessions whose DATA ends while a commit is under way share the
next commit (`GroupCommit`). Keeping the bytes in the row instead of a blob
file saves the listener two fsyncs per message; the blob store gets them when
the row is moved.

The work process moves journal rows into the inbound table in batches
(`drain`, in a thread of its own beside the pipeline): the bytes go to the
blob store (durable), the inbound rows are committed, then the journal rows
are deleted. A crash between the two commits is harmless: each row carries a
random key that becomes the inbound row's unique source_key, so the next drain
skips what is already there.

PostgreSQL has row locks and needs none of this: there `spool.accept` is used
directly.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from mailgate.spool import SpoolError
from mailgate.store.blobs import BlobStore
from mailgate.store.engine import session_scope
from mailgate.store.tables import Inbound

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    raw_sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    source TEXT NOT NULL,
    queue TEXT,
    envelope_from TEXT,
    envelope_to TEXT NOT NULL,
    received_at TEXT NOT NULL,
    raw BLOB
)
"""
_INSERT = ("INSERT INTO journal (key, raw_sha256, size, source, queue, envelope_from, envelope_to,"
           " received_at, raw) VALUES (?, '', ?, ?, ?, ?, ?, ?, ?)")
_INSERT_INBOUND = sqlite_insert(Inbound.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
    index_elements=["source_key"])
DRAIN_BYTES = 32 * 1024 * 1024  # the raw bytes one drain holds in memory (at least one message)


JOURNAL_FILE = "accept-journal.db"  # in data_dir
STUCK_AFTER = timedelta(minutes=5)  # older waiting rows: nothing is moving them (doctor warns)


def backlog(path: Path) -> tuple[int, datetime | None]:
    """(rows waiting, when the oldest was accepted) in the journal at `path`, for `doctor`;
    (0, None) if there is no journal."""
    if not path.exists():
        return 0, None
    conn = sqlite3.connect(path, timeout=5)
    try:
        count, oldest = conn.execute("SELECT count(*), min(received_at) FROM journal").fetchone()
    finally:
        conn.close()
    return int(count), datetime.fromisoformat(oldest) if oldest else None


class AcceptJournal:
    def __init__(self, path: Path, blobs: BlobStore, *, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.blobs = blobs
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, one writer at a time: commits are a single fsync each.
        self._conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        # Rows are written once and read once: a large page cache would only hold message bytes.
        self._conn.execute("PRAGMA cache_size=-512")
        self._conn.execute(_SCHEMA)
        if "raw" not in {r[1] for r in self._conn.execute("PRAGMA table_info(journal)")}:
            # A journal written by an older version. The listener and the work process both
            # open it at start: the second one may find the column added meanwhile.
            try:
                self._conn.execute("ALTER TABLE journal ADD COLUMN raw BLOB")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise
        self._lock = threading.Lock()  # the connection

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @staticmethod
    def row_for(raw: bytes, *, source: str, queue: str | None, envelope_from: str | None,
                envelope_to: tuple[str, ...]) -> tuple[str, tuple[object, ...]]:
        """(key, row) for write_rows: the key becomes the inbound row's source_key."""
        key = f"{source}:{uuid.uuid4().hex}"
        return key, (key, len(raw), source, queue, envelope_from, ",".join(envelope_to),
                     datetime.now(UTC).isoformat(), raw)

    def write_rows(self, rows: list[tuple[object, ...]]) -> list[Exception | None]:
        """Commit the rows (fsynced) in one transaction; the error of each row. A locked,
        full or failing database is every row's error. Anything else (a row that breaks a
        constraint, a value the database refuses) may be one row's: each is then tried in
        its own transaction, so that it does not fail the others."""
        try:
            self._insert(rows)
            return [None] * len(rows)
        except sqlite3.OperationalError as exc:
            return [exc] * len(rows)
        except Exception as exc:
            if len(rows) == 1:
                return [exc]
        errors: list[Exception | None] = []
        for row in rows:
            try:
                self._insert([row])
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        return errors

    def _insert(self, rows: list[tuple[object, ...]]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(_INSERT, rows)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def pending(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM journal").fetchone()[0])

    def drain(self, engine: Engine, limit: int = 500) -> int:
        """Move up to `limit` journal rows into the inbound table. Returns how many moved."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, key, raw_sha256, size, source, queue, envelope_from, envelope_to, received_at"
                " FROM journal ORDER BY id LIMIT ?", (limit,)).fetchall()
        if not rows:
            return 0
        held = 0
        for count, row in enumerate(rows):  # keep a burst of large messages within DRAIN_BYTES
            held += row[3]
            if held > DRAIN_BYTES and count:
                rows = rows[:count]
                break
        ids = [r[0] for r in rows]
        marks = ",".join("?" * len(ids))
        with self._lock:
            raws = dict(self._conn.execute(f"SELECT id, raw FROM journal WHERE id IN ({marks})", ids).fetchall())
        # The bytes first, outside any transaction (SQLite takes its write lock at BEGIN);
        # then the rows in one short transaction. A row moved before a crash that came
        # before its journal delete is skipped by its key.
        new_bytes = [raws[r[0]] for r in rows if raws.get(r[0]) is not None]
        digests = iter(self.blobs.put_many(new_bytes))  # durable before the commit naming them
        # A row written by an older version names its blob instead of holding the bytes.
        values = [{"source": source, "source_key": key, "envelope_from": env_from, "envelope_to": env_to,
                   "queue": queue, "raw_sha256": next(digests) if raws.get(i) is not None else sha,
                   "size": size, "received_at": datetime.fromisoformat(received)}
                  for i, key, sha, size, source, queue, env_from, env_to, received in rows]
        with session_scope(engine) as session:
            session.connection().execute(_INSERT_INBOUND, values)
        with self._lock:
            self._conn.execute(f"DELETE FROM journal WHERE id IN ({marks})", ids)
        return len(rows)


class GroupCommit:
    """The listener's way into the journal. A message whose DATA ends while a commit is under
    way waits for the next one, which takes every message waiting then (group commit):
    one fsync and one thread hand-off per commit instead of per message. Runs on the event
    loop; the commits run in a worker thread."""

    def __init__(self, journal: AcceptJournal) -> None:
        self.journal = journal
        self._waiting: list[tuple[tuple[object, ...], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def accept(self, raw: bytes, *, source: str, queue: str | None, envelope_from: str | None,
                     envelope_to: tuple[str, ...]) -> str:
        """Durably keep one message; returns its journal key. Raises SpoolError."""
        key, row = self.journal.row_for(raw, source=source, queue=queue, envelope_from=envelope_from,
                                        envelope_to=envelope_to)
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, committed))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._commit_groups())
        await committed
        return key

    async def _commit_groups(self) -> None:
        while self._waiting:
            # A session that went away while it waited (the client hung up) is not written:
            # it never got its 250, and its sender will try again.
            group = [(row, committed) for row, committed in self._waiting if not committed.done()]
            self._waiting = []
            if not group:
                continue
            try:
                errors = await asyncio.to_thread(self.journal.write_rows, [row for row, _ in group])
            except Exception as exc:  # the thread could not even run: every waiter gets it
                errors = [exc] * len(group)
            for (_, committed), error in zip(group, errors, strict=True):
                if committed.done():  # its session went away meanwhile
                    continue
                if error is None:
                    committed.set_result(None)
                else:
                    log.error("journal accept failed: %s: %s", type(error).__name__, error)
                    spool_error = SpoolError("could not store message")
                    spool_error.__cause__ = error
                    committed.set_exception(spool_error)
