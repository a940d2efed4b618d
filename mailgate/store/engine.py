"""Engine and sessions. SQLite runs in WAL mode. The spool's commit precedes an SMTP
250, so it must survive power loss: its engine uses synchronous=FULL. Processing and
sending can be redone from the spool after a power loss (the worst case is a re-sent
notice with the same Message-ID), so their engine uses synchronous=NORMAL."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Insert, Table, event, insert, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import InstrumentedAttribute, make_transient_to_detached
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, SQLModel, create_engine, select


def utcnow() -> datetime:
    """Aware UTC; SQLModel's datetime columns store and return UTC."""
    return datetime.now(UTC)


def now_for(session: Session) -> datetime:
    """When a session's changes happen: now, or, for mail imported as history, the time the
    message was written (session.info["as_of"], set by the pipeline), so that its ticket,
    events and due times keep the dates of the mail."""
    as_of = session.info.get("as_of")
    return as_of if as_of is not None else utcnow()


def is_history(session: Session) -> bool:
    """Whether the session applies mail imported as history (see now_for): nothing of it is
    sent, and it says nothing of today (caps, loop guard, bounce flags)."""
    return session.info.get("as_of") is not None


def as_utc(value: datetime) -> datetime:
    """Naive values are taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 UTC with a Z, as the JSON contract wants."""
    if value is None:
        return None
    return as_utc(value).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def make_engine(url: str, *, echo: bool = False, busy_timeout: float = 30.0, durable: bool = True) -> Engine:
    """durable=False (SQLite only): synchronous=NORMAL, for work that can be redone after a
    power loss; the spool's acceptance, which precedes a 250, always uses a durable engine."""
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo, connect_args={"timeout": busy_timeout, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # Let SQLAlchemy, not pysqlite, decide when transactions begin, so that
            # BEGIN IMMEDIATE below takes the write lock up front.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
            # Writers queue on the lock at BEGIN instead of failing at upgrade time
            # with "database is locked" midway through a transaction.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=5, max_overflow=5,
                         connect_args={"connect_timeout": max(1, int(busy_timeout)),
                                       "options": f"-c lock_timeout={int(busy_timeout * 1000)}"})


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def lock_message_ids(session: Session, engine: Engine, message_ids: Sequence[str]) -> None:
    """On PostgreSQL, hold each Message-ID's lock until the transaction ends: the dedupe step
    and the quarantine purge take it, so neither decides on what the other has yet to
    commit. (SQLite's BEGIN IMMEDIATE serialises every writer anyway.) Taken in sorted
    order, so that two holders of several cannot wait on each other."""
    if is_postgres(engine) and message_ids:
        session.exec(text("SELECT count(pg_advisory_xact_lock(hashtextextended(mid, 0))) FROM "
                          "(SELECT unnest(CAST(:mids AS text[])) AS mid ORDER BY 1) AS sorted_ids")
                     .bindparams(mids=sorted(set(message_ids))))


def due_ids(session: Session, engine: Engine, id_column: InstrumentedAttribute[Any],
            conditions: Sequence[ColumnElement[bool]], limit: int) -> list[int]:
    """The lowest `limit` ids matching any of `conditions`, for a claim (locked with SKIP
    LOCKED on PostgreSQL).

    One query per condition, selecting only the id, ordered by `id + 0`: each is then
    answered from a (state, next_attempt_at) index. One query with OR across states, or
    ORDER BY id (SQLite then walks the table in id order), read every row ever stored,
    and done rows only accumulate (tests/test_query_plans.py).
    """
    ids: list[int] = []
    for condition in conditions:
        query = select(id_column).where(condition).order_by(id_column + 0).limit(limit)
        if is_postgres(engine):
            query = query.with_for_update(skip_locked=True)
        ids += [i for i in session.exec(query).all() if i is not None]
    return sorted(ids)[:limit]


@event.listens_for(OrmSession, "pending_to_persistent")
@event.listens_for(OrmSession, "loaded_as_persistent")
@event.listens_for(OrmSession, "detached_to_persistent")
def _hold_for_session(session: OrmSession, instance: object) -> None:
    # SQLAlchemy's identity map holds objects weakly: a Contact created early in a message's
    # transaction and then dropped by the caller is gone when a later step asks for it, and
    # every session.get() becomes a SELECT. Our sessions are short (one message, one
    # command), so holding each object until the session ends costs little.
    session.info.setdefault("held", []).append(instance)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


_INSERTS: dict[Table, Insert] = {}


def insert_object(session: Session, obj: SQLModel) -> None:
    """INSERT a new object now, with a prebuilt Core statement in the session's transaction,
    and make it a persistent object of the session without a flush.

    The ORM's unit of work cost several times the INSERT itself (about 0.25 ms an object on
    the message path, bench/worker_steps.py). The object is then like one just loaded:
    later changes to it are flushed as UPDATEs as usual.
    """
    table: Table = type(obj).__table__  # type: ignore[attr-defined]
    statement = _INSERTS.get(table)
    if statement is None:
        statement = _INSERTS[table] = insert(table)
    (key,) = table.primary_key.columns.keys()
    values = {column.key: getattr(obj, column.key) for column in table.columns}
    if values[key] is None:
        del values[key]
    result = session.connection().execute(statement, values)
    setattr(obj, key, result.inserted_primary_key[0])
    make_transient_to_detached(obj)
    session.add(obj)
