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

import json
from functools import cache
from typing import Any

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


def _error_body(exc: BaseException) -> dict[str, Any]:
    """The ``error`` object of a discovery client's ``HttpError`` ({} otherwise)."""
    content = getattr(exc, "content", None)
    if not isinstance(content, bytes | str) or getattr(exc, "resp", None) is None:
        return {}
    try:
        body = json.loads(content)
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def reason(exc: BaseException) -> str:
    """Google's reason for ``exc`` (``RESOURCE_EXHAUSTED``, ``alreadyExists``...),
    or its class name."""
    if isinstance(exc, api_exceptions.GoogleAPICallError) and exc.reason:
        return str(exc.reason)
    error = _error_body(exc)
    if error.get("status"):
        return str(error["status"])
    legacy = error.get("errors")
    if isinstance(legacy, list) and legacy and isinstance(legacy[0], dict):
        return str(legacy[0].get("reason") or type(exc).__name__)
    return type(exc).__name__


def reasons(exc: BaseException) -> set[str]:
    """Every reason Google gave for ``exc``: the status, the legacy ``errors[].reason``
    and the ``ErrorInfo`` reasons of ``details`` (``quotaExceeded``, ``QUOTA_EXCEEDED``...)."""
    found = {reason(exc)}
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        for item in exc.errors or ():
            if isinstance(item, dict) and item.get("reason"):
                found.add(str(item["reason"]))
        for detail in exc.details or ():
            value = detail.get("reason") if isinstance(detail, dict) else None
            value = value or getattr(detail, "reason", None)
            if value:
                found.add(str(value))
    error = _error_body(exc)
    for key in ("errors", "details"):
        for item in error.get(key) or ():
            if isinstance(item, dict) and item.get("reason"):
                found.add(str(item["reason"]))
    return found


def message(exc: BaseException) -> str:
    """Google's own message for ``exc`` ('' when it gave none). It can quote the
    request: show it only where no secret was sent."""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return str(exc.message or "")
    return str(_error_body(exc).get("message") or "")


def is_quota(exc: BaseException) -> bool:
    """An allocation quota is full (not throttling): Google says so with a 403
    ``quotaExceeded`` (or an ``ErrorInfo`` reason naming a quota)."""
    found = {r.lower() for r in reasons(exc)}
    return http_status(exc) == 403 and any("quota" in r for r in found)


@cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    # The REST clients raise their HTTP library's own errors when no answer
    # came: requests' (GAPIC REST, Cloud Storage) subclass OSError but not
    # ConnectionError, httplib2's (discovery clients) not even OSError.
    found: list[type[BaseException]] = []
    try:
        import requests

        found += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:  # pragma: no cover - google-auth[requests] brings it
        pass
    try:
        import httplib2

        found.append(httplib2.HttpLib2Error)
    except ImportError:  # pragma: no cover - only the discovery clients need it
        pass
    return tuple(found)


def is_temporary(exc: BaseException) -> bool:
    """Worth retrying later: the client's retries ran out, no token could be
    had, no answer at all, throttling, or a server fault."""
    if isinstance(exc, api_exceptions.RetryError | auth_exceptions.TransportError):
        return True
    if isinstance(exc, auth_exceptions.RefreshError) and getattr(exc, "retryable", False):
        return True
    # Sockets' errors and requests' (the REST transports) are all OSErrors:
    # the call got no answer at all.
    if isinstance(exc, (OSError, *_transport_errors())):
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
