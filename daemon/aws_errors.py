"""One bounded reason label for whatever an AWS call raised (CloudWatch Logs, SSM,
DynamoDB, S3 alike): metrics and degraded reasons need a small fixed set, not messages."""

from __future__ import annotations

import aiohttp
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
)

THROTTLED = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException",
                       "ProvisionedThroughputExceededException", "RequestLimitExceeded"})
DENIED = frozenset({"AccessDeniedException", "UnrecognizedClientException",
                    "ExpiredTokenException", "InvalidSignatureException",
                    "MissingAuthenticationTokenException"})


def error_reason(exc: BaseException) -> str:
    """throttled, access_denied, not_found, api_error, credentials, config, timeout,
    connection or other."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in THROTTLED:
            return "throttled"
        if code in DENIED:
            return "access_denied"
        if code == "ResourceNotFoundException":
            return "not_found"
        return "api_error"
    if isinstance(exc, NoCredentialsError):
        return "credentials"
    if isinstance(exc, NoRegionError):
        return "config"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError,
                        aiohttp.ClientError, OSError)):
        return "connection"
    return "other"
