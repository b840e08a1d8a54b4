"""What the serverless edges do the same way on every platform.

:mod:`kidp.edges.aws` (Lambda), :mod:`kidp.edges.azure` (Azure Functions) and
:mod:`kidp.edges.gcp` (Cloud Functions) each turn their platform's events into
core calls. Between the translating they do the same things, written once here:

* read the ``KIDP_*`` settings as a function needs them
  (:func:`function_settings`, :func:`require_spare_delivery`,
  :func:`runs_per_job`);
* keep one broker per process, built on first use or handed in by a test
  (:class:`BrokerSlot`), and route ``kidp.*`` logs through the platform's JSON
  handler (:class:`LogRoute`);
* answer when the broker cannot even be built (:func:`unavailable`);
* check that the broker's queue is the one triggering the function
  (:func:`trigger_queue`), and work one delivered job, settling its outcome
  through that queue (:func:`work_delivery`);
* name and run a scan (:func:`scan_named`, :func:`scan_result`);
* list or redrive dead letters (:func:`dlq_action`, :func:`dead_letters`).

What stays in each edge is its platform: event formats, the platform's own
library (Powertools, ``azure.functions``, functions-framework), how its queue
writes a retry or a dead letter, and the checks of settings only it needs.
The shared pieces log through the edge's logger (``log=``), so a record names
the edge that served it.

Cold start: nothing here imports a cloud SDK or a platform library, and at
import nothing beyond what every edge loads anyway (:mod:`kidp.errors`,
:mod:`kidp.observability`); settings, the broker and the core's jobs, scans
and dead letters are imported on first use.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from kidp.errors import BrokerError, TemporaryError, ValidationFailed
from kidp.observability import correlation_id

if TYPE_CHECKING:
    from kidp.bootstrap import Broker
    from kidp.ports import Delivery
    from kidp.settings import Settings
    from kidp.work import Outcome

__all__ = [
    "STATE_DIR",
    "BrokerSlot",
    "Bury",
    "LogRoute",
    "Requeue",
    "Stdout",
    "dead_letters",
    "dlq_action",
    "function_settings",
    "require_spare_delivery",
    "runs_per_job",
    "scan_named",
    "scan_result",
    "trigger_queue",
    "unavailable",
    "work_delivery",
]

#: The state directory's default: a function's deployed files are read-only,
#: and /tmp is the one place it may write.
STATE_DIR: Final = "/tmp/kidp"  # noqa: S108 - the function's scratch space

D = TypeVar("D", bound="Delivery")
Q = TypeVar("Q")
D_contra = TypeVar("D_contra", bound="Delivery", contravariant=True)


# ------------------------------------------------------------------ settings


def function_settings(
    environ: Mapping[str, str] | None,
    *,
    platform: str,
    instance: str,
    defaults: Mapping[str, str] | None = None,
) -> Settings:
    """``KIDP_*`` settings from ``environ`` (else the process's environment) as
    a serverless function needs them.

    ``defaults`` fill in what the environment leaves unset, and the state
    directory defaults to :data:`STATE_DIR`. ``KIDP_JWT_SECRET`` (or
    ``KIDP_JWT_JWKS_URL``) and ``KIDP_CALLBACK_SECRET`` are required: a
    development key made per ``instance`` (``container``, ``instance``) would
    disagree with every other one. ``platform`` names the platform in the
    error (``Lambda``, ``Azure Functions``, ``Cloud Functions``).
    """
    from kidp.settings import Settings

    env = dict(os.environ if environ is None else environ)
    for key, value in (defaults or {}).items():
        env.setdefault(key, value)
    env.setdefault("KIDP_STATE_DIR", STATE_DIR)
    settings = Settings.from_env(env)
    missing = []
    if not settings.jwt_secret and not settings.jwt_jwks_url:
        missing.append("KIDP_JWT_SECRET or KIDP_JWT_JWKS_URL")
    if not settings.callback_secret:
        missing.append("KIDP_CALLBACK_SECRET")
    if missing:
        raise ValidationFailed(
            f"set {' and '.join(missing)}: on {platform} a development key made per "
            f"{instance} would disagree with every other {instance}"
        )
    return settings


def require_spare_delivery(settings: Settings, *, platform: str, delivery: str) -> None:
    """Refuse ``KIDP_JOB_MAX_DELIVERIES`` below 2: :func:`runs_per_job` keeps
    the last ``delivery`` (the platform's word: a receive, a delivery) back,
    so a job needs at least one more."""
    if settings.job_max_deliveries < 2:
        raise ValidationFailed(
            f"KIDP_JOB_MAX_DELIVERIES must be at least 2 on {platform}: the last {delivery} "
            "is kept for failing a job that stopped the function every time"
        )


def runs_per_job(settings: Settings) -> int:
    """How often a function runs one job: one less than the platform's
    maximum deliveries (``KIDP_JOB_MAX_DELIVERIES``: SQS's ``maxReceiveCount``,
    the Functions host's ``maxDequeueCount``, the Pub/Sub subscription's
    ``maxDeliveryAttempts``).

    Each platform dead-letters a message on its own once that count is used
    up, without asking, so a function that died on the last run (a timeout,
    out of memory: no exception to count) would leave its deployment waiting.
    The last delivery therefore only comes after such deaths, and fails the
    deployment with its callback without running the job again
    (:func:`kidp.work.work`)."""
    return settings.job_max_deliveries - 1


# ------------------------------------------------------------ broker and logs


class Stdout:
    """Writes to whatever ``sys.stdout`` is at the time (the platform's log
    stream; a test's captured output), not the object it was at import."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


class LogRoute:
    """Every ``kidp.*`` record through ``handler`` (the platform's JSON lines)
    instead of the root logger, with ``quiet`` loggers at ``WARNING``.

    ``configure`` is called with the settings before each :meth:`attach`, for
    what the platform's handler takes from them (a level, a project)."""

    def __init__(
        self,
        handler: logging.Handler,
        *,
        quiet: Iterable[str],
        configure: Callable[[Settings], None] | None = None,
    ) -> None:
        self.handler = handler
        self.quiet = tuple(quiet)
        self.configure = configure

    def attach(self, settings: Settings) -> None:
        """Route ``kidp.*`` records at the settings' log level (once, however
        often called)."""
        if self.configure is not None:
            self.configure(settings)
        kidp_log = logging.getLogger("kidp")
        if self.handler not in kidp_log.handlers:
            kidp_log.addHandler(self.handler)
        # Every platform's runtime puts its own handler on the root logger:
        # without this, every line would be written twice.
        kidp_log.propagate = False
        kidp_log.setLevel(settings.log_level.upper())
        for name in self.quiet:
            logging.getLogger(name).setLevel(logging.WARNING)

    def detach(self) -> None:
        """Give ``kidp.*`` records back to the root logger."""
        kidp_log = logging.getLogger("kidp")
        kidp_log.removeHandler(self.handler)
        kidp_log.propagate = True
        kidp_log.setLevel(logging.NOTSET)


class BrokerSlot:
    """The one broker a function's process keeps between invocations: built
    on first use from ``settings()`` and kept for the process's life, or
    handed in by a test through :meth:`install`.

    An edge that keeps more made from the broker (an adapter around its app,
    counters since the last flush) forgets it in :meth:`forget`, which runs
    whenever the broker is replaced or dropped."""

    def __init__(self, settings: Callable[[], Settings], logs: LogRoute) -> None:
        self.broker: Broker | None = None
        self._settings = settings
        self._logs = logs

    def get(self) -> Broker:
        """This process's broker, built on first use."""
        if self.broker is None:
            from kidp.bootstrap import build

            settings = self._settings()
            self._logs.attach(settings)
            self.broker = build(settings)
        return self.broker

    def install(self, built: Broker) -> None:
        """Use ``built`` as this process's broker (closing the one it replaces)."""
        if self.broker is not None and self.broker is not built:
            self.broker.close()
        self._logs.attach(built.settings)
        self.broker = built
        self.forget()

    def reset(self) -> None:
        """Forget the broker (close it) and detach the log routing."""
        if self.broker is not None:
            self.broker.close()
        self.broker = None
        self.forget()
        self._logs.detach()

    def forget(self) -> None:
        """Drop what was made from the previous broker; nothing by default."""


def unavailable(exc: BrokerError, *, log: logging.Logger) -> tuple[int, dict[str, Any]]:
    """The status and error body to answer when the broker cannot even be built
    (logged with the reason). A configuration error is the operator's, not the
    caller's: the caller learns only that the broker is misconfigured."""
    log.error("broker unavailable", extra={"reason": exc.message})
    if isinstance(exc, TemporaryError):
        return exc.http_status, exc.to_body()
    return 500, {
        "error": "internal_error",
        "message": "the broker is misconfigured; its logs say how",
        "code": 500,
    }


# ----------------------------------------------------------------------- jobs


def trigger_queue(b: Broker, kind: type[Q], *, needs: str) -> Q:
    """The broker's job queue, which must be the ``kind`` of queue that
    triggers the function (its deliveries are read and settled as that
    queue's); ``ValidationFailed`` saying what the function ``needs`` otherwise."""
    queue = b.service.queue
    if not isinstance(queue, kind):
        raise ValidationFailed(needs)
    return queue


class Requeue(Protocol[D_contra]):
    """Writes the job of ``delivery`` to be delivered again after ``delay`` seconds."""

    def __call__(self, delivery: D_contra, *, delay: float) -> None: ...


class Bury(Protocol[D_contra]):
    """Writes the job of ``delivery`` to the dead letters with ``reason``."""

    def __call__(self, delivery: D_contra, *, reason: str) -> None: ...


def work_delivery(
    b: Broker,
    delivery: D,
    *,
    log: logging.Logger,
    retry: Requeue[D],
    dead: Bury[D],
    defer: Callable[[D], bool] | None = None,
) -> Outcome:
    """Work one delivered job (:func:`kidp.work.work`, at most
    :func:`runs_per_job` times) with its deployment id as the correlation id,
    and settle the outcome through the platform's queue:

    * ``ack``: nothing; the platform deletes the message when the function
      returns.
    * ``retry``: ``retry`` writes the job to come again after the outcome's
      delay. Nothing sleeps.
    * ``dead``: the deployment has been failed with a callback; ``dead``
      writes the job to the dead letters.

    ``defer`` sends on a job delivered before it is due (a delay beyond what
    the queue holds) and returns True; the job is then not worked, and this
    delivery is done with (``ack``). The outcome is returned for the edge to
    answer the platform with."""
    from kidp.work import Outcome, work

    token = correlation_id.set(delivery.job.deployment_id)
    try:
        if defer is not None and defer(delivery):
            log.info("job deferred", extra={"kind": delivery.job.kind.value})
            return Outcome("ack", reason="deferred")
        outcome = work(
            b.service,
            delivery.job,
            attempt=delivery.attempt,
            max_deliveries=runs_per_job(b.settings),
        )
        if outcome.action == "retry":
            retry(delivery, delay=outcome.delay)
            log.info(
                "job will be retried",
                extra={
                    "kind": delivery.job.kind.value,
                    "attempt": delivery.attempt,
                    "delaySeconds": outcome.delay,
                    "reason": outcome.reason,
                },
            )
        elif outcome.action == "dead":
            dead(delivery, reason=outcome.reason)
        return outcome
    finally:
        correlation_id.reset(token)


# ---------------------------------------------------------------------- scans


def scan_named(name: object, *, source: str, fix: str) -> str:
    """``name`` if it is a known scan (:data:`kidp.scans.SCANS`); else a
    ``ValidationFailed`` that says ``source`` (the event, the request) names
    none, and how to ``fix`` it, with the names."""
    from kidp.scans import SCANS

    if not isinstance(name, str) or name not in SCANS:
        raise ValidationFailed(
            f"{source} names no known scan: {fix} with one of: {', '.join(SCANS)}"
        )
    return name


def scan_result(b: Broker, name: str, *, log: logging.Logger) -> dict[str, Any]:
    """Run the scan ``name`` and answer ``{"scan": name, "result": ...}`` (also logged)."""
    from kidp.scans import run_scan

    result = run_scan(b.scanner, name)
    log.info("scan finished", extra={"scan": name, "result": result})
    return {"scan": name, "result": result}


# ----------------------------------------------------------------------- dlq


def dlq_action(request: Mapping[str, Any]) -> str:
    """What a dead-letter request asks for: ``list`` (the default) or
    ``redrive``; ``ValidationFailed`` for anything else."""
    action = request.get("action", "list")
    if action not in ("list", "redrive"):
        raise ValidationFailed(f"unknown action '{action}': use list or redrive")
    return str(action)


def dead_letters(
    b: Broker,
    request: Mapping[str, Any],
    *,
    log: logging.Logger,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A dead-letter request (``{"action": "list" | "redrive", "ids"?: [...],
    "limit"?: n, "includeResolved"?: bool}``) answered as on every platform
    (:mod:`kidp.deadletters`). A redrive is logged with ``extra`` (who asked)
    and its counts. A field of the wrong kind is ``ValidationFailed`` (400),
    before anything is done: ``includeResolved`` is true or false (the
    strings ``"true"`` and ``"false"`` too), ``limit`` a whole number from 0,
    ``ids`` a list of strings."""
    from kidp import deadletters

    if dlq_action(request) == "list":
        include_resolved = _flag(request, "includeResolved", default=False)
        return deadletters.list_dead(b.service, include_resolved=include_resolved)
    ids = _ids(request)
    limit = _count(request, "limit", default=deadletters.REDRIVE_CALLBACKS_PER_CALL)
    result = deadletters.redrive(b.service, ids=ids, limit=limit)
    log.info(
        "dead letters redriven",
        extra={
            **(extra or {}),
            "jobs": len(result["jobs"]["redriven"]),
            "callbacks": len(result["callbacks"]["resolved"]),
            "failed": len(result["callbacks"]["failed"]),
        },
    )
    return result


def _flag(request: Mapping[str, Any], name: str, *, default: bool) -> bool:
    """A true/false field: a JSON boolean, or the string ``"true"`` or ``"false"``
    (any case); anything else, ``null`` included, is refused, never guessed."""
    if name not in request:
        return default
    value = request[name]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValidationFailed(f"{name} must be true or false, not {_shown(value)}")


def _count(request: Mapping[str, Any], name: str, *, default: int) -> int:
    """A whole number from 0: a JSON integer or a string of digits."""
    if name not in request:
        return default
    value = request[name]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise ValidationFailed(f"{name} must be a whole number from 0, not {_shown(value)}")


def _ids(request: Mapping[str, Any]) -> list[str] | None:
    """``ids``: absent (every one) or a list of strings."""
    ids = request.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValidationFailed(f"ids must be a list of strings, not {_shown(ids)}")
    return ids


def _shown(value: object) -> str:
    """A refused value for the error message, as JSON and cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
