"""GcpProvider's plumbing: the port, errors and retries, labels and orphan
listing, quotas, the composition root, and the whole broker on the stand-in."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from tests.providers.deployments import make_deployment, postgres
from tests.providers.gcp.support import (
    CREDS,
    PASSWORD,
    REGION,
    Operator,
    deploy,
    new_provider,
    settle,
)

from kidp import tags as tagging
from kidp.errors import CloudUnavailable, ProvisioningFailed, QuotaExceeded
from kidp.gcp_emulator import GcpEmulator
from kidp.models import Phase, ResourceType
from kidp.ports import CloudProvider
from kidp.providers.gcp import GcpProvider
from kidp.secretmanager_emulator import start_secretmanager_emulator


def test_satisfies_the_cloud_provider_protocol_and_offers_the_catalogue(
    provider: GcpProvider, emulator: GcpEmulator, gcp_project: str
) -> None:
    assert isinstance(provider, CloudProvider)
    assert provider.name == "gcp" and provider.region == REGION
    supported = provider.supported()
    assert supported[ResourceType.DATABASE] == {
        "postgresql": ["12", "13", "14", "15", "16"],
        "mysql": ["5.7", "8.0", "8.4"],
    }
    assert supported[ResourceType.CACHE] == {"redis": ["6.2", "7.0", "7.2"]}
    assert ResourceType.TOPIC not in supported  # topics=False: no Pub/Sub here
    with_topics = new_provider(emulator, gcp_project, topics=True)
    assert with_topics.supported()[ResourceType.TOPIC] == {"pubsub": ["v1"]}


def test_an_engine_google_does_not_offer_is_refused(provider: GcpProvider) -> None:
    deployment = make_deployment(provider, ResourceType.CACHE, engine="redis")
    memcached = deployment.model_copy(
        update={"spec": deployment.spec.model_copy(update={"engine": "memcached"})}
    )
    with pytest.raises(ProvisioningFailed, match="supported: redis"):
        provider.plan(memcached, {})


def test_unencrypted_storage_cannot_be_honoured(provider: GcpProvider) -> None:
    deployment = postgres(provider, encryption={"at_rest": False, "in_transit": True})
    with pytest.raises(ProvisioningFailed, match="encrypts every database"):
        deploy(provider, deployment, CREDS)


def test_throttling_that_outlasts_the_retries_is_temporary(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    emulator.fail_next(429, count=1000, path="/instances")
    started = time.monotonic()
    with pytest.raises(CloudUnavailable) as caught:
        deploy(provider, postgres(provider), CREDS)
    assert time.monotonic() - started < 5
    assert caught.value.retry_after == 5.0
    assert "HTTP 429" in caught.value.message and "throttled" in caught.value.message
    assert caught.value.to_body()["code"] == 503


def test_a_throttled_create_is_retried_and_makes_one_instance(
    emulator: GcpEmulator, gcp_project: str, operator: Operator
) -> None:
    calls: list[tuple[str, str]] = []
    provider = new_provider(emulator, gcp_project, calls, retry_seconds=5.0)
    emulator.fail_next(429, method="POST", path="/instances$")
    deployment = postgres(provider)

    deploy(provider, deployment, CREDS)

    assert len(operator.sql_instances()) == 1
    posts = [r for r in emulator.requests if r[0] == "POST" and r[1].endswith("/instances")]
    assert len(posts) == 2  # the provider retried the throttled insert once
    assert calls.count(("database", "instances.insert")) == 1


def test_server_faults_on_every_api_are_temporary(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    kinds = [
        postgres(provider),
        make_deployment(provider, ResourceType.CACHE, engine="redis"),
        make_deployment(provider, ResourceType.BUCKET),
        make_deployment(provider, ResourceType.SERVICE, image="nginx:1.27"),
    ]
    for deployment in kinds:
        emulator.fail_next(503, count=1000)
        with pytest.raises(CloudUnavailable, match="HTTP 503") as caught:
            provider.get_status(deployment)
        assert caught.value.retry_after == 15.0
        emulator.faults.clear()


def test_no_answer_at_all_is_temporary(provider: GcpProvider, emulator: GcpEmulator) -> None:
    emulator.fail_next(0, count=1000)
    with pytest.raises(CloudUnavailable, match="no answer"):
        provider.get_status(make_deployment(provider, ResourceType.CACHE, engine="redis"))


def test_an_endpoint_that_is_not_listening_is_temporary(gcp_project: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = GcpProvider(
        project=gcp_project,
        region=REGION,
        credentials=AnonymousCredentials(),
        api_endpoint=f"http://127.0.0.1:{port}",
        retry_seconds=0.3,
        timeout=2.0,
        topics=False,
    )
    for deployment in (
        postgres(provider),
        make_deployment(provider, ResourceType.BUCKET),
        make_deployment(provider, ResourceType.SERVICE, image="nginx:1.27"),
    ):
        with pytest.raises(CloudUnavailable):
            provider.get_status(deployment)
    with pytest.raises(CloudUnavailable):
        provider.check()


def test_check_answers_and_a_refused_credential_is_unavailable(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    provider.check()
    emulator.fail_next(403, message="caller lacks cloudsql.instances.list")
    with pytest.raises(CloudUnavailable, match="refused the broker's credentials"):
        provider.check()


def test_a_full_allocation_quota_at_create_is_quota_exceeded(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    emulator.fail_next(
        403, method="POST", path="/instances", message="Quota exceeded", reason="quotaExceeded"
    )
    deployment = make_deployment(provider, ResourceType.CACHE, engine="redis")
    with pytest.raises(QuotaExceeded, match="HTTP 403") as caught:
        deploy(provider, deployment)
    assert caught.value.to_body()["code"] == 422
    # A 403 that is not about quota is a refusal on the merits.
    emulator.fail_next(403, method="POST", path="/instances", message="Permission denied")
    with pytest.raises(ProvisioningFailed, match="Permission denied"):
        deploy(provider, deployment)


def test_database_quota_from_service_usage(provider: GcpProvider, emulator: GcpEmulator) -> None:
    deploy(provider, postgres(provider, name="first"), CREDS)
    unchecked = provider.validate_quota(postgres(provider, name="second"))
    assert unchecked.details["source"] == "documented default"
    assert unchecked.details["max"] == 1000 and unchecked.details["used"] == 1

    emulator.set_quota(
        provider.project, "sqladmin.googleapis.com", "sqladmin.googleapis.com/instances", 1
    )
    with pytest.raises(QuotaExceeded, match="1 instances used of 1 allowed") as caught:
        provider.validate_quota(postgres(provider, name="second"))
    assert caught.value.to_body()["code"] == 422


def test_list_managed_decodes_labels_and_finds_unlabelled_kidp_resources(
    provider: GcpProvider, operator: Operator
) -> None:
    database = postgres(provider)
    deploy(provider, database, CREDS)
    cache = make_deployment(provider, ResourceType.CACHE, engine="redis")
    deploy(provider, cache)
    stray = operator.storage.bucket("kidp-stray-bucket")
    operator.storage.create_bucket(stray)
    operator.storage.create_bucket(operator.storage.bucket("someone-elses-bucket"))
    foreign = operator.storage.bucket("kidp-foreign-labelled")
    foreign.labels = {"owner": "another-team"}
    operator.storage.create_bucket(foreign)

    listed = {r.name: r for r in provider.list_managed()}

    assert set(listed) == {
        provider.identifier(database),
        provider.identifier(cache),
        "kidp-stray-bucket",
        "kidp-foreign-labelled",
    }
    for deployment in (database, cache):
        resource = listed[provider.identifier(deployment)]
        assert resource.tagged is True
        decoded = tagging.decode(resource.tags, dialect="gcp")
        assert decoded[tagging.DEPLOYMENT_ID] == deployment.id
        assert decoded[tagging.TEAM] == "payments"
    assert listed[provider.identifier(database)].resource_type is ResourceType.DATABASE
    assert listed["kidp-stray-bucket"].tagged is False
    assert listed["kidp-stray-bucket"].resource_type is ResourceType.BUCKET


def test_list_managed_leaves_out_what_another_manager_labels_as_its_own(
    provider: GcpProvider, operator: Operator
) -> None:
    """The broker's own infrastructure (infra/gcp labels it managed-by
    kidp-broker-infra) and what a Google service manages (the Cloud Run
    service behind each Cloud Function, labelled goog-managed-by) are named
    kidp-* too, but are somebody else's: not untagged look-alikes."""
    from google.cloud import run_v2

    infra = tagging.encode({tagging.MANAGED_BY: "kidp-broker-infra"}, dialect="gcp")
    store = {
        "name": "kidp-store",
        "databaseVersion": "POSTGRES_18",
        "region": REGION,
        "settings": {"tier": "db-custom-1-3840", "edition": "ENTERPRISE", "userLabels": infra},
    }
    operator.sql.instances().insert(project=provider.project, body=store).execute()
    source = operator.storage.bucket("kidp-prod-kidp-function-source")
    source.labels = infra
    operator.storage.create_bucket(source)
    function = run_v2.Service(
        labels={"goog-managed-by": "cloudfunctions"},
        template=run_v2.RevisionTemplate(containers=[run_v2.Container(image="gcf/api")]),
    )
    operator.run.create_service(parent=operator.location, service=function, service_id="kidp-api")
    operator.storage.create_bucket(operator.storage.bucket("kidp-stray-bucket"))

    listed = {r.name: r for r in provider.list_managed()}

    assert set(listed) == {"kidp-stray-bucket"}
    assert listed["kidp-stray-bucket"].tagged is False


