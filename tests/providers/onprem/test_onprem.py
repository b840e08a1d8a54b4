"""The on-prem provider through the real ``kubernetes`` client against the
Kubernetes API stand-in (``kidp.kube_emulator``) over HTTP: deploy, adopt,
operators, failures, delete, drift, quota, API faults, and the whole broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from tests.providers.onprem.support import NS, deployment, kube_client

from kidp import tags
from kidp.drift import compare
from kidp.errors import CloudUnavailable, ProvisioningFailed, QuotaExceeded, ValidationFailed
from kidp.kube_emulator import KubeEmulator, start_kubernetes_emulator
from kidp.models import (
    CloudResource,
    DeletionPolicy,
    Deployment,
    Phase,
    ResourceType,
)
from kidp.ports import Credentials
from kidp.providers.onprem import KubernetesProvider
from kidp.secrets.kubernetes import KubernetesSecretStore

PREFIX = "platform.company.com/"
FIVE = {f"{PREFIX}{name}" for name in tags.TAG_NAMES}
#: What a plain (operator-less) database deployment makes, as (apiVersion, plural).
PLAIN_KINDS = (
    ("apps/v1", "statefulsets"),
    ("v1", "services"),
    ("v1", "secrets"),
    ("v1", "configmaps"),
    ("v1", "persistentvolumeclaims"),
    ("v1", "pods"),
)
CREDS = Credentials(username="kidpadmin", password="Zq8Kp2Lm5Nx7Rt4Vw9Yb3Cd6Fg1Hj0Ks")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def provider(api: Any) -> KubernetesProvider:
    return KubernetesProvider(api_client=api, context="test", discovery_ttl_seconds=0)


def deploy(
    provider: KubernetesProvider, dep: Deployment, creds: Credentials | None = CREDS
) -> Deployment:
    """Deploy and return the deployment as the service would save it."""
    resource = provider.deploy(dep, tags.logical_tags(dep), creds)
    return dep.model_copy(update={"cloud_resource_id": resource.cloud_resource_id})


def settle(
    provider: KubernetesProvider,
    dep: Deployment,
    timeout: float = 5.0,
    *,
    until: str | None = None,
) -> CloudResource:
    """Poll until the resource leaves ``creating`` (as the worker's poll jobs do),
    or, given ``until``, until it reaches that state; the last status on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        resource = provider.get_status(dep)
        done = resource.state != "creating" if until is None else resource.state == until
        if done or time.monotonic() > deadline:
            return resource
        time.sleep(0.05)


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether ``condition()`` holds within ``timeout`` seconds (for watch threads)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def work_until(h: Any, deployment_id: str, phase: Phase, timeout: float = 10.0) -> None:
    """Run the broker's worker until the deployment reaches ``phase``."""
    deadline = time.monotonic() + timeout
    while h.store.get(deployment_id).phase is not phase:
        assert time.monotonic() < deadline, h.store.get(deployment_id).message
        h.worker.run_once()
        time.sleep(0.02)


def delete_all(provider: KubernetesProvider, dep: Deployment, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not provider.delete(dep):
        assert time.monotonic() < deadline, "delete never finished"
        time.sleep(0.05)


def names(emulator: KubeEmulator, gv: str, plural: str, ns: str | None = NS) -> list[str]:
    return [o["metadata"]["name"] for o in emulator.objects(gv, plural, ns)]


# ----------------------------------------------------------------------------- deploy


def test_topics_are_kafka_topics_only(provider: KubernetesProvider) -> None:
    # Strimzi makes Kafka topics; the catalogue's other topic engines are other clouds'.
    assert set(provider.supported()[ResourceType.TOPIC]) == {"kafka"}


def test_deploy_reaches_available_with_endpoint_port_and_labelled_objects(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    dep = deploy(provider, deployment(size="medium"))
    assert dep.cloud_resource_id == f"{NS}/StatefulSet/app-db"
    resource = settle(provider, dep)
    assert resource.state == "available", resource.message
    assert resource.endpoint == "app-db.team-platform.svc.cluster.local"
    assert resource.port == 5432
    assert resource.actual_spec["version"] == "15.10"
    assert resource.actual_spec["size"] == "medium"
    assert resource.actual_spec["storageGb"] == 100

    namespace = emulator.get_object("v1", "namespaces", NS)
    assert namespace is not None
    assert namespace["metadata"]["labels"][f"{PREFIX}managed-by"] == "kidp"
    secret = emulator.get_object("v1", "secrets", "app-db-credentials", NS)
    assert secret is not None
    from kidp.providers.onprem import decode_secret

    assert decode_secret(secret) == {
        "username": "kidpadmin",
        "password": CREDS.password,
        "engine": "postgresql",
        "host": "app-db.team-platform.svc.cluster.local",
        "port": "5432",
    }
    for gv, plural in PLAIN_KINDS:
        objects = emulator.objects(gv, plural, NS)
        assert objects, plural
        for obj in objects:
            labels = obj["metadata"]["labels"]
            assert labels.keys() >= FIVE, (plural, obj["metadata"]["name"])
            assert labels[f"{PREFIX}deployment-id"] == dep.id
    assert names(emulator, "v1", "persistentvolumeclaims") == ["data-app-db-0"]


def test_redeploy_adopts_instead_of_duplicating(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    dep = deploy(provider, deployment())
    again = deploy(provider, deployment())
    assert again.cloud_resource_id == dep.cloud_resource_id
    assert names(emulator, "apps/v1", "statefulsets") == ["app-db"]
    assert sorted(names(emulator, "v1", "services")) == ["app-db", "app-db-hl"]
    assert settle(provider, again).state == "available"


def test_a_create_that_lost_a_race_adopts_the_winner(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    dep = deployment()
    plan = provider.plan(dep, tags.logical_tags(dep))
    (statefulset,) = [o for o in plan["objects"] if o["kind"] == "StatefulSet"]
    emulator.create_namespace(NS)
    # Another worker created it between this worker's look and its create.
    emulator.create_object(statefulset)
    dep = deploy(provider, dep)
    assert names(emulator, "apps/v1", "statefulsets") == ["app-db"]
    assert settle(provider, dep).state == "available"


def test_an_object_of_someone_else_is_never_adopted(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    emulator.create_namespace(NS)
    emulator.create_object(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "app-db", "namespace": NS, "labels": {"app": "theirs"}},
            "spec": {"ports": [{"port": 80}], "selector": {"app": "theirs"}},
        }
    )
    with pytest.raises(ProvisioningFailed, match=r"Service team-platform/app-db already exists"):
        deploy(provider, deployment())
    service = emulator.get_object("v1", "services", "app-db", NS)
    assert service is not None and service["metadata"]["labels"] == {"app": "theirs"}


def test_high_availability_runs_replicas_that_follow_ordinal_zero(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    pg = deploy(provider, deployment(high_availability=True))
    cache = deploy(
        provider,
        deployment(ResourceType.CACHE, name="sessions", engine="redis", high_availability=True),
        Credentials(username="default", password="p" * 32),
    )
    assert settle(provider, pg).state == "available"
    assert settle(provider, cache).state == "available"
    pods = sorted(names(emulator, "v1", "pods"))
    assert pods == ["app-db-0", "app-db-1", "sessions-0", "sessions-1", "sessions-2"]
    assert provider.get_status(pg).actual_spec["highAvailability"] is True
    with pytest.raises(ValidationFailed, match="highAvailability for mysql needs an operator"):
        provider.validate_quota(deployment(engine="mysql", version="8.4", high_availability=True))


def test_services_and_memcached_become_a_deployment_and_a_service(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    svc = deployment(
        ResourceType.SERVICE, name="user-api", image="ghcr.io/example/user-api:1.4.2", replicas=2
    )
    assert provider.password_policy(svc) is None
    svc = deploy(provider, svc, None)
    memcached = deploy(
        provider, deployment(ResourceType.CACHE, name="pages", engine="memcached"), None
    )
    resource = settle(provider, svc)
    assert resource.state == "available", resource.message
    assert resource.endpoint == "user-api.team-platform.svc.cluster.local"
    assert resource.port == 8080
    assert resource.actual_spec == {
        "size": "small",
        "replicas": 2,
        "image": "ghcr.io/example/user-api:1.4.2",
        "port": 8080,
    }
    assert settle(provider, memcached).port == 11211
    assert sorted(names(emulator, "apps/v1", "deployments")) == ["pages", "user-api"]
    assert names(emulator, "v1", "secrets") == []


# ----------------------------------------------------------------------------- operators


def test_zalando_postgresql_when_the_operator_crd_is_served(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    emulator.install_operator_crds("postgresql")
    dep = deploy(provider, deployment(high_availability=True))
    assert dep.cloud_resource_id == f"{NS}/postgresql/platform-team-app-db"
    resource = settle(provider, dep)
    assert resource.state == "available", resource.message
    assert resource.endpoint == "app-db.team-platform.svc.cluster.local"
    cluster = emulator.get_object("acid.zalan.do/v1", "postgresqls", "platform-team-app-db", NS)
    assert cluster is not None
    assert cluster["spec"]["numberOfInstances"] == 2
    assert cluster["metadata"]["labels"].keys() >= FIVE
    # The operator found the broker's password instead of generating its own.
    from kidp.providers.onprem import decode_secret

    user = emulator.get_object(
        "v1",
        "secrets",
        "kidpadmin.platform-team-app-db.credentials.postgresql.acid.zalan.do",
        NS,
    )
    assert user is not None and decode_secret(user)["password"] == CREDS.password
    assert names(emulator, "apps/v1", "statefulsets") == ["platform-team-app-db"]
    # A deployment keeps its path: status still reads the operator's resource.
    assert provider.get_status(dep).cloud_resource_id == dep.cloud_resource_id
    delete_all(provider, dep)
    assert names(emulator, "acid.zalan.do/v1", "postgresqls") == []
    assert names(emulator, "v1", "persistentvolumeclaims") == []


def test_spotahome_redis_failover_when_the_operator_crd_is_served(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    emulator.install_operator_crds("redisfailover")
    dep = deploy(
        provider,
        deployment(ResourceType.CACHE, name="sessions", engine="redis", high_availability=True),
        Credentials(username="default", password="p" * 32),
    )
    assert dep.cloud_resource_id == f"{NS}/RedisFailover/sessions"
    resource = settle(provider, dep)
    assert resource.state == "available", resource.message
    assert resource.endpoint == "sessions.team-platform.svc.cluster.local"
    failover = emulator.get_object("databases.spotahome.com/v1", "redisfailovers", "sessions", NS)
    assert failover is not None
    assert failover["spec"]["auth"] == {"secretPath": "sessions-credentials"}
    assert failover["spec"]["redis"]["replicas"] == 3
    assert resource.actual_spec["highAvailability"] is True


def test_strimzi_kafka_topic_goes_to_the_kafka_cluster_namespace(
    emulator: KubeEmulator, api: Any
) -> None:
    emulator.install_operator_crds("kafkatopic")
    emulator.create_namespace("kafka")
    provider = KubernetesProvider(api_client=api, kafka_cluster="kafka/events")
    topic = deployment(ResourceType.TOPIC, name="orders", engine="kafka", partitions=6)
    assert provider.password_policy(topic) is None
    assert provider.validate_quota(topic).checked
    dep = deploy(provider, topic, None)
    resource = settle(provider, dep)
    assert resource.state == "available", resource.message
    assert resource.endpoint == "events-kafka-bootstrap.kafka.svc.cluster.local"
    assert resource.port == 9092
    assert resource.actual_spec["partitions"] == 6
    (kt,) = emulator.objects("kafka.strimzi.io/v1beta2", "kafkatopics", "kafka")
    assert kt["metadata"]["labels"]["strimzi.io/cluster"] == "events"
    assert kt["spec"]["topicName"] == "team-platform.orders"
    delete_all(provider, dep)
    assert emulator.objects("kafka.strimzi.io/v1beta2", "kafkatopics", None) == []


def test_strimzi_kafka_cluster_is_discovered_when_not_configured(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    emulator.install_operator_crds("kafkatopic")
    topic = deployment(ResourceType.TOPIC, name="orders", engine="kafka")
    with pytest.raises(ValidationFailed, match="topics need a Strimzi Kafka cluster"):
        provider.validate_quota(topic)
    emulator.create_object(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "kafkas.kafka.strimzi.io"},
            "spec": {
                "group": "kafka.strimzi.io",
                "names": {"kind": "Kafka", "plural": "kafkas", "singular": "kafka"},
                "scope": "Namespaced",
                "versions": [
                    {
                        "name": "v1beta2",
                        "served": True,
                        "storage": True,
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            }
                        },
                    }
                ],
            },
        }
    )
    emulator.create_namespace("streaming")
    emulator.create_object(
        {
            "apiVersion": "kafka.strimzi.io/v1beta2",
            "kind": "Kafka",
            "metadata": {"name": "main", "namespace": "streaming"},
            "spec": {"kafka": {"replicas": 1, "version": "3.7.0"}},
        }
    )
    with pytest.raises(ValidationFailed, match=r"replicationFactor 3 exceeds the 1 brokers"):
        provider.validate_quota(topic)
    dep = deploy(
        provider,
        deployment(ResourceType.TOPIC, name="orders", engine="kafka", replication_factor=1),
        None,
    )
    assert dep.cloud_resource_id == "streaming/KafkaTopic/team-platform-orders"
    assert settle(provider, dep).endpoint == "main-kafka-bootstrap.streaming.svc.cluster.local"


def test_a_topic_without_strimzi_is_a_400_naming_what_is_missing(
    provider: KubernetesProvider,
) -> None:
    topic = deployment(ResourceType.TOPIC, name="orders", engine="kafka")
    with pytest.raises(ValidationFailed) as refused:
        provider.validate_quota(topic)
    assert refused.value.http_status == 400
    assert "Strimzi" in refused.value.message
    assert "kafkatopics.kafka.strimzi.io" in refused.value.message


# ----------------------------------------------------------------------------- failures


def test_an_image_that_cannot_be_pulled_fails_with_the_reason(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    emulator.fail_images("postgres:16*")
    dep = deploy(provider, deployment(version="16"))
    resource = settle(provider, dep, until="failed")
    assert resource.state == "failed"
    assert "pod app-db-0" in resource.message
    assert "ImagePullBackOff" in resource.message or "ErrImagePull" in resource.message
    assert 'Failed to pull image "postgres:16.6-alpine"' in resource.message


def test_an_unschedulable_pod_fails_with_the_schedulers_reason(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    emulator.make_unschedulable("app-db-*")
    dep = deploy(provider, deployment(size="xlarge"))
    resource = settle(provider, dep, until="failed")
    assert resource.state == "failed"
    assert resource.message.startswith("pod app-db-0 cannot be scheduled: 0/3 nodes are available")


def test_a_deleted_statefulset_is_missing(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    dep = deploy(provider, deployment())
    emulator.delete_object("apps/v1", "statefulsets", "app-db", NS)
    resource = provider.get_status(dep)
    assert resource.state == "missing"
    assert compare(dep.spec.wire(), None).details == ["Resource missing: not found in the cloud"]


# ----------------------------------------------------------------------------- delete


def test_delete_removes_everything_including_claims_and_is_idempotent(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    dep = deploy(provider, deployment(high_availability=True))
    assert settle(provider, dep).state == "available"
    assert len(names(emulator, "v1", "persistentvolumeclaims")) == 2
    delete_all(provider, dep)
    for gv, plural in PLAIN_KINDS:
        assert names(emulator, gv, plural) == [], plural
    assert provider.delete(dep) is True
    assert provider.get_status(dep).state == "missing"
    # The namespace may hold other things: it stays.
    assert emulator.get_object("v1", "namespaces", NS) is not None


def test_retain_keeps_claims_and_credentials_and_a_new_deployment_adopts_them(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    dep = deploy(provider, deployment(policy=DeletionPolicy.RETAIN))
    assert settle(provider, dep).state == "available"
    delete_all(provider, dep)
    assert names(emulator, "apps/v1", "statefulsets") == []
    assert names(emulator, "v1", "services") == []
    (claim,) = emulator.objects("v1", "persistentvolumeclaims", NS)
    (secret,) = emulator.objects("v1", "secrets", NS)
    for kept in (claim, secret):
        assert kept["metadata"]["labels"][f"{PREFIX}managed-by"] == "kidp-retained"
    assert provider.list_managed() == []

    again = deployment(deployment_id="deploy-" + "cd" * 16)
    again = deploy(provider, again)
    assert settle(provider, again).state == "available"
    (claim,) = emulator.objects("v1", "persistentvolumeclaims", NS)
    assert claim["metadata"]["name"] == "data-app-db-0"
    assert claim["metadata"]["labels"][f"{PREFIX}deployment-id"] == again.id
    assert claim["metadata"]["labels"][f"{PREFIX}managed-by"] == "kidp"


def test_a_retain_asked_for_at_deprovision_keeps_claims_made_under_delete(
    emulator: KubeEmulator, provider: KubernetesProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # POST /v1/deprovision may change deletionPolicy: the StatefulSet was made
    # with whenDeleted Delete, so its claims carry ownerReferences to it and
    # would be garbage-collected with it.
    dep = deploy(provider, deployment(high_availability=True))
    assert settle(provider, dep).state == "available"
    claims = ["data-app-db-0", "data-app-db-1"]
    assert sorted(names(emulator, "v1", "persistentvolumeclaims")) == claims
    for claim in emulator.objects("v1", "persistentvolumeclaims", NS):
        assert claim["metadata"].get("ownerReferences"), "the premise: owned by the StatefulSet"

    # The StatefulSet controller syncs claim owners to whenDeleted on every
    # pass: give it one between the claims' relabelling and the StatefulSet's
    # deletion, as a real cluster would, so only the policy change keeps them.
    delete = provider.api.delete

    def delete_after_a_sync(kind: Any, namespace: str, name: str) -> bool:
        if kind.plural == "statefulsets":
            time.sleep(0.3)
        return delete(kind, namespace, name)

    monkeypatch.setattr(provider.api, "delete", delete_after_a_sync)
    delete_all(provider, dep.model_copy(update={"deletion_policy": DeletionPolicy.RETAIN}))
    monkeypatch.undo()
    # The StatefulSet's dependents go in the background: wait until the
    # collector has been through (its pods gone), then look at the claims.
    assert eventually(
        lambda: not names(emulator, "apps/v1", "statefulsets") and not names(emulator, "v1", "pods")
    )
    time.sleep(0.2)
    kept = emulator.objects("v1", "persistentvolumeclaims", NS)
    assert sorted(c["metadata"]["name"] for c in kept) == claims
    for claim in kept:
        assert "deletionTimestamp" not in claim["metadata"]
        assert "ownerReferences" not in claim["metadata"]
        assert claim["metadata"]["labels"][f"{PREFIX}managed-by"] == "kidp-retained"
    (secret,) = emulator.objects("v1", "secrets", NS)
    assert secret["metadata"]["labels"][f"{PREFIX}managed-by"] == "kidp-retained"

    again = deploy(
        provider, deployment(deployment_id="deploy-" + "cd" * 16, high_availability=True)
    )
    assert settle(provider, again).state == "available"
    adopted = emulator.objects("v1", "persistentvolumeclaims", NS)
    assert sorted(c["metadata"]["name"] for c in adopted) == claims
    for claim in adopted:
        assert claim["metadata"]["labels"][f"{PREFIX}deployment-id"] == again.id
        assert claim["metadata"]["labels"][f"{PREFIX}managed-by"] == "kidp"
    delete_all(provider, again)
    assert names(emulator, "v1", "persistentvolumeclaims") == []


# ----------------------------------------------------------------------------- drift


def test_drift_when_someone_scales_or_changes_the_image_by_hand(
    emulator: KubeEmulator, provider: KubernetesProvider, api: Any
) -> None:
    dep = deploy(provider, deployment())
    resource = settle(provider, dep)
    report = compare(dep.spec.wire(), resource.actual_spec)
    assert report.details == ["Version mismatch: desired=15, actual=15.10 (patch update)"]
    assert not report.significant

    apps = kubernetes.client.AppsV1Api(api)
    apps.patch_namespaced_stateful_set("app-db", NS, {"spec": {"replicas": 3}})
    container = {"name": "postgresql", "image": "postgres:16.6-alpine"}
    apps.patch_namespaced_stateful_set(
        "app-db", NS, {"spec": {"template": {"spec": {"containers": [container]}}}}
    )
    actual = provider.get_status(dep).actual_spec
    report = compare(dep.spec.wire(), actual)
    assert report.significant
    assert "Version mismatch: desired=15, actual=16.6" in report.details
    assert "HighAvailability mismatch: desired=False, actual=True" in report.details

    resources = {"requests": {"cpu": "3", "memory": "6Gi"}, "limits": {"cpu": "3", "memory": "6Gi"}}
    container = {"name": "postgresql", "resources": resources}
    apps.patch_namespaced_stateful_set(
        "app-db", NS, {"spec": {"template": {"spec": {"containers": [container]}}}}
    )
    core = kubernetes.client.CoreV1Api(api)
    core.patch_namespaced_persistent_volume_claim(
        "data-app-db-0", NS, {"spec": {"resources": {"requests": {"storage": "50Gi"}}}}
    )
    details = compare(dep.spec.wire(), provider.get_status(dep).actual_spec).details
    assert "Size mismatch: desired=small, actual=custom:cpu=3,memory=6Gi" in details
    assert "StorageGb mismatch: desired=20, actual=50" in details


def test_usage_comes_from_metrics_when_the_cluster_serves_them(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    dep = deploy(provider, deployment())
    settle(provider, dep)
    emulator.set_pod_usage(NS, "app-db-0", cpu="250m", memory="512Mi")
    usage = provider.get_status(dep).resource_usage
    assert usage == {
        "replicas": 1,
        "readyReplicas": 1,
        "cpuUsage": "250m",
        "memoryUsage": "512Mi",
        "storageUsage": "20Gi",
    }
    emulator.enable_metrics(False)
    assert "cpuUsage" not in provider.get_status(dep).resource_usage


# ----------------------------------------------------------------------------- quota


def test_quota_and_limit_ranges_refuse_before_anything_is_created(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    emulator.create_namespace(NS)
    emulator.create_object(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "team-quota", "namespace": NS},
            "spec": {"hard": {"requests.cpu": "3", "requests.storage": "500Gi"}},
        }
    )
    small = provider.validate_quota(deployment())
    assert small.details["resourceQuotas"] == ["team-quota"]
    with pytest.raises(QuotaExceeded) as exceeded:
        provider.validate_quota(deployment(size="medium", high_availability=True))
    assert "ResourceQuota team-quota allows requests.cpu=3" in exceeded.value.message
    assert "needs 4000m" in exceeded.value.message
    emulator.create_object(
        {
            "apiVersion": "v1",
            "kind": "LimitRange",
            "metadata": {"name": "per-container", "namespace": NS},
            "spec": {"limits": [{"type": "Container", "max": {"memory": "3Gi"}}]},
        }
    )
    with pytest.raises(QuotaExceeded, match="LimitRange per-container allows at most Container"):
        provider.validate_quota(deployment(size="medium"))
    assert names(emulator, "apps/v1", "statefulsets") == []


def test_with_a_quota_ttl_repeated_checks_make_no_api_call(
    emulator: KubeEmulator, api: Any
) -> None:
    calls: list[tuple[str, str]] = []
    provider = KubernetesProvider(
        api_client=api, quota_ttl=60, on_call=lambda kind, op: calls.append((kind, op))
    )
    emulator.create_namespace(NS)
    provider.validate_quota(deployment())
    first = len(calls)
    assert first >= 3  # namespace, quotas, limit ranges
    for _ in range(5):
        report = provider.validate_quota(deployment())
    assert len(calls) == first
    assert report.details["maxAgeSeconds"] == 60


def test_the_api_servers_quota_refusal_is_quota_exceeded(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    emulator.create_namespace(NS)
    emulator.create_object(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-services", "namespace": NS},
            "spec": {"hard": {"services": "0"}},
        }
    )
    with pytest.raises(QuotaExceeded, match="exceeded quota: no-services"):
        deploy(provider, deployment())


# ----------------------------------------------------------------------------- API faults


def test_503_and_429_from_the_api_are_temporary_with_retry_after(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    emulator.fail_next(1, 503)
    with pytest.raises(CloudUnavailable) as unavailable:
        deploy(provider, deployment())
    assert unavailable.value.http_status == 503
    # A throttled write (urllib3 itself retries throttled reads after Retry-After).
    emulator.fail_next(1, 429, methods=["POST"])
    with pytest.raises(CloudUnavailable) as throttled:
        deploy(provider, deployment())
    assert "429" in throttled.value.message
    assert throttled.value.retry_after == 1.0  # the emulator's Retry-After
    # The faults are spent: the retried job goes through.
    assert settle(provider, deploy(provider, deployment())).state == "available"


def test_an_unreachable_api_is_cloud_unavailable(tmp_path: Path) -> None:
    emu = start_kubernetes_emulator()
    config = emu.write_kubeconfig(tmp_path / "kubeconfig")
    emu.stop()
    provider = KubernetesProvider(kubeconfig=str(config), request_timeout=2)
    assert provider.region == "kidp-emulator"
    with pytest.raises(CloudUnavailable, match="cannot reach the Kubernetes API"):
        provider.check()


def test_an_invalid_object_is_provisioning_failed_with_the_apis_message(api: Any) -> None:
    provider = KubernetesProvider(api_client=api, tag_prefix="Not_A_Domain/")
    with pytest.raises(ProvisioningFailed) as refused:
        deploy(provider, deployment())
    assert "422" in refused.value.message and "Invalid" in refused.value.message
    assert "Not_A_Domain/managed-by" in refused.value.message
    assert CREDS.password not in refused.value.message


def test_configuration_errors_are_reported_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed, match="cannot load the Kubernetes configuration"):
        KubernetesProvider(kubeconfig=str(tmp_path / "missing"))


def test_every_api_call_is_counted(api: Any) -> None:
    calls: list[tuple[str, str]] = []
    provider = KubernetesProvider(api_client=api, on_call=lambda r, o: calls.append((r, o)))
    deploy(provider, deployment())
    assert ("statefulsets", "create") in calls
    assert ("secrets", "create") in calls


# ----------------------------------------------------------------------------- scans


def test_list_managed_finds_one_primary_per_deployment_across_namespaces(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    deploy(provider, deployment())
    other = deployment(name="pages", deployment_id="deploy-" + "ef" * 16)
    other = other.model_copy(update={"namespace": "team-web"})
    deploy(provider, other)
    found = {r.cloud_resource_id: r for r in provider.list_managed()}
    assert set(found) == {"team-platform/StatefulSet/app-db", "team-web/StatefulSet/pages"}
    resource = found["team-web/StatefulSet/pages"]
    assert resource.resource_type is ResourceType.DATABASE and resource.name == "pages"
    logical = tags.decode(resource.tags, dialect="kubernetes")
    assert logical["deployment-id"] == other.id


def test_rotation_updates_the_secret_and_restarts_the_pods(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    dep = deploy(provider, deployment())
    settle(provider, dep)
    new = Credentials(username="kidpadmin", password="N" * 32)
    provider.rotate_credentials(dep, new)
    from kidp.providers.onprem import decode_secret

    secret = emulator.get_object("v1", "secrets", "app-db-credentials", NS)
    assert secret is not None
    values = decode_secret(secret)
    assert values["password"] == new.password
    assert values["previous-password"] == CREDS.password
    statefulset = emulator.get_object("apps/v1", "statefulsets", "app-db", NS)
    assert statefulset is not None
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert "kubectl.kubernetes.io/restartedAt" in annotations
    assert settle(provider, dep).state == "available"


def test_namespace_prefix_places_everything_in_the_prefixed_namespace(
    emulator: KubeEmulator, api: Any
) -> None:
    provider = KubernetesProvider(api_client=api, namespace_prefix="kidp-")
    dep = deploy(provider, deployment())
    assert dep.cloud_resource_id == "kidp-team-platform/StatefulSet/app-db"
    assert settle(provider, dep).endpoint == "app-db.kidp-team-platform.svc.cluster.local"
    with pytest.raises(ValidationFailed, match="must start with a letter"):
        provider.validate_quota(deployment(name="1st-db"))


# ----------------------------------------------------------------------------- the broker


def test_the_whole_broker_provisions_to_ready_and_deletes_through_kubernetes(
    make_broker: Any, emulator: KubeEmulator, api: Any
) -> None:
    provider = KubernetesProvider(api_client=api, context="emulator")
    secrets = KubernetesSecretStore(api_client=api)
    h = make_broker(
        adapters={"provider": provider, "secrets": secrets},
        cloud="onprem",
        region="emulator",
    )
    accepted = h.submit()
    work_until(h, accepted.deployment_id, Phase.READY)
    h.drain()
    ready = h.receiver.log[-1][1]
    assert ready["phase"] == "Ready"
    assert ready["endpoint"] == "postgres-app-db.team-platform.svc.cluster.local"
    assert ready["port"] == 5432
    assert ready["connectionSecret"] == "postgres-app-db-credentials"
    assert ready["additionalMetadata"]["secretRef"]["store"] == "kubernetes-secret"
    # connectionSecret names the Secret that holds the credentials, next to the pods.
    from kidp.providers.onprem import decode_secret

    secret = emulator.get_object("v1", "secrets", ready["connectionSecret"], NS)
    assert secret is not None
    stored = decode_secret(secret)
    assert stored["username"] == "kidpadmin" and len(stored["password"]) == 32
    assert stored["host"] == ready["endpoint"]
    assert stored["password"] not in str(h.receiver.log)

    view = h.service.resources(h.admin, namespace=NS)["resources"][0]
    assert view["healthStatus"] == "Healthy"
    assert view["driftDetails"] == ["Version mismatch: desired=15, actual=15.10 (patch update)"]
    assert view["driftDetected"] is False

    # The rotation scan: the store writes the new password (keeping the old one
    # for the engine's start hook), the provider restarts the pods.
    from kidp.scans import Scanner

    assert Scanner(h.service).rotate(h.store.get(accepted.deployment_id)) is True
    secret = emulator.get_object("v1", "secrets", ready["connectionSecret"], NS)
    assert secret is not None
    rotated = decode_secret(secret)
    assert rotated["password"] != stored["password"]
    assert rotated["previous-password"] == stored["password"]
    assert rotated["host"] == ready["endpoint"]
    statefulset = emulator.get_object("apps/v1", "statefulsets", "postgres-app-db", NS)
    assert statefulset is not None
    template = statefulset["spec"]["template"]["metadata"]
    assert "kubectl.kubernetes.io/restartedAt" in template["annotations"]
    h.drain()
    assert h.receiver.log[-1][1]["additionalMetadata"]["credentialsRotated"] is True

    h.deprovision(accepted.deployment_id)
    work_until(h, accepted.deployment_id, Phase.DELETED)
    h.drain()
    assert h.phases()[-2:] == ["Deleting", "Deleted"]
    for plural in ("secrets", "persistentvolumeclaims", "services", "pods"):
        assert names(emulator, "v1", plural) == [], plural


def test_the_broker_answers_a_topic_without_strimzi_with_a_400(make_broker: Any, api: Any) -> None:
    h = make_broker(
        adapters={
            "provider": KubernetesProvider(api_client=api),
            "secrets": KubernetesSecretStore(api_client=api),
        },
        cloud="onprem",
    )
    with pytest.raises(ValidationFailed) as refused:
        h.submit(resourceType="topic", resourceName="orders", spec={"engine": "kafka"})
    assert refused.value.to_body()["code"] == 400
    assert "Strimzi" in refused.value.message
    assert h.store.list() == []


def test_rejected_credentials_are_cloud_unavailable(emulator: KubeEmulator, tmp_path: Path) -> None:
    emulator.token = "the-real-token"
    config = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    emulator.token = "another-token"
    provider = KubernetesProvider(api_client=kube_client(config))
    with pytest.raises(CloudUnavailable, match=r"rejected the broker's credentials"):
        provider.check()


def test_plan_shows_the_objects_without_any_credential(provider: KubernetesProvider) -> None:
    dep = deployment()
    plan = provider.plan(dep, tags.logical_tags(dep))
    assert plan["path"] == "statefulset"
    assert plan["endpoint"] == "app-db.team-platform.svc.cluster.local"
    kinds = sorted(o["kind"] for o in plan["objects"])
    assert kinds == ["ConfigMap", "Secret", "Service", "Service", "StatefulSet"]
    (secret,) = [o for o in plan["objects"] if o["kind"] == "Secret"]
    assert secret["stringData"]["password"] == "<generated>"


def test_the_watcher_reports_changes_to_managed_objects(
    emulator: KubeEmulator, provider: KubernetesProvider
) -> None:
    from kidp.ports import WatchableProvider

    assert isinstance(provider, WatchableProvider)
    seen: list[str] = []
    watcher = provider.change_watcher(seen.append)
    watcher.start()
    try:
        assert watcher.watching.wait(5)
        dep = deploy(provider, deployment())
        settle(provider, dep)
        assert eventually(lambda: dep.id in seen)
        # Someone deletes the StatefulSet by hand: the watcher says so at once.
        seen.clear()
        emulator.delete_object("apps/v1", "statefulsets", "app-db", NS)
        assert eventually(lambda: dep.id in seen)
        assert provider.get_status(dep).state == "missing"
    finally:
        started = time.monotonic()
        watcher.stop()
        assert time.monotonic() - started < 5
