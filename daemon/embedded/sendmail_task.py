"""One smtp-out task on one machine: a real sendmail daemon in a container-like sandbox.

    python -m daemon.embedded.sendmail_task task --name NAME --dir DIR --queue QUEUE_DIR
        --sinkhole HOST:PORT [--collector HOST:PORT] [--listen HOST:PORT]
        [--interval 15m] [--min-queue-age 5m] [--log-level 9] [--define NAME=VALUE ...]
    python -m daemon.embedded.sendmail_task exec --dir DIR -- COMMAND...

`task` is what an ECS task of Cabalmail's smtp-out is, minus the image:

* Its own mount and PID namespaces (`unshare`). Its init (this process) runs
  `sendmail -bD -q<interval>` over QUEUE_DIR, which other tasks may share (the EFS
  spool). When the init exits, the kernel kills every process left in the task
  (queue runners, delivery children that called setsid()), as stopping a container
  does. SIGTERM (to the task's process group, as ECS sends it) stops sendmail
  first, then the task's syslog, so sendmail's last lines are written.
* Its own syslog: /dev/log inside the task is DIR/dev/log (a private /dev holding
  only that socket and the usual device nodes), served by the task's own rsyslogd
  with `HostName` = NAME. So every line the task logs carries NAME in the syslog
  HOST field, as each container's rsyslog writes its own host name. The task's
  rsyslogd writes DIR/maillog (the container's /var/log/maillog) and, with
  --collector, forwards every mail line to a collecting rsyslogd (imtcp), which
  writes the cluster's one mail log (see daemon.embedded.sendmail_cluster).
* DIR holds its sendmail.cf (daemon.embedded.sendmail_config), `listen` (HOST:PORT
  of its SMTP listener, once it accepts), `task.pid` (the init's PID as seen from
  outside the task) and `task.log` (its stderr and sendmail's).

`exec` runs COMMAND inside a running task (its mount and PID namespaces), like
`aws ecs execute-command`: a `sendmail -q` run there logs with the task's host
name and dies with the task.

Needs root (namespaces, mounts, sendmail as a daemon) and Debian's sendmail-bin,
sendmail-cf, m4, rsyslog and util-linux (unshare, nsenter, mount).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from daemon.embedded.processes import binary, die_with_parent, free_port, run, wait_until
from daemon.embedded.sendmail_config import SendmailConfig, write_config

MODULE = "daemon.embedded.sendmail_task"  # also when run as __main__
SINKHOLE_DOMAIN = "sinkhole.test"
# Set in the environment of the re-executed init, inside its namespaces.
_INIT_ENV = "SELFCHECKD_SENDMAIL_TASK_INIT"
# Device nodes a private /dev gets from the machine's (those that exist there).
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# Without these, root is bound by the queue directory's owner and mode as any user is (as
# NFS/EFS root squashing binds it): what provokes the "perms desynced" errors.
DAC_CAPABILITIES = "-dac_override,-dac_read_search,-fowner"
SYSLOG_WAIT = 10.0
RSYSLOG_STOP_WAIT = 5.0

# UseSysTimeStamp off: a line is stamped by rsyslogd's own clock, not by the kernel's receive
# time of the datagram (microseconds apart), which libfaketime cannot move: the suite runs
# with the wall clock a year ahead (scripts/test --future), the task's log too.
TASK_RSYSLOG_CONF = """\
global(workDirectory="{workdir}" maxMessageSize="64k")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{socket}" HostName="{name}" RateLimit.Interval="0"
      UseSysTimeStamp="off")
mail.* action(type="omfile" file="{maillog}" template="RSYSLOG_FileFormat")
{forward}"""
# RFC 3164 framing with an RFC 3339 timestamp: the collector keeps the task's host name,
# its microseconds, and the `sendmail[PID]:` tag exactly (RFC 5424 forwarding drops the
# colon). A queue holds lines while the collector restarts.
FORWARD_ACTION = (
    'mail.* action(type="omfwd" target="{host}" port="{port}" protocol="tcp" '
    'template="RSYSLOG_ForwardFormat" queue.type="LinkedList" queue.size="100000" '
    'action.resumeRetryCount="-1" action.resumeInterval="1")\n'
)


def parse_hostport(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def valid_task_name(name: str) -> str:
    """A task name is its syslog host name: letters, digits, dot, dash, underscore."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"task name {name!r}: use letters, digits, '.', '-', '_' (max 63)")
    return name


