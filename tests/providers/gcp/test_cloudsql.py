"""Cloud SQL instances through the SQL Admin API's discovery client, on the stand-in."""

from __future__ import annotations

import json
import traceback

import httpx
import pytest
from tests.providers.deployments import postgres
from tests.providers.gcp.support import (
    CREDS,
    PASSWORD,
    REGION,
    Operator,
    delete_until_done,
    deploy,
    expected_labels,
    new_provider,
    settle,
)

from kidp import drift
from kidp.errors import ProvisioningFailed
from kidp.gcp_emulator import GcpEmulator
from kidp.models import DeletionPolicy
from kidp.ports import Credentials
from kidp.providers.gcp import GcpProvider


def test_deploy_starts_the_create_and_polls_reach_ready_with_the_requested_settings(
    provider: GcpProvider,
    emulator: GcpEmulator,
    operator: Operator,
    api_calls: list[tuple[str, str]],
) -> None:
    deployment = postgres(
        provider, high_availability=True, storage_gb=50, backup={"retention": "14d"}
    )
    started = deploy(provider, deployment, CREDS)
    assert started.state == "creating"  # deploy never waits for the operation
    assert started.progress is not None and started.progress < 100

    ready = settle(provider, deployment)

    assert ready.state == "available"
    instance = operator.sql_instance(provider.identifier(deployment))
    settings = instance["settings"]
    assert instance["databaseVersion"] == "POSTGRES_15"
    assert instance["region"] == REGION
    assert settings["tier"] == "db-custom-2-4096"
    assert settings["availabilityType"] == "REGIONAL"
    assert settings["dataDiskSizeGb"] == "50"
    assert settings["backupConfiguration"]["enabled"] is True
    assert settings["backupConfiguration"]["backupRetentionSettings"]["retainedBackups"] == 14
    assert settings["ipConfiguration"]["sslMode"] == "ENCRYPTED_ONLY"
    assert settings["userLabels"] == expected_labels(deployment)
    assert "rootPassword" not in instance
    assert emulator.sql_password(provider.project, instance["name"], "postgres") == PASSWORD
    assert ready.endpoint == instance["ipAddresses"][0]["ipAddress"]
    assert ready.port == 5432
    assert ready.cloud_resource_id == f"projects/{provider.project}/instances/{instance['name']}"
    assert ready.actual_spec["size"] == "medium"
    assert ready.actual_spec["backupRetentionDays"] == 14
    assert api_calls.count(("database", "instances.insert")) == 1
    assert PASSWORD not in ready.model_dump_json()


def test_deploy_twice_adopts_the_first_instance(
    provider: GcpProvider, operator: Operator, api_calls: list[tuple[str, str]]
) -> None:
    deployment = postgres(provider)
    first = deploy(provider, deployment, CREDS)
    second = deploy(provider, deployment, CREDS)

    assert len(operator.sql_instances()) == 1
    assert second.cloud_resource_id == first.cloud_resource_id
    assert api_calls.count(("database", "instances.insert")) == 1


def test_names_carry_the_deployment_because_cloud_sql_keeps_deleted_names(
    provider: GcpProvider, operator: Operator
) -> None:
    first = postgres(provider)
    deploy(provider, first, CREDS)
    settle(provider, first)
    assert delete_until_done(provider, first) >= 1

    # The same namespace/name again, right after the delete: a new name.
    again = postgres(provider)
    assert provider.identifier(again) != provider.identifier(first)
    assert provider.identifier(again).startswith("kidp-team-a-orders-")
    deploy(provider, again, CREDS)
    assert settle(provider, again).state == "available"
    assert len(provider.identifier(again)) <= 63


