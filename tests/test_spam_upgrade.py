"""A site's untouched copy of an older shipped spam model gives way to the current one."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from mailgate.config import load_settings
from mailgate.runtime import Runtime, load_spam_model, newer_shipped_model
from mailgate.spamfilter import SpamModel
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = SpamModel.load(REPO / "models" / "spam-model.npz")
HISTORY = json.loads((REPO / "models" / "spam-model-history.json").read_text())["shipped_trained_at"]
OLDER = HISTORY[0]  # the first model mailgate shipped


def copy_of_older_shipped(path: Path, *, learned: bool = False, trained_at: str = OLDER) -> None:
    old = SHIPPED.copy()
    old._trained_at = old._updated_at = trained_at
    old._feature_version = 2
    if learned:
        old.learn_bytes(b"From: a@example.org\nSubject: hello\n\nhello there\n", is_spam=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    old.save(path)


def runtime_for(workdir: Path) -> Runtime:
    settings = load_settings(write_config(workdir, spam_enabled=True))
    return Runtime(settings=settings, engine=None, blobs=None, renderer=None)  # type: ignore[arg-type]


def test_the_current_model_is_in_the_history() -> None:
    assert SHIPPED.meta["trained_at"] in HISTORY and SHIPPED.meta["updated_at"] == SHIPPED.meta["trained_at"]


def test_an_untouched_copy_of_an_older_shipped_model_is_replaced(workdir: Path) -> None:
    rt = runtime_for(workdir)
    path = rt.settings.spam_model_path
    copy_of_older_shipped(path)
    assert load_spam_model(rt.settings).meta == SHIPPED.meta  # the CLI scores with the current one
    assert SpamModel.load(path).meta["trained_at"] == OLDER  # ... and writes nothing
    model = rt.spam_model()
    assert model is not None and model.meta == SHIPPED.meta
    assert SpamModel.load(path).meta == SHIPPED.meta
    assert newer_shipped_model(SpamModel.load(path)) is None


def test_a_copy_that_learned_or_a_model_trained_here_is_kept(workdir: Path) -> None:
    for case, kwargs in (("learned", {"learned": True}), ("trained", {"trained_at": "2026-01-05T10:00:00+00:00"})):
        rt = runtime_for(workdir / case)
        path = rt.settings.spam_model_path
        copy_of_older_shipped(path, **kwargs)  # type: ignore[arg-type]
        before = SpamModel.load(path).meta
        model = rt.spam_model()
        assert model is not None and model.meta == before, case
        assert SpamModel.load(path).meta == before, case
        assert load_spam_model(rt.settings).meta == before, case


def test_a_first_lesson_on_an_older_shipped_copy_replaces_it_without_waiting_for_itself(workdir: Path) -> None:
    # A process whose first use of the model is a lesson (`spam quarantine release` after a
    # package upgrade) holds the learners' lock when it finds the older copy to replace.
    rt = runtime_for(workdir)
    path = rt.settings.spam_model_path
    copy_of_older_shipped(path)
    done: list[bool] = []
    learner = threading.Thread(target=lambda: done.append(
        rt.learn_spam(b"From: a@example.org\nSubject: hello\n\nhello there\n", False)), daemon=True)
    learner.start()
    learner.join(timeout=60)
    assert done == [True], "learn_spam waited for its own lock"
    model = SpamModel.load(path)
    assert model.meta["trained_at"] == SHIPPED.meta["trained_at"] and model.meta["n_ham"] == SHIPPED.meta["n_ham"] + 1


def test_an_older_shipped_copy_that_cannot_be_replaced_still_scores(workdir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A model directory the daemon's user may not write: every message must not fail on it.
    rt = runtime_for(workdir)
    path = rt.settings.spam_model_path
    copy_of_older_shipped(path)

    def read_only(self: SpamModel, target: Path) -> None:
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(SpamModel, "save", read_only)
    model = rt.spam_model()
    assert model is not None and model.meta["trained_at"] == OLDER
    assert rt.spam_model() is model  # not tried again on every message


def test_the_first_start_seeds_the_shipped_model_only_where_spam_train_saved_none(workdir: Path) -> None:
    """`spam train` saves under the learners' lock; a daemon seeding the shipped copy at the
    same moment must wait for it and then keep the trained model, not write over it."""
    from mailgate.runtime import _file_lock, save_spam_model

    rt = runtime_for(workdir)
    path = rt.settings.spam_model_path
    trained = SpamModel.empty(n_features=2**10)
    trained.fit([(b"Subject: hello\n\nmeeting notes", False), (b"Subject: WIN\n\ncasino prize", True)])
    with _file_lock(path):  # spam train, about to save
        seeding = threading.Thread(target=rt.spam_model)
        seeding.start()
        seeding.join(1.0)
        assert not path.exists()  # the seed waits for the lock
        save_spam_model(trained, path)
    seeding.join(30)
    assert SpamModel.load(path).meta["n_features"] == 2**10  # the trained one, kept
