"""The work process of `mailgate run`: the ingest worker and the outbox sender.

The daemon's main process only moves bytes (SMTP/LMTP listener, IMAP pollers)
and runs the scheduler; parsing, routing, spam scoring, rendering and sending
happen here, in a child process. Two reasons: a Python thread doing CPU work
holds the GIL and made every SMTP 250 wait behind it, and a message that
crashes the interpreter (a C extension fault, memory exhaustion) takes down
only this process, which the main process restarts; its claim is released
and counted, so the message ends as a dead letter instead of a crash loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.synchronize import Event as ProcessEvent
from typing import TYPE_CHECKING

from mailgate import spool
from mailgate.config import Settings
from mailgate.journal import AcceptJournal
from mailgate.store.engine import is_postgres

if TYPE_CHECKING:
    from mailgate.ingest.pipeline import Result
    from mailgate.runtime import Runtime

log = logging.getLogger(__name__)


def journal_for(rt: Runtime) -> AcceptJournal | None:
    """SQLite: the SMTP acceptance journal (see mailgate.journal). PostgreSQL: none."""
    if is_postgres(rt.engine):
        return None
    return AcceptJournal(rt.settings.helpdesk.data_dir / "accept-journal.db", rt.blobs,
                         busy_timeout=rt.settings.database.busy_timeout_seconds)


class IngestWorker:
    """Moves journal rows into the spool, claims inbound rows in small batches and runs the
    pipeline on each, one transaction per message (in a thread)."""

    def __init__(self, rt: Runtime, worker: str, journal: AcceptJournal | None = None) -> None:
        self.rt = rt
        self.worker = worker
        self.journal = journal
        self.wake = asyncio.Event()

    def next_messages(self) -> list[Result]:
        from mailgate.ingest.pipeline import run_batch

        if self.journal is not None:
            # The durable engine: the journal rows are deleted only after this commit, so
            # it must survive a power loss as the acceptance did.
            self.journal.drain(self.rt.spool_engine)
        return run_batch(self.rt, self.worker)

    async def run(self, stop: asyncio.Event, on_processed: asyncio.Event | None = None) -> None:
        while not stop.is_set():
            self.wake.clear()
            try:
                results = await asyncio.to_thread(self.next_messages)
            except asyncio.CancelledError:
                raise
            except Exception:  # the database itself is failing: back off, never crash-loop
                log.exception("ingest worker pass failed")
                results = []
                await asyncio.sleep(1.0)
            if results:
                if on_processed is not None:
                    on_processed.set()
                continue
            waits = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=self.rt.settings.helpdesk.worker_poll_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()


async def work(settings: Settings, wake: ProcessEvent, stop: ProcessEvent) -> None:
    # Imported here, in the work process: the main process, which only moves bytes,
    # never loads the pipeline, the spam model or the templates.
    from mailgate.outbox import OutboxSender
    from mailgate.runtime import Runtime

    rt = Runtime.build(settings)
    await asyncio.to_thread(rt.spam_model)  # load (or seed) the model before mail arrives
    name = spool.worker_id()
    ingest = IngestWorker(rt, name, journal_for(rt))
    sender = OutboxSender(rt.engine, settings, name)
    local_stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def bridge() -> None:
        # multiprocessing events are blocking: forward them to the loop from a thread.
        while not stop.is_set():
            if wake.wait(0.25):
                wake.clear()
                loop.call_soon_threadsafe(ingest.wake.set)
        loop.call_soon_threadsafe(local_stop.set)

    threading.Thread(target=bridge, name="wake-bridge", daemon=True).start()
    await asyncio.gather(ingest.run(local_stop, sender.wake), sender.run(local_stop))
    if ingest.journal is not None:
        ingest.journal.close()
    rt.engine.dispose()
    log.info("work process stopped")


def work_process_main(settings: Settings, wake: ProcessEvent, stop: ProcessEvent, log_level: str) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apscheduler", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The main process decides when we stop (after it stopped accepting): a Ctrl-C sent
    # to the whole process group must not cut a message in half.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Accepting mail is what a sender waits for; processing can lag a little behind.
    with contextlib.suppress(OSError):
        os.nice(5)
    asyncio.run(work(settings, wake, stop))


class WorkProcess:
    """Starts the work process, restarts it if it dies, stops it on request."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = multiprocessing.get_context("spawn")
        self.wake: ProcessEvent = self.ctx.Event()
        self.stop_event: ProcessEvent = self.ctx.Event()
        self.process: multiprocessing.process.BaseProcess | None = None

    def start(self) -> None:
        self.process = self.ctx.Process(
            target=work_process_main, name="mailgate-work",
            args=(self.settings, self.wake, self.stop_event, self.settings.log.level))
        self.process.start()

    def notify(self) -> None:
        self.wake.set()

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    async def supervise(self, stop: asyncio.Event, engine_release: object) -> None:
        """Restart the work process with backoff if it dies while we are running."""
        delay = 1.0
        while not stop.is_set():
            with_timeout = asyncio.ensure_future(stop.wait())
            await asyncio.wait([with_timeout], timeout=1.0)
            with_timeout.cancel()
            if stop.is_set() or self.alive():
                if self.alive():
                    delay = 1.0
                continue
            code = self.process.exitcode if self.process else None
            log.error("work process died (exit code %s): restarting in %.0fs", code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            if callable(engine_release):
                await asyncio.to_thread(engine_release)
            self.start()

    async def stop(self, timeout: float) -> None:
        self.stop_event.set()
        if self.process is None:
            return
        await asyncio.to_thread(self.process.join, timeout)
        if self.process.is_alive():
            log.warning("work process did not finish within %.0fs: terminating", timeout)
            self.process.kill()
            await asyncio.to_thread(self.process.join, 5)
