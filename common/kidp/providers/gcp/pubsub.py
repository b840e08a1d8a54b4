"""Pub/Sub topics (engine ``pubsub``), through ``google-cloud-pubsub``'s publisher client.

A topic is created at once (no operation). ``retentionHours`` becomes the
topic's message retention (10 minutes to 31 days). Pub/Sub has no
partitions and no replication factor to choose (it scales and replicates on
its own), so the catalogue's defaults for them are ignored and not reported
as drift. The client finds the Pub/Sub emulator through
``PUBSUB_EMULATOR_HOST``, as Google's tools do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from kidp.errors import ProvisioningFailed
from kidp.models import CloudResource, Deployment, ResourceType
from kidp.ports import Credentials
from kidp.providers.gcp.base import (
    MAX_TOPIC_RETENTION_HOURS,
    QuotaRule,
    _Found,
    _Kind,
    _Refused,
    _Request,
    gapic_found,
    hashed_name,
)


class _PubSubTopic(_Kind):
    key = "pubsub"
    label = "Pub/Sub topic"
    api = "pubsub"
    resource_type = ResourceType.TOPIC
    # Pub/Sub's documented limit of 10,000 topics per project.
    quota_rule = QuotaRule(
        service="pubsub.googleapis.com",
        metric="pubsub.googleapis.com/topics",
        default_limit=10_000,
        unit="topics",
        per_region=False,
    )

    def name(self, deployment: Deployment) -> str:
        return hashed_name(deployment, 63)

    def path(self, deployment: Deployment) -> str:
        return f"projects/{self.p.project}/topics/{self.name(deployment)}"

    def body(self, deployment: Deployment, labels: dict[str, str]) -> dict[str, Any]:
        hours = deployment.spec.retention_hours or 168
        if hours > MAX_TOPIC_RETENTION_HOURS:
            raise ProvisioningFailed(
                f"Pub/Sub keeps messages at most {MAX_TOPIC_RETENTION_HOURS} hours (31 days); "
                f"{hours} requested"
            )
        return {
            "name": self.path(deployment),
            "labels": labels,
            "messageRetentionDuration": f"{hours * 3600}s",
        }

    def plan(self, deployment: Deployment, labels: dict[str, str]) -> list[_Request]:
        return [
            _Request(
                "PUT", f"{self.endpoint}/v1/{self.path(deployment)}", self.body(deployment, labels)
            )
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "Pub/Sub has no partitions or replication factor: both are ignored",
            "retentionHours is the topic's message retention",
            "a topic has no snapshot: the Snapshot deletion policy keeps it as Retain does",
        ]

    def create(
        self, deployment: Deployment, labels: dict[str, str], credentials: Credentials | None
    ) -> None:
        from google.protobuf import duration_pb2

        body = self.body(deployment, labels)
        seconds = int(body["messageRetentionDuration"].removesuffix("s"))
        request = {
            "name": body["name"],
            "labels": labels,
            "message_retention_duration": duration_pb2.Duration(seconds=seconds),
        }
        self.start_create(
            "create_topic",
            lambda: self.client.create_topic(request=request, **self.p.call_options),
        )

    def _found(self, topic: Any) -> _Found:
        return gapic_found(topic, "available")

    def find(self, deployment: Deployment) -> _Found | None:
        path = self.path(deployment)
        topic = self.read(
            "get_topic", lambda: self.client.get_topic(topic=path, **self.p.call_options)
        )
        return None if topic is None else self._found(topic)

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        retention = found.raw.message_retention_duration
        actual: dict[str, Any] = {"engine": "pubsub"}
        if retention:
            actual["retentionHours"] = int(retention.total_seconds()) // 3600
        return CloudResource(
            cloud_resource_id=found.resource_id,
            state="available",
            message="Pub/Sub topic exists",
            endpoint=found.resource_id,
            actual_spec=actual,
            tags=found.labels,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        with contextlib.suppress(_Refused):  # 404: already gone
            self.call(
                "delete_topic",
                lambda: self.client.delete_topic(topic=found.resource_id, **self.p.call_options),
                expect=(404,),
            )
        return True

    def relabel(self, found: _Found, labels: dict[str, str]) -> None:
        request = {
            "topic": {"name": found.resource_id, "labels": labels},
            "update_mask": {"paths": ["labels"]},
        }
        self.call(
            "update_topic",
            lambda: self.client.update_topic(request=request, **self.p.call_options),
        )

    def _topics(self) -> list[Any]:
        project = f"projects/{self.p.project}"
        topics: list[Any] = self.call(
            "list_topics",
            lambda: list(self.client.list_topics(project=project, **self.p.call_options)),
        )
        return topics

    def list_all(self) -> Iterator[tuple[str, str, dict[str, str]]]:
        for topic in self._topics():
            found = self._found(topic)
            yield found.resource_id, found.name, found.labels

    def usage(self, deployment: Deployment) -> tuple[int, int]:
        return len(self._topics()), 1