def task_config(directory: Path, queue_dir: Path, listen: tuple[str, int],
                sinkhole: tuple[str, int], *, min_queue_age: str = "5m", log_level: int = 9,
                defines: dict[str, str] | None = None) -> SendmailConfig:
    """The sendmail configuration of one task: every domain (the DSNs included, so nothing
    needs DNS) goes to the sinkhole listener, and sendmail delivers in the background after
    accepting a message, as production does."""
    route = f"smtp:[{sinkhole[0]}]"
    return SendmailConfig(
        directory=directory, queue_dir=queue_dir, listen_host=listen[0], listen_port=listen[1],
        mailertable={SINKHOLE_DOMAIN: route, ".": route}, smtp_port=sinkhole[1],
        log_level=log_level, min_queue_age=min_queue_age, delivery_mode="background",
        defines=dict(defines or {}), label="selfcheckd sendmail cluster task",
    )


def task_argv(name: str, directory: str, queue_dir: str, sinkhole: str, *,
              collector: str | None = None, interval: str = "15m", min_queue_age: str = "5m",
              log_level: int = 9, defines: dict[str, str] | None = None,
              dac_override: bool = True) -> list[str]:
    """The command line that runs one task (placeholders such as `{task}` pass through)."""
    argv = [sys.executable, "-m", MODULE, "task", "--name", name, "--dir", directory,
            "--queue", queue_dir, "--sinkhole", sinkhole, "--interval", interval,
            "--min-queue-age", min_queue_age, "--log-level", str(log_level)]
    if collector is not None:
        argv += ["--collector", collector]
    if not dac_override:
        argv.append("--no-dac-override")
    for key, value in (defines or {}).items():
        argv += ["--define", f"{key}={value}"]
    return argv


def exec_argv(directory: str, command: Sequence[str]) -> list[str]:
    """The command line that runs `command` inside the task whose directory is given."""
    return [sys.executable, "-m", MODULE, "exec", "--dir", directory, "--", *command]


def without_dac_override(command: Sequence[str]) -> list[str]:
    """`command` as root without the capabilities that override file permissions."""
    return [binary("setpriv"), "--bounding-set", DAC_CAPABILITIES, "--", *command]


# -- inside the task ---------------------------------------------------------------------------


def _private_dev(dev: Path) -> None:
    """Make DIR/dev this namespace's /dev: the machine's device nodes bound into it, its
    /dev/shm (a container has one; the machine's, where libfaketime's wrapper keeps the
    semaphore its preloaded children open, or they exit), and the task's syslog socket
    (created there by its rsyslogd) as /dev/log."""
    dev.mkdir(exist_ok=True)
    mount = binary("mount")
    for name in _DEVICES:
        source = Path("/dev") / name
        if not source.exists():
            continue
        target = dev / name
        target.touch(exist_ok=True)
        run([mount, "--bind", str(source), str(target)])
    shm = Path("/dev") / "shm"
    if shm.is_dir():
        (dev / "shm").mkdir(exist_ok=True)
        run([mount, "--bind", str(shm), str(dev / "shm")])
    for name, points_to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                            ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        link = dev / name
        if not link.is_symlink():
            link.symlink_to(points_to)
    run([mount, "--rbind", str(dev), "/dev"])


def _syslog_listens(path: Path) -> bool | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return None
    return True


