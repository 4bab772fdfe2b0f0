"""TLS client contexts built from a route's connection settings, and readable socket errors."""

from __future__ import annotations

import os
import socket
import ssl

from daemon.config import TLSSettings


def os_error_text(exc: OSError) -> str:
    """"Connection refused", not asyncio's "Connect call failed ('h', 1)"."""
    if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's, not the OS's
        return exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):  # its errno is a resolver code
        return f"cannot resolve the host name: {exc.strerror or exc}"
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


def client_context(settings: TLSSettings) -> ssl.SSLContext:
    """Verify against the system store, or `ca_file` when set; `verify_tls=false` is opt-in."""
    ctx = ssl.create_default_context(
        cafile=str(settings.ca_file) if settings.ca_file is not None else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
