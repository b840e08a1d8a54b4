"""AzureProvider against the ARM stand-in, through the real ``azure-mgmt-*`` clients.

Every assertion is checked the way an operator would: by reading what ARM
holds (the stand-in's resources, or the same management clients), never by
trusting what the provider says about itself.
"""

from __future__ import annotations

import json
import re
import string
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from tests.providers.azure.conftest import GROUP
from tests.providers.deployments import make_deployment

from kidp import catalog, drift, pricing
from kidp import tags as tagging
from kidp.arm_emulator import ArmEmulatorCredential, RunningArmEmulator
from kidp.emulator import free_port
from kidp.errors import (
    CloudUnavailable,
    ProvisioningFailed,
    QuotaExceeded,
    ValidationFailed,
)
from kidp.keyvault_emulator import start_keyvault
from kidp.models import (
    CloudResource,
    DeletionPolicy,
    Deployment,
    Phase,
    ResourceSpec,
    ResourceType,
)
from kidp.ports import CloudProvider, Credentials
from kidp.providers.azure import API_VERSIONS, AzureProvider
from kidp.providers.azure.dataplane import default_credential
from kidp.service import generate_password, secret_name

PASSWORD = "Qx7-vQ2_mP9.tR4~wZ8nB3yL6hDkA5sJ0cE"
CREDS = Credentials(username="kidpadmin", password=PASSWORD)
PREFIX = "platform.company.com_"


# --- helpers -----------------------------------------------------------------------


def expected_tags(deployment: Deployment, managed_by: str = "kidp") -> dict[str, str]:
    return {
        f"{PREFIX}managed-by": managed_by,
        f"{PREFIX}deployment-id": deployment.id,
        f"{PREFIX}resource-uid": deployment.resource_uid,
        f"{PREFIX}team": "payments",
        f"{PREFIX}application": "checkout",
    }


def deploy(
    provider: AzureProvider, deployment: Deployment, credentials: Credentials | None = None
) -> CloudResource:
    return provider.deploy(deployment, tagging.logical_tags(deployment), credentials)


def poll_until_available(
    provider: AzureProvider, deployment: Deployment, limit: int = 10
) -> tuple[CloudResource, int]:
    """get_status the way the worker's poll job does; returns the result and the polls."""
    for polls in range(1, limit + 1):
        resource = provider.get_status(deployment)
        if resource.state == "available":
            return resource, polls
        assert resource.state in ("creating", "modifying"), resource
    raise AssertionError(f"not available after {limit} polls: {resource}")


def delete_until_done(provider: AzureProvider, deployment: Deployment, limit: int = 6) -> int:
    for attempt in range(1, limit + 1):
        if provider.delete(deployment):
            return attempt
    raise AssertionError(f"delete did not finish in {limit} calls")


def of_type(arm: RunningArmEmulator, arm_type: str) -> list[dict[str, Any]]:
    return arm.resources(arm_type)


def ready(
    provider: AzureProvider, deployment: Deployment, credentials: Credentials | None = None
) -> CloudResource:
    deploy(provider, deployment, credentials)
    return poll_until_available(provider, deployment)[0]


# --- the port, the catalogue, the plan ------------------------------------------------


def test_satisfies_the_cloud_provider_protocol_and_hides_credentials(
    provider: AzureProvider,
) -> None:
    assert isinstance(provider, CloudProvider)
    assert provider.name == "azure"
    assert provider.region == "westeurope"
    assert "token" not in repr(provider).lower()


def test_supported_offers_topics_and_services_only_where_configured(
    make_provider: Any,
) -> None:
    full = make_provider().supported()
    assert full[ResourceType.DATABASE] == {
        "postgresql": ["13", "14", "15", "16"],
        "mysql": ["5.7", "8.0", "8.4"],
        "sqlserver": ["12.0"],
    }
    assert full[ResourceType.CACHE] == {"redis": ["6.0"]}
    assert full[ResourceType.TOPIC] == {"servicebus": ["1.0"]}
    assert full[ResourceType.BUCKET] == {"": []}
    assert full[ResourceType.SERVICE] == {"": []}

    bare = make_provider(servicebus_namespace=None, containerapps_environment=None)
    assert ResourceType.TOPIC not in bare.supported()
    assert ResourceType.SERVICE not in bare.supported()
    with pytest.raises(ValidationFailed, match="not supported by this broker"):
        catalog.normalize(ResourceType.TOPIC, ResourceSpec(engine="servicebus"), bare.supported())


