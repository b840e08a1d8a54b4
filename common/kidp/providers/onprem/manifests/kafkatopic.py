"""Topics through Strimzi: a ``KafkaTopic`` in the Kafka cluster's namespace."""

from __future__ import annotations

from typing import Any

from kidp.providers.onprem.manifests.common import Target, fit

STRIMZI_GROUP = "kafka.strimzi.io"
STRIMZI_TOPIC_PLURAL = "kafkatopics"
STRIMZI_KAFKA_PLURAL = "kafkas"
STRIMZI_CLUSTER_LABEL = "strimzi.io/cluster"


def kafka_topic_name(target: Target, kafka_namespace: str) -> tuple[str, str]:
    """(object name, Kafka topic name). A topic in the deployment's own namespace
    keeps its name; one placed in a shared Kafka namespace is prefixed with the
    deployment's namespace so teams cannot collide."""
    if kafka_namespace == target.namespace:
        return target.name, target.name
    qualified = f"{target.namespace}.{target.name}"
    return fit(f"{target.namespace}-{target.name}", 253), qualified


def kafka_topic_objects(
    target: Target, *, kafka_cluster: str, kafka_namespace: str, api_version: str
) -> list[dict[str, Any]]:
    """A Strimzi ``KafkaTopic`` for ``kafka_cluster`` in its namespace."""
    spec = target.deployment.spec
    object_name, topic = kafka_topic_name(target, kafka_namespace)
    metadata = target.metadata(object_name, **{STRIMZI_CLUSTER_LABEL: kafka_cluster})
    metadata["namespace"] = kafka_namespace
    hours = spec.retention_hours or 168
    return [
        {
            "apiVersion": api_version,
            "kind": "KafkaTopic",
            "metadata": metadata,
            "spec": {
                "topicName": topic,
                "partitions": spec.partitions or 3,
                "replicas": spec.replication_factor or 3,
                "config": {"retention.ms": str(hours * 3_600_000)},
            },
        }
    ]
