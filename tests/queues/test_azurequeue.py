"""AzureStorageJobQueue against Azurite, through the real azure-storage-queue client.

The shared pull-queue contract (``contract.py``) runs here on real time, on a
queue of each test's own; assertions about what the queues hold read them with
a client of the test's own, as an operator would. One contract test does not
apply: Storage Queues do not deduplicate, so enqueueing a waiting job's id
again makes a second message (the service's job tokens drop the extra copy,
as on SQS).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.storage.queue import QueueClient
from tests.conftest import azure_name
from tests.queues.contract import QueueContract, job

from kidp.emulator import free_port
from kidp.errors import InvalidRequest, StoreUnavailable, ValidationFailed
from kidp.models import Job, JobKind
from kidp.ports import DeadJobQueue, Delivery
from kidp.queues.azurequeue import (
    HOST_MOVED_REASON,
    MAX_DELIVERIES_REASON,
    MAX_VISIBILITY_SECONDS,
    AzureDelivery,
    AzureStorageJobQueue,
    decode,
    encode,
)

pytestmark = pytest.mark.azurite

LEASE = 2.0
#: How long ``take`` keeps asking before it concludes that nothing is due.
SETTLE = 0.3
#: Added to every wait, so an emulator timer a hair late cannot decide a test.
SLACK = 0.1


@pytest.fixture
def open_queue(azurite: Any) -> Iterator[Callable[..., AzureStorageJobQueue]]:
    """Opens queues on fresh Azurite queues (with their poison queues)."""
    opened: list[AzureStorageJobQueue] = []

    def make(name: str | None = None, **options: Any) -> AzureStorageJobQueue:
        queue = AzureStorageJobQueue.from_url(
            f"azurequeue://devstoreaccount1/{name or azure_name('q')}",
            connection_string=azurite.connection_string,
            **{"max_deliveries": 3, **options},
        )
        queue.create_queues()
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        queue.close()


def take(
    queue: AzureStorageJobQueue,
    max_jobs: int = 10,
    *,
    lease: float = LEASE,
    patience: float = SETTLE,
) -> list[Delivery]:
    """Lease what is due, asking again for ``patience`` seconds while nothing is."""
    deadline = time.monotonic() + patience
    while True:
        got = queue.receive(max_jobs=max_jobs, lease_seconds=lease)
        if got or time.monotonic() >= deadline:
            return got


class AzureHarness:
    """The contract's harness on real time: waits sleep, takes poll briefly.
    Visibility timeouts are whole seconds."""

    lease = LEASE
    tick = 1.0
    margin = 0.5
    step = 0.0

    def __init__(self, open_queue: Callable[..., AzureStorageJobQueue]) -> None:
        self._open = open_queue
        self.queue = open_queue()

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds + SLACK)

    def take(self, max_jobs: int = 10) -> list[Delivery]:
        return take(self.queue, max_jobs)

    def long_lease_queue(self) -> tuple[AzureStorageJobQueue, float]:
        return self._open(max_deliveries=10), 60.0


@pytest.fixture
def harness(open_queue: Callable[..., AzureStorageJobQueue]) -> AzureHarness:
    return AzureHarness(open_queue)


class TestAzureStorageJobQueueContract(QueueContract):
    """The shared JobQueue contract on Azure Storage Queues (Azurite)."""

    def test_enqueue_is_idempotent_by_job_id(self, harness: Any) -> None:
        # Storage Queues do not deduplicate (nor does SQS): a second enqueue of
        # one job is a second message, and the service's job tokens make the
        # extra copy drop itself. What must hold is that both copies are the
        # same job, each delivered once.
        queue = harness.queue
        j = job()
        queue.enqueue(j)
        queue.enqueue(j)
        first = harness.take()
        second = first[1:] or harness.take()
        assert [d.job for d in first[:1] + second[:1]] == [j, j]
        for delivery in first[:1] + second[:1]:
            queue.ack(delivery)
        assert harness.take() == []

    def test_max_deliveries_moves_the_job_to_dead(self, harness: Any) -> None:
        # The contract's version puts a healthy job behind the poison one from
        # the start; a Storage Queue hands out messages in the order they
        # become visible, so that job (visible all along) would come before
        # each redelivery. Here it arrives after the poison job's last lease.
        queue = harness.queue
        queue.enqueue(job(1))
        for attempt in (1, 2, 3):
            [delivery] = harness.take(max_jobs=1)
            assert (delivery.job, delivery.attempt) == (job(1), attempt)
            harness.advance(harness.lease)  # the worker crashes every time
        queue.enqueue(job(2))
        [delivery] = harness.take(max_jobs=1)
        assert delivery.job == job(2)
        assert queue.dead_jobs() == [(job(1), MAX_DELIVERIES_REASON)]


def raw(azurite: Any, name: str) -> QueueClient:
    """A client of the test's own that sees message bodies as stored (base64)."""
    return QueueClient.from_connection_string(azurite.connection_string, name)


