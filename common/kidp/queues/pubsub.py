"""The job queue on Google Cloud Pub/Sub, with its dead-letter topic.

``KIDP_QUEUE_URL=pubsub://<project>/<topic>``. One message is one job: the
data is the :class:`~kidp.models.Job`'s JSON; attributes repeat its kind,
deployment id and job id for whoever reads the topic, and
``kidp-attempts-before`` counts the deliveries an earlier copy of the job
already had (see retries below).

Two ways to consume it, the same topic either way:

* **Push** (Cloud Functions): the subscription pushes each message to the
  jobs function (:mod:`kidp.edges.gcp`), which parses it with
  :meth:`PubSubJobQueue.delivery_from_push` and settles it by answering:
  2xx acknowledges. Nothing here pulls.
* **Pull** (a long-running worker, the emulated broker): ``receive`` pulls
  from ``subscription`` and leases what it got for ``lease_seconds`` by
  moving the messages' ack deadline; ``ack`` acknowledges.

Delays: Pub/Sub has none per message, so ``enqueue(job, delay>0)`` hands the
publish to Cloud Tasks (:class:`~kidp.queues.cloudtasks.CloudTasksDelays`),
which publishes the job when it is due; nothing sleeps.

Retries: ``retry(delivery, delay)`` publishes a copy of the job, due after
``delay``, carrying ``kidp-attempts-before = delivery.attempt``, and
acknowledges the delivery. A delivery's attempt is that count plus Pub/Sub's
``deliveryAttempt`` for the message (1 on a subscription without a
dead-letter policy, where Pub/Sub does not count). The copy honours the
core's delay (1, 2, 4 s backoff; a throttle's retry-after), which a nack
cannot: Pub/Sub's backoff is per subscription and starts at 10 s. Deliveries
the worker never answered (it was killed) are counted by Pub/Sub itself.

Dead letters live on the dead-letter topic. :meth:`dead_letter` publishes
the job there with ``kidp-reason``, ``kidp-attempts``, ``kidp-dead-at`` and
``kidp-source`` attributes; the subscription's dead-letter policy (max
delivery attempts = ``KIDP_JOB_MAX_DELIVERIES``) is the backstop that moves
a message whose every delivery killed the worker, with Pub/Sub's own
``CloudPubSubDeadLetterSource*`` attributes. ``dead_jobs`` and
``replay_dead`` read the dead-letter topic through its own subscription,
holding messages briefly and releasing them: listing consumes nothing.

Delivery is at least once and publishing does not deduplicate: the service's
job tokens and callback sequence numbers make every extra copy drop itself
(see :mod:`kidp.service`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol
from urllib.parse import urlparse

from pydantic import ValidationError

from kidp.errors import InvalidRequest, PermanentError, StoreUnavailable, ValidationFailed
from kidp.models import Job
from kidp.ports import Delivery
from kidp.providers.gcp.errors import CLIENT_ERRORS, broker_error

__all__ = [
    "ATTR_ATTEMPTS_BEFORE",
    "MAX_DELIVERIES_REASON",
    "DeadMessage",
    "Delays",
    "PubSubDelivery",
    "PubSubJobQueue",
    "parse_pubsub_url",
]

log = logging.getLogger(__name__)

#: The reason given to a job delivered more often than ``max_deliveries``.
MAX_DELIVERIES_REASON: Final = "max deliveries exceeded"
#: The longest ack deadline Pub/Sub accepts, so the longest lease.
MAX_ACK_DEADLINE_SECONDS: Final = 600

ATTR_KIND: Final = "kidp-job-kind"
ATTR_DEPLOYMENT: Final = "kidp-deployment-id"
ATTR_JOB_ID: Final = "kidp-job-id"
ATTR_ATTEMPTS_BEFORE: Final = "kidp-attempts-before"
ATTR_REASON: Final = "kidp-reason"
ATTR_ATTEMPTS: Final = "kidp-attempts"
ATTR_SOURCE: Final = "kidp-source"
ATTR_DEAD_AT: Final = "kidp-dead-at"
#: What Pub/Sub's dead-letter policy writes on a message it forwards.
ATTR_POLICY_COUNT: Final = "CloudPubSubDeadLetterSourceDeliveryCount"

#: Longer reasons are cut: an attribute value holds at most 1024 bytes (UTF-8).
_REASON_BYTES = 1024
#: How long ``dead_messages`` and ``replay_dead`` hold what they look at.
_PEEK_SECONDS = 30
#: Settled receipts remembered per queue object (to ignore a second verdict).
_SETTLED_MEMORY = 10_000


class Delays(Protocol):
    """What publishes a message later (:class:`~kidp.queues.cloudtasks.CloudTasksDelays`)."""

    def publish_later(
        self,
        topic: str,
        data: bytes,
        attributes: Mapping[str, str],
        *,
        due: float,
        key: str,
    ) -> str: ...

    def check(self) -> None: ...


def parse_pubsub_url(url: str) -> tuple[str, str]:
    """``pubsub://<project>/<topic>`` -> (project, topic)."""
    parsed = urlparse(url)
    topic = parsed.path.strip("/")
    if parsed.scheme != "pubsub" or not parsed.netloc or not topic or "/" in topic:
        raise ValidationFailed(f"a Pub/Sub queue URL is pubsub://<project>/<topic>, not {url!r}")
    return parsed.netloc, topic


