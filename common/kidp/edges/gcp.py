"""The Google Cloud Functions edge (2nd gen, functions-framework 3.10): HTTP
requests and CloudEvents in, core calls out.

``gcp/main.py`` exposes four functions, each one line around this module:

``api``
    HTTP, in functions-framework's ASGI mode (``@functions_framework.aio.http``,
    detected per target since 3.9): every request is handed to the broker's one
    ASGI application unchanged, so every route of the API is served. The
    caller's ``X-Correlation-ID`` wins; else the request's Cloud Trace id
    becomes the correlation id.
``jobs``
    CloudEvent ``google.cloud.pubsub.topic.v1.messagePublished``: one Pub/Sub
    message, one job, worked through :func:`kidp.work.work` and its outcome
    mapped once, here:

    * ``ack``: return; the push is acknowledged by the 2xx.
    * ``retry``: a copy of the job is scheduled through Cloud Tasks, due after
      the outcome's delay and carrying this delivery's attempt, and the
      function returns. The core's delay (1, 2, 4 s backoff, a throttle's
      retry-after) is kept exactly, which the subscription's own backoff (10 s
      and up, per subscription) could not. Only when the copy cannot be
      scheduled does the function raise, so Pub/Sub redelivers the message
      with the subscription's backoff instead.
    * ``dead``: the deployment has been failed with its callback; the job is
      published to the dead-letter topic with the reason, and the function
      returns.

    A message that is not a job is dead-lettered at once: no retry can make it
    one. A delivery's attempt is Pub/Sub's ``deliveryAttempt`` (sent when the
    subscription has a dead-letter policy) plus the deliveries earlier copies
    had. The function runs a job at most ``KIDP_JOB_MAX_DELIVERIES - 1``
    times: the subscription's dead-letter policy moves a message after that
    many deliveries without asking, so the last delivery is kept for a job
    that killed the function every time (a timeout, out of memory: nothing to
    count), and fails its deployment with a callback without running it.
``scan``
    HTTP, called by Cloud Scheduler with ``{"scan": "<name>"}``: drift,
    orphans, cost, rotation or reconcile. Answers the scan's result; an error
    status makes Cloud Scheduler retry.
``dlq``
    HTTP, for operators: ``{"action": "list" | "redrive", "ids"?, "limit"?,
    "includeResolved"?}`` (or ``GET`` to list) answers what the Lambda ``dlq``
    answers (:mod:`kidp.deadletters`): dead jobs from the dead-letter topic,
    dead callbacks from the store. Besides Cloud Run's IAM check it needs a
    broker token for every namespace (``*``) with scope ``read`` to list and
    ``deploy`` to redrive, in ``Authorization``; Google's identity token goes
    in ``X-Serverless-Authorization``.

One broker per instance: built on first use from ``KIDP_*`` settings (or at
start by :func:`warm_up`) and kept for the instance's life; tests hand in
their own through :func:`install`. The state directory defaults to
``/tmp/kidp``; ``KIDP_JWT_SECRET`` (or ``KIDP_JWT_JWKS_URL``) and
``KIDP_CALLBACK_SECRET`` are required, since a development key made per
instance would disagree with every other instance.

Logs: every ``kidp.*`` record is one JSON line on stdout in Cloud Logging's
structured format (``severity``, ``message``, the correlation id as
``correlationId`` and as a label, the request's trace as
``logging.googleapis.com/trace``).
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from kidp.edges.base import (
    BrokerSlot,
    LogRoute,
    Stdout,
    dead_letters,
    dlq_action,
    function_settings,
    runs_per_job,
    scan_named,
    scan_result,
    trigger_queue,
    unavailable,
    work_delivery,
)
from kidp.errors import (
    BrokerError,
    Forbidden,
    InvalidRequest,
    TemporaryError,
    Unauthorized,
    ValidationFailed,
)
from kidp.observability import correlation_id

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from kidp.bootstrap import Broker
    from kidp.queues.pubsub import PubSubDelivery, PubSubJobQueue
    from kidp.settings import Settings

__all__ = [
    "PUBSUB_EVENT_TYPE",
    "CloudLoggingFormatter",
    "PubSubMessage",
    "RetryLater",
    "api_response",
    "asgi_http_function",
    "broker",
    "cloudevent_function",
    "dlq_response",
    "http_function",
    "install",
    "pubsub_message",
    "raw_push_body",
    "reset",
    "runs_per_job",
    "scan_name",
    "scan_response",
    "settings_from_env",
    "warm_up",
    "work_event",
    "work_message",
]

#: The CloudEvent type of a Pub/Sub message (Eventarc, and functions-framework's
#: conversion of a raw push).
PUBSUB_EVENT_TYPE: Final = "google.cloud.pubsub.topic.v1.messagePublished"
#: Pub/Sub's dead-letter policy accepts 5 to 100 delivery attempts.
MIN_DELIVERIES: Final = 5
MAX_DELIVERIES: Final = 100

log = logging.getLogger("kidp.edges.gcp")

F = TypeVar("F", bound=Callable[..., Any])

#: The trace of the request being served, for Cloud Logging.
_trace: contextvars.ContextVar[str] = contextvars.ContextVar("kidp_gcp_trace", default="")
_TRACE_HEADER = re.compile(r"^([0-9a-fA-F]{32})(?:/.*)?$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


# ----------------------------------------------------------------- logging


class CloudLoggingFormatter(logging.Formatter):
    """One JSON object per line as Cloud Logging reads structured logs:
    ``severity``, ``message``, ``time``, the correlation id (field and label),
    the trace, and the record's extra fields."""

    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
        "message",
        "asctime",
        "taskName",
    }

    def __init__(self, project: str | None = None) -> None:
        super().__init__()
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname if record.levelname != "WARN" else "WARNING",
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        cid = correlation_id.get()
        if cid:
            entry["correlationId"] = cid
            entry["logging.googleapis.com/labels"] = {"correlation_id": cid}
        trace = _trace.get()
        if trace and self.project:
            entry["logging.googleapis.com/trace"] = f"projects/{self.project}/traces/{trace}"
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


