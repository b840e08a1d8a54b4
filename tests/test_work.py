"""kidp.work: the one retry decision, for the cases the queue edges cannot
see: a sync that cannot read the cloud, and a job whose deliveries all ended
with the worker itself gone."""

from __future__ import annotations

from typing import Any

import boto3
import pytest

from kidp.errors import BrokerError, CloudUnavailable, ProvisioningFailed
from kidp.models import Deployment, Job, JobKind, Phase
from kidp.providers.aws import AwsProvider
from kidp.work import work

MAX_DELIVERIES = 3


class FaultyProvider:
    """The AWS provider, with status reads that fail while ``error`` is set."""

    def __init__(self, inner: AwsProvider) -> None:
        self.inner = inner
        self.error: BrokerError | None = None
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_status(self, deployment: Deployment) -> Any:
        if self.error is not None:
            raise self.error
        self.reads += 1
        return self.inner.get_status(deployment)


@pytest.fixture
def faulty(make_broker: Any) -> tuple[Any, FaultyProvider]:
    provider = FaultyProvider(AwsProvider(region="us-east-1"))
    h = make_broker(adapters={"provider": provider}, job_max_deliveries=MAX_DELIVERIES)
    return h, provider


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ProvisioningFailed("AWS rds refused describe_db_instances (AccessDenied)"),
            ["ack", "ack", "ack"],
        ),
        (
            CloudUnavailable("AWS rds throttled describe_db_instances (Throttling)"),
            ["retry", "retry", "ack"],
        ),
    ],
    ids=["refused", "unavailable"],
)
def test_a_sync_that_cannot_read_the_cloud_never_fails_a_ready_deployment(
    faulty: tuple[Any, FaultyProvider], error: BrokerError, expected: list[str]
) -> None:
    h, provider = faulty
    deployment_id = h.submit().deployment_id
    h.drain()
    before = h.phases()
    assert before[-1] == "Ready"

    provider.error = error
    sync = Job(kind=JobKind.SYNC, deployment_id=deployment_id, id=f"sync-{deployment_id}")
    outcomes = [
        work(h.service, sync, attempt=n, max_deliveries=MAX_DELIVERIES)
        for n in range(1, MAX_DELIVERIES + 1)
    ]
    h.drain()

    # Retried while it may still succeed, then dropped, never dead: a dead
    # sync id would swallow every later sync of this deployment.
    assert [o.action for o in outcomes] == expected
    current = h.store.get(deployment_id)
    assert current is not None and current.phase is Phase.READY
    assert h.phases() == before  # no callback either

    # And the next change is synced as usual: the cloud is read again.
    provider.error = None
    reads = provider.reads
    assert work(h.service, sync, attempt=1, max_deliveries=MAX_DELIVERIES).action == "ack"
    assert provider.reads == reads + 1


def test_a_sync_past_its_delivery_limit_is_dropped_not_dead(
    faulty: tuple[Any, FaultyProvider],
) -> None:
    h, provider = faulty
    deployment_id = h.submit().deployment_id
    h.drain()
    before, reads = h.phases(), provider.reads
    sync = Job(kind=JobKind.SYNC, deployment_id=deployment_id, id=f"sync-{deployment_id}")

    outcome = work(h.service, sync, attempt=MAX_DELIVERIES + 1, max_deliveries=MAX_DELIVERIES)

    # Acknowledged: a dead sync-<id> would swallow every later sync.
    assert outcome.action == "ack"
    assert provider.reads == reads  # not run
    current = h.store.get(deployment_id)
    assert current is not None and current.phase is Phase.READY
    assert h.phases() == before


def test_a_job_delivered_past_its_limit_fails_the_deployment_without_running(
    faulty: tuple[Any, FaultyProvider],
) -> None:
    h, _ = faulty
    deployment_id = h.submit().deployment_id
    [delivery] = h.service.queue.receive(max_jobs=1, lease_seconds=60)
    assert delivery.job.kind is JobKind.PROVISION

    # Every earlier delivery ended with the worker gone (a Lambda timeout):
    # no exception was ever counted.
    outcome = work(
        h.service, delivery.job, attempt=MAX_DELIVERIES + 1, max_deliveries=MAX_DELIVERIES
    )
    h.service.queue.dead_letter(delivery, reason=outcome.reason)
    h.drain()

    assert outcome.action == "dead"
    current = h.store.get(deployment_id)
    assert current is not None and current.phase is Phase.FAILED
    assert h.phases() == ["Failed"]
    assert "stopped during each of its deliveries" in h.receiver.log[-1][1]["message"]
    # Not run again: nothing was created in the cloud.
    rds = boto3.client("rds", region_name="us-east-1")
    assert rds.describe_db_instances()["DBInstances"] == []
