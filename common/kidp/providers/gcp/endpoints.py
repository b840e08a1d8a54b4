"""Which credentials a GCP adapter sends to an API endpoint.

Every GCP adapter takes an optional endpoint (``KIDP_GCP_*_ENDPOINT``), set
only to point it at a local stand-in. Credentials default to Application
Default Credentials (the function's service account on Cloud Functions); a
plain-``http://`` endpoint gets :class:`StandInCredentials` instead: it can
only be a stand-in on this machine, and a real token must never travel
unencrypted.
"""

from __future__ import annotations

import datetime
from typing import Any

from google.auth import credentials as auth_credentials

__all__ = ["StandInCredentials", "credentials_for"]


class StandInCredentials(auth_credentials.Credentials):
    """Credentials for local stand-ins: a fixed placeholder token that
    "refreshes" without any network call. Unlike anonymous credentials they
    can be refreshed and re-scoped, which the Cloud SQL connector does for IAM
    database authentication."""

    TOKEN = "stand-in-token"  # noqa: S105 - a placeholder, not a secret

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._scopes: list[str] = []

    def refresh(self, request: Any) -> None:
        """Issue the placeholder token, valid for an hour."""
        self.token = self.TOKEN
        # google-auth keeps expiry as naive UTC.
        self.expiry = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).replace(
            tzinfo=None
        )


def credentials_for(endpoint: str | None, credentials: Any = None) -> Any:
    """``credentials`` if given; :class:`StandInCredentials` for a plain-http
    ``endpoint``; else None, which the client libraries read as Application
    Default Credentials."""
    if credentials is not None:
        return credentials
    if endpoint and endpoint.startswith("http://"):
        return StandInCredentials()
    return None
