"""The dns component in `selfcheckd run`: schedule, metrics, /status, ips_from_route, health."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.app import Daemon
from daemon.checks.result import CheckResult, Hop
from daemon.config import load_config
from daemon.dns.component import DnsChecks
from daemon.dns.config import DnsEntry
from daemon.dns.mta_sts import PolicyFetcher
from daemon.dns.run import sending_ips
from daemon.dns.verdict import EntryResult, error, ok, problem
from daemon.embedded.stack import EmbeddedMailStack
from daemon.metrics import Metrics
from tests.dnschecks.nsd import Blackhole, NsdLab
from tests.dnschecks.world import GOOD_IP, LISTED_IP, SELECTOR
from tests.fake_time import FakeClock
from tests.test_daemon import get, samples
from tests.test_daemon_supervision import toml_route
from tests.waiting import until

SERVER = '[server]\nlisten = "127.0.0.1:0"\n'
# What a submission server and an outbound MTA (public address 203.0.113.7) stamped on
# the probe before the receiving server did.
EARLIER_HOPS = (
    b"Received: from mail.good.test (mail.good.test [203.0.113.7])\r\n"
    b"\tby mx.receiver.test with ESMTPS id R2; Mon, 7 Dec 2026 12:00:02 +0000\r\n"
    b"Received: from selfcheckd (ip-10-0-2-9 [10.0.2.9])\r\n"
    b"\tby submission.internal with ESMTPSA id R1; Mon, 7 Dec 2026 12:00:01 +0000\r\n")


def dns_toml(nsd: NsdLab, name: str, domain: str, **keys: Any) -> str:
    lines = ["[[dns]]", f'name = "{name}"', f'domain = "{domain}"',
             f'nameservers = ["{nsd.nameserver}"]', "timeout = 2.0", "deadline = 10.0"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
async def started() -> AsyncIterator[list[Daemon]]:
    """Daemons started by the test, shut down at its end whatever happened."""
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        await daemon.shutdown()


async def start(daemons: list[Daemon], path: Path, **kwargs: Any) -> Daemon:
    daemon = Daemon(load_config(path, {}), path, **kwargs)
    daemons.append(daemon)
    await daemon.start()
    return daemon


async def test_a_config_of_only_dns_entries_runs_them_at_once_and_every_interval(
        nsd: NsdLab, tmp_path: Path, started: list[Daemon],
        policy_server: PolicyFetcher) -> None:
    """No route, no leak watcher: valid. The first run starts at once, the next 1 s later."""
    path = tmp_path / "c.toml"
    path.write_text(SERVER + dns_toml(nsd, "good", "good.test", interval=1,
                                      sending_ips=[GOOD_IP, LISTED_IP],
                                      dkim_selectors=[SELECTOR],
                                      blocklists=["bl.test", "refused.test"]))
    clock = FakeClock()
    daemon = await start(started, path, clock=clock, sleep=clock.sleep,
                         policy_fetcher=policy_server)
    assert daemon.dns is not None
    await until(lambda: "good" in daemon.dns.results)  # no time passed: at once
    first = daemon.dns.results["good"]
    await clock.advance(0.9)
    assert daemon.dns.results["good"] is first
    await clock.advance(0.1)
    await until(lambda: daemon.dns.results["good"] is not first)

    series = samples((await get(daemon.listen_port, "/metrics"))[1])
    assert series[("selfcheck_dns_ok", (("item", "spf"), ("name", "good")))] == 0  # .66 fails
    assert series[("selfcheck_dns_ok", (("item", "mx"), ("name", "good")))] == 1
    assert series[("selfcheck_dnsbl_listed", (("ip", LISTED_IP), ("zone", "bl.test")))] == 1
    assert series[("selfcheck_dnsbl_listed", (("ip", GOOD_IP), ("zone", "bl.test")))] == 0
    # 127.255.255.254: undecided, so no listed series and no ok series; counted as errors.
    refused = f"blocklist/refused.test/{GOOD_IP}"
    assert ("selfcheck_dnsbl_listed", (("ip", GOOD_IP), ("zone", "refused.test"))) \
        not in series
    assert ("selfcheck_dns_ok", (("item", refused), ("name", "good"))) not in series
    assert series[("selfcheck_dns_check_errors_total",
                   (("item", refused), ("name", "good")))] == 2
    assert series[("selfcheck_dns_error_since_timestamp_seconds",
                   (("item", refused), ("name", "good")))] > 0
    assert series[("selfcheck_dns_last_run_timestamp_seconds", (("name", "good"),))] > 0

    _status, text = await get(daemon.listen_port, "/status")
    body = json.loads(text)
    items = {i["item"]: i for i in body["dns"]["good"]["last_run"]["items"]}
    assert items["spf"]["verdict"] == "problem" and LISTED_IP in items["spf"]["reason"]
    assert items[refused]["verdict"] == "error"
    assert items[refused]["reason"].startswith("blocklist unusable from this resolver")
    assert all(i["reason"] for i in items.values())
    assert body["config"]["dns"] == ["good"]
    assert body["components"]["dns"]["up"] is True


async def test_a_dns_entry_learns_its_ip_from_the_routes_received_hops(
        nsd: NsdLab, tmp_path: Path, started: list[Daemon], mail_stack: EmbeddedMailStack,
) -> None:
    """The probe passed a relay that handed it on from 203.0.113.7: that IP is checked, and
    the entry runs again as soon as the route reports it (not an interval later)."""

    def relayed(data: bytes) -> bytes:
        # Below the receiving server's own Received header: the hops before it, as a
        # submission server and an outbound MTA would have stamped them.
        end = re.search(rb"\r\n(?![ \t])", data)
        assert end is not None
        return data[:end.end()] + EARLIER_HOPS + data[end.end():]

    mail_stack.smtp.mutate = relayed
    path = tmp_path / "c.toml"
    path.write_text('[selfcheck]\ninterval = 3600\ntimeout = 10\nsecret = "s"\n'
                    + toml_route("default", mail_stack) + SERVER
                    + dns_toml(nsd, "good", "good.test", ips_from_route="default"))
    daemon = await start(started, path)
    assert daemon.dns is not None
    await until(lambda: f"ptr/{GOOD_IP}" in {
        i.item for i in getattr(daemon.dns.results.get("good"), "items", [])}, timeout=20)
    items = {i.item: i for i in daemon.dns.results["good"].items}
    assert items["route-ip"].verdict == "ok"
    assert items["route-ip"].details["by"] == "mx.receiver.test"
    assert items[f"ptr/{GOOD_IP}"].verdict == "ok"
    assert f"pass for {GOOD_IP}" in items["spf"].reason
    status = json.loads((await get(daemon.listen_port, "/status"))[1])
    assert status["dns"]["good"]["route_ip"]["ip"] == GOOD_IP


async def test_no_answer_at_all_degrades_the_component_not_the_daemon(
        blackhole: Blackhole, tmp_path: Path, started: list[Daemon]) -> None:
    """Every item undecided: /healthz stays 200 and names dns as degraded, with why."""
    path = tmp_path / "c.toml"
    path.write_text(SERVER + "[[dns]]\ndomain = \"good.test\"\ntimeout = 0.3\ndeadline = 1\n"
                    f'nameservers = ["{blackhole.nameserver}"]\n')
    daemon = await start(started, path)
    await until(lambda: "dns" in daemon.degraded(), timeout=10)
    status, text = await get(daemon.listen_port, "/healthz")
    assert status == 200
    assert "dns" in json.loads(text)["degraded"]
    assert "no item could be decided" in daemon.degraded()["dns"]
    series = samples((await get(daemon.listen_port, "/metrics"))[1])
    assert series[("selfcheckd_component_degraded",
                   (("component", "dns"), ("reason", "dns_unanswered")))] == 1


async def test_shutdown_cancels_a_dns_run_in_flight_within_the_budget(
        blackhole: Blackhole, tmp_path: Path, started: list[Daemon]) -> None:
    """A run waiting on a silent nameserver does not hold up the stop."""
    path = tmp_path / "c.toml"
    path.write_text("shutdown_grace = 2\n" + SERVER + "[[dns]]\ndomain = \"good.test\"\n"
                    f'timeout = 30\ndeadline = 60\nnameservers = ["{blackhole.nameserver}"]\n')
    daemon = await start(started, path)
    assert daemon.dns is not None
    await until(lambda: "good.test" in daemon.dns.scheduler.running)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await daemon.shutdown()
    assert loop.time() - began < 2 + 2.5
    assert daemon.dns.scheduler.running == {}
    assert "good.test" not in daemon.dns.results  # cut short: no verdict recorded


async def test_reload_adds_changes_and_removes_dns_entries(
        nsd: NsdLab, tmp_path: Path, started: list[Daemon]) -> None:
    """Entries come and go with SIGHUP; a removed one leaves no series; the last one
    removed stops the component."""
    path = tmp_path / "c.toml"
    path.write_text(SERVER + dns_toml(nsd, "plain", "plain.test"))
    daemon = await start(started, path)
    assert daemon.dns is not None
    await until(lambda: "plain" in daemon.dns.results)
    path.write_text(SERVER + dns_toml(nsd, "plain", "plain.test")
                    + dns_toml(nsd, "nodmarc", "nodmarc.test"))
    assert await daemon.reload() is True
    await until(lambda: "nodmarc" in daemon.dns.results)
    path.write_text(SERVER + dns_toml(nsd, "nodmarc", "nodmarc.test", sending_ips=[GOOD_IP]))
    assert await daemon.reload() is True
    # Changed: it runs again at once (not an hour later), with its new item.
    await until(lambda: f"ptr/{GOOD_IP}" in {i.item for i in daemon.dns.results["nodmarc"].items})
    text = (await get(daemon.listen_port, "/metrics"))[1]
    assert 'name="plain"' not in text and 'name="nodmarc"' in text
    path.write_text(SERVER + '[leakwatch]\nsource = "file"\n'
                    f'[leakwatch.file]\npath = "{tmp_path / "maillog"}"\n')
    (tmp_path / "maillog").write_text("")
    assert await daemon.reload() is True
    assert daemon.dns is None
    assert "dns" not in daemon.supervisor.names()
    assert 'name="nodmarc"' not in (await get(daemon.listen_port, "/metrics"))[1]


# -- metrics from verdicts (no DNS needed) ---------------------------------------------------

def entry_result(*items: Any) -> EntryResult:
    return EntryResult("e", "example.test", started_at=1.0, finished_at=2.0, items=list(items))


def value(metrics: Metrics, metric: str, **labels: str) -> float | None:
    got: float | None = metrics.registry.get_sample_value(metric, labels)
    return got


def test_error_since_marks_the_start_of_an_undecided_streak() -> None:
    """An item's error_since stays at the first error of a streak and goes with a verdict;
    its ok series is absent meanwhile and each error is counted."""
    metrics = Metrics()
    times = iter([100.0, 200.0, 300.0, 400.0])
    dns = DnsChecks([], metrics, wall=lambda: next(times))
    dns.record(entry_result(ok("spf", "fine")))
    assert value(metrics, "selfcheck_dns_ok", name="e", item="spf") == 1
    dns.record(entry_result(error("spf", "timeout")))
    dns.record(entry_result(error("spf", "timeout")))
    assert value(metrics, "selfcheck_dns_ok", name="e", item="spf") is None
    assert value(metrics, "selfcheck_dns_check_errors_total", name="e", item="spf") == 2
    assert value(metrics, "selfcheck_dns_error_since_timestamp_seconds",
                 name="e", item="spf") == 100.0
    dns.record(entry_result(problem("spf", "broken")))
    assert value(metrics, "selfcheck_dns_ok", name="e", item="spf") == 0
    assert value(metrics, "selfcheck_dns_error_since_timestamp_seconds",
                 name="e", item="spf") is None


def test_dnsbl_listed_is_absent_while_undecided_and_gone_with_its_item() -> None:
    """Listed 1, clean 0, an error removes the series, an item no longer checked too."""
    metrics = Metrics()
    dns = DnsChecks([], metrics)
    item = "blocklist/bl.test/192.0.2.1"
    facts = {"ip": "192.0.2.1", "zone": "bl.test"}
    dns.record(entry_result(problem(item, "listed", listed=True, **facts)))
    assert value(metrics, "selfcheck_dnsbl_listed", ip="192.0.2.1", zone="bl.test") == 1
    dns.record(entry_result(ok(item, "clean", listed=False, **facts)))
    assert value(metrics, "selfcheck_dnsbl_listed", ip="192.0.2.1", zone="bl.test") == 0
    dns.record(entry_result(error(item, "no answer", **facts)))
    assert value(metrics, "selfcheck_dnsbl_listed", ip="192.0.2.1", zone="bl.test") is None
    dns.record(entry_result(ok(item, "clean", listed=False, **facts)))
    dns.record(entry_result(ok("spf", "fine")))  # the IP is no longer checked
    assert value(metrics, "selfcheck_dnsbl_listed", ip="192.0.2.1", zone="bl.test") is None
    assert value(metrics, "selfcheck_dns_ok", name="e", item=item) is None


def test_a_probe_that_never_left_the_network_says_why_no_ip_is_known() -> None:
    """Only internal hops: route-ip is an error naming the run, not a stale or made-up IP;
    a failed run (probe not read) changes nothing."""
    entry = DnsEntry.model_validate({"domain": "example.test", "ips_from_route": "default"})
    dns = DnsChecks([entry], Metrics())
    internal = [Hop(from_host="sc", from_ip=ip, by="mx", with_="ESMTP", timestamp=None,
                    delay=None) for ip in ("10.0.2.9", "127.0.0.1")]
    dns.route_result(CheckResult(route="default", run_id="r1", hops=internal))
    dns.route_result(CheckResult(route="default", run_id="r2", hops=None))
    ips, item = sending_ips(entry, dns.route_ips["default"])
    assert ips == []
    assert item is not None and item.verdict == "error"
    assert "route default (run r1) came through no external address" in item.reason
