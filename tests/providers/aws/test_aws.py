"""AwsProvider against moto, through the real boto3 clients.

Every assertion is made the way an operator would check: by describing the
resource with a separate boto3 client. Where moto does not model an API,
responses are injected through botocore's own event hooks on the session the
provider uses, so request serialization and error parsing stay real:

* ``before-send`` handlers replace the HTTP response (throttling, errors).
  moto's own handler still sees the request, which is what a lost response
  looks like: the create happened, the client was told it failed.
* ``before-call`` handlers short-circuit a call that moto does not implement
  (``DescribeAccountAttributes``, MSK's topic API).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import traceback
import urllib.parse
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from tests.providers.deployments import make_deployment, postgres

from kidp import drift
from kidp import tags as tagging
from kidp.errors import (
    CloudUnavailable,
    ProvisioningFailed,
    QuotaExceeded,
    TemporaryError,
)
from kidp.models import (
    CloudResource,
    DeletionPolicy,
    Deployment,
    ResourceType,
)
from kidp.ports import CloudProvider, Credentials
from kidp.providers.aws import (
    RDS_FORBIDDEN_PASSWORD_CHARS,
    AwsProvider,
    final_snapshot_name,
)

REGION = "us-east-1"
PASSWORD = "Kx7-vQ2_mP9.tR4~wZ8nB3yL6hD"
TOKEN = "Redis-AUTH-token-0123456789abcdef"
PREFIX = tagging.DEFAULT_PREFIX
MSK_ARN = "arn:aws:kafka:us-east-1:123456789012:cluster/kidp-events/5b0c7c5e-0000-4e6b-9d2c-1"


# --- helpers -------------------------------------------------------------------


class _Body:
    """The raw body of an injected HTTP response."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def query_error(url: str, code: str, message: str, status: int = 400) -> AWSResponse:
    """An error response in the query protocol (RDS, ElastiCache)."""
    body = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>"
        f"<Message>{message}</Message></Error><RequestId>test</RequestId></ErrorResponse>"
    ).encode()
    return AWSResponse(url, status, {}, _Body(body))


def short_circuit(status: int, parsed: dict[str, Any]) -> tuple[AWSResponse, dict[str, Any]]:
    """A ``before-call`` result: botocore uses it instead of sending a request."""
    parsed.setdefault("ResponseMetadata", {"HTTPStatusCode": status})
    return AWSResponse("https://injected.invalid/", status, {}, _Body(b"")), parsed


def client(service: str) -> Any:
    """A verification client, independent of the provider's session and hooks."""
    return boto3.client(service, region_name=REGION)


def logical(deployment: Deployment) -> dict[str, str]:
    return tagging.logical_tags(deployment)


def expected_tags(deployment: Deployment, managed_by: str = "kidp") -> dict[str, str]:
    return {
        f"{PREFIX}managed-by": managed_by,
        f"{PREFIX}deployment-id": deployment.id,
        f"{PREFIX}resource-uid": deployment.resource_uid,
        f"{PREFIX}team": "payments",
        f"{PREFIX}application": "checkout",
    }


def tag_dict(tag_list: list[dict[str, str]]) -> dict[str, str]:
    return {t.get("Key", t.get("key", "")): t.get("Value", t.get("value", "")) for t in tag_list}


def deploy(
    provider: AwsProvider, deployment: Deployment, credentials: Credentials | None = None
) -> CloudResource:
    return provider.deploy(deployment, logical(deployment), credentials)


def delete_until_done(provider: AwsProvider, deployment: Deployment, attempts: int = 5) -> int:
    """Call delete() the way the worker's poll loop does; returns the calls made."""
    for attempt in range(1, attempts + 1):
        if provider.delete(deployment):
            return attempt
    raise AssertionError(f"delete did not finish in {attempts} calls")


CREDS = Credentials(username="kidpadmin", password=PASSWORD)


# --- fixtures ------------------------------------------------------------------


@pytest.fixture
def api_calls() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def provider(session: boto3.session.Session, api_calls: list[tuple[str, str]]) -> AwsProvider:
    return AwsProvider(
        region=REGION,
        session=session,
        on_call=lambda resource_type, operation: api_calls.append((resource_type, operation)),
    )


