"""A throwaway test CA and a server certificate for 127.0.0.1 and localhost.

The certificate's notAfter is chosen (`SERVER_NOT_AFTER` unless given), so a test can
check the expiry a client reads from the handshake against the value it knows.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme

# Whole seconds: X.509 times have no fractions. About eight years from the run, never a fixed
# date, which would one day expire and fail every TLS connection to the lab.
SERVER_NOT_AFTER = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3000)


@dataclass(frozen=True)
class ServerCerts:
    """PEM files: the CA a client must trust, and the server's chain and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    not_after: datetime  # the server certificate's notAfter

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only the test CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_server_certs(directory: Path, not_after: datetime = SERVER_NOT_AFTER) -> ServerCerts:
    """Issue a CA-signed server certificate with SANs 127.0.0.1 and localhost, valid until
    `not_after`."""
    ca = trustme.CA(organization_name="selfcheckd integration test CA")
    issued = ca.issue_cert("127.0.0.1", "localhost", not_after=not_after)
    certs = ServerCerts(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
        not_after=not_after,
    )
    ca.cert_pem.write_to_path(str(certs.ca_file))
    certs.cert_file.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(certs.key_file))
    certs.key_file.chmod(0o600)
    return certs
