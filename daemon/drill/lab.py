"""A local drill lab: real sendmail tasks over one queue directory, the shipped sinkhole, a
front, and the `[drill]` configuration that drives them (`selfcheckd demo --drill`).

Real parts throughout: the tasks are daemon.embedded.sendmail_task (each its own
sendmail daemon and syslog host, started, stopped and replaced by the drill's
local driver through its command lines); the sinkhole is daemon.sinkhole reading
a mode file (or an SSM parameter); the cluster's mail log is the collector's,
which the drill reads as its `[leakwatch] file` log source.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.embedded.processes import binary, find_binary
from daemon.embedded.sendmail_cluster import Collector
from daemon.embedded.sendmail_task import exec_argv, task_argv
from daemon.embedded.tcp_front import tcp_front
from daemon.sinkhole import (
    FileModeSource,
    ListenerOptions,
    ModeCache,
    ModeSource,
    SinkholeHandler,
    SsmModeSource,
    run_sinkhole,
)

# What the tasks need (scripts/install-system-deps installs them).
LAB_BINARIES = ("sendmail", "makemap", "m4", "rsyslogd", "logger", "unshare", "nsenter",
                "mount")
SENDER = "qp-test-drill@example.com"


def missing_binaries() -> list[str]:
    return [name for name in LAB_BINARIES if find_binary(name) is None]


@dataclass
class Lab:
    workdir: Path
    tree: dict[str, Any]  # the configuration, as a TOML table would give it
    collector: Collector
    sinkhole: SinkholeHandler
    accepted: io.StringIO  # the sinkhole's accept-log records
    mode_file: Path | None

    def config(self) -> Config:
        return Config.model_validate(self.tree)


@contextlib.asynccontextmanager
async def drill_lab(workdir: Path, *, shared_queue: bool = True, mode_cache: float = 1.0,
                    interval: str = "1m", replicas: int = 2,
                    ssm: tuple[str, str] | None = None) -> AsyncIterator[Lab]:
    """Start the sinkhole, the log collector and the front; yield the lab and its config.

    The drill's local driver starts and stops the tasks themselves. `ssm` = (parameter,
    endpoint URL) puts the mode in SSM instead of `workdir/sinkhole_mode`.
    """
    workdir, tasks_dir, shared = await asyncio.to_thread(_prepare, workdir, shared_queue)
    mode_file: Path | None = None
    source: ModeSource
    if ssm is None:
        mode_file = workdir / "sinkhole_mode"
        await asyncio.to_thread(mode_file.write_text, "defer\n", encoding="utf-8")
        source = FileModeSource(mode_file)
    else:
        source = SsmModeSource(ssm[0], region="us-east-1", endpoint_url=ssm[1])
    accepted = io.StringIO()
    handler = SinkholeHandler(ModeCache(source, ttl=mode_cache), out=accepted)
    collector = Collector(workdir / "collector")
    async with run_sinkhole(handler, ListenerOptions("127.0.0.1", 0)) as (s_host, s_port):
        await asyncio.to_thread(collector.start)
        try:
            async with tcp_front(lambda: _backends(tasks_dir)) as (f_host, f_port):
                queue = str(shared) if shared_queue else "{task_dir}/mqueue"
                sendmail = binary("sendmail")
                cf = "{task_dir}/sendmail.cf"
                sinkhole_table: dict[str, Any] = (
                    {"mode_file": str(mode_file)} if mode_file is not None else
                    {"parameter": ssm[0], "endpoint_url": ssm[1], "region": "us-east-1"}
                    if ssm is not None else {})
                tree: dict[str, Any] = {
                    "selfcheck": {"routes": [{
                        "name": "drill", "from": SENDER, "to": SENDER,
                        "smtp": {"host": f_host, "port": f_port, "security": "none"},
                        "imap": {"host": "127.0.0.1", "security": "none"}}]},
                    "leakwatch": {"source": "file", "allowed_senders": ["qp-test-*@*"],
                                  "file": {"path": str(collector.maillog)}},
                    "drill": {
                        "driver": "local", "environment": "demo", "route": "drill",
                        "sender": SENDER, "mode_cache": mode_cache, "settle_timeout": 60,
                        "queue_timeout": 30, "retry_timeout": 120, "poll_interval": 0.5,
                        "cleanup_timeout": 60, "lock_file": str(workdir / "drill.lock"),
                        "sinkhole": sinkhole_table,
                        "local": {
                            "replicas": replicas, "work_dir": str(tasks_dir),
                            "stop_grace": 10,
                            "start": task_argv("{task}", "{task_dir}", queue,
                                               f"{s_host}:{s_port}",
                                               collector=collector.address,
                                               interval=interval),
                            "mailq": exec_argv("{task_dir}", [sendmail, "-C", cf, "-bp"]),
                            "run_queue": exec_argv("{task_dir}", [
                                sendmail, "-C", cf, "-q", "-v", "-OMinQueueAge=0"]),
                        },
                    },
                }
                yield Lab(workdir, tree, collector, handler, accepted, mode_file)
        finally:
            collector.stop()


def _prepare(workdir: Path, shared_queue: bool) -> tuple[Path, Path, Path]:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tasks_dir = workdir / "tasks"
    if tasks_dir.exists():
        shutil.rmtree(tasks_dir)  # a previous run's tasks (their names would repeat)
    shared = workdir / "mqueue"
    if shared_queue:
        shared.mkdir(mode=0o700, exist_ok=True)
    return workdir, tasks_dir, shared


def _backends(tasks_dir: Path) -> list[tuple[str, int]]:
    """The SMTP listeners the tasks wrote (`listen`), newest first; dead ones are skipped
    by the front when they refuse."""
    found = []
    for listen in sorted(tasks_dir.glob("*/listen"), key=lambda p: p.stat().st_mtime,
                         reverse=True):
        with contextlib.suppress(OSError, ValueError):
            host, _, port = listen.read_text().strip().rpartition(":")
            found.append((host, int(port)))
    return found


async def _demo(workdir: Path) -> int:
    from daemon.drill.command import build_drill, run_with_signals

    async with drill_lab(workdir, mode_cache=2.0) as lab:
        config = lab.config()
        print("selfcheckd demo --drill: two real sendmail daemons over one queue directory "
              f"({workdir / 'mqueue'}), the sinkhole reading {lab.mode_file}; the drill "
              "runs end to end (Ctrl-C stops it; the cleanup still runs).\n",
              file=sys.stderr, flush=True)
        journal = await run_with_signals(build_drill(config))
        path = workdir / "journal.json"
        from daemon.drill.command import write_journal

        problem = write_journal(journal, path)
        print(f"\njournal: {path if problem is None else problem}", file=sys.stderr)
        records = [line for line in lab.accepted.getvalue().splitlines() if line]
        if records:
            print(f"sinkhole accept records: {len(records)}", file=sys.stderr)
        return journal.exit_code


def run_demo(workdir: Path) -> int:
    """`selfcheckd demo --drill`; exit 3 with the reason when the lab cannot run here."""
    missing = missing_binaries()
    if missing:
        print(f"selfcheckd demo --drill needs {', '.join(missing)} (Debian's sendmail-bin, "
              "sendmail-cf, m4, rsyslog, util-linux): run scripts/install-system-deps as "
              "root", file=sys.stderr)
        return 3
    if os.geteuid() != 0:
        print("selfcheckd demo --drill runs sendmail daemons in their own namespaces: it "
              "needs root", file=sys.stderr)
        return 3
    return asyncio.run(_demo(workdir / "drill"))
