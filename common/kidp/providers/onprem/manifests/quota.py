"""What a set of objects asks of a namespace's quota."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from kidp.providers.onprem.manifests.common import parse_quantity

# --- what a set of objects asks of a namespace's quota ----------------------


def _container_totals(containers: list[dict[str, Any]], replicas: int) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for container in containers:
        resources = container.get("resources") or {}
        for kind in ("requests", "limits"):
            for resource, amount in (resources.get(kind) or {}).items():
                key = f"{kind}.{resource}"
                totals[key] = totals.get(key, Decimal(0)) + parse_quantity(amount) * replicas
    return totals


def quota_needs(objects: list[dict[str, Any]]) -> dict[str, Decimal]:
    """What ``objects`` would add to a ResourceQuota's ``used``, in its own keys
    (``requests.cpu``, ``limits.memory``, ``requests.storage``, ``pods``,
    ``services``, ``count/statefulsets.apps`` ...). Operator resources are
    counted by what their operator will run."""
    needs: dict[str, Decimal] = {}

    def add(key: str, amount: Decimal) -> None:
        needs[key] = needs.get(key, Decimal(0)) + amount

    for obj in objects:
        kind, api = obj["kind"], obj["apiVersion"]
        group = api.split("/")[0] if "/" in api else ""
        plural = {
            "Secret": "secrets",
            "Service": "services",
            "ConfigMap": "configmaps",
            "StatefulSet": "statefulsets",
            "Deployment": "deployments",
        }.get(kind)
        if plural is not None:
            add(f"count/{plural}{'.' + group if group else ''}", Decimal(1))
            if kind in ("Secret", "Service", "ConfigMap"):
                add(plural, Decimal(1))
        spec = obj.get("spec") or {}
        if kind in ("StatefulSet", "Deployment"):
            replicas = int(spec.get("replicas", 1))
            pod = spec["template"]["spec"]
            add("pods", Decimal(replicas))
            for key, amount in _container_totals(pod["containers"], replicas).items():
                add(key, amount)
            for claim in spec.get("volumeClaimTemplates", []):
                size = parse_quantity(claim["spec"]["resources"]["requests"]["storage"])
                add("requests.storage", size * replicas)
                add("persistentvolumeclaims", Decimal(replicas))
                storage_class = claim["spec"].get("storageClassName")
                if storage_class:
                    prefix = f"{storage_class}.storageclass.storage.k8s.io/"
                    add(f"{prefix}requests.storage", size * replicas)
                    add(f"{prefix}persistentvolumeclaims", Decimal(replicas))
        elif kind == "postgresql":
            replicas = int(spec.get("numberOfInstances", 1))
            add("pods", Decimal(replicas))
            fake = [{"resources": spec.get("resources") or {}}]
            for key, amount in _container_totals(fake, replicas).items():
                add(key, amount)
            size = parse_quantity(spec["volume"]["size"])
            add("requests.storage", size * replicas)
            add("persistentvolumeclaims", Decimal(replicas))
        elif kind == "RedisFailover":
            for part in ("redis", "sentinel"):
                replicas = int(spec[part].get("replicas", 1))
                add("pods", Decimal(replicas))
                fake = [{"resources": spec[part].get("resources") or {}}]
                for key, amount in _container_totals(fake, replicas).items():
                    add(key, amount)
            claim = (spec["redis"].get("storage") or {}).get("persistentVolumeClaim")
            if claim:
                replicas = int(spec["redis"].get("replicas", 1))
                size = parse_quantity(claim["spec"]["resources"]["requests"]["storage"])
                add("requests.storage", size * replicas)
                add("persistentvolumeclaims", Decimal(replicas))
    # ``cpu`` and ``memory`` are the quota's short names for requests.
    for resource in ("cpu", "memory"):
        if f"requests.{resource}" in needs:
            needs[resource] = needs[f"requests.{resource}"]
    return needs
