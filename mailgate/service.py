"""`mailgate run`: build the components in order, serve, stop them in reverse.

Start: schema, ingest worker, outbox sender, scheduler, IMAP pollers, and the
SMTP listener last (so nothing is accepted before it can be processed); then
sd_notify READY=1. Stop (SIGTERM/SIGINT): stop accepting first, let the worker
and the sender finish what they hold within a time limit, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from datetime import timedelta
from typing import Any

from mailgate import spool
from mailgate.config import Settings
from mailgate.ingest.pipeline import Result, run_one
from mailgate.outbox import OutboxSender
from mailgate.runtime import Runtime
from mailgate.store import migrate
from mailgate.transport.smtp import IngestHandler, start_server

log = logging.getLogger(__name__)
DRAIN_SECONDS = 20.0


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
        migrate.upgrade(rt.engine)
    elif current != migrate.head_revision():
        raise RuntimeError(f"database schema is at {current}, the code needs {migrate.head_revision()}: "
                           "run `mailgate db upgrade`")


class IngestWorker:
    """Claims inbound rows one at a time and runs the pipeline on each (in a thread)."""

    def __init__(self, rt: Runtime, worker: str) -> None:
        self.rt = rt
        self.worker = worker
        self.wake = asyncio.Event()

    def notify(self, _inbound_id: int | None = None) -> None:
        self.wake.set()

    async def process(self, inbound_id: int) -> str:
        """For the IMAP poller: process one accepted message now and return its outcome.

        If the background loop claimed it first, wait for that to finish: the poller files the
        mail by outcome (a dead letter goes to the Failed folder).
        """
        result: Result | None = await asyncio.to_thread(run_one, self.rt, self.worker, only_id=inbound_id)
        if result is not None:
            return result.outcome
        for _ in range(600):
            state, outcome = await asyncio.to_thread(spool.state_of, self.rt.engine, inbound_id)
            if state in ("done", "dead"):
                return outcome or state
            if state == "queued":  # a retry is scheduled: it is not dead, file it as taken
                return "queued"
            await asyncio.sleep(0.1)
        return "queued"

    async def run(self, stop: asyncio.Event, on_processed: asyncio.Event | None = None) -> None:
        while not stop.is_set():
            self.wake.clear()
            try:
                result = await asyncio.to_thread(run_one, self.rt, self.worker)
            except asyncio.CancelledError:
                raise
            except Exception:  # the database itself is failing: back off, never crash-loop
                log.exception("ingest worker pass failed")
                result = None
                await asyncio.sleep(1.0)
            if result is not None:
                if on_processed is not None:
                    on_processed.set()
                continue
            waits = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=self.rt.settings.helpdesk.worker_poll_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()


async def serve(settings: Settings) -> int:
    rt = Runtime.build(settings)
    await asyncio.to_thread(prepare_database, rt)
    await asyncio.to_thread(spool.release_dead_claims, rt.engine)
    await asyncio.to_thread(rt.spam_model)  # load (or seed) the model before mail arrives
    worker_name = spool.worker_id()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    ingest = IngestWorker(rt, worker_name)
    sender = OutboxSender(rt.engine, settings, worker_name)
    tasks: dict[str, asyncio.Task[None]] = {
        "ingest": asyncio.create_task(ingest.run(stop, sender.wake), name="ingest"),
        "outbox": asyncio.create_task(sender.run(stop), name="outbox"),
    }
    from mailgate.jobs import start_scheduler

    scheduler = start_scheduler(rt, worker_name)
    pollers = start_imap_pollers(rt, ingest, stop)
    server = None
    if settings.smtp.enabled:
        handler = IngestHandler(rt.spool_engine, rt.blobs, settings.helpdesk.all_addresses,
                                lmtp=settings.smtp.lmtp, on_accepted=ingest.notify)
        server = await start_server(handler, settings.smtp.host, settings.smtp.port,
                                    hostname=settings.smtp.hostname,
                                    max_message_bytes=settings.smtp.max_message_bytes)
        bound = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets)
        log.info("%s listening on %s", "LMTP" if settings.smtp.lmtp else "SMTP", bound)
    sd_notify("READY=1")
    log.info("mailgate running (database %s)", rt.engine.url.render_as_string(hide_password=True))

    await stop.wait()
    sd_notify("STOPPING=1")
    log.info("stopping")
    if server is not None:
        server.close()
        await server.wait_closed()
    for task in pollers:
        task.cancel()
    await asyncio.gather(*pollers, return_exceptions=True)
    scheduler.shutdown(wait=False)
    done, pending = await asyncio.wait(tasks.values(), timeout=DRAIN_SECONDS)
    for task in pending:
        log.warning("%s did not finish within %.0fs: cancelled", task.get_name(), DRAIN_SECONDS)
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    rt.engine.dispose()
    rt.spool_engine.dispose()
    log.info("stopped")
    return 0


def start_imap_pollers(rt: Runtime, ingest: IngestWorker, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    if not rt.settings.imap:
        return []
    from mailgate.transport.imap import ImapPoller

    tasks = []
    for account in rt.settings.imap:
        poller = ImapPoller(account, rt.spool_engine, rt.blobs, process=ingest.process)
        tasks.append(asyncio.create_task(poll_under_lease(rt, poller, account.name, ingest.worker, stop),
                                         name=f"imap:{account.name}"))
    return tasks


LEASE_TTL = timedelta(seconds=60)


async def poll_under_lease(rt: Runtime, poller: Any, name: str, holder: str, stop: asyncio.Event) -> None:
    """Run a mailbox's poller only while this instance holds its lease, so that with several
    instances on one database each mailbox is fetched by one of them at a time."""
    from mailgate.jobs import drop_lease, take_lease

    lease = f"imap:{name}"
    try:
        while not stop.is_set():
            if not await asyncio.to_thread(take_lease, rt, lease, holder, LEASE_TTL):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), LEASE_TTL.total_seconds() / 3)
                continue
            held = asyncio.Event()  # set when the lease is lost or we stop
            runner = asyncio.create_task(poller.run(held))
            while not runner.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), LEASE_TTL.total_seconds() / 3)
                if stop.is_set() or not await asyncio.to_thread(take_lease, rt, lease, holder, LEASE_TTL):
                    held.set()
                    break
            await runner
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(drop_lease, rt, lease, holder)
