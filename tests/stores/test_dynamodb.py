"""What only the DynamoDB store has: the table schema, TTL, lock expiry,
pagination, error mapping, and the whole broker running on it. The behaviour
every store shares is in ``test_contract.py`` (it runs there on moto too)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from kidp.errors import ConcurrentUpdate, StoreUnavailable
from kidp.models import CallbackEvent, Deployment, Phase, ResourceType, utcnow
from kidp.ports import DeploymentStore
from kidp.stores import dynamodb
from kidp.stores.dynamodb import TABLE_SCHEMA, DynamoDbDeploymentStore

Make = Callable[..., Deployment]
DAY = 86_400


def raw(store: DynamoDbDeploymentStore, pk: str, sk: str) -> dict[str, Any] | None:
    """The stored item, as DynamoDB has it."""
    answer = store.client.get_item(
        TableName=store.table_name,
        Key={"pk": {"S": pk}, "sk": {"S": sk}},
        ConsistentRead=True,
    )
    item: dict[str, Any] | None = answer.get("Item")
    return item


def deployment_item(store: DynamoDbDeploymentStore, deployment_id: str) -> dict[str, Any]:
    item = raw(store, f"DEPLOYMENT#{deployment_id}", "DEPLOYMENT")
    assert item is not None
    return item


@pytest.fixture
def fail_calls(dynamodb_store: DynamoDbDeploymentStore) -> Iterator[Callable[..., list[str]]]:
    """``fail_calls(code, status, operations=None, times=None)`` makes DynamoDB answer
    ``code`` (HTTP ``status``) to those operations (all by default), ``times``
    times (always by default); returns the list of operations it failed."""
    events = dynamodb_store.client.meta.events
    registered: list[Any] = []

    def install(
        code: str,
        status: int,
        operations: set[str] | None = None,
        times: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> list[str]:
        failed: list[str] = []

        def answer(model: Any, **_: Any) -> None:
            if operations is not None and model.name not in operations:
                return
            if times is not None and len(failed) >= times:
                return
            failed.append(model.name)
            response: dict[str, Any] = {
                "Error": {"Code": code, "Message": "injected"},
                "ResponseMetadata": {"HTTPStatusCode": status},
                **(extra or {}),
            }
            raise ClientError(response, model.name)

        events.register("before-call.dynamodb", answer)
        registered.append(answer)
        return failed

    yield install
    for handler in registered:
        events.unregister("before-call.dynamodb", handler)


# ------------------------------------------------------------------ table


def test_create_table_matches_the_schema_and_is_idempotent(
    dynamodb_store: DynamoDbDeploymentStore,
) -> None:
    dynamodb_store.create_table()  # the fixture created it already
    client = dynamodb_store.client
    table = client.describe_table(TableName="kidp-test")["Table"]
    assert table["KeySchema"] == TABLE_SCHEMA["KeySchema"]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert sorted(table["AttributeDefinitions"], key=str) == sorted(
        TABLE_SCHEMA["AttributeDefinitions"], key=str
    )
    indexes = {i["IndexName"]: i for i in table["GlobalSecondaryIndexes"]}
    for wanted in TABLE_SCHEMA["GlobalSecondaryIndexes"]:
        assert indexes[wanted["IndexName"]]["KeySchema"] == wanted["KeySchema"]
        assert indexes[wanted["IndexName"]]["Projection"] == {"ProjectionType": "ALL"}
    assert set(indexes) == {"namespace-index", "phase-index"}
    ttl = client.describe_time_to_live(TableName="kidp-test")["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expiresAt"}
    assert TABLE_SCHEMA["TimeToLiveSpecification"] == {
        "AttributeName": "expiresAt",
        "Enabled": True,
    }


def test_implements_the_port(dynamodb_store: DynamoDbDeploymentStore) -> None:
    # Checked by mypy; and at run time every protocol method is there.
    port: DeploymentStore = dynamodb_store
    methods = [name for name in vars(DeploymentStore) if not name.startswith("_")]
    assert "try_start" in methods
    for name in methods:
        assert callable(getattr(port, name)), name


def test_builds_its_own_client(aws: None, make: Make) -> None:
    store = DynamoDbDeploymentStore("own-client", region="us-east-1", deleted_retention_days=1)
    store.create_table()
    store.check()
    d = store.create(make())
    assert store.get(d.id) == d
    assert repr(store) == (
        "DynamoDbDeploymentStore(table_name='own-client', region='us-east-1', endpoint_url=None)"
    )
    store.close()
    with pytest.raises(ValueError, match="table_name"):
        DynamoDbDeploymentStore("", region="us-east-1")
    with pytest.raises(ValueError, match="negative"):
        DynamoDbDeploymentStore("t", region="us-east-1", deleted_retention_days=-1)


# ------------------------------------------------------------------ TTL and locks


def test_deleted_deployment_expires_with_its_request_lock(dynamodb_client: Any, make: Make) -> None:
    store = DynamoDbDeploymentStore(
        "ttl", region="us-east-1", client=dynamodb_client, deleted_retention_days=3
    )
    store.create_table()
    d = store.create(make(request_id="req-1"))
    assert "expiresAt" not in deployment_item(store, d.id)
    active_lock = "LOCK#ACTIVE#team-a#database#orders-db"
    assert raw(store, active_lock, "LOCK") is not None
    finished = utcnow()
    store.save(d.evolve(phase=Phase.DELETED, finished_at=finished), expected_version=0)

    expires = int(finished.timestamp()) + 3 * DAY
    assert deployment_item(store, d.id)["expiresAt"] == {"N": str(expires)}
    request_lock = raw(store, "LOCK#REQUEST#team-a#req-1", "LOCK")
    assert request_lock is not None
    assert request_lock["expiresAt"] == {"N": str(expires)}
    assert raw(store, active_lock, "LOCK") is None  # released with the active phase


def test_delivered_events_expire_pending_ones_do_not(
    dynamodb_store: DynamoDbDeploymentStore, make: Make
) -> None:
    d = dynamodb_store.create(make())
    pending = CallbackEvent(id="evt-1", deployment_id=d.id, url="https://x.example", payload={})
    dynamodb_store.save_event(pending)
    assert "expiresAt" not in (raw(dynamodb_store, "EVENT#evt-1", "EVENT") or {})
    delivered_at = utcnow()
    dynamodb_store.save_event(pending.model_copy(update={"delivered_at": delivered_at}))
    item = raw(dynamodb_store, "EVENT#evt-1", "EVENT")
    assert item is not None
    assert item["expiresAt"] == {"N": str(int(delivered_at.timestamp()) + 7 * DAY)}
    assert "gsi2pk" not in item  # out of the pending outbox


def test_a_lock_past_its_expiry_is_free(
    dynamodb_store: DynamoDbDeploymentStore, make: Make
) -> None:
    # TTL deletes lazily: a request-id lock of a deployment past its retention
    # may still be there, and must not block a new request with that id.
    now = utcnow()
    old = dynamodb_store.create(
        make(request_id="req-1", phase=Phase.DELETED, finished_at=now - timedelta(days=40))
    )
    assert dynamodb_store.find_by_request_id("team-a", "req-1") is None
    new = dynamodb_store.create(make(request_id="req-1"))
    assert dynamodb_store.find_by_request_id("team-a", "req-1") == new
    # The purge removes the old deployment and leaves the lock to its new owner.
    assert dynamodb_store.purge_finished(before=now - timedelta(days=7)) == 1
    assert dynamodb_store.get(old.id) is None
    assert dynamodb_store.find_by_request_id("team-a", "req-1") == new


def test_provisioning_counter_tracks_the_phase(
    dynamodb_store: DynamoDbDeploymentStore, make: Make
) -> None:
    def counter() -> int:
        item = raw(dynamodb_store, "COUNTER#team-a", "PROVISIONING")
        return 0 if item is None else int(item["provisioning"]["N"])

    started = dynamodb_store.create(make("a", phase=Phase.PROVISIONING))
    b = dynamodb_store.create(make("b"))
    assert counter() == 1
    assert dynamodb_store.try_start(b.id, expected_version=0, cap=5)
    assert counter() == 2
    dynamodb_store.save(started.evolve(phase=Phase.READY), expected_version=0)
    assert counter() == 1
    assert counter() == dynamodb_store.count_by_phase()[Phase.PROVISIONING]


def test_too_many_events_for_one_transaction_write_nothing(
    dynamodb_store: DynamoDbDeploymentStore, make: Make
) -> None:
    d = dynamodb_store.create(make())
    events = [
        CallbackEvent(id=f"evt-{i}", deployment_id=d.id, url="https://x.example", payload={})
        for i in range(100)
    ]
    with pytest.raises(ValueError, match="at most 100"):
        dynamodb_store.save(d.evolve(message="x"), expected_version=0, events=events)
    assert dynamodb_store.get(d.id) == d
    assert dynamodb_store.get_event("evt-0") is None


# ------------------------------------------------------------------ pagination


def test_reads_follow_pages_past_one_megabyte(
    dynamodb_store: DynamoDbDeploymentStore, make: Make
) -> None:
    # DynamoDB returns at most 1 MB per Query page: 12 records of 100 kB need two.
    created = [dynamodb_store.create(make(f"db-{i:02d}", message="x" * 100_000)) for i in range(12)]
    queries: list[str] = []
    dynamodb_store.client.meta.events.register(
        "before-call.dynamodb.Query", lambda model, **_: queries.append(model.name)
    )
    assert dynamodb_store.list(namespace="team-a") == created
    assert len(queries) >= 2
    queries.clear()
    assert dynamodb_store.list(phases=[Phase.PENDING]) == created
    assert len(queries) >= 2
    assert dynamodb_store.list(limit=11) == created[:11]
    assert dynamodb_store.count_by_phase()[Phase.PENDING] == 12
    finished = utcnow() - timedelta(days=40)
    for d in created:
        dynamodb_store.save(d.evolve(phase=Phase.DELETED, finished_at=finished), expected_version=0)
    assert dynamodb_store.purge_finished(before=utcnow()) == 12
    assert dynamodb_store.list() == []


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ThrottlingException", 400),
        ("ProvisionedThroughputExceededException", 400),
        ("InternalServerError", 500),
        ("ServiceUnavailable", 503),
    ],
)
def test_throttling_and_server_faults_are_store_unavailable(
    dynamodb_store: DynamoDbDeploymentStore,
    make: Make,
    fail_calls: Callable[..., list[str]],
    code: str,
    status: int,
) -> None:
    d = dynamodb_store.create(make())
    failed = fail_calls(code, status)
    calls: list[Callable[[], Any]] = [
        lambda: dynamodb_store.get(d.id),
        lambda: dynamodb_store.create(make("other")),
        lambda: dynamodb_store.save(d.evolve(message="x"), expected_version=0),
        lambda: dynamodb_store.try_start(d.id, expected_version=0, cap=1),
        lambda: dynamodb_store.list(namespace="team-a"),
        dynamodb_store.count_by_phase,
        lambda: dynamodb_store.purge_finished(before=utcnow()),
        lambda: dynamodb_store.pending_events(created_before=utcnow()),
        dynamodb_store.list_dead_letters,
        dynamodb_store.check,
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert code in caught.value.message
        assert caught.value.retry_after > 0
    assert len(failed) == len(calls)


def test_a_bug_is_not_disguised_as_unavailable(
    dynamodb_store: DynamoDbDeploymentStore, fail_calls: Callable[..., list[str]]
) -> None:
    fail_calls("ValidationException", 400)
    with pytest.raises(ClientError, match="ValidationException"):
        dynamodb_store.get("deploy-" + "0" * 32)


def test_a_transaction_conflict_is_tried_again(
    dynamodb_store: DynamoDbDeploymentStore,
    make: Make,
    fail_calls: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dynamodb, "_BACKOFF_SECONDS", 0.0)
    d = dynamodb_store.create(make())
    conflict = {"CancellationReasons": [{"Code": "TransactionConflict"}, {"Code": "None"}]}
    failed = fail_calls(
        "TransactionCanceledException", 400, {"TransactWriteItems"}, times=2, extra=conflict
    )
    saved = dynamodb_store.save(d.evolve(message="x"), expected_version=0)
    assert failed == ["TransactWriteItems"] * 2
    assert dynamodb_store.get(d.id) == saved
    # A conflict that never clears is unavailable, not a lost update.
    fail_calls("TransactionCanceledException", 400, {"TransactWriteItems"}, extra=conflict)
    with pytest.raises(StoreUnavailable, match="contended"):
        dynamodb_store.save(saved.evolve(message="y"), expected_version=1)
    with pytest.raises(StoreUnavailable, match="contended"):
        dynamodb_store.try_start(d.id, expected_version=1, cap=5)


def test_concurrent_update_is_still_reported_after_a_conflict(
    dynamodb_store: DynamoDbDeploymentStore,
    make: Make,
    fail_calls: Callable[..., list[str]],
) -> None:
    d = dynamodb_store.create(make())
    # The version condition failed: a stale writer, not a conflict to retry.
    stale = {"CancellationReasons": [{"Code": "ConditionalCheckFailed"}]}
    fail_calls("TransactionCanceledException", 400, {"TransactWriteItems"}, times=1, extra=stale)
    with pytest.raises(ConcurrentUpdate):
        dynamodb_store.save(d.evolve(message="x"), expected_version=0)


def test_missing_table_is_store_unavailable(dynamodb_client: Any) -> None:
    store = DynamoDbDeploymentStore("no-such-table", region="us-east-1", client=dynamodb_client)
    with pytest.raises(StoreUnavailable, match="ResourceNotFoundException"):
        store.check()
    with pytest.raises(StoreUnavailable):
        store.get("deploy-" + "0" * 32)


def test_unreachable_endpoint_is_store_unavailable(aws_credentials: None) -> None:
    # Nothing listens on port 1; one attempt, so the test does not wait out backoff.
    client = boto3.client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:1",
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    store = DynamoDbDeploymentStore("t", region="us-east-1", client=client)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.check()
    with pytest.raises(StoreUnavailable):
        store.list(phases=[Phase.READY])
    assert time.monotonic() - started < 10


# ------------------------------------------------------------------ the broker on DynamoDB


def test_broker_provisions_and_deletes_on_dynamodb(make_broker: Any, tmp_path: Path) -> None:
    from kidp.queues.sql import SqlJobQueue
    from kidp.stores.sql import create_engine_for

    store = DynamoDbDeploymentStore("kidp-broker", region="us-east-1")
    store.create_table()
    # The Lambda variant's queue is SQS; any JobQueue will do to drive the jobs here.
    engine = create_engine_for(f"sqlite:///{tmp_path / 'queue.db'}")
    h = make_broker(adapters={"store": store, "queue": SqlJobQueue(engine)})

    accepted = h.submit()
    assert accepted.status == "accepted"
    assert h.submit().deployment_id == accepted.deployment_id  # the same request again
    h.drain()
    deployment = store.get(accepted.deployment_id)
    assert deployment is not None
    assert deployment.phase is Phase.READY
    assert h.phases() == ["Provisioning", "Ready"]
    assert (
        store.find_active("team-platform", ResourceType.DATABASE, "postgres-app-db") == deployment
    )
    assert store.pending_events(created_before=utcnow()) == []

    h.deprovision(accepted.deployment_id)
    h.drain()
    assert h.phases()[-2:] == ["Deleting", "Deleted"]
    deleted = store.get(accepted.deployment_id)
    assert deleted is not None
    assert deleted.phase is Phase.DELETED
    assert deleted.finished_at is not None
    expires = int(deleted.finished_at.timestamp()) + 7 * DAY
    assert deployment_item(store, deleted.id)["expiresAt"] == {"N": str(expires)}
    counts = store.count_by_phase()
    assert (counts[Phase.DELETED], counts[Phase.PROVISIONING]) == (1, 0)
    engine.dispose()
