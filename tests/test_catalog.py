from __future__ import annotations

import pytest

from kidp.catalog import ENGINES, describe, normalize
from kidp.errors import ValidationFailed
from kidp.models import ResourceSpec, ResourceType, Size

AWS_LIKE = {
    ResourceType.DATABASE: {"postgresql": ENGINES[ResourceType.DATABASE]["postgresql"]},
    ResourceType.BUCKET: {"": []},
    ResourceType.SERVICE: {"": []},
    ResourceType.TOPIC: ENGINES[ResourceType.TOPIC],
}


def spec(**fields: object) -> ResourceSpec:
    return ResourceSpec.model_validate(fields)


def test_defaults_are_filled() -> None:
    filled = normalize(ResourceType.DATABASE, spec(engine="postgresql"), AWS_LIKE)
    assert filled.version == "16"
    assert filled.size is Size.SMALL
    assert filled.storage_gb == 20
    topic = normalize(ResourceType.TOPIC, spec(engine="kafka"), AWS_LIKE)
    assert (topic.partitions, topic.replication_factor, topic.retention_hours) == (3, 3, 168)


def test_unsupported_type_engine_and_version_name_the_alternatives() -> None:
    with pytest.raises(ValidationFailed, match="supported: bucket, database, service, topic"):
        normalize(ResourceType.CACHE, spec(engine="redis"), AWS_LIKE)
    with pytest.raises(ValidationFailed, match="engine 'mysql'.*supported: postgresql"):
        normalize(ResourceType.DATABASE, spec(engine="mysql"), AWS_LIKE)
    with pytest.raises(ValidationFailed, match="version '11'.*12, 13, 14, 15, 16"):
        normalize(ResourceType.DATABASE, spec(engine="postgresql", version="11"), AWS_LIKE)
    with pytest.raises(ValidationFailed, match="spec.engine is required"):
        normalize(ResourceType.DATABASE, spec(), AWS_LIKE)


def test_fields_that_do_not_apply_are_refused() -> None:
    with pytest.raises(ValidationFailed, match="spec.image does not apply to resourceType"):
        normalize(ResourceType.DATABASE, spec(engine="postgresql", image="nginx"), AWS_LIKE)
    with pytest.raises(ValidationFailed, match="spec.image is required"):
        normalize(ResourceType.SERVICE, spec(port=80), AWS_LIKE)


def test_describe_lists_sizes_with_cpu_and_memory() -> None:
    body = describe(AWS_LIKE)
    assert [s["size"] for s in body["sizes"]] == ["small", "medium", "large", "xlarge"]
    assert body["sizes"][3] | {} == {
        "size": "xlarge",
        "cpu": 8,
        "memory": "16Gi",
        "defaultStorageGb": 500,
        "description": "Enterprise",
    }