def _path(project: str, kind: str, name: str) -> str:
    """``projects/<project>/<kind>/<name>``, or ``name`` when it is a full path already."""
    return name if name.startswith("projects/") else f"projects/{project}/{kind}/{name}"


@dataclass(frozen=True)
class PubSubDelivery(Delivery):
    """One delivery of a Pub/Sub message: ``receipt`` is the ack id of a pulled
    message, empty for a pushed one (the push is settled by the answer)."""

    message_id: str = ""
    data: bytes = b""
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeadMessage:
    """A message on the dead-letter topic, as ``dead_messages`` shows it."""

    message_id: str
    job: Job | None
    data: bytes
    reason: str
    attempts: int
    dead_at: str | None
    ack_id: str = field(default="", repr=False)


class PubSubJobQueue:
    """:class:`kidp.ports.JobQueue` and :class:`kidp.ports.DeadJobQueue` on Pub/Sub.

    ``queue_url`` is ``pubsub://<project>/<topic>``. ``subscription`` (a name
    or full path) is pulled by ``receive``; ``dead_letter_topic`` and
    ``dead_letter_subscription`` default to ``<topic>-dead``. ``delays``
    publishes delayed jobs (required for any delay). ``publisher`` and
    ``subscriber`` inject ``google.cloud.pubsub_v1`` clients; otherwise they
    are made with ``credentials`` (Application Default Credentials when None;
    ``PUBSUB_EMULATOR_HOST`` points them at the emulator). ``clock`` returns
    epoch seconds.
    """

    def __init__(
        self,
        queue_url: str,
        *,
        subscription: str | None = None,
        dead_letter_topic: str | None = None,
        dead_letter_subscription: str | None = None,
        delays: Delays | None = None,
        max_deliveries: int = 10,
        publisher: Any = None,
        subscriber: Any = None,
        credentials: Any = None,
        clock: Callable[[], float] = time.time,
        timeout: float = 30.0,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self.project, topic = parse_pubsub_url(queue_url)
        self.queue_url = queue_url
        self.topic = _path(self.project, "topics", topic)
        self.subscription = (
            _path(self.project, "subscriptions", subscription) if subscription else None
        )
        self.dead_letter_topic = _path(self.project, "topics", dead_letter_topic or f"{topic}-dead")
        self.dead_letter_subscription = _path(
            self.project, "subscriptions", dead_letter_subscription or f"{topic}-dead"
        )
        self.delays = delays
        self.max_deliveries = max_deliveries
        self._publisher = publisher
        self._subscriber = subscriber
        self._credentials = credentials
        self._clock = clock
        self._timeout = timeout
        self._lock = threading.Lock()
        self._settled: dict[str, None] = {}
        from google.api_core.retry import Retry, if_transient_error

        self._retry = Retry(predicate=if_transient_error, initial=0.1, maximum=2.0, timeout=timeout)
        self.name = topic

    def __repr__(self) -> str:
        return f"PubSubJobQueue({self.queue_url!r})"

    # ---------------------------------------------------------------- clients

    @property
    def publisher(self) -> Any:
        """The publisher client, created on first use."""
        if self._publisher is None:
            from google.cloud import pubsub_v1

            # One message per request: a job is published when enqueue returns,
            # not when a batch fills or its timer fires.
            self._publisher = pubsub_v1.PublisherClient(
                batch_settings=pubsub_v1.types.BatchSettings(max_messages=1),
                credentials=self._credentials,
            )
        return self._publisher

    @property
    def subscriber(self) -> Any:
        """The subscriber client, created on first use."""
        if self._subscriber is None:
            from google.cloud import pubsub_v1

            self._subscriber = pubsub_v1.SubscriberClient(credentials=self._credentials)
        return self._subscriber

    def close(self) -> None:
        """Stop the clients' background threads and channels."""
        if self._publisher is not None:
            with contextlib.suppress(*CLIENT_ERRORS, RuntimeError):
                self._publisher.stop()
        if self._subscriber is not None:
            with contextlib.suppress(*CLIENT_ERRORS, RuntimeError):
                self._subscriber.close()
        if self.delays is not None:
            close = getattr(self.delays, "close", None)
            if callable(close):
                close()

    # --------------------------------------------------------------- JobQueue

    def enqueue(self, job: Job, *, delay: float = 0.0) -> None:
        """Publish ``job`` now, or through Cloud Tasks when ``delay`` > 0.
        Publishing does not deduplicate: a job id enqueued twice is two
        messages, and the second copy drops itself when worked."""
        self._send(self.topic, job, delay=delay, attempts_before=0)

    def receive(self, *, max_jobs: int, lease_seconds: float) -> list[Delivery]:
        """Up to ``max_jobs`` jobs pulled from ``subscription``, each leased for
        ``lease_seconds`` (at most 600). Does not wait for messages to arrive.
        A message that is not a job, or a job delivered more than
        ``max_deliveries`` times, goes to the dead-letter topic instead."""
        if max_jobs <= 0:
            return []
        subscription = self._pull_subscription()
        with warnings.catch_warnings():
            # return_immediately is deprecated for streaming consumers; a poll
            # loop needs it: a pull cut short by a client deadline would lease
            # messages nobody sees until their ack deadline ends.
            warnings.simplefilter("ignore", DeprecationWarning)
            response = self._call(
                "pull",
                self.subscriber.pull,
                subscription=subscription,
                max_messages=min(max_jobs, 1000),
                return_immediately=True,
                timeout=self._timeout,
            )
        deliveries: list[Delivery] = []
        for received in response.received_messages:
            message = received.message
            attributes = dict(message.attributes)
            attempt = _attempts_before(attributes) + max(1, int(received.delivery_attempt))
            try:
                delivery = self._delivery(
                    bytes(message.data), attributes, message.message_id, attempt, received.ack_id
                )
            except InvalidRequest as exc:
                self.dead_letter_message(
                    bytes(message.data),
                    attributes,
                    attempt=attempt,
                    reason=exc.message,
                    receipt=received.ack_id,
                )
                continue
            if attempt > self.max_deliveries:
                self.dead_letter(delivery, reason=MAX_DELIVERIES_REASON)
                continue
            deliveries.append(delivery)
        if deliveries:
            self._call(
                "modify_ack_deadline",
                self.subscriber.modify_ack_deadline,
                subscription=subscription,
                ack_ids=[d.receipt for d in deliveries],
                ack_deadline_seconds=_seconds(lease_seconds),
                timeout=self._timeout,
            )
        return deliveries

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a pulled delivery (nothing for a pushed one: its answer
        acknowledges it). A receipt settled before is ignored."""
        self._ack(delivery.receipt)

    def retry(self, delivery: Delivery, *, delay: float) -> None:
        """Deliver the job again after ``delay`` seconds as a copy that carries
        this delivery's attempt (see the module docstring), then acknowledge
        this delivery. A receipt settled before is ignored."""
        if delivery.receipt and delivery.receipt in self._settled:
            return
        self._send(self.topic, delivery.job, delay=delay, attempts_before=delivery.attempt)
        self.ack(delivery)

    def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        """Publish the job to the dead-letter topic with ``reason``, then
        acknowledge the delivery."""
        if delivery.receipt and delivery.receipt in self._settled:
            return
        data = delivery.data if isinstance(delivery, PubSubDelivery) else b""
        self.dead_letter_message(
            data or delivery.job.to_json().encode(),
            {},
            attempt=delivery.attempt,
            reason=reason,
            job=delivery.job,
            receipt=delivery.receipt,
        )

    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless Pub/Sub answers for the topic (and
        Cloud Tasks for the delay queue)."""
        try:
            self._call("get_topic", self.publisher.get_topic, topic=self.topic, timeout=10.0)
        except PermanentError as exc:
            raise StoreUnavailable(exc.message, retry_after=30.0) from None
        if self.delays is not None:
            self.delays.check()

    # ----------------------------------------------------------- push side

    def delivery_from_push(
        self,
        data: bytes,
        attributes: Mapping[str, str],
        *,
        message_id: str,
        delivery_attempt: int | None,
    ) -> PubSubDelivery:
        """The delivery in a pushed message (the jobs function's CloudEvent).
        ``delivery_attempt`` is the push's ``deliveryAttempt``, present when
        the subscription has a dead-letter policy. Raises ``InvalidRequest``
        when the data is not a job (no retry can fix that)."""
        attempt = _attempts_before(attributes) + max(1, delivery_attempt or 1)
        return self._delivery(data, dict(attributes), message_id, attempt, "")

    def dead_letter_message(
        self,
        data: bytes,
        attributes: Mapping[str, str],
        *,
        attempt: int,
        reason: str,
        job: Job | None = None,
        receipt: str = "",
    ) -> None:
        """Publish a message (by its raw ``data``) to the dead-letter topic with
        ``reason``, then acknowledge the pulled ``receipt`` if there is one.
        Used for messages that are not even jobs, too."""
        dead = {
            key: value
            for key, value in attributes.items()
            if key in (ATTR_KIND, ATTR_DEPLOYMENT, ATTR_JOB_ID)
        }
        if job is not None:
            dead.update(_job_attributes(job))
        dead.update(
            {
                ATTR_REASON: (_cut_utf8(reason, _REASON_BYTES) or "unknown"),
                ATTR_ATTEMPTS: str(attempt),
                ATTR_SOURCE: self.topic,
                ATTR_DEAD_AT: datetime.fromtimestamp(self._clock(), UTC).isoformat(),
            }
        )
        self._publish(self.dead_letter_topic, data, dead)
        self._ack(receipt)
        log.warning(
            "job dead-lettered",
            extra={
                "queue": self.name,
                "deploymentId": job.deployment_id if job else None,
                "kind": job.kind.value if job else None,
                "attempts": attempt,
                "reason": reason,
            },
        )

    # -------------------------------------------------------- DeadJobQueue

    def dead_messages(self, *, limit: int = 100) -> list[DeadMessage]:
        """Up to ``limit`` messages on the dead-letter topic, oldest first. Each
        is held for a few seconds while it is read and released again."""
        held = self._hold(limit)
        self._release([m.ack_id for m in held])
        return held

    def dead_jobs(self) -> list[tuple[Job, str]]:
        """Dead jobs with the reason each was given up, oldest first."""
        return [(m.job, m.reason) for m in self.dead_messages() if m.job is not None]

    def replay_dead(self, job_id: str) -> Job | None:
        """Publish the dead job ``job_id`` to the work topic afresh (its
        deliveries counted from 1) and acknowledge its dead copies; None when
        the dead-letter topic holds none."""
        held = self._hold(1000)
        mine = [m for m in held if m.job is not None and m.job.id == job_id]
        try:
            if not mine:
                return None
            job = mine[0].job
            assert job is not None
            self._send(self.topic, job, delay=0.0, attempts_before=0)
            self._call(
                "acknowledge",
                self.subscriber.acknowledge,
                subscription=self.dead_letter_subscription,
                ack_ids=[m.ack_id for m in mine],
                timeout=self._timeout,
            )
            log.info("dead job replayed", extra={"queue": self.name, "jobId": job_id})
            return job
        finally:
            self._release([m.ack_id for m in held if m not in mine])

    # ---------------------------------------------------------------- helpers

    def _pull_subscription(self) -> str:
        if self.subscription is None:
            raise ValidationFailed(
                "pulling jobs needs the subscription: set KIDP_GCP_PUBSUB_SUBSCRIPTION"
            )
        return self.subscription

    def _send(self, topic: str, job: Job, *, delay: float, attempts_before: int) -> None:
        attributes = _job_attributes(job)
        if attempts_before:
            attributes[ATTR_ATTEMPTS_BEFORE] = str(attempts_before)
        data = job.to_json().encode()
        if delay <= 0:
            self._publish(topic, data, attributes)
            return
        if self.delays is None:
            raise PermanentError(
                "a delayed job needs Cloud Tasks: set KIDP_GCP_TASKS_QUEUE "
                "(Pub/Sub has no per-message delay)"
            )
        self.delays.publish_later(topic, data, attributes, due=self._clock() + delay, key=job.id)

    def _publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        def publish() -> str:
            future = self.publisher.publish(
                topic, data, retry=self._retry, timeout=self._timeout, **attributes
            )
            return str(future.result(timeout=self._timeout))

        return str(self._call("publish", publish))

    def _call(self, operation: str, method: Callable[..., Any], /, **params: Any) -> Any:
        if "timeout" in params:
            # The clients' default retries run for up to ten minutes; a job or
            # a request must hear about a missing Pub/Sub within its timeout.
            params["retry"] = self._retry
        try:
            return method(**params)
        except CLIENT_ERRORS as exc:
            raise broker_error(
                exc, service="Pub/Sub", operation=operation, temporary=StoreUnavailable
            ) from None

    def _ack(self, receipt: str) -> None:
        if receipt and self._settle_once(receipt):
            self._call(
                "acknowledge",
                self.subscriber.acknowledge,
                subscription=self._pull_subscription(),
                ack_ids=[receipt],
                timeout=self._timeout,
            )

    def _settle_once(self, receipt: str) -> bool:
        """Remember ``receipt`` as settled; False if it was already."""
        with self._lock:
            if receipt in self._settled:
                return False
            self._settled[receipt] = None
            if len(self._settled) > _SETTLED_MEMORY:
                self._settled.pop(next(iter(self._settled)))
            return True

    def _delivery(
        self,
        data: bytes,
        attributes: dict[str, str],
        message_id: str,
        attempt: int,
        receipt: str,
    ) -> PubSubDelivery:
        try:
            job = Job.from_json(data)
        except ValidationError:
            raise InvalidRequest(f"Pub/Sub message {message_id} is not a broker job") from None
        return PubSubDelivery(
            job=job,
            receipt=receipt,
            attempt=attempt,
            message_id=message_id,
            data=data,
            attributes=attributes,
        )

    def _hold(self, limit: int) -> list[DeadMessage]:
        """Pull up to ``limit`` distinct messages from the dead-letter
        subscription, each held for a few seconds; oldest first."""
        held: dict[str, tuple[float, DeadMessage]] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            while len(held) < limit:
                response = self._call(
                    "pull",
                    self.subscriber.pull,
                    subscription=self.dead_letter_subscription,
                    max_messages=min(1000, limit - len(held)),
                    return_immediately=True,
                    timeout=self._timeout,
                )
                fresh = [r for r in response.received_messages if r.message.message_id not in held]
                if not fresh:
                    break
                ack_ids = [r.ack_id for r in fresh]
                self._call(
                    "modify_ack_deadline",
                    self.subscriber.modify_ack_deadline,
                    subscription=self.dead_letter_subscription,
                    ack_ids=ack_ids,
                    ack_deadline_seconds=_PEEK_SECONDS,
                    timeout=self._timeout,
                )
                for received in fresh:
                    published = received.message.publish_time
                    order = published.timestamp() if published else 0.0
                    held[received.message.message_id] = (order, _dead_message(received))
        return [m for _, m in sorted(held.values(), key=lambda pair: pair[0])]

    def _release(self, ack_ids: Iterable[str]) -> None:
        """Make held dead messages available again at once."""
        ids = list(ack_ids)
        if ids:
            self._call(
                "modify_ack_deadline",
                self.subscriber.modify_ack_deadline,
                subscription=self.dead_letter_subscription,
                ack_ids=ids,
                ack_deadline_seconds=0,
                timeout=self._timeout,
            )


def _job_attributes(job: Job) -> dict[str, str]:
    attributes = {ATTR_KIND: job.kind.value, ATTR_JOB_ID: job.id}
    if job.deployment_id:
        attributes[ATTR_DEPLOYMENT] = job.deployment_id
    return attributes


def _attempts_before(attributes: Mapping[str, str]) -> int:
    """Deliveries earlier copies of the job had (0 when the attribute is
    absent or not a count: a stranger's attribute cannot make a job dead)."""
    raw = attributes.get(ATTR_ATTEMPTS_BEFORE, "0")
    return int(raw) if raw.isdigit() else 0


def _cut_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, never inside a character."""
    return text.encode()[:limit].decode(errors="ignore")


def _seconds(value: float) -> int:
    """A whole ack deadline in ``[1, 600]`` seconds, rounded up."""
    whole = int(value) + (value > int(value))
    return max(1, min(MAX_ACK_DEADLINE_SECONDS, whole))


def _dead_message(received: Any) -> DeadMessage:
    message = received.message
    attributes = dict(message.attributes)
    data = bytes(message.data)
    try:
        job: Job | None = Job.from_json(data)
    except ValidationError:
        job = None
    attempts = attributes.get(ATTR_ATTEMPTS) or attributes.get(ATTR_POLICY_COUNT) or "0"
    return DeadMessage(
        message_id=message.message_id,
        job=job,
        data=data,
        # A message the subscription's policy moved carries no reason of ours.
        reason=attributes.get(ATTR_REASON) or "moved by the subscription's dead-letter policy",
        attempts=int(attempts) if attempts.isdigit() else 0,
        dead_at=attributes.get(ATTR_DEAD_AT) or None,
        ack_id=received.ack_id,
    )
