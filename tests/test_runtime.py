"""The embedded worker edge: how job outcomes map to the queue, and the timers."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.config import Config

from kidp.localtls import issue_tls_files
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


def test_tls_serves_http2_over_tls_1_3_only(make_broker: Any, tmp_path: Any) -> None:
    import socket
    import ssl

    import httpx

    from kidp.emulator import free_port
    from kidp.runtime import EmbeddedBroker

    tls = issue_tls_files(tmp_path, "127.0.0.1")
    h = make_broker(tls_cert_file=tls.cert, tls_key_file=tls.key)
    port = free_port()
    runtime = EmbeddedBroker(h.broker, port=port, role="api")
    runtime.start()
    try:
        context = ssl.create_default_context(cafile=str(tls.ca))
        with httpx.Client(http2=True, verify=context) as client:
            response = client.get(f"https://127.0.0.1:{port}/health")
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"

        old = ssl.create_default_context(cafile=str(tls.ca))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            pytest.raises(ssl.SSLError),
        ):
            old.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        runtime.stop()


def test_stop_lets_the_job_in_flight_finish(make_broker: Any) -> None:
    import threading

    from kidp.runtime import EmbeddedBroker

    h = make_broker(worker_threads=1)
    provider = h.broker.service.provider
    entered, release = threading.Event(), threading.Event()
    deploy = provider.deploy

    def slow_deploy(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(10)
        return deploy(*args, **kwargs)

    provider.deploy = slow_deploy  # type: ignore[method-assign]
    deployment_id = h.submit().deployment_id
    runtime = EmbeddedBroker(h.broker, role="worker", port=0)
    runtime.start()
    assert entered.wait(10), "the worker never started the provision"
    stopper = threading.Thread(target=runtime.stop)
    stopper.start()
    release.set()
    stopper.join(30)
    assert not stopper.is_alive()
    # The provision finished and was acknowledged: the cloud call's result is
    # recorded (moto's instance is available at once, so it is Ready), and the
    # job is not waiting to run again: only the two callbacks it owes are.
    deployment = h.broker.service.store.get(deployment_id)
    assert deployment is not None
    assert deployment.phase is Phase.READY
    assert deployment.cloud_resource_id
    waiting = h.broker.service.queue.receive(max_jobs=10, lease_seconds=60)
    assert sorted(d.job.kind.value for d in waiting) == ["callback", "callback"]


def test_a_sync_job_reports_a_resource_deleted_by_hand_at_once(
    make_broker: Any, receiver: Any
) -> None:
    h = make_broker()
    deployment_id = h.submit().deployment_id
    h.drain()
    assert h.phases()[-1] == "Ready"
    deployment = h.broker.service.store.get(deployment_id)
    assert deployment is not None
    rds = boto3.client("rds", region_name="us-east-1")
    rds.delete_db_instance(
        DBInstanceIdentifier=deployment.cloud_resource_id.split(":")[-1],
        SkipFinalSnapshot=True,
    )
    before = len(receiver.log)
    # What the watcher does on a change: one sync job per deployment, however many events.
    for _ in range(3):
        h.broker.service.changed(deployment_id)
    h.drain()
    drift = [p for _, p in receiver.log[before:] if p["deploymentId"] == deployment_id]
    assert len(drift) == 1
    assert drift[0]["driftDetected"] is True


def test_roles_without_the_api_serve_their_probes(make_broker: Any) -> None:
    import httpx

    from kidp.emulator import free_port
    from kidp.runtime import EmbeddedBroker

    h = make_broker(worker_threads=1)
    port = free_port()
    runtime = EmbeddedBroker(h.broker, role="worker", port=port)
    runtime.start()
    try:
        base = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 200
        assert health.json()["status"] == "healthy"
        assert httpx.get(f"{base}/readiness", timeout=10).json()["ready"] is True
        assert "kidp_broker_requests_total" in httpx.get(f"{base}/metrics", timeout=10).text
        # Only probes: the API is not served by a worker.
        assert httpx.post(f"{base}/v1/provision", json={}, timeout=10).status_code == 501
    finally:
        runtime.stop()


def test_a_burst_of_changes_schedules_one_sync_after_the_burst(make_broker: Any) -> None:
    from kidp.service import ServiceClock

    h = make_broker(sync_delay_seconds=5)
    now = [100.0]
    h.broker.service.clock = ServiceClock(monotonic=lambda: now[0])
    queue = h.broker.service.queue
    enqueued: list[tuple[str, float]] = []
    real = queue.enqueue

    def counting(job: Any, *, delay: float = 0.0) -> None:
        enqueued.append((job.id, delay))
        real(job, delay=delay)

    queue.enqueue = counting  # type: ignore[method-assign]
    a, b = "deploy-" + "a" * 32, "deploy-" + "b" * 32
    for _ in range(10):  # a StatefulSet, its pod and claim, changing as they start
        h.broker.service.changed(a)
        now[0] += 0.3
    # One trip to the queue, due once the burst has settled.
    assert enqueued == [(f"sync-{a}", 5)]
    assert queue.receive(max_jobs=5, lease_seconds=30) == []
    now[0] += 5
    h.broker.service.changed(a)  # a later change schedules again
    h.broker.service.changed(b)
    assert enqueued[1:] == [(f"sync-{a}", 5), (f"sync-{b}", 5)]


def test_a_sync_the_queue_refused_is_scheduled_at_the_next_change(make_broker: Any) -> None:
    from kidp.errors import StoreUnavailable

    h = make_broker(sync_delay_seconds=5)
    queue = h.broker.service.queue
    real = queue.enqueue
    refused: list[str] = []

    def down_once(job: Any, *, delay: float = 0.0) -> None:
        if not refused:
            refused.append(job.id)
            raise StoreUnavailable("the queue is down")
        real(job, delay=delay)

    queue.enqueue = down_once  # type: ignore[method-assign]
    h.broker.service.changed("deploy-" + "c" * 32)  # refused: nothing scheduled
    h.broker.service.changed("deploy-" + "c" * 32)  # so this one schedules it
    assert refused and queue.pending_count() == 1
