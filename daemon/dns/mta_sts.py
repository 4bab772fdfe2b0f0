"""MTA-STS (RFC 8461): the `_mta-sts` TXT record and the HTTPS policy agree, and cover the MX.

Looked at only when the domain publishes a `_mta-sts` record (without one
there is no MTA-STS and nothing to get wrong). Then, as a sending MTA does:
exactly one `v=STSv1` record with an id (checkdmarc's grammar); the policy
fetched from `https://mta-sts.<domain>/.well-known/mta-sts.txt` with a
certificate valid for that name, no redirect followed (RFC 8461 3.3), served
as text/plain (3.2: senders should ignore anything else), at most 64 KiB; a
valid policy (checkdmarc's grammar); and, in `enforce` or `testing` mode,
every MX host matched by one of its `mx:` patterns. A TXT record announcing
a policy that cannot be fetched, is invalid, or leaves an MX host out is a
problem: senders that enforce MTA-STS skip or hold mail for that host.

The policy host is resolved through the entry's nameservers. Which port and
which CAs the fetch uses is `PolicyFetcher`'s (443 and the system's CAs);
only tests construct it otherwise, the configuration cannot.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from daemon.dns.libraries import checkdmarc_mta_sts
from daemon.dns.mx import mx_hosts
from daemon.dns.resolver import DnsError, Resolver
from daemon.dns.verdict import ItemResult, error, notes, ok, problem
from daemon.logs import shorten

ITEM = "mta-sts"
# A policy is a few lines; reading at most this much keeps memory bounded whatever the
# policy host sends.
MAX_POLICY = 64 * 1024
WELL_KNOWN = "/.well-known/mta-sts.txt"
SHORT_MAX_AGE = 86400  # RFC 8461 3.2 suggests weeks; a day or less defeats the cache


def sts_records(texts: list[str]) -> list[str]:
    """RFC 8461 3.1: records not starting with `v=STSv1;` are discarded (checkdmarc's
    grammar then judges the one left, including whitespace before the `;`)."""
    return [t for t in texts if t.startswith("v=STSv1")]


@dataclass(frozen=True)
class Fetched:
    status: int
    content_type: str
    text: str


@dataclass(frozen=True)
class PolicyFetcher:
    """Fetches `https://mta-sts.<domain>/.well-known/mta-sts.txt` as a sending MTA does."""

    port: int = 443
    # None: the system's CAs (ssl.create_default_context). Tests pass their own CA.
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    def url(self, host: str) -> str:
        return f"https://{host}{'' if self.port == 443 else f':{self.port}'}{WELL_KNOWN}"

    async def fetch(self, host: str, addresses: list[str], timeout: float) -> Fetched:
        """GET the policy from `addresses` (already resolved), with SNI and certificate
        checks for `host`; raises aiohttp's errors and TimeoutError."""
        context = self.ssl_context or ssl.create_default_context()
        connector = aiohttp.TCPConnector(resolver=_Resolved(host, addresses), ssl=context,
                                         use_dns_cache=False, limit=1)
        async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
                s.get(self.url(host), allow_redirects=False) as response:
            body = await _bounded_body(response)
            return Fetched(response.status, response.content_type,
                           body.decode("utf-8", errors="replace"))


async def _bounded_body(response: aiohttp.ClientResponse) -> bytes:
    body = b""
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > MAX_POLICY:
            break
    return body


