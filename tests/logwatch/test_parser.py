"""The sendmail/Postfix line parser: real lines, edge cases, and never raising."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.logwatch.parser import (
    OTHER,
    OTHER_MTA,
    UNPARSED,
    Delivery,
    LineKind,
    OtherLine,
    QueueAdd,
    parse_line,
    timestamp_to_epoch,
)

FIXTURES = Path(__file__).parent / "fixtures"
REAL = (FIXTURES / "sendmail_real.log").read_text().splitlines()
POSTFIX = (FIXTURES / "postfix.log").read_text().splitlines()


def test_real_queue_add_line_with_angle_brackets() -> None:
    """The real LogLevel 9 from= line yields its queue id and sender without brackets."""
    rec = parse_line(REAL[0])
    assert rec == QueueAdd("2026-11-23T19:30:26.061129+00:00", "6ANJUQna010773",
                           "qp-test@sub.example.com")


def test_real_deferred_line_keeps_reply_out_of_stat() -> None:
    """A Deferred to= line: one recipient, stat after reply=, relay and dsn extracted."""
    rec = parse_line(REAL[1])
    assert isinstance(rec, Delivery)
    assert rec.queue_id == "6ANJUQna010773"
    assert rec.recipients == ("nobody-1@sinkhole.test",)
    assert rec.stat == "Deferred: 421 4.3.2 Service temporarily unavailable"
    assert rec.dsn == "4.0.0"
    assert rec.relay == "sinkhole.cabal.internal. [127.0.0.2]"
    assert rec.delay == "00:00:00"
    assert rec.more is False


def test_real_multi_recipient_line() -> None:
    """Comma-separated recipients of one delivery are all returned, in order."""
    rec = parse_line(REAL[2])
    assert isinstance(rec, Delivery)
    assert rec.recipients == (
        "nobody-2@sinkhole.test", "nobody-3@sinkhole.test", "nobody-4@sinkhole.test")
    assert rec.stat == "Sent (2.0.0 Message accepted for discard)"


def test_real_user_unknown_and_dsn_notice() -> None:
    """A 5xx to= line parses; the DSN notice line after it is an MTA 'other' line."""
    rec = parse_line(REAL[3])
    assert isinstance(rec, Delivery)
    assert rec.stat == "User unknown"
    assert rec.dsn == "5.1.1"
    assert parse_line(REAL[4]) is OTHER_MTA


def test_real_bare_addresses_from_command_line() -> None:
    """Bare (no <>) from= and to= addresses, as logged for command-line submissions."""
    add = parse_line(REAL[5])
    assert isinstance(add, QueueAdd)
    assert add.sender == "qp-test@sub.example.com"
    rec = parse_line(REAL[6])
    assert isinstance(rec, Delivery)
    assert rec.recipients == ("nobody-6@sinkhole.test",)
    assert rec.stat == "queued"
    assert rec.relay is None


def test_real_deferred_without_reply() -> None:
    """stat=Deferred at end of line with relay=25 (the mailertable fallback host)."""
    rec = parse_line(REAL[7])
    assert isinstance(rec, Delivery)
    assert rec.stat == "Deferred"
    assert rec.relay == "25"


def test_every_real_line_is_classified() -> None:
    """All eight real lines are from/to records except the DSN notice."""
    kinds = [type(parse_line(line)).__name__ for line in REAL]
    assert kinds == ["QueueAdd", "Delivery", "Delivery", "Delivery", "OtherLine",
                     "QueueAdd", "Delivery", "Delivery"]


def test_quoted_local_part_with_comma_and_more_marker() -> None:
    """A quoted local part keeps its comma; `, [more],` is dropped and flagged."""
    line = ("2026-11-23T19:30:51.000001+00:00 h sendmail[1]: 6ANJUwxy012000: "
            'to=<"a,b"@sinkhole.test>,<Nobody-14@SinkHole.TEST>, [more], delay=00:00:01, '
            "stat=Sent (ok)")
    rec = parse_line(line)
    assert isinstance(rec, Delivery)
    assert rec.recipients == ('"a,b"@sinkhole.test', "Nobody-14@SinkHole.TEST")
    assert rec.more is True
    assert rec.delay == "00:00:01"


def test_more_marker_inside_the_list() -> None:
    """`,[more]` glued to the list (no space) is also recognised."""
    rec = parse_line("2026-11-23T19:30:51Z h sendmail[1]: 6ANJUwxy012000: "
                     "to=a@sinkhole.test,b@x.org,[more], delay=00:00:01, stat=Sent")
    assert isinstance(rec, Delivery)
    assert rec.recipients == ("a@sinkhole.test", "b@x.org")
    assert rec.more is True


def test_source_route_comma_inside_angle_brackets() -> None:
    """A comma inside <...> (source route) does not split the address."""
    rec = parse_line("2026-11-23T19:30:51Z h sendmail[1]: 6ANJUwxy012000: "
                     "to=<@a.example,@b.example:u@sinkhole.test>, delay=0, stat=Sent")
    assert isinstance(rec, Delivery)
    assert rec.recipients == ("@a.example,@b.example:u@sinkhole.test",)


def test_quoted_sender_with_angle_bracket() -> None:
    """A `>` inside a quoted local part does not end the from= address."""
    rec = parse_line('2026-11-23T19:30:51Z h sendmail[1]: 6ANJUwxy012000: '
                     'from=<"x>y"@example.com>, size=1')
    assert isinstance(rec, QueueAdd)
    assert rec.sender == '"x>y"@example.com'


def test_null_sender() -> None:
    """from=<> (bounces) is the empty sender, not a parse failure."""
    rec = parse_line("2026-11-23T19:30:51Z h sendmail[1]: 6ANJUwxy012000: from=<>, size=1")
    assert isinstance(rec, QueueAdd)
    assert rec.sender == ""


def test_postfix_lines() -> None:
    """Postfix qmgr from= and smtp to= lines with status=; other daemons are 'other'."""
    parsed = [parse_line(line) for line in POSTFIX]
    assert parsed[0] is OTHER_MTA  # smtpd connect
    assert parsed[3] == QueueAdd("Nov 23 19:40:01", "4Y8KqT1Zx3z9sWP", "app@example.com")
    rcpt = parsed[4]
    assert isinstance(rcpt, Delivery)
    assert rcpt.recipients == ("Nobody-20@SinkHole.TEST.",)
    assert rcpt.stat.startswith("deferred (connect to sinkhole.test")
    assert rcpt.dsn == "4.4.1"
    assert rcpt.relay == "none"
    multi = parsed[7]
    assert isinstance(multi, Delivery)
    assert multi.queue_id == "3F2A1B2C3D"
    assert multi.recipients == ("x@relay.sinkhole.test",)
    assert multi.stat == "bounced (Host or domain name not found)"
    assert parsed[8] is OTHER_MTA


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("entrypoint: starting sendmail", UNPARSED),
        ("tail: '/var/log/maillog' has been replaced;  following new file", UNPARSED),
        ("", UNPARSED),
        ("2026-11-23T19:29:00Z h opendkim[77]: 6ANJUQna010773: to=<a@sinkhole.test>", OTHER),
        ("2026-11-23T19:29:00Z h dovecot: imap-login: Login: user=<a@example.com>", OTHER),
        ("2026-11-23T19:29:00Z h sendmail[1]: STARTTLS=client, relay=x, version=TLSv1.3",
         OTHER_MTA),
    ],
)
def test_non_delivery_lines(line: str, expected: OtherLine) -> None:
    """Lines of other programs and non-syslog lines are counted, never parsed as mail."""
    assert parse_line(line) is expected


def test_empty_recipient_list_is_unparsed() -> None:
    """A to= line without any address is an unparsed MTA line, not a delivery."""
    rec = parse_line("2026-11-23T19:30:51Z h sendmail[1]: 6ANJUwxy012000: to=, stat=Sent")
    assert isinstance(rec, OtherLine)
    assert rec.kind is LineKind.UNPARSED
    assert rec.mta


def test_timestamps() -> None:
    """RFC 3339 (with offset or Z) and BSD syslog header timestamps convert to Unix time."""
    assert timestamp_to_epoch("2026-11-23T19:30:26.061129+00:00") == pytest.approx(
        1795462226.061129)
    assert timestamp_to_epoch("2026-11-23T19:30:26Z") == pytest.approx(1795462226.0)
    assert timestamp_to_epoch("Nov 23 19:30:26") is not None
    assert timestamp_to_epoch("Feb 30 19:30:26") is None


_PIECES = st.sampled_from([
    "2026-11-23T19:30:26.061129+00:00 ", "Nov 23 19:30:26 ", "vm ", "sendmail[1]: ",
    "postfix/smtp[2]: ", "6ANJUQna010773: ", "from=", "to=", "<", ">", '"', ",", ", ",
    "[more]", "@", "sinkhole.test", "stat=", "status=", "relay=", "dsn=", "delay=", " ", "\\",
])


@settings(max_examples=1000, deadline=None)
@given(st.text())
def test_parser_never_raises_on_arbitrary_text(text: str) -> None:
    """Any unicode text is classified without an exception."""
    parse_line(text)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.text(max_size=5)), max_size=30))
def test_parser_never_raises_on_mail_like_text(pieces: list[str]) -> None:
    """Text built from the grammar's own tokens (the risky inputs) never raises."""
    rec = parse_line("".join(pieces))
    if isinstance(rec, Delivery):
        assert rec.recipients
        assert all(r for r in rec.recipients)
