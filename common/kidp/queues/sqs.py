"""The job queue on Amazon SQS (a standard queue) and its dead-letter queue.

One message is one job: the body is the :class:`~kidp.models.Job`'s JSON, and
message attributes repeat its kind and deployment id for whoever reads the
queue in the console. ``Delivery.attempt`` is SQS's
``ApproximateReceiveCount``.

Delays never make anything sleep:

* ``enqueue(job, delay=...)`` sends the message with ``DelaySeconds``. SQS
  delays a message by at most 900 s, so a longer delay is sent as 900 s plus a
  ``kidp-not-before`` attribute (epoch seconds). A worker that receives the
  message early hands it to :meth:`SqsJobQueue.defer`, which sends it again
  with the remaining delay and deletes the early copy: the job comes back,
  re-enqueues itself, and runs once it is due.
* ``retry(delivery, delay=...)`` changes the message's visibility timeout, so
  the same message (and its receive count) comes back after ``delay``.

Delivery is at least once. A standard queue may deliver a message twice and
does not deduplicate two enqueues of one job id; the service's job tokens and
callback sequence numbers make every extra copy drop itself
(see :mod:`kidp.service`).

Dead letters: :meth:`SqsJobQueue.dead_letter` sends a copy of the message to
the dead-letter queue with the reason, the delivery count and the source queue
as message attributes, then deletes the original. The dead-letter queue is
``dead_letter_queue_url`` or, when that is not given, the target of the source
queue's ``RedrivePolicy``. That redrive policy is also the backstop for a
worker that dies during a job's last delivery. Behind Lambda its
``maxReceiveCount`` is ``KIDP_JOB_MAX_DELIVERIES`` and the worker runs a job
one time less, keeping the last receive for failing the deployment (with its
callback) when the function died on every run (see
:func:`kidp.edges.aws.runs_per_job`); a pull worker buries a job received
more than ``max_deliveries`` times.

Behind a Lambda event source mapping the platform receives and deletes
messages; the Lambda edge uses :meth:`SqsJobQueue.delivery_from_record`,
``retry``, ``defer`` and ``dead_letter``. A pull worker (the embedded runtime
pointed at SQS) uses ``receive`` and ``ack`` as well.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import ValidationError

from kidp.errors import InvalidRequest, PermanentError, StoreUnavailable
from kidp.models import Job
from kidp.ports import Delivery
from kidp.providers.aws.clients import new_client
from kidp.providers.aws.errors import error_code, is_temporary

__all__ = [
    "MAX_DELAY_SECONDS",
    "MAX_DELIVERIES_REASON",
    "MAX_VISIBILITY_SECONDS",
    "DeadMessage",
    "SqsDelivery",
    "SqsJobQueue",
]

log = logging.getLogger(__name__)

#: The longest ``DelaySeconds`` SQS accepts.
MAX_DELAY_SECONDS: Final = 900
#: The longest visibility timeout SQS accepts (12 hours).
MAX_VISIBILITY_SECONDS: Final = 43_200
#: The reason given to a job received more often than ``max_deliveries``.
MAX_DELIVERIES_REASON: Final = "max deliveries exceeded"

ATTR_KIND: Final = "kidp-job-kind"
ATTR_DEPLOYMENT: Final = "kidp-deployment-id"
ATTR_NOT_BEFORE: Final = "kidp-not-before"
ATTR_REASON: Final = "kidp-reason"
ATTR_ATTEMPTS: Final = "kidp-attempts"
ATTR_SOURCE: Final = "kidp-source-queue"
ATTR_DEAD_AT: Final = "kidp-dead-at"

#: Longer reasons are cut: message attributes count towards the 256 KiB limit.
_REASON_CHARS = 1000
#: How long ``dead_messages`` and ``redrive`` hold the messages they look at.
_PEEK_SECONDS = 30
#: Receipt errors that mean "this delivery is no longer yours" (the message was
#: deleted, or its visibility expired and it went to another worker).
_STALE_RECEIPT_CODES = frozenset(
    {"ReceiptHandleIsInvalid", "AWS.SimpleQueueService.ReceiptHandleIsInvalid"}
)


@dataclass(frozen=True)
class SqsDelivery(Delivery):
    """A delivery of one SQS message: the job plus what the queue needs to
    settle it (``receipt`` is the message's receipt handle)."""

    message_id: str = ""
    body: str = ""
    #: Epoch seconds before which the job must not run (a delay over 900 s).
    not_before: float | None = None


@dataclass(frozen=True)
class DeadMessage:
    """A message in the dead-letter queue, as ``dead_messages`` shows it."""

    message_id: str
    job: Job | None
    body: str
    reason: str
    attempts: int
    dead_at: str | None

    def wire(self) -> dict[str, Any]:
        """A JSON-ready view (``job`` is None for a body that is not a job)."""
        return {
            "messageId": self.message_id,
            "job": self.job.model_dump(mode="json") if self.job else None,
            "body": None if self.job else self.body,
            "reason": self.reason,
            "attempts": self.attempts,
            "deadAt": self.dead_at,
        }


class SqsJobQueue:
    """:class:`kidp.ports.JobQueue` on an SQS standard queue.

    ``client`` injects a boto3 ``sqs`` client (tests); otherwise one is made
    for ``region``/``endpoint_url``. ``max_deliveries`` bounds how often one
    message is handed out by ``receive``; ``clock`` returns epoch seconds.
    """

    def __init__(
        self,
        queue_url: str,
        *,
        region: str,
        endpoint_url: str | None = None,
        max_deliveries: int = 10,
        dead_letter_queue_url: str | None = None,
        client: Any | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self.queue_url = queue_url
        self.region = region
        self.endpoint_url = endpoint_url
        self.max_deliveries = max_deliveries
        self._dead_letter_queue_url = dead_letter_queue_url
        self._client = client
        self._clock = clock
        self.name = queue_url.rstrip("/").rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"SqsJobQueue({self.queue_url!r}, region={self.region!r})"

    @property
    def client(self) -> Any:
        """The SQS client, created on first use."""
        if self._client is None:
            self._client = new_client(
                "sqs",
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                # Few SDK retries: a Lambda must not spend its time sleeping in
                # backoff; the caller's own retry (a redelivery) takes over.
                config=Config(
                    retries={"mode": "standard", "max_attempts": 3},
                    connect_timeout=5,
                    read_timeout=25,
                ),
            )
        return self._client

    # ----------------------------------------------------------------- JobQueue

    def enqueue(self, job: Job, *, delay: float = 0.0) -> None:
        """Send ``job``, due after ``delay`` seconds (see the module docstring for
        delays over 900 s). SQS does not deduplicate: sending a job id twice
        makes two messages, and the second copy drops itself when worked."""
        self._send(self.queue_url, job.to_json(), self._job_attributes(job), delay)

    def receive(self, *, max_jobs: int, lease_seconds: float) -> list[Delivery]:
        """Up to ``max_jobs`` (at most 10) due jobs, each invisible to others for
        ``lease_seconds``. Does not wait for messages to arrive. A message
        already received ``max_deliveries`` times is dead-lettered instead; one
        whose delay is not over yet is deferred; neither is returned."""
        if max_jobs <= 0:
            return []
        response = self._call(
            "receive_message",
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=min(max_jobs, 10),
            VisibilityTimeout=_seconds(lease_seconds, MAX_VISIBILITY_SECONDS),
            WaitTimeSeconds=0,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
            MessageAttributeNames=["All"],
        )
        deliveries: list[Delivery] = []
        for message in response.get("Messages", []):
            attributes = _api_attributes(message.get("MessageAttributes", {}))
            attempt = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            try:
                delivery = self._delivery(
                    message["Body"],
                    message["ReceiptHandle"],
                    message["MessageId"],
                    attempt,
                    attributes,
                )
            except InvalidRequest as exc:
                self.dead_letter_message(
                    message["ReceiptHandle"], message["Body"], attempt=attempt, reason=exc.message
                )
                continue
            if attempt > self.max_deliveries:
                self.dead_letter(delivery, reason=MAX_DELIVERIES_REASON)
                continue
            if self.defer(delivery):
                continue
            deliveries.append(delivery)
        return deliveries

    def ack(self, delivery: Delivery) -> None:
        """Delete the message; ignored (and logged) when the receipt is stale."""
        self._settle("delete_message", delivery.receipt, QueueUrl=self.queue_url)

    def retry(self, delivery: Delivery, *, delay: float) -> None:
        """Make the message visible again after ``delay`` seconds (at most 12
        hours); the receive count is kept, so retries count towards
        ``max_deliveries``."""
        self._settle(
            "change_message_visibility",
            delivery.receipt,
            QueueUrl=self.queue_url,
            VisibilityTimeout=_seconds(delay, MAX_VISIBILITY_SECONDS),
        )

    def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        """Move the message to the dead-letter queue with ``reason``."""
        body = delivery.body if isinstance(delivery, SqsDelivery) and delivery.body else None
        self.dead_letter_message(
            delivery.receipt,
            body or delivery.job.to_json(),
            attempt=delivery.attempt,
            reason=reason,
            job=delivery.job,
        )

    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless SQS answers for the queue."""
        self._call("get_queue_attributes", QueueUrl=self.queue_url, AttributeNames=["QueueArn"])

    # ------------------------------------------------------------- SQS-specific

    def delivery_from_record(self, record: Mapping[str, Any]) -> SqsDelivery:
        """The delivery in one record of a Lambda SQS event. Raises
        ``InvalidRequest`` when the body is not a job (no retry can fix that)."""
        attempt = int(record.get("attributes", {}).get("ApproximateReceiveCount", "1"))
        return self._delivery(
            record["body"],
            record["receiptHandle"],
            record["messageId"],
            attempt,
            _event_attributes(record.get("messageAttributes", {})),
        )

    def defer(self, delivery: Delivery) -> bool:
        """If ``delivery`` arrived before its ``not_before`` (a delay over 900 s),
        send the job again with the remaining delay, delete this copy and
        return True; otherwise return False and leave it alone."""
        not_before = delivery.not_before if isinstance(delivery, SqsDelivery) else None
        if not_before is None:
            return False
        remaining = not_before - self._clock()
        if remaining <= 0:
            return False
        self._send(
            self.queue_url,
            delivery.job.to_json(),
            self._job_attributes(delivery.job),
            0.0,
            not_before=not_before,
        )
        self.ack(delivery)
        return True

    def dead_letter_message(
        self,
        receipt: str,
        body: str,
        *,
        attempt: int,
        reason: str,
        job: Job | None = None,
    ) -> None:
        """Copy a message (by its raw ``body``) to the dead-letter queue with
        ``reason``, then delete it from this queue. Used for messages that are
        not even jobs, too."""
        url = self.dead_letter_queue_url()
        attributes: dict[str, dict[str, str]] = {
            ATTR_REASON: _string(reason[:_REASON_CHARS] or "unknown"),
            ATTR_ATTEMPTS: {"DataType": "Number", "StringValue": str(attempt)},
            ATTR_SOURCE: _string(self.queue_url),
            ATTR_DEAD_AT: _string(datetime.fromtimestamp(self._clock(), UTC).isoformat()),
        }
        if job is not None:
            attributes.update(self._job_attributes(job))
        self._call("send_message", QueueUrl=url, MessageBody=body, MessageAttributes=attributes)
        self._settle("delete_message", receipt, QueueUrl=self.queue_url)
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

    def dead_letter_queue_url(self) -> str:
        """The dead-letter queue: as configured, or the source queue's
        ``RedrivePolicy`` target (looked up once)."""
        if self._dead_letter_queue_url is None:
            attributes = self._call(
                "get_queue_attributes", QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy"]
            ).get("Attributes", {})
            policy = attributes.get("RedrivePolicy")
            if not policy:
                raise PermanentError(
                    f"SQS queue {self.name} has no dead-letter queue: give it a RedrivePolicy "
                    "or set KIDP_AWS_DEAD_LETTER_QUEUE_URL"
                )
            arn = json.loads(policy)["deadLetterTargetArn"]
            _, _, _, _, account, name = arn.split(":", 5)
            self._dead_letter_queue_url = self._call(
                "get_queue_url", QueueName=name, QueueOwnerAWSAccountId=account
            )["QueueUrl"]
        return self._dead_letter_queue_url

    def dead_messages(self, *, limit: int = 100) -> list[DeadMessage]:
        """Up to ``limit`` messages in the dead-letter queue, oldest first as SQS
        returns them. Each is held for a few seconds while it is read and then
        made visible again: listing consumes nothing."""
        url = self.dead_letter_queue_url()
        held = self._hold(url, limit)
        try:
            return [_dead_message(message) for message in held]
        finally:
            self._release(url, held)

    def dead_jobs(self) -> list[tuple[Job, str]]:
        """Dead jobs with the reason each was given up (as ``SqlJobQueue`` offers)."""
        return [(m.job, m.reason) for m in self.dead_messages() if m.job is not None]

    def replay_dead(self, job_id: str) -> Job | None:
        """Move the dead-lettered copies of job ``job_id`` back to this queue
        (:meth:`redrive`); None when the dead-letter queue holds none."""
        copies = [m for m in self.dead_messages() if m.job is not None and m.job.id == job_id]
        if not copies or not self.redrive([m.message_id for m in copies]):
            return None
        return copies[0].job

    def redrive(self, message_ids: Iterable[str] | None = None, *, limit: int = 100) -> list[str]:
        """Move dead-lettered messages back to this queue (all of them, or those
        in ``message_ids``) as fresh messages, so each gets ``max_deliveries``
        deliveries again. Returns the ids (in the dead-letter queue) of the
        messages moved."""
        wanted = None if message_ids is None else set(message_ids)
        url = self.dead_letter_queue_url()
        held = self._hold(url, limit)
        moved: list[str] = []
        keep: list[dict[str, Any]] = []
        try:
            for message in held:
                if wanted is not None and message["MessageId"] not in wanted:
                    keep.append(message)
                    continue
                attributes = {
                    name: value
                    for name, value in message.get("MessageAttributes", {}).items()
                    if name in (ATTR_KIND, ATTR_DEPLOYMENT)
                }
                self._call(
                    "send_message",
                    QueueUrl=self.queue_url,
                    MessageBody=message["Body"],
                    MessageAttributes=attributes,
                )
                self._settle("delete_message", message["ReceiptHandle"], QueueUrl=url)
                moved.append(message["MessageId"])
        except BaseException:
            keep = [m for m in held if m["MessageId"] not in moved]
            raise
        finally:
            self._release(url, keep)
        if moved:
            log.info("dead letters redriven", extra={"queue": self.name, "count": len(moved)})
        return moved

    # ----------------------------------------------------------------- helpers

    def _delivery(
        self,
        body: str,
        receipt: str,
        message_id: str,
        attempt: int,
        attributes: Mapping[str, str],
    ) -> SqsDelivery:
        try:
            job = Job.from_json(body)
        except ValidationError:
            raise InvalidRequest(f"SQS message {message_id} is not a broker job") from None
        raw = attributes.get(ATTR_NOT_BEFORE)
        return SqsDelivery(
            job=job,
            receipt=receipt,
            attempt=attempt,
            message_id=message_id,
            body=body,
            not_before=float(raw) if raw else None,
        )

    @staticmethod
    def _job_attributes(job: Job) -> dict[str, dict[str, str]]:
        attributes = {ATTR_KIND: _string(job.kind.value)}
        if job.deployment_id:
            attributes[ATTR_DEPLOYMENT] = _string(job.deployment_id)
        return attributes

    def _send(
        self,
        url: str,
        body: str,
        attributes: dict[str, dict[str, str]],
        delay: float,
        *,
        not_before: float | None = None,
    ) -> None:
        now = self._clock()
        if not_before is None and delay > MAX_DELAY_SECONDS:
            not_before = now + delay
        if not_before is not None:
            delay = not_before - now
            attributes = {
                **attributes,
                ATTR_NOT_BEFORE: {"DataType": "Number", "StringValue": f"{not_before:.3f}"},
            }
        self._call(
            "send_message",
            QueueUrl=url,
            MessageBody=body,
            DelaySeconds=_seconds(delay, MAX_DELAY_SECONDS),
            MessageAttributes=attributes,
        )

    def _hold(self, url: str, limit: int) -> list[dict[str, Any]]:
        """Receive up to ``limit`` distinct messages from ``url``, holding each
        invisible for a few seconds; stops when the queue has no more."""
        held: dict[str, dict[str, Any]] = {}
        while len(held) < limit:
            response = self._call(
                "receive_message",
                QueueUrl=url,
                MaxNumberOfMessages=min(10, limit - len(held)),
                VisibilityTimeout=_PEEK_SECONDS,
                WaitTimeSeconds=0,
                MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                MessageAttributeNames=["All"],
            )
            fresh = [m for m in response.get("Messages", []) if m["MessageId"] not in held]
            if not fresh:
                break
            held.update((m["MessageId"], m) for m in fresh)
        return list(held.values())

    def _release(self, url: str, messages: list[dict[str, Any]]) -> None:
        """Make held messages visible again at once."""
        for start in range(0, len(messages), 10):
            batch = messages[start : start + 10]
            self._call(
                "change_message_visibility_batch",
                QueueUrl=url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                    for n, m in enumerate(batch)
                ],
            )

    def _settle(self, operation: str, receipt: str, **params: Any) -> None:
        try:
            self._call(operation, ReceiptHandle=receipt, stale_ok=True, **params)
        except _StaleReceipt:
            # The message was deleted already or went to another worker after
            # its visibility expired: that worker decides its fate now.
            log.warning(
                "ignored %s of a message whose receipt is no longer valid",
                operation,
                extra={"queue": self.name},
            )

    def _call(self, operation: str, /, *, stale_ok: bool = False, **params: Any) -> Any:
        queue = str(params.get("QueueUrl", self.queue_url)).rstrip("/").rsplit("/", 1)[-1]
        try:
            return getattr(self.client, operation)(**params)
        except ClientError as exc:
            code = error_code(exc)
            if stale_ok and code in _STALE_RECEIPT_CODES:
                raise _StaleReceipt from None
            message = str(exc.response.get("Error", {}).get("Message", ""))
            text = f"SQS {operation} failed on queue {queue} ({code}): {message}"
            if is_temporary(exc):
                raise StoreUnavailable(text, retry_after=5.0) from None
            raise PermanentError(text, details={"awsErrorCode": code}) from None
        except ParamValidationError as exc:
            raise PermanentError(f"SQS {operation} had invalid parameters: {exc}") from None
        except (BotoConnectionError, HTTPClientError, NoCredentialsError) as exc:
            raise StoreUnavailable(
                f"cannot reach SQS for {operation} on queue {queue} ({type(exc).__name__})",
                retry_after=5.0,
            ) from None


class _StaleReceipt(Exception):
    """A receipt handle SQS no longer accepts."""


def _seconds(value: float, cap: int) -> int:
    """Whole seconds in ``[0, cap]``, rounded up (never early)."""
    return max(0, min(cap, math.ceil(value)))


def _string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _api_attributes(attributes: Mapping[str, Any]) -> dict[str, str]:
    """Message attributes as the SQS API returns them (``StringValue``)."""
    return {name: str(value.get("StringValue", "")) for name, value in attributes.items()}


def _event_attributes(attributes: Mapping[str, Any]) -> dict[str, str]:
    """Message attributes as a Lambda event carries them (``stringValue``)."""
    return {name: str(value.get("stringValue") or "") for name, value in attributes.items()}


def _dead_message(message: Mapping[str, Any]) -> DeadMessage:
    attributes = _api_attributes(message.get("MessageAttributes", {}))
    try:
        job: Job | None = Job.from_json(message["Body"])
    except ValidationError:
        job = None
    attempts = attributes.get(ATTR_ATTEMPTS) or message.get("Attributes", {}).get(
        "ApproximateReceiveCount", "0"
    )
    return DeadMessage(
        message_id=message["MessageId"],
        job=job,
        body=message["Body"],
        # A message SQS moved itself (redrive policy) carries no reason of ours.
        reason=attributes.get(ATTR_REASON) or "moved by the queue's redrive policy",
        attempts=int(float(attempts)),
        dead_at=attributes.get(ATTR_DEAD_AT),
    )
