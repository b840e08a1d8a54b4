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
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import azure.functions as func

from kidp.edges.base import (
    BrokerSlot,
    LogRoute,
    Stdout,
    dead_letters,
    function_settings,
    require_spare_delivery,
    runs_per_job,
    scan_result,
    trigger_queue,
    unavailable,
    work_delivery,
)
from kidp.errors import BrokerError, InvalidRequest, ValidationFailed
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


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """``KIDP_*`` settings as a function app needs them (see the module docstring)."""
    settings = function_settings(
        environ, platform="Azure Functions", instance="instance", defaults={"KIDP_CLOUD": "azure"}
    )
    require_spare_delivery(settings, platform="Azure Functions", delivery="delivery")
    queue = (settings.queue_url or "").rstrip("/").rsplit("/", 1)[-1]
    if not (settings.queue_url or "").startswith("azurequeue://") or queue != JOBS_QUEUE:
        raise ValidationFailed(
            f"KIDP_QUEUE_URL must be azurequeue://<account>/{JOBS_QUEUE}: the queue the "
            "jobs function is triggered by"
        )
    return settings


_handler = logging.StreamHandler(Stdout())
_handler.setFormatter(JsonFormatter())
#: Every ``kidp.*`` record as a JSON line on stdout. The SDKs' HTTP logging
#: policy logs every request at INFO (URLs, headers).
_logs = LogRoute(_handler, quiet=("azure", "urllib3", "httpx", "httpcore"))
#: What one Functions worker process keeps between invocations.
_worker = BrokerSlot(settings_from_env, _logs)

#: This worker's broker, built on first use.
broker = _worker.get
#: Use a built broker as this worker's: the door through which tests hand in a
#: broker wired with their own adapters.
install = _worker.install
#: Forget this worker's broker (close it) and detach the log routing; for
#: tests, which change the environment between invocations.
reset = _worker.reset


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
    status, body = unavailable(exc, log=log)
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

    return trigger_queue(
        b,
        AzureStorageJobQueue,
        needs="the jobs function needs KIDP_QUEUE_URL to be the Storage Queue that triggers it",
    )


def work_message(message: func.QueueMessage) -> None:
    """One queue message -> one job -> its outcome mapped (module docstring)."""
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
    work_delivery(
        b,
        delivery,
        log=log,
        retry=queue.requeue,
        dead=lambda buried, *, reason: queue.bury(
            buried.job, reason=reason, attempts=buried.attempt
        ),
        # Pushed by the trigger: the host deletes this copy when the function returns.
        defer=partial(queue.defer, pulled=False),
    )


jobs = func.Blueprint()  # type: ignore[no-untyped-call]


@jobs.function_name("jobs")
@jobs.queue_trigger(arg_name="message", queue_name=JOBS_QUEUE, connection=STORAGE_CONNECTION)
def _jobs(message: func.QueueMessage) -> None:
    work_message(message)


# ----------------------------------------------------------------------- scan


def scan(name: str, timer: func.TimerRequest, context: func.Context) -> dict[str, Any]:
    """One timer tick -> one scan -> its result (also logged)."""
    token = correlation_id.set(context.invocation_id)
    try:
        if timer.past_due:
            log.warning("scan is past due", extra={"scan": name})
        return scan_result(broker(), name, log=log)
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
    token = correlation_id.set(context.invocation_id)
    try:
        event = _dlq_event(request)
        b = broker()
        return _json(200, dead_letters(b, event, log=log))
    except BrokerError as exc:
        log.warning("dlq request refused", extra={"reason": exc.message})
        return _json(exc.http_status, exc.to_body())
    finally:
        correlation_id.reset(token)


def _dlq_event(request: func.HttpRequest) -> dict[str, Any]:
    if request.method.upper() == "GET":
        # Passed as given: the shared dlq parser refuses what is not true or false.
        return {"action": "list", "includeResolved": request.params.get("includeResolved", "false")}
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
