"""Who sent a request: the caller a verified token names, and the scopes it may hold.

Apart from :mod:`kidp.auth` so the service, which only checks callers, does not
import the JWT library: a worker or a scan function never verifies a token,
and that import is part of every Lambda's cold start.
"""

from __future__ import annotations

from dataclasses import dataclass

from kidp.errors import Forbidden

__all__ = ["ALL_NAMESPACES", "KNOWN_SCOPES", "SCOPE_DELETE", "SCOPE_DEPLOY", "SCOPE_READ", "Caller"]

SCOPE_DEPLOY = "deploy"
SCOPE_READ = "read"
SCOPE_DELETE = "delete"
KNOWN_SCOPES = frozenset({SCOPE_DEPLOY, SCOPE_READ, SCOPE_DELETE})

ALL_NAMESPACES = "*"


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as stated by a verified token."""

    subject: str
    scopes: frozenset[str]
    namespaces: frozenset[str]

    def may_access(self, namespace: str) -> bool:
        """True if the token grants ``namespace`` (``"*"`` grants every namespace)."""
        return ALL_NAMESPACES in self.namespaces or namespace in self.namespaces

    def require_scope(self, scope: str) -> None:
        """Raise :class:`Forbidden` unless the token carries ``scope``."""
        if scope not in self.scopes:
            raise Forbidden(f"token lacks scope '{scope}'")
