"""PubSubJobQueue on the Cloud CLI's Pub/Sub emulator, through the real
``google-cloud-pubsub`` client; delays through the real ``google-cloud-tasks``
client (REST) against the Cloud Tasks stand-in, whose tasks publish into the
emulator.

Each test has a project of its own on one emulator. What a test asserts about
a topic it reads with a subscription of its own (``Topology.observe``), as an
operator would.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from tests.pubsub_support import (
    TASKS_SERVICE_ACCOUNT,
    Topology,
    cloudtasks,
    create_topology,
    eventually,
    topology,
)
from tests.queues.contract import QueueContract, job

from kidp.cloudtasks_emulator import CloudTasksEmulator
from kidp.errors import InvalidRequest, PermanentError, StoreUnavailable, ValidationFailed
from kidp.models import Job, JobKind
from kidp.ports import DeadJobQueue, Delivery
from kidp.queues.cloudtasks import PUBSUB_SCOPE, CloudTasksDelays
from kidp.queues.pubsub import (
    ATTR_ATTEMPTS_BEFORE,
    MAX_DELIVERIES_REASON,
    PubSubDelivery,
    PubSubJobQueue,
    parse_pubsub_url,
)

__all__ = ["cloudtasks", "topology"]  # fixtures, imported for pytest

pytestmark = pytest.mark.pubsub

#: The lease of the tests' own takes, short so redeliveries come quickly.
LEASE = 1.0
#: The contract's lease: longer than its delays and a take after them, so jobs
#: it leaves leased stay leased.
CONTRACT_LEASE = 2.5
#: How long the contract's takes keep asking: a delayed job travels from Cloud
#: Tasks through a REST publish into the emulator's JVM, slower on a busy machine.
CONTRACT_SETTLE = 0.5
#: How long ``take`` keeps asking before it concludes that nothing is due.
SETTLE = 0.3
SLACK = 0.05


def take(
    queue: PubSubJobQueue, max_jobs: int = 10, *, lease: float = LEASE, settle: float = SETTLE
) -> list[Delivery]:
    """Lease what is due, asking again for ``settle`` seconds while nothing is."""
    deadline = time.monotonic() + settle
    while True:
        got = queue.receive(max_jobs=max_jobs, lease_seconds=lease)
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(0.05)


@pytest.fixture
def open_queue(topology: Topology) -> Iterator[Callable[..., PubSubJobQueue]]:
    """Opens queues on the test's topology; closes them afterwards."""
    opened: list[PubSubJobQueue] = []

    def make(**options: Any) -> PubSubJobQueue:
        delays = CloudTasksDelays(
            topology.tasks_queue,
            service_account_email=TASKS_SERVICE_ACCOUNT,
            credentials=AnonymousCredentials(),
            endpoint=topology.tasks_endpoint,
        )
        settings: dict[str, Any] = {
            "subscription": topology.subscription,
            "dead_letter_topic": topology.dead_letter_topic,
            "dead_letter_subscription": topology.dead_letter_subscription,
            "delays": delays,
            "max_deliveries": 3,
            **options,
        }
        queue = PubSubJobQueue(topology.queue_url, **settings)
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        queue.close()


@pytest.fixture
def queue(open_queue: Callable[..., PubSubJobQueue]) -> PubSubJobQueue:
    return open_queue()


# ------------------------------------------------------------------ contract


class PubSubHarness:
    """The contract's harness on real time: waits sleep, takes poll briefly."""

    lease = CONTRACT_LEASE
    #: Delays go through Cloud Tasks: a task, a dispatch, a REST publish.
    tick = 1.4
    # "Not yet" is checked from tick - margin for about CONTRACT_SETTLE seconds,
    # which ends before the deadline.
    margin = 0.7
    step = 0.0

    def __init__(self, open_queue: Callable[..., PubSubJobQueue]) -> None:
        self._open = open_queue
        self.queue = open_queue()

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds + SLACK)

    def take(self, max_jobs: int = 10) -> list[Delivery]:
        return take(self.queue, max_jobs, lease=self.lease, settle=CONTRACT_SETTLE)

    def long_lease_queue(self) -> tuple[PubSubJobQueue, float]:
        return self._open(max_deliveries=10), 60.0


@pytest.fixture
def harness(open_queue: Callable[..., PubSubJobQueue]) -> PubSubHarness:
    return PubSubHarness(open_queue)


