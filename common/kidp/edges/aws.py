"""The AWS Lambda edge: Lambda events in, core calls out.

``aws/handlers.py`` exposes four functions, each one line around this module:

``api``
    API Gateway HTTP API (payload format 2.0) events, served by the broker's
    one ASGI application through Mangum. The API Gateway request id becomes
    the request's correlation id (``X-Correlation-ID``) unless the caller sent
    one.
``worker``
    SQS batches (event source mapping with ``ReportBatchItemFailures``),
    processed by Powertools' ``BatchProcessor``: each record is worked through
    :func:`kidp.work.work` and its outcome mapped once, here:

    * ``ack``: success; Lambda deletes the message.
    * ``retry``: the message's visibility is set to the retry delay, then the
      record is reported in ``batchItemFailures``; SQS delivers it again after
      the delay. Nothing sleeps.
    * ``dead``: the deployment has already been failed with a callback; the
      message is moved to the dead-letter queue and reported as success.

    A record that is not a job at all is dead-lettered at once: no retry can
    make it one. A job delayed beyond SQS's 900 s arrives early and is sent
    again with the rest of its delay (:meth:`SqsJobQueue.defer`).
``scan``
    EventBridge schedules. The scan to run comes from the event:
    ``{"scan": "drift"}`` (the rule target's constant input, what
    ``serverless.yml`` sets), or an EventBridge event whose ``detail`` is
    ``{"scan": "drift"}`` (``aws events put-events`` for a scan on demand).
    Names: ``drift``, ``orphans``, ``cost``, ``rotation``, ``reconcile``.
``dlq``
    Invoked by an operator (``aws lambda invoke``). ``{"action": "list"}``
    lists dead-lettered jobs (the SQS dead-letter queue, read without being
    consumed) and dead-lettered callbacks (the store).
    ``{"action": "redrive"}`` moves every dead-lettered job back to the work
    queue and sends every unresolved dead-lettered callback again;
    ``"ids": [...]`` restricts either to those ids (job ids, ``dl_...``
    callback letter ids) and ``"limit"`` bounds the callbacks sent in one
    invocation (default 10, since each may wait out the callback timeout).

One broker per container: built on first use from ``KIDP_*`` settings (or at
init by :func:`warm_up`) and kept for the container's life; tests hand in their
own through :func:`install`. On Lambda the
region defaults to ``AWS_REGION`` and the state directory to ``/tmp/kidp``;
``KIDP_JWT_SECRET`` (or ``KIDP_JWT_JWKS_URL``) and ``KIDP_CALLBACK_SECRET`` are
required, because a development key made per container would disagree with
every other container.

Observability: Powertools' Logger formats every ``kidp.*`` log record as JSON
with the Lambda context and ``correlation_id`` (the deployment id while a job
runs, the request id in the API); Tracer traces each invocation; and after
each invocation the broker's Prometheus metrics are emitted as CloudWatch EMF
under their own names by :class:`EmfBridge`, so dashboards use one vocabulary
on every platform.

Cold start: this module imports neither the web framework nor the batch
utility at import time. ``api`` imports Mangum (and, through the broker's app,
FastAPI) on its first call; ``worker`` imports the batch processor; ``scan``
and ``dlq`` import only the broker.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from functools import partial, wraps
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from aws_lambda_powertools.logging import Logger

from kidp.edges.base import (
    BrokerSlot,
    LogRoute,
    Stdout,
    dead_letters,
    function_settings,
    require_spare_delivery,
    runs_per_job,
    scan_named,
    scan_result,
    trigger_queue,
    unavailable,
    work_delivery,
)
from kidp.errors import BrokerError
from kidp.observability import correlation_id

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
    from prometheus_client import CollectorRegistry

    from kidp.bootstrap import Broker
    from kidp.queues.sqs import SqsJobQueue
    from kidp.settings import Settings

__all__ = [
    "SERVICE",
    "EmfBridge",
    "RetryLater",
    "api",
    "broker",
    "dlq",
    "install",
    "reset",
    "runs_per_job",
    "scan",
    "scan_name",
    "settings_from_env",
    "traced",
    "tracing_enabled",
    "warm_up",
    "worker",
]

#: The service name in logs, traces and the EMF ``service`` dimension.
SERVICE: Final = os.environ.get("POWERTOOLS_SERVICE_NAME", "kidp-broker")
#: The CloudWatch namespace of the broker's metrics.
NAMESPACE: Final = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "KIDP/Broker")

log = logging.getLogger("kidp.edges.aws")


class _CorrelationFilter(logging.Filter):
    """Stamps each record with the core's correlation id, which the core sets
    per job (the deployment id) and per request (the request id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        cid = correlation_id.get()
        if cid and not hasattr(record, "correlation_id"):
            record.correlation_id = cid
        return True


logger = Logger(service=SERVICE, stream=Stdout())  # type: ignore[arg-type]
logger.registered_handler.addFilter(_CorrelationFilter())

F = TypeVar("F", bound=Callable[..., Any])


def tracing_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True on Lambda unless ``POWERTOOLS_TRACE_DISABLED`` is set: the X-Ray SDK
    is imported only then (it is a large part of a cold start)."""
    env = os.environ if environ is None else environ
    disabled = env.get("POWERTOOLS_TRACE_DISABLED", "").lower() in ("1", "true", "yes")
    return bool(env.get("LAMBDA_TASK_ROOT")) and not disabled


def traced(function: F) -> F:
    """``function`` as a traced Lambda handler when tracing is on (responses are
    not recorded: they can be large and hold callback payloads)."""
    if not tracing_enabled():
        return function
    from aws_lambda_powertools import Tracer

    # Only the clients the broker calls through: patching every library X-Ray
    # knows would import each of them at cold start.
    tracer = Tracer(service=SERVICE, patch_modules=["botocore", "httpx"])
    return cast("F", tracer.capture_lambda_handler(function, capture_response=False))


# --------------------------------------------------------------------- broker


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """``KIDP_*`` settings as a Lambda function needs them (see the module docstring)."""
    env = dict(os.environ if environ is None else environ)
    if not env.get("KIDP_REGION") and env.get("AWS_REGION"):
        env["KIDP_REGION"] = env["AWS_REGION"]
    settings = function_settings(env, platform="Lambda", instance="container")
    require_spare_delivery(settings, platform="Lambda", delivery="receive")
    return settings


class _Container(BrokerSlot):
    """What one Lambda container keeps between invocations: the broker, and
    the API's ASGI adapter around the broker's app."""

    http: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None

    def forget(self) -> None:
        self.http = None
        _EMF.forget()


def _powertools_level(settings: Settings) -> None:
    # Powertools' own logger (what it writes itself) follows the broker's level.
    logger.setLevel(settings.log_level.upper())


#: Every ``kidp.*`` record through Powertools' JSON handler. botocore logs
#: request and response bodies at DEBUG, secret values included.
_logs = LogRoute(
    logger.registered_handler,
    quiet=("botocore", "boto3", "urllib3", "httpx", "httpcore", "mangum"),
    configure=_powertools_level,
)
_container = _Container(settings_from_env, _logs)

#: This container's broker, built on first use.
broker = _container.get
#: Use a built broker as this container's: the door through which tests hand
#: in a broker wired with their own adapters.
install = _container.install
#: Forget this container's broker (close it) and detach the log routing; for
#: tests, which change the environment between invocations.
reset = _container.reset


def warm_up(handler: str | None = None) -> None:
    """Build, during Lambda's init phase, what ``handler`` (``_HANDLER``, e.g.
    ``handlers.api``) needs: the broker, and for ``api`` its ASGI adapter.
    Outside Lambda (no ``_HANDLER``) nothing is built."""
    handler = os.environ.get("_HANDLER", "") if handler is None else handler
    function = handler.rpartition(".")[2]
    if function not in ("api", "worker", "scan", "dlq"):
        return
    try:
        broker()
        if function == "api":
            _asgi_handler()
    except BrokerError as exc:
        # Raised here it would be an init error, and API Gateway would answer
        # with its own body; the first invocation builds again and answers
        # with the documented error shape (and the reason in the log).
        log.error("broker not built at init", extra={"reason": exc.message})
        return
    if function == "worker":
        import aws_lambda_powertools.utilities.batch  # noqa: F401 - imported at init


# -------------------------------------------------------------------- metrics


class EmfBridge:
    """Emits a Prometheus registry as CloudWatch EMF, once per invocation.

    The core counts in Prometheus metrics (``kidp.observability.Metrics``);
    Lambda has no scraper, so after each invocation the change since the last
    flush is printed as EMF under the same names, with the Prometheus labels as
    dimensions (plus ``function`` and ``service``). Nothing is written per
    metric: a metric added to the core shows up here by itself.

    * Counters: the increase, unit Count (``kidp_broker_requests_total``...).
    * Histograms: the observations, under the histogram's name, unit Seconds
      for ``*_seconds``. Prometheus keeps only sums, so several observations in
      one invocation are emitted as that many values of their mean (at most 100,
      EMF's limit per metric).
    * Gauges: the current value, whenever it changed.
    """

    _MAX_VALUES = 100

    def __init__(self, *, namespace: str = NAMESPACE, service: str = SERVICE) -> None:
        self.namespace = namespace
        self.service = service
        self._seen: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}

    def forget(self) -> None:
        """Start again from zero (a new broker has new counters)."""
        self._seen.clear()

    def flush(self, registry: CollectorRegistry, *, function: str) -> int:
        """Print the EMF documents for what changed; returns how many metric
        values were emitted."""
        current: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        kinds: dict[str, str] = {}
        for metric in registry.collect():
            kinds[metric.name] = metric.type
            for sample in metric.samples:
                if sample.name.endswith(("_created", "_bucket")):
                    continue
                labels = tuple(sorted(sample.labels.items()))
                current[(metric.name, sample.name, labels)] = float(sample.value)
        groups: dict[tuple[tuple[str, str], ...], list[tuple[str, str, list[float]]]] = defaultdict(
            list
        )
        for (family, name, labels), value in current.items():
            before = self._seen.get((family, name, labels), 0.0)
            kind = kinds[family]
            if kind == "counter" and name.endswith("_total") and value > before:
                groups[labels].append((name, "Count", [value - before]))
            elif kind == "gauge" and value != before:
                groups[labels].append((name, _unit(name), [value]))
            elif kind == "histogram" and name.endswith("_count") and value > before:
                total = current.get((family, f"{family}_sum", labels), 0.0)
                spent = total - self._seen.get((family, f"{family}_sum", labels), 0.0)
                count = int(value - before)
                values = [spent / count] * min(count, self._MAX_VALUES)
                groups[labels].append((family, _unit(family), values))
        self._seen = current
        return self._emit(groups, function)

    def _emit(
        self,
        groups: Mapping[tuple[tuple[str, str], ...], list[tuple[str, str, list[float]]]],
        function: str,
    ) -> int:
        if not groups:
            return 0
        from aws_lambda_powertools.metrics import EphemeralMetrics

        emitted = 0
        for labels, metrics in groups.items():
            # One EMF document per label set: EMF dimensions apply to all its metrics.
            document = EphemeralMetrics(namespace=self.namespace, service=self.service)
            document.add_dimension(name="function", value=function)
            for key, value in labels:
                if value:
                    document.add_dimension(name=key, value=value)
            for name, unit, values in metrics:
                for amount in values:
                    document.add_metric(name=name, unit=unit, value=amount)
                    emitted += 1
            document.flush_metrics()
        return emitted


def _unit(name: str) -> str:
    return "Seconds" if name.endswith("_seconds") else "Count"


_EMF = EmfBridge()


def _flush_metrics(function: str) -> None:
    if _container.broker is None:
        return
    try:
        _EMF.flush(_container.broker.service.metrics.registry, function=function)
    except Exception:
        # Metrics must never fail the work they describe.
        log.warning("EMF metrics could not be written", exc_info=True)


def _entry_point(body: F) -> F:
    """``body`` as a Lambda entry point: traced when tracing is on, Powertools'
    Lambda context in its log records, and the metrics it recorded written as
    EMF when it ends (under the ``function`` dimension of its name), whatever
    the outcome."""

    @wraps(body)
    def handler(event: dict[str, Any], context: Any) -> Any:
        try:
            return body(event, context)
        finally:
            _flush_metrics(body.__name__)

    return traced(logger.inject_lambda_context(clear_state=True)(cast("F", handler)))


# ------------------------------------------------------------------------ api


def _asgi_handler() -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    if _container.http is None:
        from mangum import Mangum

        # No lifespan: the app holds no per-process resources to open or close.
        _container.http = Mangum(broker().app, lifespan="off")
    return _container.http


@_entry_point
def api(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """API Gateway HTTP API event -> the broker's ASGI app -> HTTP response."""
    request_id = str(event.get("requestContext", {}).get("requestId") or "")
    headers = {str(k).lower(): v for k, v in (event.get("headers") or {}).items()}
    if request_id and not headers.get("x-correlation-id"):
        # The gateway's request id is what an operator finds in the access log.
        headers["x-correlation-id"] = request_id
        event = {**event, "headers": headers}
    token = correlation_id.set(headers.get("x-correlation-id", request_id))
    try:
        try:
            handler = _asgi_handler()
        except BrokerError as exc:
            return _broker_unavailable(exc)
        return handler(event, context)
    finally:
        correlation_id.reset(token)


def _broker_unavailable(exc: BrokerError) -> dict[str, Any]:
    """An API Gateway response when the broker cannot even be built."""
    import json

    status, body = unavailable(exc, log=log)
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(body),
        "isBase64Encoded": False,
    }


