"""The work process of `mailgate run`: the ingest worker.

The daemon's main process only moves bytes (SMTP/LMTP listener, IMAP pollers,
the outbox sender) and runs the scheduler; parsing, routing, spam scoring and
rendering happen here, in a child process. Two reasons: a Python thread doing CPU work
holds the GIL and made every SMTP 250 wait behind it, and a message that
crashes the interpreter (a C extension fault, memory exhaustion) takes down
only this process, which the main process restarts; its claim is released
and counted, so the message ends as a dead letter instead of a crash loop.
It forks parse-ahead helpers at start (mailgate.ingest.ahead) to use a second core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, NoReturn

from mailgate import spool
from mailgate.config import Settings
from mailgate.journal import JOURNAL_FILE, AcceptJournal
from mailgate.store.engine import is_postgres

if TYPE_CHECKING:
    from mailgate.ingest.ahead import ParseAhead
    from mailgate.ingest.pipeline import Result
    from mailgate.runtime import Runtime

log = logging.getLogger("mailgate.worker")  # also when run as __main__
WAKE_SIGNAL = signal.SIGUSR1  # main -> work process: a message was accepted
SENT_SIGNAL = signal.SIGUSR2  # work process -> main: mail was queued in the outbox
HELPER_DIED_EXIT = 70  # EX_SOFTWARE: a parse-ahead helper died; the main process restarts us


def journal_for(rt: Runtime) -> AcceptJournal | None:
    """SQLite: the SMTP acceptance journal (see mailgate.journal). PostgreSQL: none."""
    if is_postgres(rt.engine):
        return None
    return AcceptJournal(rt.settings.helpdesk.data_dir / JOURNAL_FILE, rt.blobs,
                         busy_timeout=rt.settings.database.busy_timeout_seconds)


class IngestWorker:
    """Claims inbound rows in small batches and runs the pipeline on each, one transaction
    per message (in a thread); with `ahead`, helper processes parse each batch while its
    first messages are applied. Beside it, a second thread moves SMTP journal rows into
    the spool: writing their blobs is mostly system calls, which then overlap the
    pipeline's Python instead of coming before it."""

    def __init__(self, rt: Runtime, worker: str, journal: AcceptJournal | None = None,
                 ahead: ParseAhead | None = None) -> None:
        self.rt = rt
        self.worker = worker
        self.journal = journal
        self.ahead = ahead
        self.wake = asyncio.Event()  # the spool may have new rows
        self.journal_wake = asyncio.Event()  # the journal may have new rows

    def woken(self) -> None:
        """The main process accepted a message (into the journal, or the spool directly)."""
        self.journal_wake.set()
        self.wake.set()

    def next_messages(self) -> list[Result]:
        from mailgate.ingest.pipeline import run_batch

        # A larger batch when parsing ahead: the helper idles only on a batch's first message.
        return run_batch(self.rt, self.worker, limit=20 if self.ahead else 10, ahead=self.ahead)

    async def move_journal(self, stop: asyncio.Event) -> None:
        """Move SMTP journal rows into the spool until stopped; wakes the pipeline."""
        assert self.journal is not None
        while not stop.is_set():
            self.journal_wake.clear()
            try:
                # The durable engine: the journal rows are deleted only after this commit,
                # so it must survive a power loss as the acceptance did.
                moved = await asyncio.to_thread(self.journal.drain, self.rt.spool_engine)
            except Exception:  # a full disk, a broken blob directory: the rows stay; retry
                log.exception("moving accepted mail from the journal into the spool failed")
                await asyncio.sleep(1.0)
                continue
            if moved:
                self.wake.set()
                continue
            await _wait_any(self.journal_wake, stop, self.rt.settings.helpdesk.worker_poll_seconds)

    async def run(self, stop: asyncio.Event, on_processed: Callable[[], None] | None = None) -> None:
        mover = asyncio.create_task(self.move_journal(stop)) if self.journal is not None else None
        if mover is not None:
            # SMTP keeps answering 250 into the journal: if nothing empties it, stop, and let
            # the main process restart us (the mover catches what it expects; this is a bug).
            mover.add_done_callback(lambda task: _mover_ended(task, stop))
        try:
            await self.process_spool(stop, on_processed)
        finally:
            if mover is not None:
                stop.set()
                # Not cancelled: a drain under way finishes before the journal closes. A
                # failure of its own was logged by _mover_ended.
                await asyncio.gather(mover, return_exceptions=True)

    async def process_spool(self, stop: asyncio.Event, on_processed: Callable[[], None] | None) -> None:
        while not stop.is_set():
            self.wake.clear()
            try:
                results = await asyncio.to_thread(self.next_messages)
            except asyncio.CancelledError:
                raise
            except BrokenProcessPool as exc:
                # A message may have crashed a helper, or got it stuck. Exit: the main
                # process restarts us and the messages we held are retried, one at a time
                # (spool.claim_batch). The helpers are killed first: they ignore SIGTERM,
                # and one that is stuck would keep the pool's shutdown waiting for ever.
                from mailgate.ingest.pipeline import ParseTimeout  # loaded: the work process ran it

                if self.ahead is not None:
                    self.ahead.kill()
                _helper_died(f"a parse-ahead helper is stuck: {exc}" if isinstance(exc, ParseTimeout)
                             else "a parse-ahead helper process died")
            except Exception as exc:  # the database itself is failing: back off, never crash-loop
                log.exception("ingest worker pass failed")
                results = []
                await asyncio.sleep(1.0)
                if _database_unavailable(exc):
                    # Anything else keeps its claims until they are stale, attempts counted,
                    # so that a message that breaks recording its own failure still ends.
                    await self.give_back_claims(stop)
            if results:
                if on_processed is not None:
                    on_processed()
                continue
            await _wait_any(self.wake, stop, self.rt.settings.helpdesk.worker_poll_seconds)


    async def give_back_claims(self, stop: asyncio.Event) -> None:
        """After a failed pass, the rest of its batch is still claimed by us; left so, it
        would wait for the stale-claim timeout (10 minutes) with an attempt counted. Given
        back as soon as the database answers, before anything new is claimed."""
        from mailgate import spool

        delay = 1.0
        while not stop.is_set():
            try:
                given = await asyncio.to_thread(spool.give_back_claims, self.rt.engine, self.worker)
            except Exception as exc:
                log.warning("claims not given back yet (%s: %s); trying again in %.0f s",
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "", delay)
                await _wait_any(asyncio.Event(), stop, delay)  # not self.wake: new mail must not spin this
                delay = min(delay * 2, 30.0)
                continue
            if given:
                log.warning("%d claimed message(s) of the failed pass queued again", given)
            return


