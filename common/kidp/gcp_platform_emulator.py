"""The GCP data plane on loopback: what ``infra/gcp`` creates for the job
queue and the secrets, for the emulated GCP broker and the tests.

:func:`start_gcp_platform` starts the Cloud CLI's Pub/Sub emulator (or uses
one already running), the Cloud Tasks and Secret Manager stand-ins, declares
the job topic with its pull subscription, dead-letter policy, dead-letter
topic and subscription, and the delay queue, and returns the
:class:`~kidp.emulator.EmulatedCloud` settings that point the broker's real
clients at them. The GCP emulator starter (``kidp.emulator.EMULATORS["gcp"]``)
composes it with the stand-in for Google's admin APIs that the GCP provider
talks to. The store stays the embedded SQLite: the Cloud SQL stand-in
(:mod:`kidp.cloudsql_emulator`) needs a PostgreSQL to stand in front of.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kidp.emulator import EmulatedCloud

__all__ = ["JobQueueTopology", "declare_job_queue", "start_gcp_platform"]


@dataclass(frozen=True)
class JobQueueTopology:
    """The names of what :func:`declare_job_queue` created."""

    project: str
    topic: str
    subscription: str
    dead_letter_topic: str
    dead_letter_subscription: str

    @property
    def queue_url(self) -> str:
        return f"pubsub://{self.project}/{self.topic.rsplit('/', 1)[1]}"


def declare_job_queue(
    project: str,
    *,
    topic: str = "kidp-jobs",
    max_deliveries: int = 10,
    push_endpoint: str | None = None,
    ack_deadline_seconds: int = 60,
) -> JobQueueTopology:
    """Create the job topic, its subscription (pull, or push to
    ``push_endpoint``) whose dead-letter policy moves a message after
    ``max_deliveries`` deliveries, the dead-letter topic and its subscription:
    what ``infra/gcp/pubsub.tf`` declares. Uses ``PUBSUB_EMULATOR_HOST``."""
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    try:
        topic_path = publisher.create_topic(name=f"projects/{project}/topics/{topic}").name
        dead = publisher.create_topic(name=f"projects/{project}/topics/{topic}-dead").name
        dead_subscription = subscriber.create_subscription(
            name=f"projects/{project}/subscriptions/{topic}-dead", topic=dead
        ).name
        request: dict[str, Any] = {
            "name": f"projects/{project}/subscriptions/{topic}-worker",
            "topic": topic_path,
            "ack_deadline_seconds": ack_deadline_seconds,
            "dead_letter_policy": {
                "dead_letter_topic": dead,
                "max_delivery_attempts": max_deliveries,
            },
        }
        if push_endpoint:
            request["push_config"] = {"push_endpoint": push_endpoint}
        subscription = subscriber.create_subscription(request=request).name
    finally:
        publisher.stop()
        subscriber.close()
    return JobQueueTopology(
        project=project,
        topic=str(topic_path),
        subscription=str(subscription),
        dead_letter_topic=str(dead),
        dead_letter_subscription=str(dead_subscription),
    )


def start_gcp_platform(
    state_dir: Path,
    *,
    project: str = "kidp-emulated",
    region: str = "us-central1",
    max_deliveries: int = 10,
    pubsub_host: str | None = None,
) -> EmulatedCloud:
    """Start the GCP data plane on loopback (see the module docstring); with
    ``pubsub_host``, use that running Pub/Sub emulator instead of starting one.
    Sets ``PUBSUB_EMULATOR_HOST`` in this process, as the broker needs it."""
    from kidp.cloudtasks_emulator import start_cloudtasks_emulator
    from kidp.pubsub_emulator import start_pubsub_emulator
    from kidp.secretmanager_emulator import start_secretmanager_emulator

    stops: list[Any] = []

    def stop() -> None:
        for step in reversed(stops):
            step()
        stops.clear()

    try:
        if pubsub_host is None:
            state_dir.mkdir(parents=True, exist_ok=True)
            emulator = start_pubsub_emulator(log_file=state_dir / "pubsub-emulator.log")
            stops.append(emulator.stop)
            pubsub_host = emulator.host
        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub_host
        topology = declare_job_queue(project, max_deliveries=max_deliveries)
        tasks_queue = f"projects/{project}/locations/{region}/queues/kidp-delays"
        tasks = start_cloudtasks_emulator(
            queues=[tasks_queue], routes={"pubsub.googleapis.com": f"http://{pubsub_host}"}
        )
        stops.append(tasks.stop)
        secrets = start_secretmanager_emulator()
        stops.append(secrets.stop)
    except BaseException:
        stop()
        raise
    return EmulatedCloud(
        provider="gcp",
        settings={
            "cloud": "gcp",
            "region": region,
            "gcp_project": project,
            "queue_url": topology.queue_url,
            "gcp_pubsub_subscription": topology.subscription,
            "gcp_dead_letter_topic": topology.dead_letter_topic,
            "gcp_dead_letter_subscription": topology.dead_letter_subscription,
            "gcp_tasks_queue": tasks_queue,
            "gcp_tasks_endpoint": tasks.url,
            "secret_store": "gcp",
            "gcp_secretmanager_endpoint": secrets.url,
            "job_max_deliveries": max_deliveries,
        },
        environ={"PUBSUB_EMULATOR_HOST": pubsub_host},
        stop=stop,
    )
