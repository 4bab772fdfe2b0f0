"""Every item against a real authoritative server (NSD) serving the test zones."""

from __future__ import annotations

import time

import dns.exception
import pytest

from daemon.dns import blocklists, dmarc, mta_sts
from daemon.dns.libraries import checkdmarc_utils
from daemon.dns.mta_sts import PolicyFetcher
from daemon.dns.resolver import Resolver
from daemon.dns.run import run_entry
from daemon.dns.verdict import EntryResult, ItemResult, Verdict
from tests.dnschecks.conftest import EntryFactory
from tests.dnschecks.nsd import Blackhole, DropsFirst, NsdLab
from tests.dnschecks.world import (
    CLASSLESS_IP,
    GOOD_IP,
    GOOD_IP6,
    LISTED_IP,
    LISTED_REASON,
    NO_FCRDNS_IP,
    NO_PTR_IP,
    SELECTOR,
)


def by_item(result: EntryResult) -> dict[str, ItemResult]:
    return {i.item: i for i in result.items}


def resolver_for(nsd: NsdLab, *more: str) -> Resolver:
    from daemon.dns.config import Nameserver

    return Resolver([Nameserver.parse(nsd.nameserver), *map(Nameserver.parse, more)], 2.0)


async def test_a_domain_where_everything_holds_is_ok_item_by_item(
        make_entry: EntryFactory, policy_server: PolicyFetcher) -> None:
    """good.test: MX, SPF (pass for both IPs), DMARC, DKIM, FCrDNS, clean, MTA-STS, TLS-RPT."""
    entry = make_entry("good.test", dkim_selectors=[SELECTOR], sending_ips=[GOOD_IP, GOOD_IP6],
                       blocklists=["bl.test"])
    result = await run_entry(entry, fetcher=policy_server)
    items = by_item(result)
    assert {i.item: i.verdict for i in result.items} == {
        "mx": "ok", "spf": "ok", "dmarc": "ok", f"dkim/{SELECTOR}": "ok",
        f"ptr/{GOOD_IP}": "ok", f"ptr/{GOOD_IP6}": "ok",
        f"blocklist/bl.test/{GOOD_IP}": "ok", f"blocklist/bl.test/{GOOD_IP6}": "ok",
        "mta-sts": "ok", "tls-rpt": "ok"}, [i.reason for i in result.items]
    assert f"pass for {GOOD_IP}, {GOOD_IP6}" in items["spf"].reason
    assert "2 of 10 DNS lookups" in items["spf"].reason
    assert "p=reject" in items["dmarc"].reason
    assert items[f"dkim/{SELECTOR}"].details["bits"] == 2048
    assert "covers MX mx.good.test" in items["mta-sts"].reason
    assert result.verdict is Verdict.OK


async def test_two_spf_records_are_a_problem(make_entry: EntryFactory) -> None:
    """RFC 7208 4.5: two v=spf1 records make every message a permerror."""
    spf = by_item(await run_entry(make_entry("twospf.test", sending_ips=[GOOD_IP])))["spf"]
    assert spf.verdict is Verdict.PROBLEM
    assert "2 SPF records" in spf.reason


async def test_a_twelve_lookup_spf_chain_is_a_problem_even_when_the_ip_matches_last(
        make_entry: EntryFactory) -> None:
    """The lookup limit is judged on the whole record, not on where one IP matched."""
    spf = by_item(await run_entry(make_entry("chain.test", sending_ips=[GOOD_IP])))["spf"]
    assert spf.verdict is Verdict.PROBLEM
    assert "more than 10 DNS lookups" in spf.reason


async def test_an_spf_record_that_does_not_cover_the_sending_ip_is_a_problem(
        make_entry: EntryFactory) -> None:
    """check_host() for the IP gives fail (-all matched): not authorised."""
    spf = by_item(await run_entry(make_entry("uncovered.test", sending_ips=[GOOD_IP])))["spf"]
    assert spf.verdict is Verdict.PROBLEM
    assert f"does not authorise {GOOD_IP}: fail" in spf.reason
    assert spf.details["results"] == {GOOD_IP: "fail"}


