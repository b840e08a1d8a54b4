"""Azure Cache for Redis: Basic, or Standard (a replicated primary/replica
pair with failover) for high availability; clients sign in with Microsoft
Entra ID, so there is no access key to keep.
"""

from __future__ import annotations

from typing import Any

from kidp.models import CloudResource, Deployment, ResourceType, Size
from kidp.ports import Credentials
from kidp.providers.azure.base import (
    Json,
    _Found,
    _Kind,
    _Request,
    arm_state,
    encryption_of,
    global_name,
    size_name,
    size_of,
)

#: Preset -> C-family capacity: 1 GB, 2.5 GB, 6 GB, 13 GB of cache.
REDIS_CAPACITY = {Size.SMALL: 1, Size.MEDIUM: 2, Size.LARGE: 3, Size.XLARGE: 4}
#: Catalogue version -> what ARM takes (Azure offers Redis 6, which is 6.0).
_REDIS_VERSIONS = {"6.0": "6"}


class _RedisCache(_Kind):
    key = "redis"
    label = "Azure Cache for Redis"
    service = "redis"
    resource_type = ResourceType.CACHE
    arm_types = {"Microsoft.Cache/redis": 1}

    def name(self, deployment: Deployment) -> str:
        # Cache names become <name>.redis.cache.windows.net: global.
        return global_name(deployment)

    def body(self, deployment: Deployment, tags: dict[str, str]) -> Json:
        ha = deployment.spec.high_availability
        version = deployment.spec.version or "6.0"
        return {
            "location": self.p.region,
            "tags": tags,
            "properties": {
                "sku": {
                    "name": "Standard" if ha else "Basic",
                    "family": "C",
                    "capacity": REDIS_CAPACITY[size_of(deployment)],
                },
                "redisVersion": _REDIS_VERSIONS.get(version, version),
                "enableNonSslPort": not encryption_of(deployment).in_transit,
                "minimumTlsVersion": "1.2",
                "publicNetworkAccess": "Disabled",
                # Entra ID instead of keys: nothing secret for the broker to store.
                "disableAccessKeyAuthentication": True,
                "redisConfiguration": {"aad-enabled": "true"},
            },
        }

    def requests(self, deployment: Deployment, tags: dict[str, str]) -> list[_Request]:
        path = self.arm_path("Microsoft.Cache", "redis", self.name(deployment))
        return [_Request("PUT", path, self.api_version, self.body(deployment, tags))]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "clients authenticate with Microsoft Entra ID (access keys are disabled), so "
            "no credentials are generated or stored",
            "highAvailability is the Standard tier (a replica with automatic failover); "
            "Basic and Standard keep no data on disk, so Snapshot keeps the cache like Retain",
        ]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        self.begin("redis.begin_create", self.name(deployment), body=self.body(deployment, tags))

    def find(self, deployment: Deployment, name: str | None = None) -> _Found | None:
        return self.found("redis.get", name or self.name(deployment))

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        props = found.properties
        sku = props.get("sku") or {}
        tls = not props.get("enableNonSslPort")
        actual: dict[str, Any] = {
            "engine": "redis",
            "version": props.get("redisVersion"),
            "size": size_name(sku.get("capacity"), REDIS_CAPACITY)
            if sku.get("family") == "C"
            else f"custom:{sku.get('family')}{sku.get('capacity')}",
            "highAvailability": sku.get("name") in ("Standard", "Premium"),
        }
        return CloudResource(
            cloud_resource_id=found.id,
            state=arm_state(found),
            message=f"Azure Cache for Redis provisioningState {found.provisioning_state}",
            endpoint=props.get("hostName"),
            port=props.get("sslPort") if tls else props.get("port"),
            actual_spec={k: v for k, v in actual.items() if v is not None},
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if arm_state(found) == "deleting":
            return False
        self.call("redis.begin_delete", self.p.resource_group, found.name, polling=False)
        return self.find(deployment, found.name) is None