@pytest.fixture
def subnet(aws: None) -> str:
    ec2 = client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    return str(ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/24")["Subnet"]["SubnetId"])


# --- catalogue and policies ----------------------------------------------------


def test_satisfies_the_cloud_provider_protocol(provider: AwsProvider) -> None:
    assert isinstance(provider, CloudProvider)
    assert provider.name == "aws"
    assert provider.region == REGION


def test_supported_uses_catalogue_versions_and_offers_topics_only_with_msk(
    provider: AwsProvider, session: boto3.session.Session
) -> None:
    supported = provider.supported()
    assert supported[ResourceType.DATABASE] == {
        "postgresql": ["12", "13", "14", "15", "16"],
        "mysql": ["5.7", "8.0", "8.4"],
    }
    assert supported[ResourceType.CACHE] == {"redis": ["6.2", "7.0", "7.2"], "memcached": ["1.6"]}
    assert supported[ResourceType.BUCKET] == {"": []}
    assert supported[ResourceType.SERVICE] == {"": []}
    assert ResourceType.TOPIC not in supported

    with_msk = AwsProvider(region=REGION, session=session, msk_cluster_arn=MSK_ARN)
    # Kafka only: the catalogue's other topic engines (Pub/Sub, Service Bus) are other clouds'.
    assert with_msk.supported()[ResourceType.TOPIC] == {"kafka": ["3.5", "3.6", "3.7"]}


def test_password_policies(provider: AwsProvider) -> None:
    database = provider.password_policy(postgres(provider))
    assert database is not None
    assert not set(database.alphabet) & RDS_FORBIDDEN_PASSWORD_CHARS
    assert 8 <= database.length <= 41  # MySQL's RDS maximum is 41

    redis = provider.password_policy(
        make_deployment(provider, ResourceType.CACHE, engine="redis", version="7.0")
    )
    assert redis is not None and redis.username == "default" and redis.length >= 16

    plain_redis = make_deployment(
        provider,
        ResourceType.CACHE,
        engine="redis",
        encryption={"at_rest": True, "in_transit": False},
    )
    assert provider.password_policy(plain_redis) is None
    for deployment in (
        make_deployment(provider, ResourceType.CACHE, engine="memcached"),
        make_deployment(provider, ResourceType.BUCKET),
        make_deployment(provider, ResourceType.SERVICE, image="nginx:1.27"),
    ):
        assert provider.password_policy(deployment) is None


def test_plan_makes_no_calls_and_holds_no_password(
    provider: AwsProvider, api_calls: list[tuple[str, str]]
) -> None:
    deployment = postgres(provider, storage_gb=50)
    plan = provider.plan(deployment, logical(deployment))

    assert api_calls == []
    assert PASSWORD not in json.dumps(plan)
    (call,) = plan["calls"]
    assert (call["service"], call["operation"]) == ("rds", "create_db_instance")
    assert call["secretParameters"] == ["MasterUserPassword"]
    assert "MasterUserPassword" not in call["parameters"]
    assert call["parameters"]["DBInstanceClass"] == "db.t3.medium"
    assert call["parameters"]["AllocatedStorage"] == 50
    assert tag_dict(call["parameters"]["Tags"]) == expected_tags(deployment)


def test_identifiers_fit_service_limits_and_stay_distinct(provider: AwsProvider) -> None:
    long_name = "n" * 63
    database = postgres(provider)
    long_db = make_deployment(
        provider, ResourceType.DATABASE, engine="postgresql", name=long_name, namespace="x" * 63
    )
    cache = make_deployment(provider, ResourceType.CACHE, engine="redis", name=long_name)
    bucket = make_deployment(provider, ResourceType.BUCKET, name=long_name)
    assert provider.identifier(database).startswith("kidp-team-a-orders-")
    assert len(provider.identifier(long_db)) <= 63
    assert len(provider.identifier(cache)) <= 40
    assert len(provider.identifier(bucket)) <= 63
    assert bucket.id.removeprefix("deploy-")[:8] in provider.identifier(bucket)
    # 'a-b'/'c' and 'a'/'b-c' must not share an identifier.
    one = make_deployment(
        provider, ResourceType.DATABASE, engine="mysql", namespace="a-b", name="c"
    )
    two = make_deployment(
        provider, ResourceType.DATABASE, engine="mysql", namespace="a", name="b-c"
    )
    assert provider.identifier(one) != provider.identifier(two)


# --- RDS -----------------------------------------------------------------------


def test_deploy_postgres_creates_a_tagged_instance_as_requested(
    provider: AwsProvider, api_calls: list[tuple[str, str]]
) -> None:
    deployment = postgres(provider, storage_gb=50, backup={"retention": "14d"})
    resource = deploy(provider, deployment, CREDS)

    (instance,) = client("rds").describe_db_instances()["DBInstances"]
    assert instance["DBInstanceIdentifier"] == provider.identifier(deployment)
    assert instance["Engine"] == "postgres"
    assert instance["EngineVersion"] == "15"
    assert instance["DBInstanceClass"] == "db.t3.medium"
    assert instance["AllocatedStorage"] == 50
    assert instance["StorageEncrypted"] is True
    assert instance["BackupRetentionPeriod"] == 14
    assert instance["MasterUsername"] == "kidpadmin"
    assert instance["DeletionProtection"] is False
    assert instance["CopyTagsToSnapshot"] is True
    assert tag_dict(instance["TagList"]) == expected_tags(deployment)
    assert resource.cloud_resource_id == instance["DBInstanceArn"]
    assert ("database", "create_db_instance") in api_calls
    assert PASSWORD not in resource.model_dump_json()


def test_deploy_twice_adopts_the_first_instance(
    provider: AwsProvider, api_calls: list[tuple[str, str]]
) -> None:
    deployment = postgres(provider)
    first = deploy(provider, deployment, CREDS)
    second = deploy(provider, deployment, CREDS)

    assert len(client("rds").describe_db_instances()["DBInstances"]) == 1
    assert second.cloud_resource_id == first.cloud_resource_id
    assert api_calls.count(("database", "create_db_instance")) == 1


def test_name_held_by_another_deployment_fails_permanently(provider: AwsProvider) -> None:
    first = postgres(provider)
    deploy(provider, first, CREDS)
    second = postgres(provider)  # same namespace/name, another deployment

    with pytest.raises(ProvisioningFailed) as caught:
        deploy(provider, second, CREDS)

    assert first.id in caught.value.message
    assert len(client("rds").describe_db_instances()["DBInstances"]) == 1
    # Neither status nor delete of the second deployment touches the first's instance.
    assert provider.get_status(second).state == "missing"
    assert provider.delete(second) is True
    assert len(client("rds").describe_db_instances()["DBInstances"]) == 1


def test_name_held_by_an_untagged_instance_fails_permanently(provider: AwsProvider) -> None:
    deployment = postgres(provider)
    client("rds").create_db_instance(
        DBInstanceIdentifier=provider.identifier(deployment),
        Engine="postgres",
        DBInstanceClass="db.t3.micro",
        AllocatedStorage=20,
        MasterUsername="someone",
        MasterUserPassword="not-ours-123",
    )
    with pytest.raises(ProvisioningFailed, match="no KIDP deployment tag"):
        deploy(provider, deployment, CREDS)


def test_create_race_lost_to_another_deployment_fails_after_re_reading(
    provider: AwsProvider, session: boto3.session.Session
) -> None:
    winner = postgres(provider)
    deploy(provider, winner, CREDS)
    loser = postgres(provider)
    misses = []

    def first_lookup_misses(model: Any, **_: Any) -> Any:
        # The loser looked before the winner's instance existed.
        if not misses:
            misses.append(model.name)
            return short_circuit(404, {"Error": {"Code": "DBInstanceNotFound", "Message": "x"}})
        return None

    session.events.register("before-call.rds.DescribeDBInstances", first_lookup_misses)
    fresh = AwsProvider(region=REGION, session=session)
    with pytest.raises(ProvisioningFailed, match=winner.id):
        deploy(fresh, loser, CREDS)
    assert misses == ["DescribeDBInstances"]
    assert len(client("rds").describe_db_instances()["DBInstances"]) == 1


def test_throttled_create_is_retried_and_makes_no_duplicate(
    provider: AwsProvider, session: boto3.session.Session, api_calls: list[tuple[str, str]]
) -> None:
    sends: list[str] = []

    def throttle_first(request: Any, **_: Any) -> AWSResponse | None:
        sends.append(request.url)
        if len(sends) == 1:
            # moto still handles this request: the instance is created but the
            # client hears "Throttling", retries, and is told it already exists.
            return query_error(request.url, "Throttling", "Rate exceeded")
        return None

    session.events.register("before-send.rds.CreateDBInstance", throttle_first)
    deployment = postgres(provider)
    resource = deploy(provider, deployment, CREDS)

    assert len(sends) == 2  # botocore's standard retry
    (instance,) = client("rds").describe_db_instances()["DBInstances"]
    assert tag_dict(instance["TagList"]) == expected_tags(deployment)
    assert resource.cloud_resource_id == instance["DBInstanceArn"]
    assert api_calls.count(("database", "create_db_instance")) == 1


def test_throttling_that_outlasts_retries_is_temporary(aws: None) -> None:
    events_session = boto3.session.Session(region_name=REGION)

    def always_throttle(request: Any, **_: Any) -> AWSResponse:
        return query_error(request.url, "Throttling", "Rate exceeded")

    events_session.events.register("before-send.rds", always_throttle)
    rds = events_session.client(
        "rds", region_name=REGION, config=Config(retries={"mode": "standard", "max_attempts": 1})
    )
    provider = AwsProvider(region=REGION, clients={"rds": rds})

    with pytest.raises(CloudUnavailable) as caught:
        provider.get_status(postgres(provider))
    assert isinstance(caught.value, TemporaryError)
    assert caught.value.retry_after > 0
    assert caught.value.to_body()["error"] == "cloud_unavailable"


def test_refused_parameters_are_permanent_and_never_show_the_password(
    provider: AwsProvider, session: boto3.session.Session, caplog: pytest.LogCaptureFixture
) -> None:
    def echo_password(request: Any, **_: Any) -> AWSResponse:
        return query_error(
            request.url, "InvalidParameterValue", f"MasterUserPassword {PASSWORD} is not valid"
        )

    session.events.register("before-send.rds.CreateDBInstance", echo_password)
    caplog.set_level(logging.DEBUG, logger="kidp")
    with pytest.raises(ProvisioningFailed) as caught:
        deploy(provider, postgres(provider), CREDS)

    error = caught.value
    rendered = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), json.dumps(error.details), rendered, caplog.text):
        assert PASSWORD not in text
    assert "InvalidParameterValue" in error.message
    assert "***" in error.message


