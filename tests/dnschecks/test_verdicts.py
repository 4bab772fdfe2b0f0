"""The verdict logic on its own: records and library findings in, ok/problem/error out."""

from __future__ import annotations

import base64
import errno
from email import message_from_string
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pydantic import ValidationError

from daemon.checks.result import Hop
from daemon.config import Config
from daemon.dns import blocklists, dkim, dmarc, mta_sts, spf
from daemon.dns.config import DnsEntry, Nameserver
from daemon.dns.route_ip import handing_hop
from daemon.dns.verdict import ItemResult, Verdict, worst
from daemon.roundtrip.hops import parse_hops
from tests.dnschecks.world import KEY_512


def key(bits: int, pkcs1: bool = False) -> str:
    public = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    fmt = serialization.PublicFormat.PKCS1 if pkcs1 else \
        serialization.PublicFormat.SubjectPublicKeyInfo
    return base64.b64encode(public.public_bytes(serialization.Encoding.DER, fmt)).decode()


ED25519 = base64.b64encode(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
RSA_2048 = key(2048)


@pytest.mark.parametrize(("record", "verdict", "said"), [
    (f"v=DKIM1; k=rsa; p={RSA_2048}", "ok", "RSA key of 2048 bits"),
    (f"p={RSA_2048}", "ok", "RSA key of 2048 bits"),  # v= and k= are optional
    (f"v=DKIM1; p={key(2048, pkcs1=True)}", "ok", "2048 bits"),  # bare PKCS#1, seen in the wild
    (f"v=DKIM1; p={key(1024)}", "ok", "1024 bits: RFC 8301 asks for at least 2048"),
    (f"v=DKIM1; p={KEY_512}", "problem", "has 512 bits"),
    ("v=DKIM1; k=rsa; p=", "problem", "revoked"),
    ("v=DKIM1; k=rsa; p= ; t=y", "problem", "revoked"),
    ("v=DKIM1; k=rsa", "problem", "no p= tag"),
    (f"v=DKIM2; p={RSA_2048}", "problem", "v=DKIM2"),
    ("v=DKIM1; p=not*base64", "problem", "not base64"),
    ("v=DKIM1; p=AAAA", "problem", "not an RSA public key"),
    (f"v=DKIM1; k=ed25519; p={ED25519}", "ok", "Ed25519 key"),
    (f"v=DKIM1; k=ed25519; p={RSA_2048}", "problem", "not an Ed25519 public key"),
    (f"v=DKIM1; k=dsa; p={RSA_2048}", "problem", "k=dsa"),
    (f"v=DKIM1; h=sha1; p={RSA_2048}", "problem", "only sha1"),
    (f"v=DKIM1; h=sha1:sha256; p={RSA_2048}", "ok", "2048 bits"),
    (f"v=DKIM1; s=tlsrpt; p={RSA_2048}", "problem", "excludes email"),
    (f"v=DKIM1; t=y; p={RSA_2048}", "ok", "t=y: the domain says it is testing"),
    ("v=DKIM1; p", "problem", "not a tag=value list"),
    (f"v=DKIM1; p={RSA_2048}; p={RSA_2048}", "problem", "not a tag=value list"),
])
def test_dkim_key_records(record: str, verdict: str, said: str) -> None:
    """Each way a key record holds or breaks, named in the reason."""
    found = dkim.judge_key("s", "s._domainkey.example.test", record)
    assert (found.verdict, said in found.reason) == (verdict, True), found.reason


def evaluation(**kwargs: Any) -> spf.Evaluation:
    return spf.Evaluation(**{"lookups": 3, "void_lookups": 0, **kwargs})


@pytest.mark.parametrize(("found", "verdict", "said"), [
    (evaluation(results={"192.0.2.1": ("pass", "ok", "ip4:192.0.2.0/24")}), "ok",
     "pass for 192.0.2.1"),
    (evaluation(results={"192.0.2.1": ("softfail", "x", "~all")}), "problem",
     "192.0.2.1: softfail (matched ~all)"),
    (evaluation(results={"192.0.2.1": ("permerror", "Too many DNS lookups", None)}),
     "problem", "permerror, Too many DNS lookups"),
    (evaluation(results={"192.0.2.1": ("temperror", "DNS timeout", None)}), "error",
     "DNS timeout"),
    # A decided refusal outranks another IP's undecided result.
    (evaluation(results={"192.0.2.1": ("temperror", "t", None), "192.0.2.2": ("fail", "f",
                                                                             "-all")}),
     "problem", "192.0.2.2: fail"),
    (evaluation(broken="Parsing the SPF record requires 11/10", over_limit="lookups"),
     "problem", "more than 10 DNS lookups"),
    (evaluation(broken="... 3/2 maximum void DNS lookups", over_limit="void lookups"),
     "problem", "more than 2 lookups that find nothing"),
    (evaluation(broken="example.test: moo is not a valid SPF term"), "problem",
     "moo is not a valid SPF term"),
    # The library's verdict came through a failed query: not trusted.
    (evaluation(broken="include target has no SPF record",
                parse_failures=["_spf.x.test TXT: no answer within 2s"]), "error",
     "could not follow"),
    (evaluation(parse_failures=["_spf.x.test A: no answer within 2s"]), "error",
     "could not evaluate"),
    (evaluation(warnings=["The ptr mechanism should not be used"]), "ok",
     "no sending IP to evaluate; The ptr mechanism should not be used"),
    # Passing an address nobody sends from: anyone passes.
    (evaluation(results={"192.0.2.1": ("pass", "ok", "+all")}, passes_anyone="+all"),
     "problem", "authorises any IP"),
])
def test_spf_verdict_from_what_the_libraries_found(found: spf.Evaluation, verdict: str,
                                                   said: str) -> None:
    """Problem beats error beats ok; a DNS failure never becomes a problem."""
    item = spf.verdict("example.test", "v=spf1 -all", found)
    assert (item.verdict, said in item.reason) == (verdict, True), item.reason


def test_spf_record_selection_follows_rfc_7208_4_5() -> None:
    """Only an exact `v=spf1` version section counts (not v=spf10, not other TXT)."""
    texts = ["v=spf1 -all", "V=SPF1 ip4:192.0.2.1 -all", "v=spf10 -all", "google-site=x",
             "v=spf1"]
    assert spf.spf_records(texts) == ["v=spf1 -all", "V=SPF1 ip4:192.0.2.1 -all", "v=spf1"]


def parsed_dmarc(**tags: tuple[str, bool]) -> dict[str, Any]:
    base = {"p": ("reject", True), "sp": ("reject", False), **tags}
    return {"tags": {k: {"value": v, "explicit": e} for k, (v, e) in base.items()},
            "warnings": []}


@pytest.mark.parametrize(("domain", "location", "parsed", "verdict", "said"), [
    ("a.test", "a.test", parsed_dmarc(), "ok", "p=reject"),
    ("a.test", "a.test", parsed_dmarc(p=("none", True)), "ok", "p=none: monitoring only"),
    ("a.test", "a.test", parsed_dmarc(p=("none", False)), "problem", "no p= tag"),
    ("m.a.test", "a.test", parsed_dmarc(sp=("quarantine", True)), "ok",
     "(the organisational domain of m.a.test): sp=quarantine"),
    ("m.a.test", "a.test", parsed_dmarc(), "ok", "p=reject"),
    ("a.test", "a.test", "Error: Expected v at position 0", "problem", "is invalid"),
])
def test_dmarc_verdict(domain: str, location: str, parsed: dict[str, Any] | str, verdict: str,
                       said: str) -> None:
    """sp= applies to a subdomain found through its organisational domain."""
    item = dmarc.judge(domain, location, "v=DMARC1; p=reject", parsed)
    assert (item.verdict, said in item.reason) == (verdict, True), item.reason


@pytest.mark.parametrize(("record", "policy", "said"), [
    ("v=DMARC1; p=reject; pct=50", "reject",
     "pct=50: receivers apply p=reject to 50% of failing mail and p=quarantine to the rest"),
    ("v=DMARC1; p=quarantine; pct=0", "quarantine",
     "pct=0: receivers apply p=quarantine to none of the failing mail, in effect p=none"),
])
def test_pct_is_said_as_what_receivers_do(record: str, policy: str, said: str) -> None:
    """pct below 100 sends the rest of the failing mail to the next milder policy (RFC 7489
    6.6.4): the note says so, not checkdmarc's "removed in RFC 9989" (receivers apply it)."""
    parsed = parsed_dmarc(p=(policy, True))
    parsed["warnings"] = ["Support for the pct tag was removed in RFC 9989"]
    item = dmarc.judge("a.test", "a.test", record, parsed)
    assert item.verdict is Verdict.OK
    assert said in item.reason, item.reason
    assert "removed in RFC 9989" not in item.reason


def test_a_discarded_subdomain_record_is_noted_beside_the_one_used() -> None:
    """A subdomain's record receivers discard sends them to the organisational domain's:
    ok from that one, with a note naming the discarded record."""
    item = dmarc.judge("m.a.test", "a.test", "v=DMARC1; p=reject", parsed_dmarc(),
                       ignored=["v=DMARC1 p=none"])
    assert item.verdict is Verdict.OK
    assert '_dmarc.m.a.test has "v=DMARC1 p=none", not a valid DMARC record' in item.reason
    assert dmarc.discarded(["v=DMARC1 p=none", "V=dmarc1;p=none", "v=DMARC1; p=none",
                            "google-site-verification=x"]) == ["v=DMARC1 p=none",
                                                               "V=dmarc1;p=none"]


def test_dmarc_record_selection() -> None:
    """Records must start with v=DMARC1 (whitespace around = allowed, case kept)."""
    assert dmarc.dmarc_records(["v=DMARC1; p=none", "v = DMARC1;p=reject", "v=dmarc1; p=x",
                                "p=reject; v=DMARC1", "v=DMARC1"]) == [
        "v=DMARC1; p=none", "v = DMARC1;p=reject", "v=DMARC1"]


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    ("mx.example.test", "mx.example.test", True),
    ("MX.Example.Test.", "mx.example.test", True),
    ("*.example.test", "mx1.example.test", True),
    ("*.example.test", "example.test", False),
    ("*.example.test", "a.b.example.test", False),
    ("mx.example.test", "mx2.example.test", False),
])
def test_mta_sts_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    """RFC 8461 4.1: a wildcard matches exactly one leftmost label."""
    assert mta_sts.mx_matches(pattern, host) is matches