class TestPubSubJobQueueContract(QueueContract):
    """The shared JobQueue contract where Pub/Sub's semantics allow it.

    Left out, each because Pub/Sub works otherwise (and the broker does not
    rely on it: job tokens make extra copies drop themselves):

    * ``pending_count``: Pub/Sub's API does not count undelivered messages
      (Cloud Monitoring does), so the tests that read it cannot run:
      ``enqueue_receive_ack``, ``dead_letter_keeps_the_job_with_its_reason``
      (covered below by reading the dead-letter topic instead).
    * Order: without ordering keys Pub/Sub does not order messages
      (``receive_takes_jobs_in_order_up_to_max``, and
      ``max_deliveries_moves_the_job_to_dead``, which takes one job at a time
      and expects the poison job before the healthy one; the limit itself is
      checked below with one job).
    * Deduplication by job id: a publish is a new message whatever its data
      (``enqueue_is_idempotent_by_job_id``,
      ``enqueue_while_leased_runs_the_job_again_after_ack``).
    * A stale receipt from another worker: Pub/Sub accepts or ignores an old
      ack id without saying which, so only a receipt this queue object
      settled itself is recognised
      (``expired_lease_is_redelivered_and_the_stale_receipt_is_ignored``).
    """

    test_enqueue_receive_ack = None  # type: ignore[assignment]
    test_dead_letter_keeps_the_job_with_its_reason = None  # type: ignore[assignment]
    test_receive_takes_jobs_in_order_up_to_max = None  # type: ignore[assignment]
    test_enqueue_is_idempotent_by_job_id = None  # type: ignore[assignment]
    test_enqueue_while_leased_runs_the_job_again_after_ack = None  # type: ignore[assignment]
    test_expired_lease_is_redelivered_and_the_stale_receipt_is_ignored = None  # type: ignore[assignment]
    test_max_deliveries_moves_the_job_to_dead = None  # type: ignore[assignment]


# ------------------------------------------------------------------- publishing


def test_a_job_is_one_message_whose_data_is_the_job(
    queue: PubSubJobQueue, topology: Topology
) -> None:
    observer = topology.observe()
    sent = job(7, JobKind.POLL)
    queue.enqueue(sent)
    (message,) = observer.messages(wait=2)
    assert Job.from_json(message.data) == sent
    assert dict(message.attributes) == {
        "kidp-job-kind": "poll",
        "kidp-deployment-id": sent.deployment_id,
        "kidp-job-id": sent.id,
    }


