"""DNS lookups for the checks, each with a deadline, against the configured nameservers.

Two resolvers over the same nameservers, both dnspython's:

* `Resolver`, asyncio, for every query the checks make themselves. Every
  query ends within `timeout` seconds (dnspython's lifetime, and an
  `asyncio.timeout` around it); at most `MAX_IN_FLIGHT` run at once per run of
  an entry, however many IPs and zones it lists.
* `BlockingResolver`, for the libraries that resolve on their own (checkdmarc
  following SPF includes, pyspf evaluating check_host) in a thread: each of
  their queries is cut to what is left of the run's deadline, so the thread
  ends by then, and every failed query is recorded, because those libraries
  fold a timeout into their verdict ("no SPF record") and we must not.

An answer is NXDOMAIN, NODATA or records; anything else (timeout, SERVFAIL,
REFUSED, no resolver configured) raises `DnsError`: the question is
undecided, and a check turns that into `error`, never into a verdict.

An authoritative server (Knot, BIND with recursion off) answers a name that
is a CNAME into another zone with the CNAME alone, even when it serves that
zone too: providers' DKIM keys and DMARC records, RFC 2317 classless PTRs.
Both resolvers then ask for the target themselves, as a recursive resolver
would, at most `MAX_CHASE` links, each query with its own deadline.

An empty answer from a server that does not recurse (RA not set) is not
NODATA when it is a referral (NS records and no SOA in the authority section,
not authoritative: the name is delegated elsewhere). It says nothing about
the name, and a stub resolver does not follow it. That happens when
`nameservers` points at an authoritative server instead of a recursive one;
it is undecided, never "no record".
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from daemon.dns.config import Nameserver

# Per run of an entry: 4 zones x 3 IPs plus the rest fits; a long list waits its turn.
MAX_IN_FLIGHT = 16
# One attempt at one nameserver; dnspython retries (and moves to the next server)
# until the query's lifetime (`timeout`) is spent. At most half the lifetime, so a
# lost datagram (a busy resolver drops bursts) always gets a second try.
ATTEMPT_TIMEOUT = 2.0


def attempt_timeout(timeout: float) -> float:
    return min(ATTEMPT_TIMEOUT, timeout / 2)
# CNAME links followed by asking for the target again (an answer's own chain is
# followed by dnspython); a longer chain is a loop or a mistake.
MAX_CHASE = 8


class DnsError(Exception):
    """No answer: the name's state is unknown (a timeout proves nothing)."""


class NotAnswered(dns.exception.DNSException):
    """An empty answer that is not NODATA: a referral, or a CNAME left unresolved.

    A DNSException, so the libraries handed a `BlockingResolver` treat it as the
    failure it is (pyspf: temperror), never as "no such record"."""


def dangling_cname(response: dns.message.Message, qname: dns.name.Name,
                   ) -> dns.name.Name | None:
    """The target to ask for when an empty response stops at a CNAME chain from `qname`
    that the server did not resolve (None: it did not stop at one)."""
    if response.flags & dns.flags.RA:
        return None  # a recursive resolver did the work: empty is empty
    chain, target = 0, qname
    while chain < 16 and (link := response.get_rrset(
            response.answer, target, dns.rdataclass.IN, dns.rdatatype.CNAME)) is not None:
        chain, target = chain + 1, link[0].target
    if not chain or any(r.rdtype == dns.rdatatype.SOA for r in response.authority):
        return None  # no CNAME, or the server is authoritative for the target: NODATA
    return target


def unanswered(response: dns.message.Message, qname: dns.name.Name) -> str | None:
    """Why an empty response says nothing about `qname` (None: it is real NODATA)."""
    if response.flags & dns.flags.RA:
        return None  # a recursive resolver did the work: empty is empty
    delegated = [r for r in response.authority if r.rdtype == dns.rdatatype.NS]
    has_soa = any(r.rdtype == dns.rdatatype.SOA for r in response.authority)
    if delegated and not has_soa and not response.flags & dns.flags.AA:
        servers = ", ".join(sorted({str(rd.target).rstrip(".") for r in delegated for rd in r}))
        return (f"the nameserver does not resolve it: it refers the query to {servers} "
                "(an authoritative server, not a recursive resolver; set nameservers to "
                "one that recurses)")
    return None


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)


def _unresolved(nx: dns.resolver.NXDOMAIN, qname: dns.name.Name) -> dns.name.Name:
    """The name that does not exist: `qname`, or the end of a CNAME chain from it."""
    try:
        end: dns.name.Name = nx.canonical_name
    except (TypeError, KeyError):
        return qname
    return end


def _too_long(name: str) -> str:
    return f"more than {MAX_CHASE} CNAMEs from {name} (a loop?)"


