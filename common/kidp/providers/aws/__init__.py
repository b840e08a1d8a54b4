"""The AWS provider, one module per resource kind.

:mod:`~kidp.providers.aws.provider` holds :class:`AwsProvider` (the port's
operations and the call plumbing), :mod:`~kidp.providers.aws.base` what every
kind shares, and ``rds``, ``aurora``, ``elasticache``, ``s3``, ``ecs`` and
``msk`` one kind each. :mod:`~kidp.providers.aws.clients` and
:mod:`~kidp.providers.aws.errors` are shared with the other AWS adapters (the
DynamoDB store, the SQS queue, the Secrets Manager store).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kidp.providers.aws.base import (
        PROVIDER_NAME,
        RDS_FORBIDDEN_PASSWORD_CHARS,
        final_snapshot_name,
    )
    from kidp.providers.aws.provider import AwsProvider

__all__ = ["PROVIDER_NAME", "RDS_FORBIDDEN_PASSWORD_CHARS", "AwsProvider", "final_snapshot_name"]

_HOMES = {
    "AwsProvider": "kidp.providers.aws.provider",
    "PROVIDER_NAME": "kidp.providers.aws.base",
    "RDS_FORBIDDEN_PASSWORD_CHARS": "kidp.providers.aws.base",
    "final_snapshot_name": "kidp.providers.aws.base",
}


def __getattr__(name: str) -> Any:
    """The provider's names, imported when first asked for: the store, queue
    and secret adapters import ``clients`` and ``errors`` from this package
    and should not pay for loading every resource kind (Lambda cold starts)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
