"""Jobs on NATS JetStream: the on-prem broker's ``JobQueue`` (``nats://host:4222/<stream>``).

The port is synchronous and nats-py is asyncio, so each queue runs a private
event loop in a daemon thread; every public method hands one coroutine to it
and waits with a timeout. Nothing hangs: a call that NATS does not answer in
time, or any call while the connection is down, raises ``StoreUnavailable``
(temporary), so an enqueue during an outage is refused loudly, never dropped.
nats-py reconnects on its own; the queue works again as soon as it has.

JetStream objects (created or updated on start; the stream name comes from
the URL path, default ``KIDP_JOBS``)::

    stream <S>         file storage, work-queue retention: a message lives
                       until it is acknowledged, so the stream holds exactly
                       the outstanding work and nothing needs purging.
                       One message per subject, new ones refused
                       (discard new per subject), duplicate window 2 min.
      <S>.jobs.<kind>.<job id>    due jobs      -> durable pull consumer "workers"
      <S>.later.<kind>.<job id>   delayed jobs  -> durable pull consumer "timer"
    stream <S>_DEAD    file storage, limits retention: the last dead copy of
      <S>_DEAD.<job id>           each job id, with its reason, until replayed

**Delay.** JetStream 2.9 has no per-message delay, and a not-yet-due message
that is negatively acknowledged with a delay counts as a delivery. So delayed
jobs wait on their own subject: the "timer" consumer hands them to a mover
task (run by every queue that receives), which NAKs a job with the remaining
delay until it is due and then publishes it to the jobs subject. The workers
consumer therefore only ever sees due jobs, and its delivery count is exactly
``Delivery.attempt``: first delivery, redeliveries after an expired lease,
and retries (a NAK with a delay) all count, as in ``SqlJobQueue``.

**Leases.** A lease is the workers consumer's ack wait (``ack_wait_seconds``,
the broker's job lease): a job not settled in time is delivered again, which
is what survives a kill -9. JetStream accepts a late acknowledgement even
after it has handed the job to another worker, so the queue keeps the leases
it handed out and ignores (and logs) ``ack``/``retry``/``dead_letter`` once a
lease has expired: only the current holder decides the job's fate. A receipt
is only valid on the queue instance that handed it out.

**Max deliveries.** JetStream's own ``max_deliver`` is unlimited on purpose:
at its limit JetStream stops delivering but keeps the message (forever, in a
work-queue stream). Instead the broker decides: ``kidp.work`` gives up (fails
the deployment with a callback) on delivery ``max_deliveries`` and calls
``dead_letter``; a delivery beyond it (the worker died on the last one) is
moved to the dead-letter stream with the reason ``"max deliveries exceeded"``
and never handed out.

**Enqueue is idempotent by job id**, as the port promises, from the one
message per subject rule plus a look at what exists for the id:

* a job waiting (never delivered, or delayed) -> no-op;
* a dead job -> no-op (``replay_dead`` brings it back);
* a job leased by this queue (a handler re-enqueueing its own job) -> run once
  more after the holder's ``ack``, which publishes the follow-up to the
  delayed subject before acknowledging; ``retry`` and ``dead_letter`` drop it;
* a job delivered by another process and not yet acknowledged -> a follow-up
  is scheduled on the delayed subject; the mover cannot publish it while the
  delivered copy still holds the jobs subject, so it runs after that copy is
  acknowledged. A job waiting to be retried counts as delivered here, so in
  that case it runs once more than ``SqlJobQueue`` would run it;
* anything else -> a fresh job, attempt counting from 1.

Moves carry ``Nats-Msg-Id = <job id>:<sequence of the delayed copy>`` (a new
generation per scheduled run), so a mover that dies between publishing and
acknowledging cannot run a job twice; dead letters carry one per delivery.

What is at-least-once: a job can run more than once if its worker outlives
its lease, dies after the work but before the ``ack``, or if a publish timed
out after the server stored it. A job acknowledged by ``enqueue`` (the server
confirmed the write to its file store) survives a server kill -9; power-loss
durability needs a replicated stream (``replicas=3``) or a server that syncs
every write. Order is by stream sequence, not strictly oldest due first.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlparse

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from pydantic import ValidationError

from kidp.errors import StoreUnavailable, ValidationFailed
from kidp.models import Job
from kidp.ports import Delivery
from kidp.queues.sql import MAX_DELIVERIES_REASON

__all__ = ["DEFAULT_STREAM", "MAX_DELIVERIES_REASON", "NatsJobQueue", "parse_nats_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_STREAM = "KIDP_JOBS"
#: The durable consumer of due jobs, shared by every worker of the stream.
WORKERS = "workers"
#: The durable consumer of delayed jobs, shared by every mover of the stream.
TIMER = "timer"
NOT_BEFORE = "Kidp-Not-Before"
MSG_ID = "Nats-Msg-Id"

# JetStream API error codes the queue acts on.
_SUBJECT_FULL = 10077  # maximum messages per subject exceeded: the id is taken
_NO_MESSAGE = 10037  # no message found
_STREAM_CONFIG_DIFFERS = 10058  # stream name already in use with a different configuration

#: Covers the timer's ack wait many times over, so a move redone after a
#: mover died is always recognised as a duplicate.
DUPLICATE_WINDOW = 120.0
#: How long a mover may hold a delayed job before another mover takes it:
#: moving takes milliseconds, and a NAK's delay does not depend on it.
TIMER_ACK_WAIT = 3.0
#: How soon a mover looks again at a due follow-up whose job is still held.
SLOT_BUSY_RETRY = 0.5
RECONNECT_WAIT = 1
MOVER_BATCH = 64
#: A lease handed out but never settled is forgotten after this many ack waits.
_LEASE_MEMORY = 10
#: Extra fetch rounds ``receive`` runs to fill a batch after burying jobs.
_MAX_FETCH_ROUNDS = 5

_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,200}")


def parse_nats_url(url: str) -> tuple[list[str], str]:
    """Split ``nats://[user:pass@]host:port[,host:port...]/<stream>`` into the
    server URLs nats-py takes and the stream name (default ``KIDP_JOBS``)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("nats", "tls") or not parsed.netloc:
        raise ValidationFailed("KIDP_QUEUE_URL must look like nats://host:4222/<stream>")
    userinfo, _, hosts = parsed.netloc.rpartition("@")
    prefix = f"{parsed.scheme}://{userinfo + '@' if userinfo else ''}"
    servers = [prefix + host for host in hosts.split(",") if host]
    stream = parsed.path.strip("/") or DEFAULT_STREAM
    if not _STREAM_NAME.fullmatch(stream):
        raise ValidationFailed(
            f"NATS stream name {stream!r} may only hold letters, digits, '_' and '-'"
        )
    return servers, stream


