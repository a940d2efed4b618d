"""The long-lived objects one process needs, built once from Settings and passed explicitly."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from mailgate.config import Settings
from mailgate.render import Renderer, packaged_dir
from mailgate.sla import BusinessCalendar, add_business_time, holiday_dates
from mailgate.store.blobs import BlobStore
from mailgate.store.engine import make_engine

if TYPE_CHECKING:
    from mailgate.spamfilter import SpamModel

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    blobs: BlobStore
    renderer: Renderer
    # SQLite: a second, synchronous=FULL engine for spool.accept. PostgreSQL: None.
    durable_engine: Engine | None = None
    _spam_model: Any = None
    _spam_stamp: tuple[int, int, int] | None = None
    _spam_tried: bool = False
    _spam_lock: threading.Lock = field(default_factory=threading.Lock)
    _calendars: dict[tuple[str, int], BusinessCalendar] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        data_dir = settings.helpdesk.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if settings.database.url.startswith("sqlite:///"):
            Path(settings.database.url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return cls(
            settings=settings,
            engine=make_engine(settings.database.url, echo=settings.database.echo,
                               busy_timeout=settings.database.busy_timeout_seconds, durable=False),
            durable_engine=make_engine(settings.database.url, echo=settings.database.echo,
                                     busy_timeout=settings.database.busy_timeout_seconds)
            if settings.database.url.startswith("sqlite") else None,
            blobs=BlobStore(settings.raw_dir),
            renderer=Renderer(settings.helpdesk.templates_dir),
        )

    @property
    def spool_engine(self) -> Engine:
        """The engine whose commit must survive power loss: it precedes an SMTP 250."""
        return self.durable_engine or self.engine

    # --- SLA ---------------------------------------------------------------
    def calendar(self, tier: str) -> BusinessCalendar:
        year = datetime.now(UTC).year
        key = (tier, year)
        if key not in self._calendars:  # the holidays package is slow to ask; a year's answer keeps
            self._calendars[key] = self._build_calendar(tier, year)
        return self._calendars[key]

    def _build_calendar(self, tier: str, year: int) -> BusinessCalendar:
        sla = self.settings.sla
        always_on = any(t.name == tier and t.always_on for t in sla.tiers)
        return BusinessCalendar(
            timezone=sla.timezone, hours=sla.hours, always_on=always_on,
            holidays=holiday_dates(sla.holidays_country, sla.extra_holidays, range(year - 1, year + 3)),
        )

    def due_times(self, tier: str, priority: str, start: datetime) -> tuple[datetime, datetime] | None:
        for t in self.settings.sla.tiers:
            if t.name == tier and priority in t.targets:
                target = t.targets[priority]
                cal = self.calendar(tier)
                return (add_business_time(cal, start, timedelta(hours=target.first_response_hours)),
                        add_business_time(cal, start, timedelta(hours=target.resolution_hours)))
        return None

    # --- spam model -----------------------------------------------------------
    # Loaded lazily, reloaded when the file changes (another process, e.g. `mailgate spam
    # quarantine release` or `spam train`, saved a new one), and never mutated in place:
    # learning works on a copy and swaps the reference, so a scorer holding the old model
    # in another thread is unaffected. The file lock orders learners across processes.
    def spam_model(self) -> SpamModel | None:
        if not self.settings.spam.enabled:
            return None
        with self._spam_lock:
            return self._current_spam_model()

    def _current_spam_model(self) -> SpamModel | None:
        """The model for the file as it is now; call with _spam_lock held. One stat() when unchanged."""
        path = self.settings.spam_model_path
        stamp = _file_stamp(path)
        if not self._spam_tried or stamp != self._spam_stamp:
            self._spam_tried = True
            self._spam_model, self._spam_stamp = self._load_spam_model()
        return self._spam_model

    def _load_spam_model(self) -> tuple[SpamModel | None, tuple[int, int, int] | None]:
        from mailgate.spamfilter import ModelError, SpamModel

        path = self.settings.spam_model_path
        if not path.exists():
            shipped = packaged_dir("models") / "spam-model.npz"
            if not shipped.exists():
                log.warning("no spam model at %s and none shipped: spam filter off", path)
                return None, None
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with _file_lock(path):
                    # Again under the lock: `spam train` may have saved one meanwhile, and the
                    # shipped copy must not replace it.
                    if not path.exists():
                        SpamModel.load(shipped).save(path)
            except (ModelError, OSError) as exc:
                log.error("cannot seed spam model %s from %s: %s: spam filter off", path, shipped, exc)
                return None, None
        # Stat before reading: if the file is replaced in between, the next call reloads once more.
        stamp = _file_stamp(path)
        try:
            model = SpamModel.load(path)
        except ModelError as exc:
            log.error("spam model refused: %s: spam filter off until the file changes", exc)
            return None, stamp
        if newer_shipped_model(model) is not None:
            model, stamp = self._replace_shipped_copy(path, model)
        log.info("spam model %s loaded (%s)", path, model.meta)
        return model, stamp

    def _replace_shipped_copy(self, path: Path, model: SpamModel) -> tuple[SpamModel, tuple[int, int, int] | None]:
        """Put the current shipped model in place of an untouched copy of an older one."""
        from mailgate.spamfilter import ModelError, SpamModel

        try:
            with _file_lock(path):
                # Again under the learners' lock: one may have learned since the first read.
                try:
                    current = SpamModel.load(path)
                except ModelError:
                    return model, _file_stamp(path)
                newer = newer_shipped_model(current)
                if newer is None:
                    return current, _file_stamp(path)
                newer.save(path)
        except OSError as exc:
            # A model directory the daemon may not write: score with the old copy rather
            # than fail every message.
            log.error("cannot replace the spam model %s by the newer shipped one: %s: keeping it", path, exc)
            return model, _file_stamp(path)
        log.info("spam model %s was the shipped model of %s and never learned: replaced by the "
                 "shipped model of %s", path, current.meta["trained_at"], newer.meta["trained_at"])
        return newer, _file_stamp(path)

    def learn_spam(self, raw: bytes | Sequence[bytes], is_spam: bool) -> bool:
        """Teach the model one message, or several in one save, and save it atomically (see
        SpamModel.learn_bytes: a message taught as the other class before is moved). False if
        the filter is off or the model unusable."""
        if not self.settings.spam.enabled:
            return False
        path = self.settings.spam_model_path
        with self._spam_lock, _file_lock(path):
            # Read from disk under the lock, every time: another process may have learned
            # since, and a file's stamp can look unchanged (a network file system's cached
            # attributes), which would lose its lesson. A lesson is rare; a load is ~25 ms.
            self._spam_tried = True
            self._spam_model, self._spam_stamp = self._load_spam_model()
            if self._spam_model is None:
                return False
            updated = self._spam_model.copy()
            changed = [updated.learn_bytes(message, is_spam) for message in ([raw] if isinstance(raw, bytes) else raw)]
            if any(changed):
                updated.save(path)
                self._spam_model, self._spam_stamp = updated, _file_stamp(path)
        return True


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def save_spam_model(model: SpamModel, path: Path) -> None:
    """Save a model in place of the one at path under the learners' lock: a daemon in the
    middle of a lesson would otherwise save the old counts plus its lesson over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
        model.save(path)


