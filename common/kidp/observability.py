"""Metrics (Prometheus, named as in seeds 000 and 001), JSON logs, correlation ids.

One ``Metrics`` object per service, on its own registry, so tests and
several services in one process never share counters.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")

#: Log record attributes that are not part of the message's structured fields.
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    # uvicorn repeats its message with ANSI colour codes for terminals.
    "color_message",
}


def new_correlation_id() -> str:
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, correlationId, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        cid = correlation_id.get()
        if cid:
            entry["correlationId"] = cid
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """JSON logs on stderr for the whole process (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    # Pinned whatever the root level: botocore logs request and response bodies
    # at DEBUG (secret values included), and access logs repeat our request log.
    for name in ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


#: A (namespace, type, phase) group; the models' StrEnums are label values as they are.
_Group = TypeVar("_Group", bound=tuple[str, str, str])

#: Provider names whose cloud API is a Kubernetes API server.
_KUBERNETES_PROVIDERS = frozenset({"onprem"})


class _KubernetesAvailable(Collector):
    """Seed 001's ``broker_kubernetes_api_available``: the value of
    ``broker_cloud_api_available`` under the on-prem seed's name. Read from
    that gauge at collection, so whoever sets one sets both; absent for other
    providers, where a 0 would claim a Kubernetes API that is down."""

    NAME = "broker_kubernetes_api_available"
    HELP = "1 when the Kubernetes API answered the last check"

    def __init__(self, cloud: Gauge) -> None:
        self.cloud = cloud
        self.enabled = False

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.NAME, self.HELP)]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if not self.enabled:
            return []
        (family,) = self.cloud.collect()
        return [GaugeMetricFamily(self.NAME, self.HELP, value=family.samples[0].value)]


class Metrics:
    """The broker's metrics. Names follow seed 000 (``kidp_broker_*``) and seed 001
    (``broker_*``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kidp_broker_requests_total", "HTTP requests", ["method", "status"], registry=r
        )
        self.request_duration = Histogram(
            "kidp_broker_request_duration_seconds",
            "HTTP request duration",
            ["method"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.http_request_duration = Histogram(
            "broker_http_request_duration_seconds",
            "HTTP request duration by route template (never the raw path, whose ids "
            "would make a series per deployment)",
            ["endpoint", "method"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.cloud_api_calls = Counter(
            "kidp_broker_cloud_api_calls_total",
            "Cloud API calls",
            ["provider", "resource_type", "operation"],
            registry=r,
        )
        self.callback_attempts = Counter(
            "kidp_broker_callback_attempts_total", "Callback attempts", ["status"], registry=r
        )
        self.active_deployments = Gauge(
            "kidp_broker_active_deployments", "Deployments not Deleted or Failed", registry=r
        )
        self.provision_requests = Counter(
            "broker_provision_requests_total",
            "Provision requests by outcome",
            ["resource_type", "status"],
            registry=r,
        )
        self.provision_duration = Histogram(
            "broker_provision_duration_seconds",
            "Time from accepted to Ready",
            ["resource_type"],
            registry=r,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
        )
        self.drift_detected = Counter(
            "broker_drift_detected_total",
            "Significant drift found by the drift scan",
            ["namespace", "type"],
            registry=r,
        )
        self.orphans = Gauge(
            "broker_orphaned_resources", "Resources found by the last orphan scan", registry=r
        )
        self.cost_jumps = Counter(
            "broker_cost_jumps_total",
            "Week-over-week cost rises above the threshold",
            ["group"],
            registry=r,
        )
        self.rotations = Counter(
            "broker_credential_rotations_total", "Credential rotations", ["status"], registry=r
        )
        self.dead_letters = Counter(
            "broker_callback_dead_letters_total", "Callbacks moved to dead letters", registry=r
        )
        self.resources = Gauge(
            "broker_resources_total",
            "Deployments per namespace, resource type and phase",
            ["namespace", "type", "phase"],
            registry=r,
        )
        self.cloud_available = Gauge(
            "broker_cloud_api_available",
            "1 when the cloud API answered the last check",
            registry=r,
        )
        self._kubernetes_available = _KubernetesAvailable(self.cloud_available)
        r.register(self._kubernetes_available)
        self._resource_groups: set[tuple[str, str, str]] = set()

    def use_provider(self, name: str) -> None:
        """Name the provider behind ``broker_cloud_api_available``; for a
        Kubernetes one its value is also ``broker_kubernetes_api_available``."""
        self._kubernetes_available.enabled = name in _KUBERNETES_PROVIDERS

    def set_resources(self, counts: Mapping[_Group, int]) -> None:
        """Set ``broker_resources_total`` from (namespace, type, phase) counts.

        A group counted before and absent now is set to 0 rather than removed:
        a dropped series reads as "no data", not as "none left in this phase".
        """
        for group in self._resource_groups - counts.keys():
            self.resources.labels(*group).set(0)
        for group, count in counts.items():
            self.resources.labels(*group).set(count)
        self._resource_groups |= counts.keys()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
