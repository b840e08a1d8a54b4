"""Service Bus topics, in the namespace the broker is configured with.

A topic is a proxy resource: it has no tags, so ownership rests on the name
(``kidp-`` and a hash of namespace and name), as for MSK topics on AWS, and
the orphan scan cannot list topics.
"""

from __future__ import annotations

import re
from typing import Any

from kidp.models import CloudResource, Deployment, ResourceType
from kidp.ports import Credentials
from kidp.providers.azure.base import (
    Json,
    State,
    _Found,
    _Kind,
    _Request,
    body_bytes,
    hashed_name,
)

_DURATION = re.compile(
    r"^P(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)
_STATES: dict[str, State] = {"Active": "available", "Creating": "creating", "Deleting": "deleting"}


def duration_hours(value: str) -> float | None:
    """Hours in an ISO 8601 duration (``PT168H``, ``P7D``), None if it is not one."""
    match = _DURATION.match(value or "")
    if not match or not any(match.groupdict().values()):
        return None
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    return (
        parts.get("days", 0) * 24
        + parts.get("hours", 0)
        + parts.get("minutes", 0) / 60
        + parts.get("seconds", 0) / 3600
    )


class _ServiceBusTopic(_Kind):
    key = "servicebus"
    label = "Service Bus topic"
    service = "servicebus"
    resource_type = ResourceType.TOPIC
    arm_types = {"Microsoft.ServiceBus/namespaces/topics": 1}
    taggable = False

    @property
    def namespace(self) -> str:
        namespace = self.p.servicebus_namespace
        assert namespace  # the provider offers topics only with a namespace
        return namespace

    def name(self, deployment: Deployment) -> str:
        return hashed_name(deployment, 260)

    def body(self, deployment: Deployment) -> Json:
        spec = deployment.spec
        return {
            "properties": {
                "defaultMessageTimeToLive": f"PT{spec.retention_hours or 168}H",
                # Service Bus partitions a topic 16 ways or not at all.
                "enablePartitioning": (spec.partitions or 1) > 1,
                "maxSizeInMegabytes": 1024,
                "supportOrdering": True,
            }
        }

    def requests(self, deployment: Deployment, tags: dict[str, str]) -> list[_Request]:
        path = self.arm_path(
            "Microsoft.ServiceBus", "namespaces", self.namespace, "topics", self.name(deployment)
        )
        return [_Request("PUT", path, self.api_version, self.body(deployment))]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "Service Bus topics cannot carry tags: ownership is by name, and the orphan "
            "scan does not list topics",
            "partitions > 1 turns on partitioning (16 partitions); replicationFactor does "
            "not apply (Service Bus replicates on its own)",
            "Snapshot keeps the topic (and its messages) like Retain",
        ]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        self.call(
            "topics.create_or_update",
            self.p.resource_group,
            self.namespace,
            self.name(deployment),
            body_bytes(self.body(deployment)),
        )

    def find(self, deployment: Deployment, name: str | None = None) -> _Found | None:
        return self.found("topics.get", self.namespace, name or self.name(deployment))

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        props = found.properties
        status = str(props.get("status") or "Active")
        hours = duration_hours(str(props.get("defaultMessageTimeToLive") or ""))
        actual: dict[str, Any] = {"engine": "servicebus", "version": "1.0"}
        if hours is not None:
            actual["retentionHours"] = round(hours)
        return CloudResource(
            cloud_resource_id=found.id,
            state=_STATES.get(status, "modifying"),
            message=f"Service Bus topic status {status}",
            endpoint=f"{self.namespace}.servicebus.windows.net",
            port=5671,
            actual_spec=actual,
            resource_usage={"sizeInBytes": props.get("sizeInBytes")},
            tags={},
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        self.call("topics.delete", self.p.resource_group, self.namespace, found.name)
        return True
