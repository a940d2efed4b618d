"""The work process's signalling to its parent, without starting processes."""

from __future__ import annotations

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
