"""Business calendar and due-time arithmetic. Pure: no database, no clock reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class BusinessCalendar:
    timezone: str = "UTC"
    hours: Mapping[str, tuple[time, time] | None] = field(default_factory=dict)
    holidays: frozenset[date] = frozenset()
    always_on: bool = False  # 24x7 tiers

    def window(self, day: date) -> tuple[time, time] | None:
        if self.always_on:
            return time(0), time(23, 59, 59, 999999)
        if day in self.holidays:
            return None
        return self.hours.get(_DAYS[day.weekday()])


def _open_span(cal: BusinessCalendar, day: date, tz: ZoneInfo) -> tuple[datetime, datetime] | None:
    """The day's business window as UTC instants.

    In UTC because Python subtracts and adds aware datetimes that share a tzinfo by wall
    clock: across a DST change that would count an hour that never happened (or miss one).
    """
    win = cal.window(day)
    if win is None:
        return None
    return (datetime.combine(day, win[0], tz).astimezone(UTC),
            datetime.combine(day, win[1], tz).astimezone(UTC))


def add_business_time(cal: BusinessCalendar, start: datetime, duration: timedelta) -> datetime:
    """The moment `duration` of business time after `start` (aware; result in UTC)."""
    if cal.always_on:
        return start.astimezone(UTC) + duration
    tz = ZoneInfo(cal.timezone)
    now = start.astimezone(UTC)
    remaining = duration
    day = start.astimezone(tz).date()
    for _ in range(3660):  # ten years of days: a calendar with no open day ends the loop
        span = _open_span(cal, day, tz)
        if span is not None:
            begin = max(span[0], now)
            if begin < span[1]:
                available = span[1] - begin
                if remaining <= available:
                    return begin + remaining
                remaining -= available
        day += timedelta(days=1)
    raise ValueError("the business calendar has no open hours")


def business_time_between(cal: BusinessCalendar, start: datetime, end: datetime) -> timedelta:
    """Business time elapsed from start to end (zero if end <= start)."""
    if end <= start:
        return timedelta(0)
    if cal.always_on:
        return end - start
    tz = ZoneInfo(cal.timezone)
    a, b = start.astimezone(UTC), end.astimezone(UTC)
    total = timedelta(0)
    day, last = start.astimezone(tz).date(), end.astimezone(tz).date()
    while day <= last:
        span = _open_span(cal, day, tz)
        if span is not None:
            lo, hi = max(span[0], a), min(span[1], b)
            if hi > lo:
                total += hi - lo
        day += timedelta(days=1)
    return total


def holiday_dates(country: str | None, extra: tuple[str, ...], years: range) -> frozenset[date]:
    days: set[date] = {date.fromisoformat(d) for d in extra}
    if country:
        import holidays

        days.update(holidays.country_holidays(country, years=list(years)).keys())
    return frozenset(days)


def tier_for_address(address: str, rules: Mapping[str, str], default: str) -> str:
    """Exact address first, then '@domain', then parent domains."""
    address = address.lower()
    if address in rules:
        return rules[address]
    domain = address.rpartition("@")[2]
    parts = domain.split(".")
    for i in range(len(parts)):
        for key in ("@" + ".".join(parts[i:]), ".".join(parts[i:])):
            if key in rules:
                return rules[key]
    return default
