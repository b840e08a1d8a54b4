"""NatsJobQueue against the real NATS JetStream server.

The shared contract (``contract.py``) and the tests here run on the server at
127.0.0.1:4222, each on streams of its own that are deleted afterwards. The
restart test starts a private nats-server (its own port and store directory)
so it can kill it with -9 without touching the shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from tests.conftest import PrivateServer, require_program
from tests.queues.contract import QueueContract, job

from kidp.emulator import free_port
from kidp.errors import StoreUnavailable, ValidationFailed
from kidp.models import Job, JobKind
from kidp.ports import Delivery
from kidp.queues.nats import NatsJobQueue, parse_nats_url, subject_token

pytestmark = pytest.mark.nats

ACK_WAIT = 2.0
#: How long ``take`` keeps asking before it concludes that nothing is due.
SETTLE = 0.3
#: Added to every wait, so a server timer firing a hair late cannot decide a test.
SLACK = 0.05


def take(queue: NatsJobQueue, max_jobs: int = 10, *, patience: float = SETTLE) -> list[Delivery]:
    """Lease what is due, asking again for ``patience`` seconds while nothing is."""
    deadline = time.monotonic() + patience
    while True:
        got = queue.receive(max_jobs=max_jobs, lease_seconds=queue.ack_wait_seconds)
        if got or time.monotonic() >= deadline:
            return got


async def _delete_streams(server: str, names: list[str]) -> None:
    nc = await nats.connect(server, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream()
        for name in names:
            # Not found: never created, the queue failed before declaring it.
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture
def stream_url(nats_url: str) -> Iterator[Callable[[], str]]:
    """Makes URLs of fresh streams on the shared server; deletes them afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"KIDP_TEST_{uuid.uuid4().hex[:12]}"
        made.append(name)
        return f"{nats_url}/{name}"

    yield make
    asyncio.run(_delete_streams(nats_url, [n for s in made for n in (s, f"{s}_DEAD")]))


@pytest.fixture
def open_queue(stream_url: Callable[[], str]) -> Iterator[Callable[..., NatsJobQueue]]:
    """Opens queues (on a fresh stream unless given a URL) and closes them afterwards."""
    opened: list[NatsJobQueue] = []

    def make(url: str | None = None, **options: Any) -> NatsJobQueue:
        settings: dict[str, Any] = {
            "max_deliveries": 3,
            "ack_wait_seconds": ACK_WAIT,
            "receive_wait_seconds": 0.1,
            **options,
        }
        queue = NatsJobQueue(url or stream_url(), **settings)
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        queue.close()


class NatsHarness:
    """The contract's harness on real time: waits sleep, takes poll briefly."""

    lease = ACK_WAIT
    # Shorter than the lease, so jobs the contract leaves leased stay leased.
    tick = 1.2
    # "Not yet" is checked from tick - margin for about SETTLE seconds, which
    # ends well before the deadline.
    margin = 0.7
    step = 0.0

    def __init__(self, open_queue: Callable[..., NatsJobQueue]) -> None:
        self._open = open_queue
        self.queue = open_queue()

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds + SLACK)

    def take(self, max_jobs: int = 10) -> list[Delivery]:
        return take(self.queue, max_jobs)

    def long_lease_queue(self) -> tuple[NatsJobQueue, float]:
        return self._open(ack_wait_seconds=60.0, max_deliveries=10), 60.0


@pytest.fixture
def harness(open_queue: Callable[..., NatsJobQueue]) -> NatsHarness:
    return NatsHarness(open_queue)


class TestNatsJobQueueContract(QueueContract):
    """The shared JobQueue contract on NATS JetStream."""


# ----------------------------------------------------------------- without a server


def test_queue_urls() -> None:
    assert parse_nats_url("nats://127.0.0.1:4222/JOBS") == (["nats://127.0.0.1:4222"], "JOBS")
    assert parse_nats_url("nats://nats:4222") == (["nats://nats:4222"], "KIDP_JOBS")
    assert parse_nats_url("tls://u:p@a:4222,b:4222/X_1") == (
        ["tls://u:p@a:4222", "tls://u:p@b:4222"],
        "X_1",
    )
    for bad in ("http://nats:4222/JOBS", "nats:///JOBS", "nats://h/JOBS.A", "nats://h/J*"):
        with pytest.raises(ValidationFailed):
            parse_nats_url(bad)


def test_subject_tokens_are_injective_and_safe() -> None:
    ids = ["job-provision-1", "evt.1", "evt 1", "~ZXZ0LjE", "a*b>c", "ü"]
    tokens = [subject_token(i) for i in ids]
    assert len(set(tokens)) == len(ids)
    assert tokens[0] == "job-provision-1"  # ordinary ids stay readable
    for token in tokens:
        assert token and not any(c in token for c in ". *>\t\r\n")


def test_an_unreachable_server_is_a_temporary_error() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        NatsJobQueue(f"nats://127.0.0.1:{free_port()}/JOBS", connect_timeout=1.0)
    assert time.monotonic() - started < 3


# ------------------------------------------------------------------ on the server


