"""One job, one outcome: the retry decision every queue technology shares.

The core raises typed errors; this module turns the result of working a job
into what the queue should do with its message. Each queue edge (the
embedded worker, the SQS-triggered Lambda, the NATS consumer) maps the three
outcomes onto its own technology once:

* ``ack``: done (including "nothing to do"); delete the message
* ``retry``: deliver it again after ``delay`` seconds
* ``dead``: the deployment has been failed with a callback (``give_up``);
  move the message to the dead-letter queue

A sync job (a watcher saw a change) never fails a deployment: it only brings
a check forward that the next poll or drift scan makes anyway, so a sync that
cannot finish is dropped, never dead-lettered (its id is fixed per
deployment, and a dead id would swallow every later sync).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from kidp.errors import BrokerError, TemporaryError
from kidp.models import Job, JobKind
from kidp.observability import correlation_id
from kidp.service import BrokerService

log = logging.getLogger("kidp.work")

#: Why a job delivered more often than allowed is given up without running it.
OVER_DELIVERED = "the worker stopped during each of its deliveries (crash or timeout)"


@dataclass(frozen=True)
class Outcome:
    """What to do with a job's message after one delivery."""

    action: Literal["ack", "retry", "dead"]
    delay: float = 0.0
    reason: str = ""


def backoff(attempt: int, *, base: float = 1.0, cap: float = 300.0) -> float:
    """Delay before delivery ``attempt + 1`` of a failing job: 1, 2, 4 ... capped."""
    return float(min(cap, base * 2 ** max(0, attempt - 1)))


def work(service: BrokerService, job: Job, *, attempt: int, max_deliveries: int) -> Outcome:
    """Work ``job`` (delivery number ``attempt``) and decide what happens to its message.

    A temporary error or an unexpected exception is retried with backoff until
    ``max_deliveries``; then, like a permanent error of the job itself, the
    deployment is failed with a callback before the message is dead-lettered.
    A delivery beyond ``max_deliveries`` means the worker itself died on every
    earlier one (a Lambda timeout or out of memory leaves no exception to
    count): the job is given up without running it again.
    """
    token = correlation_id.set(job.deployment_id)
    try:
        if attempt > max_deliveries:
            log.error("job given up unrun", extra={"kind": job.kind.value, "attempt": attempt})
            return _give_up(service, job, OVER_DELIVERED)
        service.handle(job)
    except TemporaryError as exc:
        delay = max(exc.retry_after, backoff(attempt))
        return _retry_or_give_up(service, job, attempt, max_deliveries, exc.message, delay)
    except BrokerError as exc:
        # handle() turns permanent errors of deployment jobs into Failed;
        # reaching here means the job itself is unusable.
        log.error("job dropped", extra={"kind": job.kind.value, "reason": exc.message})
        return _give_up(service, job, exc.message)
    except Exception as exc:
        log.exception("job crashed", extra={"kind": job.kind.value})
        reason = type(exc).__name__
        return _retry_or_give_up(service, job, attempt, max_deliveries, reason, backoff(attempt))
    finally:
        correlation_id.reset(token)
    return Outcome("ack")


def _retry_or_give_up(
    service: BrokerService,
    job: Job,
    attempt: int,
    max_deliveries: int,
    reason: str,
    delay: float,
) -> Outcome:
    if attempt >= max_deliveries:
        return _give_up(service, job, reason)
    return Outcome("retry", delay=delay, reason=reason)


def _give_up(service: BrokerService, job: Job, reason: str) -> Outcome:
    if job.kind is JobKind.SYNC:
        log.warning(
            "sync dropped; the next poll or drift scan checks again",
            extra={"deploymentId": job.deployment_id, "reason": reason},
        )
        return Outcome("ack", reason=reason)
    service.give_up(job, reason)
    return Outcome("dead", reason=reason)
