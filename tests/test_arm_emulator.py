"""The ARM stand-in speaks ARM's protocol: checked with the real management
clients and their own pollers (``polling_interval=0``), which follow the
long-running-operation headers to the end as they would against Azure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.core.rest import HttpRequest
from azure.mgmt.redis import RedisManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from azure.mgmt.sql import SqlManagementClient
from azure.mgmt.storage import StorageManagementClient
from tests.emulated_cloud_support import emulated_settings, healthy_broker

from kidp.arm_emulator import (
    ArmEmulatorCredential,
    RunningArmEmulator,
    start_arm_emulator,
    start_azure,
)

GROUP = "kidp"
SERVER = {
    "location": "westeurope",
    "tags": {"team": "a"},
    "properties": {"administratorLogin": "admin", "administratorLoginPassword": "S3cret-Pa55"},
}


@pytest.fixture
def arm(tmp_path: Path) -> Iterator[RunningArmEmulator]:
    emulator = start_arm_emulator(directory=tmp_path, polls=3)
    yield emulator
    emulator.stop()


def client(factory: Any, arm: RunningArmEmulator, **kwargs: Any) -> Any:
    return factory(
        ArmEmulatorCredential(),
        arm.subscription_id,
        base_url=arm.url,
        connection_verify=str(arm.ca_file),
        **kwargs,
    )


def raw(arm: RunningArmEmulator, method: str, path: str) -> Any:
    """A request through a management client's pipeline (auth, TLS), unparsed,
    without the client's retries (they would hide an injected fault)."""
    resources = client(ResourceManagementClient, arm, retry_total=0)
    return resources.send_request(HttpRequest(method, path))


def test_a_put_with_azure_async_operation_runs_to_succeeded_through_the_sdk_poller(
    arm: RunningArmEmulator,
) -> None:
    sql = client(SqlManagementClient, arm)
    poller = sql.servers.begin_create_or_update(GROUP, "kidp-one", SERVER, polling_interval=0)
    server = poller.result()
    assert server.state == "Ready"
    assert server.fully_qualified_domain_name == "kidp-one.database.windows.net"
    # The status resource was polled until terminal: one InProgress per read before it.
    status_reads = [p for m, p in arm.requests if "/operationStatuses/" in p]
    assert len(status_reads) >= 2
    final = raw(arm, "GET", status_reads[-1]).json()
    assert final["status"] == "Succeeded" and "endTime" in final
    # ARM never returns a secret it was given.
    got = raw(arm, "GET", f"{server.id}?api-version=2023-08-01").json()
    assert "administratorLoginPassword" not in got["properties"]
    assert got["properties"]["provisioningState"] == "Succeeded"


def test_location_style_create_and_delete_run_to_the_end(arm: RunningArmEmulator) -> None:
    storage = client(StorageManagementClient, arm)
    body = {"location": "westeurope", "sku": {"name": "Standard_LRS"}, "kind": "StorageV2"}
    first = raw(
        arm,
        "GET",
        f"/subscriptions/{arm.subscription_id}/resourceGroups/{GROUP}"
        "/providers/Microsoft.Storage/storageAccounts/kidpacct?api-version=2024-01-01",
    )
    assert first.status_code == 404
    assert first.json()["error"]["code"] == "ResourceNotFound"
    account = storage.storage_accounts.begin_create(
        GROUP, "kidpacct", body, polling_interval=0
    ).result()
    assert account.provisioning_state == "Succeeded"
    assert account.primary_endpoints.blob == "https://kidpacct.blob.core.windows.net/"

    redis = client(RedisManagementClient, arm)
    redis.redis.begin_create(
        GROUP, "kidp-cache", {"location": "westeurope", "properties": {}}, polling_interval=0
    ).result()
    # Retry-After: 1 holds the SDK's poller back after its first poll, long enough
    # to look in between (the operation needs three reads).
    arm.retry_after = 1
    deleting = redis.redis.begin_delete(GROUP, "kidp-cache", polling_interval=0)
    assert redis.redis.get(GROUP, "kidp-cache").provisioning_state == "Deleting"
    deleting.result()  # the poller follows the 202's Location until it answers 204
    assert any("/operationResults/" in path for _, path in arm.requests)
    with pytest.raises(ResourceNotFoundError):
        redis.redis.get(GROUP, "kidp-cache")


def test_a_failed_operation_fails_the_poller_and_leaves_a_failed_resource(
    arm: RunningArmEmulator,
) -> None:
    arm.fail_provisioning("kidp-bad", code="ZonalAllocationFailed", message="no capacity")
    sql = client(SqlManagementClient, arm)
    with pytest.raises(HttpResponseError) as failed:
        sql.servers.begin_create_or_update(GROUP, "kidp-bad", SERVER, polling_interval=0).result()
    assert "ZonalAllocationFailed" in str(failed.value)
    server = sql.servers.get(GROUP, "kidp-bad")
    got = raw(arm, "GET", f"{server.id}?api-version=2023-08-01").json()
    assert got["properties"]["provisioningState"] == "Failed"
    log = raw(
        arm,
        "GET",
        f"/subscriptions/{arm.subscription_id}/providers/Microsoft.Insights/eventtypes/"
        f"management/values?api-version=2015-04-01&$filter=resourceUri eq '{server.id}'",
    ).json()["value"]
    (event,) = log
    assert event["status"]["value"] == "Failed"
    assert json.loads(event["properties"]["statusMessage"])["error"]["code"] == (
        "ZonalAllocationFailed"
    )