def test_repr_never_shows_credentials(provider: AwsProvider) -> None:
    assert PASSWORD not in repr(CREDS)
    assert PASSWORD not in repr(provider)


def test_status_reports_endpoint_and_actual_spec_without_drift(provider: AwsProvider) -> None:
    deployment = postgres(provider, storage_gb=40)
    deploy(provider, deployment, CREDS)

    status = provider.get_status(deployment)

    assert status.state == "available"
    assert status.endpoint and status.endpoint.startswith(provider.identifier(deployment))
    assert status.port == 5432
    assert status.actual_spec == {
        "engine": "postgresql",
        "version": "15",
        "size": "medium",
        "highAvailability": False,
        "storageGb": 40,
        "backupRetentionDays": 7,
        "encryptionAtRest": True,
    }
    assert status.tags == expected_tags(deployment)
    assert not drift.compare(deployment.spec.wire(), status.actual_spec).detected


def test_status_of_a_resized_instance_shows_drift(provider: AwsProvider) -> None:
    deployment = postgres(provider)
    deploy(provider, deployment, CREDS)
    client("rds").modify_db_instance(
        DBInstanceIdentifier=provider.identifier(deployment),
        DBInstanceClass="db.r6g.large",
        ApplyImmediately=True,
    )

    actual = provider.get_status(deployment).actual_spec

    assert actual["size"] == "custom:db.r6g.large"
    report = drift.compare(deployment.spec.wire(), actual)
    assert report.significant
    assert "Size mismatch: desired=medium, actual=custom:db.r6g.large" in report.details


