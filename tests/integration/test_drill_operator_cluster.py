"""The drill over a local cluster written the way docs/drill.md tells an operator to.

Not the project's lab (daemon.drill.lab, sendmail_task): a hand-written sendmail .mc,
a `[drill.local] start` wrapper that renders `{task_dir}/sendmail.cf` and execs
`sendmail -bD -q1m -C {task_dir}/sendmail.cf` (the issue's example command line),
Debian's own `mailq -C {task_dir}/sendmail.cf` (a shell wrapper that exits 0 whatever
sendmail said), and `sendmail -q -v -OMinQueueAge=0` as the queue run. The tasks listen
on ports of their own behind a TCP front (the load balancer); they log through the
tier's /dev/log (lab_maillog), which is the drill's log source. The sinkhole is the
shipped listener, its mode in moto's SSM.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from daemon.config import Config
from daemon.drill.command import build_drill
from daemon.drill.journal import Journal
from daemon.embedded.tcp_front import tcp_front
from daemon.sinkhole import (
    ListenerOptions,
    ModeCache,
    SinkholeHandler,
    SsmModeSource,
    run_sinkhole,
)
from tests.logwatch.aws_fakes import AWS_ENV, moto_server

from .maillog import MailLog
from .support import binary, require_binaries, require_root, run

PARAMETER = "/cabal/sinkhole_mode"
SENDER = "qp-test-drill@stage.example.com"

# One smtp-out task, by hand: the shared queue, its own pid file, port and status file,
# MinQueueAge 5m as on Cabalmail's smtp-out, everything to the sinkhole's port.
TASK_MC = """\
divert(0)dnl
include(`/usr/share/sendmail/cf/m4/cf.m4')dnl
VERSIONID(`drill test task')dnl
OSTYPE(`debian')dnl
define(`confDOMAIN_NAME', `smtp-out.drill.test')dnl
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit,GroupWritableDirPathSafe')dnl
define(`QUEUE_DIR', `@QUEUE@')dnl
define(`confPID_FILE', `@DIR@/sendmail.pid')dnl
define(`STATUS_FILE', `@DIR@/statistics')dnl
define(`confHOST_STATUS_DIRECTORY', `')dnl
define(`confMIN_QUEUE_AGE', `5m')dnl
define(`confLOG_LEVEL', `9')dnl
define(`confTO_CONNECT', `10s')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`SMTP_MAILER_ARGS', `TCP $h @SINKPORT@')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h @SINKPORT@')dnl
define(`SMTP8_MAILER_ARGS', `TCP $h @SINKPORT@')dnl
define(`DSMTP_MAILER_ARGS', `TCP $h @SINKPORT@')dnl
define(`RELAY_MAILER_ARGS', `TCP $h @SINKPORT@')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`mailertable', `hash -o @MAILERTABLE@')dnl
DAEMON_OPTIONS(`Family=inet, Name=MTA-v4, Port=@PORT@, Addr=127.0.0.1')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""

# [drill.local] start: $1 {task}, $2 {task_dir}. The third task onwards is a replacement:
# it takes REPLACEMENT_DELAY seconds to prepare (an entrypoint waiting for its volume),
# and with QUEUE=own it gets a queue of its own (the queue lost at replacement).
START = """\
#!/bin/sh
set -eu
dir=$2
queue=@SHARED@
n=$(ls "$(dirname "$dir")" | wc -l)
if [ "$n" -gt 2 ]; then
  sleep @DELAY@
  [ "@QUEUE_MODE@" = own ] && queue=$dir/mqueue
fi
mkdir -p "$queue" && chmod 700 "$queue"
port=$(@PYTHON@ -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
sed -e "s|@QUEUE@|$queue|; s|@DIR@|$dir|g; s|@PORT@|$port|" @MC@ > "$dir/sendmail.mc"
m4 "$dir/sendmail.mc" > "$dir/sendmail.cf.new" && mv "$dir/sendmail.cf.new" "$dir/sendmail.cf"
echo "$port" > "$dir/port"
exec @SENDMAIL@ -bD -q1m -C "$dir/sendmail.cf"
"""


@pytest.fixture(scope="module")
def moto_base() -> Iterator[str]:
    yield from moto_server()


@pytest.fixture
def ssm(moto_base: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    require_binaries("sendmail", "mailq", "makemap", "m4")
    require_root("run sendmail daemons")
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("ssm", endpoint_url=moto_base, region_name="us-east-1")
    client.put_parameter(Name=PARAMETER, Value="defer", Type="String", Overwrite=True)
    return client


@contextlib.asynccontextmanager
async def operator_cluster(tmp: Path, moto_base: str, maillog: MailLog, *,
                           replacement_delay: float = 0, queue_mode: str = "shared"
                           ) -> AsyncIterator[Config]:
    """The sinkhole, the front and the drill's config; the drill starts the tasks."""
    work = tmp / "tasks"
    handler = SinkholeHandler(ModeCache(SsmModeSource(PARAMETER, region="us-east-1",
                                                      endpoint_url=moto_base), ttl=1.0),
                              out=io.StringIO())

    def backends() -> list[tuple[str, int]]:
        found = []
        for port in sorted(work.glob("*/port")):
            with contextlib.suppress(OSError, ValueError):
                found.append(("127.0.0.1", int(port.read_text())))
        return found

    async with run_sinkhole(handler, ListenerOptions("127.0.0.1", 0)) as (_, sink_port), \
            tcp_front(backends) as (front_host, front_port):
        mailertable = tmp / "mailertable"
        mailertable.write_text("sinkhole.test\tsmtp:[127.0.0.1]\n")
        run([binary("makemap"), "hash", str(mailertable)], stdin=mailertable.read_text())
        mc = tmp / "task.mc.in"
        mc.write_text(TASK_MC.replace("@SINKPORT@", str(sink_port))
                      .replace("@MAILERTABLE@", str(mailertable)))
        start = tmp / "start-task"
        start.write_text(START.replace("@SHARED@", str(tmp / "mqueue"))
                         .replace("@DELAY@", f"{replacement_delay:g}")
                         .replace("@QUEUE_MODE@", queue_mode)
                         .replace("@PYTHON@", sys.executable).replace("@MC@", str(mc))
                         .replace("@SENDMAIL@", binary("sendmail")))
        start.chmod(0o755)
        cf = "{task_dir}/sendmail.cf"
        yield Config.model_validate({
            "selfcheck": {"routes": [{
                "name": "stage", "from": SENDER, "to": SENDER,
                "smtp": {"host": front_host, "port": front_port, "security": "none"},
                "imap": {"host": "127.0.0.1", "security": "none"}}]},
            "leakwatch": {"source": "file", "file": {"path": str(maillog.path)}},
            "drill": {
                "driver": "local", "environment": "stage", "route": "stage",
                "sender": SENDER, "mode_cache": 2, "settle_timeout": 60,
                "queue_timeout": 20, "poll_interval": 0.5, "cleanup_timeout": 60,
                "lock_file": str(tmp / "drill.lock"),
                "sinkhole": {"parameter": PARAMETER, "endpoint_url": moto_base,
                             "region": "us-east-1"},
                "local": {
                    "replicas": 2, "work_dir": str(work), "stop_grace": 5,
                    "start": [str(start), "{task}", "{task_dir}"],
                    "mailq": [binary("mailq"), "-C", cf],
                    "run_queue": [binary("sendmail"), "-q", "-v", "-OMinQueueAge=0", "-C", cf],
                },
            },
        })


def step(journal: Journal, number: int) -> dict[str, Any]:
    return next(s for s in journal.as_dict()["steps"] if s["step"] == number)


def mode(ssm: Any) -> str:
    return str(ssm.get_parameter(Name=PARAMETER)["Parameter"]["Value"])


async def test_a_replacement_that_takes_a_while_to_start_passes(
        tmp_path: Path, ssm: Any, moto_base: str, lab_maillog: MailLog) -> None:
    """A healthy shared queue whose replacement needs 2 s before its cf exists (Debian's
    mailq says `cannot open` and exits 0 meanwhile): the drill passes, the same queue id
    on both tasks before and after the replacement, delivered with stat=Sent."""
    async with operator_cluster(tmp_path, moto_base, lab_maillog,
                                replacement_delay=2) as config:
        journal = await build_drill(config, lines=sys.stderr).run()
    assert journal.result == "passed", journal.error
    qid = journal.queue_id
    replacement = step(journal, 4)["evidence"]["replacement"][0]
    assert all(e["listed"] == [qid] for e in step(journal, 3)["evidence"]["tasks"].values())
    after = step(journal, 5)["evidence"]["tasks"]
    assert replacement in after and all(e["listed"] == [qid] for e in after.values())
    sent = step(journal, 8)["evidence"]["log"]["sent"]
    assert len(sent) == 1 and f"{qid}: to=<{journal.recipient}>" in sent[0]
    assert mode(ssm) == "defer"


async def test_a_cluster_that_loses_the_queue_at_replacement_fails_at_step_5(
        tmp_path: Path, ssm: Any, moto_base: str, lab_maillog: MailLog) -> None:
    """The replacement starts (slowly) over a queue of its own: exit 1 at step 5 naming
    it, its evidence saying what its mailq printed; the sinkhole parked in defer."""
    async with operator_cluster(tmp_path, moto_base, lab_maillog, replacement_delay=2,
                                queue_mode="own") as config:
        journal = await build_drill(config, lines=sys.stderr).run()
    replacement = step(journal, 4)["evidence"]["replacement"][0]
    assert (journal.exit_code, journal.failed_step) == (1, "5 survived")
    assert f"not listed by task(s) {replacement} " in (journal.error or "")
    evidence = step(journal, 5)["evidence"]["tasks"][replacement]
    assert evidence["listed"] == [] and any("is empty" in ln for ln in evidence["said"])
    assert journal.cleanup["ok"] is True and mode(ssm) == "defer"
    assert any(a.startswith("drained") for a in journal.cleanup["actions"])
