"""The Azure adapters: the provider, one module per resource kind, and the
error meaning every Azure adapter shares.

:mod:`~kidp.providers.azure.provider` holds :class:`AzureProvider` (the port's
operations and the call plumbing), :mod:`~kidp.providers.azure.base` what
every kind shares, and ``sql``, ``flexible`` (PostgreSQL and MySQL),
``redis``, ``servicebus``, ``storage`` and ``containerapps`` one kind each.
:mod:`~kidp.providers.azure.errors` is shared with the other Azure adapters
(the Table Storage store, the Storage Queue, the Key Vault store), which
import it without loading any management client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kidp.providers.azure.base import API_VERSIONS, PROVIDER_NAME
    from kidp.providers.azure.provider import AzureProvider, credential_for

__all__ = ["API_VERSIONS", "PROVIDER_NAME", "AzureProvider", "credential_for"]

_HOMES = {
    "AzureProvider": "kidp.providers.azure.provider",
    "credential_for": "kidp.providers.azure.provider",
    "API_VERSIONS": "kidp.providers.azure.base",
    "PROVIDER_NAME": "kidp.providers.azure.base",
}


def __getattr__(name: str) -> Any:
    """The provider's names, imported when first asked for: the store, queue
    and secret adapters import ``errors`` from this package and should not
    pay for loading every resource kind (Functions cold starts)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
