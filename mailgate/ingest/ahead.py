"""Parse ahead: the work process's helper processes parse and score claimed messages
while the work process applies the ones before them.

Parsing and spam scoring (`pipeline.prepare`) are pure and cost about a third of a
message's work; the rest (routing, the transaction, rendering notices) needs the
database and stays in the work process. With a helper on the second core the two
halves overlap: while message n is applied, message n+1 is parsed.

The helpers are forked from the work process once, at its start, while it still has
a single thread (forking a process that has threads can copy a held lock), so they
share its loaded code and spam model. They never touch the database. A helper that
dies (a message that crashes the interpreter) breaks the pool; the work process then
exits and the main process restarts it, exactly as if the work process itself had
died on that message: the claims are released and counted, a message tried before is
claimed alone next time, and one that keeps crashing ends as a dead letter. A helper
that takes longer than helpdesk.parse_timeout_seconds over one message is killed and
takes the same path (pipeline.ParseTimeout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING

from mailgate.ingest.pipeline import Prepared, prepare

if TYPE_CHECKING:
    from mailgate.runtime import Runtime
    from mailgate.store.tables import Inbound

_runtime: Runtime | None = None  # in a helper: the work process's, inherited by fork


def _helper_start(rt: Runtime, work_pid: int) -> None:
    global _runtime
    _runtime = rt
    # The work process decides when its helpers stop (it shuts the pool down when it
    # stops); if it is killed outright, the kernel kills them with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != work_pid:  # it died before the request above: nobody would kill us
        os._exit(1)


def _started() -> bool:
    return _runtime is not None


def prepare_stored(raw_sha256: str) -> Prepared:
    """In a helper: read a stored message and prepare it. The stdlib MIME tree is only for
    the spam score, which is done here; it is dropped rather than pickled back."""
    assert _runtime is not None, "prepare_stored runs in a parse-ahead helper"
    prepared = prepare(_runtime, _runtime.blobs.get(raw_sha256))
    return dataclasses.replace(prepared, parsed=dataclasses.replace(prepared.parsed, mime=None))


class ParseAhead:
    """A pool of `processes` helpers; `submit` hands them a claimed batch."""

    def __init__(self, rt: Runtime, processes: int) -> None:
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                        initializer=_helper_start, initargs=(rt, os.getpid()))
        # With fork, the pool starts every helper at the first submit: do it now, while the
        # caller has one thread, and fail here rather than on the first message.
        if not self.pool.submit(_started).result():
            raise RuntimeError("parse-ahead helper did not start")
        self._closing = threading.Event()
        threading.Thread(target=self._kill_all_when_one_dies, name="parse-ahead-watch", daemon=True).start()

    def _kill_all_when_one_dies(self) -> None:
        """Once a helper dies, the executor takes the pool as broken and joins the others
        before anything else; from Python 3.12 on it holds the lock submit() needs while it
        waits. A helper busy or stuck on a message (they ignore SIGTERM) then hung the work
        process in submit() for good. Killing the rest at once lets the executor finish and
        submit() raise BrokenProcessPool, as in 3.11."""
        sentinels = [process.sentinel for process in list(getattr(self.pool, "_processes", {}).values())]
        while sentinels and not self._closing.is_set():
            if multiprocessing.connection.wait(sentinels, timeout=1.0):
                if not self._closing.is_set():
                    self.kill()
                return

    def submit(self, rows: list[Inbound]) -> dict[int, Future[Prepared]]:
        return {row.id: self.pool.submit(prepare_stored, row.raw_sha256) for row in rows if row.id is not None}

    def kill(self) -> None:
        """Kill the helpers (one is stuck: pipeline.ParseTimeout), so that close() does not
        wait for it. The executor has no public way to do this before Python 3.14."""
        for process in list(getattr(self.pool, "_processes", {}).values()):
            with contextlib.suppress(OSError, ValueError):
                process.kill()

    def close(self) -> None:
        self._closing.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