# ------------------------------------------------------------------ broker


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """``KIDP_*`` settings as a Cloud Function needs them (see the module docstring)."""
    settings = function_settings(
        environ, platform="Cloud Functions", instance="instance", defaults={"KIDP_CLOUD": "gcp"}
    )
    if not MIN_DELIVERIES <= settings.job_max_deliveries <= MAX_DELIVERIES:
        raise ValidationFailed(
            f"KIDP_JOB_MAX_DELIVERIES must be {MIN_DELIVERIES} to {MAX_DELIVERIES}: it is the "
            "jobs subscription's dead-letter policy, and Pub/Sub accepts nothing else"
        )
    if (
        settings.queue_url
        and settings.queue_url.startswith("pubsub://")
        and not settings.gcp_tasks_endpoint
        and not settings.gcp_tasks_service_account
    ):
        raise ValidationFailed(
            "set KIDP_GCP_TASKS_SERVICE_ACCOUNT: Cloud Tasks publishes delayed jobs to "
            "Pub/Sub as that service account"
        )
    return settings


_handler = logging.StreamHandler(Stdout())


def _cloud_logging_format(settings: Settings) -> None:
    # The trace's resource name needs the project, known only from the settings.
    _handler.setFormatter(CloudLoggingFormatter(settings.gcp_project))


#: Every ``kidp.*`` record through the Cloud Logging formatter. Client
#: libraries log request bodies at DEBUG, secret values included.
_logs = LogRoute(
    _handler,
    quiet=("google", "urllib3", "httpx", "httpcore", "grpc", "aiohttp"),
    configure=_cloud_logging_format,
)
#: What one function instance keeps between requests.
_instance = BrokerSlot(settings_from_env, _logs)

#: This instance's broker, built on first use.
broker = _instance.get
#: Use a built broker as this instance's: the door through which tests hand in
#: a broker wired with their own adapters.
install = _instance.install
#: Forget this instance's broker (close it) and detach the log routing; for
#: tests, which change the environment between invocations.
reset = _instance.reset


def warm_up(target: str | None = None) -> None:
    """Build, while the instance starts, what ``target`` (``FUNCTION_TARGET``,
    which Cloud Functions sets) needs: the broker, and for ``api`` its ASGI
    app. Without a target (a test importing the file) nothing is built."""
    target = os.environ.get("FUNCTION_TARGET", "") if target is None else target
    if target not in ("api", "jobs", "scan", "dlq"):
        return
    try:
        built = broker()
        if target == "api":
            _ = built.app
    except BrokerError as exc:
        # Raised here it would fail the instance's start; the first request
        # builds again and answers with the documented error shape.
        log.error("broker not built at start", extra={"reason": exc.message})


def _trace_id(headers: Mapping[str, str]) -> str:
    """The Cloud Trace id of a request (``X-Cloud-Trace-Context`` or ``traceparent``)."""
    match = _TRACE_HEADER.match(headers.get("x-cloud-trace-context", ""))
    if match:
        return match.group(1).lower()
    match = _TRACEPARENT.match(headers.get("traceparent", ""))
    return match.group(1) if match else ""


# ------------------------------------------------------------- declaring


def asgi_http_function(function: F) -> F:
    """Declare an HTTP function served in functions-framework's ASGI mode
    (``@functions_framework.aio.http``), typed for the checker."""
    import functions_framework.aio

    return cast("F", functions_framework.aio.http(function))