def test_two_replicas_take_each_job_exactly_once(
    open_queue: Callable[..., NatsJobQueue], stream_url: Callable[[], str]
) -> None:
    url = stream_url()
    replicas = [open_queue(url, ack_wait_seconds=30.0), open_queue(url, ack_wait_seconds=30.0)]
    for n in range(40):
        replicas[n % 2].enqueue(job(n))
    received: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def work(queue: NatsJobQueue) -> None:
        barrier.wait()
        while batch := queue.receive(max_jobs=2, lease_seconds=30.0):
            for delivery in batch:
                with lock:
                    received.append(delivery.job.id)
                queue.ack(delivery)

    threads = [threading.Thread(target=work, args=(replicas[i % 2],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(received) == sorted(job(n).id for n in range(40))
    assert replicas[0].pending_count() == 0


def test_enqueue_from_another_replica_while_leased_runs_the_job_once_more(
    open_queue: Callable[..., NatsJobQueue], stream_url: Callable[[], str]
) -> None:
    url = stream_url()
    holder, other = open_queue(url), open_queue(url)
    j = job()
    holder.enqueue(j)
    other.enqueue(j)  # waiting: a no-op from any replica
    assert holder.pending_count() == 1
    [delivery] = take(holder)
    other.enqueue(j)  # leased elsewhere: one more run after that lease
    other.enqueue(j)  # and only one
    assert holder.pending_count() == 2
    assert take(other) == []  # never while the first run is held
    holder.ack(delivery)
    [again] = take(other, patience=3.0)
    assert (again.job, again.attempt) == (j, 1)
    other.ack(again)
    # The mover acknowledges the delayed copy just after publishing the run,
    # so a worker can finish that run before the copy is gone.
    eventually(lambda: holder.pending_count() == 0, within=5, what="nothing left pending")


def test_dead_jobs_are_listed_oldest_first_and_can_be_replayed(
    open_queue: Callable[..., NatsJobQueue],
) -> None:
    queue = open_queue()
    queue.enqueue(job(1))
    queue.enqueue(job(2))
    first, second = take(queue)
    queue.dead_letter(second, reason="second given up")
    queue.dead_letter(first, reason="first given up")
    assert queue.dead_jobs() == [(job(2), "second given up"), (job(1), "first given up")]

    assert queue.replay_dead(job(1).id) == job(1)

    assert queue.dead_jobs() == [(job(2), "second given up")]
    [again] = take(queue)
    assert (again.job, again.attempt) == (job(1), 1)
    assert queue.replay_dead("no-such-job") is None


def test_any_job_id_round_trips(open_queue: Callable[..., NatsJobQueue]) -> None:
    queue = open_queue()
    j = Job(kind=JobKind.CALLBACK, deployment_id="d", id="evt.1 with spaces*>")
    queue.enqueue(j)
    queue.enqueue(j)
    assert queue.pending_count() == 1
    [delivery] = take(queue)
    assert delivery.job == j
    queue.dead_letter(delivery, reason="x")
    assert queue.dead_jobs() == [(j, "x")]


def test_receipts_from_another_queue_are_ignored(
    open_queue: Callable[..., NatsJobQueue], stream_url: Callable[[], str]
) -> None:
    url = stream_url()
    holder, other = open_queue(url), open_queue(url)
    holder.enqueue(job())
    [delivery] = take(holder)
    other.ack(delivery)  # not its lease: only the holder decides
    assert holder.pending_count() == 1
    holder.ack(delivery)
    assert holder.pending_count() == 0


def test_a_closed_queue_refuses_calls(open_queue: Callable[..., NatsJobQueue]) -> None:
    queue = open_queue()
    queue.close()
    queue.close()  # idempotent
    with pytest.raises(StoreUnavailable):
        queue.enqueue(job())


# ---------------------------------------------------------------- a restarted server


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateServer]:
    """A nats-server of this test's own: its port, its JetStream store directory."""
    port = free_port()
    command = [
        require_program("nats-server", "/usr/sbin/nats-server"),
        *("-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "jetstream")),
    ]
    with PrivateServer(command, port=port, url=f"nats://127.0.0.1:{port}") as server:
        yield server


def eventually(condition: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.1)


def answers(queue: NatsJobQueue) -> bool:
    try:
        queue.check()
    except StoreUnavailable:
        return False
    return True


@pytest.mark.slow
def test_a_restarted_server_loses_nothing_acknowledged(private_nats: PrivateServer) -> None:
    queue = NatsJobQueue(
        f"{private_nats.url}/RESTART",
        max_deliveries=5,
        ack_wait_seconds=1.0,
        request_timeout=1.0,
        receive_wait_seconds=0.2,
    )
    try:
        jobs = [job(n) for n in range(20)]
        for j in jobs[:15]:
            queue.enqueue(j)
        for j in jobs[15:]:
            queue.enqueue(j, delay=1.0)  # waiting on the timer when the server dies
        finished, held = take(queue, max_jobs=2)
        queue.ack(finished)

        private_nats.kill()  # `held` is leased; 13 are due, 5 delayed
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            queue.enqueue(job(99))
        with pytest.raises(StoreUnavailable):
            queue.receive(max_jobs=1, lease_seconds=1.0)
        assert time.monotonic() - started < 3  # refused, never hung

        private_nats.start()  # same port, same store directory
        eventually(lambda: answers(queue), within=15, what="the queue reconnects")

        seen: set[str] = set()
        # nats-server 2.9 makes acknowledgements (the deletes of a work-queue
        # stream) durable a few seconds late, so a job finished just before the
        # kill may run again: at least once, never lost.
        must = {j.id for j in jobs} - {finished.job.id}

        def drained() -> bool:
            for delivery in queue.receive(max_jobs=10, lease_seconds=1.0):
                seen.add(delivery.job.id)
                queue.ack(delivery)
            return must <= seen

        eventually(drained, within=15, what="every acknowledged job is delivered")
        assert held.job.id in seen  # its lease died with the server
        # Nothing else: the refused enqueue may only appear if the server had
        # stored it after all.
        assert seen - must <= {finished.job.id, job(99).id}
        assert queue.pending_count() == 0
    finally:
        queue.close()
