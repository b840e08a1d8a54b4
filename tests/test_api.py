"""The HTTP API as a caller sees it: status codes, the error shape, auth,
limits, and the seed's response shapes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from kidp.auth import mint_token

SECRET = "s" * 40
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def api(make_broker: Any) -> Callable[..., tuple[Any, TestClient]]:
    def factory(**overrides: Any) -> tuple[Any, TestClient]:
        h = make_broker(jwt_secret=SECRET, **overrides)
        return h, TestClient(h.broker.app)

    return factory


def token(
    *,
    scopes: str = "deploy read delete",
    namespaces: list[str] | None = None,
    subject: str = "ci-bot",
    issued_ago: int = 0,
    secret: str = SECRET,
) -> dict[str, str]:
    value = mint_token(
        secret=secret,
        subject=subject,
        scopes=scopes.split(),
        namespaces=namespaces or ["team-platform"],
        ttl_seconds=600,
        issuer="kidp",
        audience="kidp-broker",
        now=time.time() - issued_ago,
    )
    return {"Authorization": f"Bearer {value}"}


def body(h: Any, **changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "resourceType": "database",
        "resourceName": "postgres-app-db",
        "namespace": "team-platform",
        "team": "platform-team",
        "owner": "user@example.com",
        "callbackUrl": h.receiver.url,
        "spec": {
            "engine": "postgresql",
            "version": "15",
            "size": "medium",
            "highAvailability": False,
            "backup": {"enabled": True, "retention": "7d"},
            "encryption": {"atRest": True, "inTransit": True},
        },
    }
    payload.update(changes)
    return payload


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    payload: dict[str, Any] = response.json()
    assert payload.keys() == {"error", "message", "code"}
    assert payload["error"] == code and payload["code"] == status
    return payload


def test_provision_answers_202_in_the_seed_shape(api: Any) -> None:
    h, client = api()
    response = client.post("/v1/provision", json=body(h), headers=token())
    assert response.status_code == 202
    payload = response.json()
    assert payload.keys() == {"status", "deploymentId", "message"}
    assert payload["status"] == "accepted"
    assert payload["message"] == "Provisioning request accepted for database/postgres-app-db"
    again = client.post("/api/v1/deploy", json=body(h), headers=token())
    assert again.status_code == 200
    assert again.json()["deploymentId"] == payload["deploymentId"]


def test_whole_lifecycle_through_the_routes(api: Any) -> None:
    h, client = api()
    deployment_id = client.post("/v1/provision", json=body(h), headers=token()).json()[
        "deploymentId"
    ]
    h.drain()
    status = client.get("/v1/status", params={"id": deployment_id}, headers=token())
    assert status.json().keys() == {"deploymentId", "phase", "message", "lastUpdated"}
    assert status.json()["phase"] == "Ready"
    detailed = client.get(f"/api/v1/deployments/{deployment_id}", headers=token())
    assert detailed.headers["cache-control"] == "max-age=30"
    assert detailed.json()["progress"] == 100
    assert detailed.json()["estimatedCompletion"] is None

    state = client.get(
        "/v1/resources", params={"namespace": "team-platform"}, headers=token()
    ).json()
    assert state["total"] == 1 and state["namespace"] == "team-platform"
    assert set(state["resources"][0]) == {
        "deploymentId",
        "resourceType",
        "resourceName",
        "namespace",
        "phase",
        "healthStatus",
        "message",
        "lastChecked",
        "endpoint",
        "port",
        "connectionSecret",
        "actualSpec",
        "desiredSpec",
        "driftDetected",
        "driftDetails",
        "resourceUsage",
        "estimatedMonthlyCost",
    }
    posted = client.post(
        "/v1/resources",
        json={"namespace": "team-platform", "resourceName": "postgres-app-db"},
        headers=token(),
    )
    assert posted.json()["resources"][0]["deploymentId"] == deployment_id

    deleted = client.delete(
        "/api/v1/resources/database/postgres-app-db",
        params={"namespace": "team-platform"},
        headers=token(),
    )
    assert deleted.status_code == 202
    h.drain()
    assert (
        client.get("/v1/status", params={"id": deployment_id}, headers=token()).json()["phase"]
        == "Deleted"
    )


def test_authentication_and_authorization(api: Any) -> None:
    h, client = api()
    missing = client.post("/v1/provision", json=body(h))
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(
        client.post("/v1/provision", json=body(h), headers=token(secret="x" * 40)),
        401,
        "unauthorized",
    )
    assert_error(
        client.post("/v1/provision", json=body(h), headers=token(issued_ago=3600)),
        401,
        "unauthorized",
    )
    assert_error(
        client.post("/v1/provision", json=body(h), headers=token(scopes="read")), 403, "forbidden"
    )
    assert_error(
        client.post("/v1/provision", json=body(h), headers=token(namespaces=["team-other"])),
        403,
        "forbidden",
    )
    deployment_id = client.post("/v1/provision", json=body(h), headers=token()).json()[
        "deploymentId"
    ]
    # Reading another namespace's deployment looks exactly like a missing one.
    hidden = client.get(
        f"/api/v1/deployments/{deployment_id}", headers=token(namespaces=["team-other"])
    )
    absent = client.get(
        f"/api/v1/deployments/deploy-{'0' * 32}", headers=token(namespaces=["team-other"])
    )
    assert_error(hidden, 404, "resource_not_found")
    assert hidden.json()["message"].replace(deployment_id, "X") == (
        absent.json()["message"].replace(f"deploy-{'0' * 32}", "X")
    )


def test_validation_errors_name_the_field(api: Any) -> None:
    h, client = api()
    no_name = body(h)
    del no_name["resourceName"]
    error = assert_error(
        client.post("/v1/provision", json=no_name, headers=token()), 400, "validation_failed"
    )
    assert error["message"] == "resourceName is required"
    error = assert_error(
        client.post("/v1/provision", json=body(h, phase="Ready"), headers=token()),
        400,
        "validation_failed",
    )
    assert "phase is not a field a caller may set" in error["message"]
    error = assert_error(
        client.post("/v1/provision", json=body(h, resourceName="Bad_Name"), headers=token()),
        400,
        "validation_failed",
    )
    assert "resourceName" in error["message"]
    error = assert_error(
        client.post(
            "/v1/provision",
            json=body(h, spec={"engine": "postgresql", "size": "huge"}),
            headers=token(),
        ),
        400,
        "validation_failed",
    )
    assert "spec.size" in error["message"]


def test_malformed_bodies(api: Any) -> None:
    h, client = api()
    headers = {**token(), "Content-Type": "application/json"}
    assert_error(
        client.post("/v1/provision", content=b"{not json", headers=headers), 400, "invalid_request"
    )
    assert_error(
        client.post("/v1/provision", content=b"[1, 2]", headers=headers), 400, "invalid_request"
    )
    text = {**token(), "Content-Type": "text/plain"}
    assert_error(
        client.post("/v1/provision", content=json.dumps(body(h)), headers=text),
        400,
        "invalid_request",
    )
    huge = json.dumps(body(h, owner="a" * (1024 * 1024) + "@x.io"))
    assert_error(
        client.post("/v1/provision", content=huge, headers=headers), 413, "payload_too_large"
    )


def test_rate_limit_per_caller_with_retry_after(api: Any) -> None:
    _, client = api(rate_limit_per_minute=5)
    for _ in range(5):
        assert client.get("/v1/catalog", headers=token()).status_code == 200
    limited = client.get("/v1/status", params={"id": f"deploy-{'0' * 32}"}, headers=token())
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    # Another subject has its own budget.
    other = client.get(
        "/v1/status", params={"id": f"deploy-{'0' * 32}"}, headers=token(subject="someone-else")
    )
    assert other.status_code == 404
    # Without a valid token, the source address is the key.
    for _ in range(5):
        client.get("/v1/status", params={"id": "x"})
    assert_error(client.get("/v1/status", params={"id": "x"}), 429, "rate_limited")


def test_health_readiness_root_and_metrics(api: Any) -> None:
    h, client = api()
    client.post("/v1/provision", json=body(h), headers=token())
    health = client.get("/health")
    assert health.status_code == 200
    payload = health.json()
    for key in (
        "status",
        "version",
        "time",
        "uptime",
        "uptimeSeconds",
        "activeDeployments",
        "totalDeployments",
        "failedDeployments",
        "checks",
    ):
        assert key in payload
    assert payload["status"] == "healthy"
    assert payload["activeDeployments"] == 1
    assert set(payload["checks"]) == {"store", "queue", "cloudApi"}
    assert client.get("/readiness").json() == {"ready": True, "reason": "ok", "version": "0.1.0"}
    assert client.get("/ready").status_code == 200
    links = client.get("/").json()["links"]
    assert links["provision"]["href"] == "/v1/provision"
    metrics = client.get("/metrics").text
    assert 'kidp_broker_requests_total{method="POST",status="202"} 1.0' in metrics
    assert "kidp_broker_cloud_api_calls_total" in metrics
    assert "kidp_broker_active_deployments 1.0" in metrics


#: Every metric seeds 000 ("Observability") and 001 ("Monitoring & Metrics")
#: name, with its label names; histograms are looked up by their ``_count``.
SEED_METRICS: dict[str, frozenset[str]] = {
    "kidp_broker_requests_total": frozenset({"method", "status"}),
    "kidp_broker_request_duration_seconds": frozenset({"method"}),
    "kidp_broker_cloud_api_calls_total": frozenset({"provider", "resource_type", "operation"}),
    "kidp_broker_callback_attempts_total": frozenset({"status"}),
    "kidp_broker_active_deployments": frozenset(),
    "broker_provision_requests_total": frozenset({"resource_type", "status"}),
    "broker_provision_duration_seconds": frozenset({"resource_type"}),
    "broker_resources_total": frozenset({"namespace", "type", "phase"}),
    "broker_drift_detected_total": frozenset({"namespace", "type"}),
    "broker_kubernetes_api_available": frozenset(),
    "broker_http_request_duration_seconds": frozenset({"endpoint", "method"}),
}
HISTOGRAMS = {
    "kidp_broker_request_duration_seconds",
    "broker_provision_duration_seconds",
    "broker_http_request_duration_seconds",
}


def exposition(client: TestClient) -> dict[str, list[dict[str, str]]]:
    """``GET /metrics`` parsed: each sample name's label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def seed_series(samples: dict[str, list[dict[str, str]]], name: str) -> list[dict[str, str]]:
    return samples.get(f"{name}_count" if name in HISTOGRAMS else name, [])


