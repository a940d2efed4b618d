"""`mailgate run`: build the components in order, serve, stop them in reverse.

Start: schema, the outbox sender, the work process (the ingest worker, see
mailgate.worker), scheduler, IMAP pollers, and the SMTP listener last (so
nothing is accepted before it can be processed); then sd_notify READY=1.
Stop (SIGTERM/SIGINT): stop accepting first, let the work process finish the
messages it holds, then the sender the mail they queued, each within a time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from mailgate import spool
from mailgate.config import SECRET_KEY_PUBLISHED, Settings, published_secret_key
from mailgate.journal import AcceptJournal, GroupCommit
from mailgate.outbox import OutboxSender
from mailgate.runtime import Runtime
from mailgate.store import migrate
from mailgate.transport.smtp import IngestHandler, start_server
from mailgate.worker import SENT_SIGNAL, WorkProcess, journal_for, limit_malloc_arenas

log = logging.getLogger(__name__)
DRAIN_SECONDS = 20.0
# Of the outbox's DRAIN_SECONDS at a stop, the last ones are for a mail already at the relay.
LAST_SEND_SECONDS = 5.0
# At stop, how long a client may take to finish the message it is sending (within
# systemd's TimeoutStopSec=45, before the drains above).
LISTENER_GRACE_SECONDS = 10.0


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


def prepare_database(rt: Runtime) -> None:
    """An empty database is created; one behind the code must be upgraded on purpose."""
    current = migrate.current_revision(rt.engine)
    if current is None:
        log.info("empty database: creating the schema")
        create_schema(rt)
    elif current != migrate.head_revision():
        raise RuntimeError(f"database schema is at {current}, the code needs {migrate.head_revision()}: "
                           "run `mailgate db upgrade`")


def create_schema(rt: Runtime) -> None:
    """`mailgate db upgrade` in a short-lived child process: Alembic, once imported, would
    hold about 11 MB of the daemon's memory for as long as it runs."""
    if rt.settings.path is None:  # settings built in code: no config file to hand over
        migrate.upgrade(rt.engine)
        return
    try:
        proc = subprocess.run([sys.executable, "-m", "mailgate.cli", "db", "upgrade", "--config",
                               str(rt.settings.path)], capture_output=True, text=True, check=False, timeout=600)
    except subprocess.TimeoutExpired:
        raise RuntimeError("creating the schema took over 10 minutes: run `mailgate db upgrade`") from None
    if proc.returncode != 0 or migrate.current_revision(rt.engine) != migrate.head_revision():
        raise RuntimeError(f"creating the schema failed: {proc.stderr.strip()[-2000:] or proc.stdout.strip()}")


