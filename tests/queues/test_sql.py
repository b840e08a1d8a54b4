"""SqlJobQueue against real SQLite files and the real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from kidp.models import Job, JobKind
from kidp.ports import Delivery, JobQueue
from kidp.queues.sql import MAX_DELIVERIES_REASON, SqlJobQueue
from kidp.stores.sql import SqlDeploymentStore, create_engine_for

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
LEASE = 30.0


class Clock:
    """A hand-moved clock (epoch seconds)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    eng = create_engine_for(url)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(engine: sa.Engine, clock: Clock) -> SqlJobQueue:
    return SqlJobQueue(engine, max_deliveries=3, clock=clock)


def job(n: int = 0, kind: JobKind = JobKind.PROVISION) -> Job:
    """The same job for the same ``n`` (a deterministic id)."""
    return Job(kind=kind, deployment_id=f"deploy-{n:032x}", id=f"job-{kind.value}-{n}")


def take(queue: SqlJobQueue, max_jobs: int = 10) -> list[Delivery]:
    return queue.receive(max_jobs=max_jobs, lease_seconds=LEASE)


def test_implements_the_port(queue: SqlJobQueue) -> None:
    # Checked by mypy: the queue satisfies the JobQueue protocol.
    port: JobQueue = queue
    port.check()


def test_enqueue_receive_ack(queue: SqlJobQueue) -> None:
    j = job(kind=JobKind.CALLBACK).model_copy(update={"event_id": "evt-1", "seq": 2})
    queue.enqueue(j)
    assert queue.pending_count() == 1
    [delivery] = take(queue)
    assert delivery.job == j
    assert delivery.attempt == 1
    assert take(queue) == []  # leased: nobody else gets it
    assert queue.pending_count() == 1
    queue.ack(delivery)
    assert queue.pending_count() == 0
    assert take(queue) == []


def test_receive_takes_oldest_due_first_up_to_max(queue: SqlJobQueue, clock: Clock) -> None:
    jobs = [job(i) for i in range(5)]
    for j in jobs:
        queue.enqueue(j)
        clock.advance(1)
    first = take(queue, max_jobs=2)
    assert [d.job for d in first] == jobs[:2]
    assert [d.job for d in take(queue, max_jobs=10)] == jobs[2:]
    assert queue.receive(max_jobs=0, lease_seconds=LEASE) == []


def test_delay_is_respected(queue: SqlJobQueue, clock: Clock) -> None:
    queue.enqueue(job(1), delay=10)
    queue.enqueue(job(2))
    assert [d.job for d in take(queue)] == [job(2)]
    clock.advance(9.9)
    assert take(queue) == []
    clock.advance(0.1)
    assert [d.job for d in take(queue)] == [job(1)]


def test_expired_lease_is_redelivered_and_the_stale_receipt_is_ignored(
    queue: SqlJobQueue, clock: Clock
) -> None:
    queue.enqueue(job())
    [first] = take(queue)
    clock.advance(LEASE - 1)
    assert take(queue) == []  # still leased
    clock.advance(1)
    [second] = take(queue)  # the first worker "died"; the lease expired
    assert second.job == first.job
    assert second.attempt == first.attempt + 1
    assert second.receipt != first.receipt
    # The first worker comes back: none of its verdicts count any more.
    queue.ack(first)
    queue.retry(first, delay=0)
    queue.dead_letter(first, reason="late")
    assert take(queue) == []
    assert queue.pending_count() == 1
    assert queue.dead_jobs() == []
    queue.ack(second)
    assert queue.pending_count() == 0


def test_retry_makes_the_job_due_after_the_delay(queue: SqlJobQueue, clock: Clock) -> None:
    queue.enqueue(job())
    [first] = take(queue)
    queue.retry(first, delay=5)
    assert take(queue) == []
    clock.advance(5)
    [second] = take(queue)
    assert second.attempt == 2
    queue.retry(first, delay=0)  # stale: ignored
    assert take(queue) == []


def test_dead_letter_keeps_the_job_with_its_reason(queue: SqlJobQueue) -> None:
    queue.enqueue(job(1))
    [delivery] = take(queue)
    queue.dead_letter(delivery, reason="bad payload")
    assert queue.dead_jobs() == [(job(1), "bad payload")]
    assert queue.pending_count() == 0
    assert take(queue) == []


def test_max_deliveries_moves_the_job_to_dead(queue: SqlJobQueue, clock: Clock) -> None:
    queue.enqueue(job(1))
    queue.enqueue(job(2), delay=1)  # a healthy job behind the poison one
    for attempt in (1, 2, 3):
        [delivery] = take(queue, max_jobs=1)
        assert (delivery.job, delivery.attempt) == (job(1), attempt)
        clock.advance(LEASE)  # the worker crashes every time
    # The fourth delivery would exceed max_deliveries=3: dead instead, and the
    # batch is filled with the next due job.
    [delivery] = take(queue, max_jobs=1)
    assert delivery.job == job(2)
    assert queue.dead_jobs() == [(job(1), MAX_DELIVERIES_REASON)]


