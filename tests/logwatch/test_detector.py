"""The leak detector: domain matching, sender correlation, allowlist, one alert per pair."""

from __future__ import annotations

from daemon.logwatch.detector import LeakDetector
from daemon.logwatch.parser import Delivery, QueueAdd


def _delivery(qid: str, *rcpts: str, stat: str = "Sent") -> Delivery:
    return Delivery("2026-11-23T19:30:26Z", qid, tuple(rcpts), stat, False)


def test_domain_match_is_case_insensitive_with_subdomains_and_trailing_dot() -> None:
    """sinkhole.test matches any case, subdomains and a trailing dot, but not look-alikes."""
    d = LeakDetector(["SinkHole.Test."], [])
    assert d.is_sinkhole("a@sinkhole.test")
    assert d.is_sinkhole("a@SINKHOLE.TEST.")
    assert d.is_sinkhole("a@deep.sub.sinkhole.test")
    assert d.is_sinkhole('"x@y"@sinkhole.test')
    assert not d.is_sinkhole("a@notsinkhole.test")
    assert not d.is_sinkhole("a@sinkhole.test.example.com")
    assert not d.is_sinkhole("sinkhole.test")


def test_sender_is_correlated_by_queue_id() -> None:
    """The from= sender of the same queue id is attached to the finding."""
    d = LeakDetector(["sinkhole.test"], [])
    d.see_queue_add(QueueAdd("t", "Q1", "app@example.com"))
    [f] = d.see_delivery(_delivery("Q1", "n@sinkhole.test", "ok@example.org"))
    assert (f.sender, f.recipient, f.expected) == ("app@example.com", "n@sinkhole.test", False)


def test_unknown_sender_is_a_leak() -> None:
    """Without a from= line the sender is unknown and the finding is a leak (fail safe)."""
    d = LeakDetector(["sinkhole.test"], ["qp-test-*@*"])
    [f] = d.see_delivery(_delivery("Q9", "n@sinkhole.test"))
    assert f.sender is None
    assert f.expected is False


def test_allowlisted_sender_is_expected_traffic() -> None:
    """Senders matching an allowlist glob (any case) are test traffic, not leaks."""
    d = LeakDetector(["sinkhole.test"], ["qp-test-*@*"])
    d.see_queue_add(QueueAdd("t", "Q1", "QP-Test-2026-05@sub.example.com"))
    d.see_queue_add(QueueAdd("t", "Q2", "qp-test@sub.example.com"))
    [f1] = d.see_delivery(_delivery("Q1", "n@sinkhole.test"))
    [f2] = d.see_delivery(_delivery("Q2", "n@sinkhole.test"))
    assert f1.expected is True
    assert f2.expected is False  # `qp-test@` does not match `qp-test-*@*`


def test_one_finding_per_queue_id_and_recipient() -> None:
    """Retries of the same (queue id, recipient) in any letter case are reported once."""
    d = LeakDetector(["sinkhole.test"], [])
    assert len(d.see_delivery(_delivery("Q1", "N@sinkhole.test", "m@sinkhole.test"))) == 2
    assert d.see_delivery(_delivery("Q1", "n@SINKHOLE.test", stat="Deferred")) == []
    assert len(d.see_delivery(_delivery("Q2", "n@sinkhole.test"))) == 1


def test_memory_is_bounded() -> None:
    """The sender map and the reported set never exceed max_tracked entries."""
    d = LeakDetector(["sinkhole.test"], [], max_tracked=100)
    for i in range(1000):
        d.see_queue_add(QueueAdd("t", f"Q{i}", "a@b"))
        d.see_delivery(_delivery(f"Q{i}", "n@sinkhole.test"))
    assert len(d.senders) == 100
    assert len(d.reported) == 100
    assert "Q999" in d.senders


def test_state_round_trip() -> None:
    """A restored detector remembers senders and already-reported pairs."""
    d = LeakDetector(["sinkhole.test"], [])
    d.see_queue_add(QueueAdd("t", "Q1", "a@b"))
    d.see_delivery(_delivery("Q1", "n@sinkhole.test"))
    again = LeakDetector(["sinkhole.test"], [])
    again.restore(**d.state())
    assert again.see_delivery(_delivery("Q1", "n@sinkhole.test")) == []
    assert again.senders["Q1"] == "a@b"
