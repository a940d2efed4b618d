"""Spam CLI (train/eval/score on a corpus slice, hostile model files), the runtime's model
reloading and copy-on-learn, and the quarantine purge job."""

from __future__ import annotations

import json
import mailbox
import os
import shutil
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from mailgate.config import load_settings
from mailgate.spamfilter import SpamModel
from tests.conftest import cli, cli_json, mail, query_json, write_config

EVAL_KEYS = {"accuracy", "spam_recall", "ham_false_positive_rate", "n_ham", "n_spam"}


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def copy_slice(paths: list[Path], target: Path) -> Path:
    target.mkdir(parents=True)
    for p in paths:
        shutil.copy(p, target / p.name)
    return target


@pytest.fixture
def slices(corpus: Path, tmp_path: Path) -> dict[str, Path]:
    """Train on 200 ham + 100 spam (every 10th/5th file), evaluate on 100 + 50 others."""
    ham, spam = files(corpus / "easy-ham-1"), files(corpus / "spam-1")
    return {
        "ham": copy_slice(ham[::10][:200], tmp_path / "ham"),
        "spam": copy_slice(spam[::5][:100], tmp_path / "spam"),
        "eval_ham": copy_slice(ham[5::10][:100], tmp_path / "eval-ham"),
        "eval_spam": copy_slice(spam[2::5][:50], tmp_path / "eval-spam"),
    }


def test_train_eval_score_round_trip(workdir: Path, slices: dict[str, Path]) -> None:
    cfg = write_config(workdir)
    out = cli(cfg, "spam", "train", "--ham", str(slices["ham"]), "--spam", str(slices["spam"])).stdout.decode()
    model_path = workdir / "data" / "spam-model.npz"  # the configured path: data_dir/spam-model.npz
    assert out.startswith("trained on 200 ham and 100 spam in ") and str(model_path) in out
    meta = SpamModel.load(model_path).meta
    assert (meta["n_ham"], meta["n_spam"]) == (200, 100)

    report = cli_json(cfg, "spam", "eval", "--ham", str(slices["eval_ham"]), "--spam", str(slices["eval_spam"]))
    assert set(report) == EVAL_KEYS
    assert (report["n_ham"], report["n_spam"]) == (100, 50)
    # Loose floors: a 300-message model, not the shipped-model bar.
    assert report["accuracy"] >= 0.85 and report["ham_false_positive_rate"] <= 0.05

    text = cli(cfg, "spam", "eval", "--ham", str(slices["eval_ham"]), "--spam", str(slices["eval_spam"]))
    assert "accuracy" in text.stdout.decode()

    spam_file, ham_file = files(slices["spam"])[0], files(slices["ham"])[0]
    s = cli_json(cfg, "spam", "score", str(spam_file))
    h = cli_json(cfg, "spam", "score", str(ham_file))
    assert set(s) == {"score", "is_spam", "known_words"}
    assert s["is_spam"] is True and s["score"] >= 0.9
    assert h["is_spam"] is False and h["score"] < 0.5
    piped = cli(cfg, "spam", "score", "-", "--json", input=spam_file.read_bytes())
    assert json.loads(piped.stdout) == s


def test_train_reads_mbox_and_maildir_and_writes_out(workdir: Path, slices: dict[str, Path]) -> None:
    cfg = write_config(workdir)
    box = mailbox.mbox(workdir / "ham.mbox")
    for p in files(slices["ham"])[:30]:
        box.add(p.read_bytes())
    box.close()
    md = mailbox.Maildir(workdir / "spam-maildir")
    for p in files(slices["spam"])[:20]:
        md.add(p.read_bytes())
    out_path = workdir / "custom.npz"
    # DESIGN.md's form, several folders after one --ham; repeating --ham works too.
    out = cli(cfg, "spam", "train", "--ham", str(workdir / "ham.mbox"), str(slices["eval_ham"]),
              "--spam", str(workdir / "spam-maildir"), "--out", str(out_path)).stdout.decode()
    assert out.startswith("trained on 130 ham and 20 spam")
    assert SpamModel.load(out_path).meta["n_spam"] == 20
    assert not (workdir / "data" / "spam-model.npz").exists()

    # Files that are no mail are left out, by name, not learned as messages.
    import gzip

    (slices["eval_ham"] / "empty").write_bytes(b"")
    (slices["eval_ham"] / "old.mbox.gz").write_bytes(gzip.compress(b"From x\nSubject: hi\n\nhello\n"))
    proc = cli(cfg, "spam", "train", "--ham", str(slices["eval_ham"]), "--spam", str(workdir / "spam-maildir"),
               "--out", str(out_path))
    assert proc.stdout.decode().startswith("trained on 100 ham and 20 spam")
    assert proc.stderr.decode().startswith("mailgate: skipped 2 file(s) that are not mail: ")
    assert "old.mbox.gz" in proc.stderr.decode()
    # Named also when nothing usable is left of one kind, which is when it matters most.
    failed = cli(cfg, "spam", "train", "--ham", str(slices["eval_ham"]), "--spam", str(slices["eval_ham"] / "empty"),
                 "--out", str(out_path), check=False)
    assert failed.returncode == 2 and "skipped 3 file(s) that are not mail" in failed.stderr.decode()