def test_generated_database_passwords_meet_azure_complexity(provider: AzureProvider) -> None:
    for engine in ("sqlserver", "postgresql", "mysql"):
        deployment = make_deployment(provider, ResourceType.DATABASE, engine=engine)
        policy = provider.password_policy(deployment)
        assert policy is not None and policy.username == "kidpadmin"
        for _ in range(300):
            password = generate_password(policy.length, policy.alphabet)
            classes = [
                any(c in string.ascii_uppercase for c in password),
                any(c in string.ascii_lowercase for c in password),
                any(c in string.digits for c in password),
                any(not c.isalnum() for c in password),
            ]
            assert sum(classes) >= 3 and 8 <= len(password) <= 128
            # ... and the check deploy runs accepts every one of them.
            provider._kind(deployment).check_credentials(
                deployment, Credentials(policy.username, password)
            )
    for rtype, spec in (
        (ResourceType.CACHE, {"engine": "redis"}),
        (ResourceType.BUCKET, {}),
        (ResourceType.TOPIC, {"engine": "servicebus"}),
        (ResourceType.SERVICE, {"image": "nginx:1.27"}),
    ):
        assert provider.password_policy(make_deployment(provider, rtype, **spec)) is None


def test_plan_shows_the_arm_requests_without_calls_or_password(
    provider: AzureProvider, arm: RunningArmEmulator, api_calls: list[tuple[str, str]]
) -> None:
    deployment = make_deployment(
        provider,
        ResourceType.DATABASE,
        engine="sqlserver",
        size="large",
        high_availability=True,
        storage_gb=64,
        backup={"retention": "14d"},
    )
    plan = provider.plan(deployment, tagging.logical_tags(deployment))

    assert api_calls == [] and arm.requests == []
    assert PASSWORD not in json.dumps(plan)
    server, database, policy = plan["requests"]
    version = API_VERSIONS["sql"]
    base = f"/subscriptions/{arm.subscription_id}/resourceGroups/{GROUP}/providers/Microsoft.Sql"
    assert server["method"] == "PUT"
    assert server["path"] == f"{base}/servers/{plan['identifier']}?api-version={version}"
    assert server["secretFields"] == ["properties.administratorLoginPassword"]
    assert "administratorLoginPassword" not in server["body"]["properties"]
    assert server["body"]["tags"] == expected_tags(deployment)
    assert all("/" not in key for key in server["body"]["tags"])
    assert database["path"].startswith(f"{base}/servers/{plan['identifier']}/databases/orders?")
    assert database["body"]["sku"] == {
        "name": "GP_Gen5",
        "tier": "GeneralPurpose",
        "family": "Gen5",
        "capacity": 4,
    }
    assert database["body"]["properties"]["zoneRedundant"] is True
    assert database["body"]["properties"]["maxSizeBytes"] == 64 * 1024**3
    assert policy["body"] == {"properties": {"retentionDays": 14}}
    assert plan["notes"]


def test_deploy_sends_what_plan_shows(provider: AzureProvider, arm: RunningArmEmulator) -> None:
    deployment = make_deployment(provider, ResourceType.CACHE, engine="redis", size="medium")
    (planned,) = provider.plan(deployment, tagging.logical_tags(deployment))["requests"]
    deploy(provider, deployment)
    puts = [path for method, path in arm.requests if method == "PUT"]
    assert puts == [planned["path"]]
    stored = arm.resource(planned["path"].split("?")[0])
    assert stored is not None
    assert stored["properties"]["sku"] == planned["body"]["properties"]["sku"]
    assert stored["tags"] == planned["body"]["tags"]