def test_status_is_missing_when_nothing_carries_the_deployment(provider: AwsProvider) -> None:
    status = provider.get_status(postgres(provider))
    assert status.state == "missing"


def test_delete_removes_the_instance_and_repeats_harmlessly(provider: AwsProvider) -> None:
    deployment = postgres(provider)
    deploy(provider, deployment, CREDS)

    delete_until_done(provider, deployment)

    assert client("rds").describe_db_instances()["DBInstances"] == []
    assert client("rds").describe_db_snapshots()["DBSnapshots"] == []
    assert provider.delete(deployment) is True
    assert provider.get_status(deployment).state == "missing"


def test_snapshot_policy_leaves_a_final_snapshot(provider: AwsProvider) -> None:
    deployment = postgres(provider, deletion_policy=DeletionPolicy.SNAPSHOT)
    deploy(provider, deployment, CREDS)

    delete_until_done(provider, deployment)

    assert client("rds").describe_db_instances()["DBInstances"] == []
    (snapshot,) = client("rds").describe_db_snapshots(SnapshotType="manual")["DBSnapshots"]
    assert snapshot["DBSnapshotIdentifier"] == final_snapshot_name(deployment)
    assert snapshot["Status"] == "available"
    assert deployment.id in snapshot["DBSnapshotIdentifier"]
    # CopyTagsToSnapshot: the snapshot can be traced back to its deployment.
    assert tag_dict(snapshot["TagList"])[f"{PREFIX}deployment-id"] == deployment.id


def test_retain_policy_keeps_the_instance_and_retags_it(provider: AwsProvider) -> None:
    deployment = postgres(provider, deletion_policy=DeletionPolicy.RETAIN)
    deploy(provider, deployment, CREDS)

    assert provider.delete(deployment) is True

    (instance,) = client("rds").describe_db_instances()["DBInstances"]
    tags = tag_dict(instance["TagList"])
    assert tags[f"{PREFIX}managed-by"] == "kidp-retained"
    assert tags[f"{PREFIX}deployment-id"] == deployment.id
    assert all(r.cloud_resource_id != instance["DBInstanceArn"] for r in provider.list_managed())


def test_rotate_credentials_sets_the_new_master_password(
    provider: AwsProvider, session: boto3.session.Session
) -> None:
    deployment = postgres(provider)
    deploy(provider, deployment, CREDS)
    seen: list[dict[str, Any]] = []
    session.events.register(
        "provide-client-params.rds.ModifyDBInstance",
        lambda params, **_: seen.append(dict(params)),
    )
    # The provider's clients were created before the hook: use a fresh provider.
    fresh = AwsProvider(region=REGION, session=session)

    fresh.rotate_credentials(deployment, Credentials("kidpadmin", "N3w-Passw0rd_value.x"))

    assert seen == [
        {
            "DBInstanceIdentifier": provider.identifier(deployment),
            "MasterUserPassword": "N3w-Passw0rd_value.x",
            "ApplyImmediately": True,
        }
    ]
    assert provider.get_status(deployment).state == "available"


