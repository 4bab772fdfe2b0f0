"""Send a probe with aiosmtplib under one total deadline.

aiosmtplib's `timeout` bounds each server response, not the transaction, so a
server that answers slowly line by line could hold a run for minutes: the whole
send sits inside `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import time

import aiosmtplib

from daemon.config import Security, SmtpSettings
from daemon.roundtrip.probe import Probe
from daemon.roundtrip.tls import client_context, os_error_text


class SendError(Exception):
    """The probe was not accepted; the message says what and where, without secrets."""


async def send_probe(settings: SmtpSettings, probe: Probe, timeout: float) -> float:
    """Deliver `probe` to the submission server; return the SMTP transaction time (s)."""
    where = f"{settings.host}:{settings.port}"
    password = settings.password.get_secret_value() if settings.password else None
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            await aiosmtplib.send(
                probe.message,
                sender=probe.sender,
                recipients=[probe.recipient],
                hostname=settings.host,
                port=settings.port,
                username=settings.username if password is not None else None,
                password=password,
                use_tls=settings.security is Security.TLS,
                start_tls=settings.security is Security.STARTTLS,
                tls_context=client_context(settings) if settings.security is not Security.NONE
                else None,
                local_hostname=settings.local_hostname,
                timeout=min(settings.timeout, timeout),
            )
    except TimeoutError:
        raise SendError(f"SMTP {where}: no complete transaction within {timeout:g}s") from None
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refusal = exc.recipients[0] if exc.recipients else None
        detail = f"{refusal.code} {refusal.message}" if refusal else "refused"
        raise SendError(f"SMTP {where}: recipient refused: {detail}") from None
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise SendError(f"SMTP {where}: authentication failed: {exc.code} {exc.message}") from None
    except aiosmtplib.SMTPResponseException as exc:
        raise SendError(f"SMTP {where}: server said {exc.code} {exc.message}") from None
    except aiosmtplib.SMTPException as exc:
        raise SendError(f"SMTP {where}: {exc}") from None
    except OSError as exc:
        raise SendError(f"SMTP {where}: {os_error_text(exc)}") from None
    return time.monotonic() - started
