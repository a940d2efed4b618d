"""Business-time arithmetic (pure), tier rules, and the pending pause of the SLA clock."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from mailgate.sla import BusinessCalendar, add_business_time, business_time_between, holiday_dates, tier_for_address

HEL = ZoneInfo("Europe/Helsinki")
NINE_TO_FIVE = {d: (time(9), time(17)) for d in ("mon", "tue", "wed", "thu", "fri")} | {"sat": None, "sun": None}
LONG_DAYS = {d: (time(1), time(23)) for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}

UTC_CAL = BusinessCalendar(timezone="UTC", hours=NINE_TO_FIVE)
FI_CAL = BusinessCalendar(timezone="Europe/Helsinki", hours=NINE_TO_FIVE,
                          holidays=holiday_dates("FI", (), range(2026, 2028)))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def hel(*args: int) -> datetime:
    return datetime(*args, tzinfo=HEL)  # type: ignore[misc]


H = timedelta(hours=1)


# --- add_business_time -------------------------------------------------------------

@pytest.mark.parametrize(("start", "hours", "due"), [
    (utc(2026, 3, 2, 10), 3, utc(2026, 3, 2, 13)),      # Monday, inside the day
    (utc(2026, 3, 2, 9), 8, utc(2026, 3, 2, 17)),       # exactly the whole day: closing time, not tomorrow
    (utc(2026, 3, 2, 16), 3, utc(2026, 3, 3, 11)),      # across the night
    (utc(2026, 3, 2, 6), 1, utc(2026, 3, 2, 10)),       # before opening
    (utc(2026, 3, 2, 18), 1, utc(2026, 3, 3, 10)),      # after closing
    (utc(2026, 3, 6, 16, 30), 1, utc(2026, 3, 9, 9, 30)),  # Friday -> Monday
    (utc(2026, 3, 7, 12), 1, utc(2026, 3, 9, 10)),      # starts on a Saturday
    (utc(2026, 3, 2, 9), 40, utc(2026, 3, 6, 17)),      # a working week
    (utc(2026, 3, 2, 9), 41, utc(2026, 3, 9, 10)),      # ...and one hour more
    (utc(2026, 3, 2, 11), 0, utc(2026, 3, 2, 11)),
])
def test_add_business_time_nights_and_weekends(start: datetime, hours: float, due: datetime) -> None:
    result = add_business_time(UTC_CAL, start, hours * H)
    assert result == due
    assert result.tzinfo is UTC


def test_start_in_another_zone_is_the_same_instant() -> None:
    start = datetime(2026, 3, 2, 12, tzinfo=ZoneInfo("America/New_York"))  # 17:00 UTC: closing time
    assert add_business_time(UTC_CAL, start, H) == utc(2026, 3, 3, 10)


@pytest.mark.parametrize(("start", "hours", "due"), [
    # Christmas Eve (Thu), Christmas Day (Fri) and the weekend: Wed 16:00 + 2 h -> Mon 10:00
    (hel(2026, 12, 23, 16), 2, hel(2026, 12, 28, 10)),
    # Independence Day 2027 is a Monday
    (hel(2027, 12, 3, 16), 2, hel(2027, 12, 7, 10)),
    # Good Friday and Easter Monday 2026, and the clocks went forward the weekend before
    (hel(2026, 4, 2, 16), 2, hel(2026, 4, 7, 10)),
    # an ordinary Friday -> Monday over the spring DST change (EET -> EEST)
    (hel(2026, 3, 27, 16), 2, hel(2026, 3, 30, 10)),
    # ...and over the autumn one (EEST -> EET)
    (hel(2026, 10, 23, 16), 2, hel(2026, 10, 26, 10)),
])
def test_holidays_and_local_hours(start: datetime, hours: float, due: datetime) -> None:
    assert add_business_time(FI_CAL, start, hours * H) == due.astimezone(UTC)


def test_fi_holiday_dates() -> None:
    days = holiday_dates("FI", ("2026-12-31",), range(2026, 2027))
    assert {date(2026, 12, 6), date(2026, 12, 24), date(2026, 12, 25), date(2026, 12, 26),
            date(2026, 12, 31)} <= days
    assert date(2026, 12, 23) not in days
    assert holiday_dates(None, ("2026-05-02",), range(2026, 2027)) == frozenset({date(2026, 5, 2)})


def test_extra_holiday_is_skipped() -> None:
    cal = BusinessCalendar(timezone="UTC", hours=NINE_TO_FIVE, holidays=frozenset({date(2026, 3, 3)}))
    assert add_business_time(cal, utc(2026, 3, 2, 16), 2 * H) == utc(2026, 3, 4, 10)


def test_dst_day_counts_real_hours_spring() -> None:
    # Europe/Helsinki, 2026-03-29 03:00 EET -> 04:00 EEST: that Sunday has 21 business hours between
    # 01:00 and 23:00, not 22. Sat 12:00 EET (10:00Z) + 16 h: 11 h on Saturday, then 5 h from 01:00 EET.
    cal = BusinessCalendar(timezone="Europe/Helsinki", hours=LONG_DAYS)
    assert add_business_time(cal, hel(2026, 3, 28, 12), 16 * H) == utc(2026, 3, 29, 4)  # 07:00 EEST
    assert add_business_time(cal, hel(2026, 3, 28, 12), 32 * H) == utc(2026, 3, 29, 20)  # 23:00 EEST, closing
    assert add_business_time(cal, hel(2026, 3, 28, 12), 33 * H) == hel(2026, 3, 30, 2).astimezone(UTC)


def test_dst_day_counts_real_hours_autumn() -> None:
    # 2026-10-25 04:00 EEST -> 03:00 EET: that Sunday has 23 business hours between 01:00 and 23:00.
    cal = BusinessCalendar(timezone="Europe/Helsinki", hours=LONG_DAYS)
    assert add_business_time(cal, hel(2026, 10, 24, 12), 16 * H) == utc(2026, 10, 25, 3)  # 05:00 EET
    assert add_business_time(cal, hel(2026, 10, 24, 12), 34 * H) == utc(2026, 10, 25, 21)  # 23:00 EET


def test_always_on_ignores_hours_holidays_and_dst() -> None:
    cal = BusinessCalendar(timezone="Europe/Helsinki", hours=NINE_TO_FIVE, always_on=True,
                           holidays=frozenset({date(2026, 12, 24), date(2026, 12, 25)}))
    assert add_business_time(cal, hel(2026, 12, 24, 20), 30 * H) == hel(2026, 12, 26, 2).astimezone(UTC)
    assert add_business_time(cal, hel(2026, 3, 28, 12), 24 * H) == utc(2026, 3, 29, 10)
    assert business_time_between(cal, utc(2026, 3, 28, 10), utc(2026, 3, 29, 10)) == 24 * H
    assert cal.window(date(2026, 12, 25)) == (time(0), time(23, 59, 59, 999999))


def test_calendar_without_open_hours_raises() -> None:
    closed = BusinessCalendar(timezone="UTC", hours={})
    with pytest.raises(ValueError, match="no open hours"):
        add_business_time(closed, utc(2026, 3, 2), H)


# --- business_time_between --------------------------------------------------------------

@pytest.mark.parametrize(("start", "end", "hours"), [
    (utc(2026, 3, 2, 10), utc(2026, 3, 2, 13), 3),
    (utc(2026, 3, 6, 16), utc(2026, 3, 9, 10), 2),      # over a weekend
    (utc(2026, 3, 7, 8), utc(2026, 3, 8, 20), 0),       # all weekend
    (utc(2026, 3, 2, 6), utc(2026, 3, 2, 20), 8),       # a whole day from outside it
    (utc(2026, 3, 2, 9), utc(2026, 3, 13, 17), 80),     # two weeks
    (utc(2026, 3, 2, 13), utc(2026, 3, 2, 10), 0),      # end before start
])
def test_business_time_between(start: datetime, end: datetime, hours: float) -> None:
    assert business_time_between(UTC_CAL, start, end) == hours * H


def test_business_time_between_holidays_and_dst() -> None:
    assert business_time_between(FI_CAL, hel(2026, 12, 23, 16), hel(2026, 12, 28, 10)) == 2 * H
    cal = BusinessCalendar(timezone="Europe/Helsinki", hours=LONG_DAYS)
    # Sat 12:00 -> 23:00 (11 h) + Sun 01:00 EET -> 12:00 EEST (10 real hours)
    assert business_time_between(cal, hel(2026, 3, 28, 12), hel(2026, 3, 29, 12)) == 21 * H


@pytest.mark.parametrize("cal", [UTC_CAL, FI_CAL, BusinessCalendar(timezone="Europe/Helsinki", hours=LONG_DAYS)])
def test_between_inverts_add(cal: BusinessCalendar) -> None:
    starts = [hel(2026, 3, 27, 15, 30), hel(2026, 10, 23, 8), hel(2026, 12, 23, 12, 15), utc(2026, 6, 19, 7)]
    for start in starts:
        for minutes in (1, 59, 8 * 60, 17 * 60 + 7, 45 * 60):
            due = add_business_time(cal, start, timedelta(minutes=minutes))
            assert business_time_between(cal, start, due) == timedelta(minutes=minutes), (start, minutes)


# --- tier rules -----------------------------------------------------------------------------

RULES = {"vip@big.com": "enterprise", "@big.com": "partner", "@partner.org": "partner",
         "special.net": "special-24x7"}


@pytest.mark.parametrize(("address", "tier"), [
    ("vip@big.com", "enterprise"),            # exact address wins over its domain
    ("VIP@Big.Com", "enterprise"),            # case does not matter
    ("someone@big.com", "partner"),           # @domain
    ("someone@eu.sales.big.com", "partner"),  # parent domain
    ("x@partner.org", "partner"),
    ("x@special.net", "special-24x7"),        # a bare domain key
    ("x@mail.special.net", "special-24x7"),
    ("x@notbig.com", "free"),                 # not a parent domain: no match
    ("x@big.com.evil.io", "free"),
    ("nobody@example.com", "free"),
])
def test_tier_for_address(address: str, tier: str) -> None:
    assert tier_for_address(address, RULES, "free") == tier


# --- due times from settings, and the pending pause ---------------------------------------------

def _settings(**sla: object) -> object:
    from pathlib import Path

    from mailgate.config import settings_from_dict

    return settings_from_dict({
        "database": {"url": "sqlite:///x.db"}, "outbound": {"url": "maildir:sent"},
        "helpdesk": {"address": "support@example.com", "comment_address": "c@example.com",
                     "subject_tag": "EX", "secret_key": "0123456789", "data_dir": "var"},
        "sla": sla,
    }, base=Path("/nonexistent"))


def _runtime(settings: object) -> object:
    # Runtime.calendar and due_times need only the settings; no database is touched.
    from mailgate.runtime import Runtime

    return Runtime(settings=settings, engine=None, blobs=None, renderer=None)  # type: ignore[arg-type]


def test_due_times_by_tier() -> None:
    s = _settings(timezone="Europe/Helsinki", holidays_country="FI", tiers=[
        {"name": "customer", "targets": {"normal": {"first_response_hours": 4, "resolution_hours": 16}}},
        {"name": "special-24x7", "always_on": True,
         "targets": {"normal": {"first_response_hours": 4, "resolution_hours": 16}}},
    ])
    rt = _runtime(s)
    start = hel(2026, 12, 23, 15).astimezone(UTC)
    assert rt.due_times("customer", "normal", start) == (  # type: ignore[attr-defined]
        hel(2026, 12, 28, 11).astimezone(UTC), hel(2026, 12, 29, 15).astimezone(UTC))
    assert rt.due_times("special-24x7", "normal", start) == (start + 4 * H, start + 16 * H)  # type: ignore[attr-defined]
    assert rt.due_times("gold", "normal", start) is None  # type: ignore[attr-defined]


def _no_store() -> object:
    """Stands in for a Session: set_status adds the ticket and appends an event (Core)."""
    return SimpleNamespace(add=lambda obj: None,
                           connection=lambda: SimpleNamespace(execute=lambda statement, params: None))


def _paused_ticket(paused_at: datetime, first_due: datetime, resolution_due: datetime) -> object:
    from mailgate.store.tables import Ticket

    return Ticket(number=1, subject="s", requester_id=1, queue="support@example.com", status="pending",
                  status_kind="pending", created_at=paused_at, updated_at=paused_at, sla_paused_at=paused_at,
                  first_response_due=first_due, resolution_due=resolution_due)


def _resume(monkeypatch: pytest.MonkeyPatch, ticket: object, now: datetime) -> str | None:
    from mailgate.ingest import apply

    monkeypatch.setattr(apply, "now_for", lambda session: now)
    session = _no_store()
    rt = _runtime(_settings())
    return apply.set_status(rt, session, ticket, "open", "cli")  # type: ignore[arg-type]


def test_pending_stops_the_clock_and_open_resumes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from mailgate.ingest import apply
    from mailgate.store.tables import Ticket

    t0 = utc(2026, 3, 2, 10)
    ticket = Ticket(number=1, subject="s", requester_id=1, queue="support@example.com", status="open",
                    status_kind="open", created_at=t0, updated_at=t0,
                    first_response_due=utc(2026, 3, 2, 14), resolution_due=utc(2026, 3, 4, 10))
    monkeypatch.setattr(apply, "now_for", lambda session: t0)
    rt = _runtime(_settings())
    session = _no_store()
    assert apply.set_status(rt, session, ticket, "pending", "cli") == "open"  # type: ignore[arg-type]
    assert ticket.sla_paused_at == t0
    assert apply.set_status(rt, session, ticket, "on-hold", "cli") == "pending"  # type: ignore[arg-type]
    assert ticket.sla_paused_at == t0  # pending -> pending kind: still the first pause
    # Two business hours later on the same day, the customer answers: both due times move by 2 h.
    assert _resume(monkeypatch, ticket, utc(2026, 3, 2, 12)) == "on-hold"
    assert ticket.sla_paused_at is None
    assert ticket.first_response_due == utc(2026, 3, 2, 16)
    assert ticket.resolution_due == utc(2026, 3, 4, 12)


def test_pending_over_a_weekend_resumes_with_the_business_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    # Paused Friday 16:00 with 2 business hours left (Fri 16-17, Mon 9-10) before the first-response
    # due time, Monday 10:00; resumed Monday 10:00: those 2 hours are still left -> Monday 12:00,
    # not Thursday 04:00 (Monday 10:00 + 66 h).
    ticket = _paused_ticket(utc(2026, 3, 6, 16), utc(2026, 3, 9, 10), utc(2026, 3, 10, 10))
    assert _resume(monkeypatch, ticket, utc(2026, 3, 9, 10)) == "pending"
    assert ticket.first_response_due == utc(2026, 3, 9, 12)  # type: ignore[attr-defined]
    assert ticket.resolution_due == utc(2026, 3, 10, 12)  # type: ignore[attr-defined]


# --- due times on a ticket: pauses survive a new target, a breach survives a pause ------------

def test_a_new_priority_keeps_the_time_the_ticket_was_paused(workdir: Path) -> None:
    from mailgate.config import load_settings
    from mailgate.ingest.apply import change_field, set_due_times
    from mailgate.runtime import Runtime
    from mailgate.store.engine import session_scope
    from mailgate.store.tables import Event, Ticket
    from tests.conftest import cli, mail, write_config

    config = write_config(workdir)
    cli(config, "ingest", input=bytes(mail()))
    rt = Runtime.build(load_settings(config))
    created, paused, resumed = (datetime(2026, 11, 16, 9, 0, tzinfo=UTC), datetime(2026, 11, 16, 10, 0, tzinfo=UTC),
                                datetime(2026, 11, 27, 10, 0, tzinfo=UTC))  # a Monday hour, then 11 days pending
    with session_scope(rt.engine) as session:
        ticket = session.get(Ticket, 1)
        assert ticket is not None
        ticket.created_at = created
        set_due_times(rt, ticket)
        for at, new in ((paused, "pending"), (resumed, "open")):
            session.add(Event(ticket_id=1, created_at=at, actor="test", action="status", new=new))
        session.flush()
        change_field(rt, session, ticket, "priority", "high", "test")
        cal = rt.calendar(ticket.tier)
        base = rt.due_times(ticket.tier, "high", created)
        assert base is not None
        expected = [add_business_time(cal, resumed, business_time_between(cal, paused, due)) for due in base]
        assert [ticket.first_response_due, ticket.resolution_due] == expected
        assert ticket.resolution_due > resumed  # not overdue the moment the priority changed


def test_a_breach_survives_a_pause(workdir: Path) -> None:
    from mailgate.config import load_settings
    from mailgate.ingest.apply import set_status
    from mailgate.runtime import Runtime
    from mailgate.store.engine import session_scope
    from mailgate.store.tables import Ticket
    from tests.conftest import cli, mail, write_config

    config = write_config(workdir)
    cli(config, "ingest", input=bytes(mail()))
    rt = Runtime.build(load_settings(config))
    breached = datetime(2026, 11, 6, 12, 0, tzinfo=UTC)
    with session_scope(rt.engine) as session:
        ticket = session.get(Ticket, 1)
        assert ticket is not None
        ticket.first_response_due = ticket.resolution_due = breached
        set_status(rt, session, ticket, "pending", "test")
        ticket.sla_paused_at = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)  # paused after the breach
        set_status(rt, session, ticket, "open", "test")
        # It was overdue when it paused: resuming must not give it a fresh due time.
        assert (ticket.first_response_due, ticket.resolution_due) == (breached, breached)


def test_pauses_under_a_status_renamed_since_count_by_their_recorded_kind(workdir: Path) -> None:
    from mailgate.config import load_settings
    from mailgate.ingest.apply import change_field, set_due_times
    from mailgate.runtime import Runtime
    from mailgate.store.engine import session_scope
    from mailgate.store.tables import Event, Ticket
    from tests.conftest import cli, mail, write_config

    config = write_config(workdir)
    for subject in ("recorded", "unknown"):
        cli(config, "ingest", input=bytes(mail(subject=subject)))
    rt = Runtime.build(load_settings(config))
    created, paused, resumed = (datetime(2026, 11, 16, 9, 0, tzinfo=UTC), datetime(2026, 11, 16, 10, 0, tzinfo=UTC),
                                datetime(2026, 11, 27, 10, 0, tzinfo=UTC))
    with session_scope(rt.engine) as session:
        tickets = [session.get(Ticket, n) for n in (1, 2)]
        for ticket, detail in zip(tickets, ("open -> pending", None), strict=True):
            assert ticket is not None
            ticket.created_at = created
            set_due_times(rt, ticket)
            # "waiting" is no status of this config any more: renamed since.
            session.add(Event(ticket_id=ticket.number, created_at=paused, actor="t", action="status",
                              new="waiting", detail=detail))
            session.add(Event(ticket_id=ticket.number, created_at=resumed, actor="t", action="status",
                              new="open", detail="pending -> open" if detail else None))
        session.flush()
        before = (tickets[1].first_response_due, tickets[1].resolution_due)  # type: ignore[union-attr]
        for ticket in tickets:
            change_field(rt, session, ticket, "priority", "high", "t")  # type: ignore[arg-type]
        assert tickets[0].resolution_due > resumed  # type: ignore[union-attr,operator]
        # Its kind unknown: the due times are kept rather than the pause forgotten.
        assert (tickets[1].first_response_due, tickets[1].resolution_due) == before  # type: ignore[union-attr]
