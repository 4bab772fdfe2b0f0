"""A private NSD (Debian's authoritative DNS server) serving test zones on a loopback port.

Started by the tests' session fixture from zone files written in a temp
directory: no root needed (no privilege drop, no chroot), no system service
touched. `SELFCHECKD_KEEP_LABS=1` keeps the directory for a look afterwards.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.integration.support import (
    binary,
    free_port,
    start_daemon,
    stop_daemon,
    tail,
    wait_until,
)

SOA = "ns.{origin} hostmaster.{origin} 1 3600 600 86400 60"


def zone_text(origin: str, records: list[str]) -> str:
    """A zone file for `origin` with its SOA and NS (NSD refuses a zone without them)."""
    origin = origin.rstrip(".") + "."
    head = [f"$ORIGIN {origin}", "$TTL 60", f"@ SOA {SOA.format(origin=origin)}",
            f"@ NS ns.{origin}", f"ns.{origin} A 127.0.0.1"]
    return "\n".join(head + records) + "\n"


def txt(value: str) -> str:
    """A TXT rdata for `value`, split into 255-byte character-strings (RFC 1035 3.3)."""
    escaped = [value[i:i + 255].replace("\\", "\\\\").replace('"', '\\"')
               for i in range(0, len(value), 255)] or [""]
    return "TXT " + " ".join(f'"{chunk}"' for chunk in escaped)


@dataclass
class NsdLab:
    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    zones: dict[str, str] = field(default_factory=dict)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, directory: Path, zones: dict[str, str]) -> NsdLab:
        lab = cls(directory, free_port())
        lab.zones = zones
        conf = [
            "server:",
            f"    ip-address: 127.0.0.1@{lab.port}",
            '    username: ""',
            '    chroot: ""',
            f'    zonesdir: "{directory}"',
            '    database: ""',
            f'    pidfile: "{directory}/nsd.pid"',
            f'    xfrdfile: "{directory}/xfrd.state"',
            f'    zonelistfile: "{directory}/zone.list"',
            f'    xfrdir: "{directory}"',
            f'    logfile: "{directory}/nsd.log"',
            "    server-count: 1",
            "    do-ip6: no",
            "    verbosity: 1",
            "remote-control:",
            "    control-enable: no",
        ]
        for origin, text in zones.items():
            file = origin.replace("/", "-") + ".zone"  # RFC 2317 zone names have a '/'
            (directory / file).write_text(text)
            conf += ["zone:", f"    name: {origin}", f'    zonefile: "{file}"']
        (directory / "nsd.conf").write_text("\n".join(conf) + "\n")
        lab.process = start_daemon([binary("nsd"), "-d", "-c", str(directory / "nsd.conf")],
                                   directory / "nsd.out")
        try:
            wait_until(lab._answers, timeout=15, what="nsd to serve its zones")
        except TimeoutError as exc:
            lab.stop()
            raise RuntimeError(f"{exc}\n{tail(directory / 'nsd.log')}\n"
                               f"{tail(directory / 'nsd.out')}") from None
        return lab

    def _answers(self) -> bool | None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"nsd exited {self.process.returncode}: "
                               f"{tail(self.directory / 'nsd.log')}")
        query = dns.message.make_query(f"ns.{next(iter(self.zones))}", "A")
        try:
            response = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.2)
        except (OSError, dns.exception.Timeout):
            return None
        return True if response.rcode() == dns.rcode.NOERROR else None

    def stop(self) -> None:
        stop_daemon(self.process)


class Blackhole:
    """A UDP 'nameserver' that reads every query and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="blackhole", daemon=True)
        self._thread.start()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class DropsFirst:
    """A UDP 'nameserver' that loses the first datagram of each question (as a busy
    resolver or a lossy link does) and relays the retries to `upstream`; with
    `never`, it loses every question of those types (as authoritative servers that
    ignore types they do not know do)."""

    def __init__(self, upstream_port: int, never: frozenset[str] = frozenset()) -> None:
        self.never = {dns.rdatatype.from_text(t) for t in never}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.upstream = ("127.0.0.1", upstream_port)
        self.dropped = 0
        self._seen: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, name="drops-first", daemon=True)
        self._thread.start()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _relay(self) -> None:
        while not self._stop.is_set():
            try:
                wire, client = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            question = dns.message.from_wire(wire).question[0]
            key = (question.name.to_text().lower(), question.rdtype)
            if key not in self._seen or question.rdtype in self.never:
                self._seen.add(key)
                self.dropped += 1
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                out.settimeout(2)
                out.sendto(wire, self.upstream)
                try:
                    self.sock.sendto(out.recv(65535), client)
                except TimeoutError:
                    continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
