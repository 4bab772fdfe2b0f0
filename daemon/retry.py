"""One retry policy for all of selfcheckd: exponential backoff with jitter, capped.

Two ways to use the same `Backoff`:

* `retrying(on=...)`: a stamina retry block, for an operation retried in
  place a bounded number of times (a heartbeat ping, an AWS call).
* `delay(n)`: the wait before attempt `n + 1` of something that outlives one
  call (a poll loop after `n` failed polls, a crashed component, an alert in
  the outbox). Those loops sleep through their own injected `sleep`, so tests
  drive them with a fake clock; the formula is tenacity's
  `wait_exponential_jitter`, the one stamina applies:
  `min(maximum, initial * 2 ** (n - 1) + uniform(0, jitter))`, except that at
  the cap a wait is spread over the top tenth below `maximum` (see `delay`).
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import stamina
import tenacity

# Each retry site logs and counts its own failures, with secrets scrubbed.
# stamina's default hooks would log the raw exception (whose text can carry a
# webhook URL with its token) and register metrics on the global registry.
stamina.instrumentation.set_on_retry_hooks([])


# initial * 2**63 exceeds any maximum a config accepts.
MAX_DOUBLINGS = 64
# At the cap, waits fall in [maximum * (1 - CAP_SPREAD), maximum] (or the jitter, if wider).
CAP_SPREAD = 0.1


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff: `initial`, doubling, never above `maximum`."""

    initial: float
    maximum: float
    # Added uniformly in [0, jitter]; defaults to `initial` so small test
    # intervals are not swamped by a fixed one-second jitter.
    jitter: float | None = None
    _wait: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {self!r}")
        jitter = self.initial if self.jitter is None else self.jitter
        object.__setattr__(self, "_wait", tenacity.wait_exponential_jitter(
            multiplier=self.initial, max=self.maximum, jitter=jitter))

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures (1-based)."""
        # The strategy reads only `attempt_number` from tenacity's call state. It computes
        # 2 ** (n - 1) as an int: capped here, so a count restored from a state file cannot
        # make that a number with 10^30 digits (the cap is reached long before anyway).
        n = min(max(1, failures), MAX_DOUBLINGS)
        state = cast(tenacity.RetryCallState, SimpleNamespace(attempt_number=n))
        wait = float(self._wait(state))
        if wait < self.maximum:
            return wait
        # tenacity's formula loses its jitter at the cap: every wait is `maximum`, and
        # retries that failed together (alerts of one outage) stay in step for good.
        # Spread them below the cap instead.
        return self.maximum - random.uniform(0, self._cap_spread)

    def not_before(self, floor: float, failures: int) -> float:
        """`delay(failures)`, but not sooner than `floor` (a server's Retry-After) unless
        that is past the cap; spread like any wait, or every client told the same
        Retry-After comes back at the same instant."""
        wait = self.delay(failures)
        if wait >= floor:
            return wait
        jitter = self.initial if self.jitter is None else self.jitter
        wait = floor + (random.uniform(0, max(jitter, floor * CAP_SPREAD)) if jitter else 0.0)
        if wait < self.maximum:
            return wait
        return self.maximum - random.uniform(0, self._cap_spread)

    @property
    def _cap_spread(self) -> float:
        jitter = self.initial if self.jitter is None else self.jitter
        if jitter == 0:
            return 0.0  # asked for none (tests that count exact waits)
        return min(self.maximum - self.initial, max(jitter, self.maximum * CAP_SPREAD))

    def retrying(
        self,
        on: type[Exception] | tuple[type[Exception], ...],
        *,
        attempts: int | None,
        timeout: float | None = None,
    ) -> Any:
        """`async for attempt in policy.retrying(...): with attempt: ...` (stamina)."""
        return stamina.retry_context(
            on=on, attempts=attempts,
            timeout=None if timeout is None else dt.timedelta(seconds=timeout),
            wait_initial=self.initial, wait_max=self.maximum,
            wait_jitter=self.initial if self.jitter is None else self.jitter,
        )


# A component that crashes is restarted after 1 s, 2 s, 4 s ... at most a minute.
RESTART_BACKOFF = Backoff(initial=1.0, maximum=60.0, jitter=1.0)
