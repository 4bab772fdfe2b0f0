"""How this process was started, so that the commands we print work as shown."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def invoked_as() -> str:
    """How to run selfcheckd the way this process was started, for commands we print."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "selfcheckd" and argv0.exists():
        return str(argv0)  # as typed: .venv/bin/selfcheckd, or an absolute path
    if shutil.which("selfcheckd") == str(argv0.resolve()):
        return "selfcheckd"
    return f"{sys.executable} -m daemon.cli"
