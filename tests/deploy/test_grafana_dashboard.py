"""deploy/grafana: the dashboard is importable JSON whose every PromQL query parses."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.promql import check_expressions_parse, exported_series_names, our_metric_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "selfcheckd-dashboard.json"

# Values Grafana would put in for its built-in and our own variables. The
# multi-value variables render as regexes (allValue ".*").
VARIABLE_VALUES = {
    "__rate_interval": "4m",
    "__interval": "1m",
    "__range": "1d",
    "window": "1h",
    "instance": ".*",
    "route": ".*",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"label_values\((.*),\s*\w+\)")


def load() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def substitute(expr: str) -> str:
    """Replace Grafana variables the way Grafana does before sending the query."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        assert name in VARIABLE_VALUES, f"unknown dashboard variable ${name} in: {expr}"
        return VARIABLE_VALUES[name]

    return _VARIABLE.sub(value, expr)


def expressions() -> dict[str, str]:
    """Every PromQL expression in the dashboard, keyed by where it lives, variables substituted."""
    data = load()
    found: dict[str, str] = {}
    for panel in all_panels(data["panels"]):
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} {target['refId']}"] = substitute(target["expr"])
    for var in data["templating"]["list"]:
        if var["type"] == "query":
            # label_values(<selector>, label) is Grafana's; its selector is PromQL.
            match = _LABEL_VALUES.fullmatch(var["query"]["query"])
            assert match, var["query"]["query"]
            found[f"variable {var['name']}"] = substitute(match.group(1))
    return found


def test_dashboard_is_importable_json() -> None:
    """Title, uid, schema version, and a datasource variable so import asks for none."""
    data = load()
    assert data["uid"] == "selfcheckd"
    assert data["title"]
    assert data["schemaVersion"] >= 36
    names = [v["name"] for v in data["templating"]["list"]]
    assert names[0] == "datasource"
    assert len(names) == len(set(names))


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    """Grafana needs unique panel ids; overlapping grid positions render on top of each other."""
    panels = list(all_panels(load()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_uses_the_datasource_variable() -> None:
    """Panels and targets point at ${datasource}, never a uid from someone's Grafana."""
    for panel in all_panels(load()["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_covers_the_signals_operators_need() -> None:
    """Success rate, latency percentiles, failures by reason, leaks and watcher lag are shown."""
    exprs = list(expressions().values())

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert shown(r'selfcheck_runs_total\{[^}]*result="success"')
    assert shown(r"histogram_quantile\(0\.95, .*rate\(selfcheck_reception_duration_seconds_bucket")
    assert shown(r"sum by \(route, reason\) \(increase\(selfcheck_failures_total")
    assert shown(r"sinkhole_leaked_recipients_total")
    assert shown(r"leakwatch_lag_seconds")
    assert shown(r"maillog_last_delivery_line_timestamp_seconds")


def test_dashboard_shows_the_alert_outbox_and_the_components() -> None:
    """Pending alerts, their age, deliveries by result, and per component up, progress, restarts."""
    exprs = list(expressions().values())

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert shown(r"selfcheckd_alerts_pending")
    assert shown(r"selfcheckd_alerts_oldest_pending_age_seconds")
    assert shown(r"sum by \(result\) \(increase\(selfcheckd_alert_deliveries_total")
    assert shown(r"by \([^)]*component[^)]*\) \(selfcheckd_component_up")
    # Progress age at scrape time, as SelfcheckdComponentStalled measures it, next to the deadline.
    assert shown(r"timestamp\(selfcheckd_component_last_progress_timestamp_seconds\{[^}]*\}\) "
                 r"- selfcheckd_component_last_progress_timestamp_seconds")
    assert shown(r"by \(component\) \(selfcheckd_component_progress_deadline_seconds")
    assert shown(r"by \(component\) \(increase\(selfcheckd_component_restarts_total")


def test_dashboard_shows_the_dns_verdicts_listings_and_undecided_checks() -> None:
    """The [[dns]] items' verdicts, the blocklist listings, what could not be decided, and the
    panels come after every earlier one (new panels go at the end)."""
    exprs = list(expressions().values())

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert shown(r"max by \(name, item\) \(selfcheck_dns_ok")
    assert shown(r"max by \(ip, zone\) \(selfcheck_dnsbl_listed")
    assert shown(r"selfcheck_dns_error_since_timestamp_seconds")
    assert shown(r"increase\(selfcheck_dns_check_errors_total")
    assert shown(r"selfcheck_dns_last_run_timestamp_seconds")
    titles = [p["title"] for p in load()["panels"]]
    assert titles.index("DNS verdicts") > titles.index("Tracked queue ids")


@pytest.mark.parametrize("where", sorted(expressions()))
def test_queries_use_only_metrics_selfcheckd_exports(where: str) -> None:
    """A misspelt metric name would leave a panel silently empty."""
    used = our_metric_names(expressions()[where])
    assert used <= exported_series_names(), f"{where}: {used - exported_series_names()}"


@pytest.mark.integration
def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    """promtool parses each panel and variable query (as a recording rule) after substitution."""
    exprs = expressions()
    assert len(exprs) >= 20
    check_expressions_parse(exprs, tmp_path)


def test_dashboard_shows_the_scheduled_drill_after_every_earlier_panel() -> None:
    """The scheduled drill's last result, time since a pass, duration and runs by result, in
    panels after the DNS ones (new panels go at the end)."""
    exprs = list(expressions().values())

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert shown(r"max by \(result\) \(selfcheck_drill_last_result\{[^}]*\}\) == 1")
    assert shown(r"time\(\) - max\(selfcheck_drill_last_success_timestamp_seconds")
    assert shown(r"selfcheck_drill_duration_seconds")
    assert shown(r"sum by \(result\) \(increase\(selfcheck_drill_runs_total")
    titles = [p["title"] for p in load()["panels"]]
    assert titles.index("Last drill result") > titles.index("Undecided DNS checks ($window)")
