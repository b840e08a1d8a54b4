"""Drift, orphan, cost and rotation scans against moto through boto3."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import boto3

from kidp.errors import CloudUnavailable
from kidp.models import CostSnapshot, Phase


def rds() -> Any:
    return boto3.client("rds", region_name="us-east-1")


def ready(h: Any, **changes: Any) -> str:
    deployment_id: str = h.submit(**changes).deployment_id
    h.drain()
    assert h.store.get(deployment_id).phase is Phase.READY
    return deployment_id


def credentials_91_days_old(h: Any, deployment_id: str) -> Any:
    """Age the deployment's credentials past the 90-day rotation limit."""
    deployment = h.store.get(deployment_id)
    h.store.save(
        deployment.evolve(credentials_rotated_at=deployment.created_at - timedelta(days=91)),
        expected_version=deployment.version,
    )
    return deployment


def stored_credentials(deployment: Any) -> dict[str, str]:
    sm = boto3.client("secretsmanager", region_name="us-east-1")
    value: dict[str, str] = json.loads(
        sm.get_secret_value(SecretId=deployment.secret_ref.id)["SecretString"]
    )
    return value


def drift_callbacks(h: Any) -> list[dict[str, Any]]:
    return [p for _, p in h.receiver.log if p.get("driftDetected") is not None]


def test_resized_instance_is_drift_reported_once(make_broker: Any) -> None:
    h = make_broker()
    deployment_id = ready(h)
    identifier = rds().describe_db_instances()["DBInstances"][0]["DBInstanceIdentifier"]
    rds().modify_db_instance(
        DBInstanceIdentifier=identifier, DBInstanceClass="db.r5.4xlarge", ApplyImmediately=True
    )

    assert h.broker.scanner.drift()["changed"] == 1
    h.drain()
    (callback,) = drift_callbacks(h)
    assert callback["deploymentId"] == deployment_id
    assert callback["driftDetected"] is True
    assert any(d.startswith("Size mismatch: desired=medium") for d in callback["driftDetails"])

    # The same drift again is not news.
    assert h.broker.scanner.drift()["changed"] == 0
    h.drain()
    assert len(drift_callbacks(h)) == 1
    assert b'broker_drift_detected_total{namespace="team-platform",type="database"} 1.0' in (
        h.service.metrics.render()
    )

    view = h.service.resources(h.admin, namespace="team-platform")["resources"][0]
    assert view["driftDetected"] is True
    assert view["desiredSpec"]["size"] == "medium"


def test_no_drift_on_a_fresh_resource(make_broker: Any) -> None:
    h = make_broker()
    ready(h)
    assert h.broker.scanner.drift() == {"checked": 1, "changed": 0}
    view = h.service.resources(h.admin, namespace="team-platform")["resources"][0]
    assert view["healthStatus"] == "Healthy"
    assert view["actualSpec"]["engine"] == "postgresql"


def test_resource_deleted_behind_our_back_is_drift(make_broker: Any) -> None:
    h = make_broker()
    ready(h)
    identifier = rds().describe_db_instances()["DBInstances"][0]["DBInstanceIdentifier"]
    rds().delete_db_instance(DBInstanceIdentifier=identifier, SkipFinalSnapshot=True)
    h.broker.scanner.drift()
    h.drain()
    (callback,) = drift_callbacks(h)
    assert callback["driftDetails"] == ["Resource missing: not found in the cloud"]


def test_orphans_are_listed_not_deleted(make_broker: Any, stray_rds_instance: Any) -> None:
    h = make_broker()
    ready(h)
    stray_rds_instance("kidp-team-x-lost", "deploy-" + "0" * 32)
    stray_rds_instance("kidp-team-x-untagged")

    result = h.broker.scanner.orphans()
    reasons = {o["name"]: o["reason"] for o in result["orphans"]}
    assert reasons == {
        "kidp-team-x-lost": "no deployment with this id",
        "kidp-team-x-untagged": "untagged resource among managed ones",
    }
    assert len(rds().describe_db_instances()["DBInstances"]) == 3


def test_cost_snapshots_group_and_flag_a_weekly_jump(make_broker: Any) -> None:
    h = make_broker()
    first = ready(h)
    ready(
        h,
        resourceName="other-db",
        team="data-team",
        spec={"engine": "mysql", "version": "8.0", "size": "small"},
    )
    result = h.broker.scanner.cost()
    assert result["snapshots"] == 2 and result["alerts"] == []

    by_team = h.broker.scanner.costs(group_by="team", namespaces=None)
    teams = {g["team"]: g for g in by_team["groups"]}
    assert set(teams) == {"platform-team", "data-team"}
    assert teams["platform-team"]["estimatedMonthly"] > teams["data-team"]["estimatedMonthly"]
    assert by_team["total"] == round(sum(g["estimatedMonthly"] for g in teams.values()), 2)

    week_ago = (h.service.clock.now().date() - timedelta(days=7)).isoformat()
    today_cost = h.store.get(first).cost.estimated_monthly
    h.store.put_cost_snapshot(
        CostSnapshot(
            deployment_id=first,
            day=week_ago,
            namespace="team-platform",
            team="platform-team",
            application="postgres-app-db",
            resource_type="database",
            amount=today_cost / 2,
        )
    )
    alerts = h.broker.scanner.cost()["alerts"]
    team_alert = next(a for a in alerts if a["groupBy"] == "team")
    assert team_alert["group"] == "platform-team"
    assert team_alert["increasePercent"] == 100.0
    assert b"broker_cost_jumps_total" in h.service.metrics.render()