@dataclass(frozen=True)
class Answer:
    """What the DNS said about (name, type): no such name, no such type, or records."""

    name: str
    rdtype: str
    exists: bool  # False: NXDOMAIN
    records: tuple[Any, ...] = ()  # dnspython rdata objects
    # The name the records belong to when `name` is an alias (a CNAME led there).
    canonical: str | None = None

    def texts(self) -> list[str]:
        """TXT records, each one's strings joined without separator (RFC 7208 3.3)."""
        return [txt_text(r.strings) for r in self.records]

    def addresses(self) -> list[str]:
        return [str(r.address) for r in self.records]

    def names(self) -> list[str]:
        """PTR/CNAME targets, without the final dot, lowercase."""
        return [r.target.to_text(omit_final_dot=True).lower() for r in self.records]


def txt_text(strings: Sequence[bytes]) -> str:
    """A TXT record's character-strings joined and decoded (bytes that are not UTF-8
    are shown as U+FFFD: they are in no valid record of ours)."""
    return b"".join(strings).decode("utf-8", errors="replace")


def describe(exc: dns.exception.DNSException, timeout: float) -> str:
    """A one-line reason for a failed query, naming what did not answer."""
    if isinstance(exc, dns.exception.Timeout):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or []
        said = "; ".join(dict.fromkeys(f"{_server(server, port)} {_error_text(error)}"
                                       for server, _tcp, port, error, *_ in errors[:3]))
        return f"no nameserver answered ({said or 'all failed'})"
    if isinstance(exc, dns.resolver.NoResolverConfiguration):
        return ("no system resolver configured (/etc/resolv.conf has no nameserver): set "
                "nameservers")
    return f"{type(exc).__name__}: {exc}"


# How dnspython names a nameserver in its errors: `Do53:127.0.0.1@5353`.
_NAMED = re.compile(r"(?:Do53|DoT|DoQ|DoH3?):(?P<host>.+)@\d+")


def _server(address: Any, port: Any) -> str:
    """`127.0.0.1:5353` / `[2001:db8::1]:53`, as the configuration writes it."""
    host = str(address)
    if named := _NAMED.fullmatch(host):
        host = named["host"]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _error_text(error: Any) -> str:
    """An rcode (`REFUSED`, `SERVFAIL`) as dnspython records it, or an exception."""
    if isinstance(error, str):
        return f"said {error}"
    return str(error) or type(error).__name__


def do53(nameserver: Nameserver) -> dns.nameserver.Nameserver:
    return dns.nameserver.Do53Nameserver(nameserver.host, nameserver.port)


