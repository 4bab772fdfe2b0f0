"""`selfcheckd dns`: one line (or JSON object) per item, exit 0/1/2/3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cli import main
from tests.dnschecks.nsd import Blackhole, NsdLab
from tests.dnschecks.world import GOOD_IP, SELECTOR


def write(tmp_path: Path, nsd: NsdLab, *entries: str) -> Path:
    path = tmp_path / "dns.toml"
    head = f'nameservers = ["{nsd.nameserver}"]\ntimeout = 2.0\n'
    path.write_text("".join(f"[[dns]]\n{head}{e}\n" for e in entries))
    return path


PLAIN = (f'domain = "plain.test"\nsending_ips = ["{GOOD_IP}"]\n'
         f'dkim_selectors = ["{SELECTOR}"]\nblocklists = ["bl.test"]\n')


@pytest.mark.usefixtures("restore_logging")
def test_every_item_ok_exits_0_with_one_line_per_item(
        nsd: NsdLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """plain.test holds everywhere: exit 0; each line names entry, item, verdict, reason."""
    code = main(["dns", "--config", str(write(tmp_path, nsd, PLAIN))])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0, lines
    rows = [line.split(None, 3) for line in lines]
    assert [r[1] for r in rows] == ["mx", "spf", "dmarc", f"dkim/{SELECTOR}", f"ptr/{GOOD_IP}",
                                    f"blocklist/bl.test/{GOOD_IP}", "mta-sts", "tls-rpt"]
    assert {r[0] for r in rows} == {"plain.test"}
    assert {r[2] for r in rows} == {"ok"}
    assert all(len(r) == 4 and r[3] for r in rows)


@pytest.mark.usefixtures("restore_logging")
def test_a_problem_exits_1_and_outranks_an_error(
        nsd: NsdLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """nodmarc.test has no DMARC (problem); refused.test cannot be asked (error): exit 1."""
    path = write(tmp_path, nsd, 'domain = "nodmarc.test"\n',
                 f'domain = "plain.test"\nsending_ips = ["{GOOD_IP}"]\n'
                 'blocklists = ["refused.test"]\n')
    assert main(["dns", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "nodmarc.test  dmarc" in out.replace("   ", "  ")
    assert "problem" in out and "error" in out


@pytest.mark.usefixtures("restore_logging")
def test_only_undecided_items_exit_3(
        nsd: NsdLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An error and no problem: exit 3, not 0 ("clean") and not 1 ("listed")."""
    path = write(tmp_path, nsd, f'domain = "plain.test"\nsending_ips = ["{GOOD_IP}"]\n'
                                'blocklists = ["refused.test"]\n')
    assert main(["dns", "--config", str(path), "--json"]) == 3
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    refused = next(o for o in objects if o["item"] == f"blocklist/refused.test/{GOOD_IP}")
    assert refused["verdict"] == "error"
    assert refused["reason"].startswith("blocklist unusable from this resolver")
    assert {o["name"] for o in objects} == {"plain.test"}
    assert all({"name", "domain", "item", "verdict", "reason"} <= o.keys() for o in objects)


@pytest.mark.usefixtures("restore_logging")
def test_name_selects_entries_and_an_unknown_one_exits_2(
        nsd: NsdLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--name checks that entry only; a name no entry has is a usage error."""
    path = write(tmp_path, nsd, 'domain = "nodmarc.test"\n', PLAIN)
    assert main(["dns", "--config", str(path), "--name", "plain.test"]) == 0
    assert "nodmarc.test" not in capsys.readouterr().out
    assert main(["dns", "--config", str(path), "--name", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no such entry: 'nope' (entries: nodmarc.test, plain.test)" in err


@pytest.mark.usefixtures("restore_logging")
def test_a_bad_or_empty_dns_config_exits_2_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each broken key named with its rule; no [[dns]] at all is said as such."""
    path = tmp_path / "bad.toml"
    path.write_text('[[dns]]\ndomain = "example.com"\ninterval = 0.5\n'
                    'nameservers = ["ns.example.com:53"]\nsending_ips = ["1.2.3"]\n')
    assert main(["dns", "--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "selfcheckd: config: dns[0].sending_ips: '1.2.3' is not an IPv4 or IPv6 address",
        "selfcheckd: config: dns[0].interval: must be at least 1 (seconds)",
        "selfcheckd: config: dns[0].nameservers: 'ns.example.com:53': the host must be an "
        "IP address (the resolver cannot look up its own nameserver's name)",
    ]
    path.write_text(f'[leakwatch]\nsource = "file"\n[leakwatch.file]\npath = "{tmp_path}/m"\n')
    assert main(["dns", "--config", str(path)]) == 2
    assert "no [[dns]] entry to check" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_ips_from_route_is_unknown_to_the_one_shot_command(
        nsd: NsdLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No probe is sent by `selfcheckd dns`: route-ip says so (error), the rest is checked."""
    route = ('[[selfcheck.routes]]\nfrom = "a@plain.test"\nto = "b@plain.test"\n'
             'smtp = { host = "127.0.0.1" }\nimap = { host = "127.0.0.1" }\n'
             '[selfcheck]\nsecret = "s"\n')
    path = tmp_path / "c.toml"
    path.write_text(route + f'[[dns]]\ndomain = "plain.test"\nips_from_route = "default"\n'
                            f'nameservers = ["{nsd.nameserver}"]\n')
    assert main(["dns", "--config", str(path), "--json"]) == 3
    objects = {o["item"]: o for o in map(json.loads, capsys.readouterr().out.splitlines())}
    assert objects["route-ip"]["verdict"] == "error"
    assert "sends no probe" in objects["route-ip"]["reason"]
    assert objects["spf"]["verdict"] == "ok"


def test_the_installed_command_runs(nsd: NsdLab, tmp_path: Path) -> None:
    """The real entry point in a process: the same lines and exit code."""
    path = write(tmp_path, nsd, 'domain = "nodmarc.test"\n')
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "dns", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert "nodmarc.test  dmarc" in done.stdout
    assert done.stderr == ""


@pytest.mark.usefixtures("restore_logging")
def test_config_check_connect_asks_each_entrys_nameservers(
        nsd: NsdLab, blackhole: Blackhole, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--connect reaches the nameservers (one SOA query), naming the silent ones."""
    path = tmp_path / "c.toml"
    path.write_text(f'[[dns]]\ndomain = "plain.test"\nnameservers = ["{nsd.nameserver}"]\n'
                    f'[[dns]]\nname = "silent"\ndomain = "plain.test"\ntimeout = 0.3\n'
                    f'nameservers = ["{blackhole.nameserver}"]\n')
    assert main(["config-check", "--config", str(path), "--connect"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"ok    dns plain.test  {nsd.nameserver} (answered SOA")
    assert lines[2].startswith(f"FAIL  dns silent  {blackhole.nameserver}: plain.test SOA: "
                               "no answer within 0.3s")
    assert lines[3] == "1 of 2 targets failed: dns silent"
