"""ECS services on Fargate: a task definition and a service in the
configured cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from kidp.errors import ProvisioningFailed
from kidp.models import (
    CloudResource,
    Deployment,
    ResourceType,
)
from kidp.ports import Credentials
from kidp.providers.aws.base import (
    FARGATE_SIZES,
    NAME_PREFIX,
    State,
    _AlreadyExists,
    _Call,
    _deployment_piece,
    _Found,
    _Kind,
    _size,
    _size_name,
    _tag_dict,
)
from kidp.providers.aws.errors import Refused as _Refused


class _EcsService(_Kind):
    """An ECS service on Fargate: one task definition (family = service name)
    with one container, ``replicas`` tasks, in the broker's ECS cluster."""

    key = "ecs"
    label = "ECS service"
    service = "ecs"
    resource_type = ResourceType.SERVICE
    container = "app"

    def name(self, deployment: Deployment) -> str:
        # '_' cannot occur in Kubernetes names, so the join is unambiguous; ECS
        # allows 255 characters, more than namespace + name can reach.
        return f"{NAME_PREFIX}{deployment.namespace}_{deployment.resource_name}"

    def ecs_tags(self, tags: Mapping[str, str]) -> list[dict[str, str]]:
        return [{"key": key, "value": value} for key, value in tags.items()]

    def task_params(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        spec = deployment.spec
        cpu, memory = FARGATE_SIZES[_size(deployment)]
        container: dict[str, Any] = {"name": self.container, "image": spec.image, "essential": True}
        if spec.port:
            container["portMappings"] = [{"containerPort": spec.port, "protocol": "tcp"}]
        params: dict[str, Any] = {
            "family": self.name(deployment),
            "requiresCompatibilities": ["FARGATE"],
            "networkMode": "awsvpc",
            "cpu": cpu,
            "memory": memory,
            "containerDefinitions": [container],
            "tags": self.ecs_tags(tags),
        }
        if self.p.ecs_execution_role_arn:
            params["executionRoleArn"] = self.p.ecs_execution_role_arn
        return params

    def service_params(
        self, deployment: Deployment, tags: dict[str, str], task_definition: str
    ) -> dict[str, Any]:
        return {
            "cluster": self.p.ecs_cluster,
            "serviceName": self.name(deployment),
            "taskDefinition": task_definition,
            "desiredCount": deployment.spec.replicas or 1,
            "launchType": "FARGATE",
            "networkConfiguration": {
                "awsvpcConfiguration": {
                    "subnets": list(self.p.subnet_ids),
                    "securityGroups": list(self.p.security_group_ids),
                    "assignPublicIp": "DISABLED",
                }
            },
            "tags": self.ecs_tags(tags),
            "propagateTags": "SERVICE",
            "enableECSManagedTags": True,
            # ECS treats a repeated create with the same token as the same request.
            "clientToken": _deployment_piece(deployment, 32),
        }

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        return [
            _Call("ecs", "create_cluster", {"clusterName": self.p.ecs_cluster}),
            _Call("ecs", "register_task_definition", self.task_params(deployment, tags)),
            _Call(
                "ecs",
                "create_service",
                self.service_params(deployment, tags, "<registered task definition ARN>"),
            ),
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "create_cluster runs only when the ECS cluster does not exist; "
            "services have no snapshots, so the Snapshot deletion policy deletes like Delete"
        ]

    def ensure_cluster(self) -> None:
        response = self.call("describe_clusters", clusters=[self.p.ecs_cluster])
        active = [
            c for c in response.get("clusters", []) if c.get("status") in ("ACTIVE", "PROVISIONING")
        ]
        if not active:
            self.call("create_cluster", clusterName=self.p.ecs_cluster)

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        if not self.p.subnet_ids:
            raise ProvisioningFailed(
                "ECS services on Fargate need subnets: configure this broker's subnet_ids"
            )
        if not deployment.spec.image:
            raise ProvisioningFailed("a service needs spec.image")
        self.ensure_cluster()
        registered = self.call("register_task_definition", **self.task_params(deployment, tags))
        arn = registered["taskDefinition"]["taskDefinitionArn"]
        try:
            self.call(
                "create_service",
                expect=("InvalidParameterException",),
                **self.service_params(deployment, tags, arn),
            )
        except _Refused as refused:
            # A name held by an active service (or a different client token)
            # comes back as an invalid parameter; anything else really is one.
            if "idempotent" in refused.message.lower() or "already" in refused.message.lower():
                raise _AlreadyExists from None
            raise ProvisioningFailed(f"AWS ecs create_service failed: {refused.message}") from None

    def find(self, deployment: Deployment) -> _Found | None:
        try:
            response = self.call(
                "describe_services",
                expect=("ClusterNotFoundException",),
                cluster=self.p.ecs_cluster,
                services=[self.name(deployment)],
                include=["TAGS"],
            )
        except _Refused:
            return None
        for service in response.get("services", []):
            if service.get("status") != "INACTIVE":
                return _Found(
                    name=service["serviceName"],
                    arn=service["serviceArn"],
                    status=service.get("status", ""),
                    tags=_tag_dict(service.get("tags")),
                    raw=service,
                )
        return None

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        raw = found.raw
        desired = int(raw.get("desiredCount") or 0)
        running = int(raw.get("runningCount") or 0)
        deployments = raw.get("deployments", [])
        primary: dict[str, Any] = next((d for d in deployments if d.get("status") == "PRIMARY"), {})
        rollout = primary.get("rolloutState")
        state: State
        if found.status == "DRAINING":
            state = "deleting"
        elif rollout == "FAILED":
            state = "failed"
        elif running >= desired and rollout in (None, "COMPLETED"):
            state = "available"
        elif len(deployments) > 1:
            state = "modifying"
        else:
            state = "creating"
        actual: dict[str, Any] = {"replicas": desired}
        task = self.call("describe_task_definition", taskDefinition=raw["taskDefinition"])
        definition = task.get("taskDefinition", {})
        size = (str(definition.get("cpu")), str(definition.get("memory")))
        actual["size"] = _size_name(
            "/".join(size), {s: "/".join(v) for s, v in FARGATE_SIZES.items()}
        )
        containers = definition.get("containerDefinitions", [])
        port: int | None = None
        if containers:
            actual["image"] = containers[0].get("image")
            mappings = containers[0].get("portMappings") or []
            if mappings:
                port = mappings[0].get("containerPort")
                actual["port"] = port
        message = primary.get("rolloutStateReason") or f"ECS service {found.status}"
        return CloudResource(
            cloud_resource_id=found.arn,
            state=state,
            message=f"{message} ({running}/{desired} tasks running)",
            port=port,
            actual_spec=actual,
            resource_usage={"runningTasks": running, "desiredTasks": desired},
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if found.status == "DRAINING":
            return False
        try:
            self.call(
                "delete_service",
                expect=("ServiceNotFoundException", "ServiceNotActiveException"),
                cluster=self.p.ecs_cluster,
                service=found.name,
                force=True,
            )
        except _Refused:
            return True
        return self.find(deployment) is None

    def after_gone(self, deployment: Deployment) -> None:
        family = self.name(deployment)
        token = ""
        while True:
            params: dict[str, Any] = {"familyPrefix": family, "status": "ACTIVE"}
            if token:
                params["nextToken"] = token
            try:
                page = self.call("list_task_definitions", expect=("ClientException",), **params)
            except _Refused:
                return
            for arn in page.get("taskDefinitionArns", []):
                # familyPrefix is a prefix: 'kidp-a_b' also lists 'kidp-a_bc'.
                if arn.rsplit("/", 1)[-1].rsplit(":", 1)[0] != family:
                    continue
                described = self.call(
                    "describe_task_definition", taskDefinition=arn, include=["TAGS"]
                )
                if self.p.owned_by(
                    _Found(name=family, arn=arn, status="", tags=_tag_dict(described.get("tags"))),
                    deployment,
                ):
                    self.call("deregister_task_definition", taskDefinition=arn)
            token = page.get("nextToken") or ""
            if not token:
                return

    def retain(self, deployment: Deployment, found: _Found) -> None:
        retained = self.ecs_tags(self.retained_tags())
        self.call("tag_resource", resourceArn=found.arn, tags=retained)
        self.call("tag_resource", resourceArn=found.raw["taskDefinition"], tags=retained)

    def untagged_candidates(self) -> Iterator[tuple[str, str, ResourceType]]:
        token = ""
        while True:
            params: dict[str, Any] = {"cluster": self.p.ecs_cluster}
            if token:
                params["nextToken"] = token
            try:
                page = self.call("list_services", expect=("ClusterNotFoundException",), **params)
            except _Refused:
                return
            for arn in page.get("serviceArns", []):
                name = arn.rsplit("/", 1)[-1]
                if name.startswith(NAME_PREFIX):
                    yield arn, name, self.resource_type
            token = page.get("nextToken") or ""
            if not token:
                return
