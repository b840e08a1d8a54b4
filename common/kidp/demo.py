"""``kidp-broker demo``: the whole broker on one machine, end to end.

Starts the AWS emulator, the broker (API, workers, timers) and a local
callback receiver that verifies each Standard Webhooks signature; provisions
a sample PostgreSQL database, prints every callback and the final status
(cost, tags, secret reference; never the password), deprovisions it and
exits 0. Exits 1 if any step does not happen in time.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from pathlib import Path

import httpx

from kidp.auth import mint_token
from kidp.bootstrap import build
from kidp.callbacks import generate_secret
from kidp.emulator import free_port, start_aws_emulator
from kidp.observability import configure_logging
from kidp.receiver import CallbackReceiver
from kidp.runtime import EmbeddedBroker
from kidp.settings import Settings

SAMPLE = {
    "resourceType": "database",
    "resourceName": "orders-db",
    "namespace": "team-platform",
    "team": "platform-team",
    "owner": "alice@example.com",
    "application": "orders",
    "spec": {
        "engine": "postgresql",
        "version": "15",
        "size": "medium",
        "backup": {"enabled": True, "retention": "7d", "schedule": "0 2 * * *"},
        "encryption": {"atRest": True, "inTransit": True},
    },
}


def run_demo(*, timeout: float = 120.0) -> int:
    """Run the demo; 0 when the database reached Ready and then Deleted."""
    configure_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="kidp-demo-") as state:
        emulator = start_aws_emulator()
        settings = Settings(
            cloud="aws",
            region="us-east-1",
            store_url=f"sqlite:///{state}/broker.db",
            state_dir=Path(state),
            aws_endpoint_url=emulator.endpoint_url,
            callback_allowlist=["127.0.0.1"],
            poll_interval_seconds=1.0,
            progress_interval_seconds=5.0,
            log_level="WARNING",
            # Throwaway keys for this run: the demo shares nothing.
            jwt_secret=secrets.token_hex(32),
            callback_secret=generate_secret(),
        )
        receiver = CallbackReceiver(settings.effective_callback_secret())
        port = free_port()
        runtime = EmbeddedBroker(build(settings), port=port)
        try:
            runtime.start()
            return _script(settings, f"http://127.0.0.1:{port}", receiver, timeout)
        finally:
            runtime.stop()
            receiver.close()
            emulator.stop()


def _script(settings: Settings, base: str, receiver: CallbackReceiver, timeout: float) -> int:
    secret = settings.effective_jwt_secret()
    assert secret is not None
    token = mint_token(
        secret=secret,
        subject="demo",
        scopes=["deploy", "read", "delete"],
        namespaces=["team-platform"],
        ttl_seconds=600,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
    )
    headers = {"Authorization": f"Bearer {token}"}
    request = {**SAMPLE, "callbackUrl": receiver.url}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        print(f"kidp-broker demo: broker on {base} (AWS emulated), callbacks to {receiver.url}")
        print("POST /v1/provision  database/orders-db  postgresql 15, medium")
        accepted = http.post("/v1/provision", json=request)
        print(f"  {accepted.status_code} {json.dumps(accepted.json())}")
        if accepted.status_code != 202:
            return 1
        deployment_id = accepted.json()["deploymentId"]
        if receiver.wait_for("Ready", timeout) is None:
            print("demo: no Ready callback in time")
            return 1
        status = http.get(f"/api/v1/deployments/{deployment_id}").json()
        print(f"GET /api/v1/deployments/{deployment_id}")
        for key in ("phase", "progress", "endpoint", "port", "connectionSecret", "cloudResourceId"):
            print(f"  {key:<18} {status.get(key)}")
        print(f"  {'secretRef':<18} {json.dumps(status['secretRef'])}")
        print(f"  {'cost':<18} {json.dumps(status['cost'])}")
        print(f"  {'tags':<18} {json.dumps(status['tags'])}")
        state = http.get("/v1/resources", params={"namespace": "team-platform"}).json()
        for resource in state["resources"]:
            print(
                f"GET /v1/resources  {resource['resourceName']}: health="
                f"{resource['healthStatus']} driftDetected={resource['driftDetected']} "
                f"details={resource['driftDetails']}"
            )
        print("POST /v1/deprovision")
        gone = http.post(
            "/v1/deprovision",
            json={
                "deploymentId": deployment_id,
                "resourceType": "database",
                "resourceName": "orders-db",
                "namespace": "team-platform",
            },
        )
        print(f"  {gone.status_code} {json.dumps(gone.json())}")
        if receiver.wait_for("Deleted", timeout) is None:
            print("demo: no Deleted callback in time")
            return 1
        final = http.get("/v1/status", params={"id": deployment_id}).json()
        print(f"GET /v1/status  {json.dumps(final)}")
    print("demo: done")
    return 0
