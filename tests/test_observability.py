"""The seed metrics that ``Metrics`` derives rather than counts."""

from __future__ import annotations

from kidp.models import Phase, ResourceType
from kidp.observability import Metrics


def test_kubernetes_api_gauge_mirrors_the_cloud_api_gauge_on_onprem_only() -> None:
    metrics = Metrics()
    metrics.cloud_available.set(1)
    assert b"broker_kubernetes_api_available" not in metrics.render()
    metrics.use_provider("onprem")
    assert b"broker_kubernetes_api_available 1.0" in metrics.render()
    metrics.cloud_available.set(0)
    assert b"broker_kubernetes_api_available 0.0" in metrics.render()
    metrics.use_provider("aws")
    assert b"broker_kubernetes_api_available" not in metrics.render()


def test_resource_groups_that_empty_read_zero() -> None:
    metrics = Metrics()
    ready = ("team-a", ResourceType.DATABASE, Phase.READY)
    metrics.set_resources({ready: 2})
    metrics.set_resources({("team-a", "cache", "Pending"): 1})
    text = metrics.render().decode()
    assert 'broker_resources_total{namespace="team-a",phase="Ready",type="database"} 0.0' in text
    assert 'broker_resources_total{namespace="team-a",phase="Pending",type="cache"} 1.0' in text
    # Plain strings and the models' enums name the same series.
    metrics.set_resources({("team-a", "database", "Ready"): 3})
    text = metrics.render().decode()
    assert 'broker_resources_total{namespace="team-a",phase="Ready",type="database"} 3.0' in text
    assert text.count('phase="Ready"') == 1
