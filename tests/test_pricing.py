from __future__ import annotations

from kidp.models import ResourceType
from kidp.pricing import estimate


def test_breakdown_adds_up_and_follows_size_and_ha() -> None:
    small = estimate("aws", ResourceType.DATABASE, {"size": "small", "storageGb": 20})
    medium = estimate("aws", ResourceType.DATABASE, {"size": "medium", "storageGb": 100})
    ha = estimate(
        "aws", ResourceType.DATABASE, {"size": "medium", "storageGb": 100, "highAvailability": True}
    )
    for cost in (small, medium, ha):
        assert set(cost.breakdown) == {"compute", "storage", "network"}
        assert round(sum(cost.breakdown.values()), 2) == cost.estimated_monthly
        assert cost.currency == "USD"
    assert small.estimated_monthly < medium.estimated_monthly < ha.estimated_monthly
    assert ha.breakdown["compute"] == 2 * medium.breakdown["compute"]


def test_services_scale_with_replicas_and_buckets_with_storage() -> None:
    one = estimate("aws", ResourceType.SERVICE, {"size": "small", "replicas": 1})
    three = estimate("aws", ResourceType.SERVICE, {"size": "small", "replicas": 3})
    assert three.breakdown["compute"] == round(3 * one.breakdown["compute"], 2)
    assert estimate("aws", ResourceType.BUCKET, {}).estimated_monthly > 0


def test_gcp_has_its_own_list_prices() -> None:
    spec = {"size": "medium", "storageGb": 100}
    gcp = estimate("gcp", ResourceType.DATABASE, spec)
    aws = estimate("aws", ResourceType.DATABASE, spec)
    assert gcp.breakdown["storage"] == 17.0  # Cloud SQL SSD at $0.17 per GB-month
    assert gcp.estimated_monthly != aws.estimated_monthly
    assert estimate("gcp", ResourceType.TOPIC, {}).estimated_monthly > 0
