"""deploy/prometheus: the alert rules, their promtool unit tests, and the scrape job."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promql import exported_series_names, our_metric_names, run_promtool

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
UNIT_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))
ALERTING_DOC = ROOT / "docs" / "alerting.md"
RUNBOOKS = sorted((ROOT / "docs" / "runbooks").glob("*.md"))
_MD_LINK = re.compile(r"\]\(([^)\s]+)\)")

EXPECTED_ALERTS = {
    "SelfcheckFailing", "SelfcheckStale", "SelfcheckSlow", "SelfcheckAbsent",
    "SinkholeRecipientLeaked", "LeakWatcherBlind", "LeakWatcherDown",
    "SinkholeLeftInAcceptMode",
    # delivery quality: the TLS certificates of each route's servers.
    "SelfcheckCertificateExpiring",
    # selfcheckd watching itself: supervision, state file, escaped errors, alert outbox.
    "SelfcheckdComponentDown", "SelfcheckdComponentStalled", "SelfcheckdComponentRestarted",
    "SelfcheckdComponentMissing", "SelfcheckdStateSaveFailing", "SelfcheckdInternalErrors",
    # the state file's size bound: entries left out of a save.
    "SelfcheckdStateShed",
    "SelfcheckdAlertDeliveryFailing", "SelfcheckdAlertExpired",
    # a configuration reload that was refused (the old one still in force).
    "SelfcheckdConfigReloadRejected",
    # queue health from the mail log: stuck deferred mail, bounces.
    "MtaMessageDeferredTooLong", "MtaBounceRatioHigh",
    # the scheduled queue-persistence drill.
    "SelfcheckDrillFailed", "SelfcheckDrillNotPassed",
    # DNS and sending reputation: the [[dns]] entries' verdicts.
    "SendingIpBlocklisted", "MailAuthDnsBroken", "SendingIpReverseDnsBroken",
    "MtaStsPolicyBroken", "MailMxBroken", "DnsCheckUndecided",
    # the shared queue: mail nobody retries, perms desynced, lock-contention storms.
    "MtaDeferredMessageSilent", "MtaQueuePermissionErrors", "MtaQueueLockStorm",
    # two tasks, one leader ([ha]): none, two, and a task that cannot reach the lease.
    "SelfcheckdNoLeader", "SelfcheckdTwoLeaders", "SelfcheckdLeaseErrors",
}
# The severities alert_sink routes on.
SEVERITIES = {"critical", "warning", "info"}
# A row of docs/alerting.md's severity table: | `<severity>` | meaning | `Alert`, ... |
_SEVERITY_ROW = re.compile(
    r"^\| `(" + "|".join(sorted(SEVERITIES)) + r")` \|[^|]*\|(.*)\|$", re.MULTILINE
)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def unit_test_cases() -> list[dict[str, Any]]:
    """Every (alertname, exp_alerts) case across deploy/prometheus/tests/*.yml."""
    cases = []
    for path in UNIT_TESTS:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["rule_files"] == ["../alerts.yml"], path.name
        for test in doc["tests"]:
            cases.extend(test.get("alert_rule_test", []))
    return cases


def test_the_expected_alerts_exist_once_each() -> None:
    """Exactly the documented alert names, none duplicated (runbooks and routing use them)."""
    names = [r["alert"] for r in alert_rules()]
    assert sorted(names) == sorted(EXPECTED_ALERTS)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_has_severity_runbook_and_text(rule: dict[str, Any]) -> None:
    """Each alert has an alert_sink severity, an existing runbook, a summary and a description."""
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    runbook = f"docs/runbooks/{rule['alert']}.md"
    assert annotations["runbook_url"].endswith("/" + runbook)
    assert (ROOT / runbook).is_file(), f"missing runbook {runbook}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_runbook_title_names_the_alert_and_its_severity(rule: dict[str, Any]) -> None:
    """A runbook opens with `# <alert> (<severity>)`, as the label says."""
    runbook = ROOT / "docs" / "runbooks" / f"{rule['alert']}.md"
    first = runbook.read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# {rule['alert']} ({rule['labels']['severity']})"


def test_alerting_doc_severity_table_lists_every_alert_under_its_severity() -> None:
    """docs/alerting.md's severity table matches the rules' severity labels."""
    listed: dict[str, str] = {}
    for severity, cell in _SEVERITY_ROW.findall(ALERTING_DOC.read_text(encoding="utf-8")):
        for name in re.findall(r"`(\w+)`", cell):
            assert name not in listed, f"{name} listed twice"
            listed[name] = severity
    assert listed == {r["alert"]: r["labels"]["severity"] for r in alert_rules()}


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=lambda p: p.name)
def test_runbook_links_resolve(runbook: Path) -> None:
    """Relative links in a runbook point at files (and headings) that exist."""
    for target in _MD_LINK.findall(runbook.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        linked = (runbook.parent / path).resolve() if path else runbook
        assert linked.is_file(), f"{runbook.name}: {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.MULTILINE)
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{runbook.name}: {target}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_uses_only_metrics_selfcheckd_exports(rule: dict[str, Any]) -> None:
    """A misspelt metric name would make an alert silently never fire."""
    used = our_metric_names(rule["expr"])
    assert used, f"{rule['alert']} mentions no selfcheckd metric"
    assert used <= exported_series_names(), used - exported_series_names()


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """Each alert is unit tested both firing and not firing."""
    cases = unit_test_cases()
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fires == EXPECTED_ALERTS, EXPECTED_ALERTS - fires
    assert quiet == EXPECTED_ALERTS, EXPECTED_ALERTS - quiet


def test_unit_tests_feed_only_real_metric_names() -> None:
    """Unit-test input series use the names selfcheckd exports, so they test the real thing."""
    allowed = exported_series_names() | {"up"}
    for path in UNIT_TESTS:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for test in doc["tests"]:
            for series in test["input_series"]:
                name = series["series"].split("{", 1)[0]
                assert name in allowed, f"{path.name}: {name}"


@pytest.mark.integration
def test_rules_pass_promtool_check() -> None:
    """promtool accepts alerts.yml (syntax, PromQL, templates)."""
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


@pytest.mark.integration
def test_rule_unit_tests_pass() -> None:
    """Every promtool unit test in deploy/prometheus/tests passes."""
    assert UNIT_TESTS
    result = run_promtool("test", "rules", *(p.name for p in UNIT_TESTS), cwd=PROM_DIR / "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout


def probe_job_text(scrape_config: str) -> str:
    """The commented-out /probe scrape job of scrape-config.yml, uncommented."""
    block = scrape_config.split("# BEGIN probe job\n", 1)[1].split("  # END probe job", 1)[0]
    return "\n".join(line.removeprefix("  # ") for line in block.splitlines())


@pytest.mark.integration
def test_scrape_config_and_rules_load_as_a_prometheus_config(tmp_path: Path) -> None:
    """The scrape job plus alerts.yml form a config promtool accepts, with job `selfcheckd`."""
    text = (PROM_DIR / "scrape-config.yml").read_text(encoding="utf-8")
    scrape = yaml.safe_load(text)
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "selfcheckd"  # SelfcheckAbsent matches on it
    # The optional /probe job, commented out in the file, is checked as it would be used.
    (probe,) = yaml.safe_load(probe_job_text(text))
    assert probe["metrics_path"] == "/probe"
    assert probe["authorization"]["type"] == "Bearer"
    token = tmp_path / "selfcheckd_probe_token"  # promtool checks that the file is there
    token.write_text("t0ken\n")
    probe["authorization"]["credentials_file"] = str(token)
    scrape["scrape_configs"].append(probe)
    assert job["dns_sd_configs"][0]["port"] == 9787
    config = {
        "global": {"scrape_interval": "30s", "evaluation_interval": "30s"},
        "rule_files": [str(ALERTS)],
        **scrape,
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
