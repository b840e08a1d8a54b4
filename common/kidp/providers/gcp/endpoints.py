"""Which credentials a GCP adapter sends to an API endpoint.

Every GCP adapter takes an optional endpoint (``KIDP_GCP_*_ENDPOINT``), set
only to point it at a local stand-in. Credentials default to Application
Default Credentials (the function's service account on Cloud Functions);
a plain-``http://`` endpoint gets anonymous credentials instead: it can only
be a stand-in on this machine, and a real token must never travel
unencrypted.
"""

from __future__ import annotations

from typing import Any


def credentials_for(endpoint: str | None, credentials: Any = None) -> Any:
    """``credentials`` if given; anonymous ones for a plain-http ``endpoint``;
    else None, which the client libraries read as Application Default
    Credentials."""
    if credentials is not None:
        return credentials
    if endpoint and endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()  # type: ignore[no-untyped-call]
    return None