def test_blocklist_query_names() -> None:
    """Reversed octets for IPv4, reversed nibbles for IPv6, under the zone."""
    assert blocklists.query_name("203.0.113.7", "zen.example") == "7.113.0.203.zen.example."
    assert blocklists.query_name("2001:db8::1", "bl.example").startswith(
        "1.0.0.0." + "0." * 20 + "8.b.d.0.1.0.0.2.bl.example")


def test_worst_verdict() -> None:
    """A problem outranks an undecided item, which outranks ok."""
    assert worst([Verdict.OK, Verdict.ERROR]) is Verdict.ERROR
    assert worst([Verdict.ERROR, Verdict.PROBLEM, Verdict.OK]) is Verdict.PROBLEM
    assert worst([]) is Verdict.OK


def test_reasons_are_one_bounded_line() -> None:
    """A quoted record with line breaks stays one line, and a huge one is cut."""
    item = ItemResult("spf", Verdict.PROBLEM, "a\nb " + "x" * 2000)
    assert "\n" not in item.reason and len(item.reason) <= 600


GMAIL_DELIVERED = """\
Received: by 2002:a05:6a10:8e0b:b0:5a4:1f:1e2 with SMTP id x; Mon, 7 Dec 2026 12:00:03 -0800
Received: from smtp-out.example.test (smtp-out.example.test. [198.51.100.25])
        by mx.google.com with ESMTPS id y for <probe@gmail.com>;
        Mon, 07 Dec 2026 12:00:02 -0800 (PST)
Received: from submission.internal (ip-10-0-1-5.ec2.internal [10.0.1.5])
        by smtp-out.example.test with ESMTP id z; Mon, 7 Dec 2026 20:00:01 +0000
Received: from selfcheckd.localdomain (ip-10-0-2-9.ec2.internal [10.0.2.9])
        by submission.internal with ESMTPSA id w; Mon, 7 Dec 2026 20:00:00 +0000
Subject: probe

body
"""


