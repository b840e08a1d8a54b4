"""Services: a container app in the Container Apps environment the broker is
configured with, one container, internal ingress on the service's port.
"""

from __future__ import annotations

from typing import Any

from kidp.catalog import SIZES
from kidp.errors import ProvisioningFailed, QuotaExceeded, ValidationFailed
from kidp.models import CloudResource, Deployment, ResourceType, Size
from kidp.ports import Credentials, QuotaReport
from kidp.providers.azure.base import (
    Json,
    _Found,
    _Kind,
    _Request,
    arm_state,
    hashed_name,
    size_name,
    size_of,
)

#: Preset -> (vCPU, memory): the catalogue's own. The consumption plan stops at
#: 4 vCPU / 8 GiB, so ``xlarge`` needs a dedicated workload profile.
APP_RESOURCES: dict[Size, tuple[float, str]] = {
    size: (preset.cpu, f"{preset.memory_gib}Gi")
    for size, preset in SIZES.items()
    if size is not Size.XLARGE
}
_USAGE = "ManagedEnvironmentConsumptionCores"


class _ContainerApp(_Kind):
    key = "containerapps"
    label = "container app"
    service = "appcontainers"
    resource_type = ResourceType.SERVICE
    arm_types = {"Microsoft.App/containerApps": 1}
    snapshot_keeps = False
    container = "app"

    def name(self, deployment: Deployment) -> str:
        # 2-32 lowercase letters, digits and single hyphens, starting with a letter.
        return hashed_name(deployment, 32)

    @property
    def environment_id(self) -> str:
        environment = self.p.environment_id
        assert environment  # the provider offers services only with an environment
        return environment

    def resources(self, deployment: Deployment) -> tuple[float, str]:
        size = size_of(deployment)
        if size not in APP_RESOURCES:
            raise ProvisioningFailed(self.too_big(size))
        return APP_RESOURCES[size]

    def too_big(self, size: Size) -> str:
        return (
            f"size '{size.value}' is more than a container app on the consumption plan "
            "gets (4 vCPU, 8 GiB); choose large or smaller"
        )

    def validate(self, deployment: Deployment) -> None:
        if size_of(deployment) not in APP_RESOURCES:
            raise ValidationFailed(self.too_big(size_of(deployment)))

    def body(self, deployment: Deployment, tags: dict[str, str]) -> Json:
        spec = deployment.spec
        cpu, memory = self.resources(deployment)
        replicas = spec.replicas or 1
        return {
            "location": self.p.region,
            "tags": tags,
            "properties": {
                "managedEnvironmentId": self.environment_id,
                "configuration": {
                    "activeRevisionsMode": "Single",
                    "ingress": {
                        "external": False,
                        "targetPort": spec.port or 8080,
                        "transport": "auto",
                        "allowInsecure": False,
                    },
                },
                "template": {
                    "containers": [
                        {
                            "name": self.container,
                            "image": spec.image,
                            "resources": {"cpu": cpu, "memory": memory},
                        }
                    ],
                    "scale": {"minReplicas": replicas, "maxReplicas": replicas},
                },
            },
        }

    def requests(self, deployment: Deployment, tags: dict[str, str]) -> list[_Request]:
        path = self.arm_path("Microsoft.App", "containerApps", self.name(deployment))
        return [_Request("PUT", path, self.api_version, self.body(deployment, tags))]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "ingress is internal to the environment (https on 443); zone redundancy is "
            "the environment's; services keep no data, so Snapshot deletes like Delete",
        ]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        if not deployment.spec.image:
            raise ProvisioningFailed("a service needs spec.image")
        self.begin(
            "container_apps.begin_create_or_update",
            self.name(deployment),
            body=self.body(deployment, tags),
        )

    def find(self, deployment: Deployment, name: str | None = None) -> _Found | None:
        return self.found("container_apps.get", name or self.name(deployment))

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        props = found.properties
        running = props.get("runningStatus")
        template = props.get("template") or {}
        scale = template.get("scale") or {}
        containers = template.get("containers") or []
        ingress = (props.get("configuration") or {}).get("ingress") or {}
        actual: dict[str, Any] = {"replicas": scale.get("minReplicas")}
        if containers:
            resources = containers[0].get("resources") or {}
            cpu = resources.get("cpu")
            actual["size"] = size_name(
                (float(cpu) if cpu is not None else None, resources.get("memory")), APP_RESOURCES
            )
            actual["image"] = containers[0].get("image")
        if ingress.get("targetPort"):
            actual["port"] = ingress["targetPort"]
        return CloudResource(
            cloud_resource_id=found.id,
            state=arm_state(found, ready=running in (None, "Running")),
            message=(
                f"container app provisioningState {found.provisioning_state}, "
                f"running status {running or '-'}"
            ),
            endpoint=ingress.get("fqdn"),
            port=443 if ingress.get("fqdn") else None,
            actual_spec={k: v for k, v in actual.items() if v is not None},
            resource_usage={"replicas": scale.get("minReplicas")},
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if arm_state(found) == "deleting":
            return False
        self.call("container_apps.begin_delete", self.p.resource_group, found.name, polling=False)
        return self.find(deployment, found.name) is None

    def quota(self, deployment: Deployment) -> QuotaReport:
        cpu, _ = self.resources(deployment)
        needed = cpu * (deployment.spec.replicas or 1)
        parts = self.environment_id.strip("/").split("/")
        group, environment = parts[3], parts[-1]
        usages = self.call("managed_environment_usages.list", group, environment, paged=True)
        for usage in usages:
            if (usage.get("name") or {}).get("value") != _USAGE:
                continue
            used, limit = float(usage.get("currentValue") or 0), float(usage.get("limit") or 0)
            if used + needed > limit:
                raise QuotaExceeded(
                    f"Container Apps environment '{environment}' would exceed its "
                    f"{_USAGE}: {used:g} used of {limit:g}, and this service needs {needed:g}",
                    details={"quota": _USAGE, "used": used, "max": limit, "requested": needed},
                )
            return QuotaReport(
                checked=True,
                details={
                    "source": "Microsoft.App/managedEnvironments/usages",
                    "quotas": {_USAGE: {"used": used, "max": limit, "requested": needed}},
                },
            )
        return QuotaReport(
            checked=False, details={"reason": f"the environment lists no {_USAGE} usage"}
        )
