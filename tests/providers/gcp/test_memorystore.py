"""Memorystore for Redis through google-cloud-redis (REST transport), on the stand-in."""

from __future__ import annotations

from typing import Any

import pytest
from google.cloud import redis_v1
from tests.providers.deployments import make_deployment
from tests.providers.gcp.support import (
    REGION,
    Operator,
    delete_until_done,
    deploy,
    expected_labels,
    settle,
)

from kidp import drift
from kidp.errors import ProvisioningFailed, QuotaExceeded
from kidp.gcp_emulator import GcpEmulator
from kidp.models import DeletionPolicy, Deployment, ResourceType
from kidp.providers.gcp import GcpProvider


def redis(provider: GcpProvider, **spec: Any) -> Deployment:
    spec.setdefault("engine", "redis")
    return make_deployment(provider, ResourceType.CACHE, **spec)


def test_a_highly_available_cache_is_standard_ha_with_the_presets_memory(
    provider: GcpProvider, operator: Operator
) -> None:
    deployment = redis(provider, version="7.0", size="medium", high_availability=True)
    assert provider.password_policy(deployment) is None  # Memorystore makes the AUTH string

    started = deploy(provider, deployment)
    assert started.state == "creating"
    ready = settle(provider, deployment)

    (instance,) = operator.redis_instances()
    assert instance.name == f"projects/{provider.project}/locations/{REGION}/instances/" + (
        provider.identifier(deployment)
    )
    assert instance.tier == redis_v1.Instance.Tier.STANDARD_HA
    assert instance.memory_size_gb == 4
    assert instance.redis_version == "REDIS_7_0"
    assert instance.auth_enabled is True
    assert (
        instance.transit_encryption_mode
        == redis_v1.Instance.TransitEncryptionMode.SERVER_AUTHENTICATION
    )
    assert dict(instance.labels) == expected_labels(deployment)
    assert ready.state == "available"
    assert ready.endpoint == instance.host and ready.port == 6379
    assert ready.actual_spec == {
        "engine": "redis",
        "version": "7.0",
        "size": "medium",
        "highAvailability": True,
        "encryptionAtRest": True,
    }
    assert not drift.compare(deployment.spec.wire(), ready.actual_spec).detected


def test_a_basic_cache_without_transit_encryption(
    provider: GcpProvider, operator: Operator
) -> None:
    deployment = redis(provider, encryption={"at_rest": True, "in_transit": False})
    deploy(provider, deployment)
    (instance,) = operator.redis_instances()
    assert instance.tier == redis_v1.Instance.Tier.BASIC
    assert instance.memory_size_gb == 2
    assert instance.auth_enabled is False
    assert instance.transit_encryption_mode == redis_v1.Instance.TransitEncryptionMode.DISABLED


def test_deploy_twice_adopts_one_instance(
    provider: GcpProvider, operator: Operator, api_calls: list[tuple[str, str]]
) -> None:
    deployment = redis(provider)
    deploy(provider, deployment)
    deploy(provider, deployment)
    assert len(operator.redis_instances()) == 1
    assert api_calls.count(("cache", "create_instance")) == 1


def test_a_name_held_by_another_deployment_is_never_adopted_or_deleted(
    provider: GcpProvider, operator: Operator
) -> None:
    first = redis(provider)
    deploy(provider, first)
    second = redis(provider)  # same namespace/name, another deployment

    with pytest.raises(ProvisioningFailed, match=first.id):
        deploy(provider, second)
    assert provider.get_status(second).state == "missing"
    assert provider.delete(second) is True
    assert len(operator.redis_instances()) == 1


def test_a_failed_create_removes_the_instance_and_fails_with_googles_reason(
    provider: GcpProvider, emulator: GcpEmulator, operator: Operator
) -> None:
    emulator.fail_next_operation(
        "redis", kind="CREATE", status="RESOURCE_EXHAUSTED", message="no capacity in zone"
    )
    deployment = redis(provider)
    deploy(provider, deployment)

    failed = settle(provider, deployment)

    assert operator.redis_instances() == []
    assert failed.state == "failed"
    assert "create failed: no capacity in zone" in failed.message