_locks_held = threading.local()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock beside the model file, held while learning. Re-entrant in
    a thread: flock on a second descriptor of the same file would wait for the first."""
    lock_path = path.with_name(path.name + ".lock")
    held: set[Path] = _locks_held.__dict__.setdefault("paths", set())
    if lock_path in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # For writing: NFS (and CIFS) clients emulate flock with a byte-range lock, and an
        # exclusive one needs a descriptor open for writing.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        # A lock file that `sudo mailgate ...` created as root (mode 0644): on a local file
        # system flock needs no write access.
        fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(lock_path)
        try:
            yield
        finally:
            held.discard(lock_path)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def newer_shipped_model(model: SpamModel) -> SpamModel | None:
    """The shipped model, if `model` is an untouched copy of an older shipped one.

    Untouched: its trained_at is one mailgate shipped (models/spam-model-history.json)
    and it never learned since (updated_at is trained_at). A model trained or taught
    on the site's own mail is never replaced.
    """
    from mailgate.spamfilter import ModelError, SpamModel

    meta = model.meta
    if meta["trained_at"] is None or meta["updated_at"] != meta["trained_at"]:
        return None
    models = packaged_dir("models")
    try:
        history = json.loads((models / "spam-model-history.json").read_text(encoding="utf-8"))
        if meta["trained_at"] not in history["shipped_trained_at"]:
            return None
        shipped = SpamModel.load(models / "spam-model.npz")
    except (OSError, ValueError, KeyError, TypeError, ModelError):
        return None
    return None if shipped.meta["trained_at"] == meta["trained_at"] else shipped


def load_spam_model(settings: Settings) -> SpamModel:
    """The configured model for the CLI (score, eval): the data_dir file, else the shipped one;
    the shipped one too in place of an untouched copy of an older shipped model (the daemon
    replaces such a file on its next load).

    Raises ModelError (one line, fit for the user) if it is missing or refused.
    """
    from mailgate.spamfilter import SpamModel

    path = settings.spam_model_path
    if not path.exists() and settings.spam.model_path is None:
        path = packaged_dir("models") / "spam-model.npz"
    model = SpamModel.load(path)
    return newer_shipped_model(model) or model
