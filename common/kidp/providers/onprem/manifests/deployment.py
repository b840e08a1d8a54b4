"""The plain path for services and memcached: a Deployment and its Service."""

from __future__ import annotations

from typing import Any

from kidp.catalog import SIZES
from kidp.models import ResourceType
from kidp.providers.onprem.manifests.common import (
    _SKIP_NETWORK_POLICY,
    ENGINE_USERS,
    SERVICE_USER,
    Target,
    _annotate_skips,
    _container_security,
    _pod_security,
    _probes,
    _scratch,
    _service,
    _skip_digest,
    _skip_pull_policy,
    client_service_name,
    size_resources,
)


def deployment_objects(target: Target) -> list[dict[str, Any]]:
    """Deployment and Service for a ``service`` or a memcached cache."""
    selector = target.selector()
    labels = target.labels()
    readiness, liveness = _probes(target)
    service = target.deployment.resource_type is ResourceType.SERVICE
    name = "app" if service else target.engine
    uid, gid = (SERVICE_USER, SERVICE_USER) if service else ENGINE_USERS[target.engine]
    volumes, mounts = _scratch(target.engine)
    container: dict[str, Any] = {
        "name": name,
        "image": target.image,
        # A team's image may be private: Always makes every pod's pull present
        # the namespace's credentials instead of using a copy another team's
        # pod left on the node.
        "imagePullPolicy": "Always" if service else "IfNotPresent",
        "ports": [{"name": "main", "containerPort": target.port, "protocol": "TCP"}],
        "resources": size_resources(target.size),
        "readinessProbe": readiness,
        "livenessProbe": liveness,
        "securityContext": _container_security(),
    }
    if mounts:
        container["volumeMounts"] = mounts
    if target.engine == "memcached":
        memory_mb = SIZES[target.size].memory_gib * 1024 * 3 // 4
        # Leave a quarter of the pod's memory for connections and overhead.
        container["args"] = ["memcached", "-m", str(memory_mb)]
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(uid, gid, fs_group=False),
        "containers": [container],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": target.metadata(target.workload),
        "spec": {
            "replicas": target.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": {"labels": {**labels, **selector}}, "spec": pod_spec},
        },
    }
    skips = [_skip_digest(target.image, team_image=service), _SKIP_NETWORK_POLICY]
    if not service:
        skips.insert(1, _skip_pull_policy(target.image))
    _annotate_skips(deployment, skips)
    return [
        _service(target, client_service_name(target.name), selector, port_name="main"),
        deployment,
    ]