def test_enqueue_is_idempotent_by_job_id(queue: SqlJobQueue, clock: Clock) -> None:
    j = job()
    queue.enqueue(j)
    queue.enqueue(j)
    queue.enqueue(j, delay=100)  # still the first enqueue that counts
    assert queue.pending_count() == 1
    [delivery] = take(queue)
    assert take(queue) == []
    queue.ack(delivery)
    # A finished id can be enqueued afresh, with a fresh attempt count.
    queue.enqueue(j)
    [again] = take(queue)
    assert (again.job, again.attempt) == (j, 1)
    queue.dead_letter(again, reason="gave up")
    queue.enqueue(j)  # dead stays dead
    assert take(queue) == []
    assert queue.dead_jobs() == [(j, "gave up")]


def test_enqueue_while_leased_runs_the_job_again_after_ack(
    queue: SqlJobQueue, clock: Clock
) -> None:
    # A handler that must wait (its namespace is at capacity) enqueues its own
    # job with a delay, and the worker then acknowledges the delivery.
    j = job()
    queue.enqueue(j)
    [delivery] = take(queue)
    queue.enqueue(j, delay=10)
    queue.ack(delivery)
    assert queue.pending_count() == 1
    clock.advance(9)
    assert take(queue) == []
    clock.advance(1)
    [follow_up] = take(queue)
    assert (follow_up.job, follow_up.attempt) == (j, 1)
    queue.ack(delivery)  # the old receipt cannot touch the new run
    assert queue.pending_count() == 1
    queue.ack(follow_up)
    assert queue.pending_count() == 0


def test_purge_done(queue: SqlJobQueue, clock: Clock) -> None:
    for n in range(3):
        queue.enqueue(job(n))
    done, kept, dead = take(queue)
    queue.ack(done)
    queue.dead_letter(dead, reason="x")
    clock.advance(100)
    queue.ack(kept)
    assert queue.purge_done(before=clock.now - 50) == 1
    assert queue.purge_done(before=datetime.fromtimestamp(clock.now + 1, UTC)) == 1
    assert [j for j, _ in queue.dead_jobs()] == [dead.job]


def test_check(queue: SqlJobQueue) -> None:
    queue.check()


def test_concurrent_receivers_never_share_a_job(engine: sa.Engine) -> None:
    queue = SqlJobQueue(engine)
    expected = {job(n).id for n in range(60)}
    for n in range(60):
        queue.enqueue(job(n))
    barrier = threading.Barrier(6)

    def worker(_: int) -> list[str]:
        barrier.wait()
        got: list[str] = []
        while batch := queue.receive(max_jobs=3, lease_seconds=60):
            got.extend(d.job.id for d in batch)
        return got

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(worker, range(6)))
    received = [job_id for got in results for job_id in got]
    assert len(received) == len(set(received)) == 60
    assert set(received) == expected


def test_shares_the_engine_with_the_store(tmp_path: Path) -> None:
    store = SqlDeploymentStore(f"sqlite:///{tmp_path / 'broker.db'}")
    queue = SqlJobQueue(store.engine)
    queue.enqueue(job())
    store.check()
    assert queue.pending_count() == 1
    store.close()


def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    clock = Clock()
    engine = create_engine_for(url)
    queue = SqlJobQueue(engine, clock=clock)
    queue.enqueue(job(1))
    queue.enqueue(job(2), delay=5)
    [leased] = queue.receive(max_jobs=1, lease_seconds=LEASE)  # then "kill -9"
    engine.dispose()

    engine = create_engine_for(url)
    queue = SqlJobQueue(engine, clock=clock)
    assert queue.pending_count() == 2
    clock.advance(LEASE)
    redelivered = queue.receive(max_jobs=10, lease_seconds=LEASE)
    assert [(d.job, d.attempt) for d in redelivered] == [(leased.job, 2), (job(2), 1)]
    engine.dispose()


_RECEIVER = """
import json, sys
from kidp.queues.sql import SqlJobQueue
from kidp.stores.sql import create_engine_for
queue = SqlJobQueue(create_engine_for(sys.argv[1]))
sys.stdin.readline()  # start together
got = []
while batch := queue.receive(max_jobs=2, lease_seconds=60):
    got.extend(d.job.id for d in batch)
print(json.dumps(got))
"""


def test_concurrent_processes_never_share_a_job(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    engine = create_engine_for(url)
    queue = SqlJobQueue(engine)
    for n in range(40):
        queue.enqueue(job(n))
    engine.dispose()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RECEIVER, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = []
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        outputs.append(json.loads(out))
    received = [job_id for got in outputs for job_id in got]
    assert len(received) == len(set(received)) == 40
