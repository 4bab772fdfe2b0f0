"""The field's libraries, imported once here with their quirks handled.

* **checkdmarc** (record grammars of SPF, DMARC, MTA-STS, TLS-RPT, and SPF's
  lookup count) keeps a module-wide cache of DNS answers for 30 minutes, up
  to 200,000 of them. A monitor must see DNS as it is now, and memory stays
  bounded: the cache is turned off. Where checkdmarc is not handed our
  resolver (it looks up an SPF `exp=` record without passing it on) it would
  build its own from /etc/resolv.conf: every lookup it makes goes through
  `_resolve_with_failover`, which is replaced to use the resolver of the
  evaluation running in this thread (`evaluating_with`) and to refuse to ask
  anyone else.
* Importing checkdmarc imports dnspython's DNSSEC module, which touches
  cryptography's deprecated DSA class and warns once at import. We use no
  DNSSEC and no DSA: that one warning is silenced, nothing else.
* **pyspf** (RFC 7208 check_host) resolves through its module-level
  `DNSLookup`, by default dnspython's system resolver through a deprecated
  call with no deadline of ours. It is replaced by `_pyspf_lookup`, which asks
  the `BlockingResolver` of the evaluation running in this thread
  (`evaluating_with`) and refuses to ask anyone else.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import dns.exception
import dns.resolver
import spf
from cryptography.utils import CryptographyDeprecationWarning
from expiringdict import ExpiringDict

from daemon.dns.resolver import BlockingResolver

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning,
                            message=".*DSA.*")
    import checkdmarc.dmarc as checkdmarc_dmarc
    import checkdmarc.mta_sts as checkdmarc_mta_sts
    import checkdmarc.smtp_tls_reporting as checkdmarc_tlsrpt
    import checkdmarc.spf as checkdmarc_spf
    import checkdmarc.utils as checkdmarc_utils



class _NoCache(ExpiringDict):  # type: ignore[misc]  # untyped library
    """An answer cache that keeps nothing: every lookup goes to DNS."""

    def __init__(self) -> None:
        super().__init__(max_len=1, max_age_seconds=1)

    def __setitem__(self, key: Any, value: Any, set_time: Any = None) -> None:
        pass


checkdmarc_utils.DNS_CACHE = _NoCache()

__all__ = ["NoResolver", "checkdmarc_dmarc", "checkdmarc_mta_sts", "checkdmarc_spf",
           "checkdmarc_tlsrpt", "checkdmarc_utils", "evaluating_with", "organizational_domain",
           "spf"]

_current: ContextVar[BlockingResolver | None] = ContextVar("dns_resolver", default=None)


class NoResolver(dns.exception.DNSException):
    """A library lookup outside `evaluating_with`: a bug, and never sent to the system's
    resolver (a DNSException, so the library treats it as a failed lookup)."""


@contextlib.contextmanager
def evaluating_with(resolver: BlockingResolver) -> Iterator[None]:
    """pyspf's and checkdmarc's lookups in this context (thread) go to `resolver`."""
    token = _current.set(resolver)
    try:
        yield
    finally:
        _current.reset(token)


def _pyspf_lookup(name: str, qtype: str, strict: Any = True,
                  timeout: float = 20.0) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNSLookup contract: [((name, type), value)], [] for NXDOMAIN and NODATA,
    spf.TempError for a failure (pyspf's temperror)."""
    resolver = _current.get()
    if resolver is None:  # a bug: an evaluation outside evaluating_with
        raise spf.TempError("DNS: no resolver for this evaluation")
    try:
        answer = resolver.resolve(name, qtype, raise_on_no_answer=False, lifetime=timeout)
    except dns.resolver.NXDOMAIN:
        return []
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS {exc}") from None
    if answer.rrset is None:
        return []
    out: list[tuple[tuple[str, str], Any]] = []
    for rdata in answer.rrset:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(omit_final_dot=True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


spf.DNSLookup = _pyspf_lookup

_checkdmarc_resolve = checkdmarc_utils._resolve_with_failover


def _resolve_with_ours(domain: str, record_type: str, *, nameservers: Any, resolver: Any,
                       timeout: float, retries: int) -> Any:
    """checkdmarc's only way to DNS, given the evaluation's resolver when it was not
    handed one (its `nameservers` are never ours: we pass a resolver)."""
    if resolver is None:
        resolver = _current.get()
    if resolver is None:
        raise NoResolver(f"{domain} {record_type}: no resolver for this lookup (made "  # type: ignore[no-untyped-call]
                         "outside an evaluation); the system's is never asked")
    return _checkdmarc_resolve(domain, record_type, nameservers=None, resolver=resolver,
                               timeout=timeout, retries=retries)


checkdmarc_utils._resolve_with_failover = _resolve_with_ours


def organizational_domain(domain: str) -> str:
    """The registrable domain by the Public Suffix List (RFC 7489 3.2), as checkdmarc
    computes it from the list it ships (no download at run time)."""
    base: str = checkdmarc_utils.get_base_domain(domain)
    return base