def test_old_credentials_are_rotated_with_a_callback(make_broker: Any) -> None:
    h = make_broker()
    deployment = credentials_91_days_old(h, ready(h))
    before = stored_credentials(deployment)

    assert h.broker.scanner.rotation() == {"rotated": 1, "failed": 0}
    h.drain()
    after = stored_credentials(deployment)
    assert after["password"] != before["password"]
    callback = h.receiver.log[-1][1]
    assert callback["message"] == "Credentials rotated"
    assert callback["additionalMetadata"]["secretRef"]["version"] != (deployment.secret_ref.version)
    assert after["password"] not in json.dumps(callback)
    # Nothing is due again right after.
    assert h.broker.scanner.rotation() == {"rotated": 0, "failed": 0}


def test_patch_updates_are_listed_but_page_no_one(make_broker: Any) -> None:
    h = make_broker()
    ready(h)
    identifier = rds().describe_db_instances()["DBInstances"][0]["DBInstanceIdentifier"]
    rds().modify_db_instance(
        DBInstanceIdentifier=identifier, EngineVersion="15.7", ApplyImmediately=True
    )
    assert h.broker.scanner.drift()["changed"] == 0
    h.drain()
    assert drift_callbacks(h) == []
    view = h.service.resources(h.admin, namespace="team-platform")["resources"][0]
    assert view["driftDetected"] is False
    assert view["driftDetails"] == ["Version mismatch: desired=15, actual=15.7 (patch update)"]
    assert b"broker_drift_detected_total{" not in h.service.metrics.render()


def test_cost_alerts_show_only_the_callers_namespaces(make_broker: Any) -> None:
    h = make_broker()
    mine = ready(h)
    theirs = ready(h, namespace="secret-team", resourceName="their-db")
    week_ago = (h.service.clock.now().date() - timedelta(days=7)).isoformat()
    for deployment_id, namespace in ((mine, "team-platform"), (theirs, "secret-team")):
        d = h.store.get(deployment_id)
        h.store.put_cost_snapshot(
            CostSnapshot(
                deployment_id=d.id,
                day=week_ago,
                namespace=namespace,
                team=d.team,
                application=d.application,
                resource_type="database",
                amount=d.cost.estimated_monthly / 2,
            )
        )
    h.broker.scanner.cost()
    for group_by in ("team", "namespace", "application"):
        visible = h.broker.scanner.costs(group_by=group_by, namespaces={"team-platform"})
        assert "secret-team" not in json.dumps(visible)
        assert "their-db" not in json.dumps(visible)
    everything = h.broker.scanner.costs(group_by="namespace", namespaces=None)
    assert {a["group"] for a in everything["alerts"]} == {"team-platform", "secret-team"}


class RefusingRotation:
    """The real provider, except that the cloud refuses the new password."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def rotate_credentials(self, deployment: Any, credentials: Any) -> None:
        from kidp.errors import ProvisioningFailed

        raise ProvisioningFailed("InvalidDBInstanceState: instance is not available")


def test_a_refused_rotation_keeps_the_secret_that_works(make_broker: Any) -> None:
    h = make_broker()
    deployment = credentials_91_days_old(h, ready(h))
    before = stored_credentials(deployment)
    h.service.provider = RefusingRotation(h.service.provider)

    assert h.broker.scanner.rotation() == {"rotated": 0, "failed": 1}
    after = stored_credentials(deployment)
    assert after["password"] == before["password"]
    assert b'broker_credential_rotations_total{status="failure"} 1.0' in (
        h.service.metrics.render()
    )


def test_a_drift_scan_that_cannot_reach_the_cloud_says_why(make_broker: Any) -> None:
    h = make_broker()
    deployment_id = h.submit().deployment_id
    h.drain()

    def unreachable(deployment: Any) -> Any:
        raise CloudUnavailable("rds describe_db_instances: no answer (EndpointConnectionError)")

    h.service.provider.get_status = unreachable  # type: ignore[method-assign]
    assert h.broker.scanner.drift() == {
        "checked": 0,
        "changed": 0,
        "skipped": [
            {
                "deploymentId": deployment_id,
                "reason": "rds describe_db_instances: no answer (EndpointConnectionError)",
            }
        ],
        "skippedTotal": 1,
    }
