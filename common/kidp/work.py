"""One job, one outcome: the retry decision every queue technology shares.

The core raises typed errors; this module turns the result of working a job
into what the queue should do with its message. Each queue edge (the
embedded worker, the SQS-triggered Lambda, the NATS consumer) maps the three
outcomes onto its own technology once:

* ``ack``: done (including "nothing to do"); delete the message
* ``retry``: deliver it again after ``delay`` seconds
* ``dead``: the deployment has been failed with a callback (``give_up``);
  move the message to the dead-letter queue
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from kidp.errors import BrokerError, TemporaryError
from kidp.models import Job
from kidp.observability import correlation_id
from kidp.service import BrokerService

log = logging.getLogger("kidp.work")


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
    """
    token = correlation_id.set(job.deployment_id)
    try:
        service.handle(job)
    except TemporaryError as exc:
        delay = max(exc.retry_after, backoff(attempt))
        return _retry_or_give_up(service, job, attempt, max_deliveries, exc.message, delay)
    except BrokerError as exc:
        # handle() turns permanent errors of deployment jobs into Failed;
        # reaching here means the job itself is unusable.
        log.error("job dropped", extra={"kind": job.kind.value, "reason": exc.message})
        service.give_up(job, exc.message)
        return Outcome("dead", reason=exc.message)
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
        service.give_up(job, reason)
        return Outcome("dead", reason=reason)
    return Outcome("retry", delay=delay, reason=reason)
