"""The use cases end to end in one process: SQLite store and queue, the AWS
provider through boto3 against moto, callbacks to a real local receiver."""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta
from typing import Any

import boto3
import pytest

from kidp.errors import Conflict, Forbidden, NotFound, StoreUnavailable, ValidationFailed
from kidp.models import Job, JobKind, Phase
from kidp.observability import JsonFormatter, configure_logging


def rds() -> Any:
    return boto3.client("rds", region_name="us-east-1")


def instances() -> list[dict[str, Any]]:
    return rds().describe_db_instances()["DBInstances"]


def test_provision_reaches_ready_with_one_signed_callback_per_phase(make_broker: Any) -> None:
    h = make_broker()
    accepted = h.submit()
    assert accepted.status == "accepted"
    assert accepted.deployment_id.startswith("deploy-") and len(accepted.deployment_id) == 39
    assert h.store.get(accepted.deployment_id).phase is Phase.PENDING

    h.drain()

    deployment = h.store.get(accepted.deployment_id)
    assert deployment.phase is Phase.READY
    assert h.phases() == ["Provisioning", "Ready"]
    ready = h.receiver.log[-1][1]
    assert ready["deploymentId"] == accepted.deployment_id
    assert ready["endpoint"] and ready["port"] == 5432
    assert ready["connectionSecret"] == "postgres-app-db-credentials"
    assert ready["estimatedMonthlyCost"] > 0
    meta = ready["additionalMetadata"]
    assert meta["engine"] == "postgresql"
    assert meta["secretRef"]["store"] == "aws-secretsmanager"
    assert meta["cost"]["breakdown"].keys() == {"compute", "storage", "network"}
    assert meta["tags"]["deployment-id"] == accepted.deployment_id

    (instance,) = instances()
    tags = {t["Key"]: t["Value"] for t in instance["TagList"]}
    assert tags["platform.company.com/managed-by"] == "kidp"
    assert tags["platform.company.com/deployment-id"] == accepted.deployment_id
    assert tags["platform.company.com/team"] == "platform-team"
    assert tags["platform.company.com/application"] == "postgres-app-db"
    assert "platform.company.com/resource-uid" in tags