def test_the_sending_ip_is_the_first_external_address_after_our_submission() -> None:
    """From real-shaped Received headers: smtp-out's public IP as Gmail's MX saw it."""
    hop = handing_hop(parse_hops(message_from_string(GMAIL_DELIVERED)))
    assert hop is not None
    assert (hop.from_ip, hop.by) == ("198.51.100.25", "mx.google.com")


def hop(ip: str | None, by: str = "x") -> Hop:
    return Hop(from_host="h", from_ip=ip, by=by, with_="ESMTP", timestamp=None, delay=None)


@pytest.mark.parametrize(("hops", "ip"), [
    ([hop("10.0.2.9"), hop("192.168.1.4"), hop("203.0.113.7"), hop("172.16.0.1")],
     "203.0.113.7"),
    ([hop("198.51.100.9")], "198.51.100.9"),  # selfcheckd submits straight to the receiver
    ([hop("198.51.100.9"), hop("203.0.113.7")], "203.0.113.7"),  # public daemon, relay
    ([hop("127.0.0.1"), hop("::1"), hop("fd00::1"), hop("100.64.1.1")], None),  # never left
    ([hop("10.0.0.1"), hop("::ffff:203.0.113.8")], "::ffff:203.0.113.8"),
    ([hop(None), hop("not-an-ip"), hop("169.254.0.1")], None),
    ([], None),
])
def test_handing_hop(hops: list[Hop], ip: str | None) -> None:
    """Internal ranges are skipped; documentation ranges count as public."""
    found = handing_hop(hops)
    assert (found.from_ip if found else None) == ip


