"""PostgreSQL through the zalando postgres-operator: a ``postgresql`` resource,
its user Secret and a client Service on the current primary.
"""

from __future__ import annotations

from typing import Any

from kidp.providers.onprem.manifests.common import (
    MAX_ZALANDO,
    SECRET_DATA_PASSWORD,
    SECRET_DATA_USERNAME,
    Target,
    _service,
    client_service_name,
    fit,
    size_resources,
    zalando_user_secret_name,
)

ZALANDO_GROUP = "acid.zalan.do"
ZALANDO_VERSION = "v1"
ZALANDO_PLURAL = "postgresqls"


def zalando_cluster_name(team: str, resource_name: str) -> str:
    """``<team>-<name>``: the operator refuses a cluster whose name does not start
    with its ``teamId`` (unless configured otherwise), and caps names at 53."""
    name = resource_name if resource_name.startswith(f"{team}-") else f"{team}-{resource_name}"
    return fit(name, MAX_ZALANDO)


#: The zalando (Spilo) pod labels of the current primary.
SPILO_MASTER_LABELS = {"application": "spilo", "spilo-role": "master"}


def zalando_objects(target: Target, username: str) -> list[dict[str, Any]]:
    """The zalando ``postgresql`` resource (HA: two Patroni members)."""
    cluster = zalando_cluster_name(target.deployment.team, target.name)
    volume: dict[str, Any] = {"size": f"{target.storage_gb}Gi"}
    if target.storage_class:
        volume["storageClass"] = target.storage_class
    spec: dict[str, Any] = {
        "teamId": target.deployment.team,
        "numberOfInstances": 2 if target.deployment.spec.high_availability else 1,
        "postgresql": {"version": target.deployment.spec.version},
        "volume": volume,
        "resources": size_resources(target.size),
        "users": {username: ["superuser", "createdb"]},
        "databases": {"app": username},
    }
    return [
        {
            "apiVersion": f"{ZALANDO_GROUP}/{ZALANDO_VERSION}",
            "kind": "postgresql",
            "metadata": target.metadata(cluster),
            "spec": spec,
        }
    ]


def zalando_user_secret(target: Target, *, username: str, password: str) -> dict[str, Any]:
    """The user Secret in the zalando operator's own format, made before the
    cluster so the operator uses the broker's password instead of its own."""
    cluster = zalando_cluster_name(target.deployment.team, target.name)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": target.metadata(zalando_user_secret_name(username, cluster)),
        "type": "Opaque",
        "stringData": {SECRET_DATA_USERNAME: username, SECRET_DATA_PASSWORD: password},
    }


def zalando_client_service(target: Target) -> dict[str, Any]:
    """Service ``<name>`` on the cluster's primary, so the endpoint is
    ``<name>.<namespace>.svc.cluster.local`` as on every other path (the
    operator's own Service is named after the cluster, ``<team>-<name>``)."""
    cluster = zalando_cluster_name(target.deployment.team, target.name)
    selector = {**SPILO_MASTER_LABELS, "cluster-name": cluster}
    return _service(target, client_service_name(target.name), selector)