def subject_token(job_id: str) -> str:
    """The job id as one subject token: as it is when it is safe (ids are uuids
    or event ids), else ``~`` + unpadded URL-safe base64, which no plain id
    can collide with."""
    if _PLAIN_TOKEN.fullmatch(job_id):
        return job_id
    return "~" + base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=")


def _nak(delay: float) -> bytes:
    """A negative acknowledgement asking JetStream to redeliver after ``delay`` seconds."""
    return b"-NAK " + json.dumps({"delay": max(0, int(delay * 1e9))}).encode()


def _is_outage(exc: BaseException) -> bool:
    """True for failures that mean "NATS cannot be reached right now"."""
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code == 503 and exc.err_code != _SUBJECT_FULL
    return isinstance(
        exc,
        (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.StaleConnectionError,
            nats.errors.OutboundBufferLimitError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionDrainingError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.NoServersError,
            nats.js.errors.NoStreamResponseError,
            OSError,
            TimeoutError,
        ),
    )


@dataclass
class _Lease:
    """A delivery this queue handed out and has not settled."""

    job: Job
    sequence: int
    delivered: int
    #: Monotonic time after which JetStream may have given the job to another worker.
    deadline: float
    #: Epoch time of the run requested by enqueueing the job while it is held.
    requeue_at: float | None = None
    requeue_job: Job | None = None


