"""Looking for a run's probe in the junk mailboxes, without slowing the watched one down.

The watched mailbox keeps its own connection, IDLEing (or polling) as before;
junk mailboxes are searched on a second connection, opened only when the probe
has not shown up after `JUNK_FIRST_LOOK` seconds. A healthy route whose probe
lands within that time never opens it. Looks follow at doubling intervals
(2 s, 4 s, 8 s ... after SMTP acceptance) and one more at the reception
deadline, so a probe misfiled by a slow filter is still found before the run
calls it lost. The last look may take `JUNK_FINAL_GRACE` seconds past the
deadline; what it cannot finish by then is abandoned and the run is a timeout.

Which mailboxes: `imap.junk_mailboxes` when set; otherwise those the server
flags `\\Junk` (RFC 6154 SPECIAL-USE, asked with `LIST ... RETURN
(SPECIAL-USE)` when offered) plus any named "Junk" or "Spam", listed at the
first and the last look, and at every look while none was found (a filter may
create its Junk with the first message it files). A look that fails (a server
error, a configured junk mailbox that does not exist) is recorded as a
`junk_look` step or skipped; it never fails the run.

A message counts as found only if `is_own_probe` proves it is this run's probe,
so decoys in a junk mailbox are never touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from daemon.config import ImapSettings
from daemon.roundtrip.imap_client import ImapError, ImapSession, Mailbox, decode_mailbox_name
from daemon.roundtrip.probe import is_own_probe

log = structlog.get_logger("daemon.roundtrip")

# Seconds after SMTP acceptance of the first look; each later one waits twice as long.
JUNK_FIRST_LOOK = 2.0
# Seconds past the reception deadline the last look may take.
JUNK_FINAL_GRACE = 5.0
# Looked for by name when the server flags none (compared case-insensitively).
JUNK_NAMES = frozenset({"junk", "spam"})
_UNSELECTABLE = frozenset({"\\noselect", "\\nonexistent"})

StepRecorder = Callable[[str, float, bool, str], None]


@dataclass(frozen=True)
class JunkHit:
    """This run's probe, found in a junk mailbox."""

    mailbox: str  # as the server spells it (for SELECT)
    uid: int
    raw: bytes

    @property
    def display_name(self) -> str:
        return decode_mailbox_name(self.mailbox)


def junk_mailboxes(listed: list[Mailbox], watched: str) -> list[str]:
    """The junk mailboxes among `listed`: flagged `\\Junk`, or named Junk or Spam."""
    out = []
    for mailbox in listed:
        if mailbox.attributes & _UNSELECTABLE or _same_mailbox(mailbox.name, watched):
            continue
        if "\\junk" in mailbox.attributes or mailbox.name.lower() in JUNK_NAMES:
            out.append(mailbox.name)
    return out


def _same_mailbox(a: str, b: str) -> bool:
    return a == b or a.upper() == b.upper() == "INBOX"


