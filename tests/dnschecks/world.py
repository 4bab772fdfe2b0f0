"""The test zones: one domain where everything holds, and one per way to get it wrong.

Every name is under `.test` (RFC 2606) or a documentation range's reverse
zone, served only by the tests' own NSD on a loopback port.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.dnschecks.nsd import txt, zone_text

GOOD_IP = "203.0.113.7"  # mail.good.test, forward-confirmed, listed nowhere
GOOD_IP6 = "2001:db8::7"
NO_FCRDNS_IP = "203.0.113.8"  # PTR mail.nofcrdns.test, which resolves to .99
NO_PTR_IP = "203.0.113.9"
CLASSLESS_IP = "203.0.113.20"  # its PTR is CNAME'd into an RFC 2317 child zone
LISTED_IP = "203.0.113.66"  # listed in bl.test with a TXT reason
LISTED_REASON = "Listed for spam traps hits, see https://bl.test/lookup?ip=203.0.113.66"
SELECTOR = "cabal"
CHAIN_LENGTH = 12  # includes in chain.test's SPF: over RFC 7208's 10
# A 512-bit RSA SubjectPublicKeyInfo (cryptography refuses to make one; openssl did).
KEY_512 = ("MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBALpM+XKtyxRIcPDhONJkMB6MnmXbqE8uCK2uSbCO1xkw"
           "L8bcHB8YXtBcekfnoMSnRVCI0uN1dJ8+ollv42xzpa8CAwEAAQ==")
# The MTA-STS policies the tests' HTTPS server answers, by host (absent: 404).
POLICIES = {
    "mta-sts.good.test": "version: STSv1\nmode: enforce\nmx: mx.good.test\nmax_age: 604800\n",
    "mta-sts.stsbad.test": "version: STSv1\nmode: enforce\nmx: *.elsewhere.test\n"
                           "max_age: 604800\n",
    "mta-sts.wildcard.test": "version: STSv1\nmode: testing\nmx: *.wildcard.test\n"
                             "max_age: 604800\n",
}
# Policy hosts that answer otherwise: as text/html, or with a redirect.
AS_HTML = "mta-sts.html.test"
REDIRECTING = "mta-sts.redirect.test"
# Hosts the tests' certificate names (mta-sts.wrongcert.test is served without one).
CERT_HOSTS = ["mta-sts.good.test", "mta-sts.stsbad.test", "mta-sts.stsmissing.test",
              "mta-sts.wildcard.test", AS_HTML, REDIRECTING]


def rsa_key(bits: int = 2048) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def mail_basics(origin: str, spf: str | None = "v=spf1 ip4:203.0.113.0/28 -all",
                dmarc: str | None = "v=DMARC1; p=reject; rua=mailto:dmarc@{origin}",
                ) -> list[str]:
    """An MX with an address, an SPF record and a DMARC record for `origin`."""
    records = [f"@ MX 10 mx.{origin}.", f"mx.{origin}. A 203.0.113.10"]
    if spf is not None:
        records.append(f"@ {txt(spf)}")
    if dmarc is not None:
        records.append(f"_dmarc {txt(dmarc.format(origin=origin))}")
    return records


def zones() -> dict[str, str]:
    """Every zone, by origin."""
    z: dict[str, list[str]] = {}
    z["good.test"] = [
        "@ MX 10 mx.good.test.",
        "mx A 203.0.113.10",
        f"mail A {GOOD_IP}",
        f"mail AAAA {GOOD_IP6}",
        f"@ {txt('v=spf1 mx include:_spf.good.test -all')}",
        f"_spf {txt('v=spf1 ip4:203.0.113.0/28 ip6:2001:db8::/64 -all')}",
        f"{SELECTOR}._domainkey {txt(f'v=DKIM1; k=rsa; p={rsa_key()}')}",
        f"_dmarc {txt('v=DMARC1; p=reject; rua=mailto:dmarc@good.test')}",
        f"_mta-sts {txt('v=STSv1; id=20261207T000000')}",
        "mta-sts A 127.0.0.1",
        f"_smtp._tls {txt('v=TLSRPTv1; rua=mailto:tlsrpt@good.test')}",
        "news A 203.0.113.11",  # a subdomain without a _dmarc of its own
        f"mail2317 A {CLASSLESS_IP}",
        # A selector delegated by CNAME to a provider this server does not serve.
        "ext._domainkey CNAME key.provider.example.",
    ]
    # Like good.test without MTA-STS: what `selfcheckd dns` can check in full (the CLI
    # fetches policies on port 443 only).
    z["plain.test"] = [*mail_basics("plain.test"),
                       f"{SELECTOR}._domainkey {txt(f'v=DKIM1; p={rsa_key()}')}"]
    # Records kept at a provider by CNAME, into another zone this server serves (it
    # answers the CNAME alone, as an authoritative server does): an SPF include, the
    # DMARC record, a DKIM key.
    z["provider.test"] = [f"_spf {txt('v=spf1 ip4:203.0.113.0/28 -all')}",
                          f"dmarc {txt('v=DMARC1; p=quarantine')}"]
    z["cnamed.test"] = [*mail_basics("cnamed.test", spf="v=spf1 include:spf.cnamed.test -all",
                                     dmarc=None),
                        "spf CNAME _spf.provider.test.", "_dmarc CNAME dmarc.provider.test.",
                        f"{SELECTOR}._domainkey CNAME {SELECTOR}._domainkey.plain.test.",
                        # A key the provider deleted: the CNAME is left dangling.
                        "gone._domainkey CNAME gone._domainkey.plain.test."]
    # An explanation (exp=) whose TXT record only this server has.
    z["exp.test"] = [*mail_basics("exp.test",
                                  spf="v=spf1 ip4:203.0.113.0/28 -all exp=why.exp.test"),
                     f"why {txt('%{i} is not one of %{d} senders')}"]
    # SPF that passes any IP: +all, and an include of a record ending in +all.
    z["plusall.test"] = mail_basics("plusall.test", spf="v=spf1 ip4:203.0.113.0/28 +all")
    z["openinclude.test"] = [*mail_basics("openinclude.test",
                                          spf="v=spf1 include:_open.openinclude.test -all"),
                             f"_open {txt('v=spf1 +all')}"]
    # A redirect= to a domain without SPF (RFC 7208 6.1: permerror).
    z["spfredirect.test"] = mail_basics("spfredirect.test",
                                        spf="v=spf1 redirect=nofcrdns.test")
    # The version in capitals: ABNF strings are case-insensitive (RFC 7208 12, RFC 5234).
    z["upperspf.test"] = mail_basics("upperspf.test", spf="V=SPF1 ip4:203.0.113.0/28 -all")
    z["twospf.test"] = [*mail_basics("twospf.test"),
                        f"@ {txt('v=spf1 ip4:203.0.113.7 -all')}"]
    chain = [f"l{i} {txt(f'v=spf1 include:l{i + 1}.chain.test -all')}"
             for i in range(1, CHAIN_LENGTH)]
    z["chain.test"] = [*mail_basics("chain.test", spf="v=spf1 include:l1.chain.test -all"),
                       *chain, f"l{CHAIN_LENGTH} {txt(f'v=spf1 ip4:{GOOD_IP} -all')}"]
    z["uncovered.test"] = mail_basics("uncovered.test", spf="v=spf1 ip4:198.51.100.0/24 -all",
                                      dmarc="v=DMARC1; p=none")
    z["revoked.test"] = [*mail_basics("revoked.test"),
                         f"{SELECTOR}._domainkey {txt('v=DKIM1; k=rsa; p=')}"]
    z["weak.test"] = [*mail_basics("weak.test"),
                      f"{SELECTOR}._domainkey {txt(f'v=DKIM1; k=rsa; p={KEY_512}')}"]
    z["nodmarc.test"] = mail_basics("nodmarc.test", dmarc=None)
    # A DMARC record with a space where the ';' belongs: receivers discard it.
    z["nosemicolon.test"] = mail_basics("nosemicolon.test", dmarc="v=DMARC1 p=reject")
    z["nullmx.test"] = ["@ MX 0 .", f"@ {txt('v=spf1 -all')}",
                        f"_dmarc {txt('v=DMARC1; p=reject')}"]
    # An MX host that is an alias (RFC 2181 10.3 says it must not be).
    z["mxalias.test"] = ["@ MX 10 alias.mxalias.test.", "alias CNAME mx", "mx A 203.0.113.10"]
    z["nofcrdns.test"] = ["mail A 203.0.113.99"]
    z["stsbad.test"] = [*mail_basics("stsbad.test"), f"_mta-sts {txt('v=STSv1; id=1')}",
                        "mta-sts A 127.0.0.1",
                        f"_smtp._tls {txt('v=TLSRPTv1; rua=mailto:a@stsbad.test')}",
                        f"_smtp._tls {txt('v=TLSRPTv1; rua=mailto:b@stsbad.test')}"]
    # An SPF include into a delegated subzone: NSD answers it with a referral.
    z["deleg.test"] = [*mail_basics("deleg.test", spf="v=spf1 include:_spf.sub.deleg.test -all"),
                       "sub NS ns.nowhere.test."]
    # An SPF include that nobody answers for (dead.test is in no zone: NSD refuses it).
    z["deadinclude.test"] = mail_basics("deadinclude.test",
                                        spf="v=spf1 include:_spf.dead.test -all")
    z["stsmissing.test"] = [*mail_basics("stsmissing.test"),
                            f"_mta-sts {txt('v=STSv1; id=1')}", "mta-sts A 127.0.0.1"]
    z["wrongcert.test"] = [*mail_basics("wrongcert.test"),
                           f"_mta-sts {txt('v=STSv1; id=1')}", "mta-sts A 127.0.0.1"]
    for origin in ("html.test", "redirect.test"):
        z[origin] = [*mail_basics(origin), f"_mta-sts {txt('v=STSv1; id=1')}",
                     "mta-sts A 127.0.0.1"]
    z["wildcard.test"] = [*mail_basics("wildcard.test"), f"_mta-sts {txt('v=STSv1; id=1')}",
                          "mta-sts A 127.0.0.1"]
    # Reverse DNS of 203.0.113.0/24 and 2001:db8::/32 (documentation ranges).
    z["113.0.203.in-addr.arpa"] = ["7 PTR mail.good.test.", "8 PTR mail.nofcrdns.test.",
                                   "66 PTR mail.good.test.",
                                   # RFC 2317 classless delegation of .16-.31 to a zone
                                   # of its own (which this server also serves).
                                   "20 CNAME 20.16/28.113.0.203.in-addr.arpa.",
                                   "16/28 NS ns.16/28.113.0.203.in-addr.arpa."]
    z["16/28.113.0.203.in-addr.arpa"] = ["20 PTR mail2317.good.test."]
    z["8.b.d.0.1.0.0.2.ip6.arpa"] = [
        f"{'.'.join(reversed('0' * 23 + '7'))} PTR mail.good.test."]
    # Blocklists: one listing with a reason (and RFC 5782's 127.0.0.2 test entry), one
    # refusing every query as Spamhaus refuses a public resolver, one listing everything.
    z["bl.test"] = ["66.113.0.203 A 127.0.0.2", f"66.113.0.203 {txt(LISTED_REASON)}",
                    "2.0.0.127 A 127.0.0.2",
                    # dead.bl.test is delegated away: NSD answers its names with a referral.
                    "dead NS ns.nowhere.test."]
    z["refused.test"] = ["* A 127.255.255.254"]
    z["everything.test"] = ["* A 127.0.0.2"]
    return {origin: zone_text(origin, records) for origin, records in z.items()}
