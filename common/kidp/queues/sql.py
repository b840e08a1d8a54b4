"""A durable job queue in a table of the store's database (SQLite or PostgreSQL).

The embedded broker and the on-prem broker without NATS need no queue server:
jobs live next to the deployments. Delivery is at least once, by leases:
``receive`` leases a job for ``lease_seconds``; ``ack`` finishes it; a lease
that expires (the worker crashed, was killed with -9, or took too long) makes
the job due again, and the next delivery has ``attempt`` one higher.

A receipt is ``"<job id>:<delivery count>"``, the count never going back.
Once a lease has been taken over the count has moved on, so the old holder's
``ack``, ``retry`` or ``dead_letter`` no longer matches and is ignored: only
the current holder decides the job's fate.

Enqueueing is idempotent by job id, with one twist that keeps work from being
lost: enqueueing a job that is leased right now (a handler scheduling its own
job again, "not yet, look again in 30 s") means "run it once more after this
lease", so the holder's ``ack`` makes it ready again instead of finishing it.

Claiming is race-free across threads and processes: on SQLite the claim runs
in a ``BEGIN IMMEDIATE`` transaction (writers are serialized by the file lock),
on PostgreSQL the due rows are selected ``FOR UPDATE SKIP LOCKED`` so
concurrent receivers take disjoint rows without waiting for each other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from kidp.models import Job
from kidp.ports import Delivery
from kidp.stores.sql import (
    create_tables,
    prepare_engine,
    translate_errors,
    upsert,
    write_engine,
)

__all__ = ["MAX_DELIVERIES_REASON", "SqlJobQueue"]

log = logging.getLogger(__name__)

MAX_DELIVERIES_REASON = "max deliveries exceeded"

READY = "ready"
LEASED = "leased"
DONE = "done"
DEAD = "dead"

metadata = sa.MetaData()

jobs = sa.Table(
    "kidp_jobs",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    # Epoch seconds from the queue's clock, so tests can move time by hand.
    sa.Column("available_at", sa.Float, nullable=False),
    sa.Column("lease_until", sa.Float, nullable=True),
    # Every delivery ever made; the receipt's token, so it never goes back.
    sa.Column("deliveries", sa.Integer, nullable=False),
    # Deliveries of the current run (reset when the job is enqueued again):
    # Delivery.attempt, and what max_deliveries limits.
    sa.Column("attempts", sa.Integer, nullable=False),
    # Set when the job was enqueued again while leased; ack honours it.
    sa.Column("requeue_at", sa.Float, nullable=True),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Index("kidp_jobs_due", "status", "available_at"),
    sa.Index("kidp_jobs_lease", "status", "lease_until"),
    sa.Index("kidp_jobs_finished", "status", "finished_at"),
)


def _parse_receipt(receipt: str) -> tuple[str, int]:
    job_id, sep, count = receipt.rpartition(":")
    if not sep or not job_id or not count.isdigit():
        raise ValueError(f"not a receipt from this queue: {receipt!r}")
    return job_id, int(count)


class SqlJobQueue:
    """``JobQueue`` on a table in the same database as the deployment store.

    ``max_deliveries`` bounds how often one job is handed out: the delivery that
    would exceed it moves the job to ``dead`` instead (a poison job cannot
    crash workers forever). ``clock`` returns epoch seconds.
    """

    #: How many extra claim rounds ``receive`` runs to fill a batch after some
    #: due jobs turned out to be over their delivery limit.
    _MAX_CLAIM_ROUNDS = 5

    def __init__(
        self,
        engine: Engine,
        *,
        max_deliveries: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        prepare_engine(engine)
        self._engine = engine
        self._writer = write_engine(engine)
        self._max_deliveries = max_deliveries
        self._clock = clock
        translate_errors(create_tables)(engine, metadata)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine the queue writes to."""
        return self._engine

    @translate_errors
    def enqueue(self, job: Job, *, delay: float = 0.0) -> None:
        """Make ``job`` due after ``delay`` seconds; idempotent by job id.

        An id that is waiting (ready) or dead is left as it is. An id that is
        leased is run once more after the current lease: its holder's ``ack``
        makes it due at ``now + delay`` rather than finishing it. An id that
        finished is enqueued afresh.
        """
        now = self._clock()
        due_at = now + max(delay, 0.0)
        body = job.to_json()
        values = {
            "id": job.id,
            "kind": job.kind.value,
            "body": body,
            "available_at": due_at,
            "lease_until": None,
            "deliveries": 0,
            "attempts": 0,
            "requeue_at": None,
            "status": READY,
            "reason": None,
            "created_at": now,
            "finished_at": None,
        }
        with self._writer.begin() as conn:
            if upsert(conn, jobs, values, keys=["id"], update=False).rowcount == 1:
                return
            existing = conn.execute(
                sa.select(jobs.c.status, jobs.c.requeue_at)
                .where(jobs.c.id == job.id)
                .with_for_update()
            ).one()
            if existing.status == DONE:
                fresh = {k: v for k, v in values.items() if k not in {"id", "deliveries"}}
                conn.execute(sa.update(jobs).where(jobs.c.id == job.id).values(fresh))
            elif existing.status == LEASED:
                requeue_at = (
                    due_at if existing.requeue_at is None else min(existing.requeue_at, due_at)
                )
                conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == job.id)
                    .values(requeue_at=requeue_at, body=body)
                )

    @translate_errors
    def receive(self, *, max_jobs: int, lease_seconds: float) -> list[Delivery]:
        """Lease up to ``max_jobs`` due jobs (oldest due first) for ``lease_seconds``.

        Due means ready and ``available_at`` reached, or leased with the lease
        expired. A job whose next delivery would exceed ``max_deliveries`` is
        moved to dead (reason ``"max deliveries exceeded"``) and not returned.
        """
        if max_jobs <= 0:
            return []
        now = self._clock()
        delivered: list[Delivery] = []
        with self._writer.begin() as conn:
            for _ in range(self._MAX_CLAIM_ROUNDS):
                wanted = max_jobs - len(delivered)
                claimed, buried = self._claim(conn, now, wanted, lease_seconds)
                delivered.extend(claimed)
                # Only dead-lettered rows can leave a batch short while due
                # jobs remain; without them the table has nothing more to give.
                if len(delivered) >= max_jobs or buried == 0:
                    break
        return delivered

    @translate_errors
    def ack(self, delivery: Delivery) -> None:
        """Finish the job (or, if it was enqueued again while leased, make it due
        for its next run); ignored and logged if the lease was taken over."""
        # SET expressions all read the row as it was, so one statement both
        # decides and applies.
        requeued = jobs.c.requeue_at.is_not(None)
        self._settle(
            delivery,
            "ack",
            status=sa.case((requeued, READY), else_=DONE),
            available_at=sa.case((requeued, jobs.c.requeue_at), else_=jobs.c.available_at),
            attempts=sa.case((requeued, 0), else_=jobs.c.attempts),
            finished_at=sa.case((requeued, None), else_=self._clock()),
            requeue_at=None,
            lease_until=None,
        )

    @translate_errors
    def retry(self, delivery: Delivery, *, delay: float) -> None:
        """Give the job back, due again after ``delay`` seconds; ignored if the
        lease was taken over. The attempt count is kept, so retries count
        towards ``max_deliveries``."""
        self._settle(
            delivery,
            "retry",
            status=READY,
            available_at=self._clock() + max(delay, 0.0),
            lease_until=None,
            requeue_at=None,
        )

    @translate_errors
    def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        """Give up on the job, keeping it with ``reason`` for ``dead_jobs``;
        ignored if the lease was taken over."""
        self._settle(
            delivery,
            "dead_letter",
            status=DEAD,
            reason=reason,
            finished_at=self._clock(),
            lease_until=None,
            requeue_at=None,
        )

    @translate_errors
    def dead_jobs(self) -> list[tuple[Job, str]]:
        """Dead jobs with the reason each was given up, oldest first."""
        stmt = (
            sa.select(jobs.c.body, jobs.c.reason)
            .where(jobs.c.status == DEAD)
            .order_by(jobs.c.finished_at, jobs.c.id)
        )
        with self._engine.connect() as conn:
            return [(Job.from_json(body), reason or "") for body, reason in conn.execute(stmt)]

    @translate_errors
    def replay_dead(self, job_id: str) -> Job | None:
        """Make the dead job ``job_id`` due now with its deliveries counted from 1;
        None when no job with that id is dead."""
        with self._writer.begin() as conn:
            body = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == DEAD)
                .values(
                    status=READY,
                    available_at=self._clock(),
                    attempts=0,
                    reason=None,
                    finished_at=None,
                    lease_until=None,
                    requeue_at=None,
                )
                .returning(jobs.c.body)
            ).scalar_one_or_none()
        return None if body is None else Job.from_json(body)

    @translate_errors
    def pending_count(self) -> int:
        """Jobs not yet finished: ready (due or delayed) or leased."""
        stmt = sa.select(sa.func.count()).where(jobs.c.status.in_([READY, LEASED]))
        with self._engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    @translate_errors
    def purge_done(self, *, before: datetime | float) -> int:
        """Delete acknowledged jobs finished before ``before`` (a datetime, or epoch
        seconds on the queue's clock); returns how many. Dead jobs are kept."""
        cutoff = before.timestamp() if isinstance(before, datetime) else float(before)
        with self._writer.begin() as conn:
            result = conn.execute(
                sa.delete(jobs).where(jobs.c.status == DONE, jobs.c.finished_at < cutoff)
            )
        return int(result.rowcount)

    @translate_errors
    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless the database answers ``SELECT 1``."""
        with self._engine.connect() as conn:
            conn.execute(sa.select(1))

    # ---------------------------------------------------------------- helpers

    def _claim(
        self, conn: Connection, now: float, wanted: int, lease_seconds: float
    ) -> tuple[list[Delivery], int]:
        """One claim round: (deliveries handed out, jobs moved to dead)."""
        due = sa.or_(
            sa.and_(jobs.c.status == READY, jobs.c.available_at <= now),
            sa.and_(jobs.c.status == LEASED, jobs.c.lease_until <= now),
        )
        # SQLite renders no FOR UPDATE; its BEGIN IMMEDIATE already excludes
        # every other writer for the whole claim.
        rows = conn.execute(
            sa.select(jobs.c.id, jobs.c.body, jobs.c.deliveries, jobs.c.attempts)
            .where(due)
            .order_by(jobs.c.available_at, jobs.c.created_at, jobs.c.id)
            .limit(wanted)
            .with_for_update(skip_locked=True)
        ).all()
        claimed: list[Delivery] = []
        buried = 0
        for row in rows:
            attempt = int(row.attempts) + 1
            token = int(row.deliveries) + 1
            this_delivery = sa.and_(jobs.c.id == row.id, jobs.c.deliveries == row.deliveries)
            if attempt > self._max_deliveries:
                conn.execute(
                    sa.update(jobs)
                    .where(this_delivery)
                    .values(
                        status=DEAD,
                        reason=MAX_DELIVERIES_REASON,
                        finished_at=now,
                        lease_until=None,
                    )
                )
                log.warning("job %s dead after %d deliveries", row.id, row.attempts)
                buried += 1
                continue
            result = conn.execute(
                sa.update(jobs)
                .where(this_delivery)
                .values(
                    status=LEASED,
                    lease_until=now + lease_seconds,
                    deliveries=token,
                    attempts=attempt,
                )
            )
            if result.rowcount == 1:
                claimed.append(
                    Delivery(
                        job=Job.from_json(row.body),
                        receipt=f"{row.id}:{token}",
                        attempt=attempt,
                    )
                )
        return claimed, buried

    def _settle(self, delivery: Delivery, action: str, **values: Any) -> None:
        """Apply ``values`` to the job if ``delivery`` still holds its lease."""
        job_id, deliveries = _parse_receipt(delivery.receipt)
        with self._writer.begin() as conn:
            result = conn.execute(
                sa.update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.deliveries == deliveries,
                    jobs.c.status == LEASED,
                )
                .values(**values)
            )
        if result.rowcount != 1:
            # The lease expired and the job went to another worker (or was
            # already settled): that worker's outcome counts, not ours.
            log.warning(
                "ignored %s of job %s delivery %d: the lease is no longer held",
                action,
                job_id,
                deliveries,
            )