def test_an_earlier_deployments_failed_create_does_not_fail_a_new_one_of_the_same_name(
    provider: GcpProvider, emulator: GcpEmulator, operator: Operator
) -> None:
    emulator.fail_next_operation(
        "redis", kind="CREATE", status="RESOURCE_EXHAUSTED", message="no capacity in zone"
    )
    first = redis(provider)
    deploy(provider, first)
    assert settle(provider, first).state == "failed"

    # The same namespace and name again: the same instance name, a new deployment.
    second = redis(provider)
    assert provider.identifier(second) == provider.identifier(first)
    before = provider.get_status(second)
    assert before.state == "missing", before.message
    assert provider.get_status(first).state == "failed"  # still told to the first

    deploy(provider, second)
    assert settle(provider, second).state == "available"
    assert len(operator.redis_instances()) == 1


def test_drift_after_a_resize_behind_the_brokers_back(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    deployment = redis(provider)
    deploy(provider, deployment)
    settle(provider, deployment)
    with emulator.edit():
        instance = next(iter(emulator.redis_instances.values()))
        instance["memorySizeGb"] = 8

    report = drift.compare(deployment.spec.wire(), provider.get_status(deployment).actual_spec)
    assert report.details == ["Size mismatch: desired=small, actual=large"]


def test_delete_twice_succeeds(provider: GcpProvider, operator: Operator) -> None:
    deployment = redis(provider)
    deploy(provider, deployment)
    settle(provider, deployment)

    assert delete_until_done(provider, deployment) > 1  # the delete is an operation
    assert operator.redis_instances() == []
    assert provider.delete(deployment) is True


def test_snapshot_keeps_the_instance_as_retain_does(
    provider: GcpProvider, operator: Operator, emulator: GcpEmulator
) -> None:
    deployment = redis(provider, deletion_policy=DeletionPolicy.SNAPSHOT)
    deploy(provider, deployment)
    settle(provider, deployment)
    emulator.operation_polls = 0

    assert provider.delete(deployment) is True

    (instance,) = operator.redis_instances()
    assert dict(instance.labels) == expected_labels(deployment, "kidp-retained")


def test_quota_counts_the_regions_capacity_against_service_usage(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    deploy(provider, redis(provider, name="existing", size="medium"))  # 4 GB
    emulator.set_quota(
        provider.project,
        "redis.googleapis.com",
        "redis.googleapis.com/total_capacity_gb",
        6,
        region=REGION,
    )
    emulator.set_quota(
        provider.project, "redis.googleapis.com", "redis.googleapis.com/total_capacity_gb", 1000
    )

    fits = provider.validate_quota(redis(provider, name="small-one", size="small"))
    assert fits.checked and fits.details["max"] == 6 and fits.details["used"] == 4
    with pytest.raises(QuotaExceeded) as caught:
        provider.validate_quota(redis(provider, name="big-one", size="large"))
    assert caught.value.details == {
        "quota": "redis.googleapis.com/total_capacity_gb",
        "used": 4,
        "max": 6,
        "requested": 8,
        "unit": "GB",
        "source": "serviceusage",
    }
    assert "europe-west1" in caught.value.message


def test_without_a_published_quota_googles_documented_default_applies(
    provider: GcpProvider,
) -> None:
    report = provider.validate_quota(redis(provider))
    assert report.checked
    assert report.details["max"] == 1000
    assert report.details["source"] == "documented default"


def test_rotation_is_refused_for_a_cache(provider: GcpProvider) -> None:
    from kidp.ports import Credentials

    deployment = redis(provider)
    deploy(provider, deployment)
    with pytest.raises(ProvisioningFailed, match="no credentials to rotate"):
        provider.rotate_credentials(deployment, Credentials(username="default", password="x" * 20))
