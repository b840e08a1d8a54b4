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
    # The same totals as the per-phase count the health check reads.
    by_phase = store.count_by_phase()
    for phase in Phase:
        assert sum(n for (_, _, p), n in counts.items() if p is phase) == by_phase[phase]
    assert all(type(kind) is ResourceType and type(p) is Phase for _, kind, p in counts)
