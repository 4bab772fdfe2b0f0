"""The `[[dns]]` entries: a domain, its sending IPs, and what to check about them.

Cross-entry rules (unique names, `ips_from_route` naming a route) live in
`daemon.config.Config.check_table`; docs/dns.md and docs/configuration.md list
every key.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from daemon.config_base import NonBlankStr, PositiveFloat, Problem, StrictModel

# A host name or DNS zone: letters, digits, '-' and '_' (as in _domainkey selectors'
# parents), dot-separated labels of 1-63 characters.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
# The shortest interval: every run is a burst of queries to the blocklists, which
# rate-limit (Spamhaus answers 127.255.255.255 to too many queries).
MIN_INTERVAL = 1.0


@dataclass(frozen=True)
class Nameserver:
    """A nameserver as configured: an IP address and a port (53 unless given)."""

    host: str
    port: int = 53

    @classmethod
    def parse(cls, text: str) -> Nameserver:
        """`192.0.2.1`, `192.0.2.1:5353`, `2001:db8::1` or `[2001:db8::1]:5353`."""
        text = text.strip()
        host, port = text, "53"
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"{text!r} is not HOST:PORT ([IPv6]:PORT for IPv6)")
            port = rest[1:] or "53"
        elif text.count(":") == 1:
            host, _, port = text.partition(":")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r}: the host must be an IP address (the resolver "
                             "cannot look up its own nameserver's name)") from None
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{text!r}: the port must be 1-65535")
        return cls(str(address), int(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def domain_problem(value: str) -> str | None:
    """Why `value` is not a DNS name we can query (None if it is one)."""
    name = value.rstrip(".")
    if not name or len(name) > 253 or any(c.isspace() for c in value):
        return "must be a domain name like example.com"
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return "must be a domain name like example.com (letters, digits, '-', '_' and dots)"
    return None


def _domain(value: str) -> str:
    problem = domain_problem(value)
    if problem:
        raise ValueError(problem)
    return value.rstrip(".").lower()


class DnsEntry(StrictModel):
    """One `[[dns]]` entry, checked every `interval` seconds (docs/dns.md)."""

    # Shown in metrics (`name` label), /status and `selfcheckd dns`; defaults to domain.
    name: NonBlankStr = ""
    domain: str
    dkim_selectors: list[str] = Field(default_factory=list)
    sending_ips: list[str] = Field(default_factory=list)
    # The IP that handed the latest received probe of this route to the receiver.
    ips_from_route: NonBlankStr | None = None
    blocklists: list[str] = Field(default_factory=list)
    interval: float = 3600.0
    # Each DNS query, and the HTTPS fetch of the MTA-STS policy.
    timeout: PositiveFloat = 5.0
    # A whole run of the entry; items not decided by then are `error`.
    deadline: PositiveFloat = 60.0
    # host:port of the nameservers to ask (default: the system resolver's).
    nameservers: list[str] | None = Field(default=None, min_length=1)

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str) -> str:
        return _domain(value)

    @field_validator("blocklists")
    @classmethod
    def _check_zones(cls, value: list[str]) -> list[str]:
        zones = [_domain(zone) for zone in value]
        repeated = sorted({z for z in zones if zones.count(z) > 1})
        if repeated:
            raise ValueError(f"lists a zone twice: {', '.join(repeated)}")
        return zones

    @field_validator("dkim_selectors")
    @classmethod
    def _check_selectors(cls, value: list[str]) -> list[str]:
        for selector in value:
            if domain_problem(selector):
                raise ValueError(f"{selector!r} is not a selector (DNS labels: letters, "
                                 "digits, '-', '_', dots)")
        return list(dict.fromkeys(s.rstrip(".").lower() for s in value))

    @field_validator("sending_ips")
    @classmethod
    def _check_ips(cls, value: list[str]) -> list[str]:
        ips = []
        for text in value:
            try:
                ips.append(str(ipaddress.ip_address(text.strip())))
            except ValueError:
                raise ValueError(f"{text!r} is not an IPv4 or IPv6 address") from None
        return list(dict.fromkeys(ips))

    @field_validator("interval")
    @classmethod
    def _check_interval(cls, value: float) -> float:
        if value < MIN_INTERVAL:
            raise ValueError(f"must be at least {MIN_INTERVAL:g} (seconds)")
        return value

    @field_validator("deadline")
    @classmethod
    def _deadline_covers_a_query(cls, value: float, info: ValidationInfo) -> float:
        timeout = info.data.get("timeout")  # absent when timeout itself is invalid
        if timeout is not None and value < timeout:
            raise ValueError(f"must be at least timeout ({timeout:g}s)")
        return value

    @field_validator("nameservers")
    @classmethod
    def _check_nameservers(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return [str(Nameserver.parse(text)) for text in value]

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        if table.get("blocklists") and not table.get("sending_ips") \
                and not table.get("ips_from_route"):
            problems.append((("blocklists",), "needs sending_ips or ips_from_route: the "
                             "blocklists are asked about the IPs mail is sent from"))
        return super().check_table(table, info, problems)

    @model_validator(mode="after")
    def _default_name(self) -> DnsEntry:
        if not self.name:
            self.name = self.domain
        return self

    @property
    def servers(self) -> list[Nameserver] | None:
        """The configured nameservers, parsed (None: the system resolver's)."""
        return None if self.nameservers is None else [Nameserver.parse(n)
                                                      for n in self.nameservers]
