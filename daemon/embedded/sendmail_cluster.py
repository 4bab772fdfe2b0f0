"""A cluster of real sendmail 8.17 daemons over one queue directory, on one machine.

Cabalmail's smtp-out runs 1 to 3 ECS tasks, each `sendmail -bD -q15m`, all over one
spool on EFS: queue runners coordinate by locks on the qf files, and
`confMIN_QUEUE_AGE` (5m) keeps a fresh message from being retried by every runner
at once. `SendmailCluster` builds that here, with real parts:

* N tasks (daemon.embedded.sendmail_task), each its own sendmail daemon in its own
  mount and PID namespaces, with its own SMTP port, pid and status files, and its
  own syslog whose HOST field is the task's name (one per container in real life);
  all of them over ONE queue directory, or (`shared_queue=False`, the negative case:
  a queue that is lost when its task is replaced) over one each.
* A collector: one rsyslogd (imtcp on loopback) that every task's syslog forwards
  to. It writes the cluster's mail log `maillog` in rsyslog's high-precision file
  format (what production's /var/log/maillog looks like, tasks interleaved as a log
  group's streams are) and one file per task under `streams/` (its log stream).
* Stopping a task is SIGTERM to its process group, then SIGKILL after a grace, as
  ECS does; a replacement is a new task (a new name) over the same queue.

Every domain routes to a sinkhole listener at HOST:PORT (the caller runs it; the
mailertable's `smtp:[HOST]` with the smtp mailers dialling PORT).

`selfcheckd demo --drill` runs the drill against such a cluster; the integration
tests (tests/integration) use it to provoke and capture what sendmail logs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemon.embedded.processes import (
    binary,
    run,
    start_daemon,
    stop_daemon,
    tail,
    wait_for_port,
    wait_until,
)
from daemon.embedded.sendmail_config import queue_ids, submit_smtp
from daemon.embedded.sendmail_task import (
    exec_argv,
    parse_hostport,
    task_argv,
    valid_task_name,
    without_dac_override,
)

COLLECTOR_RSYSLOG_CONF = """\
global(workDirectory="{workdir}" maxMessageSize="64k")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="{port_file}")
template(name="stream" type="string" string="{streams}/%HOSTNAME%.log")
mail.* action(type="omfile" file="{maillog}" template="RSYSLOG_FileFormat")
mail.* action(type="omfile" dynaFile="stream" template="RSYSLOG_FileFormat")
"""
START_TIMEOUT = 30.0
STOP_GRACE = 10.0  # SIGTERM, then SIGKILL (ECS' stopTimeout, shortened for a lab)


class Collector:
    """The cluster's syslog: one rsyslogd receiving every task's mail lines over TCP."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.maillog = directory / "maillog"
        self.streams = directory / "streams"
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the collector is not running")
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.streams.mkdir(exist_ok=True)
        workdir = self.directory / "rsyslog"
        workdir.mkdir(exist_ok=True)
        port_file = self.directory / "port"
        port_file.unlink(missing_ok=True)
        conf = self.directory / "rsyslog.conf"
        conf.write_text(COLLECTOR_RSYSLOG_CONF.format(
            workdir=workdir, port_file=port_file, streams=self.streams, maillog=self.maillog))
        log = self.directory / "rsyslogd.log"
        self._process = start_daemon(
            [binary("rsyslogd"), "-n", "-f", str(conf), "-i",
             str(self.directory / "rsyslogd.pid")], log)

        def port() -> int | None:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"the collector's rsyslogd exited:\n{tail(log)}")
            text = port_file.read_text().strip() if port_file.exists() else ""
            return int(text) if text.isdigit() else None

        self.port = wait_until(port, timeout=START_TIMEOUT, what="the collector's port")

    def stop(self) -> None:
        stop_daemon(self._process)

    def offset(self) -> int:
        """The end of the cluster's mail log now (for `text(since=...)`)."""
        try:
            return self.maillog.stat().st_size
        except FileNotFoundError:
            return 0

    def text(self, since: int = 0) -> str:
        """The complete lines of the cluster's mail log from byte `since`."""
        try:
            with self.maillog.open("rb") as fh:
                fh.seek(since)
                data = fh.read()
        except FileNotFoundError:
            return ""
        return data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace")


