"""An SMTP sinkhole (default 127.0.0.2:25) whose answer for the sinkhole domain a test switches.

Modes: "defer" (421 to RCPT), "accept" (250, message discarded) and "bounce" (550 5.1.1 to
RCPT). Recipients outside the sinkhole domain (the DSNs sendmail sends back to senders) are
always accepted, so a bounce never turns into a double bounce or a DNS lookup.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from aiosmtpd.controller import Controller

Mode = Literal["defer", "accept", "bounce"]

SINKHOLE_HOST = "127.0.0.2"
SINKHOLE_PORT = 25  # the leak lab's sendmail dials 25 (the cluster's tasks dial any port)
DEFER_REPLY = "421 4.3.2 Service temporarily unavailable"
BOUNCE_REPLY = "550 5.1.1 User unknown"
ACCEPT_REPLY = "250 2.0.0 Message accepted for discard"
STALL_LIMIT = 60.0


@dataclass(frozen=True)
class Received:
    """One message the sinkhole accepted."""

    sender: str
    recipients: tuple[str, ...]


@dataclass
class SinkholeHandler:
    """aiosmtpd handler: answers per the current mode and records what it accepted."""

    domain: str
    mode: Mode = "accept"
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # While set, RCPT for the sinkhole domain waits (at most STALL_LIMIT): the delivering
    # queue runner holds the message's lock meanwhile. `waiting` counts them.
    stall: threading.Event = field(default_factory=threading.Event)
    waiting: int = 0

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address.rpartition("@")[2].lower() == self.domain:
            if self.stall.is_set():
                self.waiting += 1
                deadline = time.monotonic() + STALL_LIMIT
                while self.stall.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                self.waiting -= 1
            if self.mode == "defer":
                return DEFER_REPLY
            if self.mode == "bounce":
                return BOUNCE_REPLY
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        with self.lock:
            self.received.append(Received(envelope.mail_from, tuple(envelope.rcpt_tos)))
        return ACCEPT_REPLY


class Sinkhole:
    """The sinkhole server, running in aiosmtpd's own thread and event loop."""

    def __init__(self, domain: str, host: str = SINKHOLE_HOST, port: int = SINKHOLE_PORT) -> None:
        self.handler = SinkholeHandler(domain=domain.lower())
        self.host = host
        self.port = port
        self._controller = Controller(
            self.handler,
            hostname=host,
            port=port,
            server_hostname="sinkhole.lab.test",
            ready_timeout=10,
        )

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def set_mode(self, mode: Mode) -> None:
        """Switch how the sinkhole answers the sinkhole domain's recipients from now on."""
        self.handler.mode = mode

    @contextmanager
    def stalled(self) -> Iterator[None]:
        """Hold every RCPT for the sinkhole domain until the block ends."""
        self.handler.stall.set()
        try:
            yield
        finally:
            self.handler.stall.clear()

    def waiting(self) -> int:
        """How many RCPTs the stall holds now."""
        return self.handler.waiting

    def received(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)
