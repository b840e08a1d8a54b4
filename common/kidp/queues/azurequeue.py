"""The job queue on Azure Storage Queues and its poison queue
(``azurequeue://<account>/<queue>``).

One message is one job. Storage Queue messages carry no attributes, so the
body is the :class:`~kidp.models.Job`'s JSON plus, when there is something to
say, a ``"kidp"`` object of the queue's own bookkeeping (``Job`` ignores it):

* ``runs``: deliveries of earlier copies of this job (see *retries* below);
* ``notBefore``: epoch seconds before which the job must not run (a delay
  over 7 days);
* ``reason``, ``attempts``, ``deadAt``: why, after how many deliveries and
  when a job was given up (poison queue only). A message that is not even a
  job is buried as ``{"kidp": {...}, "raw": "<the body as it came>"}``.

Bodies are base64 text, the encoding the Functions host expects of a queue
trigger (``host.json``: ``extensions.queues.messageEncoding``), and messages
never expire (time-to-live -1): a job waits until it is worked, however long.

Delays never make anything sleep: ``enqueue(job, delay=...)`` sends the
message with a visibility timeout of ``delay`` (Storage Queues allow 7 days;
a longer delay is sent as 7 days and ``notBefore``, and a worker that gets it
early sends it again with the rest, :meth:`AzureStorageJobQueue.defer`).

``Delivery.attempt`` is ``runs`` plus the message's ``dequeue_count``.

Two ways of working the queue, one adapter:

* **Pulled** (the embedded runtime pointed at Azure): ``receive`` leases
  messages for ``lease_seconds`` (their visibility timeout); ``retry`` makes
  the same message visible again after the delay (``update_message``, which
  keeps its dequeue count); ``ack`` deletes it; ``dead_letter`` moves it to
  the poison queue. A receipt (the pop receipt) that is no longer valid, as
  after a lease expired and another worker got the message, is ignored.
* **Pushed** (the Functions queue trigger, :mod:`kidp.edges.azure`): the host
  receives and deletes messages itself, and redelivers a message whose
  function raised only after its own fixed visibility timeout. A per-job delay
  therefore needs a new message: :meth:`requeue` sends a copy whose ``runs``
  counts this delivery, visible after the delay, and the function returns so
  the host deletes the original. A message the host dequeued
  ``maxDequeueCount`` times is moved by the host to ``<queue>-poison``
  unchanged; the broker's own give-ups go there too, with a reason.

Dead jobs: :meth:`dead_jobs` and :meth:`replay_dead` read the poison queue
(:class:`kidp.ports.DeadJobQueue`); reading holds each message invisible for a
few seconds and then releases it, so listing consumes nothing.

Delivery is at least once and a Storage Queue does not deduplicate: sending a
job id twice makes two messages, and the service's job tokens make every
extra copy drop itself (see :mod:`kidp.service`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn

from azure.core.exceptions import AzureError, ResourceExistsError
from azure.storage.queue import (
    QueueClient,
    QueueMessage,
    TextBase64DecodePolicy,
    TextBase64EncodePolicy,
)
from pydantic import ValidationError

from kidp.errors import InvalidRequest, PermanentError, StoreUnavailable
from kidp.models import Job
from kidp.ports import Delivery
from kidp.providers.azure.dataplane import (
    check_same_account,
    default_credential,
    parse_storage_url,
)
from kidp.providers.azure.errors import describe, error_code, http_status, is_temporary, retry_after

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

__all__ = [
    "MAX_DELIVERIES_REASON",
    "MAX_VISIBILITY_SECONDS",
    "POISON_SUFFIX",
    "AzureDelivery",
    "AzureStorageJobQueue",
    "DeadMessage",
]

log = logging.getLogger(__name__)

#: The longest visibility timeout (and so delay) a Storage Queue accepts: 7 days.
MAX_VISIBILITY_SECONDS: Final = 7 * 24 * 3600
#: The reason given to a job received more often than ``max_deliveries``.
MAX_DELIVERIES_REASON: Final = "max deliveries exceeded"
#: The Functions host's poison queue is the work queue's name plus this.
POISON_SUFFIX: Final = "-poison"
#: Why a message the Functions host moved carries no reason of ours.
HOST_MOVED_REASON: Final = (
    "moved to the poison queue by the Functions host after maxDequeueCount deliveries"
)

_META = "kidp"
#: Where a poison copy of a message that is no job keeps the original body.
_RAW = "raw"
#: Longer reasons are cut: a message holds at most 64 KiB.
_REASON_CHARS = 1000
#: How long reading the poison queue holds the messages it looks at, and how
#: long ``dead_letter`` holds a message while it writes the poison copy.
_HOLD_SECONDS = 30
#: Most messages one receive call returns.
_PAGE = 32
# A receipt the queue no longer accepts: the message was deleted, or its
# visibility expired and another worker got it (a new pop receipt).
_STALE_CODES = frozenset({"MessageNotFound", "PopReceiptMismatch"})
_MISCONFIGURED_CODES = frozenset(
    {
        "QueueNotFound",
        "AuthorizationFailure",
        "AuthorizationPermissionMismatch",
        "AuthenticationFailed",
        "InvalidAuthenticationInfo",
        "AccountIsDisabled",
    }
)


@dataclass(frozen=True)
class AzureDelivery(Delivery):
    """A delivery of one message: ``receipt`` is its pop receipt."""

    message_id: str = ""
    body: str = ""
    #: Deliveries of earlier copies of this job (a requeued retry).
    runs: int = 0
    #: Epoch seconds before which the job must not run (a delay over 7 days).
    not_before: float | None = None


@dataclass(frozen=True)
class DeadMessage:
    """A message in the poison queue, as an operator sees it."""

    message_id: str
    job: Job | None
    body: str
    reason: str
    attempts: int | None
    dead_at: str | None


def encode(
    job: Job,
    *,
    runs: int = 0,
    not_before: float | None = None,
    reason: str | None = None,
    attempts: int | None = None,
    dead_at: str | None = None,
) -> str:
    """A message body: the job's JSON, plus the queue's bookkeeping when any."""
    body: dict[str, Any] = job.model_dump(mode="json")
    meta = {
        "runs": runs or None,
        "notBefore": round(not_before, 3) if not_before is not None else None,
        "reason": reason[:_REASON_CHARS] if reason is not None else None,
        "attempts": attempts,
        "deadAt": dead_at,
    }
    meta = {key: value for key, value in meta.items() if value is not None}
    if meta:
        body[_META] = meta
    return json.dumps(body, separators=(",", ":"))


def decode(body: str) -> tuple[Job, dict[str, Any]]:
    """The job in a message body and the queue's bookkeeping; ``InvalidRequest``
    when the body is not a job (no retry can make it one)."""
    data = _json_object(body)
    if data is None:
        raise InvalidRequest("the queue message is not a broker job (not a JSON object)")
    meta = data.pop(_META, None)
    try:
        job = Job.model_validate(data)
    except ValidationError:
        raise InvalidRequest("the queue message is not a broker job") from None
    return job, meta if isinstance(meta, dict) else {}


def _seconds(value: float, cap: int = MAX_VISIBILITY_SECONDS) -> int:
    """Whole seconds in ``[0, cap]``, rounded up (never early)."""
    return max(0, min(cap, math.ceil(value)))


class _StaleReceipt(Exception):
    """A pop receipt the queue no longer accepts."""


class AzureStorageJobQueue:
    """:class:`kidp.ports.JobQueue` and :class:`kidp.ports.DeadJobQueue` on an
    Azure Storage Queue and its ``<queue>-poison`` queue.

    ``queue`` and ``poison`` inject ``azure.storage.queue.QueueClient``\\ s
    (tests); :meth:`from_url` makes them. ``max_deliveries`` bounds how often
    ``receive`` hands out one job; ``clock`` returns epoch seconds.
    """

    def __init__(
        self,
        queue: QueueClient,
        poison: QueueClient,
        *,
        max_deliveries: int = 10,
        clock: Callable[[], float] = time.time,
        owns_clients: bool = False,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self._queue = queue
        self._poison = poison
        self.max_deliveries = max_deliveries
        self._clock = clock
        self._owns_clients = owns_clients
        self.name = queue.queue_name

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        connection_string: str | None = None,
        credential: TokenCredential | None = None,
        max_deliveries: int = 10,
    ) -> AzureStorageJobQueue:
        """The queue for ``azurequeue://<account>/<queue>``: through
        ``connection_string`` when given (Azurite, an account key), else Entra
        ID with ``credential`` (default: the process's ``DefaultAzureCredential``)."""
        location = parse_storage_url(url, service="queue")
        codec: dict[str, Any] = {
            "message_encode_policy": TextBase64EncodePolicy(),
            "message_decode_policy": TextBase64DecodePolicy(),
        }

        def client(name: str) -> QueueClient:
            if connection_string:
                return QueueClient.from_connection_string(connection_string, name, **codec)
            return QueueClient(
                location.endpoint, name, credential=credential or default_credential(), **codec
            )

        if connection_string:
            check_same_account(location, connection_string, setting="KIDP_QUEUE_URL")
        return cls(
            client(location.name),
            client(location.name + POISON_SUFFIX),
            max_deliveries=max_deliveries,
            owns_clients=True,
        )

    def __repr__(self) -> str:
        return f"AzureStorageJobQueue({self._queue.url!r})"

    @property
    def poison_name(self) -> str:
        """The poison queue's name."""
        return self._poison.queue_name

    def close(self) -> None:
        """Release the HTTP connections if this queue created the clients."""
        if self._owns_clients:
            self._queue.close()
            self._poison.close()

    def create_queues(self) -> None:
        """Create the queue and its poison queue unless they exist (tests and the
        emulated broker; in Azure the Bicep creates them)."""
        for client in (self._queue, self._poison):
            self._call(functools.partial(_create, client))

    # ----------------------------------------------------------------- JobQueue

    def enqueue(self, job: Job, *, delay: float = 0.0) -> None:
        """Send ``job``, due after ``delay`` seconds. A Storage Queue does not
        deduplicate: sending a job id twice makes two messages, and the second
        copy drops itself when worked."""
        self._send(job, delay=delay)

    def receive(self, *, max_jobs: int, lease_seconds: float) -> list[Delivery]:
        """Up to ``max_jobs`` due jobs, each invisible to others for
        ``lease_seconds`` (whole seconds, at least one). Does not wait for
        messages to arrive. A job already delivered ``max_deliveries`` times
        is moved to the poison queue instead, one whose delay is not over is
        deferred, a message that is no job is buried; none is returned, and
        the batch is filled from the messages behind them."""
        deliveries: list[Delivery] = []
        lease = max(1, _seconds(lease_seconds))
        while len(deliveries) < max_jobs:
            wanted = min(_PAGE, max_jobs - len(deliveries))
            page = self._receive(self._queue, wanted, lease)
            if not page:
                break
            for message in page:
                delivery = self._settle_on_receipt(message)
                if delivery is not None:
                    deliveries.append(delivery)
        return deliveries

    def _settle_on_receipt(self, message: QueueMessage) -> AzureDelivery | None:
        """The delivery of a received message, or None when it was dealt with here."""
        try:
            delivery = self.delivery_from_message(
                str(message.content),
                message_id=message.id,
                pop_receipt=str(message.pop_receipt),
                dequeue_count=int(message.dequeue_count or 1),
            )
        except InvalidRequest as exc:
            self._bury_message(message, reason=exc.message)
            return None
        if delivery.attempt > self.max_deliveries:
            self.dead_letter(delivery, reason=MAX_DELIVERIES_REASON)
            return None
        if self.defer(delivery):
            return None
        return delivery

    def ack(self, delivery: Delivery) -> None:
        """Delete the message; ignored (and logged) when the receipt is stale."""
        self._settle("delete", delivery, self._queue.delete_message, delivery.receipt)

    def retry(self, delivery: Delivery, *, delay: float) -> None:
        """Make the same message visible again after ``delay`` seconds (at most 7
        days); its dequeue count is kept, so retries count towards
        ``max_deliveries``."""
        self._settle(
            "retry",
            delivery,
            lambda message_id, receipt: self._queue.update_message(
                message_id, receipt, visibility_timeout=_seconds(delay)
            ),
            delivery.receipt,
        )

    def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        """Move the message to the poison queue with ``reason``. The receipt is
        checked first (holding the message), so a stale delivery buries
        nothing; the copy is written before the original is deleted, so a
        crash in between leaves the job twice, never nowhere."""
        held = self._hold_for_dead_letter(delivery)
        if held is None:
            return
        self.bury(delivery.job, reason=reason, attempts=delivery.attempt)
        self._settle("delete", delivery, self._queue.delete_message, held)

    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless the queue answers (a missing queue or
        a refused authorization counts as unavailable)."""
        self._call(self._queue.get_queue_properties)

    # ------------------------------------------------------------- DeadJobQueue

    def dead_jobs(self) -> list[tuple[Job, str]]:
        """Dead jobs with the reason each was given up, oldest first."""
        return [(m.job, m.reason) for m in self.dead_messages() if m.job is not None]

    def replay_dead(self, job_id: str) -> Job | None:
        """Send the dead job ``job_id`` to the work queue afresh (deliveries
        counted from 1) and delete its poison copies; None when none is dead."""
        replayed: Job | None = None
        held = self._hold_poison()
        keep: list[QueueMessage] = []
        try:
            for message in held:
                dead = _dead_message(message)
                if dead.job is None or dead.job.id != job_id:
                    keep.append(message)
                    continue
                if replayed is None:
                    self._send(dead.job)
                    replayed = dead.job
                self._call(functools.partial(self._poison.delete_message, message))
        except BaseException:
            keep = held
            raise
        finally:
            self._release(keep)
        if replayed is not None:
            log.info("dead job replayed", extra={"queue": self.name, "jobId": job_id})
        return replayed

    def dead_messages(self, *, limit: int = 100) -> list[DeadMessage]:
        """Up to ``limit`` messages in the poison queue, as the queue returns
        them (roughly oldest first). Each is held for a few seconds while it is
        read and then made visible again."""
        held = self._hold_poison(limit)
        try:
            return [_dead_message(message) for message in held]
        finally:
            self._release(held)

    def pending_count(self) -> int:
        """Messages in the work queue, visible or not (Azure's approximate count)."""
        properties = self._call(self._queue.get_queue_properties)
        return int(properties.approximate_message_count or 0)

    # -------------------------------------------------------- the Functions edge

    def delivery_from_message(
        self, body: str, *, message_id: str, pop_receipt: str, dequeue_count: int
    ) -> AzureDelivery:
        """The delivery in one message (as a queue trigger hands it over);
        ``InvalidRequest`` when the body is not a job."""
        job, meta = decode(body)
        runs = int(meta.get("runs") or 0)
        not_before = meta.get("notBefore")
        return AzureDelivery(
            job=job,
            receipt=pop_receipt,
            attempt=runs + max(1, dequeue_count),
            message_id=message_id,
            body=body,
            runs=runs,
            not_before=float(not_before) if not_before is not None else None,
        )

    def requeue(self, delivery: Delivery, *, delay: float) -> None:
        """Send a copy of ``delivery``'s job, visible after ``delay``, whose
        deliveries count on from this one (the Functions edge's retry: the host
        then deletes the original)."""
        self._send(delivery.job, delay=delay, runs=delivery.attempt)

    def defer(self, delivery: Delivery, *, pulled: bool = True) -> bool:
        """If ``delivery`` arrived before its ``notBefore`` (a delay over 7
        days), send the job again with the rest of the delay and return True
        (deleting this copy when ``pulled``; a trigger's host deletes it);
        otherwise return False."""
        not_before = delivery.not_before if isinstance(delivery, AzureDelivery) else None
        if not_before is None or not_before <= self._clock():
            return False
        runs = delivery.runs if isinstance(delivery, AzureDelivery) else 0
        self._send(delivery.job, not_before=not_before, runs=runs)
        if pulled:
            self.ack(delivery)
        return True

    def bury(self, job: Job | None, *, reason: str, attempts: int, body: str = "") -> None:
        """Write a copy to the poison queue with ``reason``; a message that is
        not even a job is kept as it came (``body``), wrapped with the reason."""
        now = datetime.fromtimestamp(self._clock(), UTC).isoformat()
        if job is not None:
            content = encode(job, reason=reason, attempts=attempts, dead_at=now)
        else:
            meta = {"reason": reason[:_REASON_CHARS], "attempts": attempts, "deadAt": now}
            content = json.dumps({_META: meta, _RAW: body}, separators=(",", ":"))
        self._call(
            lambda: self._poison.send_message(content, visibility_timeout=0, time_to_live=-1)
        )
        log.warning(
            "job moved to the poison queue",
            extra={
                "queue": self.name,
                "deploymentId": job.deployment_id if job else None,
                "kind": job.kind.value if job else None,
                "attempts": attempts,
                "reason": reason,
            },
        )

    # ----------------------------------------------------------------- helpers

    def _send(
        self,
        job: Job,
        *,
        delay: float = 0.0,
        runs: int = 0,
        not_before: float | None = None,
    ) -> None:
        now = self._clock()
        if not_before is None and delay > MAX_VISIBILITY_SECONDS:
            not_before = now + delay
        if not_before is not None:
            delay = not_before - now
        content = encode(job, runs=runs, not_before=not_before)
        self._call(
            lambda: self._queue.send_message(
                content, visibility_timeout=_seconds(delay), time_to_live=-1
            )
        )

    def _receive(self, client: QueueClient, count: int, visibility: int) -> list[QueueMessage]:
        """One receive call: up to ``count`` messages, invisible for ``visibility`` s."""
        messages: list[QueueMessage] = self._call(
            lambda: list(
                client.receive_messages(
                    messages_per_page=count, max_messages=count, visibility_timeout=visibility
                )
            )
        )
        return messages

    def _bury_message(self, message: QueueMessage, *, reason: str) -> None:
        """Move a received message that is no job to the poison queue as it is."""
        self.bury(
            None, reason=reason, attempts=int(message.dequeue_count or 1), body=str(message.content)
        )
        with contextlib.suppress(_StaleReceipt):
            self._call(lambda: self._queue.delete_message(message), stale_ok=True)

    def _hold_for_dead_letter(self, delivery: Delivery) -> str | None:
        """Extend the delivery's lease while its poison copy is written; the new
        pop receipt, or None when the receipt is stale."""
        message_id = _message_id(delivery)
        try:
            updated = self._call(
                lambda: self._queue.update_message(
                    message_id, delivery.receipt, visibility_timeout=_HOLD_SECONDS
                ),
                stale_ok=True,
            )
        except _StaleReceipt:
            self._log_stale("dead-letter", delivery)
            return None
        return str(updated.pop_receipt)

    def _hold_poison(self, limit: int = 1000) -> list[QueueMessage]:
        """Receive up to ``limit`` distinct poison messages, holding each
        invisible for a few seconds; stops when the queue has no more."""
        held: dict[str, QueueMessage] = {}
        while len(held) < limit:
            wanted = min(_PAGE, limit - len(held))
            page = self._receive(self._poison, wanted, _HOLD_SECONDS)
            fresh = [m for m in page if m.id not in held]
            if not fresh:
                break
            held.update((m.id, m) for m in fresh)
        return list(held.values())

    def _release(self, messages: list[QueueMessage]) -> None:
        """Make held poison messages visible again at once."""
        for message in messages:
            with contextlib.suppress(_StaleReceipt):
                self._call(
                    functools.partial(self._poison.update_message, message, visibility_timeout=0),
                    stale_ok=True,
                )

    def _settle(
        self,
        what: str,
        delivery: Delivery,
        operation: Callable[[str, str], Any],
        receipt: str,
    ) -> None:
        message_id = _message_id(delivery)
        try:
            self._call(lambda: operation(message_id, receipt), stale_ok=True)
        except _StaleReceipt:
            self._log_stale(what, delivery)

    def _log_stale(self, what: str, delivery: Delivery) -> None:
        # The message was deleted already or went to another worker after its
        # lease expired: that worker decides its fate now.
        log.warning(
            "ignored %s of a message whose receipt is no longer valid",
            what,
            extra={"queue": self.name, "jobId": delivery.job.id},
        )

    def _call(self, operation: Callable[[], Any], *, stale_ok: bool = False) -> Any:
        try:
            return operation()
        except AzureError as exc:
            self._raise(exc, stale_ok=stale_ok)

    def _raise(self, exc: AzureError, *, stale_ok: bool) -> NoReturn:
        code = error_code(exc)
        if stale_ok and code in _STALE_CODES:
            raise _StaleReceipt from None
        text = describe(exc, service="Storage Queue", operation=self.name)
        # Not chained: the SDK's exception can carry the request (a job's body).
        if is_temporary(exc) or code in _MISCONFIGURED_CODES or http_status(exc) in (401, 403):
            raise StoreUnavailable(
                f"the job queue is unavailable ({text}); try again",
                retry_after=retry_after(exc, default=5.0),
            ) from None
        raise PermanentError(f"the job queue refused a request ({text})") from None


def _create(client: QueueClient) -> None:
    with contextlib.suppress(ResourceExistsError):
        client.create_queue()


def _message_id(delivery: Delivery) -> str:
    if not isinstance(delivery, AzureDelivery) or not delivery.message_id:
        raise TypeError("an Azure Storage Queue delivery is needed to settle a message")
    return delivery.message_id


def _dead_message(message: QueueMessage) -> DeadMessage:
    body = str(message.content)
    job: Job | None
    try:
        job, meta = decode(body)
    except InvalidRequest:
        job, meta = None, {}
        wrapped = _json_object(body)
        if wrapped is not None and isinstance(wrapped.get(_RAW), str):
            body = wrapped[_RAW]
            extra = wrapped.get(_META)
            meta = extra if isinstance(extra, dict) else {}
    attempts = meta.get("attempts")
    return DeadMessage(
        message_id=str(message.id),
        job=job,
        body=body,
        reason=str(meta.get("reason") or HOST_MOVED_REASON),
        attempts=int(attempts) if attempts is not None else None,
        dead_at=str(meta["deadAt"]) if meta.get("deadAt") else None,
    )


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
