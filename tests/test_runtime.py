"""The embedded worker edge: how job outcomes map to the queue, and the timers."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from kidp.models import Phase
from kidp.providers.aws import AwsProvider
from kidp.queues.sql import SqlJobQueue
from kidp.runtime import Scheduler
from kidp.stores.sql import SqlDeploymentStore
from kidp.work import backoff


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def throttle(client: Any, operation: str) -> None:
    """Make the real client's ``operation`` answer Throttling from now on.

    A read is chosen by the test: moto still performs a call whose reply is
    replaced, so only a read can be refused without side effects.
    """

    def reply(**kwargs: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        body = (
            b"<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>"
            b"<Message>Rate exceeded</Message></Error></ErrorResponse>"
        )
        response = AWSResponse("https://rds.amazonaws.com", 400, {}, None)
        response._content = body
        return response

    client.meta.events.register_first(f"before-send.rds.{operation}", reply)


def test_temporary_errors_are_retried_then_the_deployment_fails_with_a_callback(
    make_broker: Any, tmp_path: Any
) -> None:
    clock = FakeClock()
    store = SqlDeploymentStore(f"sqlite:///{tmp_path}/runtime.db")
    queue = SqlJobQueue(store.engine, max_deliveries=3, clock=clock)
    rds = boto3.client(
        "rds",
        region_name="us-east-1",
        config=Config(retries={"mode": "standard", "max_attempts": 1}),
    )
    provider = AwsProvider(region="us-east-1", clients={"rds": rds})
    h = make_broker({"store": store, "queue": queue, "provider": provider}, job_max_deliveries=3)
    deployment_id = h.submit().deployment_id
    throttle(rds, "DescribeDBInstances")  # deploy looks for an existing instance first

    assert h.worker.run_once() == 1  # attempt 1: throttled, retried later
    assert h.store.get(deployment_id).phase is Phase.PROVISIONING
    assert h.worker.run_once() == 0  # not due yet: the retry waits
    clock.now += backoff(1) + 60
    assert h.worker.run_once() == 1  # attempt 2
    clock.now += backoff(2) + 60
    assert h.worker.run_once() == 1  # attempt 3: the last one gives up
    clock.now += 3600
    h.drain()

    deployment = h.store.get(deployment_id)
    assert deployment.phase is Phase.FAILED
    assert "job failed repeatedly" in deployment.error
    assert h.phases()[-1] == "Failed"
    assert [job.kind.value for job, _ in queue.dead_jobs()] == ["provision"]
    assert boto3.client("rds", region_name="us-east-1").describe_db_instances()["DBInstances"] == []


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(30) == 300.0


def test_scheduler_runs_reconcile_at_once_and_the_scans_on_their_intervals(
    make_broker: Any,
) -> None:
    clock = FakeClock()
    h = make_broker(drift_interval_seconds=300, orphan_interval_seconds=3600)
    scheduler = Scheduler(h.broker, clock=clock)
    assert scheduler.run_due() == ["reconcile"]
    assert scheduler.run_due() == []
    clock.now += 300
    assert scheduler.run_due() == ["reconcile", "drift", "cost", "rotation"]
    clock.now += 3300
    assert "orphans" in scheduler.run_due()