@pytest.mark.parametrize(("text", "parsed"), [
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("192.0.2.1", ("192.0.2.1", 53)),
    ("2001:db8::1", ("2001:db8::1", 53)),
    ("[2001:db8::1]:5353", ("2001:db8::1", 5353)),
    ("[::1]", ("::1", 53)),
])
def test_nameserver_forms(text: str, parsed: tuple[str, int]) -> None:
    """host:port, bare addresses on port 53, bracketed IPv6 with a port."""
    server = Nameserver.parse(text)
    assert (server.host, server.port) == parsed
    assert Nameserver.parse(str(server)) == server


def dns_problems(**table: Any) -> list[str]:
    try:
        Config.model_validate({"dns": [{"domain": "example.test", **table}]})
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return []


@pytest.mark.parametrize(("table", "problem"), [
    ({"nameservers": ["127.0.0.1:70000"]}, "the port must be 1-65535"),
    ({"nameservers": ["[::1"]}, "is not HOST:PORT"),
    ({"nameservers": []}, "at least 1 item"),
    ({"interval": 0.5}, "must be at least 1 (seconds)"),
    ({"timeout": 5, "deadline": 2}, "must be at least timeout (5s)"),
    ({"blocklists": ["bl.example"]}, "needs sending_ips or ips_from_route"),
    ({"blocklists": ["a.example", "A.example."], "sending_ips": ["192.0.2.1"]},
     "lists a zone twice: a.example"),
    ({"domain": "not a domain"}, "must be a domain name"),
    ({"dkim_selectors": ["bad selector"]}, "is not a selector"),
    ({"ips_from_route": "nope"}, "no such route: nope (routes: none)"),
    ({"name": ""}, "must not be empty"),
    ({"colour": "blue"}, "Extra inputs are not permitted"),
])
def test_dns_entry_rules(table: dict[str, Any], problem: str) -> None:
    """Each broken key is reported with its rule."""
    found = dns_problems(**table)
    assert any(problem in p for p in found), found


def test_dns_entries_default_their_name_and_must_be_unique() -> None:
    """name defaults to the domain (normalised); two entries with one name are refused."""
    entry = DnsEntry.model_validate({"domain": "Example.TEST.", "sending_ips": ["2001:DB8::1"]})
    assert (entry.name, entry.domain, entry.sending_ips) == ("example.test", "example.test",
                                                             ["2001:db8::1"])
    with pytest.raises(ValidationError, match="entry names must be unique"):
        Config.model_validate({"dns": [{"domain": "example.test"},
                                       {"domain": "EXAMPLE.test"}]})
    config = Config.model_validate({"dns": [{"domain": "example.test"},
                                            {"domain": "example.test", "name": "second"}]})
    assert [e.name for e in config.dns] == ["example.test", "second"]


@pytest.mark.parametrize(("os_error", "verdict", "said"), [
    (OSError(errno.ECONNREFUSED, "Connect call failed"), "problem", "refused the connection"),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), "error", "could not connect"),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "error", "could not connect"),
    (OSError("Multiple exceptions: [Errno 101] ..., [Errno 111] ..."), "error",
     "could not connect"),
])
def test_only_a_refused_policy_connection_is_a_problem(os_error: OSError, verdict: str,
                                                       said: str) -> None:
    """The policy host refusing the connection is decided (senders are refused too); an
    unreachable network says only that this host cannot reach it (no IPv6 route here, an
    egress firewall): undecided."""
    item = mta_sts.cannot_connect("https://mta-sts.a.test/.well-known/mta-sts.txt", os_error)
    assert (item.verdict, said in item.reason) == (verdict, True), item.reason