async def test_an_spf_version_in_capitals_is_a_valid_record(make_entry: EntryFactory) -> None:
    """"V=SPF1" is "v=spf1" to receivers (RFC 7208's ABNF is case-insensitive, and pyspf
    passes it); checkdmarc alone calls it invalid."""
    spf = by_item(await run_entry(make_entry("upperspf.test", sending_ips=[GOOD_IP])))["spf"]
    assert spf.verdict is Verdict.OK, spf.reason


@pytest.mark.parametrize("ips", [[GOOD_IP], []])
async def test_an_spf_redirect_to_a_domain_without_spf_says_what_receivers_get(
        make_entry: EntryFactory, ips: list[str]) -> None:
    """RFC 7208 6.1: a redirect to a domain with no SPF record is a permerror; the reason
    names the target as a receiver's check_host() does, with or without sending IPs
    (checkdmarc alone says only "An SPF record does not exist")."""
    spf = by_item(await run_entry(make_entry("spfredirect.test", sending_ips=ips)))["spf"]
    assert spf.verdict is Verdict.PROBLEM
    assert "permerror" in spf.reason and "nofcrdns.test" in spf.reason, spf.reason


@pytest.mark.parametrize("domain", ["plusall.test", "openinclude.test"])
async def test_an_spf_record_that_passes_any_ip_is_a_problem(
        make_entry: EntryFactory, domain: str) -> None:
    """+all (here or in an include) passes the sending IP and every spammer's: SPF and
    DMARC then pass for anyone sending as the domain. check_host() passes an address
    nobody sends from (240.0.0.1, reserved)."""
    spf = by_item(await run_entry(make_entry(domain, sending_ips=[GOOD_IP])))["spf"]
    assert spf.verdict is Verdict.PROBLEM, spf.reason
    assert "authorises any IP" in spf.reason
    assert spf.details["results"] == {GOOD_IP: "pass"}


async def test_every_lookup_of_the_libraries_goes_to_the_configured_nameservers(
        make_entry: EntryFactory) -> None:
    """checkdmarc looks up an SPF exp= record with a resolver of its own (the system's)
    unless given one: ours is given, so the TXT record only our nameserver has is found."""
    spf = by_item(await run_entry(make_entry("exp.test", sending_ips=[GOOD_IP])))["spf"]
    assert spf.verdict is Verdict.OK, spf.reason
    assert "exp value" not in spf.reason


def test_the_libraries_cannot_ask_the_system_resolver() -> None:
    """A checkdmarc lookup outside an evaluation fails instead of asking /etc/resolv.conf's
    nameservers."""
    with pytest.raises(dns.exception.DNSException, match="no resolver"):
        checkdmarc_utils.query_dns("plain.test", "TXT", timeout=0.5)


async def test_an_spf_include_nobody_answers_for_is_an_error_not_a_missing_record(
        nsd: NsdLab, blackhole: Blackhole, make_entry: EntryFactory) -> None:
    """The libraries fold a timed-out include into "no SPF record"; we say undecided."""
    entry = make_entry("deadinclude.test", sending_ips=[GOOD_IP], timeout=0.5, deadline=5,
                       nameservers=[nsd.nameserver, blackhole.nameserver])
    spf = by_item(await run_entry(entry))["spf"]
    assert spf.verdict is Verdict.ERROR, spf.reason
    assert "_spf.dead.test" in spf.reason


async def test_answers_an_authoritative_server_does_not_give_are_errors_not_absences(
        make_entry: EntryFactory) -> None:
    """A referral, or a CNAME to a name the nameservers refuse, says nothing about the
    name: it is undecided, never "not listed" or "no key" (a blocklist delegated
    elsewhere, a DKIM key CNAME'd to a provider nobody here serves, an SPF include into a
    delegated zone)."""
    items = by_item(await run_entry(make_entry("good.test", dkim_selectors=["ext"],
                                               sending_ips=[GOOD_IP],
                                               blocklists=["dead.bl.test"])))
    listed = items[f"blocklist/dead.bl.test/{GOOD_IP}"]
    assert listed.verdict is Verdict.ERROR
    assert "refers the query to ns.nowhere.test" in listed.reason
    assert items["dkim/ext"].verdict is Verdict.ERROR
    assert "CNAME to key.provider.example" in items["dkim/ext"].reason
    assert "REFUSED" in items["dkim/ext"].reason
    spf = by_item(await run_entry(make_entry("deleg.test", sending_ips=[GOOD_IP])))["spf"]
    assert spf.verdict is Verdict.ERROR, spf.reason
    assert "_spf.sub.deleg.test" in spf.reason


