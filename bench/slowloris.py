"""`python -m bench.slowloris`: `selfcheckd run` under `prlimit --nofile=1024` against 1,100
idle connections (issue 17's attack), with the round trip and the leak watcher running.

    .venv/bin/python -m bench.slowloris [--sockets 1100] [--seconds 20] [--nofile 1024]

The daemon is a child process with the fd limit of the attack; the mail stack another
(bench.stack). This process holds `--sockets` connections open to :PORT for `--seconds`
(from the machine's network address by default, as an attacker in the VPC would; the
health check, like ECS's, comes from loopback; `--from loopback` attacks from there too),
reopening each one the server closes (an attacker keeps its count up), half of them
trickling a request line and one header and nothing more. Meanwhile, once a second, a
fresh client asks /healthz. Printed as one JSON object:

* `healthz`: answers by status (`error` for a refused or timed-out request);
* `daemon_fds_max`: the daemon's open fds, sampled each second (its limit: `--nofile`);
* `round_trips_ok` / `round_trips_failed`: runs that ended during the flood (one every 2 s);
* `leak_alerts_seen`: leaks written to the watched log during the flood that the watcher
  reported (selfcheckd's sinkhole_leaked_recipients_total);
* `log_bytes`: what the daemon wrote to stderr during the flood;
* `closed_by_server`: attacker sockets the server closed (evicted or timed out);
* `alive`: the daemon still running at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.roundtrips import _selfcheckd, config_toml, free_port, stacks

LEAK = ("2026-11-23T19:31:53+00:00 vm sendmail[11287]: q{n:07d}: to=<nobody-{n}@sinkhole.test>, "
        "delay=00:00:00, mailer=smtp, pri=30237, relay=sinkhole.test, dsn=4.0.0, "
        "stat=Deferred\n")
FROM = ("2026-11-23T19:31:53+00:00 vm sendmail[11287]: q{n:07d}: from=<alice@example.com>, "
        "size=1, class=0, nrcpts=1, msgid=<m{n}@example.com>, proto=ESMTP, relay=x [10.0.0.9]\n")


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(port: int, path: str) -> tuple[int | str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except OSError as exc:  # refused, reset, timed out: named, to tell them apart
        reason = getattr(exc, "reason", exc)
        return f"error: {type(reason).__name__}", ""


def network_address() -> str | None:
    """This machine's address toward the network (no packet is sent), if not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
        except OSError:
            return None
        address: str = s.getsockname()[0]
    return None if address.startswith("127.") else address


async def hold(host: str, port: int, count: int, seconds: float) -> int:
    """Keep `count` idle connections open for `seconds`; return how many the server closed."""
    closed = 0

    async def one(i: int) -> None:
        nonlocal closed
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            if i % 2:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            try:
                await asyncio.wait_for(reader.read(), max(0.01, end - time.monotonic()))
                closed += 1
            except (TimeoutError, OSError):
                pass
            writer.close()

    await asyncio.gather(*(one(i) for i in range(count)))
    return closed


def _events(text: str) -> dict[str, int]:
    """How many lines of each kind the daemon logged (the first word of a kv line)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        word = line.split(" ", 1)[0][:60] if line[:1].isalpha() else line[:40]
        counts[word] = counts.get(word, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:8])


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def start_daemon(binary: str, config: Path, log_path: Path,
                 nofile: int) -> subprocess.Popen[bytes]:
    """`selfcheckd run` with the attack's fd limit, its output in `log_path`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            ["prlimit", f"--nofile={nofile}", binary, "run", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)


async def attack(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.sockets + 512)), hard))
    attacker = "127.0.0.1" if args.source == "loopback" else network_address()
    if attacker is None:
        raise RuntimeError("no non-loopback address to attack from; use --from loopback")
    with stacks(1) as routes:
        port = free_port()
        listen = f"127.0.0.1:{port}" if args.source == "loopback" else f"0.0.0.0:{port}"
        maillog = workdir / "maillog"
        maillog.write_text("")
        config = workdir / "slowloris.toml"
        config.write_text(
            config_toml(routes, interval=2, timeout=5, listen=listen)
            .replace('level = "warning"', 'level = "info"')
            + f'[leakwatch]\nsource = "file"\nstate_file = "{workdir / "state.json"}"\n'
            f'[leakwatch.file]\npath = "{maillog}"\npoll_interval = 0.5\n')
        log_path = workdir / "daemon.log"
        proc = start_daemon(args.selfcheckd, config, log_path, args.nofile)
        try:
            deadline = time.monotonic() + 30
            while scrape(port, "/healthz")[0] != 200:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("selfcheckd did not start: "
                                       + log_path.read_text()[-2000:])
                await asyncio.sleep(0.2)
            before = scrape(port, "/metrics")[1]
            log_before = log_path.stat().st_size
            flood = asyncio.create_task(hold(attacker, port, args.sockets, args.seconds))
            healthz: dict[str, int] = {}
            fds_max = 0
            leaks = 0
            started = time.monotonic()
            while not flood.done():
                await asyncio.sleep(1.0)
                status = await asyncio.to_thread(lambda: scrape(port, "/healthz")[0])
                healthz[str(status)] = healthz.get(str(status), 0) + 1
                fds_max = max(fds_max, fds(proc.pid))
                with maillog.open("a") as f:  # a leak a second: the watcher must see them
                    f.write(FROM.format(n=leaks) + LEAK.format(n=leaks))
                leaks += 1
            closed = await flood
            flood_seconds = time.monotonic() - started
            await asyncio.sleep(2.0)  # the last leak's poll
            after = (await asyncio.to_thread(scrape, port, "/metrics"))[1]
            log_bytes = log_path.stat().st_size - log_before
            alive = proc.poll() is None
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def delta(name: str, **labels: str) -> float:
        sel = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                      if labels else "")
        return metric(after, sel) - metric(before, sel)

    return {
        "sockets": args.sockets, "nofile": args.nofile, "from": args.source,
        "seconds": round(flood_seconds, 1),
        "healthz": healthz, "daemon_fds_max": fds_max,
        "round_trips_ok": delta("selfcheck_runs_total", result="success", route="r00"),
        "round_trips_failed": delta("selfcheck_runs_total", result="failure", route="r00"),
        "leaks_written": leaks, "leak_alerts_seen": delta("sinkhole_leaked_recipients_total"),
        "shed": delta("selfcheckd_http_connections_shed_total"),
        "closed_by_server": closed, "log_bytes": log_bytes,
        "log_lines_shed": log_path.read_text().count("http_connections_shed"),
        "log_events": _events(log_path.read_text()),
        "alive": alive,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=1100)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--selfcheckd", default=_selfcheckd(),
                        help="the selfcheckd to attack (another checkout's, to compare)")
    parser.add_argument("--from", dest="source", choices=("network", "loopback"),
                        default="network",
                        help="attack through the machine's network address (as from the "
                             "VPC; the health check stays on loopback) or through loopback")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="selfcheckd-slowloris-") as tmp:
        result = asyncio.run(attack(args, Path(tmp)))
        if os.environ.get("SLOWLORIS_KEEP_LOG"):
            Path(os.environ["SLOWLORIS_KEEP_LOG"]).write_bytes((Path(tmp) / "daemon.log")
                                                               .read_bytes())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
