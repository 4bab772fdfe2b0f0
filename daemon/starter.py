"""`selfcheckd init`: write a minimal working starter config.

One route, plus the heartbeat and leak watcher sections commented out. Every
value the operator must replace carries a `# REPLACE:` comment saying what goes
there; once those are filled in, the file loads (tests/test_starter.py holds it
to that). config.example.toml shows every key; this file shows the few that
matter first.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from daemon.invocation import invoked_as

EXIT_OK, EXIT_BAD_INPUT = 0, 2

STARTER = """\
# selfcheckd starter config, written by `selfcheckd init`.
#
# Replace every value marked REPLACE, then check the file and reach its servers:
#   selfcheckd config-check --config {path} --connect
# Every key, with its default: config.example.toml and docs/configuration.md.

[selfcheck]
interval = 600    # seconds between round trips
timeout = 60      # seconds the probe may take to arrive
# Keys the probe's token. Without it each process makes up its own, and a probe an
# earlier process left behind (a cron `check` that timed out) can never be proven
# ours, so it is never swept. Create it once: head -c 32 /dev/urandom | base64 > FILE
secret_file = "/etc/selfcheckd/probe.secret"      # REPLACE: a file holding a random secret

# One route: a probe sent by SMTP from `from` to `to`, then read back over IMAP.
[[selfcheck.routes]]
name = "default"
from = "selfcheck@example.com"             # REPLACE: the address the probe is sent from
to = "selfcheck-receiver@example.com"      # REPLACE: the mailbox the probe must reach

[selfcheck.routes.smtp]
host = "smtp.example.com"                  # REPLACE: your submission (SMTP) server
security = "starttls"                      # none (port 25) | starttls (587) | tls (465)
# Delete these two lines if the server takes mail without a login.
username = "selfcheck@example.com"         # REPLACE: the SMTP login
password_file = "/etc/selfcheckd/smtp.password"   # REPLACE: a file holding only that password

[selfcheck.routes.imap]
host = "imap.example.com"                  # REPLACE: the IMAP server of the `to` mailbox
security = "starttls"                      # starttls (port 143) | tls (993) | none (143)
username = "selfcheck-receiver@example.com"       # REPLACE: the IMAP login of that mailbox
password_file = "/etc/selfcheckd/imap.password"   # REPLACE: a file holding only that password

# Log lines go to stderr as `event key=value ...`. journald, docker logs and awslogs (ECS)
# add the time and level themselves; if they go to a plain file or a terminal instead,
# uncomment this so each line starts with its UTC time and level.
# [logging]
# timestamps = true

# A success pulse after each good run (updown, healthchecks, Uptime Kuma): uncomment.
# The URL carries a token, so it is read from a variable (or use url_file).
# [[heartbeat]]
# kind = "updown"                          # updown | healthchecks | uptime-kuma
# url_env = "SELFCHECKD_HEARTBEAT_URL"     # REPLACE: the variable holding the pulse URL

# The leak watcher: alerts when the outbound mail log shows mail to a sinkhole domain
# that is not expected test traffic. Uncomment to follow a local mail log;
# docs/leakwatch.md shows CloudWatch and the other keys.
# [leakwatch]
# source = "file"                          # file | cloudwatch | stdin
# domains = ["sinkhole.test"]              # the sinkhole domain(s), subdomains included
# state_file = "/var/lib/selfcheckd/leakwatch.json"   # what survives a restart
# [leakwatch.file]
# path = "/var/log/maillog"                # REPLACE: your MTA's log file
# [leakwatch.alert]
# url = "https://alerts.example.com/alert" # REPLACE: where leak alerts are POSTed
"""


def write_starter(path: Path, *, force: bool) -> int:
    """Write the starter config to `path` (not over an existing file unless `force`)."""
    shown = shlex.quote(str(path))
    # The header's command shows the path unless it would break the comment line.
    text = STARTER.format(path=shown if shown.isprintable() else "FILE")
    try:
        with path.open("w" if force else "x", encoding="utf-8") as out:
            out.write(text)
    except FileExistsError:
        print(f"selfcheckd init: {path} already exists (use --force to overwrite it)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"selfcheckd init: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {path}: replace every value marked REPLACE, then check it with "
          f"`{invoked_as()} config-check --config {shown} --connect`")
    return EXIT_OK