def test_quota_from_account_attributes(
    provider: AwsProvider, session: boto3.session.Session
) -> None:
    # moto has no DescribeAccountAttributes: answer it as RDS does for a full account.
    session.events.register(
        "before-call.rds.DescribeAccountAttributes",
        lambda **_: short_circuit(
            200,
            {
                "AccountQuotas": [
                    {"AccountQuotaName": "DBInstances", "Used": 40, "Max": 40},
                    {"AccountQuotaName": "AllocatedStorage", "Used": 500, "Max": 100000},
                ]
            },
        ),
    )
    with pytest.raises(QuotaExceeded) as caught:
        provider.validate_quota(postgres(provider))

    message = caught.value.message
    assert "DBInstances" in message and "40" in message
    assert caught.value.details == {"quota": "DBInstances", "used": 40, "max": 40, "requested": 1}
    assert caught.value.to_body() == {
        "error": "quota_exceeded",
        "message": message,
        "code": 422,
    }


def test_quota_falls_back_to_counting_usage_when_attributes_are_unavailable(
    provider: AwsProvider,
) -> None:
    # A real 65,536 GiB instance: a second one would pass the 100,000 GiB default.
    client("rds").create_db_instance(
        DBInstanceIdentifier="big-warehouse",
        Engine="postgres",
        DBInstanceClass="db.m5.xlarge",
        AllocatedStorage=65536,
        MasterUsername="dba",
        MasterUserPassword="warehouse-123",
    )
    report = provider.validate_quota(postgres(provider, storage_gb=100))
    assert report.checked
    assert report.details["source"] == "defaults"
    assert "DescribeAccountAttributes" in report.details["note"]
    assert report.details["quotas"]["AllocatedStorage"]["used"] == 65536

    with pytest.raises(QuotaExceeded, match=r"AllocatedStorage.*65536 GiB used of 100000 GiB"):
        provider.validate_quota(postgres(provider, storage_gb=65536))


def test_quota_checks_read_usage_from_memory_while_it_is_fresh(
    provider: AwsProvider, api_calls: list[tuple[str, str]]
) -> None:
    provider.validate_quota(postgres(provider))
    first = len(api_calls)
    assert first > 0  # the first check asks RDS
    for _ in range(5):
        report = provider.validate_quota(postgres(provider))
    assert len(api_calls) == first  # the next ones do not wait for it
    assert report.details["maxAgeSeconds"] == 60.0


def test_with_no_quota_cache_every_check_asks_rds(
    session: boto3.session.Session, api_calls: list[tuple[str, str]]
) -> None:
    provider = AwsProvider(
        region=REGION,
        session=session,
        quota_ttl=0,
        on_call=lambda resource_type, operation: api_calls.append((resource_type, operation)),
    )
    provider.validate_quota(postgres(provider))
    first = len(api_calls)
    provider.validate_quota(postgres(provider))
    assert len(api_calls) == 2 * first > 0


def test_quota_for_types_without_a_preflight_check_says_so(provider: AwsProvider) -> None:
    report = provider.validate_quota(make_deployment(provider, ResourceType.BUCKET))
    assert report.checked is False
    assert "reason" in report.details


def test_database_without_credentials_is_refused(provider: AwsProvider) -> None:
    with pytest.raises(ProvisioningFailed, match="credentials"):
        deploy(provider, postgres(provider), None)


# --- Aurora ----------------------------------------------------------------------


def test_high_availability_database_is_an_aurora_cluster(provider: AwsProvider) -> None:
    deployment = postgres(provider, high_availability=True, size="large")
    resource = deploy(provider, deployment, CREDS)

    rds = client("rds")
    (cluster,) = rds.describe_db_clusters()["DBClusters"]
    assert cluster["Engine"] == "aurora-postgresql"
    assert cluster["StorageEncrypted"] is True
    assert tag_dict(cluster["TagList"]) == expected_tags(deployment)
    instances = rds.describe_db_instances()["DBInstances"]
    assert len(instances) == 2  # writer and a reader to fail over to
    for instance in instances:
        assert instance["DBClusterIdentifier"] == cluster["DBClusterIdentifier"]
        assert instance["DBInstanceClass"] == "db.r5.large"
        assert tag_dict(instance["TagList"]) == expected_tags(deployment)
    assert resource.cloud_resource_id == cluster["DBClusterArn"]

    deploy(provider, deployment, CREDS)  # adopting creates nothing more
    assert len(rds.describe_db_clusters()["DBClusters"]) == 1
    assert len(rds.describe_db_instances()["DBInstances"]) == 2

    status = provider.get_status(deployment)
    assert status.state == "available"
    assert status.endpoint == cluster["Endpoint"]
    assert status.port == 5432
    assert status.actual_spec["highAvailability"] is True
    assert status.actual_spec["size"] == "large"
    assert status.actual_spec["engine"] == "postgresql"

    # One entry per deployment in the scans: the cluster, not its instances.
    managed = [r for r in provider.list_managed() if r.tagged]
    assert [r.cloud_resource_id for r in managed] == [cluster["DBClusterArn"]]

    delete_until_done(provider, deployment)
    assert rds.describe_db_clusters()["DBClusters"] == []
    assert rds.describe_db_instances()["DBInstances"] == []


