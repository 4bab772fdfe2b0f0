"""Reading sendmail 8.17's mailq output as the drill does (captured from real sendmail)."""

from __future__ import annotations

from daemon.drill.mailq import entries_for, parse_mailq

RCPT = "nobody-20261207171328-75e96c@sinkhole.test"

# `sendmail -bp` and `sendmail -bp -v` on Debian 12, one deferred message.
PLAIN = (
    "\t\t/var/spool/mqueue (1 request)\n"
    "-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------\n"
    "6B7HDXYE000034-      70 Mon Dec  7 17:13 <qp-test-drill@example.com>\n"
    "          7BIT   (Deferred: 421 4.3.2 Service temporarily unavailable)\n"
    "\t\t\t\t\t <nobody-20261207171328-75e96c@sinkhole\n"
    "\t\tTotal requests: 1\n")
VERBOSE = (
    "\t\t/var/spool/mqueue (1 request)\n"
    "-----Q-ID----- --Size-- -Priority- ---Q-Time--- --------Sender/Recipient--------\n"
    "6B7HDXYE000034-      70      30482 Dec  7 17:13 <qp-test-drill@example.com>\n"
    "          7BIT   (Deferred: 421 4.3.2 Service temporarily unavailable)\n"
    "\t\t\t\t\t\t<nobody-20261207171328-75e96c@sinkhole.test>\n"
    "\t\t (Deferred: 421 4.3.2 Service temporarily unavailable)\n"
    "\t\tTotal requests: 1\n")


def test_plain_mailq_with_a_cut_recipient_is_matched() -> None:
    """mailq cuts a long recipient to its column; the message is still found, deferred 4xx."""
    [entry] = entries_for(PLAIN, RCPT)
    assert entry.qid == "6B7HDXYE000034"
    assert entry.status == "Deferred: 421 4.3.2 Service temporarily unavailable"
    assert entry.deferred_4xx


def test_verbose_mailq_keeps_the_message_status_not_a_recipient() -> None:
    """mailq -v prints a status per recipient; it is not read as another recipient."""
    [entry] = entries_for(VERBOSE, RCPT)
    assert entry.recipients == [f"<{RCPT}>"]


def test_a_cut_address_without_its_at_sign_does_not_match() -> None:
    """A listing cut inside the local part could be anyone's: not a match."""
    text = PLAIN.replace("<nobody-20261207171328-75e96c@sinkhole", "<nobody-2026120717")
    assert entries_for(text, RCPT) == []


def test_other_recipients_and_an_empty_queue() -> None:
    """Another drill's message is not ours; an empty queue lists nothing."""
    assert entries_for(PLAIN, "nobody-20261207171328-000000@sinkhole.test") == []
    assert parse_mailq("/var/spool/mqueue is empty\n\t\tTotal requests: 0\n") == []
