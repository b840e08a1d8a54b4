"""What Azure error answers mean, shared by every Azure adapter (the provider,
the Table Storage store, the Storage Queue, the Key Vault store): which
failures are worth retrying, how long Azure asked us to wait, and the error
code ARM or the data plane gave.

The Azure SDKs raise :mod:`azure.core.exceptions`: ``HttpResponseError`` (and
its ``ResourceNotFoundError``, ``ResourceExistsError``,
``ResourceModifiedError`` subclasses) for an answer, ``ServiceRequestError``
and ``ServiceResponseError`` for a request that never got one, and
``ClientAuthenticationError`` when no token could be had (a managed identity
endpoint that is down, say).
"""

from __future__ import annotations

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

#: Error codes ARM and the data planes use for "slow down" or "busy, try again".
RETRYABLE_CODES = frozenset(
    {
        "TooManyRequests",
        "ServerBusy",
        "OperationTimedOut",
        "InternalServerError",
        "ServiceUnavailable",
        "RetryableError",
        "Conflict.AnotherOperationInProgress",
        "AnotherOperationInProgress",
        "OperationPreempted",
    }
)


#: Error codes for "this subscription has no room for it": quota, not a fault.
QUOTA_CODES = frozenset(
    {
        "QuotaExceeded",
        "ResourceQuotaExceeded",
        "SubscriptionQuotaExceeded",
        "RegionalQuotaExceeded",
        "OperationNotAllowedQuotaExceeded",
        "ServerQuotaExceeded",
        "InsufficientCoreQuota",
        "InsufficientVCoreQuota",
        "MaxStorageAccountsCountPerSubscriptionExceeded",
        "ManagedEnvironmentMaxCoresExceeded",
    }
)


def http_status(exc: AzureError) -> int:
    """The HTTP status Azure answered ``exc`` with (0 when there was no answer)."""
    return int(getattr(exc, "status_code", None) or 0)


def error_code(exc: AzureError) -> str:
    """Azure's error code of ``exc`` ("Unknown" when it has none): the ARM/OData
    ``error.code``, or the data plane's ``x-ms-error-code``."""
    if isinstance(exc, HttpResponseError):
        if exc.error is not None and exc.error.code:
            return str(exc.error.code)
        code = getattr(exc, "error_code", None)
        if code:
            return str(getattr(code, "value", code))
        headers = getattr(exc.response, "headers", None) or {}
        if headers:
            header = headers.get("x-ms-error-code")
            if header:
                return str(header)
    return "Unknown"


def error_message(exc: AzureError, *, secrets: tuple[str, ...] = (), limit: int = 300) -> str:
    """ARM's own explanation of a refusal (``error.message``), on one line, cut
    at ``limit`` characters, with every one of ``secrets`` masked.

    Only for management-plane answers: ARM explains a refusal without echoing
    the request, but a refused parameter's value can be quoted, hence the mask."""
    message = ""
    if isinstance(exc, HttpResponseError) and exc.error is not None and exc.error.message:
        message = str(exc.error.message)
    text = " ".join(message.split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:limit]


def retry_after(exc: AzureError, *, default: float = 1.0) -> float:
    """Seconds Azure asked us to wait (``Retry-After``, or the ``x-ms-``
    millisecond variant), else ``default``."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if not headers:
        return default
    for name, scale in (("retry-after-ms", 0.001), ("x-ms-retry-after-ms", 0.001)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                pass
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:  # an HTTP date: rare on Azure; the default will do
            return default
    return default


def is_temporary(exc: AzureError) -> bool:
    """Worth retrying later: no answer at all, no token (the identity endpoint
    is the cloud too), throttled, a server fault, or a code that says busy."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError | ClientAuthenticationError):
        return True
    status = http_status(exc)
    return status == 429 or status >= 500 or error_code(exc) in RETRYABLE_CODES


def describe(exc: AzureError, *, service: str, operation: str) -> str:
    """A message for callers and logs: service, operation, status and code.

    Azure's own message is left out on purpose: data-plane errors can echo
    the request (a secret's value included)."""
    status = http_status(exc)
    if status == 0:
        return f"{service} {operation}: no answer ({type(exc).__name__})"
    return f"{service} {operation}: HTTP {status} {error_code(exc)}"