def test_a_failed_create_operation_fails_with_googles_reason(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    emulator.fail_next_operation(
        "sqladmin", kind="CREATE", status="INTERNAL_ERROR", message="zone out of resources"
    )
    deployment = postgres(provider)
    deploy(provider, deployment, CREDS)

    failed = settle(provider, deployment)

    assert failed.state == "failed"
    assert "CREATE failed" in failed.message
    assert "zone out of resources" in failed.message


def test_drift_shows_what_was_changed_in_the_cloud(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    deployment = postgres(provider)
    deploy(provider, deployment, CREDS)
    settle(provider, deployment)
    with emulator.edit():
        instance = emulator.sql_instance(provider.project, provider.identifier(deployment))
        assert instance is not None
        instance["settings"]["tier"] = "db-custom-4-8192"
        instance["settings"]["availabilityType"] = "REGIONAL"

    actual = provider.get_status(deployment).actual_spec
    report = drift.compare(deployment.spec.wire(), actual)

    assert report.significant
    assert "Size mismatch: desired=medium, actual=large" in report.details
    assert "HighAvailability mismatch: desired=False, actual=True" in report.details
    # The installed minor version is a patch, reported but not significant.
    assert "Version mismatch: desired=15, actual=15.4 (patch update)" in report.details


def test_delete_twice_succeeds_and_removes_the_instance(
    provider: GcpProvider, operator: Operator, emulator: GcpEmulator
) -> None:
    deployment = postgres(provider)
    deploy(provider, deployment, CREDS)
    settle(provider, deployment)

    delete_until_done(provider, deployment)
    assert operator.sql_instances() == []
    assert provider.delete(deployment) is True
    assert provider.get_status(deployment).state == "missing"
    assert emulator.sql_backups.get(provider.project, []) == []  # Delete keeps no backup


def test_snapshot_policy_keeps_a_final_backup(
    provider: GcpProvider, operator: Operator, emulator: GcpEmulator
) -> None:
    deployment = postgres(provider, deletion_policy=DeletionPolicy.SNAPSHOT)
    deploy(provider, deployment, CREDS)
    settle(provider, deployment)

    delete_until_done(provider, deployment)

    assert operator.sql_instances() == []
    backups = operator.sql.Backups().ListBackups(parent=f"projects/{provider.project}").execute()
    (final,) = backups["backups"]
    assert final["type"] == "FINAL"
    assert final["instance"] == provider.identifier(deployment)
    assert deployment.id in final["description"]


def test_delete_while_the_create_still_runs_waits_for_it(
    emulator: GcpEmulator, gcp_project: str, operator: Operator
) -> None:
    emulator.operation_polls = 6
    provider = new_provider(emulator, gcp_project)
    deployment = postgres(provider)
    deploy(provider, deployment, CREDS)

    assert provider.delete(deployment) is False  # another operation is in progress
    assert delete_until_done(provider, deployment) >= 1
    assert operator.sql_instances() == []


def test_retain_relabels_the_instance_and_leaves_it(
    provider: GcpProvider, operator: Operator
) -> None:
    deployment = postgres(provider, deletion_policy=DeletionPolicy.RETAIN)
    deploy(provider, deployment, CREDS)
    settle(provider, deployment)

    assert provider.delete(deployment) is True

    operator.sql_instances()  # the label change is an operation: it finishes as it is read
    (instance,) = operator.sql_instances()
    assert instance["settings"]["userLabels"] == expected_labels(deployment, "kidp-retained")
    assert provider.list_managed() == []


def test_rotation_sets_the_new_password_on_the_administrator(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    deployment = postgres(provider)
    deploy(provider, deployment, CREDS)
    settle(provider, deployment)
    new = Credentials(username="postgres", password="Rotated-" + "x" * 24)
    emulator.operation_polls = 0  # users.update is an operation: let it finish at once

    provider.rotate_credentials(deployment, new)

    name = provider.identifier(deployment)
    assert emulator.sql_password(provider.project, name, "postgres") == new.password


def test_mysql_uses_its_root_user_at_any_host(
    provider: GcpProvider, emulator: GcpEmulator, operator: Operator
) -> None:
    deployment = postgres(provider, engine="mysql", version="8.0")
    policy = provider.password_policy(deployment)
    assert policy is not None and policy.username == "root"
    root = Credentials(username="root", password=PASSWORD)
    deploy(provider, deployment, root)
    resource = settle(provider, deployment)
    assert resource.port == 3306
    assert resource.actual_spec["engine"] == "mysql"
    name = provider.identifier(deployment)
    assert operator.sql_instance(name)["databaseVersion"] == "MYSQL_8_0"

    emulator.operation_polls = 0
    provider.rotate_credentials(deployment, Credentials(username="root", password="N" * 32))
    assert emulator.sql_password(provider.project, name, "root", "%") == "N" * 32


@pytest.mark.parametrize(("engine", "version"), [("postgresql", "16"), ("mysql", "8.4")])
def test_versions_whose_default_edition_is_enterprise_plus_get_enterprise_for_custom_tiers(
    provider: GcpProvider, operator: Operator, engine: str, version: str
) -> None:
    # Cloud SQL makes PostgreSQL 16+ and MySQL 8.4 Enterprise Plus unless told,
    # and Enterprise Plus refuses the db-custom-* tiers the sizes use.
    deployment = postgres(provider, engine=engine, version=version, size="small")
    user = "root" if engine == "mysql" else "postgres"
    deploy(provider, deployment, Credentials(username=user, password=PASSWORD))
    assert settle(provider, deployment).state == "available"
    settings = operator.sql_instance(provider.identifier(deployment))["settings"]
    assert (settings["edition"], settings["tier"]) == ("ENTERPRISE", "db-custom-1-3840")


@pytest.mark.parametrize(
    ("version", "edition", "tier", "status"),
    [
        # Enterprise Plus is the default from PostgreSQL 16 and MySQL 8.4 on.
        ("POSTGRES_16", None, "db-custom-1-3840", 400),
        ("POSTGRES_18", None, "db-custom-1-3840", 400),
        ("MYSQL_8_4", None, "db-custom-2-4096", 400),
        ("POSTGRES_18", None, "db-g1-small", 400),
        ("POSTGRES_15", "ENTERPRISE_PLUS", "db-custom-1-3840", 400),
        ("POSTGRES_18", "ENTERPRISE", "db-custom-1-3840", 200),
        ("MYSQL_8_4", "ENTERPRISE", "db-custom-2-4096", 200),
        ("POSTGRES_18", None, "db-perf-optimized-N-2", 200),
        # Enterprise before them.
        ("POSTGRES_15", None, "db-custom-1-3840", 200),
        ("MYSQL_8_0", None, "db-custom-1-3840", 200),
    ],
)
def test_the_stand_in_refuses_enterprise_tiers_on_enterprise_plus_as_cloud_sql_does(
    emulator: GcpEmulator, version: str, edition: str | None, tier: str, status: int
) -> None:
    settings = {"tier": tier} | ({"edition": edition} if edition else {})
    body = {"name": "db-3", "databaseVersion": version, "settings": settings}
    answer = httpx.post(f"{emulator.url}v1/projects/p/instances", json=body)
    assert answer.status_code == status, answer.text
    if status == 400:
        error = answer.json()["error"]
        assert (error["status"], error["errors"][0]["reason"]) == ("INVALID_ARGUMENT", "invalid")
        assert f"Invalid Tier ({tier}) for (ENTERPRISE_PLUS) Edition" in error["message"]
    else:
        instance = httpx.get(f"{emulator.url}v1/projects/p/instances/db-3").json()
        default = "ENTERPRISE_PLUS" if tier.startswith("db-perf-optimized-") else "ENTERPRISE"
        assert instance["settings"]["edition"] == (edition or default)


def test_plan_lists_the_request_without_calls_or_password(
    provider: GcpProvider, api_calls: list[tuple[str, str]]
) -> None:
    from kidp import tags as tagging

    deployment = postgres(provider, storage_gb=30)
    plan = provider.plan(deployment, tagging.logical_tags(deployment))

    assert api_calls == []
    assert PASSWORD not in json.dumps(plan)
    (request,) = plan["requests"]
    assert request["method"] == "POST"
    assert request["url"] == f"{provider.api_endpoint}/v1/projects/{provider.project}/instances"
    assert request["secretFields"] == ["rootPassword"]
    assert "rootPassword" not in request["body"]
    assert request["body"]["name"] == plan["identifier"]
    assert request["body"]["settings"]["dataDiskSizeGb"] == "30"
    assert request["body"]["settings"]["edition"] == "ENTERPRISE"
    assert request["body"]["settings"]["userLabels"] == expected_labels(deployment)
    assert any("final backup" in note for note in plan["notes"])


def test_google_echoing_the_password_never_reaches_the_error(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    # Google's message may quote the request; here it quotes the password.
    emulator.fail_next(
        400, method="POST", path="/instances$", message=f"invalid rootPassword {PASSWORD}"
    )
    deployment = postgres(provider)

    with pytest.raises(ProvisioningFailed) as caught:
        deploy(provider, deployment, CREDS)

    error = caught.value
    assert "HTTP 400" in error.message and "instances.insert" in error.message
    assert PASSWORD not in error.message
    assert PASSWORD not in json.dumps(error.to_body())
    assert PASSWORD not in "".join(traceback.format_exception(error))
    assert error.__cause__ is None


def test_a_refusal_without_a_secret_keeps_googles_message(
    provider: GcpProvider, emulator: GcpEmulator
) -> None:
    emulator.fail_next(400, method="GET", path="/instances/", message="Invalid instance name")
    with pytest.raises(ProvisioningFailed, match="Invalid instance name"):
        provider.get_status(postgres(provider))