class _Resolved(AbstractResolver):
    """aiohttp's resolver for one host whose addresses we looked up ourselves."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        self._host = host
        self._addresses = addresses

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host != self._host:
            raise OSError(f"{host} is not the policy host")
        return [ResolveResult(hostname=host, host=a, port=port,
                              family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST) for a in self._addresses]

    async def close(self) -> None:
        pass


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: an exact name, or `*.example.com` matching exactly one more label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return pattern == host


async def check(resolver: Resolver, domain: str, fetcher: PolicyFetcher) -> ItemResult:
    answer = await resolver.query(f"_mta-sts.{domain}", "TXT")
    records = sts_records(answer.texts())
    if not records:
        return ok(ITEM, f"not published (no v=STSv1 record at _mta-sts.{domain})",
                  published=False)
    if len(records) > 1:
        return problem(ITEM, f"{len(records)} v=STSv1 records at _mta-sts.{domain}: senders "
                             "then ignore MTA-STS (RFC 8461 3.1); keep one", records=records)
    try:
        txt = checkdmarc_mta_sts.parse_mta_sts_record(records[0])
    except checkdmarc_mta_sts.MTASTSError as exc:
        return problem(ITEM, f"the record at _mta-sts.{domain} is invalid: {exc}",
                       record=records[0])
    policy_id = txt["tags"].get("id", "?")
    host = f"mta-sts.{domain}"
    fetched = await _fetch(resolver, host, fetcher)
    if isinstance(fetched, ItemResult):
        return fetched
    try:
        policy: dict[str, Any] = checkdmarc_mta_sts.parse_mta_sts_policy(fetched.text)["policy"]
    except checkdmarc_mta_sts.MTASTSError as exc:
        return problem(ITEM, f"the policy at {fetcher.url(host)} is invalid: {exc}; senders "
                             "ignore it", id=policy_id)
    return await _judge_policy(resolver, domain, policy_id, policy, fetched, fetcher.url(host))


async def _fetch(resolver: Resolver, host: str, fetcher: PolicyFetcher,
                 ) -> Fetched | ItemResult:
    """The policy response, or the MTA-STS item saying why there is none."""
    url = fetcher.url(host)
    addresses: list[str] = []
    for rdtype in ("A", "AAAA"):
        addresses += (await resolver.query(host, rdtype)).addresses()  # DnsError: error
    if not addresses:
        return problem(ITEM, f"_mta-sts announces a policy but {host} has no address: senders "
                             "cannot fetch it")
    try:
        fetched = await fetcher.fetch(host, addresses, resolver.timeout)
    except TimeoutError:
        return error(ITEM, f"no answer from {url} within {resolver.timeout:g}s")
    except aiohttp.ClientConnectorCertificateError as exc:
        return problem(ITEM, f"the certificate of {host} is not valid for senders "
                             f"({shorten(str(exc.certificate_error), 200)}): they cannot "
                             "fetch the policy")
    except aiohttp.ClientSSLError as exc:
        return problem(ITEM, f"TLS with {host} failed ({shorten(str(exc), 200)}): senders "
                             "cannot fetch the policy")
    except aiohttp.ClientConnectorError as exc:
        return cannot_connect(url, exc.os_error)
    except aiohttp.ClientError as exc:
        return error(ITEM, f"fetching {url} failed: {type(exc).__name__}: "
                           f"{shorten(str(exc), 200)}")
    if 300 <= fetched.status < 400:
        return problem(ITEM, f"{url} answered a redirect (HTTP {fetched.status}): senders "
                             "must not follow it (RFC 8461 3.3); serve the policy there")
    if fetched.status >= 500:
        return error(ITEM, f"{url} answered HTTP {fetched.status}")
    if fetched.status != 200:
        return problem(ITEM, f"{url} answered HTTP {fetched.status}: _mta-sts announces a "
                             "policy that is not served")
    if len(fetched.text.encode("utf-8")) > MAX_POLICY:
        return problem(ITEM, f"the policy at {url} is larger than 64 KiB: not read (a policy "
                             "is a few lines; senders bound what they fetch too)")
    if fetched.content_type != "text/plain":
        return problem(ITEM, f"{url} serves the policy as "
                             f"{fetched.content_type or 'no media type'}: senders that check "
                             "for text/plain, as RFC 8461 3.2 says they should, ignore it")
    return fetched


def cannot_connect(url: str, os_error: OSError) -> ItemResult:
    """A refused connection is the policy host's answer (senders get it too): a problem.
    Anything else (no route, network unreachable) may be this host's alone, as when it
    has no IPv6 route to an IPv6-only policy host: undecided."""
    said = os_error.strerror or str(os_error)
    if os_error.errno == errno.ECONNREFUSED:
        return problem(ITEM, f"{url} refused the connection ({said}): senders cannot fetch "
                             "the policy")
    return error(ITEM, f"could not connect to {url} from here ({said}); whether senders can "
                       "is not known")


async def _judge_policy(resolver: Resolver, domain: str, policy_id: str,
                        policy: dict[str, Any], fetched: Fetched, url: str) -> ItemResult:
    mode, patterns = str(policy["mode"]), [str(p) for p in policy["mx"]]
    facts = {"id": policy_id, "mode": mode, "max_age": policy["max_age"], "mx": patterns}
    caveats = []
    if int(policy["max_age"]) <= SHORT_MAX_AGE:
        caveats.append(f"max_age {policy['max_age']}s is short: senders re-fetch constantly "
                       "and an attacker who blocks the fetch wins sooner")
    text = f"id={policy_id}, policy mode {mode}"
    if mode == "none":
        return ok(ITEM, notes(f"{text}: MTA-STS switched off (being withdrawn)", caveats),
                  **facts)
    try:
        _answer, hosts = await mx_hosts(resolver, domain)
    except DnsError as exc:
        return error(ITEM, f"{text}; could not read the MX to compare: {exc}", **facts)
    names = [h for _p, h in hosts if h != "."]
    uncovered = [h for h in names if not any(mx_matches(p, h) for p in patterns)]
    if uncovered:
        consequence = ("senders enforcing it do not deliver there" if mode == "enforce"
                       else "senders report every delivery there as a failure")
        return problem(ITEM, f"{text} at {url}: its mx patterns ({', '.join(patterns)}) do "
                             f"not cover MX host {', '.join(uncovered)}; {consequence}",
                       uncovered=uncovered, **facts)
    covered = f"covers MX {', '.join(names)}" if names else "no MX host to cover"
    return ok(ITEM, notes(f"{text}, max_age {policy['max_age']}; {covered}", caveats), **facts)
