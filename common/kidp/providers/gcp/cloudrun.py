"""Cloud Run services, through ``google-cloud-run`` (Admin API v2) over its REST transport.

The image runs with the size preset's CPU and memory as limits, listens on
the requested port, and keeps ``replicas`` instances warm (minimum
instances). The service is private: invoking it needs IAM permission, which
the broker does not grant. Creation returns an operation at once; polls read
the service's ``terminalCondition`` (its Ready condition) again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kidp.models import CloudResource, Deployment, ResourceType
from kidp.ports import Credentials
from kidp.providers.gcp.base import (
    RUN_LIMITS,
    QuotaRule,
    State,
    _Found,
    _Kind,
    _Refused,
    _Request,
    gapic_found,
    hashed_name,
    size_name,
    size_of,
)


class _RunService(_Kind):
    key = "cloudrun"
    label = "Cloud Run service"
    api = "run"
    resource_type = ResourceType.SERVICE
    # Cloud Run's documented limit: 1000 services per region and project.
    quota_rule = QuotaRule(
        service="run.googleapis.com",
        metric="run.googleapis.com/services",
        default_limit=1000,
        unit="services",
        per_region=True,
    )

    def name(self, deployment: Deployment) -> str:
        return hashed_name(deployment, 49)  # Cloud Run service ids stop at 49

    def full_name(self, deployment: Deployment) -> str:
        return f"{self.parent}/services/{self.name(deployment)}"

    def service(self, deployment: Deployment, labels: dict[str, str]) -> Any:
        from google.cloud import run_v2

        spec = deployment.spec
        cpu, memory = RUN_LIMITS[size_of(deployment)]
        template = run_v2.RevisionTemplate(
            containers=[
                run_v2.Container(
                    image=spec.image,
                    ports=[run_v2.ContainerPort(container_port=spec.port or 8080)],
                    resources=run_v2.ResourceRequirements(limits={"cpu": cpu, "memory": memory}),
                )
            ],
            scaling=run_v2.RevisionScaling(min_instance_count=spec.replicas or 1),
            labels=labels,
        )
        if self.p.run_service_account:
            template.service_account = self.p.run_service_account
        return run_v2.Service(
            description=f"{deployment.namespace}/{deployment.resource_name}",
            labels=labels,
            template=template,
            ingress=run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL,
        )

    def plan(self, deployment: Deployment, labels: dict[str, str]) -> list[_Request]:
        from google.protobuf import json_format

        service = self.service(deployment, labels)
        return [
            _Request(
                "POST",
                f"{self.endpoint}/v2/{self.parent}/services?serviceId={self.name(deployment)}",
                json_format.MessageToDict(type(service).pb(service)),
            )
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "replicas is the minimum number of instances kept warm; Cloud Run scales "
            "out on its own above it",
            "the service requires authenticated invocations (no allUsers invoker)",
            "a service keeps no data: the Snapshot deletion policy keeps it as Retain does",
        ]

    def create(
        self, deployment: Deployment, labels: dict[str, str], credentials: Credentials | None
    ) -> None:
        service = self.service(deployment, labels)
        self.start_create(
            "create_service",
            lambda: self.client.create_service(
                parent=self.parent,
                service=service,
                service_id=self.name(deployment),
                **self.p.call_options,
            ),
        )

    def _found(self, service: Any) -> _Found:
        return gapic_found(service, service.terminal_condition.state.name)

    def find(self, deployment: Deployment) -> _Found | None:
        name = self.full_name(deployment)
        service = self.read(
            "get_service", lambda: self.client.get_service(name=name, **self.p.call_options)
        )
        return None if service is None else self._found(service)

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        service = found.raw
        condition = service.terminal_condition
        state: State
        if found.state == "CONDITION_FAILED":
            state = "failed"
            why = condition.reason.name if condition.reason else "unknown reason"
            message = f"Cloud Run service failed ({why})"
            if condition.message:
                message += f": {condition.message}"
        elif found.state == "CONDITION_SUCCEEDED" and not service.reconciling:
            state, message = "available", "Cloud Run service is ready"
        elif service.latest_ready_revision:
            state, message = "modifying", "Cloud Run service is rolling out a revision"
        else:
            state, message = "creating", "Cloud Run service is deploying its first revision"
        actual: dict[str, Any] = {}
        containers = service.template.containers
        if containers:
            container = containers[0]
            limits = dict(container.resources.limits)
            actual["image"] = container.image
            if container.ports:
                actual["port"] = container.ports[0].container_port
            actual["size"] = size_name((limits.get("cpu"), limits.get("memory")), RUN_LIMITS)
        actual["replicas"] = service.template.scaling.min_instance_count
        host = service.uri.removeprefix("https://") if service.uri else None
        return CloudResource(
            cloud_resource_id=found.resource_id,
            state=state,
            message=message,
            endpoint=host,
            port=443 if host else None,
            actual_spec=actual,
            resource_usage={"latestReadyRevision": service.latest_ready_revision or None},
            tags=found.labels,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        try:
            self.call(
                "delete_service",
                lambda: self.client.delete_service(name=found.resource_id, **self.p.call_options),
                expect=(404,),
            )
        except _Refused:
            return True
        return self.find(deployment) is None

    def relabel(self, found: _Found, labels: dict[str, str]) -> None:
        from google.cloud import run_v2

        # UpdateService replaces the service: send it back with new labels.
        service = run_v2.Service(found.raw)
        service.labels.clear()
        service.labels.update(labels)
        self.call(
            "update_service",
            lambda: self.client.update_service(service=service, **self.p.call_options),
        )

    def _services(self) -> list[Any]:
        services: list[Any] = self.call(
            "list_services",
            lambda: list(self.client.list_services(parent=self.parent, **self.p.call_options)),
        )
        return services

    def list_all(self) -> Iterator[tuple[str, str, dict[str, str]]]:
        for service in self._services():
            found = self._found(service)
            yield found.resource_id, found.name, found.labels

    def usage(self, deployment: Deployment) -> tuple[int, int]:
        return len(self._services()), 1
