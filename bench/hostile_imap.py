"""Peak RSS of `selfcheckd check` and `selfcheckd run` against an IMAP server that floods.

    .venv/bin/python -m bench.hostile_imap [--seconds 40] [--flood literal,line,messages]
                                           [--code DIR]

The server (tests.faulty_servers.hostile_imap_server, in this process) logs in, selects and
finds one candidate like any server, then answers the sweep's header fetch with a flood
that never ends, as fast as the client reads: a literal announced at 2 GB (`literal`), a
line without CRLF (`line`), or an endless run of small well-formed FETCH answers
(`messages`). `check` is one round trip; `run` is the daemon (`interval` 5 s, the IMAP
`command_timeout` its default 15 s) for `--seconds`, then SIGTERM. Peak RSS is the child's
`ru_maxrss` from wait4, so no sample can miss it.

`--code DIR` runs the selfcheckd of another checkout (for example an older commit's tree:
`git archive <commit> | tar -x -C /tmp/before`) with this one's virtualenv, to measure before
and after a change on the same machine: the child runs `python -m daemon.cli` in DIR, whose
`daemon` package comes first on its path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.roundtrips import config_toml
from tests.faulty_servers import FloodKind, hostile_imap_server

ROOT = Path(__file__).resolve().parents[1]
FLOODS: tuple[FloodKind, ...] = ("literal", "line", "messages")
_ERROR = re.compile(r"error='?(.*?)'? route=")  # run's selfcheck_completed line
_CHECK_ERROR = re.compile(r'"error": "(.*)"')  # check's JSON (not its cleanup_error)


@dataclass(frozen=True)
class Measured:
    mode: str  # check | run
    flood: FloodKind
    peak_rss_mib: float
    runs: int  # round trips that ended
    error: str  # the last run's error
    streamed_mib: float  # what the server sent
    seconds: float


def route(port: int) -> dict[str, object]:
    return {
        "name": "default", "from": "selfcheck@bench.test", "to": "rcpt@bench.test",
        # Never reached: the flood comes in the sweep, before anything is sent.
        "smtp": {"host": "127.0.0.1", "port": 9, "security": "none"},
        "imap": {"host": "127.0.0.1", "port": port, "security": "none", "username": "u",
                 "password": "p"},
    }


def child(cmd: list[str], cwd: Path, seconds: float | None) -> tuple[int, float, str]:
    """Run `cmd`; SIGTERM it after `seconds` (None: let it end). Its peak RSS from wait4."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd)
        if seconds is not None:
            timer = threading.Timer(seconds, proc.send_signal, (signal.SIGTERM,))
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if seconds is not None:
            timer.cancel()
        out.seek(0)
        return proc.returncode, usage.ru_maxrss / 1024, out.read().decode(errors="replace")


async def measure(mode: str, flood: FloodKind, seconds: float, code: Path | None,
                  workdir: Path) -> Measured:
    async with hostile_imap_server(flood) as server:
        config = workdir / f"{mode}-{flood}.toml"
        config.write_text(config_toml([route(server.port)], interval=5.0, timeout=5.0,
                                      listen="127.0.0.1:0"))
        # At config_toml's level (warning) each failed run logs its selfcheck_completed line.
        cmd = [sys.executable, "-m", "daemon.cli", mode, "--config", str(config)]
        started = time.monotonic()
        _, peak, output = await asyncio.to_thread(
            child, cmd, code or ROOT, seconds if mode == "run" else None)
        elapsed = time.monotonic() - started
    errors = [m.group(1) for line in output.splitlines()
              if "selfcheck_completed" in line and (m := _ERROR.search(line))]
    if mode == "check":
        errors = [m.group(1) for m in _CHECK_ERROR.finditer(output)][-1:]
    return Measured(mode, flood, peak, len(errors), errors[-1] if errors else output[-300:],
                    server.streamed / (1 << 20), elapsed)


async def main(seconds: float, floods: list[FloodKind], code: Path | None) -> None:
    print(f"selfcheckd from {code or ROOT}; "
          f"run for {seconds:g} s (interval 5 s, command_timeout 15 s)")
    print("| mode | flood | peak RSS | round trips | server sent | last error |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for flood in floods:
            for mode in ("check", "run"):
                m = await measure(mode, flood, seconds, code, Path(tmp))
                print(f"| `{m.mode}` | {m.flood} | {m.peak_rss_mib:.1f} MiB | {m.runs} in "
                      f"{m.seconds:.1f} s | {m.streamed_mib:,.0f} MiB | {m.error.strip()[:160]} |",
                      flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="how long `run` runs")
    parser.add_argument("--flood", default=",".join(FLOODS),
                        help="comma-separated: literal, line, messages")
    parser.add_argument("--code", type=Path, default=None,
                        help="a checkout whose selfcheckd to run (default: this one)")
    args = parser.parse_args()
    kinds = [k for k in args.flood.split(",") if k]
    unknown = set(kinds) - set(FLOODS)
    if unknown:
        parser.error(f"unknown flood {', '.join(sorted(unknown))}")
    asyncio.run(main(args.seconds, [k for k in FLOODS if k in kinds], args.code))