def _database_unavailable(exc: Exception) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    from mailgate.ingest.pipeline import database_unavailable

    return isinstance(exc, OperationalError | InterfaceError) and database_unavailable(exc)


def _mover_ended(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    if task.cancelled() or task.exception() is None:
        return
    log.error("the journal mover failed: the work process stops to be restarted",
              exc_info=task.exception())
    stop.set()


async def _wait_any(event: asyncio.Event, stop: asyncio.Event, timeout: float) -> None:
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())]
    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()


def _helper_died(what: str = "a parse-ahead helper process died") -> NoReturn:
    log.error("%s: the work process exits to be restarted", what)
    raise SystemExit(HELPER_DIED_EXIT)


def start_work(settings: Settings) -> tuple[Runtime, ParseAhead | None]:
    """Build what the work process needs, then fork the parse-ahead helpers, before any
    thread exists (so before asyncio.run)."""
    # Imported here, in the work process: the main process, which only moves bytes,
    # never loads the pipeline, the spam model or the templates.
    from mailgate.runtime import Runtime

    rt = Runtime.build(settings)
    rt.spam_model()  # load (or seed) the model before mail arrives; the helpers inherit it
    processes = settings.helpdesk.parse_processes
    if not processes:
        return rt, None
    import gc

    from mailgate.ingest.ahead import ParseAhead

    # Objects that exist now live as long as the process: keep the collector from writing
    # to them, so the helpers' copies of their pages stay shared with ours.
    gc.freeze()
    ahead = ParseAhead(rt, processes)
    log.info("%d parse-ahead helper process(es) started", processes)
    return rt, ahead


async def work(rt: Runtime, ahead: ParseAhead | None, parent_pid: int | None = None) -> None:
    ingest = IngestWorker(rt, spool.worker_id(), journal_for(rt), ahead)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(WAKE_SIGNAL, ingest.woken)  # the listener accepted a message
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await ingest.run(stop, on_processed=parent_notifier(parent_pid))
    finally:
        if ahead is not None:
            ahead.close()
    if ingest.journal is not None:
        ingest.journal.close()
    rt.engine.dispose()
    rt.spool_engine.dispose()
    log.info("work process stopped")