def test_adc_is_not_touched_until_a_call_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import google.auth
    from google.auth import exceptions as auth_exceptions

    asked: list[str] = []

    def no_credentials(**_: Any) -> Any:
        asked.append("default")
        raise auth_exceptions.DefaultCredentialsError("no ADC on this machine")

    monkeypatch.setattr(google.auth, "default", no_credentials)
    provider = GcpProvider(project="p", region=REGION, api_endpoint="http://127.0.0.1:9")
    deployment = make_deployment(provider, ResourceType.BUCKET)
    assert provider.plan(deployment, {})["identifier"].startswith("kidp-team-a-orders-")
    assert asked == []
    with pytest.raises(CloudUnavailable, match="no Google credentials"):
        provider.get_status(deployment)
    assert asked == ["default"]


def test_bootstrap_builds_the_gcp_provider_from_settings() -> None:
    from kidp.bootstrap import PROVIDERS, build_provider
    from kidp.observability import Metrics
    from kidp.settings import Settings

    settings = Settings.from_env(
        {
            "KIDP_CLOUD": "gcp",
            "KIDP_REGION": REGION,
            "KIDP_GCP_PROJECT": "acme-platform",
            "KIDP_GCP_API_ENDPOINT": "http://127.0.0.1:9/",
            "KIDP_GCP_NETWORK": "projects/acme-platform/global/networks/kidp",
            "KIDP_GCP_TOPICS": "false",
        }
    )
    provider = build_provider(settings, Metrics())
    assert "gcp" in PROVIDERS
    assert isinstance(provider, GcpProvider)
    assert provider.project == "acme-platform" and provider.region == REGION
    assert provider.endpoint("sqladmin") == "http://127.0.0.1:9"
    assert provider.endpoint("pubsub") == "https://pubsub.googleapis.com"
    assert provider.network == "projects/acme-platform/global/networks/kidp"
    assert ResourceType.TOPIC not in provider.supported()


