"""Dead letters, as an operator sees them on every platform: the jobs a queue
gave up on and the callbacks no receiver took.

The Lambda ``dlq`` function, the Azure and GCP dead-letter functions and
``kidp-broker dlq`` all list and redrive through this module, so an operator
reads the same shape wherever the broker runs. Jobs come from the queue when
it keeps them (:class:`kidp.ports.DeadJobQueue`); callbacks from the store.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kidp.models import DeadLetter, Job
from kidp.ports import DeadJobQueue
from kidp.service import BrokerService

#: Dead-lettered callbacks sent again per redrive, by default: each may wait
#: out the callback timeout, and a serverless function has a deadline.
REDRIVE_CALLBACKS_PER_CALL = 10


def letter_view(letter: DeadLetter) -> dict[str, Any]:
    """A dead-lettered callback as an operator sees it: the URL without its
    query, which may hold the receiver's token."""
    parts = urlsplit(letter.url)
    return {
        "id": letter.id,
        "deploymentId": letter.deployment_id,
        "eventId": letter.event_id,
        "phase": letter.payload.get("phase"),
        "url": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
        "reason": letter.reason,
        "attempts": letter.attempts,
        "createdAt": letter.created_at.isoformat(),
        "givenUpAt": letter.given_up_at.isoformat() if letter.given_up_at else None,
        "resolvedAt": letter.resolved_at.isoformat() if letter.resolved_at else None,
    }


def job_view(job: Job, reason: str) -> dict[str, Any]:
    """A dead job as an operator sees it."""
    return {
        "jobId": job.id,
        "kind": job.kind.value,
        "deploymentId": job.deployment_id,
        "reason": reason,
    }


def dead_jobs(service: BrokerService) -> list[tuple[Job, str]]:
    """The jobs the service's queue gave up on; none when the queue keeps none."""
    queue = service.queue
    return queue.dead_jobs() if isinstance(queue, DeadJobQueue) else []


def list_dead(service: BrokerService, *, include_resolved: bool = False) -> dict[str, Any]:
    """``{"jobs": [...], "callbacks": [...]}``, oldest first."""
    return {
        "jobs": [job_view(job, reason) for job, reason in dead_jobs(service)],
        "callbacks": [
            letter_view(x) for x in service.dead_letters(include_resolved=include_resolved)
        ],
    }


def redrive(
    service: BrokerService,
    *,
    ids: Collection[str] | None = None,
    limit: int = REDRIVE_CALLBACKS_PER_CALL,
) -> dict[str, Any]:
    """Send dead jobs back to the queue and dead callbacks to their receivers:
    all of them, or those whose job id or dead letter id is in ``ids``. At
    most ``limit`` callbacks are sent; ``remaining`` says how many are left."""
    queue = service.queue
    wanted = None if ids is None else set(ids)
    redriven: list[str] = []
    if isinstance(queue, DeadJobQueue):
        for job, _ in queue.dead_jobs():
            if (wanted is None or job.id in wanted) and queue.replay_dead(job.id) is not None:
                redriven.append(job.id)
    letters = [
        x
        for x in service.dead_letters()
        if x.resolved_at is None and (wanted is None or x.id in wanted)
    ]
    resolved: list[str] = []
    failed: list[dict[str, str]] = []
    for letter in letters[:limit]:
        after = service.replay_dead_letter(letter.id)
        if after.resolved_at is not None:
            resolved.append(after.id)
        else:
            failed.append({"id": after.id, "reason": after.reason})
    return {
        "jobs": {"redriven": redriven},
        "callbacks": {
            "resolved": resolved,
            "failed": failed,
            "remaining": max(0, len(letters) - limit),
        },
    }