class JunkWatch:
    """Looks for one run's probe in the junk mailboxes, on a connection of its own."""

    def __init__(
        self, settings: ImapSettings, *, secret: bytes, route: str, run_id: str,
        clock: Callable[[], float], record: StepRecorder, first_look: float = JUNK_FIRST_LOOK,
    ) -> None:
        self.settings = settings
        self.secret, self.route, self.run_id = secret, route, run_id
        self.clock = clock
        self.record = record
        self.first_look = first_look
        self.session: ImapSession | None = None
        self._names: list[str] | None = (
            list(settings.junk_mailboxes) if settings.junk_mailboxes is not None else None)

    @property
    def enabled(self) -> bool:
        return self.settings.junk_mailboxes != []

    async def watch(self, accepted_at: float, deadline: float) -> JunkHit | None:
        """Look at the doubling times after `accepted_at` and at `deadline`; the first hit."""
        wait = self.first_look
        first = True
        while True:
            at = min(accepted_at + wait, deadline)
            await asyncio.sleep(max(at - self.clock(), 0.0))
            final = at >= deadline
            until = deadline + JUNK_FINAL_GRACE if final else deadline
            hit = await self.look(until, discover=first or final)
            if hit is not None or final:
                return hit
            first = False
            wait *= 2

    async def look(self, until: float, discover: bool) -> JunkHit | None:
        """One look in every junk mailbox; a failure is recorded as a step, never raised."""
        started = self.clock()
        try:
            # Bounds the connect and login too, which `until` does not reach.
            async with asyncio.timeout(max(until - self.clock(), 0.0)):
                hit, names = await self._look(until, discover)
        except TimeoutError:
            self.record("junk_look", started, False, "no answer before the reception deadline")
            await self._drop()
            return None
        except ImapError as exc:
            self.record("junk_look", started, False, str(exc))
            if self.session is not None and not self.session.usable:
                await self._drop()
            return None
        if hit is not None:
            self.record("junk_look", started, True, f"found in {hit.display_name}")
        else:
            looked = ", ".join(decode_mailbox_name(n) for n in names) or "no junk mailbox"
            self.record("junk_look", started, True, f"not in {looked}")
        return hit

    async def _look(self, until: float, discover: bool) -> tuple[JunkHit | None, list[str]]:
        session = await self._session()
        if self.settings.junk_mailboxes is None and (discover or not self._names):
            self._names = junk_mailboxes(await session.list_mailboxes(until),
                                         self.settings.mailbox)
        names = self._names or []
        for name in names:
            try:
                await session.select(name, until)
            except ImapError as exc:
                if not session.usable:
                    raise
                # A configured junk mailbox that does not exist (yet): the others still count.
                log.debug("selfcheck_junk_mailbox_unreadable", route=self.route, error=str(exc))
                continue
            candidates = await session.search_probe(self.run_id, until)
            if not candidates:
                continue
            for message in await session.fetch_many(candidates, "BODY.PEEK[]"):
                if is_own_probe(message.data, secret=self.secret, route=self.route,
                                run_id=self.run_id):
                    return JunkHit(name, message.uid, message.data), names
        return None, names

    async def _session(self) -> ImapSession:
        if self.session is not None and self.session.usable:
            return self.session
        await self._drop()
        self.session = ImapSession(self.settings, clock=self.clock)
        await self.session.connect(select=False)
        return self.session

    async def _drop(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.drop()

    async def sweep(self, sweep_selected: Callable[[ImapSession], Awaitable[int]]) -> int:
        """Run `sweep_selected` (the late sweep) in each junk mailbox; the total it deleted."""
        session = await self._session()
        if self.settings.junk_mailboxes is None:
            self._names = junk_mailboxes(await session.list_mailboxes(), self.settings.mailbox)
        total = 0
        for name in self._names or []:
            try:
                await session.select(name)
            except ImapError:
                if not session.usable:
                    raise
                continue  # a configured junk mailbox that does not exist
            total += await sweep_selected(session)
        return total

    async def delete(self, hit: JunkHit) -> int:
        """Delete this run's probe from the junk mailbox it landed in (a fresh connection if
        the watch's own is gone); the number deleted."""
        session = await self._session()
        if session.selected != hit.mailbox:
            await session.select(hit.mailbox)
        candidates = await session.search_probe(self.run_id)
        if not candidates:
            return 0
        fetched = await session.fetch_many(candidates, "BODY.PEEK[]")
        own = [m.uid for m in fetched if is_own_probe(
            m.data, secret=self.secret, route=self.route, run_id=self.run_id)]
        await session.delete(own)
        return len(own)

    async def close(self, polite: bool) -> None:
        """Log out (when `polite` and the session is healthy) or drop the connection."""
        session, self.session = self.session, None
        if session is None:
            return
        if polite and session.usable:
            await session.close()
        else:
            await session.drop()
