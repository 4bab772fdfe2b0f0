"""The late sweep: delete a route's provable probes of earlier runs, a bounded batch at a time.

After a mail outage the watched mailbox can hold thousands of late probes, beside
probe-like messages that are never deleted (forged, another secret's, another
route's). A sweep looks at the route's candidates (an IMAP header search) newest
first, in batches of `SWEEP_BATCH`: their headers in one UID FETCH, then the bodies
of those that name exactly this route and are older than the run timeout, in
fetches of at most `MAX_FETCH_BYTES` declared bytes; each message that proves to be
ours (`is_own_probe`: the token verifies) is deleted with its batch.

It starts no batch once it has examined `SWEEP_MAX_PER_RUN` candidates or its time
(`until`, set by the run) is up: what is left is the next run's, so a run keeps
within its deadline and its own probe is still sent and found whatever the backlog.
Messages proven not to be ours for good (another route, too large, a token that
does not verify) are remembered in `NotOurs` per mailbox and UIDVALIDITY, so the
daemon's later runs skip them instead of downloading them again; one that is merely
too young to be late is looked at again next time.

Verifying costs about 0.7 ms a message (compat32 parsing); the event loop gets a
turn every `VERIFY_SLICE` messages, so a batch never holds it for long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon.roundtrip.imap_client import MAX_FETCH_BYTES, UID_CHUNK, Fetched, ImapSession
from daemon.roundtrip.probe import PROBE_HEADER, ROUTE_HEADER, is_own_probe, probe_headers

# Candidates per batch (one header UID FETCH).
SWEEP_BATCH = 250
# Candidates a run examines at most; the rest wait for the next run.
SWEEP_MAX_PER_RUN = 2000
# A probe is about 1.5 KB; a "candidate" far larger is not one (and is not downloaded).
MAX_PROBE_SIZE = 256 * 1024
# Messages verified between two turns of the event loop.
VERIFY_SLICE = 25
# UIDs remembered as not ours, over all mailboxes of a route (a few MB at most).
MAX_REMEMBERED = 50_000

HEADER_ITEMS = f"RFC822.SIZE BODY.PEEK[HEADER.FIELDS ({ROUTE_HEADER} {PROBE_HEADER} DATE)]"


class NotOurs:
    """UIDs proven not to be a route's probes, per mailbox and UIDVALIDITY (bounded).

    A UID names the same message for as long as the mailbox keeps its UIDVALIDITY,
    and a message never changes, so the proof holds until the UIDVALIDITY does.
    """

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._limit = limit
        self._known: dict[tuple[str, int], set[int]] = {}

    def __len__(self) -> int:
        return sum(len(uids) for uids in self._known.values())

    def known(self, mailbox: str | None, uidvalidity: int | None) -> set[int]:
        """The UIDs remembered for this mailbox (empty when either is unknown)."""
        if mailbox is None or uidvalidity is None:
            return set()
        for key in [k for k in self._known if k[0] == mailbox and k[1] != uidvalidity]:
            del self._known[key]  # the mailbox was recreated: its UIDs mean other messages
        return self._known.get((mailbox, uidvalidity), set())

    def remember(self, mailbox: str | None, uidvalidity: int | None, uids: Sequence[int]) -> None:
        if mailbox is None or uidvalidity is None or not uids:
            return
        room = self._limit - len(self)
        if room <= 0:
            return  # full: the rest are examined again, which costs time, not correctness
        self._known.setdefault((mailbox, uidvalidity), set()).update(uids[:room])


@dataclass
class SweepOutcome:
    deleted: int = 0  # late probes of this route, proven ours and deleted
    unverified: int = 0  # probe-like messages of this route newly proven not ours
    examined: int = 0  # candidates whose headers were read this time
    left: int = 0  # candidates left for the next run


async def sweep_late_probes(
    session: ImapSession, *, route: str, secret: bytes, timeout: float, not_ours: NotOurs,
    wall: Callable[[], float], clock: Callable[[], float], until: float,
    max_examined: int = SWEEP_MAX_PER_RUN,
) -> SweepOutcome:
    """Sweep the selected mailbox of `session` for `route`'s late probes (see module doc).

    `timeout` is the run timeout: only probes sent longer ago than that are late (a
    second instance's probe in flight is left alone). `until` is on `clock`.
    """
    outcome = SweepOutcome()
    mailbox, uidvalidity = session.selected, session.uidvalidity
    candidates = await session.search_route_probes(route)
    known = not_ours.known(mailbox, uidvalidity)
    todo = sorted((uid for uid in set(candidates) if uid not in known), reverse=True)
    for start in range(0, len(todo), SWEEP_BATCH):
        if outcome.examined >= max_examined or clock() >= until:
            outcome.left = len(todo) - start
            break
        batch = todo[start:start + min(SWEEP_BATCH, max_examined - outcome.examined)]
        outcome.examined += len(batch)
        found = await _judge(session, batch, route, secret, wall() - timeout)
        if found.late:
            await session.delete(found.late)
            outcome.deleted += len(found.late)
        outcome.unverified += len(found.unverified)
        not_ours.remember(mailbox, uidvalidity, found.not_probes + found.unverified)
    return outcome


@dataclass
class _Judged:
    late: list[int]  # late probes, proven ours
    unverified: list[int]  # probe headers of this route, old, and a token that does not verify
    not_probes: list[int]  # too large, or not exactly this route's probe headers


async def _judge(
    session: ImapSession, uids: list[int], route: str, secret: bytes, sent_before: float,
) -> _Judged:
    """Read `uids`' headers, then the bodies of those that may be late probes, and judge."""
    judged = _Judged([], [], [])
    stale: list[Fetched] = []
    for message in await session.fetch_many(uids, HEADER_ITEMS):
        headers = probe_headers(message.data, route)
        if (message.size is not None and message.size > MAX_PROBE_SIZE) or headers is None:
            judged.not_probes.append(message.uid)
        elif headers.sent_at < sent_before:
            stale.append(message)
        # else: too young to be late (maybe another instance's probe in flight): next time
    for group in _by_size(stale):
        bodies = await session.fetch_many([m.uid for m in group], "BODY.PEEK[]")
        for i, body in enumerate(bodies):
            if i and i % VERIFY_SLICE == 0:
                await asyncio.sleep(0)
            ours = is_own_probe(body.data, secret=secret, route=route)
            (judged.late if ours else judged.unverified).append(body.uid)
    return judged


def _by_size(messages: list[Fetched]) -> list[list[Fetched]]:
    """Groups to fetch whole: at most MAX_FETCH_BYTES declared and UID_CHUNK messages each."""
    groups: list[list[Fetched]] = []
    size = 0
    for message in messages:
        declared = message.size if message.size is not None else MAX_PROBE_SIZE
        if not groups or size + declared > MAX_FETCH_BYTES or len(groups[-1]) >= UID_CHUNK:
            groups.append([])
            size = 0
        groups[-1].append(message)
        size += declared
    return groups