# --------------------------------------------------------------------- worker


class RetryLater(Exception):
    """Raised for a record whose job must be delivered again: Powertools reports
    it in ``batchItemFailures``; its visibility already holds the delay."""


def _sqs_queue(b: Broker) -> SqsJobQueue:
    from kidp.queues.sqs import SqsJobQueue

    return trigger_queue(
        b,
        SqsJobQueue,
        needs="the worker function needs KIDP_QUEUE_URL to be the SQS queue that triggers it",
    )


def _work_record(b: Broker, queue: SqsJobQueue, record: SQSRecord) -> None:
    """Work one SQS record; raise to have it reported as a batch item failure."""
    from kidp.errors import InvalidRequest

    raw = record.raw_event
    try:
        delivery = queue.delivery_from_record(raw)
    except InvalidRequest as exc:
        attempt = int(raw.get("attributes", {}).get("ApproximateReceiveCount", "1"))
        queue.dead_letter_message(
            raw["receiptHandle"], raw["body"], attempt=attempt, reason=exc.message
        )
        return
    outcome = work_delivery(
        b,
        delivery,
        log=log,
        retry=queue.retry,
        dead=queue.dead_letter,
        defer=queue.defer,
    )
    if outcome.action == "retry":
        # The message's visibility already holds the delay.
        raise RetryLater(f"retry in {outcome.delay:g} s: {outcome.reason}")