# --- ElastiCache -----------------------------------------------------------------


def test_redis_is_an_encrypted_replication_group_with_auth(provider: AwsProvider) -> None:
    deployment = make_deployment(
        provider, ResourceType.CACHE, engine="redis", version="7.0", high_availability=True
    )
    resource = deploy(provider, deployment, Credentials("default", TOKEN))

    elasticache = client("elasticache")
    (group,) = elasticache.describe_replication_groups()["ReplicationGroups"]
    assert group["ReplicationGroupId"] == provider.identifier(deployment)
    assert group["CacheNodeType"] == "cache.t3.small"
    assert group["AtRestEncryptionEnabled"] is True
    assert group["TransitEncryptionEnabled"] is True
    assert group["AuthTokenEnabled"] is True
    assert group["MultiAZ"] == "enabled"
    assert group["AutomaticFailover"] == "enabled"
    tags = elasticache.list_tags_for_resource(ResourceName=group["ARN"])["TagList"]
    assert tag_dict(tags) == expected_tags(deployment)
    assert resource.state == "available"
    assert resource.port == 6379
    assert resource.endpoint
    assert resource.actual_spec["highAvailability"] is True
    assert resource.actual_spec["size"] == "small"

    deploy(provider, deployment, Credentials("default", TOKEN))
    assert len(elasticache.describe_replication_groups()["ReplicationGroups"]) == 1

    # moto marks the group 'deleting' and never finishes, so delete keeps
    # answering "in progress" without issuing a second delete.
    assert provider.delete(deployment) is False
    assert provider.get_status(deployment).state == "deleting"
    assert provider.delete(deployment) is False


def test_redis_7_2_is_served_by_valkey(provider: AwsProvider) -> None:
    deployment = make_deployment(provider, ResourceType.CACHE, engine="redis", version="7.2")
    deploy(provider, deployment, Credentials("default", TOKEN))
    (group,) = client("elasticache").describe_replication_groups()["ReplicationGroups"]
    assert group["Engine"] == "valkey"
    assert provider.get_status(deployment).actual_spec["engine"] == "redis"


def test_memcached_is_a_tagged_cache_cluster(provider: AwsProvider) -> None:
    deployment = make_deployment(provider, ResourceType.CACHE, engine="memcached", size="large")
    resource = deploy(provider, deployment, None)

    elasticache = client("elasticache")
    (cluster,) = elasticache.describe_cache_clusters()["CacheClusters"]
    assert cluster["CacheClusterId"] == provider.identifier(deployment)
    assert cluster["Engine"] == "memcached"
    assert cluster["CacheNodeType"] == "cache.m5.large"
    assert cluster["NumCacheNodes"] == 1
    tags = elasticache.list_tags_for_resource(ResourceName=cluster["ARN"])["TagList"]
    assert tag_dict(tags) == expected_tags(deployment)
    assert resource.state == "available"
    assert resource.port == 11211
    assert resource.actual_spec == {
        "engine": "memcached",
        "version": "1.6",
        "size": "large",
        "highAvailability": False,
    }
    assert provider.delete(deployment) is False  # moto keeps it 'deleting'


# --- S3 --------------------------------------------------------------------------


def test_bucket_is_tagged_private_encrypted_and_versioned(provider: AwsProvider) -> None:
    deployment = make_deployment(provider, ResourceType.BUCKET, versioning=True)
    resource = deploy(provider, deployment)

    s3 = client("s3")
    name = provider.identifier(deployment)
    assert tag_dict(s3.get_bucket_tagging(Bucket=name)["TagSet"]) == expected_tags(deployment)
    assert s3.get_bucket_versioning(Bucket=name)["Status"] == "Enabled"
    (rule,) = s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    block = s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"]
    assert all(block.values())
    assert resource.state == "available"
    assert resource.cloud_resource_id == f"arn:aws:s3:::{name}"
    assert resource.actual_spec == {"versioning": True, "encryptionAtRest": True}

    deploy(provider, deployment)
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == [name]