@pytest.mark.parametrize("server", ["knot", "nsd"])
async def test_a_cname_into_another_zone_is_followed_to_its_records(
        make_entry: EntryFactory, server: str, request: pytest.FixtureRequest) -> None:
    """Knot (and BIND) answer a CNAME into another zone with the CNAME alone; the check
    asks for the target as a resolver would: a DKIM key, a DMARC record and an SPF include
    kept at a provider, and an RFC 2317 classless PTR, all get their verdict."""
    lab: NsdLab = request.getfixturevalue(server)
    items = by_item(await run_entry(make_entry("cnamed.test", dkim_selectors=[SELECTOR],
                                               sending_ips=[GOOD_IP],
                                               nameservers=[lab.nameserver])))
    assert items[f"dkim/{SELECTOR}"].verdict is Verdict.OK, items[f"dkim/{SELECTOR}"].reason
    assert items[f"dkim/{SELECTOR}"].details["bits"] == 2048
    assert items["dmarc"].verdict is Verdict.OK, items["dmarc"].reason
    assert "p=quarantine" in items["dmarc"].reason
    assert items["spf"].verdict is Verdict.OK, items["spf"].reason
    assert f"pass for {GOOD_IP}" in items["spf"].reason
    ptr = by_item(await run_entry(make_entry("good.test", sending_ips=[CLASSLESS_IP],
                                             nameservers=[lab.nameserver])))
    assert ptr[f"ptr/{CLASSLESS_IP}"].verdict is Verdict.OK, ptr[f"ptr/{CLASSLESS_IP}"].reason
    assert "mail2317.good.test" in ptr[f"ptr/{CLASSLESS_IP}"].reason


@pytest.mark.parametrize("server", ["knot", "nsd"])
async def test_a_dangling_cname_is_said_as_such(
        make_entry: EntryFactory, server: str, request: pytest.FixtureRequest) -> None:
    """A selector CNAME'd to a key the provider deleted: no key (a problem), and the reason
    says it is the CNAME's target that does not exist."""
    lab: NsdLab = request.getfixturevalue(server)
    item = by_item(await run_entry(make_entry("cnamed.test", dkim_selectors=["gone"],
                                              nameservers=[lab.nameserver])))["dkim/gone"]
    assert item.verdict is Verdict.PROBLEM
    assert "a CNAME to gone._domainkey.plain.test, which does not exist" in item.reason, \
        item.reason


async def test_a_revoked_dkim_key_is_a_problem(make_entry: EntryFactory) -> None:
    """An empty p= is a revoked key (RFC 6376 3.6.1)."""
    entry = make_entry("revoked.test", dkim_selectors=[SELECTOR])
    dkim = by_item(await run_entry(entry))[f"dkim/{SELECTOR}"]
    assert dkim.verdict is Verdict.PROBLEM
    assert "revoked" in dkim.reason


async def test_a_512_bit_dkim_key_is_a_problem(make_entry: EntryFactory) -> None:
    """RFC 8301: verifiers reject RSA keys under 1024 bits."""
    entry = make_entry("weak.test", dkim_selectors=[SELECTOR])
    dkim = by_item(await run_entry(entry))[f"dkim/{SELECTOR}"]
    assert dkim.verdict is Verdict.PROBLEM
    assert dkim.details["bits"] == 512


async def test_a_missing_dkim_selector_is_a_problem(make_entry: EntryFactory) -> None:
    """A selector with no key record: every signature with it fails."""
    entry = make_entry("good.test", dkim_selectors=["nosuch"])
    dkim = by_item(await run_entry(entry))["dkim/nosuch"]
    assert dkim.verdict is Verdict.PROBLEM
    assert "no DKIM key at nosuch._domainkey.good.test" in dkim.reason