@_entry_point
def worker(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """SQS batch -> one job per record -> ``{"batchItemFailures": [...]}``."""
    from aws_lambda_powertools.utilities.batch import (
        BatchProcessor,
        EventType,
        process_partial_response,
    )

    b = broker()
    queue = _sqs_queue(b)
    # Not raising when every record failed: the response already says which
    # failed, and each one's visibility already holds its own delay.
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    return dict(
        process_partial_response(
            event=event,
            record_handler=partial(_work_record, b, queue),
            processor=processor,
            context=context,
        )
    )


# ----------------------------------------------------------------------- scan


def scan_name(event: Mapping[str, Any]) -> str:
    """The scan an EventBridge event asks for (see the module docstring)."""
    name = event.get("scan")
    detail = event.get("detail")
    if name is None and isinstance(detail, Mapping):
        name = detail.get("scan")
    return scan_named(
        name, source="the event", fix='give the schedule the input {"scan": "<name>"}'
    )


@_entry_point
def scan(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """EventBridge schedule -> one scan -> its result."""
    name = scan_name(event)
    token = correlation_id.set(str(event.get("id") or getattr(context, "aws_request_id", "")))
    try:
        return scan_result(broker(), name, log=log)
    finally:
        correlation_id.reset(token)


# ------------------------------------------------------------------------ dlq


@_entry_point
def dlq(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """``{"action": "list" | "redrive", "ids"?: [...]}`` -> dead letters
    (:mod:`kidp.deadletters`)."""
    b = broker()
    token = correlation_id.set(str(getattr(context, "aws_request_id", "") or "dlq"))
    try:
        return dead_letters(b, event, log=log)
    finally:
        correlation_id.reset(token)
