"""DNS tier fixtures: a real NSD (and Knot) serving the test zones, a blackhole, an MTA-STS
HTTPS server.

NSD and Knot come from Debian (scripts/install-system-deps). Without them
these tests skip, except under CI=true, where they fail: there the packages
must be installed.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from daemon.dns.config import DnsEntry
from daemon.dns.mta_sts import PolicyFetcher
from tests.dnschecks.knot import KnotLab
from tests.dnschecks.nsd import Blackhole, NsdLab
from tests.dnschecks.world import AS_HTML, CERT_HOSTS, POLICIES, REDIRECTING, zones
from tests.integration.support import require_binaries


@pytest.fixture(scope="session")
def nsd() -> Iterator[NsdLab]:
    """NSD on a loopback port, serving every zone of tests/dnschecks/world.py."""
    require_binaries("nsd")
    directory = Path(tempfile.mkdtemp(prefix="selfcheckd-nsd-"))
    lab = NsdLab.start(directory, zones())
    yield lab
    lab.stop()
    if os.environ.get("SELFCHECKD_KEEP_LABS") != "1":
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def knot() -> Iterator[KnotLab]:
    """Knot DNS on a loopback port, serving the same zones as `nsd` (it answers a CNAME
    into another zone with the CNAME alone, as BIND does)."""
    require_binaries("knotd")
    directory = Path(tempfile.mkdtemp(prefix="selfcheckd-knot-"))
    lab = KnotLab.start(directory, zones())
    yield lab
    lab.stop()
    if os.environ.get("SELFCHECKD_KEEP_LABS") != "1":
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def blackhole() -> Iterator[Blackhole]:
    """A nameserver that reads every query and answers none."""
    hole = Blackhole()
    yield hole
    hole.close()


EntryFactory = Callable[..., DnsEntry]


@pytest.fixture
def make_entry(nsd: NsdLab) -> EntryFactory:
    """A validated [[dns]] entry asking the tests' NSD (keys as in the TOML)."""

    def build(domain: str, **keys: Any) -> DnsEntry:
        table = {"domain": domain, "nameservers": [nsd.nameserver], "timeout": 2.0,
                 "deadline": 10.0, **keys}
        return DnsEntry.model_validate(table)

    return build


@pytest.fixture
async def policy_server(test_ca: trustme.CA) -> AsyncIterator[PolicyFetcher]:
    """HTTPS on a loopback port serving the MTA-STS policies of world.POLICIES with a
    certificate from the tests' CA; the fetcher it returns trusts that CA only."""

    async def policy(request: web.Request) -> web.Response:
        host = request.host.partition(":")[0]
        if host == AS_HTML:
            return web.Response(text=POLICIES["mta-sts.good.test"], content_type="text/html")
        if host == REDIRECTING:
            raise web.HTTPMovedPermanently("https://mta-sts.good.test/.well-known/mta-sts.txt")
        text = POLICIES.get(host)
        if text is None:
            return web.Response(status=404, text="no policy here")
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/.well-known/mta-sts.txt", policy)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert(*CERT_HOSTS).configure_cert(context)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    client = ssl.create_default_context()
    test_ca.configure_trust(client)
    yield PolicyFetcher(port=port, ssl_context=client)
    await runner.cleanup()