def test_train_usage_errors_are_one_line(workdir: Path, slices: dict[str, Path]) -> None:
    cfg = write_config(workdir)
    missing = cli(cfg, "spam", "train", "--ham", str(workdir / "nope"), "--spam", str(slices["spam"]), check=False)
    assert missing.returncode == 2
    assert missing.stderr.decode().strip().count("\n") == 0 and "nope" in missing.stderr.decode()
    empty = workdir / "empty"
    empty.mkdir()
    one_class = cli(cfg, "spam", "train", "--ham", str(empty), "--spam", str(slices["spam"]), check=False)
    assert one_class.returncode == 2 and "need both ham and spam" in one_class.stderr.decode()
    assert not (workdir / "data" / "spam-model.npz").exists()



def test_eval_usage_errors_are_one_line(workdir: Path) -> None:
    cfg = write_config(workdir)
    ham, empty = workdir / "ham", workdir / "empty"
    ham.mkdir()
    empty.mkdir()
    (ham / "1.eml").write_bytes(mail().as_bytes())
    for args, message in [
        (("--ham", str(ham), "--spam", str(empty)), f"--spam: no messages in {empty}"),
        (("--ham", str(empty), "--spam", str(ham)), f"--ham: no messages in {empty}"),
        (("--ham", str(ham), "--spam", str(ham), "--threshold", "7"), "--threshold: must be in (0, 1], got 7.0"),
        (("--ham", str(ham), "--spam", str(ham), "--threshold", "nan"), "--threshold: must be in (0, 1], got nan"),
        (("--ham", str(ham), "--spam", str(ham), "--min-known-words", "2"),
         "--min-known-words: must be in [0, 1], got 2.0"),
    ]:
        proc = cli(cfg, "spam", "eval", *args, "--json", check=False)
        assert (proc.returncode, proc.stdout, proc.stderr.decode()) == (2, b"", f"mailgate: {message}\n"), args
    # Both classes present: figures, exit 0 (the same message as ham and as spam).
    result = cli_json(cfg, "spam", "eval", "--ham", str(ham), "--spam", str(ham))
    assert (result["n_ham"], result["n_spam"]) == (1, 1)

class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_hostile_model_file_is_refused_with_one_line(workdir: Path) -> None:
    cfg = write_config(workdir)
    marker = workdir / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = _RunsCode(marker)
    header = np.frombuffer(json.dumps({"format": "mailgate-spam-model", "version": 1}).encode(), dtype=np.uint8)
    model_path = workdir / "data" / "spam-model.npz"
    model_path.parent.mkdir(parents=True)
    with open(model_path, "wb") as fh:
        np.savez(fh, header=header, feature_count=payload, class_count=payload)
    eml = workdir / "m.eml"
    eml.write_bytes(mail().as_bytes())
    for args in (("spam", "score", str(eml)), ("spam", "eval", "--ham", str(eml), "--spam", str(eml))):
        proc = cli(cfg, *args, check=False)
        err = proc.stderr.decode().strip()
        assert proc.returncode == 1, err
        assert "\n" not in err and "Traceback" not in err
        assert err.startswith("mailgate: ") and "spam-model.npz" in err
        assert proc.stdout == b""
    assert not marker.exists()
    # With the filter on, doctor fails: spam would be ticketed and answered.
    enabled = write_config(workdir, spam_enabled=True)
    doctor = cli(enabled, "doctor", check=False)
    assert doctor.returncode == 1 and "[FAIL] spam model: " in doctor.stdout.decode()
    assert not marker.exists()


def test_score_without_a_trained_file_uses_the_shipped_model(workdir: Path) -> None:
    cfg = write_config(workdir)  # spam filter disabled: scoring by hand still works
    eml = workdir / "m.eml"
    eml.write_bytes(mail().as_bytes())
    result = cli_json(cfg, "spam", "score", str(eml))
    assert result["is_spam"] is False
    assert not (workdir / "data" / "spam-model.npz").exists()  # nothing seeded by a read-only command


def test_release_of_unknown_id_fails(workdir: Path) -> None:
    cfg = write_config(workdir, spam_enabled=True)
    assert cli_json(cfg, "spam", "quarantine", "list") == []
    proc = cli(cfg, "spam", "quarantine", "release", "42", check=False)
    assert proc.returncode == 1 and proc.stderr.decode().strip() == "mailgate: 42: no such message"


