"""The labs' daemons on the same faked clock as the tests (`scripts/test --future`).

libfaketime reaches a child through LD_PRELOAD and the FAKETIME* variables, and each of the
three Debian daemons loses one of them on the way; left alone they run on the real clock
while the tests run a year ahead (a sendmail hop 400 days old, a maillog the watcher's
retention drops at once). Without libfaketime every function here changes nothing.

* Dovecot's master clears its children's environment except `import_environment`: the
  variables are added there.
* sendmail is installed setgid smmsp, so the loader ignores LD_PRELOAD (secure execution);
  as root it needs no setgid, so the lab runs a copy without the bit. sendmail then replaces
  its own environment, and libfaketime 0.9.10, which re-reads FAKETIME every 10 s, would fall
  back to the real clock: `E` lines in the .cf keep the variables.
* rsyslogd stamps a line with the kernel's receive time of the datagram (SCM_TIMESTAMP),
  which no preload can fake: maillog.py has it use its own clock instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FAKETIME_VARIABLES = ("LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_FAKE_MONOTONIC",
                      "FAKETIME_FORCE_MONOTONIC_FIX", "FAKETIME_NO_CACHE")


def faked() -> bool:
    """libfaketime is preloaded into this process (and so into the daemons it starts)."""
    return "faketime" in os.environ.get("LD_PRELOAD", "")


def faketime_variables() -> list[str]:
    """The names of the libfaketime variables set here (none without libfaketime)."""
    return [name for name in FAKETIME_VARIABLES if faked() and name in os.environ]


def dovecot_settings() -> str:
    """A dovecot.conf line passing libfaketime on to Dovecot's children ("" when not faked)."""
    names = faketime_variables()
    return f"import_environment = $import_environment {' '.join(names)}\n" if names else ""


def keep_sendmail_environment(cf: Path) -> None:
    """Append to a sendmail.cf the `E` lines that keep libfaketime's variables in sendmail's
    environment (nothing when not faked)."""
    lines = "".join(f"E{name}\n" for name in faketime_variables())
    if lines:
        with cf.open("a", encoding="utf-8") as f:
            f.write(lines)


def sendmail_binary(installed: str, directory: Path) -> str:
    """The sendmail to run: the installed one, or when faked a copy in `directory` without
    the setgid bit (the loader ignores LD_PRELOAD for a set-id program)."""
    if not faked() or not os.stat(installed).st_mode & 0o6000:
        return installed
    copy = directory / "sendmail"
    shutil.copyfile(installed, copy)
    copy.chmod(0o755)
    return str(copy)
