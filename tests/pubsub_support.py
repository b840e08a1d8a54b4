"""Fixtures the GCP tests share: the job queue's Pub/Sub topology on the
emulator, the Cloud Tasks stand-in that publishes delayed jobs into it, and
helpers that read topics the way an operator would.

Test modules import the fixtures they use (``from tests.pubsub_support import
...``); each test works in a project of its own (``gcp_project``), so one
emulator and one Cloud Tasks stand-in serve the whole session.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kidp.cloudtasks_emulator import CloudTasksEmulator, start_cloudtasks_emulator

LOCATION = "us-central1"
TOPIC = "kidp-jobs"
TASKS_SERVICE_ACCOUNT = "kidp-tasks@kidp-test.iam.gserviceaccount.com"


@pytest.fixture(scope="session")
def cloudtasks(pubsub_emulator_host: str) -> Iterator[CloudTasksEmulator]:
    """The Cloud Tasks stand-in; tasks that call Pub/Sub's REST API reach the emulator."""
    emulator = start_cloudtasks_emulator(
        routes={"pubsub.googleapis.com": f"http://{pubsub_emulator_host}"}, retry_seconds=0.2
    )
    yield emulator
    emulator.stop()


@dataclass
class Topology:
    """What ``infra/gcp`` creates for the job queue, in one test's project."""

    project: str
    topic: str
    subscription: str
    dead_letter_topic: str
    dead_letter_subscription: str
    tasks_queue: str
    tasks_endpoint: str

    @property
    def queue_url(self) -> str:
        return f"pubsub://{self.project}/{self.topic.rsplit('/', 1)[1]}"

    def observe(self, topic: str | None = None) -> Observer:
        """A subscription of the test's own on ``topic`` (default: the job topic)
        that sees everything published from now on."""
        from google.cloud import pubsub_v1

        subscriber = pubsub_v1.SubscriberClient()
        name = f"projects/{self.project}/subscriptions/observer-{time.monotonic_ns()}"
        subscriber.create_subscription(name=name, topic=topic or self.topic)
        return Observer(subscriber, name)


@dataclass
class Observer:
    """Reads a subscription and acknowledges what it read."""

    subscriber: Any
    name: str

    def messages(self, *, wait: float = 0.0) -> list[Any]:
        """Every message available now (or within ``wait`` seconds), acknowledged."""
        deadline = time.monotonic() + wait
        found: list[Any] = []
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                response = self.subscriber.pull(
                    subscription=self.name, max_messages=100, return_immediately=True
                )
            if response.received_messages:
                found.extend(r.message for r in response.received_messages)
                self.subscriber.acknowledge(
                    subscription=self.name, ack_ids=[r.ack_id for r in response.received_messages]
                )
                continue
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)


def create_topology(
    project: str,
    cloudtasks: CloudTasksEmulator,
    *,
    dead_letter_after: int = 5,
    push_endpoint: str | None = None,
) -> Topology:
    """What ``infra/gcp`` declares for the job queue (through
    :func:`kidp.gcp_platform_emulator.declare_job_queue`), whose dead-letter
    policy moves a message after ``dead_letter_after`` deliveries, plus the
    Cloud Tasks queue."""
    from kidp.gcp_platform_emulator import declare_job_queue

    declared = declare_job_queue(
        project,
        topic=TOPIC,
        max_deliveries=dead_letter_after,
        push_endpoint=push_endpoint,
        ack_deadline_seconds=30,
    )
    tasks_queue = f"projects/{project}/locations/{LOCATION}/queues/kidp-delays"
    cloudtasks.add_queue(tasks_queue)
    return Topology(
        project=project,
        topic=declared.topic,
        subscription=declared.subscription,
        dead_letter_topic=declared.dead_letter_topic,
        dead_letter_subscription=declared.dead_letter_subscription,
        tasks_queue=tasks_queue,
        tasks_endpoint=cloudtasks.url,
    )


@pytest.fixture
def topology(pubsub: str, gcp_project: str, cloudtasks: CloudTasksEmulator) -> Topology:
    """The job queue's topology in this test's project."""
    return create_topology(gcp_project, cloudtasks)


def eventually(condition: Callable[[], bool], *, within: float, what: str) -> None:
    """Wait up to ``within`` seconds for ``condition``."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.05)