def test_quarantine_show_prints_why_text_and_raw_bytes(workdir: Path, corpus: Path) -> None:
    cfg = write_config(workdir, spam_enabled=True)
    spam = sorted((corpus / "spam-1").iterdir())[0].read_bytes()
    cli(cfg, "ingest", input=spam)
    shown = query_json(cfg, "spam", "quarantine", "show", "1")
    assert shown["why"].startswith("spam score ") and shown["spam_score"] >= 0.9
    assert (shown["subject"], shown["envelope_to"]) == ("Life Insurance - Why Pay More?", [])
    assert "Life Insurance" in shown["text"] and not shown["text_truncated"] and shown["size"] == len(spam)
    text = cli(cfg, "spam", "quarantine", "show", "1").stdout.decode()
    assert text.startswith("id:          1\n") and "subject:     Life Insurance - Why Pay More?\n" in text
    assert cli(cfg, "spam", "quarantine", "show", "1", "--raw").stdout == spam  # to save, or to score again
    # Not to a terminal: the bytes as the spammer wrote them may hold escape sequences.
    import pty
    import subprocess

    from tests.conftest import MAILGATE
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([*MAILGATE, "spam", "quarantine", "show", "1", "--raw", "--config", str(cfg)],
                              stdout=terminal, stderr=subprocess.PIPE, timeout=120, cwd=cfg.parent)
    finally:
        os.close(terminal)
        os.close(controller)
    assert (proc.returncode, proc.stderr.decode().strip()) == (
        2, "mailgate: --raw writes the message as received: redirect it to a file or a pipe")
    assert cli(cfg, "spam", "quarantine", "release", "1").returncode == 0
    for args, code, error in [(("1",), 1, "1: not in quarantine (outcome ticket)"),
                              (("7",), 1, "7: no such message"),
                              (("1", "--raw", "--json"), 2, "--raw and --json exclude each other")]:
        proc = cli(cfg, "spam", "quarantine", "show", *args, check=False)
        assert (proc.returncode, proc.stderr.decode().strip()) == (code, f"mailgate: {error}")


def test_held_mail_whose_bytes_are_gone_is_refused_in_one_line_and_stays_held(workdir: Path,
                                                                             corpus: Path) -> None:
    """Damage (a data folder restored without the raw file): no traceback, and a release
    must not mark it released with nothing to ticket."""
    cfg = write_config(workdir, spam_enabled=True)
    cli(cfg, "ingest", input=sorted((corpus / "spam-1").iterdir())[0].read_bytes())
    [held] = cli_json(cfg, "spam", "quarantine", "list")
    for raw_file in (workdir / "data" / "raw").rglob("*"):
        if raw_file.is_file():
            raw_file.unlink()
    for command in ("show", "release"):
        proc = cli(cfg, "spam", "quarantine", command, str(held["id"]), check=False)
        err = proc.stderr.decode().strip()
        assert proc.returncode == 1 and err.startswith(f"mailgate: {held['id']}: its stored bytes cannot be read")
        assert "Traceback" not in err
    assert [r["id"] for r in cli_json(cfg, "spam", "quarantine", "list")] == [held["id"]]


def test_a_release_by_mail_refuses_held_mail_whose_bytes_are_gone_too(workdir: Path) -> None:
    # The CLI and an admin's #release reply both take a message out through take_out.
    from mailgate.quarantine import take_out
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = _runtime(workdir, spam_enabled=True)
    with session_scope(rt.engine) as session:
        held = Inbound(source="smtp", raw_sha256="ab" * 32, received_at=utcnow(), state="done",
                       outcome="quarantined", spam_score=0.99, subject="gone")
        session.add(held)
        session.flush()
        row, why_not = take_out(session, rt.blobs, held.id)
        assert row is None and why_not.startswith("its stored bytes cannot be read (FileNotFoundError")
    with session_scope(rt.engine) as session:
        assert session.get(Inbound, held.id).outcome == "quarantined"


