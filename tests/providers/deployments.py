"""The deployment every provider's tests hand their provider: one builder for
all clouds, the spec checked against what that provider supports."""

from __future__ import annotations

import uuid
from typing import Any

from kidp import catalog
from kidp.models import DeletionPolicy, Deployment, Phase, ResourceSpec, ResourceType
from kidp.models import new_deployment_id as _new_id
from kidp.ports import CloudProvider


def make_deployment(
    provider: CloudProvider,
    resource_type: ResourceType,
    *,
    name: str = "orders",
    namespace: str = "team-a",
    deletion_policy: DeletionPolicy = DeletionPolicy.DELETE,
    phase: Phase = Phase.PROVISIONING,
    **spec: Any,
) -> Deployment:
    """A deployment of ``provider`` in its region, as the service would hand it over."""
    normalized = catalog.normalize(resource_type, ResourceSpec(**spec), provider.supported())
    return Deployment(
        id=_new_id(),
        namespace=namespace,
        resource_type=resource_type,
        resource_name=name,
        team="payments",
        owner="owner@example.com",
        application="checkout",
        resource_uid=str(uuid.uuid4()),
        callback_url=None,
        spec=normalized,
        spec_fingerprint="test",
        deletion_policy=deletion_policy,
        provider=provider.name,
        region=provider.region,
        phase=phase,
    )


def postgres(provider: CloudProvider, **overrides: Any) -> Deployment:
    """A medium PostgreSQL 15 of ``provider``, with ``overrides`` in its spec."""
    spec: dict[str, Any] = {"engine": "postgresql", "version": "15", "size": "medium"}
    spec.update(overrides)
    return make_deployment(provider, ResourceType.DATABASE, **spec)
