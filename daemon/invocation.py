"""How this process was started, so that the commands we print work as shown."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def invoked_as(*, absolute: bool = False) -> str:
    """How to run selfcheckd the way this process was started, for commands we print.

    `absolute`: for commands typed in another shell, whose directory may not be ours
    (scripts/demo changes into the repository first).
    """
    argv0 = Path(sys.argv[0])
    if argv0.name == "selfcheckd" and argv0.exists():
        # As typed (.venv/bin/selfcheckd, or an absolute path).
        return str(argv0.absolute() if absolute else argv0)
    if shutil.which("selfcheckd") == str(argv0.resolve()):
        return "selfcheckd"
    return f"{sys.executable} -m daemon.cli"