def test_a_delayed_job_is_a_cloud_tasks_task_that_publishes_it_when_due(
    queue: PubSubJobQueue, topology: Topology, cloudtasks: CloudTasksEmulator
) -> None:
    observer = topology.observe()
    before = time.time()
    queue.enqueue(job(1), delay=1.5)

    (task,) = cloudtasks.pending(topology.tasks_queue)
    http = task["httpRequest"]
    assert http["url"] == f"https://pubsub.googleapis.com/v1/{topology.topic}:publish"
    assert http["oauthToken"] == {
        "serviceAccountEmail": TASKS_SERVICE_ACCOUNT,
        "scope": PUBSUB_SCOPE,
    }
    due = time.mktime(time.strptime(task["scheduleTime"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert before + 0.5 < due <= before + 2.6
    assert observer.messages() == []  # nothing published yet

    (message,) = observer.messages(wait=4)
    assert time.time() >= before + 1.5
    assert Job.from_json(message.data) == job(1)
    assert cloudtasks.pending(topology.tasks_queue) == []


def test_the_same_schedule_sent_twice_is_one_task(
    topology: Topology, cloudtasks: CloudTasksEmulator
) -> None:
    delays = CloudTasksDelays(
        topology.tasks_queue, credentials=AnonymousCredentials(), endpoint=topology.tasks_endpoint
    )
    due = time.time() + 30
    first = delays.publish_later(topology.topic, b"{}", {}, due=due, key="job-a")
    again = delays.publish_later(topology.topic, b"{}", {}, due=due, key="job-a")
    other = delays.publish_later(topology.topic, b"{}", {}, due=due + 1, key="job-a")
    assert first == again != other
    assert len(cloudtasks.pending(topology.tasks_queue)) == 2
    body = json.loads(
        base64.b64decode(
            next(
                t
                for t in cloudtasks.tasks.values()
                if t.name == first  # the stand-in keeps the body the list hides
            ).request["body"]
        )
    )
    assert body == {"messages": [{"data": base64.b64encode(b"{}").decode(), "attributes": {}}]}


# -------------------------------------------------------------------- attempts


def test_a_retry_is_a_delayed_copy_that_counts_the_earlier_deliveries(
    queue: PubSubJobQueue, topology: Topology
) -> None:
    queue.enqueue(job(1))
    (first,) = take(queue)
    assert first.attempt == 1
    queue.retry(first, delay=0.5)
    queue.retry(first, delay=0)  # settled already: ignored
    assert take(queue) == []

    time.sleep(0.5)
    (second,) = take(queue, settle=2.0)
    assert (second.job, second.attempt) == (job(1), 2)
    assert isinstance(second, PubSubDelivery)
    assert second.attributes[ATTR_ATTEMPTS_BEFORE] == "1"

    # A worker that dies: Pub/Sub counts that delivery itself.
    time.sleep(LEASE + SLACK)
    (third,) = take(queue)
    assert (third.job, third.attempt) == (job(1), 3)
    queue.ack(third)
    assert take(queue) == []


def test_a_pushed_message_counts_its_copies_and_pubsubs_delivery_attempt(
    queue: PubSubJobQueue,
) -> None:
    data = job(3).to_json().encode()
    first = queue.delivery_from_push(data, {}, message_id="m1", delivery_attempt=None)
    assert (first.job, first.attempt, first.receipt) == (job(3), 1, "")
    copy = queue.delivery_from_push(
        data, {ATTR_ATTEMPTS_BEFORE: "4"}, message_id="m2", delivery_attempt=2
    )
    assert copy.attempt == 6
    stranger = queue.delivery_from_push(
        data, {ATTR_ATTEMPTS_BEFORE: "many"}, message_id="m3", delivery_attempt=1
    )
    assert stranger.attempt == 1
    with pytest.raises(InvalidRequest, match="m4 is not a broker job"):
        queue.delivery_from_push(b"{not json", {}, message_id="m4", delivery_attempt=1)


# ----------------------------------------------------------------- dead letters


def test_dead_letter_publishes_the_job_with_its_reason_and_acknowledges(
    queue: PubSubJobQueue, topology: Topology
) -> None:
    dead = topology.observe(topology.dead_letter_topic)
    queue.enqueue(job(1))
    (delivery,) = take(queue)
    queue.dead_letter(delivery, reason="bad payload")

    (message,) = dead.messages(wait=2)
    assert Job.from_json(message.data) == job(1)
    attributes = dict(message.attributes)
    assert attributes["kidp-reason"] == "bad payload"
    assert attributes["kidp-attempts"] == "1"
    assert attributes["kidp-source"] == topology.topic
    assert attributes["kidp-job-id"] == job(1).id
    time.sleep(LEASE + SLACK)
    assert take(queue) == []  # acknowledged: not delivered again


def test_a_long_reason_is_cut_to_the_1024_bytes_an_attribute_holds_not_1024_characters(
    queue: PubSubJobQueue, topology: Topology
) -> None:
    dead = topology.observe(topology.dead_letter_topic)
    queue.enqueue(job(1))
    (delivery,) = take(queue)
    # Two bytes a character in UTF-8: 1000 characters would be 2000 bytes.
    reason = "Fehlermeldung: ungültige Größe " + "é" * 1000
    queue.dead_letter(delivery, reason=reason)

    (message,) = dead.messages(wait=2)
    cut = dict(message.attributes)["kidp-reason"]
    assert len(cut.encode()) <= 1024
    assert len(cut.encode()) >= 1023  # cut at a character's edge, no more
    assert reason.startswith(cut)


def test_a_message_that_is_not_a_job_is_dead_lettered_at_once(
    queue: PubSubJobQueue, topology: Topology
) -> None:
    from google.cloud import pubsub_v1

    pubsub_v1.PublisherClient().publish(topology.topic, b"{not a job", source="elsewhere").result()
    queue.enqueue(job(2))
    assert [d.job for d in take(queue)] == [job(2)]
    ((dead, reason),) = [(m.data, m.reason) for m in queue.dead_messages() if m.job is None]
    assert dead == b"{not a job"
    assert "is not a broker job" in reason
    assert queue.dead_jobs() == []  # no job to replay


def test_dead_jobs_are_listed_oldest_first_without_being_consumed(
    queue: PubSubJobQueue,
) -> None:
    for n in (1, 2, 3):
        queue.enqueue(job(n))
        (delivery,) = take(queue)
        queue.dead_letter(delivery, reason=f"reason {n}")
    expected = [(job(n), f"reason {n}") for n in (1, 2, 3)]
    assert queue.dead_jobs() == expected
    assert queue.dead_jobs() == expected  # listing consumed nothing

    assert queue.replay_dead(job(2).id) == job(2)
    assert queue.dead_jobs() == [expected[0], expected[2]]
    (again,) = take(queue)
    assert (again.job, again.attempt) == (job(2), 1)


def test_the_subscriptions_own_dead_letter_policy_is_the_backstop(
    open_queue: Callable[..., PubSubJobQueue],
) -> None:
    # The queue would allow more deliveries than the subscription's policy (5):
    # every one of them killed the worker, so Pub/Sub moves the message itself.
    queue = open_queue(max_deliveries=10)
    queue.enqueue(job(9))
    for attempt in range(1, 6):
        (delivery,) = take(queue)
        assert delivery.attempt == attempt
        time.sleep(LEASE + SLACK)
    assert take(queue) == []
    dead: list[Any] = []
    eventually(lambda: bool(dead.extend(queue.dead_messages()) or dead), within=5, what="moved")
    (moved,) = dead
    assert moved.job == job(9)
    assert moved.reason == "moved by the subscription's dead-letter policy"
    assert moved.attempts == 5
    assert isinstance(queue, DeadJobQueue)


def test_a_job_over_max_deliveries_is_dead_lettered_with_the_reason(
    queue: PubSubJobQueue,
) -> None:
    queue.enqueue(job(1))
    for attempt in (1, 2, 3):
        (delivery,) = take(queue)
        assert delivery.attempt == attempt
        time.sleep(LEASE + SLACK)  # the worker crashes every time
    # The fourth delivery would exceed max_deliveries=3: dead instead.
    assert take(queue) == []
    assert queue.dead_jobs() == [(job(1), MAX_DELIVERIES_REASON)]


# ----------------------------------------------------------------------- errors


def test_queue_urls() -> None:
    assert parse_pubsub_url("pubsub://my-project/kidp-jobs") == ("my-project", "kidp-jobs")
    for bad in ("pubsub:///jobs", "pubsub://p/", "pubsub://p/a/b", "nats://p/jobs"):
        with pytest.raises(ValidationFailed, match="pubsub://<project>/<topic>"):
            parse_pubsub_url(bad)


def test_names_default_to_the_topic_and_accept_full_paths() -> None:
    queue = PubSubJobQueue("pubsub://proj/jobs", subscription="jobs-worker")
    assert queue.topic == "projects/proj/topics/jobs"
    assert queue.subscription == "projects/proj/subscriptions/jobs-worker"
    assert queue.dead_letter_topic == "projects/proj/topics/jobs-dead"
    assert queue.dead_letter_subscription == "projects/proj/subscriptions/jobs-dead"
    other = PubSubJobQueue("pubsub://proj/jobs", dead_letter_topic="projects/ops/topics/graveyard")
    assert other.dead_letter_topic == "projects/ops/topics/graveyard"
    assert other.subscription is None
    with pytest.raises(ValidationFailed, match="KIDP_GCP_PUBSUB_SUBSCRIPTION"):
        other.receive(max_jobs=1, lease_seconds=10)


def test_a_delay_without_cloud_tasks_is_refused(
    open_queue: Callable[..., PubSubJobQueue],
) -> None:
    queue = open_queue(delays=None)
    with pytest.raises(PermanentError, match="KIDP_GCP_TASKS_QUEUE"):
        queue.enqueue(job(1), delay=5)
    queue.enqueue(job(1))  # no delay: no Cloud Tasks needed


def test_cloud_tasks_refusing_is_temporary_and_names_the_service(
    queue: PubSubJobQueue, cloudtasks: CloudTasksEmulator
) -> None:
    cloudtasks.faults.append(503)
    with pytest.raises(StoreUnavailable) as caught:
        queue.enqueue(job(1), delay=5)
    assert caught.value.message == "Cloud Tasks create_task: HTTP 503 ServiceUnavailable"


def test_a_missing_topic_is_permanent_and_check_reports_it(
    pubsub: str, gcp_project: str, cloudtasks: CloudTasksEmulator
) -> None:
    queue = PubSubJobQueue(f"pubsub://{gcp_project}/nowhere")
    try:
        with pytest.raises(PermanentError, match="Pub/Sub publish: HTTP 404"):
            queue.enqueue(job(1))
        with pytest.raises(StoreUnavailable, match="get_topic: HTTP 404"):
            queue.check()
    finally:
        queue.close()


def test_an_unreachable_emulator_is_a_temporary_error(
    monkeypatch: pytest.MonkeyPatch, gcp_project: str
) -> None:
    from kidp.emulator import free_port

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    queue = PubSubJobQueue(f"pubsub://{gcp_project}/jobs", timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable):
            queue.check()
    finally:
        queue.close()


def test_check_covers_the_topic_and_the_delay_queue(
    open_queue: Callable[..., PubSubJobQueue], topology: Topology
) -> None:
    open_queue().check()
    broken = open_queue(
        delays=CloudTasksDelays(
            topology.tasks_queue.replace("kidp-delays", "missing"),
            credentials=AnonymousCredentials(),
            endpoint=topology.tasks_endpoint,
        )
    )
    with pytest.raises(StoreUnavailable, match="Cloud Tasks get_queue: HTTP 404"):
        broken.check()


def test_a_second_topology_in_another_project_is_separate(
    queue: PubSubJobQueue, cloudtasks: CloudTasksEmulator, pubsub: str
) -> None:
    other = create_topology("kidp-test-elsewhere-" + str(time.monotonic_ns())[-8:], cloudtasks)
    queue.enqueue(job(1))
    stranger = PubSubJobQueue(other.queue_url, subscription=other.subscription)
    try:
        assert take(stranger) == []
    finally:
        stranger.close()
    assert [d.job for d in take(queue)] == [job(1)]