def _host_pid() -> int:
    """This process's PID in the outermost PID namespace (NSpid's first field)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[1])
    return os.getpid()


def _start_syslog(args: argparse.Namespace, directory: Path) -> subprocess.Popen[bytes]:
    workdir = directory / "rsyslog"
    workdir.mkdir(exist_ok=True)
    socket_path = directory / "dev" / "log"
    forward = ""
    if args.collector is not None:
        host, port = parse_hostport(args.collector)
        forward = FORWARD_ACTION.format(host=host, port=port)
    conf = directory / "rsyslog.conf"
    conf.write_text(TASK_RSYSLOG_CONF.format(
        workdir=workdir, socket=socket_path, name=args.name, maillog=directory / "maillog",
        forward=forward))
    # Its own process group: the SIGTERM that stops the task reaches sendmail first;
    # syslog is stopped after it, so sendmail's last lines are written.
    with (directory / "rsyslogd.log").open("ab") as output:
        process = subprocess.Popen(
            [binary("rsyslogd"), "-n", "-f", str(conf), "-i", str(directory / "rsyslogd.pid")],
            stdout=output, stderr=output, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent, start_new_session=True)
    wait_until(lambda: _syslog_listens(socket_path), timeout=SYSLOG_WAIT,
               what=f"the task's rsyslogd on {socket_path}")
    return process


def run_task(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """The task's init: sandbox, syslog, sendmail; reap everything; stop in order."""
    directory = Path(args.dir).resolve()
    if os.environ.get(_INIT_ENV) != str(directory):
        # Again, as PID 1 of new mount and PID namespaces.
        os.environ[_INIT_ENV] = str(directory)
        unshare = binary("unshare")
        # unshare waits out SIGTERM for its child; when it is killed, --kill-child stops
        # the init as a SIGTERM would.
        os.execv(unshare, [unshare, "--mount", "--pid", "--fork", "--propagation", "private",
                           "--kill-child=SIGTERM", "--", sys.executable, "-m", MODULE, *argv])
    valid_task_name(args.name)
    directory.mkdir(parents=True, exist_ok=True)
    listen = parse_hostport(args.listen) if args.listen else ("127.0.0.1", free_port())
    defines = dict(item.split("=", 1) for item in args.define)
    config = task_config(directory, Path(args.queue).resolve(), listen,
                         parse_hostport(args.sinkhole), min_queue_age=args.min_queue_age,
                         log_level=args.log_level, defines=defines)
    write_config(config)
    _private_dev(directory / "dev")
    syslog = _start_syslog(args, directory)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if sendmail.poll() is None:
            sendmail.send_signal(signal.SIGTERM)

    # `-bD`: in the foreground, so this init sees it exit; a full path, so sendmail does
    # not log "daemon invoked without full pathname".
    command = [binary("sendmail"), "-bD", f"-q{args.interval}", "-C", str(config.cf)]
    sendmail = subprocess.Popen(command if args.dac_override else without_dac_override(command),
                                stdin=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _write_atomically(directory / "task.pid", f"{_host_pid()}\n")
    _write_atomically(directory / "listen", f"{listen[0]}:{listen[1]}\n")
    status = _reap_until(sendmail.pid)
    syslog.terminate()
    deadline = time.monotonic() + RSYSLOG_STOP_WAIT
    while time.monotonic() < deadline and _reap_once() != syslog.pid:
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    print(f"sendmail_task name={args.name} sendmail_exit={code} stopped={stopping}",
          file=sys.stderr, flush=True)
    return 0 if stopping else (code if code >= 0 else 128 - code)


def _write_atomically(path: Path, text: str) -> None:
    """Readers poll for these files: they see none or all of it, never an empty one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _reap_until(pid: int) -> int:
    """As PID 1 of the task: reap every child (orphaned delivery children too) until `pid`
    exits; its wait status."""
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if done == pid:
            return status


def _reap_once() -> int:
    try:
        done, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return -1
    return done


def run_exec(args: argparse.Namespace) -> int:
    """Run a command in a task's namespaces; its exit status."""
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("exec: no command", file=sys.stderr)
        return 2
    pid_file = Path(args.dir) / "task.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        print(f"exec: no running task in {args.dir}: {exc}", file=sys.stderr)
        return 2
    nsenter = binary("nsenter")
    return subprocess.call([nsenter, "-t", str(pid), "-m", "-p", "--", *command])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.embedded.sendmail_task",
                                     description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    task = sub.add_parser("task", help="run one task until SIGTERM")
    task.add_argument("--name", required=True, help="the task's syslog host name")
    task.add_argument("--dir", required=True, help="the task's own directory")
    task.add_argument("--queue", required=True, help="the queue directory (may be shared)")
    task.add_argument("--sinkhole", required=True, metavar="HOST:PORT",
                      help="where every domain is delivered (the sinkhole listener)")
    task.add_argument("--collector", metavar="HOST:PORT",
                      help="forward mail lines to this syslog (imtcp) too")
    task.add_argument("--listen", metavar="HOST:PORT", help="SMTP listener (default: a free "
                      "port on 127.0.0.1)")
    task.add_argument("--interval", default="15m", help="queue run interval (sendmail -q)")
    task.add_argument("--min-queue-age", default="5m", help="confMIN_QUEUE_AGE")
    task.add_argument("--log-level", type=int, default=9, help="confLOG_LEVEL")
    task.add_argument("--no-dac-override", dest="dac_override", action="store_false",
                      help="run sendmail without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and "
                           "CAP_FOWNER: the queue directory's owner and mode bind it")
    task.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                      help="another m4 define for the .mc (repeatable)")
    ex = sub.add_parser("exec", help="run a command inside a running task")
    ex.add_argument("--dir", required=True, help="the task's directory")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    if args.command == "task":
        return run_task(args, raw)
    return run_exec(args)


if __name__ == "__main__":
    sys.exit(main())