def test_names_follow_each_service_rules_and_stay_distinct(provider: AzureProvider) -> None:
    long = {"name": "n" * 63, "namespace": "x" * 63}
    for rtype, spec, rule in (
        (ResourceType.DATABASE, {"engine": "sqlserver"}, r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"),
        (ResourceType.DATABASE, {"engine": "postgresql"}, r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"),
        (ResourceType.CACHE, {"engine": "redis"}, r"^[a-z0-9][a-z0-9-]{0,61}[a-z0-9]$"),
        (ResourceType.BUCKET, {}, r"^[a-z0-9]{3,24}$"),
        (ResourceType.SERVICE, {"image": "nginx"}, r"^(?!.*--)[a-z][a-z0-9-]{0,30}[a-z0-9]$"),
    ):
        for names in ({}, long):
            deployment = make_deployment(provider, rtype, **names, **spec)
            assert re.match(rule, provider.identifier(deployment)), provider.identifier(deployment)
    # Global names carry a piece of the deployment id; others a hash of namespace/name.
    bucket = make_deployment(provider, ResourceType.BUCKET)
    assert bucket.id.removeprefix("deploy-")[:8] in provider.identifier(bucket)
    one = make_deployment(provider, ResourceType.SERVICE, image="x", namespace="a-b", name="c")
    two = make_deployment(provider, ResourceType.SERVICE, image="x", namespace="a", name="b-c")
    assert provider.identifier(one) != provider.identifier(two)


# --- each kind: deploy, poll to Ready, adopt, delete -------------------------------------


@dataclass(frozen=True)
class Case:
    resource_type: ResourceType
    spec: dict[str, Any]
    arm_type: str
    credentials: Credentials | None = None


CASES = {
    "sqlserver": Case(
        ResourceType.DATABASE, {"engine": "sqlserver"}, "Microsoft.Sql/servers/databases", CREDS
    ),
    "postgresql": Case(
        ResourceType.DATABASE,
        {"engine": "postgresql", "version": "15"},
        "Microsoft.DBforPostgreSQL/flexibleServers",
        CREDS,
    ),
    "mysql": Case(
        ResourceType.DATABASE,
        {"engine": "mysql", "version": "8.0"},
        "Microsoft.DBforMySQL/flexibleServers",
        CREDS,
    ),
    "redis": Case(ResourceType.CACHE, {"engine": "redis"}, "Microsoft.Cache/redis"),
    "servicebus": Case(
        ResourceType.TOPIC, {"engine": "servicebus"}, "Microsoft.ServiceBus/namespaces/topics"
    ),
    "storage": Case(ResourceType.BUCKET, {"versioning": True}, "Microsoft.Storage/storageAccounts"),
    "containerapps": Case(
        ResourceType.SERVICE, {"image": "nginx:1.27", "port": 8080}, "Microsoft.App/containerApps"
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_kind_deploys_reaches_ready_adopts_and_deletes_twice(
    provider: AzureProvider, arm: RunningArmEmulator, case: Case
) -> None:
    deployment = make_deployment(provider, case.resource_type, **case.spec)
    started = time.monotonic()
    first = deploy(provider, deployment, case.credentials)
    assert time.monotonic() - started < 5  # deploy starts the operation, never waits on it
    if case.resource_type is not ResourceType.TOPIC:  # topics are created synchronously
        assert first.state == "creating"

    resource, _ = poll_until_available(provider, deployment)
    assert resource.endpoint and resource.port
    (made,) = of_type(arm, case.arm_type)
    if case.resource_type is not ResourceType.TOPIC:
        assert made["tags"] == expected_tags(deployment)
        assert made["properties"]["provisioningState"] == "Succeeded"
    # The same deploy again (a redelivered job) adopts it: still one resource.
    again = deploy(provider, deployment, case.credentials)
    assert again.state == "available"
    assert len(of_type(arm, case.arm_type)) == 1
    # No drift right after provisioning: what was asked is what is there.
    report = drift.compare(deployment.spec.wire(), resource.actual_spec)
    assert not report.significant, report.details

    delete_until_done(provider, deployment)
    assert of_type(arm, case.arm_type) == []
    assert provider.delete(deployment) is True  # deleting what is gone succeeds
    assert provider.get_status(deployment).state == "missing"


def test_sql_takes_server_then_database_then_retention_one_poll_at_a_time(
    provider: AzureProvider, arm: RunningArmEmulator, api_calls: list[tuple[str, str]]
) -> None:
    deployment = make_deployment(
        provider,
        ResourceType.DATABASE,
        engine="sqlserver",
        size="xlarge",
        high_availability=True,
        backup={"retention": "21d"},
    )
    deploy(provider, deployment, CREDS)
    assert arm.resources("Microsoft.Sql/servers/databases") == []  # the server comes first
    resource, _ = poll_until_available(provider, deployment)

    (server,) = arm.resources("Microsoft.Sql/servers")
    assert server["properties"]["administratorLogin"] == "kidpadmin"
    assert "administratorLoginPassword" not in server["properties"]
    assert arm.secret(server["id"], "administratorLoginPassword") == PASSWORD
    (database,) = arm.resources("Microsoft.Sql/servers/databases")
    assert database["name"] == "orders"
    assert database["sku"]["capacity"] == 8 and database["properties"]["zoneRedundant"] is True
    assert database["tags"] == expected_tags(deployment)
    (policy,) = arm.resources("Microsoft.Sql/servers/databases/backupShortTermRetentionPolicies")
    assert policy["properties"]["retentionDays"] == 21
    assert resource.endpoint == f"{server['name']}.database.windows.net"
    assert resource.port == 1433
    assert resource.actual_spec["size"] == "xlarge"
    assert resource.actual_spec["backupRetentionDays"] == 21
    # Every API call was counted, by resource type and operation, in order.
    assert ("database", "servers.begin_create_or_update") in api_calls
    order = [op for _, op in api_calls if "begin_create" in op]
    assert order == [
        "servers.begin_create_or_update",
        "databases.begin_create_or_update",
        "backup_short_term_retention_policies.begin_create_or_update",
    ]
    assert len(api_calls) == len([r for r in arm.requests if "/operation" not in r[1]])


def test_flexible_servers_zone_redundant_only_on_general_purpose(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    small_ha = make_deployment(
        provider, ResourceType.DATABASE, engine="postgresql", high_availability=True
    )
    with pytest.raises(ValidationFailed, match="choose size large or xlarge"):
        provider.validate_quota(small_ha)
    assert arm.resources("Microsoft.DBforPostgreSQL/flexibleServers") == []

    tiny = make_deployment(provider, ResourceType.DATABASE, engine="mysql", storage_gb=10)
    with pytest.raises(ValidationFailed, match="Azure MySQL stores 20 to 16384 GiB; 10"):
        provider.validate_quota(tiny)
    with pytest.raises(ValidationFailed, match="7 to 35 days; 3 days"):
        provider.validate_quota(
            make_deployment(
                provider, ResourceType.DATABASE, engine="postgresql", backup={"retention": "3d"}
            )
        )

    large_ha = make_deployment(
        provider,
        ResourceType.DATABASE,
        engine="mysql",
        version="8.0",
        size="large",
        high_availability=True,
        storage_gb=50,
    )
    resource = ready(provider, large_ha, CREDS)
    (server,) = arm.resources("Microsoft.DBforMySQL/flexibleServers")
    assert server["sku"] == {"name": "Standard_D2ads_v5", "tier": "GeneralPurpose"}
    assert server["properties"]["highAvailability"]["mode"] == "ZoneRedundant"
    assert server["properties"]["version"] == "8.0.21"
    assert server["properties"]["storage"]["storageSizeGB"] == 50
    assert resource.actual_spec["highAvailability"] is True
    assert resource.actual_spec["version"] == "8.0.40"  # a patch Azure chose


def test_postgres_storage_is_rounded_up_to_a_tier_without_drift(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    deployment = make_deployment(
        provider, ResourceType.DATABASE, engine="postgresql", storage_gb=100
    )
    resource = ready(provider, deployment, CREDS)
    (server,) = arm.resources("Microsoft.DBforPostgreSQL/flexibleServers")
    assert server["properties"]["storage"]["storageSizeGB"] == 128
    assert resource.actual_spec["storageGb"] == 100
    # Grown by hand beyond the tier: that is drift.
    arm.change(server["id"], {"properties": {"storage": {"storageSizeGB": 256}}})
    actual = provider.get_status(deployment).actual_spec
    assert actual["storageGb"] == 256
    assert drift.compare(deployment.spec.wire(), actual).significant


def test_bucket_is_a_private_account_with_a_versioned_container(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    deployment = make_deployment(provider, ResourceType.BUCKET, versioning=True)
    resource = ready(provider, deployment)
    (account,) = arm.resources("Microsoft.Storage/storageAccounts")
    assert account["properties"]["allowBlobPublicAccess"] is False
    assert account["properties"]["allowSharedKeyAccess"] is False
    (blob,) = arm.resources("Microsoft.Storage/storageAccounts/blobServices")
    assert blob["properties"]["isVersioningEnabled"] is True
    (container,) = arm.resources("Microsoft.Storage/storageAccounts/blobServices/containers")
    assert container["name"] == "orders"
    assert resource.endpoint == f"https://{account['name']}.blob.core.windows.net/orders"
    assert resource.actual_spec == {"encryptionAtRest": True, "versioning": True}


# --- adoption, ownership, drift, missing ---------------------------------------------------


def test_deploy_adopts_a_resource_found_only_by_its_deployment_tag(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    deployment = make_deployment(provider, ResourceType.CACHE, engine="redis")
    tags = provider.encode_tags(deployment, {})
    renamed = arm.resource_id(GROUP, "Microsoft.Cache", "redis", "renamed-by-hand")
    arm.seed(
        renamed,
        {
            "location": arm.location,
            "tags": tags,
            "properties": {"sku": {"name": "Basic", "family": "C", "capacity": 1}},
        },
    )
    resource = deploy(provider, deployment)
    assert resource.state == "available"
    assert resource.cloud_resource_id == renamed
    assert len(arm.resources("Microsoft.Cache/redis")) == 1
    # delete finds it by its tags too
    delete_until_done(provider, deployment)
    assert arm.resources("Microsoft.Cache/redis") == []


def test_a_name_held_by_another_deployment_fails_and_is_never_deleted(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    first = make_deployment(provider, ResourceType.SERVICE, image="nginx:1.27")
    ready(provider, first)
    second = make_deployment(provider, ResourceType.SERVICE, image="nginx:1.28")
    with pytest.raises(ProvisioningFailed, match=f"belongs to deployment {first.id}"):
        deploy(provider, second)
    assert provider.get_status(second).state == "missing"
    assert provider.delete(second) is True
    (app,) = arm.resources("Microsoft.App/containerApps")
    assert app["tags"][f"{PREFIX}deployment-id"] == first.id


def test_drift_made_in_azure_shows_in_status(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    deployment = make_deployment(provider, ResourceType.CACHE, engine="redis", size="small")
    ready(provider, deployment)
    (cache,) = arm.resources("Microsoft.Cache/redis")
    arm.change(
        cache["id"],
        {"properties": {"sku": {"name": "Standard", "family": "C", "capacity": 3}}},
    )
    ready_view = deployment.evolve(phase=Phase.READY)
    actual = provider.get_status(ready_view).actual_spec
    assert actual["size"] == "large" and actual["highAvailability"] is True
    report = drift.compare(deployment.spec.wire(), actual)
    assert report.significant
    assert "Size mismatch: desired=small, actual=large" in report.details
    assert "HighAvailability mismatch: desired=False, actual=True" in report.details


def test_a_database_deleted_by_hand_is_missing_once_ready(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    deployment = make_deployment(provider, ResourceType.DATABASE, engine="sqlserver")
    ready(provider, deployment, CREDS)
    (database,) = arm.resources("Microsoft.Sql/servers/databases")
    arm.remove(database["id"])
    status = provider.get_status(deployment.evolve(phase=Phase.READY))
    assert status.state == "missing"
    assert arm.resources("Microsoft.Sql/servers/databases") == []  # not silently re-made


# --- deletion policies --------------------------------------------------------------------


@pytest.mark.parametrize("policy", [DeletionPolicy.RETAIN, DeletionPolicy.SNAPSHOT])
def test_retain_and_snapshot_keep_data_and_retag_it(
    provider: AzureProvider, arm: RunningArmEmulator, policy: DeletionPolicy
) -> None:
    deployment = make_deployment(
        provider, ResourceType.DATABASE, engine="sqlserver", deletion_policy=policy
    )
    ready(provider, deployment, CREDS)
    assert provider.delete(deployment) is True
    for arm_type in ("Microsoft.Sql/servers", "Microsoft.Sql/servers/databases"):
        (kept,) = arm.resources(arm_type)
        assert kept["tags"][f"{PREFIX}managed-by"] == "kidp-retained"
        assert kept["tags"][f"{PREFIX}deployment-id"] == deployment.id
    assert provider.list_managed() == []


def test_snapshot_deletes_a_service_which_has_no_data(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    deployment = make_deployment(
        provider,
        ResourceType.SERVICE,
        image="nginx:1.27",
        deletion_policy=DeletionPolicy.SNAPSHOT,
    )
    ready(provider, deployment)
    delete_until_done(provider, deployment)
    assert arm.resources("Microsoft.App/containerApps") == []


# --- scans -----------------------------------------------------------------------------------


def test_list_managed_decodes_tags_and_flags_untagged_kidp_resources(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    database = make_deployment(provider, ResourceType.DATABASE, engine="sqlserver")
    bucket = make_deployment(provider, ResourceType.BUCKET, name="assets")
    ready(provider, database, CREDS)
    ready(provider, bucket)
    arm.seed(
        arm.resource_id(GROUP, "Microsoft.Cache", "redis", "kidp-stray-cache"),
        {"location": arm.location, "properties": {}},
    )
    arm.seed(
        arm.resource_id(GROUP, "Microsoft.Storage", "storageAccounts", "kidpstray0001"),
        {"location": arm.location, "tags": {"owner": "someone"}},
    )
    arm.seed(
        arm.resource_id(GROUP, "Microsoft.Cache", "redis", "somebody-elses"),
        {"location": arm.location},
    )
    found = {(m.resource_type, m.name): m for m in provider.list_managed()}

    sql = found[(ResourceType.DATABASE, "orders")]  # the database, not its server
    assert sql.tagged and sql.cloud_resource_id.endswith("/databases/orders")
    assert tagging.decode(sql.tags, dialect="azure") == tagging.logical_tags(database)
    storage = found[(ResourceType.BUCKET, provider.identifier(bucket))]
    assert tagging.decode(storage.tags, dialect="azure")["deployment-id"] == bucket.id
    assert not found[(ResourceType.CACHE, "kidp-stray-cache")].tagged
    assert not found[(ResourceType.BUCKET, "kidpstray0001")].tagged
    assert (ResourceType.CACHE, "somebody-elses") not in found
    assert len(found) == 4


def test_list_managed_leaves_out_what_another_managed_by_value_claims(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    """Named like ours, but tagged with the managed-by key and another value
    (the broker's own infrastructure, another broker, a kept resource): someone
    else's, neither ours nor an untagged look-alike."""
    claimed = {
        "kidpstabc123": "kidp-broker-infra",
        "kidpstother0001": "another-broker",
        "kidpstkept0001": "kidp-retained",
    }
    for name, value in claimed.items():
        arm.seed(
            arm.resource_id(GROUP, "Microsoft.Storage", "storageAccounts", name),
            {"location": arm.location, "tags": {f"{PREFIX}managed-by": value}},
        )
    arm.seed(
        arm.resource_id(GROUP, "Microsoft.Cache", "redis", "kidp-infra-cache"),
        {"location": arm.location, "tags": {f"{PREFIX}managed-by": "kidp-broker-infra"}},
    )
    arm.seed(
        arm.resource_id(GROUP, "Microsoft.Storage", "storageAccounts", "kidpstray0001"),
        {"location": arm.location, "tags": {"managed-by": "kidp"}},  # not the broker's key
    )
    found = provider.list_managed()
    assert [(m.name, m.tagged) for m in found] == [("kidpstray0001", False)]


# --- quota --------------------------------------------------------------------------------------


def test_quota_reports_usage_and_refuses_what_does_not_fit(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    sql = make_deployment(provider, ResourceType.DATABASE, engine="sqlserver", size="large")
    report = provider.validate_quota(sql)
    assert report.checked
    assert report.details["quotas"]["ServerQuota"] == {"used": 0, "max": 250, "requested": 1}
    ready(provider, sql, CREDS)

    arm.set_quota("Microsoft.Sql", "ServerQuota", 1)
    with pytest.raises(QuotaExceeded, match=r"ServerQuota .* 1 used of 1") as refused:
        provider.validate_quota(
            make_deployment(provider, ResourceType.DATABASE, engine="sqlserver", name="two")
        )
    assert refused.value.to_body()["code"] == 422

    arm.set_quota("Microsoft.Storage", "StorageAccounts", 0)
    with pytest.raises(QuotaExceeded, match="storage account quota"):
        provider.validate_quota(make_deployment(provider, ResourceType.BUCKET))

    arm.family_limits["standardDDSv5Family"] = 3
    with pytest.raises(QuotaExceeded, match=r"standardDDSv5Family .* needs 4 more"):
        # zone-redundant: the standby's vCores count too (2 + 2)
        provider.validate_quota(
            make_deployment(
                provider,
                ResourceType.DATABASE,
                engine="postgresql",
                size="large",
                high_availability=True,
            )
        )

    arm.set_quota("Microsoft.App", "ManagedEnvironmentConsumptionCores", 3)
    with pytest.raises(QuotaExceeded, match=r"needs 4"):
        provider.validate_quota(
            make_deployment(
                provider, ResourceType.SERVICE, image="nginx", size="medium", replicas=2
            )
        )
    no_api = provider.validate_quota(make_deployment(provider, ResourceType.CACHE, engine="redis"))
    assert no_api.checked is False and "no usage API" in no_api.details["reason"]


def test_a_quota_refusal_at_create_is_quota_exceeded(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    arm.fail_requests(
        409,
        code="QuotaExceeded",
        method="PUT",
        message="Operation results in exceeding quota limits of Core.",
    )
    with pytest.raises(QuotaExceeded, match="QuotaExceeded.*exceeding quota limits"):
        deploy(provider, make_deployment(provider, ResourceType.CACHE, engine="redis"))


# --- errors -----------------------------------------------------------------------------------


def test_throttling_is_cloud_unavailable_with_azures_retry_after_and_no_sleep(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    arm.throttle(count=10, retry_after=30)
    started = time.monotonic()
    with pytest.raises(CloudUnavailable, match="throttled") as raised:
        deploy(provider, make_deployment(provider, ResourceType.CACHE, engine="redis"))
    assert raised.value.retry_after == 30
    assert time.monotonic() - started < 3  # handed back, not slept through
    assert arm.resources("Microsoft.Cache/redis") == []


def test_a_short_throttle_is_retried_by_the_client_and_makes_one_resource(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    arm.throttle(count=1, retry_after=0)
    arm.fail_requests(503, count=1, method="PUT")
    deployment = make_deployment(provider, ResourceType.CACHE, engine="redis")
    assert deploy(provider, deployment).state == "creating"
    assert len(arm.resources("Microsoft.Cache/redis")) == 1


def test_server_faults_that_outlast_retries_are_temporary(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    arm.fail_requests(503, count=20)
    with pytest.raises(CloudUnavailable, match="503 ServiceUnavailable") as raised:
        provider.get_status(make_deployment(provider, ResourceType.CACHE, engine="redis"))
    assert raised.value.retry_after > 0


def test_another_operation_in_progress_is_temporary(
    make_provider: Any, arm: RunningArmEmulator
) -> None:
    arm.polls = 1000  # the create never finishes while this test runs
    provider = make_provider()
    deployment = make_deployment(provider, ResourceType.SERVICE, image="nginx:1.27")
    deploy(provider, deployment)
    with pytest.raises(CloudUnavailable, match="AnotherOperationInProgress"):
        provider.delete(deployment)


def test_failed_provisioning_fails_with_azures_error_code(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    arm.fail_provisioning("orders", code="ZonalAllocationFailed")
    deployment = make_deployment(provider, ResourceType.DATABASE, engine="postgresql")
    deploy(provider, deployment, CREDS)
    states = [provider.get_status(deployment) for _ in range(3)]
    failed = states[-1]
    assert failed.state == "failed"
    assert "provisioningState Failed" in failed.message
    assert "Azure error ZonalAllocationFailed" in failed.message


def test_refusals_are_permanent_and_never_show_the_password(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    arm.fail_requests(
        400,
        code="PasswordNotComplex",
        method="PUT",
        message=f"The password '{PASSWORD}' does not meet the policy.",
    )
    deployment = make_deployment(provider, ResourceType.DATABASE, engine="mysql")
    with pytest.raises(ProvisioningFailed) as raised:
        deploy(provider, deployment, CREDS)
    error = raised.value
    assert "PasswordNotComplex" in error.message and "***" in error.message
    assert error.__cause__ is None  # the SDK's exception holds the request body
    rendered = "".join(traceback.format_exception(error)) + json.dumps(error.to_body())
    assert PASSWORD not in rendered


def test_rotate_credentials_sets_the_new_administrator_password(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    deployment = make_deployment(provider, ResourceType.DATABASE, engine="postgresql")
    ready(provider, deployment, CREDS)
    rotated = Credentials("kidpadmin", "Zz9-NEW-pass_word.~0123456789abcdefGHJK")
    provider.rotate_credentials(deployment, rotated)
    (server,) = arm.resources("Microsoft.DBforPostgreSQL/flexibleServers")
    assert arm.secret(server["id"], "administratorLoginPassword") == rotated.password
    with pytest.raises(ProvisioningFailed, match="Redis takes no credentials from the broker"):
        provider.rotate_credentials(
            make_deployment(provider, ResourceType.CACHE, engine="redis"), rotated
        )


def test_no_token_and_no_answer_are_cloud_unavailable(make_provider: Any) -> None:
    class NoToken:
        def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
            raise ClientAuthenticationError("managed identity endpoint unavailable")

    with pytest.raises(CloudUnavailable, match="credentials") as raised:
        make_provider(credential=NoToken()).check()
    assert raised.value.retry_after == 60

    nobody = make_provider(base_url=f"https://127.0.0.1:{free_port()}", retry_total=0)
    with pytest.raises(CloudUnavailable, match="no answer"):
        nobody.check()


def test_a_token_arm_refuses_is_cloud_unavailable(make_provider: Any) -> None:
    with pytest.raises(CloudUnavailable, match="credentials"):
        make_provider(credential=ArmEmulatorCredential("not-the-token")).check()


def test_check_passes_and_names_a_missing_resource_group(
    provider: AzureProvider, make_provider: Any
) -> None:
    provider.check()
    with pytest.raises(CloudUnavailable, match="'elsewhere' does not exist"):
        make_provider(resource_group="elsewhere").check()


def test_deploy_leaves_no_poller_thread_behind(
    provider: AzureProvider, arm: RunningArmEmulator
) -> None:
    arm.polls = 1000  # an SDK poller, had one been started, would still be polling
    before = {t.ident for t in threading.enumerate()}
    deploy(provider, make_deployment(provider, ResourceType.DATABASE, engine="sqlserver"), CREDS)
    after = [t for t in threading.enumerate() if t.ident not in before]
    # An SDK poller would poll on a thread of its own, named LROPoller(...).
    assert [t.name for t in after if t.name.startswith("LROPoller")] == []


# --- the whole broker ----------------------------------------------------------------------


def test_the_whole_broker_provisions_to_ready_and_deletes_on_azure(
    make_broker: Any, arm: RunningArmEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Credentials go to Key Vault (the stand-in, reached with a managed identity).
    vault = start_keyvault()
    for name, value in vault.environ().items():
        monkeypatch.setenv(name, value)
    default_credential.forget()  # an earlier test's identity endpoint is gone
    # The provider is built by the composition root from KIDP_AZURE_* settings.
    h = make_broker(
        azure_key_vault_url=vault.vault_url,
        cloud="azure",
        region=arm.location,
        azure_subscription_id=arm.subscription_id,
        azure_resource_group=GROUP,
        azure_arm_endpoint=arm.url,
        azure_arm_ca_file=str(arm.ca_file),
        azure_credential="emulator",
        azure_servicebus_namespace="kidp-events",
        azure_containerapps_environment="kidp-apps",
    )
    assert isinstance(h.service.provider, AzureProvider)
    accepted = h.submit(target={"cloud": "azure", "region": arm.location})
    h.drain()

    deployment = h.store.get(accepted.deployment_id)
    assert deployment.phase is Phase.READY, deployment.message
    assert h.phases()[0] == "Provisioning" and h.phases()[-1] == "Ready"
    ready_callback = h.receiver.log[-1][1]
    (server,) = arm.resources("Microsoft.DBforPostgreSQL/flexibleServers")
    assert ready_callback["endpoint"] == f"{server['name']}.postgres.database.azure.com"
    assert ready_callback["port"] == 5432
    secret_ref = ready_callback["additionalMetadata"]["secretRef"]
    assert secret_ref["store"] == "azure-keyvault"
    assert secret_ref["id"].startswith(vault.vault_url)
    # Priced from the azure table: Burstable B2s and 100 GB of storage.
    cost = pricing.estimate("azure", ResourceType.DATABASE, deployment.spec.wire())
    assert ready_callback["estimatedMonthlyCost"] == cost.estimated_monthly
    assert cost != pricing.estimate("aws", ResourceType.DATABASE, deployment.spec.wire())
    assert ready_callback["additionalMetadata"]["tags"]["deployment-id"] == deployment.id
    assert server["sku"]["name"] == "Standard_B2s"  # medium
    assert tagging.decode(server["tags"], dialect="azure")["deployment-id"] == deployment.id
    # The password Azure was given is the one in the secret store, and only there.
    _, stored = h.service.secrets.ensure(secret_name(deployment), dict, {})
    assert arm.secret(server["id"], "administratorLoginPassword") == stored["password"]
    assert stored["password"] not in json.dumps(h.receiver.log)
    view = h.service.resources(h.admin, namespace="team-platform")["resources"][0]
    assert view["driftDetected"] is False

    h.deprovision(accepted.deployment_id)
    h.drain()
    assert h.store.get(accepted.deployment_id).phase is Phase.DELETED
    assert h.phases()[-2:] == ["Deleting", "Deleted"]
    assert arm.resources("Microsoft.DBforPostgreSQL/flexibleServers") == []
    vault.stop()
