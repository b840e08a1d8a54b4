"""The GCP edge's own decisions, without a cloud: how a Pub/Sub delivery is
read out of each way it arrives, what a Cloud Function requires of its
settings, which scan a scheduler call asks for, and how a log record looks
to Cloud Logging. The functions themselves, end to end on the emulators, are
in ``tests/gcp/test_main.py``."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import bearer_token

from kidp.edges.gcp import (
    PUBSUB_EVENT_TYPE,
    CloudLoggingFormatter,
    _trace,
    _trace_id,
    pubsub_message,
    runs_per_job,
    scan_name,
    settings_from_env,
)
from kidp.errors import InvalidRequest, ValidationFailed
from kidp.observability import correlation_id

EVENTS = Path(__file__).resolve().parents[1] / "events"
SECRETS = {"KIDP_JWT_SECRET": "j" * 40, "KIDP_CALLBACK_SECRET": "whsec_c2VjcmV0"}
QUEUE = {
    "KIDP_QUEUE_URL": "pubsub://kidp-prod/kidp-jobs",
    "KIDP_GCP_TASKS_QUEUE": "projects/kidp-prod/locations/europe-west1/queues/kidp-delays",
    "KIDP_GCP_TASKS_SERVICE_ACCOUNT": "kidp-tasks@kidp-prod.iam.gserviceaccount.com",
}


def fixture(name: str) -> dict[str, Any]:
    event = dict(json.loads((EVENTS / name).read_text()))
    event.pop("_comment", None)
    return event


# ------------------------------------------------------------------ messages


def test_eventarcs_binary_event_carries_the_delivery_attempt() -> None:
    event = fixture("gcp_pubsub_binary.json")
    event["body"]["message"]["data"] = base64.b64encode(b'{"kind": "poll"}').decode()
    message = pubsub_message(event["headers"]["ce-type"], event["body"])
    assert message.data == b'{"kind": "poll"}'
    assert message.attributes["kidp-job-kind"] == "provision"
    assert message.message_id == "11937951452597258"
    assert message.delivery_attempt == 1
    assert message.subscription == "projects/kidp-prod/subscriptions/kidp-jobs-push"


def test_a_structured_events_data_is_the_same_envelope() -> None:
    event = fixture("gcp_pubsub_structured.json")
    message = pubsub_message(event["type"], event["data"])
    assert (message.message_id, message.delivery_attempt, message.data) == (
        "11937951452597259",
        1,
        b"",
    )


def test_a_raw_push_keeps_its_delivery_attempt_through_the_frameworks_conversion() -> None:
    push = fixture("gcp_pubsub_push.json")
    # What functions-framework hands the function for a raw push: the message
    # only, without the subscription and deliveryAttempt.
    converted = {"message": {**push["message"], "messageId": push["message"]["messageId"]}}
    alone = pubsub_message(PUBSUB_EVENT_TYPE, converted)
    assert alone.delivery_attempt is None
    merged = pubsub_message(PUBSUB_EVENT_TYPE, converted, push_body=push)
    assert merged.delivery_attempt == 3
    assert merged.subscription == push["subscription"]


def test_the_envelope_may_arrive_as_bytes() -> None:
    event = fixture("gcp_pubsub_structured.json")
    message = pubsub_message(PUBSUB_EVENT_TYPE, json.dumps(event["data"]).encode())
    assert message.message_id == "11937951452597259"


@pytest.mark.parametrize(
    ("event_type", "data", "reason"),
    [
        ("google.cloud.storage.object.v1.finalized", {"message": {}}, "takes google.cloud.pubsub"),
        (PUBSUB_EVENT_TYPE, {"bucket": "b"}, "not a Pub/Sub envelope"),
        (PUBSUB_EVENT_TYPE, b"\xff not json", "not a Pub/Sub envelope"),
        (PUBSUB_EVENT_TYPE, {"message": {"data": "%%%"}}, "not base64"),
    ],
)
def test_anything_else_is_refused_with_the_reason(event_type: str, data: Any, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        pubsub_message(event_type, data)


def test_a_delivery_attempt_that_is_not_a_count_is_ignored() -> None:
    data = {"message": {"data": ""}, "deliveryAttempt": "twice"}
    assert pubsub_message(PUBSUB_EVENT_TYPE, data).delivery_attempt is None


# ------------------------------------------------------------------ settings


def test_function_settings_default_to_gcp_and_tmp() -> None:
    settings = settings_from_env({**SECRETS, **QUEUE, "KIDP_REGION": "europe-west1"})
    assert (settings.cloud, settings.region, str(settings.state_dir)) == (
        "gcp",
        "europe-west1",
        "/tmp/kidp",
    )
    assert runs_per_job(settings) == settings.job_max_deliveries - 1 == 9


def test_function_settings_require_the_shared_secrets() -> None:
    with pytest.raises(ValidationFailed) as caught:
        settings_from_env(QUEUE)
    assert "KIDP_JWT_SECRET or KIDP_JWT_JWKS_URL" in caught.value.message
    assert "KIDP_CALLBACK_SECRET" in caught.value.message


@pytest.mark.parametrize("deliveries", ["4", "101"])
def test_max_deliveries_must_be_a_dead_letter_policy_pubsub_accepts(deliveries: str) -> None:
    with pytest.raises(ValidationFailed, match="5 to 100"):
        settings_from_env({**SECRETS, **QUEUE, "KIDP_JOB_MAX_DELIVERIES": deliveries})


def test_cloud_tasks_needs_a_service_account_to_publish_as() -> None:
    env = {**SECRETS, **QUEUE}
    del env["KIDP_GCP_TASKS_SERVICE_ACCOUNT"]
    with pytest.raises(ValidationFailed, match="KIDP_GCP_TASKS_SERVICE_ACCOUNT"):
        settings_from_env(env)
    # A local stand-in takes no token.
    settings_from_env({**env, "KIDP_GCP_TASKS_ENDPOINT": "http://127.0.0.1:9"})


# --------------------------------------------------------------------- scans


def test_the_scan_comes_from_the_schedulers_body() -> None:
    assert scan_name(fixture("gcp_scheduler_scan.json")["body"]) == "drift"


@pytest.mark.parametrize("body", [None, {}, {"scan": "everything"}, {"scan": 3}, ["drift"]])
def test_a_body_without_a_known_scan_is_refused_with_the_names(body: Any) -> None:
    with pytest.raises(ValidationFailed) as caught:
        scan_name(body)
    assert "drift, orphans, cost, rotation, reconcile" in caught.value.message


# ------------------------------------------------------------------- logging


def test_trace_ids_come_from_either_trace_header() -> None:
    headers = fixture("gcp_pubsub_binary.json")["headers"]
    assert _trace_id(headers) == "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    assert _trace_id(parent) == "0af7651916cd43dd8448eb211c80319c"
    assert _trace_id({"x-cloud-trace-context": "not a trace"}) == ""


def test_records_are_cloud_loggings_structured_json() -> None:
    formatter = CloudLoggingFormatter("kidp-prod")
    record = logging.LogRecord(
        "kidp.work", logging.WARNING, __file__, 1, "job %s", ("retried",), None
    )
    record.deploymentId = "deploy-1"
    tokens = (correlation_id.set("deploy-1"), _trace.set("4bf92f3577b34da6a3ce929d0e0e4736"))
    try:
        entry = json.loads(formatter.format(record))
    finally:
        correlation_id.reset(tokens[0])
        _trace.reset(tokens[1])
    assert entry["severity"] == "WARNING"
    assert entry["message"] == "job retried"
    assert entry["correlationId"] == "deploy-1"
    assert entry["logging.googleapis.com/labels"] == {"correlation_id": "deploy-1"}
    assert entry["logging.googleapis.com/trace"] == (
        "projects/kidp-prod/traces/4bf92f3577b34da6a3ce929d0e0e4736"
    )
    assert entry["deploymentId"] == "deploy-1"
    assert entry["logger"] == "kidp.work"


def test_a_record_outside_a_request_has_no_trace_or_correlation() -> None:
    record = logging.LogRecord("kidp", logging.ERROR, __file__, 1, "boom", None, None)
    entry = json.loads(CloudLoggingFormatter(None).format(record))
    assert entry["severity"] == "ERROR"
    assert "correlationId" not in entry
    assert "logging.googleapis.com/trace" not in entry


# ------------------------------------------------------------------ dlq


def test_the_dlq_function_refuses_bad_fields_with_the_documented_400(
    dlq_broker: Any,
) -> None:
    from kidp.edges import gcp as edge

    harness = dlq_broker
    edge.install(harness.broker)
    headers = {"Authorization": f"Bearer {bearer_token('s' * 40)}"}
    try:
        answer, status = edge.dlq_response(
            "POST", {"action": "list", "includeResolved": "false"}, headers, {}
        )
        assert status == 200
        assert [c["id"] for c in answer["callbacks"]] == ["dl-open"]
        for bad in (
            {"action": "list", "includeResolved": "maybe"},
            {"action": "redrive", "limit": "ten"},
            {"action": "redrive", "limit": 2.5},
        ):
            answer, status = edge.dlq_response("POST", bad, headers, {})
            assert status == 400, bad
            assert answer["error"] == "validation_failed" and answer["message"], bad
        assert harness.store.get_dead_letter("dl-open").resolved_at is None
    finally:
        edge.reset()
