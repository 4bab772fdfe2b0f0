"""Python under Debian's libfaketime 0.9.10 with the monotonic clock left alone, mended.

`FAKETIME_DONT_FAKE_MONOTONIC=1 faketime -f '+400d'` (the suite a year ahead) meets two bugs
of libfaketime 0.9.10 that have nothing to do with our code:

* Python 3.11 sleeps with `clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, deadline)`;
  libfaketime moves that absolute deadline by the fake offset even though the monotonic clock
  is not faked, the kernel gets a negative time, and every `time.sleep` (so every
  `Popen.wait(timeout=...)` and `subprocess.run(..., timeout=...)`) raises EINVAL
  (wolfcw/libfaketime#426, fixed after 0.9.10). `select()` takes a relative timeout, which
  libfaketime passes through untouched: `time.sleep` becomes a select.
* Its "forced monotonic fix" for `pthread_cond_timedwait` (on by default for glibc >= 2.30)
  subtracts a faked monotonic time from a real deadline: every timed wait on a monotonic
  condition times out at once. The GIL is such a wait, so two busy threads hand the GIL back
  and forth without end and the suite runs 4-8x slower (a soak test past its timeout).
  With the monotonic clock not faked the deadline needs no fixing:
  FAKETIME_FORCE_MONOTONIC_FIX=0 (read by libfaketime at every wait) passes it through.

* A daemon that replaces its own environment (sendmail) would lose the fake offset at
  libfaketime's next re-read of FAKETIME (every 10 s) and fall back to the real clock; the
  offset never changes during a run, so FAKETIME_CACHE_DURATION makes it read once.

tests/conftest.py loads this into the test process and, when libfaketime is there, puts this
directory first on PYTHONPATH so every Python child a test starts (the CLI, the benchmark)
loads it as its `sitecustomize`; the environment variable reaches every child, Python or not
(Dovecot, sendmail, rsyslog). Without libfaketime nothing changes.
"""

from __future__ import annotations

import errno
import os
import select
import time

PRELOADED = "faketime" in os.environ.get("LD_PRELOAD", "")


def sleep_is_broken() -> bool:
    """libfaketime is preloaded and a real `time.sleep` fails the way issue #426 describes."""
    if not PRELOADED:
        return False
    try:
        time.sleep(1e-6)
    except OSError as exc:
        return exc.errno == errno.EINVAL
    return False


def relative_sleep(seconds: float) -> None:
    """Sleep `seconds` on a relative timeout (Python retries select on EINTR, PEP 475)."""
    select.select([], [], [], seconds)


if PRELOADED and os.environ.get("FAKETIME_DONT_FAKE_MONOTONIC", "") not in ("", "0"):
    os.environ.setdefault("FAKETIME_FORCE_MONOTONIC_FIX", "0")
if PRELOADED:
    os.environ.setdefault("FAKETIME_CACHE_DURATION", str(10**9))  # seconds: read FAKETIME once
SLEEP_PATCHED = sleep_is_broken()
if SLEEP_PATCHED:
    time.sleep = relative_sleep
