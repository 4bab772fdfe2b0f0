"""TLS client contexts built from a route's connection settings."""

from __future__ import annotations

import ssl

from daemon.config import TLSSettings


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
