"""DKIM: each selector's key record is there, readable, not revoked, and strong enough.

The key record at `<selector>._domainkey.<domain>` is a tag=value list
(RFC 6376 3.6.1), read with dkimpy's parser, the one its verifier uses.
A problem is anything that makes verifiers fail the signatures made with
that selector: no record, several (a verifier may pick any), an unreadable
one, `v=` other than DKIM1, no `p=`, an empty `p=` (revoked), a key that does
not parse (cryptography reads it), an RSA key under 1024 bits (RFC 8301 3.2:
verifiers must not accept them), an unknown `k=`, `h=` without sha256, `s=`
excluding email. A 1024-bit key and `t=y` (testing) are notes.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import InvalidTagValueList, parse_tag_value

from daemon.dns.resolver import Resolver
from daemon.dns.verdict import ItemResult, notes, ok, problem

MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers MUST NOT consider shorter keys valid
GOOD_RSA_BITS = 2048  # RFC 8301 3.2: signers SHOULD use at least this


def item_name(selector: str) -> str:
    return f"dkim/{selector}"


def key_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


async def check(resolver: Resolver, domain: str, selector: str) -> ItemResult:
    name = key_name(selector, domain)
    answer = await resolver.query(name, "TXT")
    records = answer.texts()
    if not records:
        alias = "" if answer.canonical is None else (
            f" (a CNAME to {answer.canonical}, which "
            f"{'does not exist' if not answer.exists else 'has no TXT record'})")
        return problem(item_name(selector), f"no DKIM key at {name}{alias}: signatures with "
                                            f"s={selector} fail (dkim=permerror)")
    if len(records) > 1:
        return problem(item_name(selector), f"{len(records)} TXT records at {name}: a "
                                            "verifier may pick any of them (RFC 6376 "
                                            "3.6.2.2); keep one key record", records=records)
    return judge_key(selector, name, records[0])


def judge_key(selector: str, name: str, record: str) -> ItemResult:
    """The DKIM item from the key record's text (pure: unit-tested on its own)."""
    item = item_name(selector)
    try:
        tags = {k.decode("ascii", "replace").lower(): v.decode("ascii", "replace")
                for k, v in parse_tag_value(record.encode("utf-8", "replace")).items()}
    except InvalidTagValueList as exc:
        return problem(item, f"the key record at {name} is not a tag=value list ({exc!r}): "
                             "verifiers cannot read it", record=record)
    if tags.get("v", "DKIM1") != "DKIM1":
        return problem(item, f"v={tags['v']} at {name}: only DKIM1 exists; verifiers ignore "
                             "the record", record=record)
    if "p" not in tags:
        return problem(item, f"no p= tag at {name}: the record holds no key", record=record)
    key_text = "".join(tags["p"].split())
    if not key_text:
        return problem(item, f"the key at {name} is revoked (empty p=, RFC 6376 3.6.1): "
                             f"every signature with s={selector} fails; publish the current "
                             "key or stop signing with this selector", revoked=True)
    caveats = []
    hashes = [h.strip().lower() for h in tags.get("h", "").split(":") if h.strip()]
    if hashes and "sha256" not in hashes:
        return problem(item, f"h={tags['h']} at {name} allows only sha1, which verifiers "
                             "reject (RFC 8301)", record=record)
    services = [s.strip().lower() for s in tags.get("s", "*").split(":")]
    if "*" not in services and "email" not in services:
        return problem(item, f"s={tags['s']} at {name} excludes email: verifiers must not use "
                             "this key for mail (RFC 6376 3.6.1)", record=record)
    if "y" in [f.strip().lower() for f in tags.get("t", "").split(":")]:
        caveats.append("t=y: the domain says it is testing DKIM, so verifiers treat its mail "
                       "as unsigned (RFC 6376 3.6.1)")
    algorithm = tags.get("k", "rsa").strip().lower()
    try:
        der = base64.b64decode(key_text, validate=True)
    except (binascii.Error, ValueError):
        return problem(item, f"p= at {name} is not base64: verifiers cannot read the key",
                       record=record)
    if algorithm == "rsa":
        bits = _rsa_bits(der)
        if bits is None:
            return problem(item, f"p= at {name} is not an RSA public key: verifiers cannot "
                                 "read it", record=record)
        facts = {"algorithm": "rsa", "bits": bits}
        if bits < MIN_RSA_BITS:
            return problem(item, f"the RSA key at {name} has {bits} bits: verifiers reject "
                                 f"keys under {MIN_RSA_BITS} bits (RFC 8301 3.2); publish a "
                                 f"{GOOD_RSA_BITS}-bit key", **facts)
        if bits < GOOD_RSA_BITS:
            caveats.append(f"{bits} bits: RFC 8301 asks for at least {GOOD_RSA_BITS}")
        return ok(item, notes(f"RSA key of {bits} bits at {name}", caveats), **facts)
    if algorithm == "ed25519":
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(der)
        except ValueError:
            return problem(item, f"p= at {name} is not an Ed25519 public key (32 bytes)",
                           record=record)
        return ok(item, notes(f"Ed25519 key at {name} (RFC 8463)", caveats),
                  algorithm="ed25519")
    return problem(item, f"k={algorithm} at {name}: not a DKIM key type verifiers know (rsa, "
                         "ed25519)", record=record)


def _rsa_bits(der: bytes) -> int | None:
    """The modulus size of an RSA key given as SubjectPublicKeyInfo (what RFC 6376 says
    p= holds) or as a bare PKCS#1 RSAPublicKey (which some publish and verifiers accept)."""
    pem = base64.encodebytes(der).decode("ascii")
    pkcs1 = f"-----BEGIN RSA PUBLIC KEY-----\n{pem}-----END RSA PUBLIC KEY-----\n"
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        try:
            key = serialization.load_pem_public_key(pkcs1.encode("ascii"))
        except (ValueError, UnsupportedAlgorithm):
            return None
    return key.key_size if isinstance(key, rsa.RSAPublicKey) else None