class NatsJobQueue:
    """``JobQueue`` on NATS JetStream; see the module docstring for the design.

    ``ack_wait_seconds`` is the lease; ``max_deliveries`` bounds deliveries per
    run; ``connect_timeout`` bounds the first connection; every later call is
    bounded by ``request_timeout``. ``receive`` waits up to
    ``receive_wait_seconds`` for a job when none is due. ``replicas`` is the
    streams' replication factor on a NATS cluster.
    """

    def __init__(
        self,
        url: str,
        *,
        max_deliveries: int = 10,
        ack_wait_seconds: float = 60.0,
        connect_timeout: float = 5.0,
        request_timeout: float = 5.0,
        receive_wait_seconds: float = 0.5,
        replicas: int = 1,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        if ack_wait_seconds <= 0 or connect_timeout <= 0 or request_timeout <= 0:
            raise ValueError("ack_wait_seconds and the timeouts must be positive")
        if receive_wait_seconds <= 0:
            raise ValueError("receive_wait_seconds must be positive")
        servers, stream = parse_nats_url(url)
        self.stream = stream
        self.dead_stream = f"{stream}_DEAD"
        self._where = f"{urlparse(servers[0]).hostname}:{urlparse(servers[0]).port or 4222}"
        self._max_deliveries = max_deliveries
        self._ack_wait = float(ack_wait_seconds)
        self._request_timeout = float(request_timeout)
        self._receive_wait = float(receive_wait_seconds)
        self._replicas = replicas
        # Settle no later than this before JetStream's own timer runs out: our
        # clock starts when the fetch returns, JetStream's when it sent the job.
        self._lease_guard = min(1.0, self._ack_wait / 10)
        self._jobs_prefix = f"{stream}.jobs."
        self._later_prefix = f"{stream}.later."
        # Touched only on the event loop thread, so they need no lock.
        self._leases: dict[str, _Lease] = {}
        self._held: dict[str, str] = {}  # job id -> receipt of its live lease
        self._idle_subs: list[JetStreamContext.PullSubscription] = []
        self._mover: asyncio.Task[None] | None = None
        self._warned_leases: set[float] = set()
        self._outage_logged = False
        self._closing = False
        self._closed = False
        self._nc = Client()
        self._js = self._nc.jetstream(timeout=self._request_timeout)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"nats-queue-{stream}", daemon=True
        )
        self._thread.start()
        try:
            self._run(
                self._start(servers, connect_timeout),
                timeout=connect_timeout + 4 * self._request_timeout,
            )
        except BaseException:
            self._stop_loop()
            raise

    @property
    def ack_wait_seconds(self) -> float:
        """The lease every delivery gets (the workers consumer's ack wait)."""
        return self._ack_wait

    # ------------------------------------------------------------------- port

    def enqueue(self, job: Job, *, delay: float = 0.0) -> None:
        """Make ``job`` due after ``delay`` seconds; idempotent by job id (see the
        module docstring). Raises ``StoreUnavailable`` unless NATS stored it."""
        self._run(self._enqueue(job, max(delay, 0.0)))

    def receive(self, *, max_jobs: int, lease_seconds: float) -> list[Delivery]:
        """Lease up to ``max_jobs`` due jobs. The lease is the consumer's ack wait;
        a different ``lease_seconds`` is logged once and otherwise ignored."""
        if max_jobs <= 0:
            return []
        if lease_seconds != self._ack_wait and lease_seconds not in self._warned_leases:
            self._warned_leases.add(lease_seconds)
            log.warning(
                "NATS leases last the consumer's ack wait, not the lease asked for",
                extra={"askedSeconds": lease_seconds, "ackWaitSeconds": self._ack_wait},
            )
        return self._run(
            self._receive(max_jobs), timeout=self._receive_wait + 3 * self._request_timeout
        )

    def ack(self, delivery: Delivery) -> None:
        """Finish the job, or publish the run requested while it was held first."""
        self._run(self._settle(delivery, "ack"))

    def retry(self, delivery: Delivery, *, delay: float) -> None:
        """Deliver the job again after ``delay`` seconds; the attempt count goes on."""
        self._run(self._settle(delivery, "retry", delay=max(delay, 0.0)))

    def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        """Move the job to the dead-letter stream with ``reason``."""
        self._run(self._settle(delivery, "dead_letter", reason=reason))

    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless JetStream answers for the stream."""
        self._run(self._check())

    # ------------------------------------------------------------- operations

    def dead_jobs(self) -> list[tuple[Job, str]]:
        """Dead jobs with the reason each was given up, oldest first."""
        return self._run(self._dead_jobs(), timeout=60.0)

    def replay_dead(self, job_id: str) -> Job | None:
        """Enqueue a dead job afresh (attempts from 1) and forget its dead copy;
        returns the job, or None if no job with that id is dead."""
        return self._run(self._replay_dead(job_id))

    def pending_count(self) -> int:
        """Jobs not yet finished: due, delayed, leased or waiting for a retry."""
        return self._run(self._pending_count())

    def close(self) -> None:
        """Stop the mover, close the connection and the event loop (idempotent).
        Unsettled leases expire and their jobs are delivered again elsewhere."""
        if self._closed:
            return
        self._closing = True
        try:
            self._run(self._shutdown(), timeout=self._request_timeout + 2)
        except Exception:
            log.warning("NATS job queue did not close cleanly", exc_info=True)
        finally:
            self._closed = True
            self._stop_loop()

    # ---------------------------------------------------------------- bridge

    def _run(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T:
        """Run ``coro`` on the queue's loop; outages become ``StoreUnavailable``."""
        if self._closed:
            coro.close()
            raise StoreUnavailable("the NATS job queue is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout if timeout is not None else 3 * self._request_timeout)
        except concurrent.futures.TimeoutError as exc:
            # Also nats-py's own timeouts: in Python 3.11 both are TimeoutError.
            future.cancel()
            raise StoreUnavailable(
                f"NATS at {self._where} did not answer in time; try again"
            ) from exc
        except StoreUnavailable:
            raise
        except Exception as exc:
            if not _is_outage(exc):
                raise
            log.warning("NATS unavailable: %s", exc)
            raise StoreUnavailable(
                f"NATS at {self._where} is unavailable ({type(exc).__name__}); try again"
            ) from exc

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def _require_connection(self) -> None:
        # While nats-py reconnects it buffers what it is given and may send it
        # much later, after the caller was told it failed: refuse instead.
        if not self._nc.is_connected:
            raise StoreUnavailable(f"not connected to NATS at {self._where}; try again")

    # ----------------------------------------------------------------- setup

    async def _start(self, servers: list[str], connect_timeout: float) -> None:
        try:
            # Reconnecting forever also applies to the first connection in
            # nats-py, so bound that one here.
            await asyncio.wait_for(
                self._nc.connect(
                    servers=servers,
                    name="kidp-broker",
                    connect_timeout=max(1, round(connect_timeout)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=RECONNECT_WAIT,
                    # Notice a silent network loss within a minute, not nats-py's four.
                    ping_interval=20,
                    max_outstanding_pings=3,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ),
                timeout=connect_timeout,
            )
        except BaseException:
            await self._nc.close()
            raise
        try:
            await self._declare()
        except BaseException:
            await self._nc.close()
            raise

    async def _declare(self) -> None:
        """Create or update the streams and consumers this queue uses."""
        js = self._js
        await self._ensure_stream(
            js,
            api.StreamConfig(
                name=self.stream,
                description="KIDP broker jobs: due (jobs.*) and delayed (later.*)",
                subjects=[f"{self._jobs_prefix}>", f"{self._later_prefix}>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                discard=api.DiscardPolicy.NEW,
                discard_new_per_subject=True,
                max_msgs_per_subject=1,
                duplicate_window=DUPLICATE_WINDOW,
                num_replicas=self._replicas,
            ),
        )
        await self._ensure_stream(
            js,
            api.StreamConfig(
                name=self.dead_stream,
                description="KIDP broker jobs given up, with the reason",
                subjects=[f"{self.dead_stream}.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                discard=api.DiscardPolicy.OLD,
                max_msgs_per_subject=1,
                duplicate_window=DUPLICATE_WINDOW,
                num_replicas=self._replicas,
            ),
        )
        # Creating an existing durable consumer updates it, so the ack wait
        # follows the configured lease (the last replica started wins).
        for name, prefix, ack_wait in (
            (WORKERS, self._jobs_prefix, self._ack_wait),
            (TIMER, self._later_prefix, TIMER_ACK_WAIT),
        ):
            await js.add_consumer(
                self.stream,
                api.ConsumerConfig(
                    name=name,
                    durable_name=name,
                    filter_subject=f"{prefix}>",
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=ack_wait,
                    max_deliver=-1,
                    # Leased, retrying and (for the timer) delayed jobs all count
                    # as pending: a cap would stall delivery under a backlog.
                    max_ack_pending=-1,
                ),
            )

    @staticmethod
    async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
        try:
            await js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code != _STREAM_CONFIG_DIFFERS:
                raise
            try:
                await js.update_stream(config)
            except nats.js.errors.APIError as update_error:
                if _is_outage(update_error):
                    raise
                raise ValidationFailed(
                    f"NATS stream {config.name} exists with a configuration the broker "
                    f"cannot use: {update_error.description}"
                ) from update_error

    async def _on_error(self, exc: Exception) -> None:
        # nats-py reports every failed reconnect attempt; say it once per outage.
        if not self._outage_logged:
            log.warning("NATS connection error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing and not self._outage_logged:
            self._outage_logged = True
            log.warning("lost the connection to NATS; reconnecting", extra={"nats": self._where})

    async def _on_reconnected(self) -> None:
        self._outage_logged = False
        log.info("reconnected to NATS", extra={"nats": self._where})

    async def _shutdown(self) -> None:
        if self._mover is not None:
            self._mover.cancel()
            await asyncio.gather(self._mover, return_exceptions=True)
        await self._nc.close()

    # ---------------------------------------------------------------- enqueue

    def _subject(self, prefix: str, job: Job) -> str:
        return f"{prefix}{job.kind.value}.{subject_token(job.id)}"

    def _dead_subject(self, job_id: str) -> str:
        return f"{self.dead_stream}.{subject_token(job_id)}"

    async def _enqueue(self, job: Job, delay: float, *, revive: bool = False) -> None:
        self._require_connection()
        due = time.time() + delay
        lease = self._live_lease(job.id)
        if lease is not None:
            # The holder is re-enqueueing its own job: run it once more after the ack.
            lease.requeue_at = due if lease.requeue_at is None else min(lease.requeue_at, due)
            lease.requeue_job = job
            return
        jobs_subject = self._subject(self._jobs_prefix, job)
        dead, later, current = await asyncio.gather(
            self._last(self.dead_stream, self._dead_subject(job.id)),
            self._last(self.stream, self._subject(self._later_prefix, job)),
            self._last(self.stream, jobs_subject),
        )
        if (dead is not None and not revive) or later is not None:
            return  # dead stays dead; a scheduled run is waiting already
        if current is None:
            if delay > 0:
                await self._publish_later(job, due)
            else:
                # False: another enqueue of the same id won the race; it waits.
                await self._publish(jobs_subject, job.to_json().encode())
            return
        info = await self._js.consumer_info(self.stream, WORKERS)
        if current.seq is not None and current.seq > info.delivered.stream_seq:
            return  # waiting, never delivered
        # Delivered and not yet acknowledged: run it once more after that.
        await self._publish_later(job, due)

    async def _publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> bool:
        """Publish and wait for JetStream to store it; False if the subject
        already holds a message (the job id is taken)."""
        try:
            await self._js.publish(
                subject,
                payload,
                timeout=self._request_timeout,
                stream=self.stream,
                headers=headers,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _SUBJECT_FULL:
                return False
            raise
        return True

    async def _publish_later(self, job: Job, due: float, *, msg_id: str | None = None) -> bool:
        headers = {NOT_BEFORE: repr(due)}
        if msg_id is not None:
            headers[MSG_ID] = msg_id
        return await self._publish(
            self._subject(self._later_prefix, job), job.to_json().encode(), headers
        )

    async def _last(self, stream: str, subject: str) -> api.RawStreamMsg | None:
        try:
            return await self._js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _NO_MESSAGE:
                return None
            raise

    # ---------------------------------------------------------------- receive

    def _live_lease(self, job_id: str) -> _Lease | None:
        receipt = self._held.get(job_id)
        lease = self._leases.get(receipt) if receipt is not None else None
        if lease is None or time.monotonic() > lease.deadline:
            return None
        return lease

    async def _receive(self, max_jobs: int) -> list[Delivery]:
        self._require_connection()
        if self._mover is None or self._mover.done():
            self._mover = asyncio.get_running_loop().create_task(self._move_forever())
        self._forget_old_leases()
        sub = (
            self._idle_subs.pop()
            if self._idle_subs
            else await self._js.pull_subscribe_bind(consumer=WORKERS, stream=self.stream)
        )
        delivered: list[Delivery] = []
        reusable = False
        try:
            wait = self._receive_wait
            for _ in range(_MAX_FETCH_ROUNDS):
                wanted = max_jobs - len(delivered)
                msgs = await self._fetch(sub, wanted, wait)
                reusable = len(msgs) == wanted
                buried = 0
                for msg in msgs:
                    delivery = await self._admit(msg)
                    if delivery is None:
                        buried += 1
                    else:
                        delivered.append(delivery)
                # Only buried jobs can leave a batch short while more are due.
                if len(delivered) >= max_jobs or buried == 0:
                    break
                wait = min(wait, 0.05)
        finally:
            # One subscription per concurrent caller: fetches sharing an inbox
            # would take each other's replies. A fetch that came back short
            # waited for its pull request to expire, and a job the server sent
            # just as it expired would sit in the inbox with its lease running:
            # drop that inbox, so such a job is redelivered rather than handed
            # out late.
            if reusable:
                self._idle_subs.append(sub)
            else:
                with contextlib.suppress(nats.errors.Error, ValueError):
                    await sub.unsubscribe()
        return delivered

    @staticmethod
    async def _fetch(sub: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
        try:
            return await sub.fetch(batch=batch, timeout=wait)
        except TimeoutError:
            # nats-py raises its own TimeoutError or asyncio's, which in
            # Python 3.11 both are: nothing was due.
            return []

    async def _admit(self, msg: Msg) -> Delivery | None:
        """The delivery for ``msg``, or None after burying it (over its limit, or
        not a job at all)."""
        meta = msg.metadata
        sequence, attempt = meta.sequence.stream, meta.num_delivered
        if attempt > self._max_deliveries:
            log.warning("job dead after %d deliveries", attempt - 1, extra={"subject": msg.subject})
            await self._bury(msg, MAX_DELIVERIES_REASON, attempt - 1)
            return None
        try:
            job = Job.from_json(msg.data)
        except ValidationError:
            log.error("unreadable job message buried", extra={"subject": msg.subject})
            await self._bury(msg, "unreadable job message", attempt)
            return None
        receipt = msg.reply
        self._leases[receipt] = _Lease(
            job=job,
            sequence=sequence,
            delivered=attempt,
            deadline=time.monotonic() + self._ack_wait - self._lease_guard,
        )
        self._held[job.id] = receipt
        return Delivery(job=job, receipt=receipt, attempt=attempt)

    async def _bury(self, msg: Msg, reason: str, attempts: int) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        body = msg.data.decode("utf-8", errors="replace")
        await self._publish_dead(token, body, reason, attempts, msg.metadata.sequence.stream)
        await self._answer(msg.reply, b"+TERM")

    def _forget_old_leases(self) -> None:
        horizon = time.monotonic() - _LEASE_MEMORY * self._ack_wait
        for receipt, lease in list(self._leases.items()):
            if lease.deadline < horizon:
                self._drop_lease(receipt, lease)

    def _drop_lease(self, receipt: str, lease: _Lease) -> None:
        self._leases.pop(receipt, None)
        if self._held.get(lease.job.id) == receipt:
            del self._held[lease.job.id]

    # ----------------------------------------------------------------- settle

    async def _settle(
        self,
        delivery: Delivery,
        action: str,
        *,
        delay: float = 0.0,
        reason: str = "",
    ) -> None:
        self._require_connection()
        receipt = delivery.receipt
        lease = self._leases.get(receipt)
        if lease is None:
            log.warning(
                "ignored %s of job %s: this queue holds no such lease (settled already, "
                "or handed out elsewhere)",
                action,
                delivery.job.id,
            )
            return
        if action == "ack" and lease.requeue_at is not None and lease.requeue_job is not None:
            # Before the ack, so the requested run survives a crash in between.
            await self._publish_later(
                lease.requeue_job,
                lease.requeue_at,
                msg_id=f"{subject_token(lease.job.id)}:{lease.sequence}:{lease.delivered}:again",
            )
        if time.monotonic() > lease.deadline:
            self._drop_lease(receipt, lease)
            log.warning(
                "ignored %s of job %s delivery %d: the lease expired and the job may be "
                "with another worker",
                action,
                lease.job.id,
                lease.delivered,
            )
            return
        if action == "ack":
            await self._answer(receipt, b"+ACK")
        elif action == "retry":
            await self._answer(receipt, _nak(delay))
        else:
            token = subject_token(lease.job.id)
            await self._publish_dead(
                token, lease.job.to_json(), reason, lease.delivered, lease.sequence
            )
            await self._answer(receipt, b"+TERM")
        self._drop_lease(receipt, lease)

    async def _answer(self, receipt: str, verdict: bytes) -> None:
        """Send ``verdict`` for a delivery and wait until JetStream has taken it."""
        await self._nc.request(receipt, verdict, timeout=self._request_timeout)

    async def _publish_dead(
        self, token: str, body: str, reason: str, attempts: int, sequence: int
    ) -> None:
        letter = {
            "job": body,
            "reason": reason,
            "attempts": attempts,
            "deadAt": datetime.now(UTC).isoformat(),
        }
        await self._js.publish(
            f"{self.dead_stream}.{token}",
            json.dumps(letter).encode(),
            timeout=self._request_timeout,
            stream=self.dead_stream,
            # One dead copy per delivery, however often this is retried.
            headers={MSG_ID: f"{token}:{sequence}:dead"},
        )

    # ------------------------------------------------------------------ mover

    async def _move_forever(self) -> None:
        """Publish delayed jobs to the jobs subject once due (see the module docstring)."""
        sub = await self._js.pull_subscribe_bind(consumer=TIMER, stream=self.stream)
        while True:
            if not self._nc.is_connected:
                await asyncio.sleep(RECONNECT_WAIT)
                continue
            try:
                msgs = await sub.fetch(batch=MOVER_BATCH, timeout=1.0)
            except TimeoutError:
                continue
            except Exception as exc:
                if not _is_outage(exc):
                    log.exception("delayed-job mover failed; retrying")
                await asyncio.sleep(RECONNECT_WAIT)
                continue
            results = await asyncio.gather(*(self._move(m) for m in msgs), return_exceptions=True)
            for result in results:
                if isinstance(result, Exception) and not _is_outage(result):
                    log.error("moving a delayed job failed", exc_info=result)

    async def _move(self, msg: Msg) -> None:
        try:
            not_before = float((msg.headers or {}).get(NOT_BEFORE, "0"))
        except ValueError:
            not_before = 0.0  # not one of ours: due now rather than stuck
        wait = not_before - time.time()
        if wait > 0:
            await self._answer(msg.reply, _nak(wait))
            return
        jobs_subject = self._jobs_prefix + msg.subject[len(self._later_prefix) :]
        token = msg.subject.rsplit(".", 1)[-1]
        moved = await self._publish(
            jobs_subject, msg.data, {MSG_ID: f"{token}:{msg.metadata.sequence.stream}"}
        )
        if moved:
            await self._answer(msg.reply, b"+ACK")
        else:
            # The job's earlier run still holds the subject: look again soon.
            await self._answer(msg.reply, _nak(SLOT_BUSY_RETRY))

    # ------------------------------------------------------------- operations

    async def _check(self) -> None:
        self._require_connection()
        await self._js.stream_info(self.stream)

    async def _pending_count(self) -> int:
        self._require_connection()
        info = await self._js.stream_info(self.stream)
        return int(info.state.messages)

    async def _dead_letters(self) -> list[tuple[int, dict[str, Any]]]:
        """(sequence, letter) of every dead job, oldest first."""
        self._require_connection()
        letters: list[tuple[int, dict[str, Any]]] = []
        sequence = 1
        while True:
            try:
                raw = await self._js.get_msg(
                    self.dead_stream, sequence, subject=f"{self.dead_stream}.>", next=True
                )
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code == _NO_MESSAGE:
                    return letters
                raise
            assert raw.seq is not None
            letters.append((raw.seq, json.loads(raw.data or b"{}")))
            sequence = raw.seq + 1

    async def _dead_jobs(self) -> list[tuple[Job, str]]:
        dead: list[tuple[Job, str]] = []
        for sequence, letter in await self._dead_letters():
            try:
                dead.append((Job.from_json(letter["job"]), str(letter.get("reason", ""))))
            except (KeyError, ValidationError):
                log.warning("skipped an unreadable dead job", extra={"sequence": sequence})
        return dead

    async def _replay_dead(self, job_id: str) -> Job | None:
        self._require_connection()
        raw = await self._last(self.dead_stream, self._dead_subject(job_id))
        if raw is None or raw.seq is None:
            return None
        job = Job.from_json(json.loads(raw.data or b"{}")["job"])
        await self._enqueue(job, 0.0, revive=True)
        # After the enqueue: a crash in between leaves it listed, not lost.
        await self._js.delete_msg(self.dead_stream, raw.seq)
        return job
