"""The JobQueue contract every pull queue keeps, written once.

A backend's test module subclasses :class:`QueueContract` (pytest collects the
inherited tests) and provides a ``harness`` fixture: the queue under test
(built with ``max_deliveries=3``) and how time passes for it. The SQL queue
moves a hand-held clock, so its deadlines are checked to a tenth of a second;
NATS runs on real time, so its harness sleeps and polls, with margins wide
enough for a server round trip but well inside the leases and delays.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from kidp.models import Job, JobKind
from kidp.ports import Delivery, JobQueue
from kidp.queues.sql import MAX_DELIVERIES_REASON


class ContractQueue(JobQueue, Protocol):
    """A pull queue plus the operator views the contract inspects."""

    def pending_count(self) -> int: ...

    def dead_jobs(self) -> list[tuple[Job, str]]: ...

    def replay_dead(self, job_id: str) -> Job | None: ...


class Harness(Protocol):
    """A queue under test and its notion of time."""

    queue: ContractQueue
    #: The lease ``receive`` asks for (and gets).
    lease: float
    #: A delay the backend resolves reliably.
    tick: float
    #: How long before a deadline "not yet" is checked, and how long after the
    #: deadline the job must have come.
    margin: float
    #: Time between two enqueues that orders them.
    step: float

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass (at least)."""
        ...

    def take(self, max_jobs: int = 10) -> list[Delivery]:
        """Lease what is due now; ``[]`` means nothing became due."""
        ...

    def long_lease_queue(self) -> tuple[ContractQueue, float]:
        """A fresh queue whose leases outlast a slow test, and that lease."""
        ...


def job(n: int = 0, kind: JobKind = JobKind.PROVISION) -> Job:
    """The same job for the same ``n`` (a deterministic id)."""
    return Job(kind=kind, deployment_id=f"deploy-{n:032x}", id=f"job-{kind.value}-{n}")


def jobs_of(deliveries: list[Delivery]) -> list[Job]:
    return [d.job for d in deliveries]


