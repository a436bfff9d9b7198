"""Citizens' preferences at match time: quiet hours, minimum severity, test opt-in."""

from __future__ import annotations

from datetime import UTC, datetime

from streams.pipeline import in_quiet_hours


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 7, 1, hour, minute, tzinfo=UTC)


def test_a_window_that_wraps_midnight() -> None:
    assert in_quiet_hours("22:00-07:00", "UTC", at(23))
    assert in_quiet_hours("22:00-07:00", "UTC", at(6, 59))
    assert not in_quiet_hours("22:00-07:00", "UTC", at(7))
    assert not in_quiet_hours("22:00-07:00", "UTC", at(12))


def test_the_window_is_in_the_citizens_time_zone() -> None:
    # 06:00 UTC is 23:00 the evening before in Los Angeles (PDT, UTC-7).
    assert in_quiet_hours("22:00-07:00", "America/Los_Angeles", at(6))
    assert not in_quiet_hours("22:00-07:00", "Asia/Tokyo", at(6))  # 15:00 in Tokyo


def test_a_broken_window_means_no_quiet_hours_when_in_doubt_warn() -> None:
    assert not in_quiet_hours("late-early", "UTC", at(23))
    assert not in_quiet_hours("22:00-07:00", "Mars/Olympus", at(23))