def test_deleting_a_bucket_removes_every_object_version(provider: AwsProvider) -> None:
    deployment = make_deployment(provider, ResourceType.BUCKET, versioning=True)
    deploy(provider, deployment)
    s3 = client("s3")
    name = provider.identifier(deployment)
    s3.put_object(Bucket=name, Key="report.csv", Body=b"v1")
    s3.put_object(Bucket=name, Key="report.csv", Body=b"v2")
    s3.delete_object(Bucket=name, Key="report.csv")

    delete_until_done(provider, deployment)

    assert s3.list_buckets()["Buckets"] == []
    assert provider.delete(deployment) is True


# --- ECS -------------------------------------------------------------------------


def test_service_runs_on_fargate_in_the_broker_cluster(
    session: boto3.session.Session, subnet: str
) -> None:
    provider = AwsProvider(region=REGION, session=session, subnet_ids=[subnet])
    deployment = make_deployment(
        provider, ResourceType.SERVICE, image="nginx:1.27", port=8080, replicas=2, size="medium"
    )
    resource = deploy(provider, deployment)

    ecs = client("ecs")
    (service,) = ecs.describe_services(
        cluster="kidp", services=[provider.identifier(deployment)], include=["TAGS"]
    )["services"]
    assert service["launchType"] == "FARGATE"
    assert service["desiredCount"] == 2
    assert tag_dict(service["tags"]) == expected_tags(deployment)
    assert service["networkConfiguration"]["awsvpcConfiguration"]["subnets"] == [subnet]
    task = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])["taskDefinition"]
    assert (task["cpu"], task["memory"]) == ("2048", "4096")
    (container,) = task["containerDefinitions"]
    assert container["image"] == "nginx:1.27"
    assert container["portMappings"][0]["containerPort"] == 8080
    # moto never starts tasks, so the service stays short of its desired count.
    assert resource.state == "creating"
    assert resource.actual_spec == {
        "replicas": 2,
        "size": "medium",
        "image": "nginx:1.27",
        "port": 8080,
    }

    deploy(provider, deployment)
    assert len(ecs.list_services(cluster="kidp")["serviceArns"]) == 1

    delete_until_done(provider, deployment)
    assert provider.get_status(deployment).state == "missing"
    assert (
        ecs.list_task_definitions(familyPrefix=provider.identifier(deployment), status="ACTIVE")[
            "taskDefinitionArns"
        ]
        == []
    )
    assert provider.delete(deployment) is True


def test_service_without_subnets_is_refused_clearly(provider: AwsProvider) -> None:
    deployment = make_deployment(provider, ResourceType.SERVICE, image="nginx:1.27")
    with pytest.raises(ProvisioningFailed, match="subnet_ids"):
        deploy(provider, deployment)


# --- MSK topics ------------------------------------------------------------------


