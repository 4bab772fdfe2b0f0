"""The shared-queue lab: a cluster of real sendmail tasks (daemon.embedded.sendmail_cluster)
in front of a sinkhole on a free loopback port, for the queue watch and the drill.

Unlike the leak lab it never touches /dev/log: each task has its own syslog socket and
host name, and the cluster's collector writes its own mail log.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon.embedded.processes import free_port, wait_until
from daemon.embedded.sendmail_cluster import SendmailCluster, Task

from .sinkhole import Mode, Sinkhole

LOG_WAIT = 30.0
CLUSTER_BINARIES = ("sendmail", "makemap", "m4", "rsyslogd", "logger", "unshare", "nsenter",
                    "mount")


class ClusterLab:
    """A running cluster, its sinkhole, and waits on the cluster's mail log."""

    def __init__(self, cluster: SendmailCluster, sinkhole: Sinkhole) -> None:
        self.cluster = cluster
        self.sinkhole = sinkhole
        self.collector = cluster.collector

    @property
    def tasks(self) -> list[Task]:
        """The tasks running now, oldest first."""
        return self.cluster.running()

    def set_mode(self, mode: Mode) -> None:
        self.sinkhole.set_mode(mode)

    def offset(self) -> int:
        return self.collector.offset()

    def text(self, since: int = 0) -> str:
        return self.collector.text(since)

    def wait_for_line(self, pattern: str, *, since: int = 0, count: int = 1,
                      what: str | None = None) -> list[str]:
        """Wait until `count` lines of the cluster's log (from byte `since`) match; them."""
        regex = re.compile(pattern)

        def probe() -> list[str] | None:
            found = [line for line in self.text(since).splitlines() if regex.search(line)]
            return found if len(found) >= count else None

        return wait_until(probe, timeout=LOG_WAIT,
                          what=what or f"{count} line(s) /{pattern}/ in {self.collector.maillog}")

    def sync(self) -> None:
        """Barrier: a marker through every running task's syslog, each awaited in the
        cluster's log, so every line a task logged before it is there."""
        since = self.offset()
        for task in self.tasks:
            marker = f"selfcheckd-cluster-sync-{secrets.token_hex(6)}"
            self.cluster.log_marker(task, marker)
            self.wait_for_line(re.escape(marker), since=since)

    def settled(self, qid: str) -> None:
        """Wait until no process works on a queued message: its deferral is logged before
        the runner rewrites the qf file (through a tf temp file) and lets go of its lock."""
        queue = self.cluster.queue_dir if self.cluster.shared_queue else None
        dirs = [queue] if queue is not None else [t.queue_dir for t in self.cluster.tasks]

        def idle() -> bool | None:
            for directory in dirs:
                if (directory / f"tf{qid}").exists():
                    return None
                qf = directory / f"qf{qid}"
                try:
                    fd = os.open(qf, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None
                finally:
                    os.close(fd)  # releases the lock, if we got it
            return True

        wait_until(idle, timeout=LOG_WAIT, what=f"the runner of {qid} to let go of it")

    def attempts(self, qid: str, since: int = 0) -> list[tuple[str, str]]:
        """(host, stat) of every delivery line of a queue id, in log order."""
        out = []
        for line in self.text(since).splitlines():
            m = re.match(rf"\S+ (\S+) sendmail\[\d+\]: {qid}: to=.*, stat=(.*)$", line)
            if m:
                out.append((m.group(1), m.group(2)))
        return out


@contextmanager
def cluster_lab(directory: Path, *, replicas: int = 2, mode: Mode = "defer",
                **options: Any) -> Iterator[ClusterLab]:
    """A sinkhole on a free 127.0.0.1 port (in `mode`) and a started cluster over it;
    `options` go to SendmailCluster (shared_queue, interval, min_queue_age, log_level,
    defines, dac_override, queue_size)."""
    port = free_port()
    sinkhole = Sinkhole("sinkhole.test", "127.0.0.1", port)
    sinkhole.set_mode(mode)
    sinkhole.start()
    try:
        cluster = SendmailCluster(directory, ("127.0.0.1", port), **options)
        with cluster.start(replicas):
            yield ClusterLab(cluster, sinkhole)
    finally:
        sinkhole.stop()