async def test_no_dmarc_record_is_a_problem(make_entry: EntryFactory) -> None:
    """Neither _dmarc.<domain> nor the organisational domain has one."""
    item = by_item(await run_entry(make_entry("nodmarc.test")))["dmarc"]
    assert item.verdict is Verdict.PROBLEM
    assert "no DMARC record at _dmarc.nodmarc.test" in item.reason


async def test_a_dmarc_record_receivers_discard_is_named_not_called_missing(
        make_entry: EntryFactory) -> None:
    """"v=DMARC1 p=reject" (no ';') is no DMARC record to receivers (RFC 7489 6.6.3): a
    problem, whose reason shows the record instead of saying there is none."""
    item = by_item(await run_entry(make_entry("nosemicolon.test")))["dmarc"]
    assert item.verdict is Verdict.PROBLEM
    assert "no DMARC record" not in item.reason
    assert '"v=DMARC1 p=reject" is not a valid DMARC record' in item.reason, item.reason


async def test_dmarc_falls_back_to_the_organisational_domain(nsd: NsdLab) -> None:
    """news.good.test has no _dmarc of its own: good.test's record applies."""
    item = await dmarc.check(resolver_for(nsd), "news.good.test", deadline=time.monotonic() + 5)
    assert item.verdict is Verdict.OK, item.reason
    assert item.details["location"] == "good.test"
    assert "organisational domain of news.good.test" in item.reason


async def test_p_none_is_a_note_not_a_problem(make_entry: EntryFactory) -> None:
    """p=none is a valid policy: ok, with the note that receivers take no action."""
    item = by_item(await run_entry(make_entry("uncovered.test")))["dmarc"]
    assert item.verdict is Verdict.OK
    assert "p=none: monitoring only" in item.reason


async def test_a_ptr_that_does_not_forward_confirm_is_a_problem(
        make_entry: EntryFactory) -> None:
    """203.0.113.8's PTR name resolves to another address; 203.0.113.9 has no PTR."""
    items = by_item(await run_entry(make_entry("good.test",
                                               sending_ips=[NO_FCRDNS_IP, NO_PTR_IP])))
    mismatch, missing = items[f"ptr/{NO_FCRDNS_IP}"], items[f"ptr/{NO_PTR_IP}"]
    assert mismatch.verdict is Verdict.PROBLEM
    assert "mail.nofcrdns.test -> 203.0.113.99" in mismatch.reason
    assert missing.verdict is Verdict.PROBLEM
    assert "has no reverse DNS" in missing.reason


async def test_a_null_mx_is_reported_as_such(make_entry: EntryFactory) -> None:
    """MX 0 . (RFC 7505): a problem for a sending domain, and named a null MX."""
    item = by_item(await run_entry(make_entry("nullmx.test")))["mx"]
    assert item.verdict is Verdict.PROBLEM
    assert item.reason.startswith("null MX (RFC 7505)")
    assert item.details["null_mx"] is True


async def test_an_mx_host_that_is_an_alias_is_noted(make_entry: EntryFactory) -> None:
    """RFC 2181 10.3: an MX host must not be a CNAME. Most MTAs deliver anyway (ok), but
    the reason says so, and which name it aliases."""
    mx = by_item(await run_entry(make_entry("mxalias.test")))["mx"]
    assert mx.verdict is Verdict.OK
    assert "alias.mxalias.test is a CNAME to mx.mxalias.test" in mx.reason, mx.reason


async def test_a_listed_ip_is_a_problem_with_the_zones_txt_reason(nsd: NsdLab) -> None:
    """An A answer in 127.0.0.0/8 is a listing; the TXT record says why."""
    item = await blocklists.check(resolver_for(nsd), "bl.test", LISTED_IP)
    assert item.verdict is Verdict.PROBLEM
    assert item.details["listed"] is True
    assert item.details["codes"] == ["127.0.0.2"]
    assert LISTED_REASON in item.reason


async def test_an_unlisted_ip_is_ok_on_nxdomain(nsd: NsdLab) -> None:
    """NXDOMAIN is clean."""
    item = await blocklists.check(resolver_for(nsd), "bl.test", GOOD_IP)
    assert (item.verdict, item.details["listed"]) == (Verdict.OK, False)


