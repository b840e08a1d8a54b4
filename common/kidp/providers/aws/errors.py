"""What AWS error answers mean, shared by the AWS adapters (the provider and
the Secrets Manager store): which codes are worth retrying, and how to keep
a secret out of an error message built from AWS's text."""

from __future__ import annotations

from collections.abc import Collection

from botocore.exceptions import ClientError

#: The API asked us to slow down: retry later.
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "SlowDown",
        "PriorRequestNotComplete",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
    }
)
#: The service failed on its side: retry later.
SERVER_CODES = frozenset(
    {
        "InternalFailure",
        "InternalError",
        "InternalServerError",
        "InternalServerErrorException",
        "InternalServiceError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "ClusterConnectivityException",
        "KafkaTimeoutException",
    }
)


def error_code(exc: ClientError) -> str:
    """AWS's error code of ``exc`` ("Unknown" when it has none)."""
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def http_status(exc: ClientError) -> int:
    """The HTTP status AWS answered ``exc`` with (0 when unknown)."""
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_temporary(exc: ClientError) -> bool:
    """Worth retrying later: throttled, or the service failed on its side."""
    code, status = error_code(exc), http_status(exc)
    return code in THROTTLING_CODES or code in SERVER_CODES or status == 429 or status >= 500


def redact(text: str, secrets: Collection[str]) -> str:
    """``text`` with every secret in ``secrets`` replaced by ``***`` (AWS
    sometimes quotes a refused parameter's value in its message)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class Refused(Exception):
    """A ClientError whose code the caller said it handles (not found, exists...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
