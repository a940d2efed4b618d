"""The spam quarantine: list held messages and release false positives.

A quarantined message is an inbound row with outcome 'quarantined' (its raw
bytes, spam_score and rule hits kept; nothing else was made from it). Release
learns it as ham, marks the row 'released' and puts it back in the spool: the
pipeline then runs as for any new mail except that the spam step lets it
through (see pipeline.step_spam), so it becomes a ticket with a confirmation,
or a reply on its ticket. The row's outcome becomes whatever the pipeline made
of it; the 'released from quarantine' rule hit stays on the message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, select

from mailgate.ingest.parse import UnusableMessage, parse_message
from mailgate.runtime import Runtime
from mailgate.spool import RELEASED
from mailgate.store.blobs import BlobStore
from mailgate.store.engine import iso, session_scope
from mailgate.store.tables import Inbound
from mailgate.views import stop_reason

log = logging.getLogger(__name__)

QUARANTINED = "quarantined"
MAX_SHOWN_TEXT = 100_000  # characters of a held message's text that `spam quarantine show` prints


def list_quarantine(rt: Runtime, *, limit: int = 1000) -> list[dict[str, Any]]:
    """Held messages, newest first (purged ones, past spam.retention_days, are not listed)."""
    with session_scope(rt.engine) as session:
        rows = session.exec(select(Inbound).where(Inbound.outcome == QUARANTINED)
                            .order_by(Inbound.id.desc()).limit(limit)).all()  # type: ignore[union-attr]
        return [{"id": r.id, "received_at": iso(r.received_at), "from": r.from_addr, "subject": r.subject,
                 "spam_score": None if r.spam_score is None else round(r.spam_score, 4),
                 "message_id": r.message_id_header} for r in rows]


def held_message(rt: Runtime, inbound_id: int) -> tuple[dict[str, Any], bytes] | str:
    """One held message, to judge before releasing it: what the list shows plus the
    envelope, why it was held, the text a reader would see and the attachments; and its
    raw bytes. A string says why there is none."""
    with session_scope(rt.engine) as session:
        row = session.get(Inbound, inbound_id)
        if row is None:
            return "no such message"
        if row.outcome != QUARANTINED:
            return f"not in quarantine (outcome {row.outcome or row.state})"
        try:
            raw = rt.blobs.get(row.raw_sha256)
        except OSError as exc:
            return _bytes_missing(exc)
        shown: dict[str, Any] = {
            "id": row.id, "received_at": iso(row.received_at), "from": row.from_addr, "subject": row.subject,
            "spam_score": None if row.spam_score is None else round(row.spam_score, 4),
            "message_id": row.message_id_header, "envelope_from": row.envelope_from,
            "envelope_to": [a for a in row.envelope_to.split(",") if a], "size": len(raw),
            "why": stop_reason(row.rule_hits)}
    return shown | readable_parts(raw), raw


def readable_parts(raw: bytes) -> dict[str, Any]:
    """The text and attachment list of a message, as the pipeline would read them."""
    try:
        parsed = parse_message(raw)
    except UnusableMessage as exc:
        return {"text": "", "text_truncated": False, "attachments": [], "defects": [f"unparsable: {exc}"]}
    return {"text": parsed.text[:MAX_SHOWN_TEXT], "text_truncated": len(parsed.text) > MAX_SHOWN_TEXT,
            "attachments": [{"filename": a.filename, "content_type": a.content_type, "size": len(a.data)}
                            for a in parsed.attachments],
            "defects": list(parsed.defects)}


@dataclass(frozen=True)
class Released:
    inbound_id: int
    ok: bool
    detail: str  # why not, when not ok
    learned: bool = False


def take_out(session: Session, blobs: BlobStore, inbound_id: int) -> tuple[Inbound | None, str]:
    """Mark one held message released and queue it, in the caller's transaction: the row,
    or None and why not. One conditional UPDATE, so two people releasing the same message
    at once (the CLI, or an admin's #release by mail) release it once."""
    row = session.get(Inbound, inbound_id)
    if row is None:
        return None, "no such message"
    if row.outcome != QUARANTINED:
        return None, f"not in quarantine (outcome {row.outcome or row.state})"
    try:
        blobs.path_for(row.raw_sha256).stat()
    except OSError as exc:
        # Damage (the data folder restored without it): a release would ticket nothing and
        # teach nothing. It stays held, and listed, for whoever can bring the bytes back.
        return None, _bytes_missing(exc)
    changed = session.exec(update(Inbound).where(  # type: ignore[call-overload]
        Inbound.id == inbound_id, Inbound.outcome == QUARANTINED).values(
        outcome=RELEASED, state="queued", attempts=0, next_attempt_at=None, claimed_by=None,
        claimed_at=None, last_error=None))
    if not changed.rowcount:
        return None, "released by someone else, or purged, meanwhile"
    return row, ""


def learn_released(rt: Runtime, released: dict[int, str]) -> bool:
    """Teach the model released messages (inbound id -> raw sha256) as ham, in one save,
    after the release is committed."""
    try:
        return rt.learn_spam([rt.blobs.get(sha) for sha in released.values()], False)
    except Exception as exc:  # the release itself must not fail on the model: the mail matters more
        log.error("inbound %s released but not learned as ham: %s: %s",
                  ", ".join(map(str, released)), type(exc).__name__, exc)
        return False


def release(rt: Runtime, inbound_id: int) -> Released:
    """Take one message out of the quarantine: learn it as ham and queue it for ticketing."""
    with session_scope(rt.engine) as session:
        row, why_not = take_out(session, rt.blobs, inbound_id)
        if row is None:
            return Released(inbound_id, False, why_not)
        sha = row.raw_sha256
    return Released(inbound_id, True, "", learn_released(rt, {inbound_id: sha}))


def _bytes_missing(exc: OSError) -> str:
    return f"its stored bytes cannot be read ({type(exc).__name__}: {exc.filename or exc})"
