"""What Google Cloud error answers mean, shared by every GCP adapter (the
provider, the Pub/Sub queue, the Secret Manager store, the Cloud SQL store's
connector): which failures are worth retrying and what Google said.

The client libraries raise :mod:`google.api_core.exceptions` (a
``GoogleAPICallError`` carries the HTTP status as ``code``, whether the call
went over REST or gRPC), ``google.api_core.exceptions.RetryError`` when their
own retries ran out, and :mod:`google.auth.exceptions` when no token could be
had. The discovery-based clients (``googleapiclient``) raise ``HttpError``;
:func:`http_status` reads both.
"""

from __future__ import annotations

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions

from kidp.errors import BrokerError, CloudUnavailable, PermanentError, TemporaryError

#: What a Google client call raises when the call itself fails: catch these
#: (never ``Exception``, which would turn a bug into a "cloud error").
CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    api_exceptions.GoogleAPIError,
    auth_exceptions.GoogleAuthError,
    OSError,
)

#: Statuses worth retrying: request timeout, conflict on a busy resource is
#: *not* one of them (409 means it exists), throttling and server faults are.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def http_status(exc: BaseException) -> int:
    """The HTTP status of ``exc`` (0 when there was no answer)."""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        code = exc.code
        return int(code) if isinstance(code, int) else 0
    resp = getattr(exc, "resp", None)  # googleapiclient.errors.HttpError
    status = getattr(resp, "status", None)
    return int(status) if status else 0


def reason(exc: BaseException) -> str:
    """Google's reason for ``exc`` (``RESOURCE_EXHAUSTED``, ``alreadyExists``...),
    or its class name."""
    if isinstance(exc, api_exceptions.GoogleAPICallError) and exc.reason:
        return str(exc.reason)
    return type(exc).__name__


def is_temporary(exc: BaseException) -> bool:
    """Worth retrying later: the client's retries ran out, no token could be
    had, no answer at all, throttling, or a server fault."""
    if isinstance(exc, api_exceptions.RetryError | auth_exceptions.TransportError):
        return True
    if isinstance(exc, auth_exceptions.RefreshError) and getattr(exc, "retryable", False):
        return True
    # Sockets' errors and requests' (the REST transports) are all OSErrors:
    # the call got no answer at all.
    if isinstance(exc, OSError):
        return True
    return http_status(exc) in RETRYABLE_STATUSES


def describe(exc: BaseException, *, service: str, operation: str) -> str:
    """A message for callers and logs: service, operation, status and reason.

    Google's own message is left out on purpose: it can quote the request."""
    status = http_status(exc)
    if status == 0:
        return f"{service} {operation}: no answer ({type(exc).__name__})"
    return f"{service} {operation}: HTTP {status} {reason(exc)}"


def broker_error(
    exc: BaseException,
    *,
    service: str,
    operation: str,
    temporary: type[TemporaryError] = CloudUnavailable,
    retry_after: float = 5.0,
) -> BrokerError:
    """``exc`` as the broker error that says how to retry: ``temporary`` (a
    store or queue adapter passes ``StoreUnavailable``) when
    :func:`is_temporary`, else a ``PermanentError`` carrying the status and
    Google's reason. Raise it ``from None``: the client's exception may quote
    the request, and a request can carry a secret."""
    text = describe(exc, service=service, operation=operation)
    if is_temporary(exc):
        return temporary(text, retry_after=retry_after)
    return PermanentError(text, details={"gcpStatus": http_status(exc), "gcpReason": reason(exc)})
