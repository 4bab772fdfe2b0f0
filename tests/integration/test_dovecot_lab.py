"""The Dovecot lab: a message submitted to the real MTA lands in Dovecot over LMTP."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import secrets
import ssl
from email.message import EmailMessage

import aioimaplib
import aiosmtplib
import pytest

from .dovecot_lab import DovecotLab

DEADLINE = 30.0


async def wait_for_count(lab: DovecotLab, expected: int) -> None:
    async with asyncio.timeout(DEADLINE):
        while await asyncio.to_thread(lab.message_count) != expected:
            await asyncio.sleep(0.1)


async def test_message_travels_mta_to_dovecot_and_is_deleted(dovecot_lab: DovecotLab) -> None:
    """aiosmtplib -> sendmail -> LMTP -> Dovecot; read, counted and deleted over verified imaps."""
    lab = dovecot_lab
    message_id = f"<smoke-{secrets.token_hex(8)}@lab.test>"
    msg = EmailMessage()
    msg["From"] = lab.sender
    msg["To"] = lab.recipient
    msg["Subject"] = "integration smoke"
    msg["Message-ID"] = message_id
    msg.set_content("hello through a real MTA\n")
    async with asyncio.timeout(DEADLINE):
        await aiosmtplib.send(
            msg, hostname=lab.smtp_host, port=lab.smtp_port, start_tls=False,
            local_hostname="client.lab.test", timeout=10,
        )
    await wait_for_count(lab, 1)
    assert lab.header_values("Message-ID") == [message_id]

    context = ssl.create_default_context(cafile=str(lab.ca_file))
    imap = aioimaplib.IMAP4_SSL(
        host=lab.imap_host, port=lab.imaps_port, ssl_context=context, timeout=10
    )
    async with asyncio.timeout(DEADLINE):
        await imap.wait_hello_from_server()
        assert (await imap.login(lab.username, lab.password)).result == "OK"
        assert (await imap.select("INBOX")).result == "OK"
        found = await imap.uid_search(f'HEADER Message-ID "{message_id}"')
        uids = found.lines[0].decode().split()
        assert len(uids) == 1
        stored = await imap.uid("store", uids[0], "+FLAGS.SILENT", r"(\Deleted)")
        assert stored.result == "OK"
        assert (await imap.expunge()).result == "OK"
        await imap.logout()
    await wait_for_count(lab, 0)
    assert lab.message_files() == []


async def test_imap_starttls_verifies_against_lab_ca(dovecot_lab: DovecotLab) -> None:
    """Port imap_port offers STARTTLS with a cert the lab CA verifies, for 127.0.0.1."""
    lab = dovecot_lab

    def login_over_starttls(context: ssl.SSLContext) -> str:
        imap = imaplib.IMAP4(lab.imap_host, lab.imap_port, timeout=10)
        try:
            assert "STARTTLS" in imap.capabilities
            imap.starttls(ssl_context=context)
            status, _ = imap.login(lab.username, lab.password)
            imap.logout()
            return status
        finally:
            with contextlib.suppress(OSError):  # the failed handshake already closed it
                imap.shutdown()

    trusted = ssl.create_default_context(cafile=str(lab.ca_file))
    assert await asyncio.to_thread(login_over_starttls, trusted) == "OK"
    untrusted = ssl.create_default_context()  # system CAs only: must refuse the lab cert
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(login_over_starttls, untrusted)
