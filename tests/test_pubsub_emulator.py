"""The Pub/Sub emulator launcher: the real client talks to it, and stop stops it."""

from __future__ import annotations

import pytest
from tests.conftest import missing

from kidp.pubsub_emulator import find_launcher, start_pubsub_emulator

pytestmark = pytest.mark.pubsub


def test_the_client_publishes_and_pulls_through_the_emulator_and_stop_ends_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if find_launcher() is None:
        missing("the Pub/Sub emulator is not installed")
    from google.cloud import pubsub_v1

    emulator = start_pubsub_emulator()
    try:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        topic = publisher.create_topic(name="projects/kidp-launcher/topics/jobs").name
        sub = subscriber.create_subscription(
            name="projects/kidp-launcher/subscriptions/jobs-worker", topic=topic
        ).name
        publisher.publish(topic, b"hello").result(timeout=10)
        pulled = subscriber.pull(subscription=sub, max_messages=1, timeout=10)
        assert [m.message.data for m in pulled.received_messages] == [b"hello"]
    finally:
        emulator.stop()
    assert emulator.process.poll() is not None
