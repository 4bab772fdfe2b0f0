"""Reading sendmail 8.17's mailq output as the drill does (captured from real sendmail)."""

from __future__ import annotations

import pytest

from daemon.drill.mailq import entries_for, parse_mailq, unanswered

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


# Debian's `mailq` wrapper (exit status 0 in every case below), captured on Debian 12.
DEBIAN_EMPTY = ("MSP Queue status...\n/var/spool/mqueue-client is empty\n\t\tTotal requests: 0\n"
                "MTA Queue status...\n/var/spool/mqueue is empty\n\t\tTotal requests: 0\n")
NO_CF = ("MSP Queue status...\n/t/task-3/sendmail.cf: line 0: cannot open: No such file or "
         "directory\nMTA Queue status...\n/t/task-3/sendmail.cf: line 0: cannot open: No such "
         "file or directory\n")
NO_QUEUE_DIR = ("MSP Queue status...\n/var/spool/mqueue-client is empty\n\t\tTotal requests: "
                "0\nMTA Queue status...\ncan not chdir(/var/spool/mqueue/): Permission denied\n")


@pytest.mark.parametrize("text", [PLAIN, VERBOSE, DEBIAN_EMPTY, "Mail queue is empty\n",
                                  "/var/spool/mqueue is empty\n\t\tTotal requests: 0\n"])
def test_queue_listings_are_answers(text: str) -> None:
    """A listing, an empty queue, and Debian's two sections are mailq answers."""
    assert unanswered(text) is None


@pytest.mark.parametrize(("text", "said"), [
    (NO_CF, "MSP Queue status... /t/task-3/sendmail.cf: line 0: cannot open"),
    (NO_QUEUE_DIR, "MTA Queue status... can not chdir(/var/spool/mqueue/): Permission denied"),
    ("sh: 1: mailq: not found\n", "sh: 1: mailq: not found"),
    ("", "no output"),
])
def test_a_mailq_that_could_not_read_its_queue_is_no_answer(text: str, said: str) -> None:
    """Debian's mailq exits 0 when it cannot open its cf or its queue (and ECS Exec returns
    no exit status): such output is no reading, never an empty queue; it says what mailq
    printed instead, per section."""
    problem = unanswered(text)
    assert problem is not None and problem.startswith(said)
    assert parse_mailq(text) == []  # what the drill used to read as "not listed" / "gone"