class ImapOutcome:
    """For the IMAP poller: wake the work process and wait for messages' outcomes.

    The poller files each mail by its outcome (a dead letter goes to the Failed folder).
    One polling task answers every waiting message with one query per round.
    """

    POLL_SECONDS = 0.05
    WAIT_SECONDS = 120.0

    def __init__(self, rt: Runtime, work: WorkProcess) -> None:
        self.rt = rt
        self.work = work
        self.waiting: dict[int, list[asyncio.Future[str]]] = {}
        self.poller: asyncio.Task[None] | None = None

    async def __call__(self, inbound_id: int) -> str:
        self.work.notify()
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(inbound_id, []).append(future)
        if self.poller is None or self.poller.done():
            self.poller = asyncio.create_task(self._poll())
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.WAIT_SECONDS)
        except TimeoutError:
            return "queued"  # still stored and queued: the poller files it as taken
        finally:
            futures = self.waiting.get(inbound_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self.waiting.pop(inbound_id, None)

    async def _poll(self) -> None:
        while self.waiting:
            try:
                rows = await asyncio.to_thread(spool.progress_of, self.rt.engine, list(self.waiting))
            except Exception as exc:  # the database hiccups: ask again next round
                log.warning("imap: cannot read message outcomes: %s", exc)
                rows = {}
            for inbound_id, (state, outcome, retry_scheduled) in rows.items():
                if state in ("done", "dead"):
                    answer = outcome or state
                elif state == "queued" and retry_scheduled:
                    answer = "queued"  # it failed once and will be retried: not dead
                else:
                    continue
                for future in self.waiting.pop(inbound_id, []):
                    if not future.done():
                        future.set_result(answer)
            await asyncio.sleep(self.POLL_SECONDS)


async def serve(settings: Settings) -> int:
    limit_malloc_arenas()  # before the first thread allocates
    if published_secret_key(settings):
        log.warning("%s", SECRET_KEY_PUBLISHED)
    rt = Runtime.build(settings)
    await asyncio.to_thread(prepare_database, rt)
    await asyncio.to_thread(spool.release_dead_claims, rt.engine)
    holder = spool.worker_id()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    sender = OutboxSender(rt.engine, settings, holder)
    outbox_stop = asyncio.Event()
    loop.add_signal_handler(SENT_SIGNAL, sender.wake.set)  # before the child can send it
    outbox = asyncio.create_task(sender.run(outbox_stop), name="outbox")
    work = WorkProcess(settings)
    journal = journal_for(rt)
    server = None
    if settings.smtp.enabled:
        # Bound before the work process starts: a port in use stops start-up with one line,
        # not that line and then the orphaned work process's own.
        handler = IngestHandler(smtp_accept(rt, journal), settings.helpdesk.all_addresses,
                                lmtp=settings.smtp.lmtp, on_accepted=work.notify)
        server = await start_server(handler, settings.smtp.host, settings.smtp.port,
                                    hostname=settings.smtp.hostname,
                                    max_message_bytes=settings.smtp.max_message_bytes)
        bound = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets)
        log.info("%s listening on %s", "LMTP" if settings.smtp.lmtp else "SMTP", bound)
    await work.start()  # it moves what the listener accepted meanwhile, as at any start
    supervisor = asyncio.create_task(work.supervise(stop, lambda: spool.release_dead_claims(rt.engine)))
    from mailgate.jobs import start_scheduler

    scheduler = start_scheduler(rt, holder)
    pollers = start_imap_pollers(rt, ImapOutcome(rt, work), holder, stop)
    sd_notify("READY=1")
    log.info("mailgate running (database %s)", rt.engine.url.render_as_string(hide_password=True))

    await stop.wait()
    sd_notify("STOPPING=1")
    log.info("stopping")
    if server is not None:
        await server.close(LISTENER_GRACE_SECONDS)
    for task in pollers:
        task.cancel()
    await asyncio.gather(*pollers, return_exceptions=True)
    scheduler.shutdown(wait=False)
    await supervisor
    await work.stop(DRAIN_SECONDS)
    # Last, so that what the work process queued while draining is sent too.
    outbox_stop.set()
    await outbox
    try:
        # No mail is begun in the last LAST_SEND_SECONDS: the one at the relay then has them.
        await asyncio.wait_for(sender.drain(DRAIN_SECONDS - LAST_SEND_SECONDS), DRAIN_SECONDS)
    except TimeoutError:
        log.warning("outbox sender did not finish within %.0fs: the rest goes at the next start", DRAIN_SECONDS)
    except Exception:  # the database went away while stopping: the rows stay queued
        log.exception("outbox drain at stop failed")
    if journal is not None:
        journal.close()
    rt.engine.dispose()
    rt.spool_engine.dispose()
    log.info("stopped")
    return 0


def smtp_accept(rt: Runtime, journal: AcceptJournal | None) -> Callable[..., Awaitable[str]]:
    """How the listener stores a message: the journal on SQLite, the spool on PostgreSQL."""
    if journal is not None:
        return GroupCommit(journal).accept

    async def accept(raw: bytes, **envelope: Any) -> str:
        accepted = await asyncio.to_thread(spool.accept, rt.spool_engine, rt.blobs, raw, **envelope)
        return str(accepted.inbound_id)

    return accept


def start_imap_pollers(rt: Runtime, process: ImapOutcome, holder: str,
                       stop: asyncio.Event) -> list[asyncio.Task[None]]:
    if not rt.settings.imap:
        return []
    from mailgate.transport.imap import ImapPoller

    tasks = []
    for account in rt.settings.imap:
        poller = ImapPoller(account, rt.spool_engine, rt.blobs, process=process)
        tasks.append(asyncio.create_task(poll_under_lease(rt, poller, account.name, holder, stop),
                                         name=f"imap:{account.name}"))
    return tasks


LEASE_TTL = timedelta(seconds=60)


async def poll_under_lease(rt: Runtime, poller: Any, name: str, holder: str, stop: asyncio.Event) -> None:
    """Run a mailbox's poller only while this instance holds its lease, so that with several
    instances on one database each mailbox is fetched by one of them at a time."""
    from mailgate.jobs import drop_lease, take_lease

    lease = f"imap:{name}"
    pause = LEASE_TTL.total_seconds() / 3

    async def holds() -> bool:
        try:
            return await asyncio.to_thread(take_lease, rt, lease, holder, LEASE_TTL)
        except Exception as exc:  # the database is down: keep trying, never end this task
            log.error("imap %s: cannot take its lease: %s: %s", name, type(exc).__name__, exc)
            return False

    try:
        while not stop.is_set():
            if not await holds():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
                continue
            held = asyncio.Event()  # set when the lease is lost or we stop
            runner = asyncio.create_task(poller.run(held))
            while not runner.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
                if stop.is_set() or not await holds():
                    held.set()
                    break
            await runner
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(drop_lease, rt, lease, holder)
