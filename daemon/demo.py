"""`selfcheckd demo`: the daemon against an embedded mail stack, in one process.

A real SMTP server (aiosmtpd) delivers into a real IMAP server (pymap); the
SMTP server writes sendmail-shaped lines to a maillog that the leak watcher
follows; a local HTTP receiver prints heartbeats and leak alerts. Nothing
outside 127.0.0.1 is touched.

The work directory (`--workdir`, default .demo) belongs to one demo at a time: a
demo takes an exclusive lock on it before it writes anything there, so a second
demo started by mistake exits (3) without truncating the running one's maillog
or replacing its check.toml.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import string
import sys
import time
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from daemon.config import Config, ConfigError, LoadedConfig
from daemon.invocation import invoked_as
from daemon.logs import configure_logging

log = structlog.get_logger("daemon.demo")

LEAK_LINE = (
    "{ts} selfcheckd-demo sendmail[4242]: {qid}: to=<{rcpt}>, "
    "delay=00:00:00, xdelay=00:00:00, mailer=smtp, pri=30237, "
    "relay=sinkhole.cabal.internal. [127.0.0.2], dsn=4.0.0, "
    "stat=Deferred: 421 4.3.2 Service temporarily unavailable"
)
_QID_LETTERS = string.digits + string.ascii_letters


def leak_line() -> str:
    """A real-shaped deferred delivery to a new sinkhole.test recipient, stamped now.

    Each call has its own queue id and recipient: the watcher alerts once per
    (queue id, recipient), so a repeated line would rightly be ignored.
    """
    ts = time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime())
    # sendmail's shape: 8 letters and digits, then the pid (6 digits or more).
    letters = "".join(secrets.choice(_QID_LETTERS) for _ in range(8))
    qid = f"{letters}{secrets.randbelow(10**6):06d}"
    rcpt = f"nobody-{secrets.token_hex(3)}@sinkhole.test"
    return LEAK_LINE.format(ts=ts, qid=qid, rcpt=rcpt)


async def _start_receiver() -> tuple[web.AppRunner, int]:
    """Stands in for updown.io (heartbeats) and alert_sink (leak alerts)."""

    async def pulse(request: web.Request) -> web.Response:
        log.info("demo_heartbeat_received", body=await request.text())
        return web.Response(text="ok")

    async def alert(request: web.Request) -> web.Response:
        body = await request.json()
        log.warning("demo_alert_received", summary=body.get("summary"),
                    severity=body.get("severity"))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/pulse/{token}", pulse)
    app.router.add_post("/alert", alert)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


def demo_config(route: dict[str, Any], receiver_port: int, maillog: Path,
                args: argparse.Namespace) -> Config:
    return Config.model_validate({
        "selfcheck": {"interval": args.interval, "timeout": 20, "routes": [route],
                      "secret": secrets.token_urlsafe(16)},
        "server": {"listen": args.listen},
        "heartbeat": [{"name": "demo-pulse",
                       "url": f"http://127.0.0.1:{receiver_port}/pulse/demo-token"}],
        "leakwatch": {
            "source": "file",
            "file": {"path": str(maillog), "from_beginning": True, "poll_interval": 0.5},
            "alert": {"url": f"http://127.0.0.1:{receiver_port}/alert",
                      "secret": "demo-alert-secret"},
        },
        "shutdown_grace": 5,
    })


async def _demo(args: argparse.Namespace) -> int:
    # Before anything is written in the work directory: it may be a running demo's.
    lock = _lock_workdir(args.workdir)
    if isinstance(lock, str):
        print(f"selfcheckd demo: {lock}", file=sys.stderr)
        return 3
    try:
        return await _demo_locked(args)
    finally:
        os.close(lock)  # the lock goes with it


async def _demo_locked(args: argparse.Namespace) -> int:
    from daemon.app import Daemon
    from daemon.embedded.smtp_server import auth_results_value
    from daemon.embedded.stack import EmbeddedMailStack, StackOptions

    maillog = _fresh_maillog(args.workdir)

    stack = await EmbeddedMailStack(StackOptions(maillog=maillog)).start()
    # As a receiving MTA's milters would: the result JSON and /status show the verdicts.
    stack.smtp.auth_results = [auth_results_value({"spf": "pass", "dkim": "pass",
                                                   "dmarc": "pass"})]
    receiver, receiver_port = await _start_receiver()
    daemon: Daemon | None = None
    try:
        try:
            config = demo_config(stack.route_table(), receiver_port, maillog, args)
        except ConfigError as exc:  # pragma: no cover - the demo config is ours
            print(f"selfcheckd demo: {exc}", file=sys.stderr)
            return 2
        daemon = Daemon(LoadedConfig(config=config, path=None))
        try:
            await daemon.start()
        except OSError as exc:
            print(f"selfcheckd demo: cannot listen on {args.listen}: {exc.strerror} "
                  "(try --listen 127.0.0.1:0)", file=sys.stderr)
            return 3
        base = f"http://{config.server.host}:{daemon.listen_port}"
        check_config = _write_check_config(args.workdir, config)
        command = invoked_as(absolute=True)
        print(
            f"\nselfcheckd demo is running (selfcheck every {args.interval:g}s).\n"
            f"  metrics:  {base}/metrics\n  status:   {base}/status\n"
            f"  maillog:  {maillog.resolve()}  (the leak watcher follows it)\n"
            f"  leak:     a leaked recipient line is appended in 5 s"
            f"{'' if args.inject_leak else ' (disabled)'}; append your own with\n"
            f"            {command} demo --print-leak-line >> {maillog.resolve()}\n"
            f"  by hand:  {command} check --config {check_config} --verbose\n"
            f"            ({check_config}: this stack's SMTP and IMAP, for check and "
            "config-check --connect)\n"
            "Ctrl-C stops it.\n",
            file=sys.stderr, flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.inject_leak:
            loop.call_later(5.0, _append, maillog, leak_line())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration or None)
        return 0
    finally:
        if daemon is not None:
            await daemon.shutdown()
        await receiver.cleanup()
        await stack.stop()


def _write_check_config(workdir: Path, config: Config) -> Path:
    """A config for `check` against the running stack (its ports change on every start)."""
    route = config.selfcheck.routes[0]
    secret = config.selfcheck.secret
    imap_password = route.imap.password
    assert secret is not None  # the demo config sets both
    assert imap_password is not None
    q = json.dumps  # a JSON string or number is a TOML one here (ASCII, no control chars)
    text = (
        "# Written by `selfcheckd demo` for the stack it runs now; its ports change on\n"
        "# every start. The demo's own secret, so either side may sweep the other's probes.\n"
        f"[selfcheck]\nsecret = {q(secret.get_secret_value())}\ntimeout = 20\n\n"
        f"[[selfcheck.routes]]\nname = {q(route.name)}\n"
        f"from = {q(route.from_)}\nto = {q(route.to)}\n"
        f"smtp = {{ host = {q(route.smtp.host)}, port = {route.smtp.port}, "
        'security = "none" }\n'
        f"imap = {{ host = {q(route.imap.host)}, port = {route.imap.port}, "
        f'security = "none", username = {q(route.imap.username)}, '
        f"password = {q(imap_password.get_secret_value())} }}\n"
    )
    path = workdir.resolve() / "check.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


LOCK_NAME = "demo.lock"


def _lock_workdir(workdir: Path) -> int | str:
    """An fd holding the exclusive lock on `workdir`, or why it cannot be had.

    flock: released by the kernel when this process ends however it ends, so a demo
    that was killed leaves nothing to clean up. Only the lock file is opened before
    the lock is held, and never truncated then."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        return f"cannot use --workdir {workdir}: {exc.strerror}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
        os.close(fd)
        who = f"another demo (pid {holder})" if holder.isdigit() else "another demo"
        return (f"{who} is running with --workdir {workdir}; its maillog and check.toml "
                "are left alone. Stop it first, or give this one its own --workdir "
                "(and --listen)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _fresh_maillog(workdir: Path) -> Path:
    maillog = workdir / "maillog"
    maillog.write_text("", encoding="utf-8")
    return maillog


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def run_demo(args: argparse.Namespace) -> int:
    if args.print_leak_line:
        print(leak_line())
        return 0
    configure_logging("kv", "info")
    return asyncio.run(_demo(args))
