"""`selfcheckd demo --drill`: says plainly what it needs when it cannot run."""

from __future__ import annotations

import pytest

from daemon.cli import main
from daemon.drill import lab


def test_demo_drill_names_the_missing_packages(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Without sendmail the demo exits 3 naming what is missing and how to install it."""
    monkeypatch.setattr(lab, "missing_binaries", lambda: ["sendmail", "makemap"])
    assert main(["demo", "--drill"]) == 3
    err = capsys.readouterr().err
    assert "needs sendmail, makemap" in err and "scripts/install-system-deps" in err