# ------------------------------------------------------------------ messages


def test_bodies_are_base64_job_json_that_never_expires(
    open_queue: Callable[..., AzureStorageJobQueue], azurite: Any
) -> None:
    queue = open_queue()
    sent = job(7, JobKind.CALLBACK).model_copy(update={"event_id": "msg_1", "seq": 3})
    queue.enqueue(sent)
    [message] = raw(azurite, queue.name).peek_messages()
    # What the Functions host decodes before it calls the queue trigger.
    text = base64.b64decode(message.content).decode()
    assert Job.from_json(text) == sent
    assert json.loads(text) == sent.model_dump(mode="json")  # no bookkeeping yet
    assert message.expires_on is not None and message.expires_on.year == 9999
    assert isinstance(queue, DeadJobQueue)


def test_bookkeeping_rides_along_with_the_job() -> None:
    body = encode(job(1), runs=4, not_before=1234.5, reason="r" * 5000, attempts=9, dead_at="t")
    decoded, meta = decode(body)
    assert decoded == job(1)
    assert meta == {
        "runs": 4,
        "notBefore": 1234.5,
        "reason": "r" * 1000,
        "attempts": 9,
        "deadAt": "t",
    }
    for bad in ("not json", "[1, 2]", '{"kind": "nonsense"}'):
        with pytest.raises(InvalidRequest):
            decode(bad)


def test_a_message_that_is_no_job_is_buried_not_delivered(
    open_queue: Callable[..., AzureStorageJobQueue], azurite: Any
) -> None:
    queue = open_queue()
    raw(azurite, queue.name).send_message(base64.b64encode(b"hello").decode())
    queue.enqueue(job(1))
    assert [d.job for d in take(queue)] == [job(1)]
    [dead] = queue.dead_messages()
    assert (dead.job, dead.body) == (None, "hello")
    assert dead.reason == "the queue message is not a broker job (not a JSON object)"
    assert queue.dead_jobs() == []


def test_a_requeued_retry_counts_on_from_the_delivery_it_replaces(
    open_queue: Callable[..., AzureStorageJobQueue],
) -> None:
    queue = open_queue(max_deliveries=5)
    queue.enqueue(job(1))
    [first] = take(queue)
    queue.requeue(first, delay=1)
    queue.ack(first)  # what the Functions host does when the function returns
    assert take(queue) == []
    [second] = take(queue, patience=3.0)
    assert (second.job, second.attempt) == (job(1), 2)
    assert isinstance(second, AzureDelivery) and second.runs == 1


def test_a_delay_over_seven_days_is_deferred_until_it_is_due(
    open_queue: Callable[..., AzureStorageJobQueue], azurite: Any
) -> None:
    now = [time.time()]
    queue = open_queue()
    queue._clock = lambda: now[0]
    queue.enqueue(job(1), delay=MAX_VISIBILITY_SECONDS + 3600)
    assert raw(azurite, queue.name).peek_messages() == []  # invisible for 7 days
    assert queue.pending_count() == 1
    # The copy arrives (here: one sent the way the early copy looks) an hour early.
    early = queue.delivery_from_message(
        encode(job(2), runs=2, not_before=now[0] + 1),
        message_id="m",
        pop_receipt="p",
        dequeue_count=1,
    )
    assert queue.defer(early, pulled=False)
    assert take(queue) == []
    now[0] += 2
    [due] = take(queue, patience=3.0)
    assert isinstance(due, AzureDelivery)
    assert (due.job, due.runs, due.attempt) == (job(2), 2, 3)
    assert not queue.defer(due)


