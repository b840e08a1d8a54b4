"""Scale and faults on the on-prem topology: two api replicas, two workers, a
watcher and a scanner, separate processes sharing PostgreSQL and NATS JetStream,
against the Kubernetes stand-in. Every deployment must reach Ready exactly once,
with one set of Kubernetes objects, even when a worker is killed with SIGKILL
mid-way: NATS redelivers the jobs it held, and the scanner's reconcile
re-creates a job or callback the worker died before enqueueing."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import bearer_token

from kidp.localcluster import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

JWT_SECRET = "cluster-test-secret-" + "x" * 24
DEPLOYMENTS = 100


def body(n: int, callback_url: str) -> dict[str, Any]:
    return {
        "resourceType": "database",
        "resourceName": f"db-{n:03d}",
        "namespace": f"team-{n % 4}",
        "team": "platform-team",
        "owner": "user@example.com",
        "callbackUrl": callback_url,
        "spec": {"engine": "postgresql", "version": "15", "size": "small"},
    }


@pytest.fixture
def cluster(postgres_url: str, nats_url: str, receiver: Any, tmp_path: Path) -> Any:
    stream = f"KIDP_TEST_{uuid.uuid4().hex[:8].upper()}"
    with LocalCluster(
        store_url=postgres_url,
        queue_url=f"{nats_url}/{stream}",
        state_dir=tmp_path / "cluster",
        env={
            "KIDP_JWT_SECRET": JWT_SECRET,
            "KIDP_CALLBACK_SECRET": receiver.secret,
            "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
            "KIDP_CALLBACK_RETRY_DELAYS": "0.2,0.5,1,2,4",
            "KIDP_POLL_INTERVAL_SECONDS": "0.5",
            "KIDP_PROGRESS_INTERVAL_SECONDS": "60",
            # A killed worker's jobs come back once their lease runs out.
            "KIDP_JOB_LEASE_SECONDS": "5",
            "KIDP_NAMESPACE_CONCURRENCY": "100",
            "KIDP_RATE_LIMIT_PER_MINUTE": "100000",
            "KIDP_RECONCILE_INTERVAL_SECONDS": "10",
            "KIDP_LOG_LEVEL": "WARNING",
        },
    ) as running:
        yield running
        _drop_stream(nats_url, stream)


def _drop_stream(nats_url: str, stream: str) -> None:
    import asyncio

    import nats

    async def drop() -> None:
        connection = await nats.connect(nats_url)
        try:
            js = connection.jetstream()
            for name in (stream, f"{stream}_DEAD"):
                try:
                    await js.delete_stream(name)
                except nats.js.errors.NotFoundError:
                    continue
        finally:
            await connection.close()

    asyncio.run(drop())


def ready_once(receiver: Any) -> Counter[str]:
    """Ready events per deployment. Callbacks are delivered at least once: a
    worker killed after the receiver answered but before it recorded the
    delivery sends the same event again, with the same ``webhook-id``, which
    receivers drop (Standard Webhooks). So events are counted, not deliveries."""
    events = {(msg_id, p["deploymentId"]) for msg_id, p in receiver.log if p["phase"] == "Ready"}
    return Counter(deployment_id for _, deployment_id in events)


def test_two_api_replicas_and_two_workers_survive_a_killed_worker(
    cluster: LocalCluster, receiver: Any
) -> None:
    headers = {"Authorization": f"Bearer {bearer_token(JWT_SECRET, subject='scale-test')}"}
    api_urls = [proc.url for proc in cluster.api]

    def submit(n: int) -> str:
        url = f"{api_urls[n % len(api_urls)]}/v1/provision"
        response = httpx.post(url, json=body(n, receiver.url), headers=headers, timeout=30)
        assert response.status_code == 202, response.text
        deployment_id: str = response.json()["deploymentId"]
        return deployment_id

    with ThreadPoolExecutor(max_workers=20) as pool:
        ids = list(pool.map(submit, range(DEPLOYMENTS)))
    assert len(set(ids)) == DEPLOYMENTS

    # Kill a worker while the work is under way.
    deadline = time.monotonic() + 60
    while len(ready_once(receiver)) < DEPLOYMENTS // 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = cluster.role("worker")[0]
    cluster.kill(victim)
    assert not victim.alive

    deadline = time.monotonic() + 180
    while len(ready_once(receiver)) < DEPLOYMENTS and time.monotonic() < deadline:
        time.sleep(0.25)
    counts = ready_once(receiver)
    missing = [d for d in ids if d not in counts]
    assert not missing, _report(missing, api_urls[0], headers, cluster)
    assert max(counts.values()) == 1, [d for d, c in counts.items() if c > 1]

    # The API (either replica) agrees, and the cluster holds one StatefulSet each.
    for n, deployment_id in enumerate(ids):
        status = httpx.get(
            f"{api_urls[(n + 1) % len(api_urls)]}/v1/status",
            params={"id": deployment_id},
            headers=headers,
            timeout=10,
        ).json()
        assert status["phase"] == "Ready"
    statefulsets = Counter(_statefulset_owners(cluster))
    assert set(statefulsets) == set(ids)
    assert max(statefulsets.values()) == 1


def _report(missing: list[str], api_url: str, headers: dict[str, str], cluster: Any) -> str:
    """What a failing run needs: how many never got a Ready callback, where
    they are stuck, and the processes' logs."""
    phases = Counter()
    for deployment_id in missing:
        status = httpx.get(
            f"{api_url}/v1/status", params={"id": deployment_id}, headers=headers, timeout=10
        ).json()
        phases[f"{status.get('phase')}: {status.get('message')}"] += 1
    return f"{len(missing)} without a Ready callback: {dict(phases)}\n{cluster.logs()}"


def _statefulset_owners(cluster: LocalCluster) -> list[str]:
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        items = client.AppsV1Api(api_client).list_stateful_set_for_all_namespaces().items
        return [item.metadata.labels["platform.company.com/deployment-id"] for item in items]
    finally:
        api_client.close()
