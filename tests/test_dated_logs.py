"""The helper that moves a dated log fixture to now."""

from __future__ import annotations

from itertools import pairwise

import pytest

from daemon.logwatch.parser import timestamp_to_epoch
from tests.dated_logs import TimeShift

CAPTURE = (
    "2026-11-23T19:30:26.061129+00:00 vm sendmail[10773]: 6ANJUQna010773: from=<a@b.c>, "
    "msgid=<202611231930.6ANJUivJ010931@b.c>\n"
    "2026-11-23T20:30:27+01:00 vm sendmail[10775]: 6ANJUQna010773: to=<x@sinkhole.test>\n"
    "2026-11-23T19:31:53.567Z vm sendmail[11287]: 6ANJVrcF011285: to=<y@sinkhole.test>\n"
    "Nov 23 19:30:26 mx postfix/qmgr[900]: 4Y8KqT1Zx3z9sWP: removed\n"
)


def stamps(text: str) -> list[float]:
    return [timestamp_to_epoch(line.split(" ")[0]) or 0.0
            for line in text.splitlines() if line[:4].isdigit()]


def test_the_newest_line_lands_just_before_now_and_the_spacing_is_kept() -> None:
    """Lines 1 s and 87.5 s apart stay so; the newest is `ago` seconds before the given now."""
    shift = TimeShift.to_now(CAPTURE, ago=300, now=2_000_000_000.5)
    moved = shift.apply(CAPTURE)
    before, after = stamps(CAPTURE), stamps(moved)
    assert [b - a for a, b in pairwise(after)] == pytest.approx(
        [b - a for a, b in pairwise(before)])
    assert abs(max(after) - (2_000_000_000.5 - 300)) <= 0.5
    assert shift.epoch("2026-11-23T19:31:53.567Z") == pytest.approx(max(after))


def test_each_stamp_keeps_its_form_and_only_line_headers_move() -> None:
    """Precision, offset and `Z` stay as written; a Message-ID's date and BSD lines stay put."""
    moved = TimeShift(86400 * 400 + 1).apply(CAPTURE).splitlines()
    assert moved[0].startswith("2027-12-28T19:30:27.061129+00:00 vm ")
    assert moved[0].endswith("msgid=<202611231930.6ANJUivJ010931@b.c>")
    assert moved[1].startswith("2027-12-28T20:30:28+01:00 vm ")
    assert moved[2].startswith("2027-12-28T19:31:54.567Z vm ")
    assert moved[3] == CAPTURE.splitlines()[3]


def test_text_without_a_timestamp_is_refused() -> None:
    """Shifting a log with nothing to shift is a mistake in the test, not a silent no-op."""
    with pytest.raises(ValueError, match="no RFC 3339"):
        TimeShift.to_now("Nov 23 19:30:26 mx postfix/qmgr[900]: removed\n")
