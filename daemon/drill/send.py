"""Step 2: one message to the sinkhole through a route's submission server, under one deadline."""

from __future__ import annotations

import asyncio
import contextlib
from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib

from daemon.config import Security, SmtpSettings
from daemon.drill.driver import DrillAbortedError
from daemon.roundtrip.tls import client_context, os_error_text


def drill_message(sender: str, recipient: str, message_id: str, drill_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = f"selfcheckd queue-persistence drill {drill_id}"
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = message_id
    msg["X-Selfcheckd-Drill"] = drill_id
    msg.set_content("A queue-persistence drill message for the sinkhole. It holds nothing.\n")
    return msg


async def send_message(settings: SmtpSettings, msg: EmailMessage, sender: str,
                       recipient: str, timeout: float) -> str:
    """Submit `msg`; the server's final reply (`250 2.0.0 <qid> Message accepted...`).

    Any failure is DrillAbortedError: the submission server is the environment, not the queue.
    """
    where = f"{settings.host}:{settings.port}"
    password = settings.password.get_secret_value() if settings.password else None
    client = aiosmtplib.SMTP(
        hostname=settings.host, port=settings.port,
        use_tls=settings.security is Security.TLS,
        start_tls=settings.security is Security.STARTTLS,
        tls_context=client_context(settings) if settings.security is not Security.NONE
        else None,
        local_hostname=settings.local_hostname, timeout=min(settings.timeout, timeout))
    try:
        async with asyncio.timeout(timeout):
            try:
                await client.connect()
                if password is not None:
                    await client.login(settings.username or "", password)
                _, reply = await client.send_message(msg, sender=sender,
                                                     recipients=[recipient])
            finally:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    async with asyncio.timeout(2):
                        await client.quit()
                client.close()
    except TimeoutError:
        raise DrillAbortedError(
            f"SMTP {where}: no complete transaction within {timeout:g}s") from None
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refusal = exc.recipients[0] if exc.recipients else None
        detail = f"{refusal.code} {refusal.message}" if refusal else "refused"
        raise DrillAbortedError(f"SMTP {where}: recipient refused: {detail}") from None
    except aiosmtplib.SMTPResponseException as exc:
        raise DrillAbortedError(f"SMTP {where}: server said {exc.code} {exc.message}") from None
    except aiosmtplib.SMTPException as exc:
        raise DrillAbortedError(f"SMTP {where}: {exc}") from None
    except OSError as exc:
        raise DrillAbortedError(f"SMTP {where}: {os_error_text(exc)}") from None
    return str(reply)