class Resolver:
    """Asyncio lookups for one run of one entry (a new one per run: resolv.conf re-read)."""

    def __init__(self, nameservers: Sequence[Nameserver] | None, timeout: float,
                 *, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.nameservers = list(nameservers) if nameservers is not None else None
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_in_flight)
        self._resolver: dns.asyncresolver.Resolver | None = None

    def where(self) -> str:
        """Who is asked, for reasons: `127.0.0.1:5353` or `the system resolver`."""
        if self.nameservers is None:
            return "the system resolver"
        return ", ".join(str(n) for n in self.nameservers)

    def _get(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            try:
                resolver = dns.asyncresolver.Resolver(configure=self.nameservers is None)
            except dns.exception.DNSException as exc:  # no /etc/resolv.conf
                raise DnsError(describe(exc, self.timeout)) from None
            if self.nameservers is not None:
                resolver.nameservers = [do53(n) for n in self.nameservers]
            resolver.timeout = attempt_timeout(self.timeout)
            resolver.lifetime = self.timeout
            resolver.retry_servfail = False
            self._resolver = resolver
        return self._resolver

    async def query(self, name: str, rdtype: str) -> Answer:
        """Ask for (name, rdtype); NXDOMAIN and NODATA are answers, a failure raises.
        A CNAME the server leaves unresolved is followed (module docstring)."""
        asked = dns.name.from_text(name)  # absolute: no search list, whatever resolv.conf says
        qname = asked
        resolver = self._get()
        via = ""  # "CNAME to <target>; " once a link was followed, for reasons
        async with self._slots:
            for _link in range(MAX_CHASE + 1):
                try:
                    answer = await self._resolve(resolver, name, qname, rdtype, via)
                except dns.resolver.NXDOMAIN as nx:
                    end = _unresolved(nx, qname)
                    return Answer(name, rdtype, exists=False,
                                  canonical=None if end == asked else _text(end))
                if answer.rrset is not None:
                    owner = answer.rrset.name  # not the name asked: it is an alias
                    return Answer(name, rdtype, exists=True, records=tuple(answer.rrset),
                                  canonical=None if owner == asked else _text(owner))
                target = dangling_cname(answer.response, qname)
                if target is None:
                    why = unanswered(answer.response, qname)
                    if why is not None:
                        raise DnsError(f"{name} {rdtype}: {via}{why}")
                    end = answer.canonical_name  # NODATA at the end of any CNAMEs
                    return Answer(name, rdtype, exists=True,
                                  canonical=None if end == asked else _text(end))
                qname, via = target, f"CNAME to {_text(target)}; "
        raise DnsError(f"{name} {rdtype}: {_too_long(name)}")

    async def _resolve(self, resolver: dns.asyncresolver.Resolver, name: str,
                       qname: dns.name.Name, rdtype: str, via: str,
                       ) -> dns.resolver.Answer:
        """One query (NXDOMAIN raises it); a failure raises DnsError naming `name`."""
        asked = f"{name} {rdtype}: {via}" + (f"{_text(qname)}: " if via else "")
        try:
            # The lifetime bounds dnspython's own retries; the timeout bounds us
            # even if a backend ignored it.
            async with asyncio.timeout(self.timeout + 1.0):
                return await resolver.resolve(qname, rdtype, search=False,
                                              raise_on_no_answer=False, lifetime=self.timeout)
        except dns.resolver.NXDOMAIN:
            raise
        except TimeoutError:
            raise DnsError(f"{asked}no answer within {self.timeout:g}s "
                             f"from {self.where()}") from None
        except dns.exception.DNSException as exc:
            raise DnsError(f"{asked}{describe(exc, self.timeout)} "
                             f"from {self.where()}") from None

    def blocking(self, deadline: float, clock: Callable[[], float] = time.monotonic,
                 ) -> BlockingResolver:
        """A blocking resolver over the same nameservers whose queries end by `deadline`
        (on `clock`), for a library running in a thread."""
        return BlockingResolver(self.nameservers, self.timeout, deadline, clock)


# Lookups whose failure the libraries ignore, so it decides nothing: checkdmarc asks
# for the obsolete SPF type (RFC 7208 3.1) only to warn about it, and some servers
# never answer a type they do not know.
IGNORED_FAILURES = frozenset({dns.rdatatype.SPF})


class BlockingResolver(dns.resolver.Resolver):
    """dnspython's blocking resolver with the run's deadline on every query.

    Handed to libraries as their `resolver`; `failures` lists the queries that
    got no answer (but those in IGNORED_FAILURES), so a verdict the library
    reached through one is not trusted.
    """

    def __init__(self, nameservers: Sequence[Nameserver] | None, timeout: float,
                 deadline: float, clock: Callable[[], float] = time.monotonic) -> None:
        try:
            super().__init__(configure=nameservers is None)
        except dns.exception.DNSException as exc:
            raise DnsError(describe(exc, timeout)) from None
        if nameservers is not None:
            self.nameservers = [do53(n) for n in nameservers]
        self.timeout = attempt_timeout(timeout)
        self.lifetime = timeout
        self.retry_servfail = False
        self.deadline = deadline
        self.clock = clock
        self.failures: list[str] = []

    def resolve(
        self,
        qname: dns.name.Name | str,
        rdtype: dns.rdatatype.RdataType | str = dns.rdatatype.A,
        rdclass: Any = dns.rdataclass.IN,
        tcp: bool = False,
        source: str | None = None,
        raise_on_no_answer: bool = True,
        source_port: int = 0,
        lifetime: float | None = None,
        search: bool | None = None,
    ) -> dns.resolver.Answer:
        what = f"{qname} {dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))}"
        name = dns.name.from_text(qname) if isinstance(qname, str) else qname
        for _link in range(MAX_CHASE + 1):
            left = self.deadline - self.clock()
            if left <= 0:
                self.failures.append(f"{what}: not asked, the run's deadline had passed")
                raise dns.resolver.LifetimeTimeout(timeout=0.0, errors=[])  # type: ignore[no-untyped-call]
            # A library may ask for longer (pyspf passes its whole 20 s budget): ours wins.
            budget = min(self.lifetime, left, self.lifetime if lifetime is None else lifetime)
            try:
                answer = super().resolve(name, rdtype, rdclass, tcp, source, False,
                                         source_port, budget,
                                         False if search is None else search)
            except dns.resolver.NXDOMAIN:
                raise
            except dns.exception.DNSException as exc:
                if dns.rdatatype.RdataType.make(rdtype) not in IGNORED_FAILURES:
                    self.failures.append(f"{what}: {describe(exc, budget)}")
                raise
            if answer.rrset is not None:
                return answer
            target = dangling_cname(answer.response, name)
            if target is None:
                break
            name, what = target, f"{what}: CNAME to {_text(target)}"
        else:
            self.failures.append(f"{what}: {_too_long(str(qname))}")
            raise NotAnswered(f"{what}: {_too_long(str(qname))}")  # type: ignore[no-untyped-call]
        why = unanswered(answer.response, name)
        if why is not None:
            self.failures.append(f"{what}: {why}")
            raise NotAnswered(f"{what}: {why}")  # type: ignore[no-untyped-call]
        if raise_on_no_answer:
            raise dns.resolver.NoAnswer(  # type: ignore[no-untyped-call]
                response=answer.response)
        return answer
