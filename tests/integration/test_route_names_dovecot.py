"""A route named beyond ASCII (`défaut`) against Dovecot behind sendmail."""

from __future__ import annotations

from typing import Any

from daemon.checks.base import CheckRun
from daemon.checks.result import CheckResult
from daemon.checks.runner import Runner
from daemon.roundtrip.check import RoundTrip
from tests.conftest import make_config
from tests.integration.dovecot_lab import DovecotLab
from tests.integration.test_roundtrip_dovecot import SECRET, route_for
from tests.probe_backlog import forged, probes


class SeenBeforeCleanup:
    """A `RoundTrip` that notes the route headers in the mailbox before its cleanup."""

    def __init__(self, inner: RoundTrip, lab: DovecotLab) -> None:
        self.inner, self.lab = inner, lab
        self.name, self.kind = inner.name, inner.kind
        self.deadline, self.cleanup_timeout = inner.deadline, inner.cleanup_timeout
        self.route_headers: list[str] = []

    def start(self, result: CheckResult) -> CheckRun:
        run, outer = self.inner.start(result), self

        class Run:
            async def run(self) -> None:
                await run.run()

            async def cleanup(self) -> None:
                outer.route_headers = outer.lab.header_values("X-Selfcheck-Route")
                await run.cleanup()

        return Run()


async def test_dovecot_route_named_beyond_ascii_carries_and_searches_it_7bit(
    dovecot_lab: DovecotLab,
) -> None:
    """`défaut` through sendmail into Dovecot: the probe Dovecot holds carries
    X-Selfcheck-Route d%C3%A9faut as sent (the form the sweep searches for, where an RFC
    2047 word would be searched decoded), the route's late probe is swept, and `défaut-eu`'s
    late probe and a forgery naming the route stay."""
    dovecot_lab.delete_all()
    recipient = {"sender": dovecot_lab.sender, "recipient": dovecot_lab.recipient}
    late = probes(1, secret=SECRET, route="défaut", **recipient)
    others = (probes(1, secret=SECRET, route="défaut-eu", **recipient)
              + forged(1, route="d%C3%A9faut", recipient=dovecot_lab.recipient))
    dovecot_lab.deliver_files(late + others)
    route: dict[str, Any] = route_for(dovecot_lab)
    route["name"] = "défaut"
    cfg = make_config(route, timeout=30.0)
    check = SeenBeforeCleanup(RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET),
                              dovecot_lab)
    result = await Runner().execute(check)
    assert result.success, result.error
    assert result.late_arrivals == 1
    assert sorted(check.route_headers) == ["d%C3%A9faut", "d%C3%A9faut", "d%C3%A9faut-eu"]
    assert sorted(dovecot_lab.header_values("X-Selfcheck-Route")) == [
        "d%C3%A9faut", "d%C3%A9faut-eu"]
    dovecot_lab.delete_all()
