"""Shared fixtures: the embedded mail stack (real aiosmtpd + pymap) and config builders."""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme

from daemon.config import Config
from daemon.embedded.stack import EmbeddedMailStack, StackOptions
from daemon.logs import redact_secrets
from tests.faketime_site import sitecustomize as faketime_compat

if faketime_compat.PRELOADED:  # mended here; Python children load it as their sitecustomize
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(faketime_compat.__file__).parent), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_ssl_context(test_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def ca_file(test_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    test_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def mail_stack() -> AsyncIterator[EmbeddedMailStack]:
    """A plain-text SMTP -> IMAP stack on loopback."""
    async with EmbeddedMailStack() as stack:
        yield stack


StackFactory = Callable[..., Any]


@pytest.fixture
async def make_stack() -> AsyncIterator[StackFactory]:
    """Start stacks with custom options; all are stopped at teardown."""
    stacks: list[EmbeddedMailStack] = []

    async def factory(**options: Any) -> EmbeddedMailStack:
        stack = await EmbeddedMailStack(StackOptions(**options)).start()
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        await stack.stop()


def make_config(*routes: dict[str, Any], **selfcheck: Any) -> Config:
    """A validated Config for `routes` (dicts as `EmbeddedMailStack.route_table()` gives)."""
    section = {"timeout": 10.0, "secret": "test-secret-value", "cleanup_timeout": 5.0,
               **selfcheck, "routes": list(routes)}
    return Config.model_validate({"selfcheck": section})


def refused_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(name="closed_port")
def closed_port_fixture() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    return refused_port()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what configure_logging and the CLI change globally (handlers, structlog,
    redaction)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)
    redact_secrets(())