def test_quarantine_show_prints_no_terminal_sequences_from_the_mail(workdir: Path) -> None:
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = _runtime(workdir, spam_enabled=True)
    raw = (b'From: "\x1b]52;c;aGk=\x07" <dana@customer.example>\r\nTo: support@example.com\r\n'
           b"Subject: =?utf-8?b?" + __import__("base64").b64encode("Invoice \u202efdp.exe".encode()) + b"?=\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           b"Hello \x1b[31mRED\x1b[0m and \xc2\x9b2J cleared?\r\n--b\r\nContent-Type: application/octet-stream\r\n"
           b'Content-Disposition: attachment; filename="a\x1b[8mb.exe"\r\n\r\nMZ\r\n--b--\r\n')
    with session_scope(rt.engine) as session:
        session.add(Inbound(source="smtp", raw_sha256=rt.blobs.put(raw), received_at=utcnow(), state="done",
                            outcome="quarantined", spam_score=0.97, subject="Invoice \u202efdp.exe",
                            from_addr="dana@customer.example"))
    out = cli(workdir / "config.toml", "spam", "quarantine", "show", "1").stdout.decode()
    assert "Hello" in out and "RED" in out and "attachment:" in out
    assert not any(c in out for c in ("\x1b", "\x07", "\x9b", "\u202e")), out


# --- runtime: reload on file change, learning on a copy ------------------------------------

def _runtime(workdir: Path, **kw: bool | str):  # noqa: ANN202 - Runtime, imported lazily like the CLI does
    from mailgate.runtime import Runtime
    from mailgate.store import migrate

    rt = Runtime.build(load_settings(write_config(workdir, **kw)))
    migrate.upgrade(rt.engine)
    return rt


def test_a_model_learned_in_another_process_is_used_without_restart(workdir: Path) -> None:
    daemon_rt = _runtime(workdir, spam_enabled=True)
    cli_rt = _runtime(workdir, spam_enabled=True)  # same files, as `spam quarantine release` would be
    raw = mail(subject="Quick question", body="We can get your website on the first page. Free quote.").as_bytes()
    first = daemon_rt.spam_model()
    assert first is not None and daemon_rt.spam_model() is first  # cached while the file is unchanged
    before = first.score_bytes(raw, 0.9).score

    assert cli_rt.learn_spam(raw, True)
    second = daemon_rt.spam_model()
    assert second is not first
    assert second.score_bytes(raw, 0.9).score > before
    assert first.score_bytes(raw, 0.9).score == before  # the old object was never mutated
    assert second.meta["n_spam"] == first.meta["n_spam"] + 1

    # Learners in both processes: neither update is lost. The daemon's lesson moves the
    # message the other process taught as spam; the second process teaches another one.
    assert daemon_rt.learn_spam(raw, False)
    assert cli_rt.learn_spam(mail(subject="Invoice", body="Please send the invoice again.").as_bytes(), False)
    meta = SpamModel.load(workdir / "data" / "spam-model.npz").meta
    assert (meta["n_ham"], meta["n_spam"]) == (first.meta["n_ham"] + 2, first.meta["n_spam"])


def test_scoring_while_learning_is_safe(workdir: Path) -> None:
    rt = _runtime(workdir, spam_enabled=True)
    raw = mail().as_bytes()
    start = rt.spam_model()
    assert start is not None
    errors: list[BaseException] = []
    stop = threading.Event()

    def score() -> None:
        try:
            while not stop.is_set():
                model = rt.spam_model()
                assert model is not None
                assert 0.0 <= model.score_bytes(raw, 0.9).score <= 1.0
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=score) for _ in range(3)]
    for t in threads:
        t.start()
    def learn(learner: int) -> None:
        for i in range(5):
            rt.learn_spam(mail(subject=f"Offer {learner}-{i}", body="Cheap pills").as_bytes(), True)

    learners = [threading.Thread(target=learn, args=(n,)) for n in range(2)]
    for t in learners:
        t.start()
    for t in learners:
        t.join()
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    end = rt.spam_model()
    assert end is not None and end.meta["n_spam"] == start.meta["n_spam"] + 10


def test_spam_filter_off_learns_nothing(workdir: Path) -> None:
    rt = _runtime(workdir)
    assert rt.spam_model() is None
    assert rt.learn_spam(mail().as_bytes(), True) is False
    assert not (workdir / "data" / "spam-model.npz").exists()


# --- the purge job --------------------------------------------------------------------------

def test_a_released_message_that_became_a_dead_letter_is_not_held_again_when_retried(workdir: Path,
                                                                                     corpus: Path) -> None:
    # Held again, it would keep its first received_at and be purged within the hour, unlisted.
    from mailgate import spool
    from mailgate.ingest.pipeline import run_one
    from mailgate.quarantine import release

    rt = _runtime(workdir, spam_enabled=True)
    spam = sorted((corpus / "spam-1").iterdir())[0].read_bytes()
    inbound_id = spool.accept(rt.engine, rt.blobs, spam, source="ingest").inbound_id
    assert run_one(rt, "w", only_id=inbound_id).outcome == "quarantined"  # type: ignore[union-attr]
    assert release(rt, inbound_id).ok
    # Processing fails for good (here: the database was down each time) ...
    assert spool.claim(rt.engine, "w", max_attempts=5, only_id=inbound_id) is not None
    assert spool.fail(rt.engine, inbound_id, "OperationalError: database is locked", max_attempts=5, permanent=True)
    assert spool.state_of(rt.engine, inbound_id) == ("dead", "released")
    # ... and the operator retries it once the database is back: it becomes the ticket it was released as.
    assert spool.requeue(rt.engine, [inbound_id]) == [inbound_id]
    result = run_one(rt, "w", only_id=inbound_id)
    assert result is not None and result.outcome == "ticket"


