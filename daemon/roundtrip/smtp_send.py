"""Send a probe with aiosmtplib under one total deadline, reporting the TLS handshake.

aiosmtplib's `timeout` bounds each server response, not the transaction, so a
server that answers slowly line by line could hold a run for minutes: the whole
send sits inside `asyncio.timeout`.

The client connects (and upgrades with STARTTLS) before it logs in, so the TLS
connection's `ssl_object` is handed to `on_tls` even when AUTH or the
transaction then fails: the certificate's expiry is known whatever happens next.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import aiosmtplib

from daemon.config import Security, SmtpSettings
from daemon.roundtrip.probe import Probe
from daemon.roundtrip.tls import client_context, os_error_text

# QUIT is a courtesy after the message was accepted: never worth more than this.
QUIT_TIMEOUT = 2.0
# What aiosmtplib holds of a server's reply at most; past either it refuses the reply, so an
# endless reply line costs 32 KiB (docs/configuration.md, "What a mail server may send").
MAX_REPLY_LINE = aiosmtplib.protocol.MAX_LINE_LENGTH
MAX_REPLY = aiosmtplib.protocol.MAX_RESPONSE_LENGTH


class SendError(Exception):
    """The probe was not accepted; the message says what and where, without secrets."""


async def send_probe(
    settings: SmtpSettings, probe: Probe, timeout: float,
    on_tls: Callable[[Any], None] | None = None,
) -> float:
    """Deliver `probe` to the submission server; return the SMTP transaction time (s).

    `on_tls` gets the connection's `ssl_object` right after the TLS handshake
    (implicit TLS or STARTTLS); it is not called for a plain connection.
    """
    where = f"{settings.host}:{settings.port}"
    password = settings.password.get_secret_value() if settings.password else None
    client = aiosmtplib.SMTP(
        hostname=settings.host,
        port=settings.port,
        use_tls=settings.security is Security.TLS,
        start_tls=settings.security is Security.STARTTLS,
        tls_context=client_context(settings) if settings.security is not Security.NONE
        else None,
        local_hostname=settings.local_hostname,
        timeout=min(settings.timeout, timeout),
    )
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            try:
                await client.connect()
                ssl_object = client.get_transport_info("ssl_object")
                if ssl_object is not None and on_tls is not None:
                    on_tls(ssl_object)
                if password is not None:
                    await client.login(settings.username or "", password)
                await client.send_message(probe.message, sender=probe.sender,
                                          recipients=[probe.recipient])
            except BaseException:
                client.close()
                raise
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await client.quit(timeout=min(QUIT_TIMEOUT, settings.timeout))
            client.close()
    except TimeoutError:
        raise SendError(f"SMTP {where}: no complete transaction within {timeout:g}s") from None
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refusal = exc.recipients[0] if exc.recipients else None
        detail = f"{refusal.code} {refusal.message}" if refusal else "refused"
        raise SendError(f"SMTP {where}: recipient refused: {detail}") from None
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise SendError(f"SMTP {where}: authentication failed: {exc.code} {exc.message}") from None
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code == aiosmtplib.SMTPStatus.invalid_response:
            # aiosmtplib's verdict on the reply (too long, no status code), not the server's.
            bound = (f" (over {MAX_REPLY_LINE // 1024} KiB a line or {MAX_REPLY // 1024} KiB "
                     "a reply)" if exc.message == "Response too long" else "")
            raise SendError(f"SMTP {where}: reply refused: {exc.message}{bound}") from None
        raise SendError(f"SMTP {where}: server said {exc.code} {exc.message}") from None
    except aiosmtplib.SMTPException as exc:
        raise SendError(f"SMTP {where}: {exc}") from None
    except OSError as exc:
        raise SendError(f"SMTP {where}: {os_error_text(exc)}") from None
    return time.monotonic() - started