def http_function(function: F) -> F:
    """Declare an HTTP function (``@functions_framework.http``, Flask)."""
    import functions_framework

    return cast("F", functions_framework.http(function))


def cloudevent_function(function: F) -> F:
    """Declare a CloudEvent function (``@functions_framework.cloud_event``, Flask)."""
    import functions_framework

    return cast("F", functions_framework.cloud_event(function))


# --------------------------------------------------------------------- api


class _BrokerApp:
    """A Starlette response that lets the broker's ASGI app answer the request
    (functions-framework's route hands it the request's own scope, receive and
    send), with the correlation id and trace set around it."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        trace = _trace_id(headers)
        cid = headers.get("x-correlation-id") or trace
        if cid and "x-correlation-id" not in headers:
            scope = {**scope, "headers": [*scope["headers"], (b"x-correlation-id", cid.encode())]}
        tokens = (correlation_id.set(cid), _trace.set(trace))
        try:
            await self.app(scope, receive, send)
        finally:
            correlation_id.reset(tokens[0])
            _trace.reset(tokens[1])


def api_response() -> Any:
    """What the ``api`` function answers: the broker's app serving the request
    (a Starlette response), or the documented error when the broker cannot be
    built."""
    from starlette.responses import JSONResponse

    try:
        app = broker().app
    except BrokerError as exc:
        status, body = unavailable(exc, log=log)
        return JSONResponse(body, status_code=status)
    return _BrokerApp(app)


# -------------------------------------------------------------------- jobs


class RetryLater(Exception):
    """Raised so the push fails and Pub/Sub redelivers the message with the
    subscription's backoff: the job must run again and no copy could be
    scheduled."""


@dataclass(frozen=True)
class PubSubMessage:
    """A pushed Pub/Sub message, however it arrived; ``delivery_attempt`` is
    None when Pub/Sub did not count (no dead-letter policy)."""

    data: bytes
    attributes: dict[str, str]
    message_id: str
    delivery_attempt: int | None
    subscription: str


def pubsub_message(
    event_type: str, data: Any, *, push_body: Mapping[str, Any] | None = None
) -> PubSubMessage:
    """The message in a ``messagePublished`` CloudEvent's ``data`` (Eventarc's
    and a push subscription's envelope: ``message``, ``subscription``,
    ``deliveryAttempt``). ``push_body`` is the raw push body when
    functions-framework built the CloudEvent from a raw push itself, which
    keeps neither the subscription nor ``deliveryAttempt``. Raises
    ``InvalidRequest`` for anything else."""
    if event_type != PUBSUB_EVENT_TYPE:
        raise InvalidRequest(
            f"the jobs function takes {PUBSUB_EVENT_TYPE} events, not {event_type}"
        )
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except ValueError:
            raise InvalidRequest("the event's data is not a Pub/Sub envelope") from None
    message = data.get("message") if isinstance(data, Mapping) else None
    if not isinstance(message, Mapping):
        raise InvalidRequest("the event's data is not a Pub/Sub envelope")
    envelope: Mapping[str, Any] = data
    if push_body and isinstance(push_body.get("message"), Mapping):
        envelope = {**push_body, **{k: v for k, v in data.items() if k not in push_body}}
    try:
        raw = base64.b64decode(str(message.get("data") or ""), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the message's data is not base64") from None
    attributes = message.get("attributes") or {}
    attempt = envelope.get("deliveryAttempt")
    return PubSubMessage(
        data=raw,
        attributes={str(k): str(v) for k, v in dict(attributes).items()},
        message_id=str(message.get("messageId") or message.get("message_id") or ""),
        delivery_attempt=int(attempt)
        if isinstance(attempt, int | str) and str(attempt).isdigit()
        else None,
        subscription=str(envelope.get("subscription") or ""),
    )


def _pubsub_queue(b: Broker) -> PubSubJobQueue:
    from kidp.queues.pubsub import PubSubJobQueue

    return trigger_queue(
        b,
        PubSubJobQueue,
        needs=(
            "the jobs function needs KIDP_QUEUE_URL to be the Pub/Sub topic that triggers it "
            "(pubsub://<project>/<topic>)"
        ),
    )


def work_message(message: PubSubMessage) -> str:
    """Work one pushed message and settle it (see the module docstring);
    returns the outcome's action. Raises :class:`RetryLater` to have Pub/Sub
    deliver the message again."""
    b = broker()
    queue = _pubsub_queue(b)
    try:
        delivery = queue.delivery_from_push(
            message.data,
            message.attributes,
            message_id=message.message_id,
            delivery_attempt=message.delivery_attempt,
        )
    except InvalidRequest as exc:
        _dead_letter_raw(queue, message, exc.message)
        return "dead"
    outcome = work_delivery(
        b,
        delivery,
        log=log,
        retry=_or_retry_later("retry", queue.retry),
        dead=_or_retry_later("dead", queue.dead_letter),
    )
    return outcome.action


def _or_retry_later(action: str, write: Callable[..., None]) -> Callable[..., None]:
    """``write`` (settling a delivery on the queue) raising :class:`RetryLater`
    when the queue is unavailable for now, so that Pub/Sub delivers the
    message again."""

    def settle(delivery: PubSubDelivery, **options: Any) -> None:
        try:
            write(delivery, **options)
        except TemporaryError as exc:
            raise RetryLater(f"{action} could not be recorded: {exc.message}") from None

    return settle


def _dead_letter_raw(queue: PubSubJobQueue, message: PubSubMessage, reason: str) -> None:
    try:
        queue.dead_letter_message(
            message.data,
            message.attributes,
            attempt=message.delivery_attempt or 1,
            reason=reason,
        )
    except TemporaryError as exc:
        raise RetryLater(f"the dead-letter topic is unavailable: {exc.message}") from None


def raw_push_body() -> Mapping[str, Any] | None:
    """The body of the request being served when it is a raw Pub/Sub push,
    which functions-framework turned into the CloudEvent itself, dropping the
    push's ``subscription`` and ``deliveryAttempt``; None otherwise."""
    import flask

    if not flask.has_request_context():
        return None
    body = flask.request.get_json(silent=True)
    if isinstance(body, dict) and "message" in body and "specversion" not in body:
        return body
    return None