class QueueContract:
    """The behaviour of ``kidp.ports.JobQueue`` as the worker relies on it."""

    def test_implements_the_port(self, harness: Harness) -> None:
        port: JobQueue = harness.queue
        port.check()

    def test_enqueue_receive_ack(self, harness: Harness) -> None:
        queue = harness.queue
        j = job(kind=JobKind.CALLBACK).model_copy(update={"event_id": "evt-1", "seq": 2})
        queue.enqueue(j)
        assert queue.pending_count() == 1
        [delivery] = harness.take()
        assert delivery.job == j
        assert delivery.attempt == 1
        assert harness.take() == []  # leased: nobody else gets it
        assert queue.pending_count() == 1
        queue.ack(delivery)
        assert queue.pending_count() == 0
        assert harness.take() == []

    def test_receive_takes_jobs_in_order_up_to_max(self, harness: Harness) -> None:
        jobs = [job(i) for i in range(5)]
        for j in jobs:
            harness.queue.enqueue(j)
            harness.advance(harness.step)
        assert jobs_of(harness.take(max_jobs=2)) == jobs[:2]
        assert jobs_of(harness.take(max_jobs=10)) == jobs[2:]
        assert harness.queue.receive(max_jobs=0, lease_seconds=harness.lease) == []

    def test_delay_is_respected(self, harness: Harness) -> None:
        harness.queue.enqueue(job(1), delay=harness.tick)
        harness.queue.enqueue(job(2))
        assert jobs_of(harness.take()) == [job(2)]
        harness.advance(harness.tick - harness.margin)
        assert harness.take() == []
        harness.advance(harness.margin)
        assert jobs_of(harness.take()) == [job(1)]

    def test_expired_lease_is_redelivered_and_the_stale_receipt_is_ignored(
        self, harness: Harness
    ) -> None:
        queue = harness.queue
        queue.enqueue(job())
        [first] = harness.take()
        harness.advance(harness.lease - harness.margin)
        assert harness.take() == []  # still leased
        harness.advance(harness.margin)
        [second] = harness.take()  # the first worker "died"; the lease expired
        assert second.job == first.job
        assert second.attempt == first.attempt + 1
        assert second.receipt != first.receipt
        # The first worker comes back: none of its verdicts count any more.
        queue.ack(first)
        queue.retry(first, delay=0)
        queue.dead_letter(first, reason="late")
        assert harness.take() == []
        assert queue.pending_count() == 1
        assert queue.dead_jobs() == []
        queue.ack(second)
        assert queue.pending_count() == 0

    def test_retry_makes_the_job_due_after_the_delay(self, harness: Harness) -> None:
        queue = harness.queue
        queue.enqueue(job())
        [first] = harness.take()
        queue.retry(first, delay=harness.tick)
        assert harness.take() == []
        harness.advance(harness.tick)
        [second] = harness.take()
        assert second.attempt == 2
        queue.retry(first, delay=0)  # stale: ignored
        assert harness.take() == []

    def test_dead_letter_keeps_the_job_with_its_reason(self, harness: Harness) -> None:
        queue = harness.queue
        queue.enqueue(job(1))
        [delivery] = harness.take()
        queue.dead_letter(delivery, reason="bad payload")
        assert queue.dead_jobs() == [(job(1), "bad payload")]
        assert queue.pending_count() == 0
        assert harness.take() == []

    def test_a_replayed_dead_job_runs_again_from_its_first_delivery(self, harness: Harness) -> None:
        queue = harness.queue
        queue.enqueue(job(1))
        [delivery] = harness.take()
        queue.dead_letter(delivery, reason="receiver was down")
        assert queue.replay_dead(job(2).id) is None  # never dead: nothing to replay
        assert queue.replay_dead(job(1).id) == job(1)
        assert queue.dead_jobs() == []
        [again] = harness.take()
        assert (again.job, again.attempt) == (job(1), 1)
        assert queue.replay_dead(job(1).id) is None  # running, not dead

    def test_max_deliveries_moves_the_job_to_dead(self, harness: Harness) -> None:
        queue = harness.queue
        queue.enqueue(job(1))
        queue.enqueue(job(2), delay=harness.step)  # a healthy job behind the poison one
        for attempt in (1, 2, 3):
            [delivery] = harness.take(max_jobs=1)
            assert (delivery.job, delivery.attempt) == (job(1), attempt)
            harness.advance(harness.lease)  # the worker crashes every time
        # The fourth delivery would exceed max_deliveries=3: dead instead, and the
        # batch is filled with the next due job.
        [delivery] = harness.take(max_jobs=1)
        assert delivery.job == job(2)
        assert queue.dead_jobs() == [(job(1), MAX_DELIVERIES_REASON)]

    def test_enqueue_is_idempotent_by_job_id(self, harness: Harness) -> None:
        queue = harness.queue
        j = job()
        queue.enqueue(j)
        queue.enqueue(j)
        queue.enqueue(j, delay=100)  # still the first enqueue that counts
        assert queue.pending_count() == 1
        [delivery] = harness.take()
        assert harness.take() == []
        queue.ack(delivery)
        # A finished id can be enqueued afresh, with a fresh attempt count.
        queue.enqueue(j)
        [again] = harness.take()
        assert (again.job, again.attempt) == (j, 1)
        queue.dead_letter(again, reason="gave up")
        queue.enqueue(j)  # dead stays dead
        assert harness.take() == []
        assert queue.dead_jobs() == [(j, "gave up")]

    def test_enqueue_while_leased_runs_the_job_again_after_ack(self, harness: Harness) -> None:
        # A handler that must wait (its namespace is at capacity) enqueues its own
        # job with a delay, and the worker then acknowledges the delivery.
        queue = harness.queue
        j = job()
        queue.enqueue(j)
        [delivery] = harness.take()
        queue.enqueue(j, delay=harness.tick)
        queue.ack(delivery)
        assert queue.pending_count() == 1
        harness.advance(harness.tick - harness.margin)
        assert harness.take() == []
        harness.advance(harness.margin)
        [follow_up] = harness.take()
        assert (follow_up.job, follow_up.attempt) == (j, 1)
        queue.ack(delivery)  # the old receipt cannot touch the new run
        assert queue.pending_count() == 1
        queue.ack(follow_up)
        assert queue.pending_count() == 0

    def test_concurrent_receivers_never_share_a_job(self, harness: Harness) -> None:
        queue, lease = harness.long_lease_queue()
        expected = {job(n).id for n in range(60)}
        for n in range(60):
            queue.enqueue(job(n))
        barrier = threading.Barrier(6)

        def worker(_: Any) -> list[str]:
            barrier.wait()
            got: list[str] = []
            while batch := queue.receive(max_jobs=3, lease_seconds=lease):
                got.extend(d.job.id for d in batch)
            return got

        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(worker, range(6)))
        received = [job_id for got in results for job_id in got]
        assert len(received) == len(set(received)) == 60
        assert set(received) == expected
