"""Cloud Storage buckets through google-cloud-storage, on the stand-in."""

from __future__ import annotations

from typing import Any

from tests.providers.deployments import make_deployment
from tests.providers.gcp.support import Operator, delete_until_done, deploy, expected_labels

from kidp import drift
from kidp.gcp_emulator import GcpEmulator
from kidp.models import DeletionPolicy, Deployment, ResourceType
from kidp.providers.gcp import GcpProvider


def bucket(provider: GcpProvider, **spec: Any) -> Deployment:
    return make_deployment(provider, ResourceType.BUCKET, **spec)


def test_a_versioned_private_bucket_in_the_region_with_labels(
    provider: GcpProvider, operator: Operator
) -> None:
    deployment = bucket(provider, versioning=True)
    resource = deploy(provider, deployment)

    (made,) = operator.buckets()
    assert made.name == provider.identifier(deployment)
    assert deployment.id.removeprefix("deploy-")[:8] in made.name  # bucket names are global
    assert made.versioning_enabled is True
    assert made.location == "EUROPE-WEST1"
    assert made.labels == expected_labels(deployment)
    assert made.iam_configuration.uniform_bucket_level_access_enabled is True
    assert made.iam_configuration.public_access_prevention == "enforced"
    assert resource.state == "available"
    assert resource.cloud_resource_id == f"projects/_/buckets/{made.name}"
    assert resource.actual_spec == {"versioning": True, "encryptionAtRest": True}


def test_deploy_twice_adopts_one_bucket(
    provider: GcpProvider, operator: Operator, api_calls: list[tuple[str, str]]
) -> None:
    deployment = bucket(provider)
    deploy(provider, deployment)
    deploy(provider, deployment)
    assert len(operator.buckets()) == 1
    assert api_calls.count(("bucket", "buckets.insert")) == 1


def test_drift_when_versioning_is_turned_off(provider: GcpProvider, operator: Operator) -> None:
    deployment = bucket(provider, versioning=True)
    deploy(provider, deployment)
    (made,) = operator.buckets()
    made.versioning_enabled = False
    made.patch()

    report = drift.compare(deployment.spec.wire(), provider.get_status(deployment).actual_spec)
    assert report.details == ["Versioning mismatch: desired=True, actual=False"]


def test_delete_empties_every_version_then_removes_the_bucket(
    provider: GcpProvider, operator: Operator, emulator: GcpEmulator
) -> None:
    deployment = bucket(provider, versioning=True)
    deploy(provider, deployment)
    name = provider.identifier(deployment)
    for key in ("a.txt", "a.txt", "b/c.txt"):
        emulator.put_object(name, key)

    assert delete_until_done(provider, deployment) == 1
    assert operator.buckets() == []
    assert provider.delete(deployment) is True
    assert provider.get_status(deployment).state == "missing"


def test_a_big_bucket_is_emptied_over_several_calls(
    provider: GcpProvider, operator: Operator, emulator: GcpEmulator
) -> None:
    deployment = bucket(provider)
    deploy(provider, deployment)
    name = provider.identifier(deployment)
    for i in range(5):
        emulator.put_object(name, f"object-{i}")
    provider._kinds["storage"].delete_objects_per_call = 2  # type: ignore[attr-defined]

    assert delete_until_done(provider, deployment) == 3
    assert operator.buckets() == []


def test_snapshot_keeps_the_bucket_as_retain_does(
    provider: GcpProvider, operator: Operator
) -> None:
    deployment = bucket(provider, deletion_policy=DeletionPolicy.SNAPSHOT)
    deploy(provider, deployment)
    assert provider.delete(deployment) is True
    (kept,) = operator.buckets()
    assert kept.labels == expected_labels(deployment, "kidp-retained")
    assert provider.plan(deployment, {})["notes"] == [
        "Cloud Storage has no bucket snapshots: the Snapshot deletion policy keeps the "
        "bucket as Retain does"
    ]


def test_buckets_have_no_allocation_quota(provider: GcpProvider) -> None:
    report = provider.validate_quota(bucket(provider))
    assert report.checked is False
