"""Pub/Sub topics through google-cloud-pubsub, against the Cloud CLI's real Pub/Sub emulator."""

from __future__ import annotations

from typing import Any

import pytest
from google.cloud import pubsub_v1
from tests.providers.deployments import make_deployment
from tests.providers.gcp.support import deploy, expected_labels, new_provider

from kidp import tags as tagging
from kidp.errors import ProvisioningFailed
from kidp.gcp_emulator import GcpEmulator
from kidp.models import Deployment, ResourceType
from kidp.providers.gcp import GcpProvider

pytestmark = pytest.mark.pubsub


@pytest.fixture
def provider(  # the topics-enabled provider replaces the package's fixture
    emulator: GcpEmulator, gcp_project: str, pubsub: str, api_calls: list[tuple[str, str]]
) -> GcpProvider:
    return new_provider(emulator, gcp_project, api_calls, topics=True)


@pytest.fixture
def publisher(pubsub: str) -> pubsub_v1.PublisherClient:
    return pubsub_v1.PublisherClient()


def topic(provider: GcpProvider, **spec: Any) -> Deployment:
    spec.setdefault("engine", "pubsub")
    return make_deployment(provider, ResourceType.TOPIC, **spec)


def test_a_topic_keeps_messages_for_the_retention_and_carries_the_labels(
    provider: GcpProvider, publisher: pubsub_v1.PublisherClient
) -> None:
    deployment = topic(provider, retention_hours=48)
    resource = deploy(provider, deployment)

    path = f"projects/{provider.project}/topics/{provider.identifier(deployment)}"
    made = publisher.get_topic(topic=path)
    assert dict(made.labels) == expected_labels(deployment)
    assert made.message_retention_duration.total_seconds() == 48 * 3600
    assert resource.state == "available"
    assert resource.cloud_resource_id == path
    assert resource.actual_spec == {"engine": "pubsub", "retentionHours": 48}
    assert deployment.spec.version == "v1"


def test_deploy_twice_adopts_and_delete_twice_succeeds(
    provider: GcpProvider, publisher: pubsub_v1.PublisherClient, api_calls: list[tuple[str, str]]
) -> None:
    deployment = topic(provider)
    deploy(provider, deployment)
    deploy(provider, deployment)
    project = f"projects/{provider.project}"
    assert len(list(publisher.list_topics(project=project))) == 1
    assert api_calls.count(("topic", "create_topic")) == 1

    assert provider.delete(deployment) is True
    assert provider.delete(deployment) is True
    assert list(publisher.list_topics(project=project)) == []
    assert provider.get_status(deployment).state == "missing"


def test_list_managed_finds_labelled_topics_and_unlabelled_kidp_ones(
    provider: GcpProvider, publisher: pubsub_v1.PublisherClient
) -> None:
    ours = topic(provider)
    deploy(provider, ours)
    # Retained topics are re-labelled through UpdateTopic, whose labels mask the
    # emulator refuses (Pub/Sub itself accepts it): one is made here directly.
    kept = tagging.encode(
        {tagging.MANAGED_BY: "kidp-retained", tagging.DEPLOYMENT_ID: "deploy-" + "0" * 32},
        dialect="gcp",
    )
    publisher.create_topic(
        request={"name": f"projects/{provider.project}/topics/kidp-kept", "labels": kept}
    )
    # The broker's own job topic, labelled by infra/gcp as its infrastructure.
    infra = tagging.encode({tagging.MANAGED_BY: "kidp-broker-infra"}, dialect="gcp")
    publisher.create_topic(
        request={"name": f"projects/{provider.project}/topics/kidp-jobs", "labels": infra}
    )
    publisher.create_topic(name=f"projects/{provider.project}/topics/kidp-stray")
    publisher.create_topic(name=f"projects/{provider.project}/topics/someone-elses")

    listed = {r.name: r for r in provider.list_managed()}

    assert set(listed) == {provider.identifier(ours), "kidp-stray"}
    labelled = listed[provider.identifier(ours)]
    assert labelled.tagged and labelled.resource_type is ResourceType.TOPIC
    decoded = tagging.decode(labelled.tags, dialect="gcp")
    assert decoded[tagging.DEPLOYMENT_ID] == ours.id
    assert listed["kidp-stray"].tagged is False


def test_retention_beyond_31_days_is_refused_before_any_call(
    provider: GcpProvider, api_calls: list[tuple[str, str]]
) -> None:
    with pytest.raises(ProvisioningFailed, match="at most 744 hours"):
        deploy(provider, topic(provider, retention_hours=800))
    assert api_calls == [("topic", "get_topic")]


def test_partitions_do_not_apply_and_the_plan_says_so(provider: GcpProvider) -> None:
    deployment = topic(provider, partitions=12)
    plan = provider.plan(deployment, tagging.logical_tags(deployment))
    (request,) = plan["requests"]
    assert request["method"] == "PUT"
    assert "partitions" not in str(request["body"])
    assert any("no partitions" in note for note in plan["notes"])
    assert provider.validate_quota(deployment).details["source"] == "documented default"