def test_credentials_live_in_secrets_manager_and_nowhere_else(
    make_broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    configure_logging("DEBUG")  # what `serve` does, at its most verbose
    caplog.set_level(logging.DEBUG)
    h = make_broker()
    deployment_id = h.submit().deployment_id
    h.drain()
    deployment = h.store.get(deployment_id)
    secret = boto3.client("secretsmanager", region_name="us-east-1").get_secret_value(
        SecretId=deployment.secret_ref.id
    )
    password = json.loads(secret["SecretString"])["password"]
    assert len(password) >= 16

    # Formatted as `serve` writes them, structured fields included.
    logs = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    seen = json.dumps([p for _, p in h.receiver.log]) + logs
    seen += json.dumps(h.service.detailed_status(deployment))
    seen += deployment.model_dump_json()
    assert password not in seen


def test_same_request_again_returns_the_same_deployment(make_broker: Any) -> None:
    h = make_broker()
    first = h.submit()
    again = h.submit()
    assert again.status == "exists"
    assert again.deployment_id == first.deployment_id
    h.drain()
    assert h.submit().deployment_id == first.deployment_id
    assert len(instances()) == 1


def test_same_resource_with_another_spec_is_a_conflict(make_broker: Any) -> None:
    h = make_broker()
    first = h.submit()
    with pytest.raises(Conflict, match=first.deployment_id):
        h.submit(spec={"engine": "postgresql", "version": "16", "size": "medium"})


def test_request_id_makes_a_retry_idempotent(make_broker: Any) -> None:
    h = make_broker()
    request = h.request()
    first = h.service.submit_provision(h.admin, request, request_id="req-1")
    again = h.service.submit_provision(h.admin, request, request_id="req-1")
    assert again.deployment_id == first.deployment_id
    with pytest.raises(Conflict, match="X-Request-ID"):
        h.service.submit_provision(h.admin, h.request(resourceName="other-db"), request_id="req-1")


def test_concurrent_duplicates_make_one_deployment_and_one_resource(make_broker: Any) -> None:
    h = make_broker()
    results: list[str] = []
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            results.append(h.submit().deployment_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    h.drain()
    assert len(instances()) == 1
    assert h.phases().count("Ready") == 1


def test_a_job_delivered_three_times_makes_one_resource_and_one_ready(make_broker: Any) -> None:
    h = make_broker()
    deployment_id = h.submit().deployment_id
    provision = h.store.get(deployment_id).job_token
    job = Job(kind=JobKind.PROVISION, deployment_id=deployment_id, id=provision)
    for _ in range(3):
        h.service.handle(job)
    h.drain()
    for _ in range(3):
        h.service.handle(job)
    h.drain()
    assert len(instances()) == 1
    assert h.phases().count("Ready") == 1
    assert h.phases().count("Provisioning") == 1


def test_namespace_cap_keeps_extra_provisions_pending_not_failed(make_broker: Any) -> None:
    # ECS services never start in moto, so they stay Provisioning and hold the cap.
    ec2 = boto3.client("ec2", region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="kidp", Description="kidp", VpcId=vpc)["GroupId"]
    h = make_broker(
        namespace_concurrency=2,
        poll_interval_seconds=30,
        aws_subnet_ids=[subnet],
        aws_security_group_ids=[group],
    )
    ids = [
        h.submit(
            resourceType="service",
            resourceName=f"svc-{n}",
            spec={"image": "nginx:1.27", "port": 80},
        ).deployment_id
        for n in range(4)
    ]
    for _ in range(12):  # work what is due without waiting for the polls
        h.worker.run_once()
    phases = sorted(h.store.get(i).phase.value for i in ids)
    assert phases == ["Pending", "Pending", "Provisioning", "Provisioning"]
    assert h.phases() == ["Provisioning", "Provisioning"]


def test_unsupported_engine_names_what_the_provider_can_do(make_broker: Any) -> None:
    h = make_broker()
    with pytest.raises(ValidationFailed, match="supported: mysql, postgresql"):
        h.submit(spec={"engine": "mongodb", "version": "7.0"})
    with pytest.raises(ValidationFailed, match="supported: 12, 13, 14, 15, 16"):
        h.submit(spec={"engine": "postgresql", "version": "9.6"})


def test_target_of_another_cloud_is_refused(make_broker: Any) -> None:
    h = make_broker()
    with pytest.raises(ValidationFailed, match="does not match this broker"):
        h.submit(target={"cloud": "azure", "region": "westus2"})


def test_callback_url_to_a_private_address_is_refused(make_broker: Any) -> None:
    h = make_broker(callback_allowlist=[])
    with pytest.raises(ValidationFailed, match="callbackUrl"):
        h.submit(callbackUrl="http://169.254.169.254/latest/meta-data")


def test_namespaces_the_token_does_not_allow(make_broker: Any) -> None:
    h = make_broker()
    deployment_id = h.submit().deployment_id
    outsider = h.caller(namespaces=["team-other"])
    with pytest.raises(Forbidden):
        h.submit(caller=outsider)
    with pytest.raises(NotFound):
        h.service.get_visible(outsider, deployment_id)
    reader = h.caller(scopes=("read",))
    with pytest.raises(Forbidden, match="deploy"):
        h.submit(caller=reader)


def test_dry_run_plans_and_changes_nothing(make_broker: Any) -> None:
    h = make_broker()
    plan = h.service.submit_provision(h.admin, h.request(), dry_run=True)
    body = plan.body
    assert body["dryRun"] is True and body["action"] == "create"
    assert body["cloud"]["calls"][0]["service"] == "rds"
    assert body["cloud"]["calls"][0]["operation"] == "create_db_instance"
    assert body["tags"]["managed-by"] == "kidp"
    assert body["secret"]["name"] == "kidp/team-platform/postgres-app-db-credentials"
    assert body["quota"]["ok"] is True
    assert body["cost"]["estimated_monthly"] > 0
    call = body["cloud"]["calls"][0]
    assert "MasterUserPassword" not in call["parameters"]  # named, never valued
    assert "MasterUserPassword" in json.dumps(call.get("secretParameters"))
    assert h.store.list() == []
    h.drain()
    assert instances() == []


def test_deprovision_deletes_resource_and_secret_and_stays_readable(make_broker: Any) -> None:
    h = make_broker()
    deployment_id = h.submit().deployment_id
    h.drain()
    ref = h.store.get(deployment_id).secret_ref
    accepted = h.deprovision(deployment_id)
    assert accepted.message == f"Deprovisioning request accepted for deployment {deployment_id}"
    h.drain()
    assert h.phases()[-2:] == ["Deleting", "Deleted"]
    assert instances() == []
    sm = boto3.client("secretsmanager", region_name="us-east-1")
    with pytest.raises(sm.exceptions.ResourceNotFoundException):
        sm.get_secret_value(SecretId=ref.id)
    status = h.service.status(h.service.get_visible(h.admin, deployment_id))
    assert status["phase"] == "Deleted"
    # Deleting again is accepted and changes nothing.
    h.deprovision(deployment_id)
    h.drain()
    assert h.phases().count("Deleted") == 1


def test_retain_leaves_the_cloud_resource(make_broker: Any) -> None:
    h = make_broker()
    deployment_id = h.submit(deletionPolicy="Retain").deployment_id
    h.drain()
    h.deprovision(by_name="postgres-app-db")
    h.drain()
    assert h.store.get(deployment_id).phase is Phase.DELETED
    (retained,) = instances()
    tags = {t["Key"]: t["Value"] for t in retained["TagList"]}
    assert tags["platform.company.com/managed-by"] == "kidp-retained"
    assert h.store.get(deployment_id).secret_ref is not None  # its credentials stay too
    # The broker forgot it, but the cloud name is still taken: a new deployment of
    # the same name fails clearly instead of adopting someone's retained data.
    again = h.submit().deployment_id
    h.drain()
    failed = h.store.get(again)
    assert failed.phase is Phase.FAILED
    assert deployment_id in failed.error


def test_snapshot_policy_keeps_a_final_snapshot(make_broker: Any) -> None:
    h = make_broker()
    h.submit(deletionPolicy="Snapshot")
    h.drain()
    h.deprovision(by_name="postgres-app-db")
    h.drain()
    assert instances() == []
    (final,) = rds().describe_db_snapshots(SnapshotType="manual")["DBSnapshots"]
    assert final["DBSnapshotIdentifier"].startswith("deploy-")


def test_dead_receiver_retries_then_dead_letters_then_replays(make_broker: Any) -> None:
    h = make_broker()
    h.receiver.fail_with = 503
    deployment_id = h.submit().deployment_id
    h.drain()
    assert h.store.get(deployment_id).phase is Phase.READY
    letters = h.service.dead_letters()
    assert {letter.payload["phase"] for letter in letters} == {"Provisioning", "Ready"}
    assert all(letter.attempts == 6 for letter in letters)  # 1 + retries after 1,2,4,8,16 s
    assert all(letter.deployment_id == deployment_id for letter in letters)

    h.receiver.fail_with = None
    for letter in letters:
        assert h.service.replay_dead_letter(letter.id).resolved_at is not None
    assert sorted(h.phases()) == ["Provisioning", "Ready"]
    assert h.service.dead_letters() == []


def test_every_attempt_of_one_event_carries_the_same_webhook_id(make_broker: Any) -> None:
    h = make_broker()
    h.receiver.fail_with = 500
    h.submit()
    h.drain()
    letter = h.service.dead_letters()[0]
    h.receiver.fail_with = None
    h.service.replay_dead_letter(letter.id)
    assert h.receiver.log[-1][0] == letter.event_id


def test_dead_letters_are_retried_slowly_then_given_up(make_broker: Any) -> None:
    h = make_broker(dead_letter_retry_seconds=0, dead_letter_max_age_seconds=0)
    h.receiver.fail_with = 500
    h.submit()
    h.drain()
    h.service.reconcile()
    letters = h.service.dead_letters(include_resolved=True)
    assert letters and all(letter.given_up_at is not None for letter in letters)


def test_a_poison_job_fails_the_deployment_with_a_callback(make_broker: Any) -> None:
    h = make_broker()
    deployment_id = h.submit().deployment_id
    job = Job(
        kind=JobKind.PROVISION, deployment_id=deployment_id, id=h.store.get(deployment_id).job_token
    )
    h.service.give_up(job, "KeyError")
    h.drain()
    deployment = h.store.get(deployment_id)
    assert deployment.phase is Phase.FAILED
    assert "job failed repeatedly" in deployment.error
    assert h.phases()[-1] == "Failed"


def test_reconcile_recreates_a_lost_provision_job(make_broker: Any) -> None:
    h = make_broker(job_lease_seconds=0, poll_interval_seconds=0)
    deployment_id = h.submit().deployment_id
    # Lose the job: as if the process died between storing Pending and enqueueing.
    h.service.queue.receive(max_jobs=10, lease_seconds=3600)
    assert h.drain() == 0
    deployment = h.store.get(deployment_id)
    h.store.save(
        deployment.evolve(updated_at=deployment.updated_at - timedelta(minutes=5)),
        expected_version=deployment.version,
    )
    assert h.service.reconcile()["jobs"] == 1
    h.drain()
    assert h.store.get(deployment_id).phase is Phase.READY
    assert len(instances()) == 1


class NeverReady:
    """The real AWS provider, but the resource stays "creating" for ever."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def deploy(self, deployment: Any, tags: Any, credentials: Any) -> Any:
        made = self.inner.deploy(deployment, tags, credentials)
        return made.model_copy(update={"state": "creating"})

    def get_status(self, deployment: Any) -> Any:
        return self.inner.get_status(deployment).model_copy(update={"state": "creating"})


def test_a_resource_available_at_once_is_ready_without_a_poll(make_broker: Any) -> None:
    h = make_broker()
    deployment_id = h.submit().deployment_id
    calls: list[str] = []
    real = h.service.provider.get_status
    h.service.provider.get_status = lambda d: calls.append(d.id) or real(d)  # type: ignore[method-assign]
    h.drain()
    assert h.store.get(deployment_id).phase is Phase.READY
    assert h.phases() == ["Provisioning", "Ready"]
    assert calls == []  # what deploy reported was enough


def test_provision_timeout_fails_the_deployment(make_broker: Any) -> None:
    h = make_broker(provision_timeout_seconds=0)
    h.service.provider = NeverReady(h.service.provider)
    deployment_id = h.submit().deployment_id
    h.drain()
    deployment = h.store.get(deployment_id)
    assert deployment.phase is Phase.FAILED
    assert deployment.error == "not ready after 0 s"
    assert h.phases() == ["Provisioning", "Failed"]


class DeprovisionedWhileDeploying:
    """The real AWS provider; a deprovision lands while its deploy call runs."""

    def __init__(self, harness: Any) -> None:
        self.inner = harness.service.provider
        self.harness = harness

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def deploy(self, deployment: Any, tags: Any, credentials: Any) -> Any:
        h = self.harness
        h.deprovision(deployment.id)
        delete = Job(
            kind=JobKind.DELETE,
            deployment_id=deployment.id,
            id=h.store.get(deployment.id).job_token,
        )
        h.service.handle(delete)  # finds nothing yet, so it reports Deleted
        return self.inner.deploy(deployment, tags, credentials)


def test_deprovision_during_provisioning_leaves_nothing_behind(make_broker: Any) -> None:
    h = make_broker()
    h.service.provider = DeprovisionedWhileDeploying(h)
    deployment_id = h.submit().deployment_id
    h.drain()
    assert h.store.get(deployment_id).phase is Phase.DELETED
    assert instances() == []
    assert (
        boto3.client("secretsmanager", region_name="us-east-1").list_secrets()["SecretList"] == []
    )
    assert h.broker.scanner.orphans()["total"] == 0


def test_a_superseded_job_cannot_fail_a_deployment_it_no_longer_drives(
    make_broker: Any,
) -> None:
    h = make_broker()
    h.service.provider = NeverReady(h.service.provider)
    deployment_id = h.submit().deployment_id
    h.worker.run_once()  # provision: the deployment now waits for its poll job
    poll = Job(
        kind=JobKind.POLL, deployment_id=deployment_id, id=h.store.get(deployment_id).job_token
    )
    h.deprovision(deployment_id)
    h.service.give_up(poll, "stale")  # e.g. the old poll exhausted its deliveries
    assert h.store.get(deployment_id).phase is Phase.DELETING
    h.drain()
    assert h.store.get(deployment_id).phase is Phase.DELETED


def test_the_same_request_while_deleting_is_a_conflict(make_broker: Any) -> None:
    h = make_broker()
    deployment_id = h.submit().deployment_id
    h.drain()
    h.deprovision(deployment_id)
    with pytest.raises(Conflict, match="being deleted"):
        h.submit()
    h.drain()
    assert h.submit().deployment_id != deployment_id


def test_callbacks_carry_an_increasing_sequence(make_broker: Any) -> None:
    h = make_broker()
    deployment_id = h.submit().deployment_id
    h.drain()
    h.deprovision(deployment_id)
    h.drain()
    sequences = [p["additionalMetadata"]["sequence"] for _, p in h.receiver.log]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences) == 4


def test_progress_callbacks_follow_the_configured_interval(make_broker: Any) -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.30.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="p", Description="p", VpcId=vpc)["GroupId"]
    service = {"resourceType": "service", "spec": {"image": "nginx:1.27", "port": 80}}

    every_poll = make_broker(
        aws_subnet_ids=[subnet], aws_security_group_ids=[group], progress_interval_seconds=0
    )
    every_poll.submit(resourceName="svc-a", **service)
    for _ in range(10):  # provision, then polls and their callbacks, one job each
        every_poll.worker.run_once()
    progress = [p for _, p in every_poll.receiver.log if p["phase"] == "Provisioning"]
    assert len(progress) >= 4  # the first one, then one per poll
    assert progress[-1]["message"].startswith("Provisioning in progress")

    every_poll.receiver.log.clear()
    hourly = make_broker(
        aws_subnet_ids=[subnet], aws_security_group_ids=[group], progress_interval_seconds=3600
    )
    hourly.submit(resourceName="svc-b", **service)
    for _ in range(10):
        hourly.worker.run_once()
    assert [p["phase"] for _, p in hourly.receiver.log] == ["Provisioning"]


@pytest.mark.postgres
def test_the_whole_flow_on_postgresql(make_broker: Any, postgres_url: str) -> None:
    h = make_broker(store_url=postgres_url)
    first = h.submit()
    assert h.submit().deployment_id == first.deployment_id
    h.drain()
    assert h.store.get(first.deployment_id).phase is Phase.READY
    h.deprovision(first.deployment_id)
    h.drain()
    assert h.phases() == ["Provisioning", "Ready", "Deleting", "Deleted"]
    assert instances() == []


def test_metrics_answer_with_the_last_counts_when_the_store_does_not(
    make_broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kidp.errors import StoreUnavailable

    h = make_broker()
    h.submit()
    line = 'broker_resources_total{namespace="team-platform",phase="Pending",type="database"} 1.0'
    assert line in h.service.render_metrics().decode()

    def down() -> None:
        raise StoreUnavailable("the store is down")

    monkeypatch.setattr(h.store, "count_by_namespace_type_phase", down)
    text = h.service.render_metrics().decode()
    assert line in text  # the last counts, not a failed scrape
    assert "kidp_broker_requests_total" in text


class ReadyRefused:
    """The real store, refusing (once) the save that records a deployment Ready."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.refused = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, deployment: Any, **kwargs: Any) -> Any:
        if deployment.phase is Phase.READY and not self.refused:
            self.refused = True
            raise StoreUnavailable("the database is unavailable (OperationalError); try again")
        return self.inner.save(deployment, **kwargs)


def test_a_ready_the_store_refused_is_recorded_by_the_poll_it_waits_for(
    make_broker: Any,
) -> None:
    h = make_broker()
    store = ReadyRefused(h.service.store)
    h.service.store = store
    deployment_id = h.submit().deployment_id
    h.drain()
    assert store.refused  # the first Ready was refused...
    assert h.store.get(deployment_id).phase is Phase.READY  # ...and the poll recorded it
    assert h.phases() == ["Provisioning", "Ready"]
