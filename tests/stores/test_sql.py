"""SqlDeploymentStore against real SQLite files and the real PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from kidp.errors import ConcurrentUpdate, DuplicateDeployment, StoreUnavailable
from kidp.models import (
    CallbackEvent,
    CostSnapshot,
    DeadLetter,
    DeletionPolicy,
    Deployment,
    Phase,
    ResourceSpec,
    ResourceType,
    Size,
    new_deployment_id,
    utcnow,
)
from kidp.ports import DeploymentStore
from kidp.stores.sql import SqlDeploymentStore, create_engine_for

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for an empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'broker.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[SqlDeploymentStore]:
    s = SqlDeploymentStore(store_url)
    yield s
    s.close()


def make(
    name: str = "orders-db",
    *,
    namespace: str = "team-a",
    phase: Phase = Phase.PENDING,
    request_id: str | None = None,
    resource_type: ResourceType = ResourceType.DATABASE,
    **changes: Any,
) -> Deployment:
    return Deployment(
        id=new_deployment_id(),
        namespace=namespace,
        resource_type=resource_type,
        resource_name=name,
        team="payments",
        owner="owner@example.com",
        application=name,
        resource_uid="5f0c6a4e-0000-4000-8000-000000000001",
        callback_url="https://ci.example.com/hook",
        spec=ResourceSpec(engine="postgresql", version="15", size=Size.MEDIUM),
        spec_fingerprint="f" * 64,
        deletion_policy=DeletionPolicy.DELETE,
        provider="aws",
        region="eu-west-1",
        phase=phase,
        request_id=request_id,
        **changes,
    )


def finish(store: SqlDeploymentStore, deployment: Deployment, phase: Phase) -> Deployment:
    current = store.get(deployment.id)
    assert current is not None
    return store.save(
        current.evolve(phase=phase, finished_at=utcnow()), expected_version=current.version
    )


def event_for(deployment: Deployment, **changes: Any) -> CallbackEvent:
    return CallbackEvent(
        id=f"evt-{new_deployment_id()[7:]}",
        deployment_id=deployment.id,
        url="https://ci.example.com/hook",
        payload={"deploymentId": deployment.id, "phase": deployment.phase.value},
        **changes,
    )


def run_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Run ``target(i)`` on ``count`` threads released together; results or exceptions."""
    barrier = threading.Barrier(count)

    def call(i: int) -> Any:
        barrier.wait()
        try:
            return target(i)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(call, range(count)))


# ------------------------------------------------------------------ engine