def work_event(event_type: str, data: Any, *, push_body: Mapping[str, Any] | None = None) -> str:
    """The ``jobs`` function: a CloudEvent's type and data -> one job worked."""
    b = broker()
    try:
        message = pubsub_message(event_type, data, push_body=push_body)
    except InvalidRequest as exc:
        raw = data if isinstance(data, bytes) else json.dumps(data, default=str).encode()
        _dead_letter_raw(_pubsub_queue(b), PubSubMessage(raw, {}, "", None, ""), exc.message)
        return "dead"
    return work_message(message)


# -------------------------------------------------------------------- scan


def scan_name(body: Any) -> str:
    """The scan a Cloud Scheduler request body asks for (``{"scan": "<name>"}``)."""
    name = body.get("scan") if isinstance(body, Mapping) else None
    return scan_named(
        name, source="the request", fix='give the scheduler job the body {"scan": "<name>"}'
    )


def scan_response(body: Any, headers: Mapping[str, str]) -> tuple[dict[str, Any], int]:
    """The ``scan`` function: a request body -> (JSON answer, status)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    token = correlation_id.set(
        lowered.get("x-correlation-id") or lowered.get("x-cloudscheduler-jobname", "") or "scan"
    )
    trace = _trace.set(_trace_id(lowered))
    try:
        try:
            b = broker()
        except BrokerError as exc:
            status, answer = unavailable(exc, log=log)
            return answer, status
        try:
            return scan_result(b, scan_name(body), log=log), 200
        except BrokerError as exc:
            log.warning("scan refused", extra={"reason": exc.message})
            return exc.to_body(), exc.http_status
    finally:
        correlation_id.reset(token)
        _trace.reset(trace)


# --------------------------------------------------------------------- dlq


def dlq_response(
    method: str, body: Any, headers: Mapping[str, str], query: Mapping[str, str]
) -> tuple[dict[str, Any], int]:
    """The ``dlq`` function: a request -> (JSON answer, status)."""
    from kidp.callers import ALL_NAMESPACES, SCOPE_DEPLOY, SCOPE_READ

    lowered = {k.lower(): v for k, v in headers.items()}
    token = correlation_id.set(lowered.get("x-correlation-id") or _trace_id(lowered) or "dlq")
    try:
        b = broker()
    except BrokerError as exc:
        status, answer = unavailable(exc, log=log)
        correlation_id.reset(token)
        return answer, status
    try:
        request = dict(body) if isinstance(body, Mapping) else {}
        if method == "GET":
            # Passed as given: the shared dlq parser refuses what is not true or false.
            request = {"action": "list", "includeResolved": query.get("includeResolved", "false")}
        elif method != "POST":
            raise InvalidRequest("use GET to list or POST with an action")
        action = dlq_action(request)
        scheme, _, credential = lowered.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("missing bearer token")
        caller = b.verifier.verify(credential.strip())
        if ALL_NAMESPACES not in caller.namespaces:
            raise Forbidden("dead letters need a token for all namespaces ('*')")
        caller.require_scope(SCOPE_READ if action == "list" else SCOPE_DEPLOY)
        return dead_letters(b, request, log=log, extra={"subject": caller.subject}), 200
    except BrokerError as exc:
        if isinstance(exc, Unauthorized | Forbidden):
            log.warning("dead letters refused", extra={"reason": exc.message})
        return exc.to_body(), exc.http_status
    finally:
        correlation_id.reset(token)