def test_a_dead_letter_that_was_not_released_is_retried_from_scratch(workdir: Path) -> None:
    from mailgate import spool

    rt = _runtime(workdir, spam_enabled=True)
    inbound_id = spool.accept(rt.engine, rt.blobs, mail().as_bytes(), source="ingest").inbound_id
    assert spool.claim(rt.engine, "w", max_attempts=5, only_id=inbound_id) is not None
    assert spool.fail(rt.engine, inbound_id, "boom", max_attempts=5, permanent=True)
    assert spool.state_of(rt.engine, inbound_id) == ("dead", "dead")
    assert spool.requeue(rt.engine, [inbound_id]) == [inbound_id]
    assert spool.state_of(rt.engine, inbound_id) == ("queued", None)


def test_spam_train_saves_under_the_learners_lock(workdir: Path) -> None:
    # A daemon in the middle of a lesson holds the lock; the trained model must not be saved
    # until it is done, or the daemon's save (old counts and one lesson) would replace it.
    from mailgate.runtime import _file_lock, save_spam_model

    path = workdir / "data" / "spam-model.npz"
    trained = SpamModel.empty(n_features=2**10)
    trained.learn_bytes(mail().as_bytes(), False)
    saved = threading.Event()
    with _file_lock(path):
        saver = threading.Thread(target=lambda: (save_spam_model(trained, path), saved.set()), daemon=True)
        saver.start()
        assert not saved.wait(1.0) and not path.exists()
    assert saved.wait(30) and SpamModel.load(path).meta["n_ham"] == 1


def test_purge_quarantine_drops_only_old_quarantined_mail(workdir: Path) -> None:
    from mailgate.jobs import purge_quarantine
    from mailgate.quarantine import list_quarantine, release
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = _runtime(workdir, spam_enabled=True)
    digest = rt.blobs.put(mail().as_bytes())
    now = utcnow()
    rows = {  # name: (outcome, age in days); retention_days defaults to 30
        "old": ("quarantined", 31), "young": ("quarantined", 29), "old-ticket": ("ticket", 40),
    }
    ids: dict[str, int] = {}
    with session_scope(rt.engine) as session:
        for name, (outcome, age) in rows.items():
            row = Inbound(source="smtp", raw_sha256=digest, received_at=now - timedelta(days=age),
                          state="done", outcome=outcome, spam_score=0.95, subject=name)
            session.add(row)
            session.flush()
            assert row.id is not None
            ids[name] = row.id

    assert purge_quarantine(rt) == 1
    assert [r["subject"] for r in list_quarantine(rt)] == ["young"]
    assert purge_quarantine(rt) == 0
    with session_scope(rt.engine) as session:
        outcomes = {name: session.get(Inbound, i).outcome for name, i in ids.items()}  # type: ignore[union-attr]
    assert outcomes == {"old": "purged", "young": "quarantined", "old-ticket": "ticket"}
    gone = release(rt, ids["old"])
    assert not gone.ok and "not in quarantine" in gone.detail


def test_purge_removes_raw_bytes_no_row_still_needs(workdir: Path) -> None:
    from mailgate.jobs import BLOB_IDLE_SECONDS, purge_quarantine
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = _runtime(workdir, spam_enabled=True)
    long_ago = utcnow().timestamp() - 40 * 86400
    raws = {name: mail(subject=name).as_bytes() for name in ("alone", "shared", "reused", "twice")}
    blobs = {name: rt.blobs.put(raw) for name, raw in raws.items()}
    for digest in blobs.values():
        os.utime(rt.blobs.path_for(digest), (long_ago, long_ago))
    now = utcnow()
    with session_scope(rt.engine) as session:
        for name, digest in blobs.items():
            session.add(Inbound(source="smtp", raw_sha256=digest, received_at=now - timedelta(days=31),
                                state="done", outcome="quarantined", subject=name))
        # the same bytes also arrived later and became a ticket: they must stay
        session.add(Inbound(source="smtp", raw_sha256=blobs["shared"], received_at=now,
                            state="done", outcome="ticket"))
        # the held spam arrived a second time: that row does not keep its bytes
        session.add(Inbound(source="smtp", raw_sha256=blobs["twice"], received_at=now - timedelta(days=31),
                            state="done", outcome="duplicate"))
    # the same bytes are being accepted again right now (put, not yet committed)
    assert rt.blobs.put(raws["reused"]) == blobs["reused"]

    assert purge_quarantine(rt) == 4
    assert not rt.blobs.path_for(blobs["alone"]).exists()
    assert not rt.blobs.path_for(blobs["twice"]).exists()
    assert rt.blobs.path_for(blobs["shared"]).exists()
    assert rt.blobs.path_for(blobs["reused"]).exists()  # touched by the put: not idle
    assert BLOB_IDLE_SECONDS >= 60


