"""TLS client contexts, what a handshake tells about the peer, and readable socket errors.

`peer_tls` reads the negotiated version and the peer certificate's notAfter from
an established connection's `ssl_object`. The certificate is read in its DER
form, which `getpeercert(binary_form=True)` returns whether or not it was
verified (`verify_tls = false` makes `getpeercert()` return an empty dict), and
only the one field needed is decoded: no X.509 library at run time.
"""

from __future__ import annotations

import os
import socket
import ssl
from datetime import UTC, datetime
from typing import Any

from daemon.checks.result import TlsFacts
from daemon.config import TLSSettings


def os_error_text(exc: OSError) -> str:
    """"Connection refused", not asyncio's "Connect call failed ('h', 1)"."""
    if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's, not the OS's
        return exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):  # its errno is a resolver code
        return f"cannot resolve the host name: {exc.strerror or exc}"
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


def client_context(settings: TLSSettings) -> ssl.SSLContext:
    """Verify against the system store, or `ca_file` when set; `verify_tls=false` is opt-in."""
    ctx = ssl.create_default_context(
        cafile=str(settings.ca_file) if settings.ca_file is not None else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_tls(ssl_object: Any, seen_at: float) -> TlsFacts | None:
    """The version and certificate expiry of an established TLS connection (None if not TLS).

    `ssl_object` is a transport's `get_extra_info("ssl_object")`. A certificate
    whose notAfter cannot be read still yields the version (`not_after` None).
    """
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    version = ssl_object.version() or "unknown"
    der = ssl_object.getpeercert(binary_form=True)
    not_after: float | None = None
    if der:
        try:
            not_after = certificate_not_after(der)
        except ValueError:
            not_after = None
    return TlsFacts(version=version, not_after=not_after, seen_at=seen_at)


def certificate_not_after(der: bytes) -> float:
    """notAfter of a DER X.509 certificate as a Unix time; ValueError if it is not one.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    serialNumber INTEGER, signature AlgorithmIdentifier, issuer Name,
    validity SEQUENCE { notBefore Time, notAfter Time }, ... }, ... }
    (RFC 5280 4.1). Time is UTCTime (YYMMDDHHMMSSZ, 19YY from 50) or
    GeneralizedTime (YYYYMMDDHHMMSSZ).
    """
    tag, start, _end = _der_item(der, 0)
    if tag != 0x30:
        raise ValueError("not a certificate (no outer SEQUENCE)")
    tag, pos, tbs_end = _der_item(der, start)
    if tag != 0x30:
        raise ValueError("not a certificate (no tbsCertificate)")
    tag, _, after = _der_item(der, pos, tbs_end)
    if tag == 0xA0:  # explicit version
        pos = after
    for expected in (0x02, 0x30, 0x30):  # serialNumber, signature, issuer
        tag, _, after = _der_item(der, pos, tbs_end)
        if tag != expected:
            raise ValueError("unexpected field before validity")
        pos = after
    tag, validity, validity_end = _der_item(der, pos, tbs_end)
    if tag != 0x30:
        raise ValueError("no validity SEQUENCE")
    _, _, after = _der_item(der, validity, validity_end)  # notBefore
    tag, value, value_end = _der_item(der, after, validity_end)
    return _der_time(tag, der[value:value_end])


def _der_item(data: bytes, pos: int, limit: int | None = None) -> tuple[int, int, int]:
    """(tag, value start, value end) of the DER item at `pos`, checked against `limit`."""
    limit = len(data) if limit is None else limit
    if pos + 2 > limit:
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > limit:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > limit:
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _der_time(tag: int, value: bytes) -> float:
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("time is not ASCII") from None
    if tag == 0x17 and len(text) == 13 and text.endswith("Z"):  # UTCTime
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif not (tag == 0x18 and len(text) == 15 and text.endswith("Z")):  # GeneralizedTime
        raise ValueError("notAfter is not a DER UTCTime or GeneralizedTime")
    try:
        stamp = datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"notAfter {text!r} is not a time") from None
    return stamp.timestamp()
