"""The grouped count behind ``broker_resources_total``, on every store backend."""

from __future__ import annotations

from collections.abc import Callable

from kidp.models import Deployment, Phase, ResourceType
from kidp.ports import DeploymentStore

Make = Callable[..., Deployment]


def test_count_by_namespace_type_phase(store: DeploymentStore, make: Make) -> None:
    assert store.count_by_namespace_type_phase() == {}
    store.create(make("a", namespace="team-a"))
    store.create(make("b", namespace="team-a"))
    store.create(make("c", namespace="team-a", phase=Phase.READY))
    store.create(make("d", namespace="team-b", resource_type=ResourceType.CACHE))
    store.create(make("e", namespace="team-b", phase=Phase.DELETED))

    counts = store.count_by_namespace_type_phase()
    assert counts == {
        ("team-a", ResourceType.DATABASE, Phase.PENDING): 2,
        ("team-a", ResourceType.DATABASE, Phase.READY): 1,
        ("team-b", ResourceType.CACHE, Phase.PENDING): 1,
        ("team-b", ResourceType.DATABASE, Phase.DELETED): 1,
    }
    # Per phase, every phase present (what /health reports).
    assert store.count_by_phase() == {
        **dict.fromkeys(Phase, 0),
        Phase.PENDING: 3,
        Phase.READY: 1,
        Phase.DELETED: 1,
    }
    assert all(type(kind) is ResourceType and type(p) is Phase for _, kind, p in counts)