async def test_127_255_255_254_is_an_unusable_blocklist_never_a_listing(nsd: NsdLab) -> None:
    """Spamhaus's answer to a public resolver: error, not listed, not clean."""
    item = await blocklists.check(resolver_for(nsd), "refused.test", GOOD_IP)
    assert item.verdict is Verdict.ERROR
    assert item.reason.startswith("blocklist unusable from this resolver")
    assert "public or open resolver" in item.reason
    assert "listed" not in item.details


async def test_a_zone_that_lists_everything_is_an_error(nsd: NsdLab) -> None:
    """It also lists RFC 5782's never-listed 127.0.0.1: its listing means nothing."""
    item = await blocklists.check(resolver_for(nsd), "everything.test", GOOD_IP)
    assert item.verdict is Verdict.ERROR
    assert "lists everything" in item.reason


async def test_a_blocklist_that_never_answers_is_an_error_and_the_rest_is_decided(
        nsd: NsdLab, blackhole: Blackhole, make_entry: EntryFactory) -> None:
    """dead.test is served by nothing that answers: error for it, verdicts for the rest,
    and the run ends by the query timeout, not the deadline."""
    entry = make_entry("good.test", sending_ips=[GOOD_IP], blocklists=["bl.test", "dead.test"],
                       nameservers=[nsd.nameserver, blackhole.nameserver], timeout=0.5,
                       deadline=20)
    before = blackhole.received
    started = time.monotonic()
    items = by_item(await run_entry(entry))
    took = time.monotonic() - started
    dead = items[f"blocklist/dead.test/{GOOD_IP}"]
    assert dead.verdict is Verdict.ERROR
    assert "no answer within 0.5s" in dead.reason
    assert items[f"blocklist/bl.test/{GOOD_IP}"].verdict is Verdict.OK
    assert items["spf"].verdict is Verdict.OK
    assert blackhole.received > before
    assert took < 10, took  # bounded by the per-query timeout, far below the deadline


async def test_a_lost_datagram_is_retried_within_the_query_timeout(
        nsd: NsdLab, make_entry: EntryFactory) -> None:
    """Every query gets a second try within its `timeout`: a nameserver that loses the
    first datagram of each question (a busy resolver dropping a burst) still decides every
    item, even with a 1 s timeout."""
    lossy = DropsFirst(nsd.port)
    try:
        result = await run_entry(make_entry("plain.test", dkim_selectors=[SELECTOR],
                                            sending_ips=[GOOD_IP], blocklists=["bl.test"],
                                            timeout=1.0, nameservers=[lossy.nameserver]))
    finally:
        lossy.close()
    assert lossy.dropped > 0
    assert {i.item: i.verdict for i in result.items if i.verdict is Verdict.ERROR} == {}, \
        [i.reason for i in result.items]


async def test_a_lookup_the_libraries_ignore_cannot_make_spf_undecided(
        nsd: NsdLab, make_entry: EntryFactory) -> None:
    """checkdmarc also asks for the obsolete SPF record type (to warn about it) and ignores
    its failure; some servers never answer a type they do not know. SPF is still decided
    from the TXT records, as receivers (pyspf) decide it."""
    lossy = DropsFirst(nsd.port, never=frozenset({"SPF"}))
    try:
        spf = by_item(await run_entry(make_entry("good.test", sending_ips=[GOOD_IP],
                                                 timeout=1.0,
                                                 nameservers=[lossy.nameserver])))["spf"]
    finally:
        lossy.close()
    assert spf.verdict is Verdict.OK, spf.reason


async def test_a_nameserver_that_never_answers_errors_every_item_by_the_deadline(
        blackhole: Blackhole, make_entry: EntryFactory) -> None:
    """Nothing answers: every item is error, none a verdict, within the run's deadline."""
    entry = make_entry("good.test", sending_ips=[GOOD_IP], dkim_selectors=[SELECTOR],
                       blocklists=["bl.test"], nameservers=[blackhole.nameserver],
                       timeout=0.3, deadline=2)
    started = time.monotonic()
    result = await run_entry(entry)
    assert time.monotonic() - started < 2 + 5  # the deadline, with room for a loaded machine
    assert {i.verdict for i in result.items} == {Verdict.ERROR}, [i.reason for i in result.items]