def test_sqlite_engine_creates_directory_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "broker.db"
    engine = create_engine_for(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert path.exists()
    finally:
        engine.dispose()


def test_engine_urls() -> None:
    engine = create_engine_for("postgresql://postgres@127.0.0.1:5432/x")
    assert engine.url.drivername == "postgresql+psycopg"
    engine.dispose()
    with pytest.raises(ValueError, match="in-memory"):
        create_engine_for("sqlite://")
    with pytest.raises(ValueError, match="unsupported"):
        create_engine_for("mysql://localhost/x")
    with pytest.raises(ValueError, match="exactly one"):
        SqlDeploymentStore()


def test_tables_survive_a_second_store_on_the_same_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    first = SqlDeploymentStore(url)
    d = first.create(make())
    first.close()
    second = SqlDeploymentStore(url)
    assert second.get(d.id) == d
    second.close()


# ------------------------------------------------------------------ create and find


def test_implements_the_port(store: SqlDeploymentStore) -> None:
    # Checked by mypy: the store satisfies the DeploymentStore protocol.
    port: DeploymentStore = store
    assert port.engine is store.engine  # type: ignore[attr-defined]


def test_create_get_round_trip(store: SqlDeploymentStore) -> None:
    d = make(request_id="req-1", message="queued")
    assert store.create(d) == d
    assert store.get(d.id) == d
    assert store.get("deploy-" + "0" * 32) is None
    assert store.find_active("team-a", ResourceType.DATABASE, "orders-db") == d
    assert store.find_active("team-b", ResourceType.DATABASE, "orders-db") is None
    assert store.find_by_request_id("team-a", "req-1") == d
    assert store.find_by_request_id("team-b", "req-1") is None


def test_second_active_deployment_is_a_duplicate(store: SqlDeploymentStore) -> None:
    first = store.create(make())
    with pytest.raises(DuplicateDeployment) as caught:
        store.create(make())
    assert caught.value.existing.id == first.id
    # Another namespace, type or name is a different resource.
    store.create(make(namespace="team-b"))
    store.create(make(resource_type=ResourceType.CACHE))
    store.create(make("billing-db"))


@pytest.mark.parametrize("phase", [Phase.DELETED, Phase.FAILED])
def test_finished_deployment_frees_the_name(store: SqlDeploymentStore, phase: Phase) -> None:
    first = store.create(make())
    finish(store, first, phase)
    second = store.create(make())
    assert store.find_active("team-a", ResourceType.DATABASE, "orders-db") == second
    # ...and the finished one is still there.
    old = store.get(first.id)
    assert old is not None
    assert old.phase is phase


def test_same_request_id_is_a_duplicate(store: SqlDeploymentStore) -> None:
    first = store.create(make(request_id="req-7"))
    finish(store, first, Phase.FAILED)
    with pytest.raises(DuplicateDeployment) as caught:
        store.create(make("other-name", request_id="req-7"))
    assert caught.value.existing.id == first.id
    store.create(make("other-name", namespace="team-b", request_id="req-7"))


def test_same_id_twice_is_a_duplicate(store: SqlDeploymentStore) -> None:
    d = store.create(make())
    with pytest.raises(DuplicateDeployment) as caught:
        store.create(d)
    assert caught.value.existing == d


def test_concurrent_creates_make_exactly_one_deployment(store: SqlDeploymentStore) -> None:
    results = run_threads(20, lambda i: store.create(make(request_id=f"req-{i}")))
    created = [r for r in results if isinstance(r, Deployment)]
    duplicates = [r for r in results if isinstance(r, DuplicateDeployment)]
    assert len(created) == 1, results
    assert len(duplicates) == 19, results
    assert {d.existing.id for d in duplicates} == {created[0].id}
    assert [d.id for d in store.list(namespace="team-a")] == [created[0].id]


# ------------------------------------------------------------------ save


def test_save_increments_version_and_writes_events(store: SqlDeploymentStore) -> None:
    d = store.create(make())
    started = d.evolve(phase=Phase.PROVISIONING, message="creating")
    e1, e2 = event_for(started), event_for(started)
    saved = store.save(started, expected_version=0, events=[e1, e2])
    assert saved.version == 1
    assert saved.phase is Phase.PROVISIONING
    assert store.get(d.id) == saved
    assert store.get_event(e1.id) == e1
    assert store.get_event(e2.id) == e2
    assert store.get_event("missing") is None
    again = store.save(saved.evolve(progress=50), expected_version=1)
    assert again.version == 2
    got = store.get(d.id)
    assert got is not None
    assert got.progress == 50


def test_stale_save_is_refused_and_writes_nothing(store: SqlDeploymentStore) -> None:
    d = store.create(make())
    store.save(d.evolve(message="first writer"), expected_version=0)
    lost = event_for(d)
    with pytest.raises(ConcurrentUpdate):
        store.save(d.evolve(message="second writer"), expected_version=0, events=[lost])
    current = store.get(d.id)
    assert current is not None
    assert (current.message, current.version) == ("first writer", 1)
    assert store.get_event(lost.id) is None
    with pytest.raises(ConcurrentUpdate):
        store.save(make(), expected_version=0)  # never created


def test_concurrent_saves_one_winner(store: SqlDeploymentStore) -> None:
    d = store.create(make())
    results = run_threads(
        10, lambda i: store.save(d.evolve(message=f"writer {i}"), expected_version=0)
    )
    winners = [r for r in results if isinstance(r, Deployment)]
    assert len(winners) == 1
    assert all(isinstance(r, ConcurrentUpdate) for r in results if r not in winners)
    assert store.get(d.id) == winners[0]


def test_save_into_a_held_name_is_a_duplicate(store: SqlDeploymentStore) -> None:
    old = finish(store, store.create(make()), Phase.FAILED)
    holder = store.create(make())
    with pytest.raises(DuplicateDeployment) as caught:
        store.save(old.evolve(phase=Phase.PENDING), expected_version=old.version)
    assert caught.value.existing.id == holder.id
    unchanged = store.get(old.id)
    assert unchanged is not None
    assert unchanged.phase is Phase.FAILED


# ------------------------------------------------------------------ try_start


def test_try_start_moves_pending_to_provisioning(store: SqlDeploymentStore) -> None:
    d = store.create(make())
    assert store.try_start(d.id, expected_version=0, cap=1)
    started = store.get(d.id)
    assert started is not None
    assert started.phase is Phase.PROVISIONING
    assert started.version == 1
    assert started.started_at is not None
    assert store.list(phases=[Phase.PROVISIONING]) == [started]
    # Not Pending any more, or missing: nothing to start.
    assert not store.try_start(d.id, expected_version=1, cap=5)
    assert not store.try_start("deploy-" + "0" * 32, expected_version=0, cap=5)
    with pytest.raises(ConcurrentUpdate):
        store.try_start(d.id, expected_version=0, cap=5)


def test_try_start_respects_the_cap_per_namespace(store: SqlDeploymentStore) -> None:
    busy = store.create(make("busy"))
    assert store.try_start(busy.id, expected_version=0, cap=1)
    waiting = store.create(make("waiting"))
    assert not store.try_start(waiting.id, expected_version=0, cap=1)
    got = store.get(waiting.id)
    assert got is not None
    assert (got.phase, got.version) == (Phase.PENDING, 0)
    other = store.create(make("elsewhere", namespace="team-b"))
    assert store.try_start(other.id, expected_version=0, cap=1)


def test_concurrent_try_start_never_exceeds_the_cap(store: SqlDeploymentStore) -> None:
    pending = [store.create(make(f"db-{i}")) for i in range(20)]
    results = run_threads(20, lambda i: store.try_start(pending[i].id, expected_version=0, cap=10))
    assert results.count(True) == 10, results
    assert results.count(False) == 10, results
    provisioning = store.list(namespace="team-a", phases=[Phase.PROVISIONING])
    assert len(provisioning) == 10
    assert store.count_by_phase()[Phase.PROVISIONING] == 10
    assert store.count_by_phase()[Phase.PENDING] == 10


# ------------------------------------------------------------------ list, counts, purge


def test_list_filters_and_order(store: SqlDeploymentStore) -> None:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    a = store.create(make("a", created_at=t0, updated_at=t0))
    b = store.create(
        make(
            "b",
            phase=Phase.READY,
            created_at=t0 + timedelta(minutes=1),
            updated_at=t0 + timedelta(hours=2),
        )
    )
    c = store.create(
        make(
            "c",
            namespace="team-b",
            resource_type=ResourceType.CACHE,
            created_at=t0 + timedelta(minutes=2),
            updated_at=t0 + timedelta(minutes=2),
        )
    )
    assert store.list() == [a, b, c]
    assert store.list(limit=2) == [a, b]
    assert store.list(namespace="team-a") == [a, b]
    assert store.list(phases=[Phase.READY]) == [b]
    assert store.list(phases={Phase.PENDING: "x"}) == [a, c]  # any iterable of phases
    assert store.list(phases=[]) == []
    assert store.list(resource_type=ResourceType.CACHE) == [c]
    assert store.list(resource_name="b") == [b]
    assert store.list(updated_before=t0 + timedelta(hours=1)) == [a, c]
    # The same instant written in another timezone compares correctly.
    plus_two = timezone(timedelta(hours=2))
    assert store.list(updated_before=(t0 + timedelta(minutes=1)).astimezone(plus_two)) == [a]
    counts = store.count_by_phase()
    assert counts[Phase.PENDING] == 2
    assert counts[Phase.READY] == 1
    assert counts[Phase.DELETED] == 0
    assert set(counts) == set(Phase)


def test_purge_finished(store: SqlDeploymentStore) -> None:
    now = utcnow()
    old = store.create(make("old", phase=Phase.DELETED, finished_at=now - timedelta(days=40)))
    recent = store.create(make("recent", phase=Phase.DELETED, finished_at=now))
    failed = store.create(make("failed", phase=Phase.FAILED, finished_at=now - timedelta(days=40)))
    delivered = event_for(old, delivered_at=now - timedelta(days=40))
    undelivered = event_for(old)
    store.save_event(delivered)
    store.save_event(undelivered)
    assert store.purge_finished(before=now - timedelta(days=30)) == 1
    assert store.get(old.id) is None
    assert store.get(recent.id) == recent
    assert store.get(failed.id) == failed
    assert store.get_event(delivered.id) is None
    assert store.get_event(undelivered.id) == undelivered
    assert store.purge_finished(before=now - timedelta(days=30)) == 0


# ------------------------------------------------------------------ outbox, dead letters, cost


def test_outbox_pending_events(store: SqlDeploymentStore) -> None:
    d = store.create(make())
    now = utcnow()
    first = event_for(d, created_at=now - timedelta(minutes=3))
    second = event_for(d, created_at=now - timedelta(minutes=2))
    fresh = event_for(d, created_at=now)
    store.save(d.evolve(message="x"), expected_version=0, events=[first, second, fresh])
    cutoff = now - timedelta(minutes=1)
    assert store.pending_events(created_before=cutoff) == [first, second]
    assert store.pending_events(created_before=cutoff, limit=1) == [first]
    store.save_event(first.model_copy(update={"delivered_at": now, "attempts": 1}))
    store.save_event(second.model_copy(update={"dead_at": now, "last_error": "HTTP 500"}))
    assert store.pending_events(created_before=cutoff) == []
    stored = store.get_event(first.id)
    assert stored is not None
    assert stored.attempts == 1


def test_dead_letters_round_trip(store: SqlDeploymentStore) -> None:
    now = utcnow()
    letter = DeadLetter(
        id="dl-1",
        event_id="evt-1",
        deployment_id="deploy-" + "1" * 32,
        url="https://ci.example.com/hook",
        payload={"phase": "Ready", "nested": {"n": [1, 2]}},
        reason="HTTP 503",
        attempts=6,
        created_at=now - timedelta(minutes=5),
    )
    later = letter.model_copy(update={"id": "dl-2", "created_at": now})
    store.add_dead_letter(letter)
    store.add_dead_letter(later)
    assert store.get_dead_letter("dl-1") == letter
    assert store.get_dead_letter("nope") is None
    assert store.list_dead_letters() == [letter, later]
    resolved = letter.model_copy(update={"resolved_at": now})
    store.save_dead_letter(resolved)
    assert store.list_dead_letters() == [later]
    assert store.list_dead_letters(include_resolved=True) == [resolved, later]
    # A redelivered job adding the letter again does not reopen it.
    store.add_dead_letter(letter)
    assert store.get_dead_letter("dl-1") == resolved


def test_cost_snapshot_upsert(store: SqlDeploymentStore) -> None:
    snap = CostSnapshot(
        deployment_id="deploy-" + "2" * 32,
        day="2025-03-01",
        namespace="team-a",
        team="payments",
        application="orders",
        resource_type="database",
        amount=120.5,
    )
    other = snap.model_copy(update={"deployment_id": "deploy-" + "1" * 32, "amount": 10.0})
    store.put_cost_snapshot(snap)
    store.put_cost_snapshot(other)
    store.put_cost_snapshot(snap.model_copy(update={"day": "2025-03-02"}))
    updated = snap.model_copy(update={"amount": 130.0})
    store.put_cost_snapshot(updated)
    assert store.cost_snapshots(day="2025-03-01") == [other, updated]
    assert len(store.cost_snapshots(day="2025-03-02")) == 1
    assert store.cost_snapshots(day="2024-01-01") == []


# ------------------------------------------------------------------ availability


def test_check_passes(store: SqlDeploymentStore) -> None:
    store.check()


@pytest.mark.postgres
def test_unreachable_postgres_is_store_unavailable() -> None:
    # Nothing listens on port 1: connecting fails fast with "connection refused".
    with pytest.raises(StoreUnavailable):
        SqlDeploymentStore("postgresql://postgres@127.0.0.1:1/kidp")


@pytest.mark.postgres
def test_lost_database_is_store_unavailable(postgres_url: str) -> None:
    store = SqlDeploymentStore(postgres_url)
    d = store.create(make())
    name = sa.make_url(postgres_url).database
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    with pytest.raises(StoreUnavailable):
        store.check()
    with pytest.raises(StoreUnavailable):
        store.get(d.id)
    store.close()
