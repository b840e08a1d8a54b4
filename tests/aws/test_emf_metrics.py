"""Seed 000 and 001's metric names reach CloudWatch as EMF from the Lambda
``api`` function (``aws/handlers.py``), on moto.

Self-contained on purpose: the function is configured here as
``serverless.yml`` configures it, with only what the API needs (the table,
the job queue, the secrets); the worker and the scans are
``test_handlers.py``'s business.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from tests.conftest import LambdaContext as Context
from tests.conftest import bearer_token, create_queue_with_dlq

ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
JWT_SECRET = "e" * 48


@pytest.fixture
def api(aws: None, monkeypatch: pytest.MonkeyPatch, receiver: Any) -> Iterator[Callable[..., int]]:
    """``handlers.api`` as Lambda loads it (by path), on a moto table and queue;
    calls it with an API Gateway HTTP API event and returns the status."""
    from kidp.edges import aws as edge
    from kidp.stores.dynamodb import DynamoDbDeploymentStore

    sqs = boto3.client("sqs", region_name=REGION)
    queue_url, _ = create_queue_with_dlq(sqs, "kidp-jobs", max_receive_count=4)
    DynamoDbDeploymentStore("kidp-emf", region=REGION).create_table()
    for key, value in {
        "AWS_REGION": REGION,
        "KIDP_STORE_URL": "dynamodb://kidp-emf",
        "KIDP_QUEUE_URL": queue_url,
        "KIDP_JWT_SECRET": JWT_SECRET,
        "KIDP_CALLBACK_SECRET": receiver.secret,
        "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KIDP_REGION", raising=False)
    spec = importlib.util.spec_from_file_location("handlers", ROOT / "aws" / "handlers.py")
    assert spec is not None and spec.loader is not None
    handlers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handlers)
    edge.reset()
    token = bearer_token(JWT_SECRET, namespaces=["team-platform"])

    def call(method: str, path: str, body: Any = None) -> int:
        event: dict[str, Any] = json.loads((ROOT / "tests/events/apigw_http_v2.json").read_text())
        event["rawPath"], event["rawQueryString"] = path, ""
        event["requestContext"]["http"].update(method=method, path=path)
        event["headers"]["authorization"] = f"Bearer {token}"
        if body is not None:
            event["body"] = json.dumps(body)
            event["headers"]["content-type"] = "application/json"
            event["headers"]["content-length"] = str(len(event["body"]))
        return int(handlers.api(event, Context())["statusCode"])

    yield call
    edge.reset()


def provision_body(receiver: Any) -> dict[str, Any]:
    return {
        "resourceType": "database",
        "resourceName": "orders-db",
        "namespace": "team-platform",
        "team": "platform-team",
        "owner": "alice@example.com",
        "callbackUrl": receiver.url,
        "spec": {"engine": "postgresql", "version": "15", "size": "medium"},
    }


def documents(output: str) -> list[dict[str, Any]]:
    """The EMF documents among the lines printed to stdout."""
    found = []
    for line in output.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if "_aws" in entry:
                found.append(entry)
    return found


def carrying(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in docs if name in d]


def test_a_provision_emits_the_seed_names(
    api: Callable[..., int], receiver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    status = api("POST", "/v1/provision", provision_body(receiver))
    assert status == 202
    docs = documents(capsys.readouterr().out)
    for name in (
        "kidp_broker_requests_total",
        "kidp_broker_request_duration_seconds",
        "broker_provision_requests_total",
    ):
        assert carrying(docs, name), name
    (http,) = carrying(docs, "broker_http_request_duration_seconds")
    assert (http["endpoint"], http["method"], http["function"]) == ("/v1/provision", "POST", "api")
    (definition,) = http["_aws"]["CloudWatchMetrics"]
    assert {"endpoint", "method"} <= set(definition["Dimensions"][0])
    assert definition["Metrics"][0]["Unit"] == "Seconds"


def test_resource_counts_are_emitted_when_counted(
    api: Callable[..., int], receiver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The gauge is counted per scrape; on Lambda a scrape is ``GET /metrics``
    through the api function, and what it counted goes out as EMF too."""
    assert api("POST", "/v1/provision", provision_body(receiver)) == 202
    capsys.readouterr()
    assert api("GET", "/metrics") == 200
    docs = documents(capsys.readouterr().out)
    (resources,) = carrying(docs, "broker_resources_total")
    assert resources["broker_resources_total"] == [1.0]
    assert (resources["namespace"], resources["type"], resources["phase"]) == (
        "team-platform",
        "database",
        "Pending",
    )
    (http,) = carrying(docs, "broker_http_request_duration_seconds")
    assert http["endpoint"] == "/metrics"
    # The Kubernetes gauge belongs to the onprem provider, never to Lambda's.
    assert not carrying(docs, "broker_kubernetes_api_available")