async def test_mta_sts_whose_policy_does_not_cover_the_mx_is_a_problem(
        nsd: NsdLab, policy_server: PolicyFetcher) -> None:
    """The policy's mx: *.elsewhere.test leaves mx.stsbad.test out."""
    item = await mta_sts.check(resolver_for(nsd), "stsbad.test", policy_server)
    assert item.verdict is Verdict.PROBLEM
    assert "do not cover MX host mx.stsbad.test" in item.reason


async def test_mta_sts_announced_but_not_served_is_a_problem(
        nsd: NsdLab, policy_server: PolicyFetcher) -> None:
    """The TXT record says there is a policy; the HTTPS server answers 404."""
    item = await mta_sts.check(resolver_for(nsd), "stsmissing.test", policy_server)
    assert item.verdict is Verdict.PROBLEM
    assert "HTTP 404" in item.reason


async def test_mta_sts_with_a_certificate_for_another_name_is_a_problem(
        nsd: NsdLab, policy_server: PolicyFetcher) -> None:
    """Senders verify the policy host's certificate: one not naming it fails the fetch."""
    item = await mta_sts.check(resolver_for(nsd), "wrongcert.test", policy_server)
    assert item.verdict is Verdict.PROBLEM
    assert "certificate of mta-sts.wrongcert.test is not valid" in item.reason


@pytest.mark.parametrize(("domain", "said"), [
    ("html.test", "serves the policy as text/html"),
    ("redirect.test", "answered a redirect (HTTP 301)"),
])
async def test_mta_sts_policy_served_wrong_is_a_problem(
        nsd: NsdLab, policy_server: PolicyFetcher, domain: str, said: str) -> None:
    """Senders ignore a policy that is not text/plain and follow no redirect (RFC 8461)."""
    item = await mta_sts.check(resolver_for(nsd), domain, policy_server)
    assert item.verdict is Verdict.PROBLEM
    assert said in item.reason


async def test_mta_sts_wildcard_pattern_covers_one_label(
        nsd: NsdLab, policy_server: PolicyFetcher) -> None:
    """*.wildcard.test covers mx.wildcard.test (testing mode is still checked)."""
    item = await mta_sts.check(resolver_for(nsd), "wildcard.test", policy_server)
    assert item.verdict is Verdict.OK, item.reason
    assert item.details["mode"] == "testing"


async def test_mta_sts_not_published_is_ok(nsd: NsdLab) -> None:
    """No _mta-sts record: no MTA-STS, nothing fetched, nothing wrong."""
    item = await mta_sts.check(resolver_for(nsd), "plain.test", PolicyFetcher(port=9))
    assert (item.verdict, item.details["published"]) == (Verdict.OK, False)


async def test_two_tls_rpt_records_are_a_problem(make_entry: EntryFactory) -> None:
    """RFC 8460 3.1: with two records senders send no reports."""
    item = by_item(await run_entry(make_entry("stsbad.test")))["tls-rpt"]
    assert item.verdict is Verdict.PROBLEM
    assert "2 v=TLSRPTv1 records" in item.reason


@pytest.mark.parametrize("domain", ["nosuchdomain.test"])
async def test_a_domain_the_nameserver_refuses_is_an_error_everywhere(
        make_entry: EntryFactory, domain: str) -> None:
    """NSD refuses names outside its zones: no nameserver answered, so nothing is decided."""
    result = await run_entry(make_entry(domain))
    assert {i.verdict for i in result.items} == {Verdict.ERROR}
    assert "REFUSED" in by_item(result)["mx"].reason


async def test_a_nameserver_refusing_is_named_as_configured(
        make_entry: EntryFactory, nsd: NsdLab) -> None:
    """The reason names the server as the config does (`127.0.0.1:5353 said REFUSED`),
    not dnspython's `[Do53:127.0.0.1@5353]:5353`."""
    mx = by_item(await run_entry(make_entry("nosuchdomain.test")))["mx"]
    assert f"({nsd.nameserver} said REFUSED)" in mx.reason, mx.reason
    assert "Do53" not in mx.reason
