"""The long-lived objects one process needs, built once from Settings and passed explicitly."""

from __future__ import annotations

import logging
import threading
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
    _spam_model: Any = None
    _spam_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        data_dir = settings.helpdesk.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if settings.database.url.startswith("sqlite:///"):
            Path(settings.database.url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return cls(
            settings=settings,
            engine=make_engine(settings.database.url, echo=settings.database.echo,
                               busy_timeout=settings.database.busy_timeout_seconds),
            blobs=BlobStore(settings.raw_dir),
            renderer=Renderer(settings.helpdesk.templates_dir),
        )

    # --- SLA ---------------------------------------------------------------
    def calendar(self, tier: str) -> BusinessCalendar:
        sla = self.settings.sla
        always_on = any(t.name == tier and t.always_on for t in sla.tiers)
        year = datetime.now(UTC).year
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

    # --- spam model, loaded lazily and swapped atomically after learning -----
    def spam_model(self) -> SpamModel | None:
        if not self.settings.spam.enabled:
            return None
        with self._spam_lock:
            if self._spam_model is None:
                self._spam_model = self._load_spam_model()
            return self._spam_model

    def _load_spam_model(self) -> SpamModel | None:
        from mailgate.spamfilter import ModelError, SpamModel

        path = self.settings.spam_model_path
        if not path.exists():
            shipped = packaged_dir("models") / "spam-model.npz"
            if not shipped.exists():
                log.warning("no spam model at %s and none shipped: spam filter off", path)
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            SpamModel.load(shipped).save(path)
        try:
            return SpamModel.load(path)
        except ModelError as exc:
            log.error("spam model %s refused: %s: spam filter off", path, exc)
            return None

    def learn_spam(self, raw: bytes, is_spam: bool) -> None:
        model = self.spam_model()
        if model is None:
            return
        with self._spam_lock:
            model.learn_bytes(raw, is_spam)
            model.save(self.settings.spam_model_path)