# ------------------------------------------------------------------ the poison queue


def test_messages_the_host_moved_to_the_poison_queue_are_dead_jobs(
    open_queue: Callable[..., AzureStorageJobQueue], azurite: Any
) -> None:
    queue = open_queue()
    # The Functions host copies the body as it is after maxDequeueCount.
    raw(azurite, queue.poison_name).send_message(
        base64.b64encode(job(5).to_json().encode()).decode()
    )
    assert queue.dead_jobs() == [(job(5), HOST_MOVED_REASON)]
    assert queue.dead_jobs() == [(job(5), HOST_MOVED_REASON)]  # listing consumed nothing
    assert queue.replay_dead(job(5).id) == job(5)
    assert queue.dead_jobs() == []
    [again] = take(queue)
    assert (again.job, again.attempt) == (job(5), 1)


def test_buried_jobs_carry_reason_attempts_and_time(
    open_queue: Callable[..., AzureStorageJobQueue],
) -> None:
    queue = open_queue()
    queue.enqueue(job(1))
    for _ in range(3):
        [delivery] = take(queue, lease=1)
        time.sleep(1 + SLACK)
    assert take(queue) == []
    [dead] = queue.dead_messages()
    assert (dead.job, dead.reason, dead.attempts) == (job(1), MAX_DELIVERIES_REASON, 4)
    assert dead.dead_at is not None
    assert delivery.attempt == 3


# ------------------------------------------------------------------ errors


def test_a_missing_queue_is_unavailable(azurite: Any) -> None:
    queue = AzureStorageJobQueue.from_url(
        f"azurequeue://devstoreaccount1/{azure_name('missing')}",
        connection_string=azurite.connection_string,
    )
    with pytest.raises(StoreUnavailable) as raised:
        queue.check()
    assert "QueueNotFound" in raised.value.message
    with pytest.raises(StoreUnavailable):
        queue.enqueue(job(1))


def test_an_unreachable_account_is_unavailable_and_the_key_is_never_shown(azurite: Any) -> None:
    string = azurite.connection_string.replace(
        azurite.queue_endpoint, f"http://127.0.0.1:{free_port()}/devstoreaccount1"
    )
    queue = AzureStorageJobQueue(
        QueueClient.from_connection_string(string, "jobs", retry_total=0),
        QueueClient.from_connection_string(string, "jobs-poison", retry_total=0),
    )
    with pytest.raises(StoreUnavailable) as raised:
        queue.enqueue(job(1))
    assert azurite.account_key not in str(raised.value)
    assert raised.value.__cause__ is None
    assert azurite.account_key not in repr(queue)


def test_queue_urls() -> None:
    for bad in (
        "azurequeue://devstoreaccount1",
        "azurequeue://devstoreaccount1/Jobs",
        "azurequeue://devstoreaccount1/a--b",
        "azurequeue://devstoreaccount1/" + "q" * 57,  # no room for "-poison"
    ):
        with pytest.raises(ValidationFailed):
            AzureStorageJobQueue.from_url(bad, connection_string="UseDevelopmentStorage=true")


def test_azurite_gives_an_emulated_broker_its_store_and_queue(azurite: Any) -> None:
    from kidp.bootstrap import build_queue, build_store
    from kidp.settings import Settings
    from kidp.stores.azuretable import TableDeploymentStore

    values = azurite.broker_settings(table=azure_name("t"), queue=azure_name("q"))
    settings = Settings(**values)
    assert "AccountKey" not in repr(settings)  # the connection string is a secret
    store = build_store(settings)
    queue = build_queue(settings, store)
    assert isinstance(store, TableDeploymentStore) and isinstance(queue, AzureStorageJobQueue)
    store.check()
    queue.check()
    queue.enqueue(job(1))
    assert [d.job for d in take(queue)] == [job(1)]
    store.close()
    queue.close()