def test_purge_takes_the_later_copies_of_held_spam_with_it(workdir: Path) -> None:
    """Over SMTP each delivery gets a Received line of its own, so a second delivery of held
    spam is a `duplicate` row with a raw file of its own: it must go when the spam goes."""
    from mailgate.jobs import purge_quarantine
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = _runtime(workdir, spam_enabled=True)
    long_ago = utcnow().timestamp() - 40 * 86400
    now = utcnow()
    # name: (outcome, age in days, Message-ID)
    rows = {
        "held-old": ("quarantined", 31, "<a@spam.example>"), "held-old-again": ("duplicate", 20, "<a@spam.example>"),
        # the daemon was down for weeks: purged now, long after its time
        "held-older": ("quarantined", 90, "<d@spam.example>"),
        "held-older-again": ("duplicate", 80, "<d@spam.example>"),
        "held-young": ("quarantined", 10, "<b@spam.example>"), "held-young-again": ("duplicate", 5, "<b@spam.example>"),
        # purged before, then it came again and became a ticket; a copy of that ticket's mail
        "purged-before": ("purged", 60, "<c@x.example>"), "came-back": ("ticket", 3, "<c@x.example>"),
        "came-back-again": ("duplicate", 2, "<c@x.example>"),
    }
    ids: dict[str, int] = {}
    digests: dict[str, str] = {}
    with session_scope(rt.engine) as session:
        for name, (outcome, age, mid) in rows.items():
            digests[name] = rt.blobs.put(mail(subject=name).as_bytes())
            os.utime(rt.blobs.path_for(digests[name]), (long_ago, long_ago))
            row = Inbound(source="smtp", raw_sha256=digests[name], received_at=now - timedelta(days=age),
                          state="done", outcome=outcome, message_id_header=mid, body_hash="h" + mid)
            session.add(row)
            session.flush()
            assert row.id is not None
            ids[name] = row.id
    rt.blobs.path_for(digests["purged-before"]).unlink()

    assert purge_quarantine(rt) == 2
    with session_scope(rt.engine) as session:
        outcomes = {name: session.get(Inbound, i).outcome for name, i in ids.items()}  # type: ignore[union-attr]
    assert outcomes == {
        "held-old": "purged", "held-old-again": "purged", "held-older": "purged", "held-older-again": "purged",
        "held-young": "quarantined",
        "held-young-again": "duplicate", "purged-before": "purged", "came-back": "ticket",
        "came-back-again": "duplicate"}
    kept = {name for name in rows if rt.blobs.path_for(digests[name]).exists()}
    assert kept == {"held-young", "held-young-again", "came-back", "came-back-again"}


def test_several_values_after_one_folder_option() -> None:
    from mailgate.cli import expand_multi_value_options as expand

    assert expand(["spam", "train", "--ham", "a", "b", "--spam", "c", "d", "--out", "x"]) == [
        "spam", "train", "--ham", "a", "--ham", "b", "--spam", "c", "--spam", "d", "--out", "x"]
    assert expand(["spam", "eval", "--ham", "a", "--ham", "b", "--spam", "c", "--json"]) == [
        "spam", "eval", "--ham", "a", "--ham", "b", "--spam", "c", "--json"]
    assert expand(["spam", "score", "f.eml", "--config", "c.toml"]) == ["spam", "score", "f.eml", "--config", "c.toml"]


def test_mail_arriving_again_after_its_quarantined_copy_was_purged_is_not_a_duplicate(workdir: Path) -> None:
    """An IMAP re-sync or an import can bring back a message whose quarantined copy is gone;
    taking it for a duplicate would drop it without a trace."""
    from mailgate import spool
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = _runtime(workdir)
    raw = mail(subject="Order 1042 never arrived", message_id="<again.1@customer.org>").as_bytes()
    with session_scope(rt.engine) as session:
        session.add(Inbound(source="imap", raw_sha256="0" * 64, received_at=utcnow(), state="done",
                            outcome="purged", spam_score=0.95, subject="Order 1042 never arrived",
                            message_id_header="again.1@customer.org", body_hash=spool.body_hash(raw)))
    cfg = workdir / "config.toml"
    assert cli(cfg, "ingest", input=raw).stdout.decode().strip() == "1"  # a ticket, not "duplicate: ..."