class FakeMskTopics:
    """MSK's topic API, which moto does not model, answered in ``before-call``:
    the real client still validates and serializes every request."""

    def __init__(self) -> None:
        self.topics: dict[str, dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []

    def install(self, session: boto3.session.Session) -> None:
        for operation in ("CreateTopic", "DescribeTopic", "DeleteTopic", "GetBootstrapBrokers"):
            session.events.register(f"before-call.kafka.{operation}", self)

    def __call__(self, model: Any, params: dict[str, Any], **_: Any) -> Any:
        operation = model.name
        if operation == "GetBootstrapBrokers":
            return short_circuit(
                200, {"BootstrapBrokerStringSaslIam": "b-1.kidp.kafka.local:9098,b-2:9098"}
            )
        if operation == "CreateTopic":
            body = json.loads(params["body"])
            self.created.append(body)
            name = body["topicName"]
            if name in self.topics:
                return short_circuit(
                    409, {"Error": {"Code": "TopicExistsException", "Message": name}}
                )
            self.topics[name] = {
                "TopicArn": f"{MSK_ARN}/topic/{name}",
                "TopicName": name,
                "PartitionCount": body["partitionCount"],
                "ReplicationFactor": body["replicationFactor"],
                "Configs": body.get("configs"),
                "Status": "CREATING",
            }
            return short_circuit(200, {"TopicName": name, "Status": "CREATING"})
        name = urllib.parse.unquote(params["url_path"].rsplit("/", 1)[-1])
        topic = self.topics.get(name)
        if topic is None:
            return short_circuit(404, {"Error": {"Code": "NotFoundException", "Message": name}})
        if operation == "DeleteTopic":
            topic["Status"] = "DELETING"
            return short_circuit(200, {"TopicName": name, "Status": "DELETING"})
        described = dict(topic)
        # Each look moves the topic along, as the cluster would.
        if topic["Status"] == "CREATING":
            topic["Status"] = "ACTIVE"
        elif topic["Status"] == "DELETING":
            del self.topics[name]
        return short_circuit(200, described)


def test_topics_are_refused_without_an_msk_cluster(
    provider: AwsProvider, session: boto3.session.Session
) -> None:
    with_msk = AwsProvider(region=REGION, session=session, msk_cluster_arn=MSK_ARN)
    deployment = make_deployment(with_msk, ResourceType.TOPIC, engine="kafka")
    with pytest.raises(ProvisioningFailed, match="msk_cluster_arn"):
        deploy(provider, deployment)


def test_topic_lifecycle_through_the_msk_topic_api(session: boto3.session.Session) -> None:
    fake = FakeMskTopics()
    fake.install(session)
    provider = AwsProvider(region=REGION, session=session, msk_cluster_arn=MSK_ARN)
    deployment = make_deployment(
        provider, ResourceType.TOPIC, engine="kafka", partitions=6, retention_hours=24
    )

    created = deploy(provider, deployment)
    assert created.state == "creating"
    (request,) = fake.created
    assert request["topicName"] == "kidp-team-a.orders"
    assert request["partitionCount"] == 6
    assert request["replicationFactor"] == 3
    assert json.loads(base64.b64decode(request["configs"])) == {"retention.ms": "86400000"}

    deploy(provider, deployment)
    assert len(fake.created) == 1

    status = provider.get_status(deployment)
    assert status.state == "available"
    assert status.endpoint == "b-1.kidp.kafka.local:9098,b-2:9098"
    assert status.port == 9098
    assert status.actual_spec == {"engine": "kafka", "partitions": 6, "replicationFactor": 3}

    assert provider.delete(deployment) is False  # DELETING
    assert provider.delete(deployment) is True
    assert provider.delete(deployment) is True


# --- scans and health --------------------------------------------------------------


def test_list_managed_finds_tagged_resources_and_flags_untagged_kidp_ones(
    provider: AwsProvider,
) -> None:
    database = postgres(provider)
    bucket = make_deployment(provider, ResourceType.BUCKET, name="assets")
    deploy(provider, database, CREDS)
    deploy(provider, bucket)
    retained = postgres(provider, deletion_policy=DeletionPolicy.RETAIN)
    retained = retained.model_copy(update={"resource_name": "legacy"})
    deploy(provider, retained, CREDS)
    provider.delete(retained)
    rds = client("rds")
    for name in ("kidp-rogue", "someone-elses-db"):
        rds.create_db_instance(
            DBInstanceIdentifier=name,
            Engine="mysql",
            DBInstanceClass="db.t3.micro",
            AllocatedStorage=20,
            MasterUsername="admin1",
            MasterUserPassword="password-123",
        )
    client("s3").create_bucket(Bucket="kidp-stray-bucket")

    found = {(r.resource_type, r.name, r.tagged): r for r in provider.list_managed()}

    assert set(found) == {
        (ResourceType.DATABASE, provider.identifier(database), True),
        (ResourceType.BUCKET, provider.identifier(bucket), True),
        (ResourceType.DATABASE, "kidp-rogue", False),
        (ResourceType.BUCKET, "kidp-stray-bucket", False),
    }
    tagged_db = found[(ResourceType.DATABASE, provider.identifier(database), True)]
    assert tagging.decode(tagged_db.tags, dialect="aws")["deployment-id"] == database.id


def test_check_passes_against_a_reachable_account(provider: AwsProvider) -> None:
    provider.check()


def test_check_raises_cloud_unavailable_when_the_endpoint_is_unreachable(
    aws_credentials: None,
) -> None:
    endpoint = "http://127.0.0.1:9"
    sts = boto3.client(
        "sts",
        region_name=REGION,
        endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    provider = AwsProvider(region=REGION, endpoint_url=endpoint, clients={"sts": sts})
    with pytest.raises(CloudUnavailable, match="cannot reach AWS sts"):
        provider.check()


@pytest.mark.emulator
def test_works_against_a_moto_server_endpoint(aws_credentials: None) -> None:
    """The integration path: clients built by the provider from ``endpoint_url``.
    moto's server answers operations it does not model with an HTML page; the
    provider falls back where it can (quota, Aurora versions) instead of failing."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        provider = AwsProvider(region=REGION, endpoint_url=f"http://127.0.0.1:{port}")
        provider.check()
        database = postgres(provider, high_availability=True)
        assert provider.validate_quota(database).details["source"] == "defaults"
        assert deploy(provider, database, CREDS).state == "available"
        bucket = make_deployment(provider, ResourceType.BUCKET)
        assert deploy(provider, bucket).state == "available"
        assert {(r.resource_type, r.tagged) for r in provider.list_managed()} == {
            (ResourceType.DATABASE, True),
            (ResourceType.BUCKET, True),
        }
        delete_until_done(provider, database)
        delete_until_done(provider, bucket)
        assert provider.list_managed() == []
    finally:
        server.stop()
