"""The admin API stand-in answers as Google's APIs do: error bodies, operations, faults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from tests.emulated_cloud_support import emulated_settings, healthy_broker

from kidp.gcp_emulator import GcpEmulator, start_gcp_emulator


@pytest.fixture
def emulator() -> Iterator[GcpEmulator]:
    emulator = start_gcp_emulator(operation_polls=2)
    yield emulator
    emulator.stop()


def test_errors_carry_googles_error_body(emulator: GcpEmulator) -> None:
    answer = httpx.get(f"{emulator.url}v1/projects/p/instances/nope")
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == 404 and error["status"] == "NOT_FOUND"
    assert error["errors"][0]["reason"] == "instanceDoesNotExist"
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert httpx.get(f"{emulator.url}v9/unknown").status_code == 404


def test_sql_operations_go_pending_running_done_as_they_are_read(emulator: GcpEmulator) -> None:
    body = {"name": "db-1", "databaseVersion": "POSTGRES_16", "settings": {"tier": "db-f1"}}
    op = httpx.post(f"{emulator.url}v1/projects/p/instances", json=body).json()
    assert (op["kind"], op["status"], op["operationType"]) == ("sql#operation", "PENDING", "CREATE")
    url = f"{emulator.url}v1/projects/p/operations/{op['name']}"
    assert httpx.get(url).json()["status"] == "RUNNING"
    assert httpx.get(url).json()["status"] == "DONE"
    assert httpx.get(f"{emulator.url}v1/projects/p/instances/db-1").json()["state"] == "RUNNABLE"
    again = httpx.post(f"{emulator.url}v1/projects/p/instances", json=body)
    assert again.status_code == 409


def test_a_deleted_sql_name_stays_taken(emulator: GcpEmulator) -> None:
    emulator.operation_polls = 0
    body = {"name": "db-2", "databaseVersion": "MYSQL_8_0", "settings": {"tier": "db-f1"}}
    httpx.post(f"{emulator.url}v1/projects/p/instances", json=body)
    httpx.delete(f"{emulator.url}v1/projects/p/instances/db-2")
    assert httpx.get(f"{emulator.url}v1/projects/p/instances/db-2").status_code == 404
    reused = httpx.post(f"{emulator.url}v1/projects/p/instances", json=body)
    assert reused.status_code == 409 and "one week" in reused.json()["error"]["message"]


def test_the_redis_client_parses_operations_and_conflicts(emulator: GcpEmulator) -> None:
    from google.cloud import redis_v1

    client = redis_v1.CloudRedisClient(
        credentials=AnonymousCredentials(),
        transport="rest",
        client_options={"api_endpoint": emulator.url.rstrip("/")},
    )
    parent = "projects/p/locations/us-central1"
    instance = redis_v1.Instance(tier=redis_v1.Instance.Tier.BASIC, memory_size_gb=1)
    operation = client.create_instance(parent=parent, instance_id="cache", instance=instance)
    metadata = redis_v1.OperationMetadata.deserialize(operation.operation.metadata.value)
    assert metadata.target == f"{parent}/instances/cache" and metadata.verb == "create"
    with pytest.raises(exceptions.Conflict):
        client.create_instance(parent=parent, instance_id="cache", instance=instance)
    assert operation.result(timeout=5).state == redis_v1.Instance.State.READY


def test_faults_answer_the_next_matching_requests_then_stop(emulator: GcpEmulator) -> None:
    emulator.fail_next(429, count=2, method="GET", path="/instances")
    url = f"{emulator.url}v1/projects/p/instances"
    first, second, third = httpx.get(url), httpx.get(url), httpx.get(url)
    assert [first.status_code, second.status_code, third.status_code] == [429, 429, 200]
    assert first.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    emulator.fail_next(0)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url)


def test_quota_metrics_are_served_as_service_usage_does(emulator: GcpEmulator) -> None:
    emulator.set_quota("p", "run.googleapis.com", "run.googleapis.com/services", 5, region="eu")
    metrics = httpx.get(
        f"{emulator.url}v1beta1/projects/p/services/run.googleapis.com/consumerQuotaMetrics"
    ).json()["metrics"]
    (bucket,) = metrics[0]["consumerQuotaLimits"][0]["quotaBuckets"]
    assert bucket == {"effectiveLimit": "5", "defaultLimit": "5", "dimensions": {"region": "eu"}}


@pytest.mark.pubsub
def test_the_emulated_cloud_gives_settings_for_a_working_broker(
    tmp_path: Path, pubsub_emulator_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pubsub_emulator_host proves the emulator is installed (or fails under
    # CI=true); the starter runs one of its own, as serve --emulate does.
    from kidp.gcp_emulator import start_gcp
    from kidp.queues.pubsub import PubSubJobQueue
    from kidp.secrets.gcpsecretmanager import SecretManagerStore

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator_host)  # restored afterwards
    cloud = start_gcp(tmp_path)
    try:
        settings = emulated_settings(
            cloud,
            monkeypatch,
            state_dir=tmp_path / "state",
            store_url=f"sqlite:///{tmp_path}/broker.db",
        )
        assert settings.cloud == "gcp" and settings.gcp_topics
        with healthy_broker(settings) as service:
            assert isinstance(service.queue, PubSubJobQueue)
            assert isinstance(service.secrets, SecretManagerStore)
    finally:
        cloud.stop()
