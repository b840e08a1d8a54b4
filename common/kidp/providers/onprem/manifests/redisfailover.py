"""Redis through the spotahome redis-operator: a ``RedisFailover`` and a client
Service on the current master.
"""

from __future__ import annotations

from typing import Any

from kidp.providers.onprem.manifests.common import (
    APP,
    HA_REPLICAS,
    SENTINELS_HA,
    Target,
    _service,
    client_service_name,
    credentials_secret_name,
    size_resources,
    workload_name,
)

SPOTAHOME_GROUP = "databases.spotahome.com"
SPOTAHOME_VERSION = "v1"
SPOTAHOME_PLURAL = "redisfailovers"


#: The RedisFailover pod labels of the current master (spotahome's own labels).
SPOTAHOME_MASTER_LABELS = {
    f"{APP}part-of": "redis-failover",
    f"{APP}component": "redis",
    "redisfailovers-role": "master",
}


def redis_failover_objects(target: Target) -> list[dict[str, Any]]:
    """The spotahome ``RedisFailover`` and a client Service on its master."""
    ha = target.deployment.spec.high_availability
    name = workload_name(target.name)
    redis: dict[str, Any] = {
        "replicas": HA_REPLICAS["redis"] if ha else 1,
        "image": target.image,
        "resources": size_resources(target.size),
    }
    if target.storage_gb is not None:
        claim: dict[str, Any] = {
            "metadata": {"name": "data", "labels": target.labels()},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": f"{target.storage_gb}Gi"}},
            },
        }
        if target.storage_class:
            claim["spec"]["storageClassName"] = target.storage_class
        redis["storage"] = {"keepAfterDeletion": target.retain, "persistentVolumeClaim": claim}
    failover = {
        "apiVersion": f"{SPOTAHOME_GROUP}/{SPOTAHOME_VERSION}",
        "kind": "RedisFailover",
        "metadata": target.metadata(name),
        "spec": {
            "sentinel": {
                "replicas": SENTINELS_HA if ha else 1,
                "resources": {
                    "requests": {"cpu": "100m", "memory": "128Mi"},
                    "limits": {"cpu": "100m", "memory": "128Mi"},
                },
            },
            "redis": redis,
            "auth": {"secretPath": credentials_secret_name(target.name)},
        },
    }
    selector = {**SPOTAHOME_MASTER_LABELS, f"{APP}name": name}
    return [failover, _service(target, client_service_name(target.name), selector)]
