"""Topics on the configured MSK cluster."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from kidp.catalog import DEFAULT_PORTS
from kidp.models import (
    CloudResource,
    Deployment,
    ResourceType,
)
from kidp.ports import Credentials
from kidp.providers.aws.base import (
    _MSK_STATES,
    NAME_PREFIX,
    _AlreadyExists,
    _Call,
    _Found,
    _Kind,
)
from kidp.providers.aws.errors import Refused as _Refused

logger = logging.getLogger(__name__)


class _MskTopic(_Kind):
    """A topic in the configured MSK cluster, through MSK's topic API.

    Topics cannot carry AWS tags, so ownership rests on the deterministic
    name alone: a topic of that name is adopted, and Retain has nothing to
    re-tag (the topic is simply left alone).
    """

    key = "msk"
    label = "MSK topic"
    service = "kafka"
    resource_type = ResourceType.TOPIC
    taggable = False

    def name(self, deployment: Deployment) -> str:
        # '.' cannot occur in Kubernetes names: unambiguous, readable, and
        # well within Kafka's 249 characters.
        return f"{NAME_PREFIX}{deployment.namespace}.{deployment.resource_name}"

    @property
    def cluster_arn(self) -> str:
        assert self.p.msk_cluster_arn is not None  # _kind() refuses topics without it
        return self.p.msk_cluster_arn

    def params(self, deployment: Deployment) -> dict[str, Any]:
        spec = deployment.spec
        configs = {"retention.ms": str((spec.retention_hours or 168) * 3_600_000)}
        return {
            "ClusterArn": self.cluster_arn,
            "TopicName": self.name(deployment),
            "PartitionCount": spec.partitions or 3,
            "ReplicationFactor": spec.replication_factor or 3,
            # MSK takes topic configuration as a Base64-encoded JSON object.
            "Configs": base64.b64encode(json.dumps(configs).encode()).decode(),
        }

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        return [_Call("kafka", "create_topic", self.params(deployment))]

    def notes(self, deployment: Deployment) -> list[str]:
        return ["MSK topics cannot be tagged: they are identified by name only"]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        try:
            self.call(
                "create_topic",
                expect=("TopicExistsException", "ConflictException"),
                **self.params(deployment),
            )
        except _Refused:
            raise _AlreadyExists from None

    def find(self, deployment: Deployment) -> _Found | None:
        name = self.name(deployment)
        try:
            topic = self.call(
                "describe_topic",
                expect=("NotFoundException", "UnknownTopicOrPartitionException"),
                ClusterArn=self.cluster_arn,
                TopicName=name,
            )
        except _Refused:
            return None
        return _Found(
            name=name,
            arn=topic.get("TopicArn") or f"{self.cluster_arn}/topic/{name}",
            status=topic.get("Status", ""),
            tags={},
            raw=topic,
        )

    def bootstrap_brokers(self) -> str | None:
        brokers = self.p.optional_call(
            "kafka", "topic", "get_bootstrap_brokers", ClusterArn=self.cluster_arn
        )
        if brokers is None:
            return None
        for key in (
            "BootstrapBrokerStringSaslIam",
            "BootstrapBrokerStringSaslScram",
            "BootstrapBrokerStringTls",
            "BootstrapBrokerString",
        ):
            if brokers.get(key):
                return str(brokers[key])
        return None

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        raw = found.raw
        state = _MSK_STATES.get(found.status, "modifying")
        brokers = self.bootstrap_brokers() if state == "available" else None
        port: int | None = DEFAULT_PORTS["kafka"]
        if brokers:
            first = brokers.split(",")[0]
            port = int(first.rsplit(":", 1)[1]) if ":" in first else port
        actual: dict[str, Any] = {
            "engine": "kafka",
            "partitions": raw.get("PartitionCount"),
            "replicationFactor": raw.get("ReplicationFactor"),
        }
        return CloudResource(
            cloud_resource_id=found.arn,
            state=state,
            message=f"MSK topic status: {found.status}",
            endpoint=brokers,
            port=port,
            actual_spec={k: v for k, v in actual.items() if v is not None},
            tags={},
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if found.status == "DELETING":
            return False
        try:
            self.call(
                "delete_topic",
                expect=("NotFoundException", "UnknownTopicOrPartitionException"),
                ClusterArn=self.cluster_arn,
                TopicName=found.name,
            )
        except _Refused:
            return True
        return self.find(deployment) is None

    def retain(self, deployment: Deployment, found: _Found) -> None:
        logger.info("retaining MSK topic %s: topics carry no tags to change", found.name)
