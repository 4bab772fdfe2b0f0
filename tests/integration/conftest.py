"""Integration tier fixtures: real Debian daemons (Dovecot, sendmail, rsyslog) on loopback.

Every test in this directory is marked `integration`. A missing package skips it, except
under CI=true, where it fails: there scripts/install-system-deps must have run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from . import faked_clock
from .cluster_lab import CLUSTER_BINARIES, ClusterLab, cluster_lab
from .dovecot_lab import DovecotLab
from .leak_lab import SendmailLab
from .maillog import MailLog
from .support import find_binary, require_binaries, require_root

SENDMAIL_BINARIES = ("sendmail", "makemap", "m4")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark everything collected under tests/integration as `integration`."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _sendmail_on_the_faked_clock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under libfaketime, a sendmail without the setgid bit first on PATH (see faked_clock)."""
    installed = find_binary("sendmail")
    copy_dir = None if installed is None else faked_clock.unprivileged_sendmail(
        installed, tmp_path_factory.mktemp("faked-clock-bin"))
    if copy_dir is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{copy_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        yield


@pytest.fixture(scope="session")
def lab_maillog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailLog]:
    """The session's mail log: a private rsyslogd on /dev/log writing mail.* to a file."""
    require_binaries("rsyslogd", "logger")
    require_root("own /dev/log")
    maillog = MailLog.start(tmp_path_factory.mktemp("maillog"))
    yield maillog
    maillog.stop()


@pytest.fixture(scope="session")
def dovecot_lab(
    tmp_path_factory: pytest.TempPathFactory, lab_maillog: MailLog
) -> Iterator[DovecotLab]:
    """Private Dovecot (IMAP STARTTLS + imaps + LMTP) fed by a private sendmail over LMTP."""
    require_binaries("dovecot", "doveadm", *SENDMAIL_BINARIES)
    require_root("run Dovecot and sendmail")
    # Dovecot's mail processes run as uid 8 and must traverse to the maildir: pytest's
    # own temp root is 0700, so Dovecot gets a directory of its own under /tmp.
    dovecot_base = Path(tempfile.mkdtemp(prefix="selfcheckd-dovecot-"))
    try:
        lab = DovecotLab.start(tmp_path_factory.mktemp("dovecot-lab"), dovecot_base)
        yield lab
        lab.stop()
    finally:
        if os.environ.get("SELFCHECKD_KEEP_LABS") != "1":
            shutil.rmtree(dovecot_base, ignore_errors=True)


@pytest.fixture(scope="session")
def _sendmail_lab_session(
    tmp_path_factory: pytest.TempPathFactory, lab_maillog: MailLog
) -> Iterator[SendmailLab]:
    require_binaries(*SENDMAIL_BINARIES)
    require_root("bind the sinkhole on 127.0.0.2:25")
    lab = SendmailLab.start(tmp_path_factory.mktemp("sendmail-lab"), lab_maillog)
    yield lab
    lab.stop()


@pytest.fixture
def sendmail_lab(_sendmail_lab_session: SendmailLab) -> SendmailLab:
    """The leak watcher's lab, reset for this test: sinkhole accepting, queue empty,
    `maillog_text()` starting now."""
    _sendmail_lab_session.reset()
    return _sendmail_lab_session


@pytest.fixture
def cluster_lab_factory(tmp_path: Path) -> Iterator[Callable[..., ClusterLab]]:
    """Start shared-queue labs (`cluster_lab(...)` arguments); all stopped at teardown."""
    require_binaries(*CLUSTER_BINARIES)
    require_root("run sendmail tasks in their own namespaces")
    with ExitStack() as stack:
        numbers = itertools.count(1)

        def start(**options: Any) -> ClusterLab:
            return stack.enter_context(cluster_lab(tmp_path / f"cluster-{next(numbers)}",
                                                   **options))

        yield start
