"""The DeploymentStore contract, run against every backend (see ``conftest.py``):
SQLite, PostgreSQL and DynamoDB must behave the same."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from kidp.errors import ConcurrentUpdate, DuplicateDeployment
from kidp.models import (
    CallbackEvent,
    CostSnapshot,
    DeadLetter,
    Deployment,
    Phase,
    ResourceType,
    new_deployment_id,
    utcnow,
)
from kidp.ports import DeploymentStore

Make = Callable[..., Deployment]


def finish(store: DeploymentStore, deployment: Deployment, phase: Phase) -> Deployment:
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


# ------------------------------------------------------------------ create and find


def test_create_get_round_trip(store: DeploymentStore, make: Make) -> None:
    d = make(request_id="req-1", message="queued")
    assert store.create(d) == d
    assert store.get(d.id) == d
    assert store.get("deploy-" + "0" * 32) is None
    assert store.find_active("team-a", ResourceType.DATABASE, "orders-db") == d
    assert store.find_active("team-b", ResourceType.DATABASE, "orders-db") is None
    assert store.find_by_request_id("team-a", "req-1") == d
    assert store.find_by_request_id("team-b", "req-1") is None


def test_second_active_deployment_is_a_duplicate(store: DeploymentStore, make: Make) -> None:
    first = store.create(make())
    with pytest.raises(DuplicateDeployment) as caught:
        store.create(make())
    assert caught.value.existing.id == first.id
    # Another namespace, type or name is a different resource.
    store.create(make(namespace="team-b"))
    store.create(make(resource_type=ResourceType.CACHE))
    store.create(make("billing-db"))


@pytest.mark.parametrize("phase", [Phase.DELETED, Phase.FAILED])
def test_finished_deployment_frees_the_name(
    store: DeploymentStore, make: Make, phase: Phase
) -> None:
    first = store.create(make())
    finish(store, first, phase)
    assert store.find_active("team-a", ResourceType.DATABASE, "orders-db") is None
    second = store.create(make())
    assert store.find_active("team-a", ResourceType.DATABASE, "orders-db") == second
    # ...and the finished one is still there.
    old = store.get(first.id)
    assert old is not None
    assert old.phase is phase


def test_same_request_id_is_a_duplicate(store: DeploymentStore, make: Make) -> None:
    first = store.create(make(request_id="req-7"))
    finish(store, first, Phase.FAILED)
    with pytest.raises(DuplicateDeployment) as caught:
        store.create(make("other-name", request_id="req-7"))
    assert caught.value.existing.id == first.id
    store.create(make("other-name", namespace="team-b", request_id="req-7"))


def test_same_request_id_wins_over_the_same_name(store: DeploymentStore, make: Make) -> None:
    # A retried request gets back the deployment it created, even when another
    # deployment holds the name now.
    first = store.create(make(request_id="req-1"))
    finish(store, first, Phase.FAILED)
    store.create(make(request_id="req-2"))
    with pytest.raises(DuplicateDeployment) as caught:
        store.create(make(request_id="req-1"))
    assert caught.value.existing.id == first.id


def test_same_id_twice_is_a_duplicate(store: DeploymentStore, make: Make) -> None:
    d = store.create(make())
    with pytest.raises(DuplicateDeployment) as caught:
        store.create(d)
    assert caught.value.existing == d


def test_concurrent_creates_make_exactly_one_deployment(store: DeploymentStore, make: Make) -> None:
    results = run_threads(20, lambda i: store.create(make(request_id=f"req-{i}")))
    created = [r for r in results if isinstance(r, Deployment)]
    duplicates = [r for r in results if isinstance(r, DuplicateDeployment)]
    assert len(created) == 1, results
    assert len(duplicates) == 19, results
    assert {d.existing.id for d in duplicates} == {created[0].id}
    assert [d.id for d in store.list(namespace="team-a")] == [created[0].id]


# ------------------------------------------------------------------ save


def test_save_increments_version_and_writes_events(store: DeploymentStore, make: Make) -> None:
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


def test_stale_save_is_refused_and_writes_nothing(store: DeploymentStore, make: Make) -> None:
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


def test_concurrent_saves_one_winner(store: DeploymentStore, make: Make) -> None:
    d = store.create(make())
    results = run_threads(
        10, lambda i: store.save(d.evolve(message=f"writer {i}"), expected_version=0)
    )
    winners = [r for r in results if isinstance(r, Deployment)]
    assert len(winners) == 1
    assert all(isinstance(r, ConcurrentUpdate) for r in results if r not in winners)
    assert store.get(d.id) == winners[0]


def test_save_into_a_held_name_is_a_duplicate(store: DeploymentStore, make: Make) -> None:
    old = finish(store, store.create(make()), Phase.FAILED)
    holder = store.create(make())
    lost = event_for(old)
    with pytest.raises(DuplicateDeployment) as caught:
        store.save(old.evolve(phase=Phase.PENDING), expected_version=old.version, events=[lost])
    assert caught.value.existing.id == holder.id
    unchanged = store.get(old.id)
    assert unchanged is not None
    assert unchanged.phase is Phase.FAILED
    assert store.get_event(lost.id) is None


# ------------------------------------------------------------------ try_start


def test_try_start_moves_pending_to_provisioning(store: DeploymentStore, make: Make) -> None:
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


def test_try_start_respects_the_cap_per_namespace(store: DeploymentStore, make: Make) -> None:
    busy = store.create(make("busy"))
    assert store.try_start(busy.id, expected_version=0, cap=1)
    waiting = store.create(make("waiting"))
    assert not store.try_start(waiting.id, expected_version=0, cap=1)
    assert not store.try_start(waiting.id, expected_version=0, cap=0)
    got = store.get(waiting.id)
    assert got is not None
    assert (got.phase, got.version) == (Phase.PENDING, 0)
    other = store.create(make("elsewhere", namespace="team-b"))
    assert store.try_start(other.id, expected_version=0, cap=1)


def test_leaving_provisioning_frees_a_slot(store: DeploymentStore, make: Make) -> None:
    first = store.create(make("first"))
    assert store.try_start(first.id, expected_version=0, cap=1)
    second = store.create(make("second"))
    assert not store.try_start(second.id, expected_version=0, cap=1)
    finish(store, first, Phase.READY)
    assert store.try_start(second.id, expected_version=0, cap=1)
    # A save that moves into Provisioning takes a slot too (it is not capped).
    third = store.create(make("third"))
    store.save(third.evolve(phase=Phase.PROVISIONING), expected_version=0)
    fourth = store.create(make("fourth"))
    assert not store.try_start(fourth.id, expected_version=0, cap=2)
    finish(store, third, Phase.FAILED)
    assert store.try_start(fourth.id, expected_version=0, cap=2)


def test_concurrent_try_start_never_exceeds_the_cap(store: DeploymentStore, make: Make) -> None:
    pending = [store.create(make(f"db-{i}")) for i in range(20)]
    results = run_threads(20, lambda i: store.try_start(pending[i].id, expected_version=0, cap=10))
    assert results.count(True) == 10, results
    assert results.count(False) == 10, results
    provisioning = store.list(namespace="team-a", phases=[Phase.PROVISIONING])
    assert len(provisioning) == 10
    assert store.count_by_phase()[Phase.PROVISIONING] == 10
    assert store.count_by_phase()[Phase.PENDING] == 10


# ------------------------------------------------------------------ list, counts, purge


def test_list_filters_and_order(store: DeploymentStore, make: Make) -> None:
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
    assert store.list(limit=0) == []
    assert store.list(namespace="team-a") == [a, b]
    assert store.list(namespace="team-a", phases=[Phase.READY]) == [b]
    assert store.list(namespace="team-a", limit=1) == [a]
    assert store.list(phases=[Phase.READY]) == [b]
    assert store.list(phases={Phase.PENDING: "x"}) == [a, c]  # any iterable of phases
    assert store.list(phases=[Phase.READY, Phase.PENDING], limit=2) == [a, b]
    assert store.list(phases=[]) == []
    assert store.list(resource_type=ResourceType.CACHE) == [c]
    assert store.list(resource_name="b") == [b]
    assert store.list(namespace="team-b", resource_name="b") == []
    assert store.list(updated_before=t0 + timedelta(hours=1)) == [a, c]
    # The same instant written in another timezone compares correctly.
    plus_two = timezone(timedelta(hours=2))
    assert store.list(updated_before=(t0 + timedelta(minutes=1)).astimezone(plus_two)) == [a]
    counts = store.count_by_phase()
    assert counts[Phase.PENDING] == 2
    assert counts[Phase.READY] == 1
    assert counts[Phase.DELETED] == 0
    assert set(counts) == set(Phase)


def test_purge_finished(store: DeploymentStore, make: Make) -> None:
    now = utcnow()
    old = store.create(make("old", phase=Phase.DELETED, finished_at=now - timedelta(days=40)))
    unfinished = store.create(
        make("unfinished", phase=Phase.DELETED, updated_at=now - timedelta(days=40))
    )
    recent = store.create(make("recent", phase=Phase.DELETED, finished_at=now))
    failed = store.create(make("failed", phase=Phase.FAILED, finished_at=now - timedelta(days=40)))
    delivered = event_for(old, delivered_at=now - timedelta(days=40))
    undelivered = event_for(old)
    store.save_event(delivered)
    store.save_event(undelivered)
    assert store.purge_finished(before=now - timedelta(days=30)) == 2
    assert store.get(old.id) is None
    assert store.get(unfinished.id) is None
    assert store.get(recent.id) == recent
    assert store.get(failed.id) == failed
    assert store.get_event(delivered.id) is None
    assert store.get_event(undelivered.id) == undelivered
    assert store.purge_finished(before=now - timedelta(days=30)) == 0
    assert store.count_by_phase()[Phase.DELETED] == 1


def test_purge_frees_the_request_id(store: DeploymentStore, make: Make) -> None:
    now = utcnow()
    old = store.create(make(request_id="req-1"))
    finish(store, old, Phase.DELETED)
    assert store.purge_finished(before=now + timedelta(minutes=1)) == 1
    assert store.find_by_request_id("team-a", "req-1") is None
    again = store.create(make(request_id="req-1"))
    assert store.find_by_request_id("team-a", "req-1") == again


# ------------------------------------------------------------------ outbox, dead letters, cost


def test_outbox_pending_events(store: DeploymentStore, make: Make) -> None:
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
    # Undelivered again (a replayed dead letter): pending again.
    store.save_event(second.model_copy(update={"dead_at": None}))
    assert [e.id for e in store.pending_events(created_before=cutoff)] == [second.id]


def test_dead_letters_round_trip(store: DeploymentStore) -> None:
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


def test_cost_snapshot_upsert(store: DeploymentStore) -> None:
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


def test_check_passes(store: DeploymentStore) -> None:
    store.check()
