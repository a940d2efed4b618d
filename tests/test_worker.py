"""The work process's signalling to its parent, and the supervisor's restarts of it."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from mailgate import worker


def test_a_worker_started_by_hand_signals_nobody() -> None:
    assert worker.parent_notifier(None) is None


def test_it_wakes_only_the_main_process_that_started_it(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(worker.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    notify = worker.parent_notifier(4242)
    assert notify is not None
    monkeypatch.setattr(worker.os, "getppid", lambda: 4242)
    notify()
    monkeypatch.setattr(worker.os, "getppid", lambda: 1)  # re-parented: our main process died
    notify()
    assert sent == [(4242, worker.SENT_SIGNAL)]


class _DyingWorkProcess(worker.WorkProcess):
    """A work process that exits at once, every time it is started."""

    def __init__(self) -> None:
        self.process = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        self.process = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(3)")
        await self.process.wait()


def test_a_stop_ends_the_pause_before_a_restart(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> int:
        work = _DyingWorkProcess()
        work.CHECK_SECONDS = 0.01
        work.RESTART_MIN_SECONDS = 3600.0  # a stop must not wait for this
        await work.start()
        stop = asyncio.Event()
        supervisor = asyncio.create_task(work.supervise(stop, lambda: None))
        while "restarting in" not in caplog.text:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(supervisor, 60)
        return work.starts

    assert asyncio.run(scenario()) == 1  # stopped during the pause: not started again


def test_a_process_that_keeps_dying_is_restarted_ever_more_slowly(caplog: pytest.LogCaptureFixture) -> None:
    """Even when each one lived longer than a check: only HEALTHY_SECONDS up resets the pause."""

    async def scenario() -> list[str]:
        work = _DyingWorkProcess()
        work.CHECK_SECONDS = 0.05
        work.RESTART_MIN_SECONDS = 0.01
        work.RESTART_MAX_SECONDS = 0.04
        work.HEALTHY_SECONDS = 3600.0
        await work.start()
        stop = asyncio.Event()
        supervisor = asyncio.create_task(work.supervise(stop, lambda: None))
        while work.starts < 5:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(supervisor, 60)
        return [r.getMessage() for r in caplog.records if "restarting in" in r.getMessage()]

    with caplog.at_level(logging.ERROR, logger=worker.log.name):
        pauses = asyncio.run(scenario())
    delays = [float(m.rsplit("restarting in ", 1)[1].rstrip("s")) for m in pauses[:4]]
    assert delays == [0.01, 0.02, 0.04, 0.04]


def test_a_parse_timeout_survives_a_database_error_while_it_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the work process's exit kills the stuck helper; if recording the timeout failed
    # and that error took its place, the next batch would wait behind the same helper.
    from types import SimpleNamespace

    from sqlalchemy.exc import OperationalError

    from mailgate import spool
    from mailgate.ingest import pipeline

    def timed_out(*args: object) -> None:
        raise pipeline.ParseTimeout("parsing took longer than 1 s (helpdesk.parse_timeout_seconds)")

    def locked(*args: object, **kwargs: object) -> None:
        raise OperationalError("UPDATE inbound", {}, Exception("database is locked"))

    monkeypatch.setattr(pipeline, "process_claimed", timed_out)
    monkeypatch.setattr(spool, "fail", locked)
    rt = SimpleNamespace(settings=SimpleNamespace(helpdesk=SimpleNamespace(max_attempts=5)), blobs=None, engine=None)
    inbound = SimpleNamespace(id=7, raw_sha256="0" * 64, claimed_by="host:1")
    with pytest.raises(pipeline.ParseTimeout):
        pipeline.process_one(rt, inbound)  # type: ignore[arg-type]