def parent_notifier(parent_pid: int | None) -> Callable[[], None] | None:
    """Wake the main process's outbox sender after a batch that queued mail, but only the
    `mailgate run` that started us: SIGUSR2 would kill a shell that ran us by hand."""
    if parent_pid is None:
        return None

    def notify() -> None:
        if os.getppid() == parent_pid:  # not re-parented: our main process is still there
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(parent_pid, SENT_SIGNAL)

    return notify


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own arena (up to 8 per core); our few
    threads take turns, and the extra arenas only hold freed memory (about 10 MB measured
    with bench/smtp_ingest.py). MALLOC_ARENA_MAX in the environment, if set, wins."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).mallopt(-8, arenas)  # M_ARENA_MAX


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: SIGTERM us when the main process dies, even by SIGKILL, so no orphan works on.
    The kernel only signals deaths after the request: a main process that died while we
    were starting has already left us to init, so check for that once, afterwards."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent_pid is not None and os.getppid() != parent_pid:
        raise SystemExit("mailgate work process: the main process is gone")


def main(argv: list[str] | None = None) -> None:
    """`python -m mailgate.worker --config PATH`: started by `mailgate run`, not by hand."""
    import argparse

    from mailgate.config import ConfigError, load_settings

    parser = argparse.ArgumentParser(prog="mailgate-work")
    parser.add_argument("--config", required=True)
    parser.add_argument("--parent-pid", type=int, default=None, help="the `mailgate run` to wake (SIGUSR2)")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    limit_malloc_arenas()
    # The spam model's numpy needs no BLAS threads, and the parse-ahead helpers are forked
    # from this process: it should have a single thread then. Set before numpy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # The main process decides when we stop (after it stopped accepting): a Ctrl-C sent
    # to the whole process group must not cut a message in half.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        raise SystemExit(f"mailgate work process: config error: {exc}") from None
    logging.basicConfig(level=settings.log.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apscheduler", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Accepting mail is what a sender waits for; processing can lag a little behind.
    with contextlib.suppress(OSError):
        os.nice(5)
    try:
        rt, ahead = start_work(settings)
    except BrokenProcessPool:  # the helper died while it was starting
        _helper_died()
    asyncio.run(work(rt, ahead, args.parent_pid))


class WorkProcess:
    """Starts the work process, wakes it, restarts it if it dies, stops it on request.

    A plain child process (not multiprocessing): it reads the same config file, is woken by
    SIGUSR1 when a message was accepted, stopped by SIGTERM, and sends SIGUSR2 to its parent
    when it queued mail (the parent must handle SIGUSR2 before starting it).
    """

    CHECK_SECONDS = 1.0
    RESTART_MIN_SECONDS = 1.0
    RESTART_MAX_SECONDS = 30.0
    HEALTHY_SECONDS = 60.0

    def __init__(self, settings: Settings) -> None:
        if settings.path is None:
            raise ValueError("the work process needs the settings' config file")
        self.settings = settings
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        # SIGUSR1 kills a process that has no handler yet. An ignored signal stays ignored
        # across exec, so the child cannot die of a wake-up while it is still starting.
        signal.signal(WAKE_SIGNAL, signal.SIG_IGN)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailgate.worker", "--config", str(self.settings.path),
            "--parent-pid", str(os.getpid()))

    def notify(self) -> None:
        if self.alive():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(WAKE_SIGNAL)

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def supervise(self, stop: asyncio.Event, release_claims: Callable[[], object]) -> None:
        """Restart the work process with backoff if it dies while we are running.

        The pause before a restart doubles up to RESTART_MAX_SECONDS and falls back to
        RESTART_MIN_SECONDS only once a process has stayed up HEALTHY_SECONDS: one that
        dies a few seconds into every start (a bad config value it reads late, a database
        it cannot reach) must not be restarted every second. A stop ends the pause.
        """
        delay = self.RESTART_MIN_SECONDS
        started = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.CHECK_SECONDS)
            if stop.is_set():
                break
            if self.alive():
                if time.monotonic() - started >= self.HEALTHY_SECONDS:
                    delay = self.RESTART_MIN_SECONDS
                continue
            code = self.process.returncode if self.process else None
            log.error("work process died (exit code %s): restarting in %gs", code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
            delay = min(delay * 2, self.RESTART_MAX_SECONDS)
            await asyncio.to_thread(release_claims)
            await self.start()
            started = time.monotonic()

    async def stop(self, timeout: float) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            log.warning("work process did not finish within %.0fs: killed", timeout)
            self.process.kill()
            await self.process.wait()


if __name__ == "__main__":
    main()