# ----------------------------------------------------------------- the broker


def test_the_whole_broker_provisions_to_ready_and_deletes_on_gcp(
    make_broker: Any,
    emulator: GcpEmulator,
    gcp_project: str,
    operator: Operator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = new_provider(emulator, gcp_project)
    # Credentials go to Secret Manager (the stand-in), as on GCP.
    secrets = start_secretmanager_emulator()
    h = make_broker(
        adapters={"provider": provider},
        cloud="gcp",
        region=REGION,
        gcp_project=gcp_project,
        gcp_secretmanager_endpoint=secrets.url,
    )

    accepted = h.submit()
    h.drain()

    deployment = h.store.get(accepted.deployment_id)
    assert deployment.phase is Phase.READY, deployment.message
    ready = h.receiver.log[-1][1]
    assert ready["phase"] == "Ready"
    assert ready["additionalMetadata"]["secretRef"]["store"] == "gcp-secretmanager"
    assert ready["port"] == 5432 and ready["endpoint"]
    assert ready["estimatedMonthlyCost"] > 0
    (instance,) = operator.sql_instances()
    assert instance["settings"]["tier"] == "db-custom-2-4096"
    labels = tagging.decode(instance["settings"]["userLabels"], dialect="gcp")
    assert labels[tagging.DEPLOYMENT_ID] == accepted.deployment_id
    password = emulator.sql_password(gcp_project, instance["name"], "postgres")
    assert password and password not in str(h.receiver.log) and password not in caplog.text

    view = h.service.resources(h.admin, namespace="team-platform")["resources"][0]
    assert view["driftDetected"] is False

    h.deprovision(accepted.deployment_id)
    h.drain()

    assert h.store.get(accepted.deployment_id).phase is Phase.DELETED
    assert h.phases()[-2:] == ["Deleting", "Deleted"]
    assert operator.sql_instances() == []
    secrets.stop()


def test_the_broker_answers_a_topic_without_pubsub_with_a_400(
    make_broker: Any, emulator: GcpEmulator, gcp_project: str
) -> None:
    from kidp.errors import ValidationFailed

    h = make_broker(
        adapters={"provider": new_provider(emulator, gcp_project)},
        cloud="gcp",
        region=REGION,
        secret_store="local",
    )
    with pytest.raises(ValidationFailed, match="not supported"):
        h.submit(resourceType="topic", resourceName="orders", spec={"engine": "pubsub"})


def test_messages_never_carry_the_password(provider: GcpProvider, emulator: GcpEmulator) -> None:
    deployment = postgres(provider)
    deploy(provider, deployment, CREDS)
    settle(provider, deployment)
    emulator.fail_next(500, method="PUT", message=f"echo {PASSWORD}", count=1000)
    with pytest.raises(CloudUnavailable) as caught:
        provider.rotate_credentials(deployment, CREDS)
    assert PASSWORD not in caught.value.message
    assert caught.value.__cause__ is None
