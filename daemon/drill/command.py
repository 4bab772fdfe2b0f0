"""`selfcheckd drill queue-persistence`: build the drill from the config, run it, report.

Signals: SIGTERM and SIGINT go to `Drill.interrupt` (the steps stop, the
cleanup runs, a third signal exits at once). The step lines go to stderr as
they happen; `--json` prints the journal on stdout; `--journal PATH` writes it
to a file too (also when the drill was interrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from daemon.config import Config
from daemon.drill.driver import Cluster
from daemon.drill.journal import Journal
from daemon.drill.logs import log_source
from daemon.drill.modes import mode_store
from daemon.drill.steps import Drill


def build_cluster(config: Config, **seams: Any) -> Cluster:
    cfg = config.drill
    assert cfg is not None
    if cfg.driver == "local":
        from daemon.drill.drivers.local import LocalCluster

        assert cfg.local is not None  # the config requires it for this driver
        return LocalCluster(cfg.local, settle_timeout=cfg.settle_timeout, **seams)
    from daemon.drill.drivers.ecs import EcsCluster

    assert cfg.ecs is not None
    ssm = cfg.sinkhole.endpoint_url
    return EcsCluster(cfg.ecs, ssm_endpoint=ssm, **seams)


def build_drill(config: Config, *, keep_going: bool = False, lines: TextIO | None = None,
                cluster: Cluster | None = None, **seams: Any) -> Drill:
    """The drill of `config` ([drill] must be set; its route exists: the config says so)."""
    cfg = config.drill
    assert cfg is not None
    route = next(r for r in config.selfcheck.routes if r.name == cfg.route)
    logs = log_source(config.leakwatch) if cfg.logs else None
    return Drill(cfg, route.smtp, cluster or build_cluster(config), mode_store(cfg.sinkhole),
                 logs, keep_going=keep_going, lines=lines, **seams)


async def run_with_signals(drill: Drill) -> Journal:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drill.interrupt, sig.name)
    try:
        return await drill.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)


def write_journal(journal: Journal, path: Path) -> str | None:
    """Write the journal atomically (0600); the problem, or None."""
    buf = io.StringIO()
    journal.dump(buf)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return f"cannot write the journal to {path}: {exc.strerror or exc}"
    return None


def journal_writable(path: Path) -> str | None:
    """Can `write_journal` write `path`? The problem, or None (tried with its temp file)."""
    if path.is_dir():
        return f"cannot write the journal to {path}: it is a directory"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        tmp.unlink()
    except OSError as exc:
        return f"cannot write the journal to {path}: {exc.strerror or exc}"
    return None


def run(config: Config, args: Any) -> int:
    if config.drill is None:
        print("selfcheckd drill: config: drill: no [drill] section (docs/drill.md)",
              file=sys.stderr)
        return 2
    if args.journal is not None:  # the evidence asked for must not be lost after the drill
        problem = journal_writable(args.journal)
        if problem:
            print(f"selfcheckd drill: {problem}; nothing was done", file=sys.stderr)
            return 2
    drill = build_drill(config, keep_going=args.keep_going)
    journal = asyncio.run(run_with_signals(drill))
    if args.journal is not None:
        problem = write_journal(journal, args.journal)
        if problem:
            print(f"selfcheckd drill: {problem}" + ("" if args.json else
                  "; the journal follows on stdout instead"), file=sys.stderr)
            if not args.json:
                journal.dump(sys.stdout)
                sys.stdout.flush()
    if args.json:
        journal.dump(sys.stdout)
        sys.stdout.flush()
    return journal.exit_code
