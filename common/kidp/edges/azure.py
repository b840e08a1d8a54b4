"""The Azure Functions edge: Functions triggers in, core calls out.

``azure/function_app.py`` (Python v2 programming model) is an
``AsgiFunctionApp`` around :data:`asgi` with the Blueprints here registered on
it:

HTTP (``http_app_func``, anonymous at the Functions level: the broker checks
its own bearer tokens)
    Every route of the broker's one ASGI application, ``/openapi.json``
    included (``host.json`` sets ``routePrefix`` to "", so paths are the same
    as on AWS). :data:`asgi` builds the broker and its app on the first
    request, answers the ASGI lifespan itself (the app holds no per-process
    resources), makes the Functions invocation id the correlation id unless
    the caller sent ``X-Correlation-ID``, and answers with the documented
    error shape when the broker cannot be built.
``jobs`` (queue trigger on :data:`JOBS_QUEUE`)
    One job per message, worked through :func:`kidp.work.work`; the outcome
    is mapped once, here:

    * ``ack``: return; the host deletes the message.
    * ``retry``: a copy of the job is sent with the delay as its visibility
      timeout and a count of the deliveries so far
      (:meth:`AzureStorageJobQueue.requeue`), then the function returns.
      Nothing sleeps, and each job waits its own backoff: the host's own
      redelivery of a failed message would wait its fixed visibility timeout.
    * ``dead``: the deployment has been failed with a callback; a copy goes to
      ``<queue>-poison`` with the reason and the function returns.

    A job runs at most ``KIDP_JOB_MAX_DELIVERIES`` - 1 times (:func:`runs_per_job`).
    ``host.json`` sets ``maxDequeueCount`` to ``KIDP_JOB_MAX_DELIVERIES``, and the
    host moves a message whose function failed on its last dequeue to the
    poison queue on its own, without asking; so the last delivery comes only
    after the function died on every earlier one (a timeout, out of memory),
    and fails the deployment with its callback without running the job.
    A message that is not a job goes to the poison queue at once. If the queue
    itself is unreachable when a retry or a burial is written, the function
    raises and the host delivers the message again.
``scan_<name>`` (timer triggers, :data:`SCHEDULES`)
    drift (5 min), orphans (hourly), cost and rotation (daily), reconcile
    (every minute).
``dlq`` (HTTP ``/dlq``, admin level: the host's master key)
    ``GET`` lists dead-lettered jobs (the poison queue, read without being
    consumed) and callbacks (the store); ``POST`` with ``{"action": "list" |
    "redrive", "ids"?: [...], "limit"?: n, "includeResolved"?: bool}`` is the
    Lambda ``dlq`` function's event, answered with the same shapes
    (:mod:`kidp.deadletters`).

One broker per worker process, built on first use from ``KIDP_*`` app
settings and kept; tests hand in their own through :func:`install`. The state
directory defaults to ``/tmp/kidp``; ``KIDP_JWT_SECRET`` (or
``KIDP_JWT_JWKS_URL``) and ``KIDP_CALLBACK_SECRET`` are required, because a
development key made per instance would disagree with every other instance,
and ``KIDP_QUEUE_URL`` must name the queue the trigger listens to.

Logs: every ``kidp.*`` record is one JSON line on stdout (which the host
sends to Application Insights) with the correlation id: the deployment id
while a job runs, the request's in the API, the invocation id in scans and
the dlq function.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final

import azure.functions as func

from kidp.errors import BrokerError, InvalidRequest, TemporaryError, ValidationFailed
from kidp.observability import JsonFormatter, correlation_id

if TYPE_CHECKING:
    from kidp.bootstrap import Broker
    from kidp.queues.azurequeue import AzureStorageJobQueue
    from kidp.settings import Settings

__all__ = [
    "JOBS_QUEUE",
    "SCHEDULES",
    "STORAGE_CONNECTION",
    "asgi",
    "broker",
    "dlq",
    "install",
    "jobs",
    "operations",
    "reset",
    "runs_per_job",
    "scan",
    "scans",
    "settings_from_env",
    "work_message",
]

log = logging.getLogger("kidp.edges.azure")

#: The queue the ``jobs`` function listens to; ``KIDP_QUEUE_URL`` must name it.
JOBS_QUEUE: Final = "kidp-jobs"
#: The app setting prefix of the trigger's storage connection: the function
#: app's own account (``AzureWebJobsStorage__accountName`` and the managed
#: identity, set by the Bicep).
STORAGE_CONNECTION: Final = "AzureWebJobsStorage"
#: NCRONTAB schedules (with seconds) of the scans, as the settings' defaults.
SCHEDULES: Final[Mapping[str, str]] = {
    "drift": "0 */5 * * * *",
    "orphans": "0 0 * * * *",
    "cost": "0 15 1 * * *",
    "rotation": "0 45 1 * * *",
    "reconcile": "0 * * * * *",
}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


# --------------------------------------------------------------------- broker


class _Worker:
    """What one Functions worker process keeps between invocations."""

    broker: Broker | None = None


_worker = _Worker()


class _Stdout:
    """Writes to whatever ``sys.stdout`` is at the time (the host's stream; a
    test's captured output), not the object it was at import."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


_handler = logging.StreamHandler(_Stdout())
_handler.setFormatter(JsonFormatter())


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """``KIDP_*`` settings as a function app needs them (see the module docstring)."""
    import os

    from kidp.settings import Settings

    env = dict(os.environ if environ is None else environ)
    # The app's files are read-only (run from package); /tmp is writable.
    env.setdefault("KIDP_STATE_DIR", "/tmp/kidp")  # noqa: S108 - the instance's scratch space
    env.setdefault("KIDP_CLOUD", "azure")
    settings = Settings.from_env(env)
    missing = []
    if not settings.jwt_secret and not settings.jwt_jwks_url:
        missing.append("KIDP_JWT_SECRET or KIDP_JWT_JWKS_URL")
    if not settings.callback_secret:
        missing.append("KIDP_CALLBACK_SECRET")
    if missing:
        raise ValidationFailed(
            f"set {' and '.join(missing)}: on Azure Functions a development key made per "
            "instance would disagree with every other instance"
        )
    if settings.job_max_deliveries < 2:
        raise ValidationFailed(
            "KIDP_JOB_MAX_DELIVERIES must be at least 2 on Azure Functions: the last "
            "delivery is kept for failing a job that stopped the function every time"
        )
    queue = (settings.queue_url or "").rstrip("/").rsplit("/", 1)[-1]
    if not (settings.queue_url or "").startswith("azurequeue://") or queue != JOBS_QUEUE:
        raise ValidationFailed(
            f"KIDP_QUEUE_URL must be azurequeue://<account>/{JOBS_QUEUE}: the queue the "
            "jobs function is triggered by"
        )
    return settings


def runs_per_job(settings: Settings) -> int:
    """How often the ``jobs`` function runs one job: one less than the host's
    ``maxDequeueCount`` (``KIDP_JOB_MAX_DELIVERIES``), which moves a message
    whose function failed on its last dequeue to the poison queue without
    asking; the last delivery therefore only comes after the function died
    on every run, and fails the deployment without running the job again
    (:func:`kidp.work.work`)."""
    return settings.job_max_deliveries - 1


def broker() -> Broker:
    """This worker's broker, built on first use."""
    if _worker.broker is None:
        from kidp.bootstrap import build

        settings = settings_from_env()
        _route_logs(settings.log_level)
        _worker.broker = build(settings)
    return _worker.broker


def install(built: Broker) -> None:
    """Use ``built`` as this worker's broker: the door through which tests hand
    in a broker wired with their own adapters."""
    if _worker.broker is not None and _worker.broker is not built:
        _worker.broker.close()
    _route_logs(built.settings.log_level)
    _worker.broker = built


def reset() -> None:
    """Forget this worker's broker (close it) and detach the log routing; for
    tests, which change the environment between invocations."""
    if _worker.broker is not None:
        _worker.broker.close()
    _worker.broker = None
    kidp_log = logging.getLogger("kidp")
    kidp_log.removeHandler(_handler)
    kidp_log.propagate = True
    kidp_log.setLevel(logging.NOTSET)


def _route_logs(level: str) -> None:
    """Send every ``kidp.*`` record to stdout as a JSON line, once."""
    kidp_log = logging.getLogger("kidp")
    if _handler not in kidp_log.handlers:
        kidp_log.addHandler(_handler)
    # The Python worker puts its own handler on the root logger: without this,
    # every line would be written twice.
    kidp_log.propagate = False
    kidp_log.setLevel(level.upper())
    # The SDKs' HTTP logging policy logs every request at INFO (URLs, headers).
    for name in ("azure", "urllib3", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ------------------------------------------------------------------------ api


async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """The broker's ASGI app, built on first use (see the module docstring)."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    invocation = str(scope.get("azure_functions.invocation_id") or "")
    headers = list(scope.get("headers") or [])
    if invocation and not any(k.lower() == b"x-correlation-id" for k, _ in headers):
        # The invocation id is what an operator finds in Application Insights.
        scope = {**scope, "headers": [*headers, (b"x-correlation-id", invocation.encode())]}
    try:
        app = broker().app
    except BrokerError as exc:
        await _unavailable(exc, send)
        return
    await app(scope, receive, send)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _unavailable(exc: BrokerError, send: Send) -> None:
    """An error response when the broker cannot even be built (configuration)."""
    log.error("broker unavailable", extra={"reason": exc.message})
    if isinstance(exc, TemporaryError):
        body, status = exc.to_body(), exc.http_status
    else:
        # A configuration error is the operator's, not the caller's.
        status = 500
        body = {
            "error": "internal_error",
            "message": "the broker is misconfigured; its logs say how",
            "code": status,
        }
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


# ----------------------------------------------------------------------- jobs


def _azure_queue(b: Broker) -> AzureStorageJobQueue:
    from kidp.queues.azurequeue import AzureStorageJobQueue

    queue = b.service.queue
    if not isinstance(queue, AzureStorageJobQueue):
        raise ValidationFailed(
            "the jobs function needs KIDP_QUEUE_URL to be the Storage Queue that triggers it"
        )
    return queue


def work_message(message: func.QueueMessage) -> None:
    """One queue message -> one job -> its outcome mapped (module docstring)."""
    from kidp.work import work

    b = broker()
    queue = _azure_queue(b)
    body = message.get_body().decode("utf-8", errors="replace")
    dequeued = int(message.dequeue_count or 1)
    try:
        delivery = queue.delivery_from_message(
            body,
            message_id=message.id or "",
            pop_receipt=message.pop_receipt or "",
            dequeue_count=dequeued,
        )
    except InvalidRequest as exc:
        queue.bury(None, reason=exc.message, attempts=dequeued, body=body)
        return
    token = correlation_id.set(delivery.job.deployment_id)
    try:
        if queue.defer(delivery, pulled=False):
            log.info("job deferred", extra={"kind": delivery.job.kind.value})
            return
        outcome = work(
            b.service,
            delivery.job,
            attempt=delivery.attempt,
            max_deliveries=runs_per_job(b.settings),
        )
        if outcome.action == "retry":
            queue.requeue(delivery, delay=outcome.delay)
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
            queue.bury(delivery.job, reason=outcome.reason, attempts=delivery.attempt)
    finally:
        correlation_id.reset(token)


jobs = func.Blueprint()  # type: ignore[no-untyped-call]


@jobs.function_name("jobs")
@jobs.queue_trigger(arg_name="message", queue_name=JOBS_QUEUE, connection=STORAGE_CONNECTION)
def _jobs(message: func.QueueMessage) -> None:
    work_message(message)


# ----------------------------------------------------------------------- scan


def scan(name: str, timer: func.TimerRequest, context: func.Context) -> dict[str, Any]:
    """One timer tick -> one scan -> its result (also logged)."""
    from kidp.scans import run_scan

    token = correlation_id.set(context.invocation_id)
    try:
        if timer.past_due:
            log.warning("scan is past due", extra={"scan": name})
        result = run_scan(broker().scanner, name)
        log.info("scan finished", extra={"scan": name, "result": result})
        return {"scan": name, "result": result}
    finally:
        correlation_id.reset(token)


scans = func.Blueprint()  # type: ignore[no-untyped-call]


def _register_scan(name: str, schedule: str) -> None:
    @scans.function_name(f"scan_{name}")
    @scans.timer_trigger(
        arg_name="timer", schedule=schedule, run_on_startup=False, use_monitor=True
    )
    def scan_function(timer: func.TimerRequest, context: func.Context) -> None:
        scan(name, timer, context)


for _name, _schedule in SCHEDULES.items():
    _register_scan(_name, _schedule)


# ------------------------------------------------------------------------ dlq


def dlq(request: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """``GET`` lists, ``POST {"action": ...}`` lists or redrives dead letters."""
    from kidp import deadletters

    token = correlation_id.set(context.invocation_id)
    try:
        event = _dlq_event(request)
        action = event.get("action", "list")
        b = broker()
        if action == "list":
            include = bool(event.get("includeResolved", False))
            return _json(200, deadletters.list_dead(b.service, include_resolved=include))
        if action == "redrive":
            ids = event.get("ids")
            result = deadletters.redrive(
                b.service,
                ids=None if ids is None else [str(i) for i in ids],
                limit=int(event.get("limit", deadletters.REDRIVE_CALLBACKS_PER_CALL)),
            )
            log.info(
                "dead letters redriven",
                extra={
                    "jobs": len(result["jobs"]["redriven"]),
                    "callbacks": len(result["callbacks"]["resolved"]),
                    "failed": len(result["callbacks"]["failed"]),
                },
            )
            return _json(200, result)
        raise ValidationFailed(f"unknown action '{action}': use list or redrive")
    except BrokerError as exc:
        log.warning("dlq request refused", extra={"reason": exc.message})
        return _json(exc.http_status, exc.to_body())
    finally:
        correlation_id.reset(token)


def _dlq_event(request: func.HttpRequest) -> dict[str, Any]:
    if request.method.upper() == "GET":
        resolved = request.params.get("includeResolved", "").lower() in ("1", "true", "yes")
        return {"action": "list", "includeResolved": resolved}
    raw = request.get_body()
    if not raw:
        return {"action": "list"}
    try:
        event = json.loads(raw)
    except ValueError:
        raise InvalidRequest("the body is not JSON") from None
    if not isinstance(event, dict):
        raise InvalidRequest("the body must be a JSON object")
    return event


def _json(status: int, body: Any) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body), status_code=status, mimetype="application/json", charset="utf-8"
    )


operations = func.Blueprint()  # type: ignore[no-untyped-call]


@operations.function_name("dlq")
@operations.route(route="dlq", methods=["GET", "POST"], auth_level=func.AuthLevel.ADMIN)
def _dlq(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return dlq(req, context)