def test_metrics_carry_every_seed_name_with_its_labels(api: Any) -> None:
    import boto3

    h, client = api()
    deployment_id = client.post("/v1/provision", json=body(h), headers=token()).json()[
        "deploymentId"
    ]
    h.drain()
    rds = boto3.client("rds", region_name="us-east-1")
    (instance,) = rds.describe_db_instances()["DBInstances"]
    rds.modify_db_instance(
        DBInstanceIdentifier=instance["DBInstanceIdentifier"],
        DBInstanceClass="db.r5.4xlarge",
        ApplyImmediately=True,
    )
    assert h.broker.scanner.drift()["changed"] == 1
    h.drain()
    path = f"/api/v1/deployments/{deployment_id}"
    assert client.get(path, headers=token()).status_code == 200
    assert client.get(path).status_code == 401  # refused before routing
    assert client.get(f"/v1/no-such-route/{deployment_id}", headers=token()).status_code == 404

    samples = exposition(client)
    # Seed 001's on-prem gauge belongs to the Kubernetes provider only: a 0
    # here would claim a Kubernetes API that is down.
    missing = {name for name in SEED_METRICS if not seed_series(samples, name)}
    assert missing == {"broker_kubernetes_api_available"}
    for name, labels in SEED_METRICS.items():
        for series in seed_series(samples, name):
            assert series.keys() == labels, name
    assert {"namespace": "team-platform", "type": "database", "phase": "Ready"} in samples[
        "broker_resources_total"
    ]
    endpoints = {
        (s["endpoint"], s["method"])
        for s in seed_series(samples, "broker_http_request_duration_seconds")
    }
    assert ("/v1/provision", "POST") in endpoints
    assert ("/api/v1/deployments/{deploymentId}", "GET") in endpoints
    assert ("unmatched", "GET") in endpoints
    assert not any(deployment_id in endpoint for endpoint, _ in endpoints)


