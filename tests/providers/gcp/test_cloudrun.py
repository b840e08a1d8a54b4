"""Cloud Run services through google-cloud-run v2 (REST transport), on the stand-in."""

from __future__ import annotations

from typing import Any

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
from kidp import tags as tagging
from kidp.gcp_emulator import GcpEmulator
from kidp.models import Deployment, ResourceType
from kidp.providers.gcp import GcpProvider


def service(provider: GcpProvider, **spec: Any) -> Deployment:
    spec.setdefault("image", "europe-docker.pkg.dev/team-a/app/orders:1.4.2")
    return make_deployment(provider, ResourceType.SERVICE, **spec)


def test_a_service_runs_the_image_with_the_presets_limits_and_warm_replicas(
    provider: GcpProvider, operator: Operator
) -> None:
    deployment = service(provider, size="medium", port=9000, replicas=3)
    assert deploy(provider, deployment).state == "creating"
    ready = settle(provider, deployment)

    (made,) = operator.run_services()
    assert made.name == f"projects/{provider.project}/locations/{REGION}/services/" + (
        provider.identifier(deployment)
    )
    container = made.template.containers[0]
    assert container.image == deployment.spec.image
    assert container.ports[0].container_port == 9000
    assert dict(container.resources.limits) == {"cpu": "2", "memory": "4Gi"}
    assert made.template.scaling.min_instance_count == 3
    assert dict(made.labels) == expected_labels(deployment)
    assert ready.state == "available"
    assert ready.endpoint == made.uri.removeprefix("https://") and ready.port == 443
    assert not drift.compare(deployment.spec.wire(), ready.actual_spec).detected


def test_deploy_twice_adopts_one_service(
    provider: GcpProvider, operator: Operator, api_calls: list[tuple[str, str]]
) -> None:
    deployment = service(provider)
    deploy(provider, deployment)
    deploy(provider, deployment)
    assert len(operator.run_services()) == 1
    assert api_calls.count(("service", "create_service")) == 1


def test_a_revision_that_never_gets_ready_fails_with_the_condition(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    emulator.fail_next_operation("run", kind="CREATE", message="image not found")
    deployment = service(provider)
    deploy(provider, deployment)

    failed = settle(provider, deployment)

    assert failed.state == "failed"
    assert "CONTAINER_MISSING" in failed.message


def test_drift_when_the_image_is_changed_elsewhere(
    provider: GcpProvider, operator: Operator
) -> None:
    deployment = service(provider)
    deploy(provider, deployment)
    settle(provider, deployment)
    (made,) = operator.run_services()
    made.template.containers[0].image = "europe-docker.pkg.dev/team-a/app/orders:2.0.0"
    operator.run.update_service(service=made)

    report = drift.compare(deployment.spec.wire(), provider.get_status(deployment).actual_spec)
    assert report.details == [
        f"Image mismatch: desired={deployment.spec.image}, "
        "actual=europe-docker.pkg.dev/team-a/app/orders:2.0.0"
    ]


def test_delete_twice_succeeds(provider: GcpProvider, operator: Operator) -> None:
    deployment = service(provider)
    deploy(provider, deployment)
    settle(provider, deployment)
    assert delete_until_done(provider, deployment) >= 1
    assert operator.run_services() == []
    assert provider.delete(deployment) is True


def test_plan_shows_the_create_request(
    provider: GcpProvider, api_calls: list[tuple[str, str]]
) -> None:
    deployment = service(provider, replicas=2)
    plan = provider.plan(deployment, tagging.logical_tags(deployment))
    (request,) = plan["requests"]
    assert api_calls == []
    assert request["method"] == "POST"
    assert request["url"] == (
        f"{provider.api_endpoint}/v2/projects/{provider.project}/locations/{REGION}/services"
        f"?serviceId={plan['identifier']}"
    )
    assert request["body"]["template"]["scaling"] == {"minInstanceCount": 2}
    assert request["body"]["labels"] == expected_labels(deployment)


def test_quota_counts_services_in_the_region(provider: GcpProvider, emulator: GcpEmulator) -> None:
    import pytest

    from kidp.errors import QuotaExceeded

    deploy(provider, service(provider, name="one"))
    emulator.set_quota(
        provider.project, "run.googleapis.com", "run.googleapis.com/services", 1, region=REGION
    )
    with pytest.raises(QuotaExceeded, match="1 services used of 1 allowed"):
        provider.validate_quota(service(provider, name="two"))
