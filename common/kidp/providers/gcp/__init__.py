"""The Google Cloud adapters: the provider, one module per resource kind, and
what every GCP adapter shares.

:mod:`~kidp.providers.gcp.provider` holds :class:`GcpProvider` (the port's
operations and the call plumbing), :mod:`~kidp.providers.gcp.base` what every
kind shares, and ``cloudsql``, ``memorystore``, ``pubsub``, ``storage`` and
``cloudrun`` one kind each. :mod:`~kidp.providers.gcp.errors` is shared by
every GCP adapter (the provider, the Pub/Sub queue, the Secret Manager store,
the Cloud SQL store).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kidp.providers.gcp.base import PROVIDER_NAME
    from kidp.providers.gcp.provider import GcpProvider

__all__ = ["PROVIDER_NAME", "GcpProvider"]

_HOMES = {
    "GcpProvider": "kidp.providers.gcp.provider",
    "PROVIDER_NAME": "kidp.providers.gcp.base",
}


def __getattr__(name: str) -> Any:
    """The provider's names, imported when first asked for: the other GCP
    adapters import ``errors`` from this package and should not pay for
    loading every resource kind and its client library."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