def test_a_past_requesters_address_is_scored_when_our_mta_says_dmarc_fail(workdir: Path) -> None:
    """Anyone can write a past requester's address in From; a DMARC fail stamped by our own
    MTA (helpdesk.trusted_authserv_ids) says the domain disowns the mail, so it is scored."""
    import re

    cfg = write_config(workdir, spam_enabled=True, helpdesk_extra='trusted_authserv_ids = ["mx.example.com"]')
    assert cli(cfg, "ingest", input=mail().as_bytes()).stdout.decode().strip() == "1"  # carol's ticket
    probe = (Path(__file__).parent / "fixtures" / "spamprobe" / "spam-2" / "scam_domain_expiry.eml").read_bytes()
    as_carol = re.sub(rb"(?m)^From: .*$", b"From: Carol <carol@customer.org>", probe, count=1)

    def with_id(n: int, verdict: str) -> bytes:
        raw = re.sub(rb"(?mi)^Message-ID: .*$", f"Message-ID: <forged.{n}@customer.org>".encode(), as_carol, count=1)
        return f"Authentication-Results: mx.example.com; {verdict} header.from=customer.org\r\n".encode() + raw

    held = cli(cfg, "ingest", input=with_id(1, "dmarc=fail (p=reject)")).stdout.decode()
    assert held.startswith("quarantined: spam score")
    [row] = query_json(cfg, "spam", "quarantine", "list")
    assert row["from"] == "carol@customer.org"
    # With a DMARC pass, Carol is the known requester she is: never filtered.
    assert cli(cfg, "ingest", input=with_id(2, "dmarc=pass")).stdout.decode().strip() == "2"


def _digests(rt) -> list[tuple[str, str]]:  # noqa: ANN001
    from email import message_from_bytes
    from email.policy import default

    from sqlmodel import select

    from mailgate.jobs import DIGEST_TEMPLATE
    from mailgate.store.engine import session_scope
    from mailgate.store.tables import Outbox

    with session_scope(rt.engine) as session:
        rows = session.exec(select(Outbox).where(Outbox.template == DIGEST_TEMPLATE).order_by(Outbox.id)).all()
        mails = [message_from_bytes(r.raw, policy=default) for r in rows]
    return [(str(m["To"]), m.get_body(("plain",)).get_content()) for m in mails]


def test_quarantine_digest_lists_held_mail_once_lowest_score_first(workdir: Path) -> None:
    from sqlalchemy import text

    from mailgate.jobs import send_quarantine_digest
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = _runtime(workdir, spam_enabled=True)
    digest = rt.blobs.put(mail().as_bytes())

    def hold(subject: str, score: float, outcome: str = "quarantined") -> None:
        with session_scope(rt.engine) as session:
            session.add(Inbound(source="smtp", raw_sha256=digest, received_at=utcnow(), state="done",
                                outcome=outcome, spam_score=score, subject=subject,
                                from_addr=f"{subject.lower()}@example.net"))

    assert send_quarantine_digest(rt) == 0  # nothing held: no mail
    hold("Pills", 0.999)
    hold("Invoice", 0.93)
    hold("Released", 0.95, outcome="released")
    assert send_quarantine_digest(rt) == 2
    [(to, body)] = _digests(rt)
    assert to == "alice@example.com"  # the only admin
    assert body.startswith("2 messages to support@example.com scored 0.9 or more as spam")
    assert body.index("invoice@example.net") < body.index("pills@example.net")  # lowest score first
    assert "score 0.930" in body and "Subject: Invoice" in body and "Released" not in body
    assert "\r\n#release " in body and "mailgate spam quarantine release ID" in body
    assert "deleted after\r\n30 days" in body

    hold("Lottery\x1b]52;c;aGk=\x07\u202e", 0.97)
    assert send_quarantine_digest(rt) == 0  # the next one is due in 24 hours

    def last_list_sent(ago: timedelta) -> None:
        stamp = (utcnow() - ago).strftime("%Y-%m-%d %H:%M:%S.%f")
        with session_scope(rt.engine) as session:
            session.connection().execute(text("update outbox set created_at = :t"), {"t": stamp})

    last_list_sent(timedelta(hours=23, minutes=50))
    assert send_quarantine_digest(rt) == 0
    # The pass a day after the last one is due even if it began a moment before the day was
    # full (the last list was stamped a moment after its pass began).
    last_list_sent(timedelta(hours=23, minutes=55))
    assert send_quarantine_digest(rt) == 1
    body = _digests(rt)[-1][1]
    assert body.startswith("1 message to support@example.com") and "Pills" not in body
    assert "Subject: Lottery ]52;c;aGk=\r\n" in body and "\x1b" not in body and "\u202e" not in body


