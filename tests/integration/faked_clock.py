"""The labs' daemons on the same faked clock as the tests (`scripts/test --future`).

libfaketime reaches a child through LD_PRELOAD and the FAKETIME* variables, and each of the
Debian daemons loses one of them on the way; left alone they run on the real clock while
the tests run a year ahead (a sendmail hop 400 days old, a maillog the watcher's retention
drops at once). Without libfaketime nothing here changes anything.

* Dovecot's master clears its children's environment except `import_environment`: the
  variables are added there (`dovecot_settings`).
* sendmail is installed setgid smmsp, and the loader ignores LD_PRELOAD for a set-id
  program (secure execution). As root it needs no setgid: the integration conftest puts a
  copy without the bit first on PATH (`unprivileged_sendmail`), where both the labs and
  daemon.embedded find it. sendmail then replaces its own environment; libfaketime would
  re-read FAKETIME 10 s later, find none and fall back to the real clock, which
  FAKETIME_CACHE_DURATION (tests/faketime_site) prevents.
* rsyslogd stamps a line with the kernel's receive time of the datagram (SCM_TIMESTAMP),
  which no preload can fake: the labs' rsyslogds use their own clock (UseSysTimeStamp off).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FAKETIME_VARIABLES = ("LD_PRELOAD", "FAKETIME", "FAKETIME_SHARED",
                      "FAKETIME_DONT_FAKE_MONOTONIC", "FAKETIME_FORCE_MONOTONIC_FIX",
                      "FAKETIME_CACHE_DURATION")


def faked() -> bool:
    """libfaketime is preloaded into this process (and so into the daemons it starts)."""
    return "faketime" in os.environ.get("LD_PRELOAD", "")


def dovecot_settings() -> str:
    """A dovecot.conf line passing libfaketime on to Dovecot's children ("" when not faked)."""
    names = [name for name in FAKETIME_VARIABLES if faked() and name in os.environ]
    return f"import_environment = $import_environment {' '.join(names)}\n" if names else ""


def unprivileged_sendmail(installed: str, directory: Path) -> Path | None:
    """When faked and `installed` is set-id: a copy of it in `directory` without that bit
    (the directory to put first on PATH); otherwise None."""
    if not faked() or not os.stat(installed).st_mode & 0o6000:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / "sendmail"
    shutil.copyfile(installed, copy)
    copy.chmod(0o755)
    return directory
