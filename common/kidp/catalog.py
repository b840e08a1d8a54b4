"""What can be provisioned: types, engines, versions and sizes.

The full catalogue is seed 001's (plus cache, topic, bucket and service); a
provider narrows it with ``CloudProvider.supported()``. :func:`normalize`
checks a request against what this broker's provider can do and fills the
documented defaults, so everything downstream sees a complete spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kidp.errors import ValidationFailed
from kidp.models import ResourceSpec, ResourceType, Size


@dataclass(frozen=True)
class SizePreset:
    cpu: float
    memory_gib: int
    storage_gb: int
    description: str


SIZES: dict[Size, SizePreset] = {
    Size.SMALL: SizePreset(1, 2, 20, "Development/testing"),
    Size.MEDIUM: SizePreset(2, 4, 100, "Production"),
    Size.LARGE: SizePreset(4, 8, 250, "High-load"),
    Size.XLARGE: SizePreset(8, 16, 500, "Enterprise"),
}

#: Every engine and version the broker knows, by resource type. ``""`` is the
#: engine of types that have none (bucket, service).
ENGINES: dict[ResourceType, dict[str, list[str]]] = {
    ResourceType.DATABASE: {
        "postgresql": ["12", "13", "14", "15", "16"],
        "mysql": ["5.7", "8.0", "8.4"],
        "mongodb": ["5.0", "6.0", "7.0"],
        "redis": ["6.2", "7.0", "7.2"],
    },
    ResourceType.CACHE: {
        "redis": ["6.2", "7.0", "7.2"],
        "memcached": ["1.6"],
    },
    ResourceType.TOPIC: {"kafka": ["3.5", "3.6", "3.7"]},
    ResourceType.BUCKET: {"": []},
    ResourceType.SERVICE: {"": []},
}

#: Engines that are one cloud's own managed service, by provider. Kept apart
#: from ENGINES because providers take ENGINES' caches and topics wholesale and
#: the on-prem samples build every database engine in it: a cloud-only engine
#: there would be offered, or built, where it does not exist.
PROVIDER_ENGINES: dict[str, dict[ResourceType, dict[str, list[str]]]] = {
    # Azure SQL Database's server version is "12.0" (it follows SQL Server's
    # engine, not a release you pick); Azure Cache for Redis offers Redis 6,
    # which is 6.0; Service Bus has no versions, and "1.0" is the AMQP version
    # it speaks (the catalogue needs one to default to).
    "azure": {
        ResourceType.DATABASE: {"sqlserver": ["12.0"]},
        ResourceType.CACHE: {"redis": ["6.0"]},
        ResourceType.TOPIC: {"servicebus": ["1.0"]},
    },
    # Pub/Sub has no engine versions; "v1" is its API, the one version there is.
    "gcp": {ResourceType.TOPIC: {"pubsub": ["v1"]}},
}

#: Spec fields that mean something for each type; anything else set is refused.
FIELDS: dict[ResourceType, frozenset[str]] = {
    ResourceType.DATABASE: frozenset(
        {"engine", "version", "size", "high_availability", "storage_gb", "backup", "encryption"}
    ),
    ResourceType.CACHE: frozenset(
        {"engine", "version", "size", "high_availability", "encryption", "backup"}
    ),
    ResourceType.TOPIC: frozenset(
        {"engine", "version", "partitions", "replication_factor", "retention_hours"}
    ),
    ResourceType.BUCKET: frozenset({"versioning", "encryption", "size"}),
    ResourceType.SERVICE: frozenset({"image", "port", "replicas", "size", "high_availability"}),
}

DEFAULT_PORTS = {
    "postgresql": 5432,
    "mysql": 3306,
    "mongodb": 27017,
    "redis": 6379,
    "memcached": 11211,
    "kafka": 9092,
    "sqlserver": 1433,
    "servicebus": 5671,
}


def _camel(field: str) -> str:
    head, *rest = field.split("_")
    return head + "".join(part.title() for part in rest)


def normalize(
    resource_type: ResourceType,
    spec: ResourceSpec,
    supported: dict[ResourceType, dict[str, list[str]]],
) -> ResourceSpec:
    """Check ``spec`` against what the provider supports and fill defaults.

    Raises ``ValidationFailed`` naming what this broker can do instead.
    """
    if resource_type not in supported:
        can = ", ".join(sorted(t.value for t in supported))
        raise ValidationFailed(
            f"resourceType '{resource_type.value}' is not supported by this broker; "
            f"supported: {can}"
        )
    allowed = FIELDS[resource_type]
    stray = sorted(_camel(name) for name in spec.model_fields_set - allowed)
    if stray:
        raise ValidationFailed(
            f"spec.{stray[0]} does not apply to resourceType '{resource_type.value}'; "
            f"allowed: {', '.join(sorted(_camel(f) for f in allowed))}"
        )
    engines = supported[resource_type]
    changes: dict[str, Any] = {}
    if "engine" in allowed:
        if spec.engine is None:
            raise ValidationFailed(
                f"spec.engine is required for {resource_type.value}; "
                f"supported: {', '.join(sorted(engines))}"
            )
        if spec.engine not in engines:
            raise ValidationFailed(
                f"engine '{spec.engine}' is not supported for {resource_type.value}; "
                f"supported: {', '.join(sorted(engines))}"
            )
        versions = engines[spec.engine]
        if spec.version is None:
            changes["version"] = versions[-1]
        elif spec.version not in versions:
            raise ValidationFailed(
                f"version '{spec.version}' is not supported for {spec.engine}; "
                f"supported: {', '.join(versions)}"
            )
    if "size" in allowed and spec.size is None:
        changes["size"] = Size.SMALL
    size = changes.get("size", spec.size)
    if "storage_gb" in allowed and spec.storage_gb is None and size is not None:
        changes["storage_gb"] = SIZES[size].storage_gb
    if resource_type is ResourceType.TOPIC:
        changes.setdefault("partitions", spec.partitions or 3)
        changes.setdefault("replication_factor", spec.replication_factor or 3)
        changes.setdefault("retention_hours", spec.retention_hours or 168)
    if resource_type is ResourceType.SERVICE:
        if spec.image is None:
            raise ValidationFailed("spec.image is required for a service")
        changes.setdefault("port", spec.port or 8080)
        changes.setdefault("replicas", spec.replicas or (2 if spec.high_availability else 1))
    if resource_type is ResourceType.BUCKET and spec.versioning is None:
        changes["versioning"] = False
    return spec.model_copy(update=changes)


def describe(supported: dict[ResourceType, dict[str, list[str]]]) -> dict[str, Any]:
    """``GET /v1/catalog``: what this broker can provision."""
    return {
        "resourceTypes": [
            {
                "resourceType": resource_type.value,
                "engines": [
                    {"engine": engine, "versions": versions}
                    for engine, versions in sorted(engines.items())
                    if engine
                ],
                "fields": sorted(_camel(f) for f in FIELDS[resource_type]),
            }
            for resource_type, engines in supported.items()
        ],
        "sizes": [
            {
                "size": size.value,
                "cpu": preset.cpu,
                "memory": f"{preset.memory_gib}Gi",
                "defaultStorageGb": preset.storage_gb,
                "description": preset.description,
            }
            for size, preset in SIZES.items()
        ],
        "deletionPolicies": ["Delete", "Retain", "Snapshot"],
    }