@dataclass
class Task:
    """One running (or stopped) task of the cluster."""

    name: str
    directory: Path
    queue_dir: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 0
    exit_code: int | None = None

    @property
    def cf(self) -> Path:
        return self.directory / "sendmail.cf"

    @property
    def maillog(self) -> Path:
        """The task's own mail log (the container's /var/log/maillog)."""
        return self.directory / "maillog"

    def alive(self) -> bool:
        return self.process.poll() is None

    def queue_ids(self) -> list[str]:
        """Queue ids of the messages in the queue directory this task runs."""
        return queue_ids(self.queue_dir)


class SendmailCluster:
    """N real sendmail tasks over one queue directory (or one each), logging per task."""

    def __init__(self, directory: Path, sinkhole: tuple[str, int], *, shared_queue: bool = True,
                 interval: str = "15m", min_queue_age: str = "5m", log_level: int = 9,
                 defines: dict[str, str] | None = None, name_prefix: str = "smtp-out",
                 dac_override: bool = True, queue_size: str | None = None) -> None:
        """`dac_override=False`: sendmail (daemons and `sendmail()` runs) as root without the
        capabilities that override file permissions, so a queue directory with the wrong
        owner or mode refuses it, as NFS/EFS root squashing would. `queue_size` (e.g.
        "2m"): the shared queue directory is a tmpfs of that size (a queue that can fill)."""
        self.directory = directory
        self.sinkhole = sinkhole
        self.shared_queue = shared_queue
        self.interval = interval
        self.min_queue_age = min_queue_age
        self.log_level = log_level
        self.defines = dict(defines or {})
        self.name_prefix = name_prefix
        self.dac_override = dac_override
        self.queue_size = queue_size
        self._queue_mounted = False
        self.queue_dir = directory / "mqueue"  # the shared spool (the EFS mount)
        self.collector = Collector(directory / "collector")
        self.tasks: list[Task] = []  # every task started, stopped ones included
        self._numbers = itertools.count(1)

    # -- life cycle ------------------------------------------------------------------------
    def start(self, replicas: int = 2) -> SendmailCluster:
        """The collector, then `replicas` tasks."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.shared_queue:
            self.queue_dir.mkdir(mode=0o700, exist_ok=True)
            if self.queue_size is not None:
                run([binary("mount"), "-t", "tmpfs", "-o", f"size={self.queue_size},mode=0700",
                     "selfcheckd-mqueue", str(self.queue_dir)])
                self._queue_mounted = True
        self.collector.start()
        try:
            for _ in range(replicas):
                self.start_task()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every task still running, then the collector; unmount a tmpfs queue even
        when stopping failed (a mount must not outlive the cluster)."""
        try:
            for task in self.running():
                self.stop_task(task)
        finally:
            try:
                self.collector.stop()
            finally:
                if self._queue_mounted:
                    # Lazily: a process that outlived its task may still hold a file there.
                    run([binary("umount"), "--lazy", str(self.queue_dir)])
                    self._queue_mounted = False

    def __enter__(self) -> SendmailCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def running(self) -> list[Task]:
        return [task for task in self.tasks if task.alive()]

    def task_argv(self, name: str, directory: str, queue_dir: str | None = None) -> list[str]:
        """The command line of one task of this cluster; `{task}`-style placeholders pass
        through (the drill's `[drill.local] start`)."""
        return task_argv(name, directory, str(queue_dir or self.queue_dir),
                         f"{self.sinkhole[0]}:{self.sinkhole[1]}",
                         collector=self.collector.address, interval=self.interval,
                         min_queue_age=self.min_queue_age, log_level=self.log_level,
                         defines=self.defines, dac_override=self.dac_override)

    def start_task(self, name: str | None = None) -> Task:
        """Start a new task (a fresh name unless given) and wait until it accepts SMTP."""
        name = valid_task_name(name or f"{self.name_prefix}-{next(self._numbers)}")
        if any(task.name == name for task in self.tasks):
            raise ValueError(f"task {name} already exists: a replacement gets a new name")
        directory = self.directory / "tasks" / name
        directory.mkdir(parents=True)
        queue_dir = self.queue_dir if self.shared_queue else directory / "mqueue"
        log = directory / "task.log"
        # SIGKILL if we die: its unshare ignores SIGTERM (it waits for the task's init,
        # which it then stops with SIGTERM).
        process = start_daemon(self.task_argv(name, str(directory), str(queue_dir)), log,
                               new_session=True, death_signal=signal.SIGKILL)
        task = Task(name, directory, queue_dir, process)
        self.tasks.append(task)
        listen = directory / "listen"

        def listening() -> tuple[str, int] | None:
            if process.poll() is not None:
                raise RuntimeError(f"task {name} exited {process.returncode}:\n{tail(log)}")
            return parse_hostport(listen.read_text().strip()) if listen.exists() else None

        try:
            task.host, task.port = wait_until(listening, timeout=START_TIMEOUT,
                                              what=f"task {name} to start")
            wait_for_port(task.host, task.port, timeout=START_TIMEOUT, what=f"task {name}")
        except BaseException:
            self.stop_task(task)
            raise
        return task

    def stop_task(self, task: Task, grace: float = STOP_GRACE) -> int:
        """SIGTERM to the task's process group, SIGKILL after `grace`; its exit code."""
        process = task.process
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        # What the group still holds (nothing, normally: the task's init took its PID
        # namespace with it) is killed too: a stopped task leaves nothing running.
        _signal_group(process.pid, signal.SIGKILL)
        task.exit_code = process.returncode
        return process.returncode

    def replace(self, task: Task) -> Task:
        """Stop `task` and start its replacement (a new task, a new name)."""
        self.stop_task(task)
        return self.start_task()

    # -- acting on a task ------------------------------------------------------------------
    def exec(self, task: Task, command: Sequence[str], *, timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside a running task (like ECS Exec): its lines carry the task's
        host name."""
        proc = subprocess.run(exec_argv(str(task.directory), command), capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} in task {task.name} exited "
                               f"{proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def sendmail(self, task: Task, *options: str, check: bool = True,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`sendmail -C <task's cf> OPTIONS...` inside the task."""
        command = [binary("sendmail"), "-C", str(task.cf), *options]
        if not self.dac_override:
            command = without_dac_override(command)
        return self.exec(task, command, check=check, timeout=timeout)

    def queue_run(self, task: Task, *options: str, check: bool = True) -> str:
        """A queue run now in that task, ignoring MinQueueAge, in the foreground (-v keeps it
        there); what it printed."""
        return self.sendmail(task, "-q", "-v", "-OMinQueueAge=0", *options, check=check).stdout

    def mailq(self, task: Task) -> str:
        return self.sendmail(task, "-bp").stdout

    def submit(self, task: Task, sender: str, recipients: Sequence[str],
               subject: str = "selfcheckd sendmail cluster") -> str:
        """Submit one message to a task over SMTP; its queue id."""
        body = f"From: <{sender}>\nSubject: {subject}\n\ncluster message\n"
        return submit_smtp(task.host, task.port, sender, recipients, body)

    def log_marker(self, task: Task, text: str) -> None:
        """Log one mail.info line through the task's syslog (a barrier: once it is in the
        collector's log, every earlier line of that task is too)."""
        self.exec(task, [binary("logger"), "-p", "mail.info", "-t", "selfcheckd-lab", text])


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone: nothing to stop
        os.killpg(pgid, signum)


def wait_for_line(collector: Collector, pattern: str, *, since: int = 0,
                  timeout: float = 30.0) -> str:
    """Wait until a line of the cluster's log (from byte `since`) matches a regex; the line."""
    regex = re.compile(pattern)

    def probe() -> str | None:
        for line in collector.text(since).splitlines():
            if regex.search(line):
                return line
        return None

    return wait_until(probe, timeout=timeout, what=f"/{pattern}/ in {collector.maillog}")

