"""The one retry policy: capped exponential backoff with bounded jitter, and stamina blocks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daemon.retry import Backoff


def test_delay_doubles_from_initial_and_is_capped() -> None:
    """Without jitter the waits are initial * 2^(n-1), never above maximum."""
    b = Backoff(initial=1.0, maximum=10.0, jitter=0.0)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5, 50)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_stays_within_its_bound() -> None:
    """Jitter adds between 0 and `jitter` seconds (default: `initial`), and keeps the cap."""
    b = Backoff(initial=0.5, maximum=3.0)
    for n in range(1, 4):
        base = 0.5 * 2 ** (n - 1)
        for _ in range(50):
            assert base <= b.delay(n) <= min(3.0, base + 0.5)


def test_waits_at_the_cap_still_spread() -> None:
    """At the cap the waits spread over the top tenth below it (or the jitter, if wider),
    so alerts that failed together do not retry in step for a whole day."""
    b = Backoff(initial=1.0, maximum=300.0)
    waits = [b.delay(n) for n in (10, 20, 10**6) for _ in range(200)]
    assert all(270.0 <= w <= 300.0 for w in waits)
    assert max(waits) - min(waits) > 20.0
    small = Backoff(initial=0.5, maximum=3.0)
    assert all(2.5 <= small.delay(9) <= 3.0 for _ in range(50))


def test_an_absurd_failure_count_gives_the_cap_at_once() -> None:
    """A count restored from a state file (attempts = 10^30) gives the cap, instead of
    computing 2^(10^30) as an int, which never finished and wedged the alert component."""
    code = "from daemon.retry import Backoff; print(Backoff(1.0, 60.0, 0.0).delay(10**30))"
    # A child process, so the old behaviour fails this test instead of hanging the suite.
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=True)
    assert float(done.stdout) == 60.0


def test_a_retry_after_is_honoured_and_still_spread() -> None:
    """Not sooner than the server's Retry-After, yet clients told the same one do not all
    come back at the same instant; past the cap, the cap's spread applies."""
    b = Backoff(initial=1.0, maximum=300.0)
    waits = [b.not_before(60.0, 1) for _ in range(200)]
    assert all(60.0 <= w <= 66.0 for w in waits)
    assert max(waits) - min(waits) > 3.0
    capped = [Backoff(initial=1.0, maximum=3.0).not_before(3600.0, 1) for _ in range(50)]
    assert all(2.0 <= w <= 3.0 for w in capped)
    assert len(set(capped)) > 1
    assert all(b.not_before(0.5, 9) >= 256.0 for _ in range(20))


def test_nonsense_bounds_are_refused() -> None:
    """initial must be positive and not above maximum."""
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=5.0, maximum=1.0)


async def test_retrying_block_retries_then_gives_up() -> None:
    """`retrying` is a stamina block: the error is retried `attempts` times, then raised."""
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        async for attempt in Backoff(initial=0.001, maximum=0.002).retrying(
            on=OSError, attempts=3
        ):
            with attempt:
                calls += 1
                raise OSError("still down")

    with pytest.raises(OSError, match="still down"):
        await flaky()
    assert calls == 3
