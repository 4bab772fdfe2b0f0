"""A private Knot DNS (Debian's other authoritative server) serving the same test zones.

NSD answers a CNAME into another zone it serves with the target's records too;
Knot and BIND answer the CNAME alone and leave the rest to the asker. Tests of
what a check does with such an answer run against this one. Started like the
NSD lab: no root needed, nothing of the system's touched.
"""

from __future__ import annotations

from pathlib import Path

from tests.dnschecks.nsd import NsdLab
from tests.integration.support import binary, free_port, start_daemon, tail, wait_until


class KnotLab(NsdLab):
    """knotd on a loopback port (same interface as `NsdLab`)."""

    @classmethod
    def start(cls, directory: Path, zones: dict[str, str]) -> KnotLab:
        lab = cls(directory, free_port())
        lab.zones = zones
        (directory / "db").mkdir()
        conf = [
            "server:",
            f"    listen: 127.0.0.1@{lab.port}",
            f'    rundir: "{directory}"',
            "log:",
            f'  - target: "{directory}/knot.log"',
            "    any: info",
            "database:",
            f'    storage: "{directory}/db"',
            "template:",
            "  - id: default",
            f'    storage: "{directory}"',
            "    journal-content: none",
            "    zonefile-sync: -1",
            "zone:",
        ]
        for origin, text in zones.items():
            file = origin.replace("/", "-") + ".zone"  # RFC 2317 zone names have a '/'
            (directory / file).write_text(text)
            conf += [f"  - domain: {origin}", f'    file: "{file}"']
        (directory / "knot.conf").write_text("\n".join(conf) + "\n")
        lab.process = start_daemon([binary("knotd"), "-c", str(directory / "knot.conf")],
                                   directory / "knotd.out")
        try:
            wait_until(lab._answers, timeout=15, what="knotd to serve its zones")
        except TimeoutError as exc:
            lab.stop()
            raise RuntimeError(f"{exc}\n{tail(directory / 'knot.log')}\n"
                               f"{tail(directory / 'knotd.out')}") from None
        return lab