def test_quarantine_digest_recipients_and_switch(workdir: Path) -> None:
    from mailgate.jobs import send_quarantine_digest
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = _runtime(workdir / "to", spam_enabled=True,
                  spam_extra='digest_to = ["Postmaster@Example.com", "bob@example.com"]')
    with session_scope(rt.engine) as session:
        for i in range(205):
            session.add(Inbound(source="smtp", raw_sha256="0" * 64, received_at=utcnow(), state="done",
                                outcome="quarantined", spam_score=0.9 + i / 10_000, subject=f"s{i}"))
    assert send_quarantine_digest(rt) == 205
    digests = _digests(rt)
    assert [to for to, _ in digests] == ["postmaster@example.com", "bob@example.com"]
    body = digests[0][1]
    assert body.count("Subject: s") == 200 and "... and 5 more with higher scores" in body
    assert "Subject: s199\r\n" in body and "Subject: s200" not in body

    off = _runtime(workdir / "off", spam_enabled=True, spam_extra="digest_hours = 0")
    with session_scope(off.engine) as session:
        session.add(Inbound(source="smtp", raw_sha256="0" * 64, received_at=utcnow(), state="done",
                            outcome="quarantined", spam_score=0.99, subject="x"))
    assert send_quarantine_digest(off) == 0 and _digests(off) == []


def test_a_reply_to_the_list_from_a_recipient_who_is_no_agent_makes_no_ticket(workdir: Path, corpus: Path) -> None:
    """spam.digest_to may name a mailbox that is no agent's. Its reply quotes held spam: it must
    be neither held (it would be listed again) nor a ticket, and it releases nothing."""
    from mailgate.domain import QUARANTINE_REPLY_NUMBER, reply_address

    config = write_config(workdir, spam_enabled=True, spam_extra='digest_to = ["security@example.com"]')
    spam = sorted((corpus / "spam-1").iterdir())[0].read_bytes()
    assert cli(config, "ingest", input=spam).stdout.decode().startswith("quarantined: spam score")
    assert [r["id"] for r in query_json(config, "spam", "quarantine", "list")] == [1]
    reply_to = reply_address("support@example.com", "test-secret-key-0123456789", QUARANTINE_REPLY_NUMBER,
                             "security@example.com")
    quoted = "\n".join("> " + line for line in spam.decode("latin-1").splitlines()[-40:])
    reply = mail(sender="Security <security@example.com>", to=reply_to, subject="Re: 1 message held as spam",
                 body=f"#release 1\n\n{quoted}\n")
    assert cli(config, "ingest", input=reply.as_bytes()).stdout.decode().strip() == (
        "screened: reply to the quarantine list from security@example.com, who is not an agent")

    assert query_json(config, "tickets", "list") == []
    assert [r["id"] for r in query_json(config, "spam", "quarantine", "list")] == [1]  # still held
    [screened] = query_json(config, "screened")
    assert (screened["id"], screened["reason"]) == (
        2, "reply to the quarantine list from security@example.com, who is not an agent")
    [told] = query_json(config, "outbox", "list")
    assert (told["to"], told["template"], told["ticket"]) == ("security@example.com", "agent/result", None)


@pytest.mark.parametrize(("line", "message"), [
    ("digest_hours = -1", "spam.digest_hours: must be 0 (no digest) to 8760, got -1.0"),
    ('digest_to = ["not an address"]', "spam.digest_to: not an email address: 'not an address'"),
    ('digest_to = "alice@example.com"', "spam.digest_to: expected list, got 'alice@example.com'"),
    ('digest_to = ["Support@Example.com"]',
     "spam.digest_to: support@example.com is one of the help desk's own addresses"),
    ('digest_to = ["support+digest@example.com"]',
     "spam.digest_to: support+digest@example.com is one of the help desk's own addresses"),
])
def test_quarantine_digest_bad_config(workdir: Path, line: str, message: str) -> None:
    proc = cli(write_config(workdir, spam_enabled=True, spam_extra=line), "spam", "quarantine", "list",
               check=False)
    assert proc.returncode != 0
    assert proc.stderr.decode().strip().splitlines() == [f"mailgate: config error: {message}"]


def test_learning_several_messages_saves_once_with_the_same_counts(workdir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rt = _runtime(workdir / "batch", spam_enabled=True)
    one_by_one = _runtime(workdir / "single", spam_enabled=True)
    raws = [mail(subject=f"Order {i}", body=f"Where is my order {i}? It was due on Monday.").as_bytes()
            for i in range(3)]
    assert rt.spam_model() is not None  # the first use writes the shipped model's copy
    saves: list[Path] = []
    real_save = SpamModel.save
    monkeypatch.setattr(SpamModel, "save", lambda self, path: saves.append(path) or real_save(self, path))
    assert rt.learn_spam(raws, False)
    assert len(saves) == 1
    for raw in raws:
        assert one_by_one.learn_spam(raw, False)
    batch, single = rt.spam_model(), one_by_one.spam_model()
    assert batch is not None and single is not None
    assert batch.meta["n_ham"] == single.meta["n_ham"]
    np.testing.assert_array_equal(batch._feature_count, single._feature_count)