def test_errors_come_in_arms_shape(arm: RunningArmEmulator) -> None:
    sql = client(SqlManagementClient, arm)
    with pytest.raises(HttpResponseError) as bad_name:
        sql.servers.begin_create_or_update(GROUP, "Bad_Name", SERVER, polling=False)
    assert bad_name.value.status_code == 400
    assert bad_name.value.error.code == "InvalidResourceName"
    with pytest.raises(ResourceNotFoundError) as no_parent:
        sql.databases.get(GROUP, "kidp-none", "db")
    assert no_parent.value.error.code == "ParentResourceNotFound"
    with pytest.raises(ResourceNotFoundError) as no_group:
        sql.servers.get("nowhere", "kidp-none")
    assert no_group.value.error.code == "ResourceGroupNotFound"

    sql.servers.begin_create_or_update(GROUP, "kidp-busy", SERVER, polling=False)
    with pytest.raises(HttpResponseError) as busy:
        sql.servers.begin_delete(GROUP, "kidp-busy", polling=False)
    assert busy.value.status_code == 409
    assert busy.value.error.code == "AnotherOperationInProgress"

    missing_version = raw(arm, "GET", f"/subscriptions/{arm.subscription_id}/resources")
    assert missing_version.status_code == 400
    assert missing_version.json()["error"]["code"] == "MissingApiVersionParameter"


def test_injected_faults_answer_with_status_code_and_retry_after(arm: RunningArmEmulator) -> None:
    arm.throttle(count=1, retry_after=7)
    arm.fail_requests(503, count=1, path="/resourcegroups/")
    first = raw(arm, "GET", f"/subscriptions/{arm.subscription_id}/resources?api-version=1")
    assert first.status_code == 429
    assert first.headers["Retry-After"] == "7"
    assert first.json()["error"]["code"] == "TooManyRequests"
    other = raw(arm, "GET", f"/subscriptions/{arm.subscription_id}/resources?api-version=1")
    assert other.status_code == 200  # the 503 only matches resource-group paths
    group = raw(
        arm, "GET", f"/subscriptions/{arm.subscription_id}/resourcegroups/{GROUP}?api-version=1"
    )
    assert group.status_code == 503


def test_generic_lists_filter_by_tag(arm: RunningArmEmulator) -> None:
    sql = client(SqlManagementClient, arm)
    sql.servers.begin_create_or_update(GROUP, "kidp-a", SERVER, polling_interval=0).result()
    other = {**SERVER, "tags": {"team": "b"}}
    sql.servers.begin_create_or_update(GROUP, "kidp-b", other, polling_interval=0).result()
    resources = client(ResourceManagementClient, arm)
    team_a = resources.resources.list_by_resource_group(
        GROUP, filter="tagName eq 'team' and tagValue eq 'a'"
    )
    assert [r.name for r in team_a] == ["kidp-a"]
    assert {r.name for r in resources.resources.list_by_resource_group(GROUP)} == {
        "kidp-a",
        "kidp-b",
    }


def test_a_bearer_token_is_required_and_plain_http_is_refused_by_the_sdk(
    arm: RunningArmEmulator,
) -> None:
    wrong = ResourceManagementClient(
        ArmEmulatorCredential("wrong"),
        arm.subscription_id,
        base_url=arm.url,
        connection_verify=str(arm.ca_file),
    )
    with pytest.raises(ClientAuthenticationError) as refused:
        wrong.resource_groups.get(GROUP)
    assert refused.value.status_code == 401
    assert client(ResourceManagementClient, arm).resource_groups.get(GROUP).name == GROUP
    plain = start_arm_emulator(tls=False)
    try:
        resources = ResourceManagementClient(
            ArmEmulatorCredential(), plain.subscription_id, base_url=plain.url, retry_total=0
        )
        # Why the stand-in serves HTTPS: the clients never send a token over http.
        with pytest.raises(ServiceRequestError, match="non-TLS"):
            resources.resource_groups.get(GROUP)
    finally:
        plain.stop()


@pytest.mark.azurite
def test_the_azure_starter_gives_settings_for_a_working_emulated_broker(
    tmp_path: Path, azurite: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The azurite fixture proves Azurite is installed (or fails under CI=true);
    # the starter runs one of its own, as serve --emulate does.
    cloud = start_azure(tmp_path)
    try:
        settings = emulated_settings(cloud, monkeypatch, state_dir=tmp_path / "state")
        assert settings.cloud == "azure"
        assert settings.azure_credential == "emulator"
        assert Path(str(settings.azure_arm_ca_file)).is_file()
        from kidp.queues.azurequeue import AzureStorageJobQueue
        from kidp.secrets.keyvault import KeyVaultSecretStore
        from kidp.stores.azuretable import TableDeploymentStore

        with healthy_broker(settings) as service:
            assert isinstance(service.store, TableDeploymentStore)
            assert isinstance(service.queue, AzureStorageJobQueue)
            assert isinstance(service.secrets, KeyVaultSecretStore)
    finally:
        cloud.stop()
