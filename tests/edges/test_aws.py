"""The AWS edge's own decisions, without AWS: how Prometheus metrics become
EMF, which scan an event asks for, what a Lambda function requires of its
settings, and when tracing loads the X-Ray SDK. The handlers themselves, end
to end on moto, are in ``tests/aws/test_handlers.py``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.conftest import LambdaContext

from kidp.edges.aws import EmfBridge, scan_name, settings_from_env, tracing_enabled
from kidp.errors import ValidationFailed
from kidp.observability import Metrics

SECRETS = {"KIDP_JWT_SECRET": "j" * 40, "KIDP_CALLBACK_SECRET": "whsec_c2VjcmV0"}


def documents(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith('{"_aws"')]


def one(found: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (document,) = [d for d in found if name in d]
    return document


# --------------------------------------------------------------------- EMF


def test_counters_are_emitted_as_their_increase_with_labels_as_dimensions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    metrics, bridge = Metrics(), EmfBridge(namespace="Test", service="svc")
    metrics.provision_requests.labels("database", "accepted").inc()
    metrics.provision_requests.labels("database", "accepted").inc()

    assert bridge.flush(metrics.registry, function="api") == 1
    document = one(documents(capsys.readouterr().out), "broker_provision_requests_total")
    assert document["broker_provision_requests_total"] == [2.0]
    assert (document["resource_type"], document["status"]) == ("database", "accepted")
    assert (document["function"], document["service"]) == ("api", "svc")
    (definition,) = document["_aws"]["CloudWatchMetrics"]
    assert definition["Namespace"] == "Test"
    assert definition["Metrics"] == [{"Name": "broker_provision_requests_total", "Unit": "Count"}]
    assert set(definition["Dimensions"][0]) == {"function", "resource_type", "status", "service"}

    # Nothing new: nothing written. One more: only the one.
    assert bridge.flush(metrics.registry, function="api") == 0
    metrics.provision_requests.labels("database", "accepted").inc()
    bridge.flush(metrics.registry, function="api")
    document = one(documents(capsys.readouterr().out), "broker_provision_requests_total")
    assert document["broker_provision_requests_total"] == [1.0]


def test_histograms_emit_their_observations_in_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    metrics, bridge = Metrics(), EmfBridge()
    metrics.request_duration.labels("GET").observe(0.2)
    metrics.request_duration.labels("GET").observe(0.4)
    bridge.flush(metrics.registry, function="api")

    document = one(documents(capsys.readouterr().out), "kidp_broker_request_duration_seconds")
    assert document["kidp_broker_request_duration_seconds"] == pytest.approx([0.3, 0.3])
    assert document["method"] == "GET"
    unit = document["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"]
    assert unit == "Seconds"


def test_gauges_are_emitted_when_they_change(capsys: pytest.CaptureFixture[str]) -> None:
    metrics, bridge = Metrics(), EmfBridge()
    metrics.orphans.set(3)
    bridge.flush(metrics.registry, function="scan")
    assert one(documents(capsys.readouterr().out), "broker_orphaned_resources")[
        "broker_orphaned_resources"
    ] == [3.0]

    metrics.orphans.set(3)
    bridge.flush(metrics.registry, function="scan")
    assert documents(capsys.readouterr().out) == []


def test_a_new_metric_in_the_core_is_emitted_without_edge_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from prometheus_client import Counter

    metrics, bridge = Metrics(), EmfBridge()
    added = Counter(
        "kidp_broker_new_things_total", "A metric added later", registry=metrics.registry
    )
    added.inc(5)
    bridge.flush(metrics.registry, function="worker")
    assert one(documents(capsys.readouterr().out), "kidp_broker_new_things_total")[
        "kidp_broker_new_things_total"
    ] == [5.0]


def test_forget_starts_counting_again(capsys: pytest.CaptureFixture[str]) -> None:
    metrics, bridge = Metrics(), EmfBridge()
    metrics.dead_letters.inc()
    bridge.flush(metrics.registry, function="worker")
    bridge.forget()
    fresh = Metrics()  # a new broker: new counters from zero
    fresh.dead_letters.inc()
    bridge.flush(fresh.registry, function="worker")
    found = [
        d for d in documents(capsys.readouterr().out) if "broker_callback_dead_letters_total" in d
    ]
    assert [d["broker_callback_dead_letters_total"] for d in found] == [[1.0], [1.0]]


# -------------------------------------------------------------------- scans


def test_the_scan_comes_from_the_constant_input_or_the_events_detail() -> None:
    assert scan_name({"scan": "drift"}) == "drift"
    assert scan_name({"detail-type": "Scheduled Event", "detail": {"scan": "cost"}}) == "cost"


@pytest.mark.parametrize(
    "event",
    [{}, {"scan": "everything"}, {"detail-type": "Scheduled Event", "detail": {}}, {"scan": 3}],
)
def test_an_event_without_a_known_scan_is_refused_with_the_names(event: dict[str, Any]) -> None:
    with pytest.raises(ValidationFailed) as caught:
        scan_name(event)
    assert "drift, orphans, cost, rotation, reconcile" in caught.value.message


# ----------------------------------------------------------------- settings


def test_lambda_settings_take_the_region_from_aws_and_state_from_tmp() -> None:
    settings = settings_from_env({"AWS_REGION": "eu-west-1", **SECRETS})
    assert settings.region == "eu-west-1"
    assert str(settings.state_dir) == "/tmp/kidp"
    explicit = settings_from_env({"AWS_REGION": "eu-west-1", "KIDP_REGION": "us-east-2", **SECRETS})
    assert explicit.region == "us-east-2"


def test_lambda_settings_require_the_shared_secrets() -> None:
    with pytest.raises(ValidationFailed) as caught:
        settings_from_env({"AWS_REGION": "us-east-1"})
    assert "KIDP_JWT_SECRET or KIDP_JWT_JWKS_URL" in caught.value.message
    assert "KIDP_CALLBACK_SECRET" in caught.value.message

    with pytest.raises(ValidationFailed, match="KIDP_CALLBACK_SECRET") as caught:
        settings_from_env({"KIDP_JWT_JWKS_URL": "https://idp.example.com/jwks.json"})
    assert "KIDP_JWT_SECRET" not in caught.value.message


# ------------------------------------------------------------------ tracing


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"LAMBDA_TASK_ROOT": "/var/task"}, True),
        ({"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": "true"}, False),
    ],
)
def test_tracing_only_on_lambda_and_not_when_disabled(
    environ: dict[str, str], expected: bool
) -> None:
    assert tracing_enabled(environ) is expected


# --------------------------------------------------------------------- dlq


def test_the_dlq_function_refuses_bad_fields_with_the_documented_error(
    dlq_broker: Any,
) -> None:
    """Lambda's dlq is invoked, not served: a refused request is the
    invocation's error, ``ValidationFailed`` (400, ``validation_failed``)."""
    from kidp.edges import aws as edge

    harness = dlq_broker
    edge.install(harness.broker)
    try:
        listed = edge.dlq({"action": "list", "includeResolved": "false"}, LambdaContext())
        assert [c["id"] for c in listed["callbacks"]] == ["dl-open"]
        for bad in (
            {"action": "list", "includeResolved": "0"},
            {"action": "redrive", "limit": "ten"},
            {"action": "redrive", "limit": None},
        ):
            with pytest.raises(ValidationFailed) as raised:
                edge.dlq(bad, LambdaContext())
            assert raised.value.http_status == 400
            assert raised.value.to_body()["error"] == "validation_failed"
        assert harness.store.get_dead_letter("dl-open").resolved_at is None
    finally:
        edge.reset()
