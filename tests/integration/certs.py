"""A throwaway test CA and a server certificate for 127.0.0.1 and localhost."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class ServerCerts:
    """PEM files: the CA a client must trust, and the server's chain and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only the test CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_server_certs(directory: Path) -> ServerCerts:
    """Issue a CA-signed server certificate with SANs 127.0.0.1 and localhost."""
    ca = trustme.CA(organization_name="selfcheckd integration test CA")
    issued = ca.issue_cert("127.0.0.1", "localhost")
    certs = ServerCerts(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
    ca.cert_pem.write_to_path(str(certs.ca_file))
    certs.cert_file.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(certs.key_file))
    certs.key_file.chmod(0o600)
    return certs