def test_resource_counts_follow_the_store_at_each_scrape(api: Any) -> None:
    h, client = api()
    deployment_id = client.post("/v1/provision", json=body(h), headers=token()).json()[
        "deploymentId"
    ]
    pending = {"namespace": "team-platform", "type": "database", "phase": "Pending"}
    assert exposition(client)["broker_resources_total"] == [pending]
    h.drain()
    gone = client.post(
        "/v1/deprovision",
        json={"deploymentId": deployment_id, "namespace": "team-platform"},
        headers=token(),
    )
    assert gone.status_code == 202, gone.text
    h.drain()
    text = client.get("/metrics").text
    # A phase left empty reads 0, not "no data".
    assert (
        'broker_resources_total{namespace="team-platform",phase="Pending",type="database"} 0.0'
        in text
    )
    assert (
        'broker_resources_total{namespace="team-platform",phase="Deleted",type="database"} 1.0'
        in text
    )


def test_kubernetes_api_gauge_on_the_onprem_provider(
    api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kidp.kube_emulator import start_kubernetes_emulator

    emulator = start_kubernetes_emulator(ready_delay=0.05)
    try:
        monkeypatch.setenv("KUBECONFIG", str(emulator.write_kubeconfig(tmp_path / "kubeconfig")))
        _, client = api(provider="onprem")
        assert client.get("/health").json()["checks"]["cloudApi"]["status"] == "ok"
        samples = exposition(client)
        assert samples["broker_kubernetes_api_available"] == [{}]
        text = client.get("/metrics").text
        assert "broker_kubernetes_api_available 1.0" in text
        assert "broker_cloud_api_available 1.0" in text
    finally:
        emulator.stop()


def test_correlation_id_is_kept_or_added(api: Any) -> None:
    _, client = api()
    assert (
        client.get("/health", headers={"X-Correlation-ID": "abc-123"}).headers["x-correlation-id"]
        == "abc-123"
    )
    assert len(client.get("/health").headers["x-correlation-id"]) == 32


def test_catalog_names_what_can_be_provisioned(api: Any) -> None:
    _, client = api()
    catalog = client.get("/v1/catalog", headers=token()).json()
    types = {t["resourceType"]: t for t in catalog["resourceTypes"]}
    assert {"database", "cache", "bucket", "service"} <= set(types)
    engines = {e["engine"]: e["versions"] for e in types["database"]["engines"]}
    assert engines["postgresql"] == ["12", "13", "14", "15", "16"]
    sizes = {s["size"]: s for s in catalog["sizes"]}
    assert sizes["medium"]["cpu"] == 2 and sizes["medium"]["memory"] == "4Gi"


def test_dry_run_through_the_api(api: Any) -> None:
    h, client = api()
    response = client.post(
        "/v1/provision", params={"dryRun": "true"}, json=body(h), headers=token()
    )
    assert response.status_code == 200
    assert response.json()["dryRun"] is True
    assert h.store.list() == []


def test_costs_grouping(api: Any) -> None:
    h, client = api()
    client.post("/v1/provision", json=body(h), headers=token())
    h.drain()
    costs = client.get("/v1/costs", params={"groupBy": "application"}, headers=token()).json()
    assert costs["groups"][0]["application"] == "postgres-app-db"
    assert_error(
        client.get("/v1/costs", params={"groupBy": "colour"}, headers=token()),
        400,
        "validation_failed",
    )


def test_unknown_route_and_method_use_the_error_shape(api: Any) -> None:
    _, client = api()
    assert_error(client.get("/v2/nothing", headers=token()), 404, "resource_not_found")
    # Without a token, an unknown route does not even reveal that it is unknown.
    assert_error(client.get("/v2/nothing"), 401, "unauthorized")
    assert_error(client.put("/v1/provision", json={}, headers=token()), 405, "method_not_allowed")


def test_committed_openapi_matches_the_code(api: Any) -> None:
    _, client = api()
    served = client.get("/openapi.json").json()
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == committed, "regenerate: kidp-broker openapi > docs/openapi.json"
    assert "/v1/provision" in served["paths"]
    assert "ProvisionRequest" in served["components"]["schemas"]
    # Markdown, not reStructuredText; and a request body to start from.
    assert "``" not in json.dumps(served)
    body = served["paths"]["/v1/provision"]["post"]["requestBody"]["content"]["application/json"]
    assert body["example"]["spec"]["engine"] == "postgresql"
    accepted = client.post("/v1/provision", json=body["example"], headers=token())
    assert accepted.status_code in (202, 400), accepted.text  # the example validates
    assert accepted.json().get("error") != "validation_failed" or "callbackUrl" in accepted.text


def test_an_unknown_caller_with_a_bad_body_is_refused_before_parsing(api: Any) -> None:
    _, client = api(rate_limit_per_minute=2)
    bad = {"Content-Type": "application/json"}
    for _ in range(2):
        assert_error(
            client.post("/v1/provision", content=b"{oops", headers=bad), 401, "unauthorized"
        )
    assert_error(client.post("/v1/provision", content=b"{oops", headers=bad), 429, "rate_limited")


def test_a_chunked_body_over_the_limit_is_413(api: Any) -> None:
    _, client = api()

    def chunks() -> Any:
        yield b'{"owner": "'
        for _ in range(20):
            yield b"a" * 65536
        yield b'"}'

    response = client.post(
        "/v1/provision", content=chunks(), headers={**token(), "Content-Type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large")


def test_readiness_is_503_with_the_reason_when_the_cloud_is_unreachable(api: Any) -> None:
    import boto3
    from botocore.config import Config

    from kidp.providers.aws import AwsProvider

    sts = boto3.client(
        "sts",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    h, client = api()
    h.service.provider = AwsProvider(region="us-east-1", clients={"sts": sts})
    response = client.get("/readiness")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    assert body["reason"].startswith("cloud API not accessible")
    health = client.get("/health").json()
    assert health["status"] == "degraded"
    assert health["checks"]["cloudApi"]["status"] == "error"


def test_orphans_need_a_token_for_every_namespace(api: Any, stray_rds_instance: Any) -> None:
    _, client = api()
    stray_rds_instance("kidp-x-left-behind", f"deploy-{'1' * 32}")
    assert_error(client.get("/v1/orphans", headers=token()), 403, "forbidden")
    found = client.get("/v1/orphans", headers=token(namespaces=["*"])).json()
    assert found["total"] == 1
    assert found["orphans"][0]["deploymentId"] == f"deploy-{'1' * 32}"


def test_the_docs_page_works_offline_from_the_package(
    api: Callable[..., tuple[Any, TestClient]],
) -> None:
    _, client = api()
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    script = client.get("/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200
    # Only Swagger UI's own files, and no other page without a token.
    assert client.get("/docs/assets/..%2Fpyproject.toml").status_code == 401
    assert client.get("/redoc").status_code == 401
