"""The broker's error hierarchy.

Every error the core raises says two things: what the HTTP API answers
(``code`` and ``http_status``, rendered as ``{"error", "message", "code"}``)
and whether a queue should try again (``PermanentError`` vs ``TemporaryError``).
Edges map these once: the API in :mod:`kidp.api`, each queue technology in its
worker edge.

::

    BrokerError
    +-- PermanentError              record it, fail the job, acknowledge the message
    |   +-- ValidationFailed        400 validation_failed
    |   +-- InvalidRequest          400 invalid_request
    |   +-- Unauthorized            401 unauthorized
    |   +-- Forbidden               403 forbidden
    |   +-- NotFound                404 resource_not_found
    |   +-- Conflict                409 conflict
    |   +-- PayloadTooLarge         413 payload_too_large
    |   +-- QuotaExceeded           422 quota_exceeded
    |   +-- ProvisioningFailed      500 provisioning_failed
    +-- TemporaryError              let the platform redeliver after ``retry_after``
        +-- RateLimited             429 rate_limited
        +-- CloudUnavailable        503 cloud_unavailable
        +-- StoreUnavailable        503 store_unavailable
        +-- AuthUnavailable         503 auth_unavailable (JWKS unreachable)
        +-- ConcurrentUpdate        409 concurrent_update (optimistic version lost)
"""

from __future__ import annotations

from typing import Any, ClassVar


class BrokerError(Exception):
    """Base of every error the broker raises on purpose.

    ``message`` is shown to callers: it must never contain a secret.
    """

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_body(self) -> dict[str, Any]:
        """The documented error shape, ``{"error", "message", "code"}``."""
        return {"error": self.code, "message": self.message, "code": self.http_status}


class PermanentError(BrokerError):
    """Retrying the same input cannot succeed."""


class TemporaryError(BrokerError):
    """The same input may succeed later; ``retry_after`` is a hint in seconds."""

    http_status: ClassVar[int] = 503

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 1.0,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class ValidationFailed(PermanentError):
    code = "validation_failed"
    http_status = 400


class InvalidRequest(PermanentError):
    code = "invalid_request"
    http_status = 400


class Unauthorized(PermanentError):
    code = "unauthorized"
    http_status = 401


class Forbidden(PermanentError):
    code = "forbidden"
    http_status = 403


class NotFound(PermanentError):
    code = "resource_not_found"
    http_status = 404


class Conflict(PermanentError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(PermanentError):
    code = "payload_too_large"
    http_status = 413


class QuotaExceeded(PermanentError):
    code = "quota_exceeded"
    http_status = 422


class ProvisioningFailed(PermanentError):
    code = "provisioning_failed"
    http_status = 500


class RateLimited(TemporaryError):
    code = "rate_limited"
    http_status = 429


class CloudUnavailable(TemporaryError):
    code = "cloud_unavailable"
    http_status = 503


class StoreUnavailable(TemporaryError):
    code = "store_unavailable"
    http_status = 503


class AuthUnavailable(TemporaryError):
    """The identity provider's keys cannot be fetched: not the caller's fault."""

    code = "auth_unavailable"
    http_status = 503


class ConcurrentUpdate(TemporaryError):
    """Someone else changed the record first (optimistic versioning)."""

    code = "concurrent_update"
    http_status = 409


class DuplicateDeployment(Conflict):
    """A store refused a second active deployment for the same resource or request id.

    ``existing`` is the deployment that holds it; the service turns this into
    "the same request again" (return it) or a 409 (different spec).
    """

    def __init__(self, existing: Any) -> None:
        super().__init__(f"deployment {existing.id} already holds this resource")
        self.existing = existing
