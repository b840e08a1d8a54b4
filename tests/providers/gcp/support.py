"""Helpers of the GCP provider's tests: deployments, the operator's own
Google clients (:class:`Operator`), and the worker's poll loops."""

from __future__ import annotations

from typing import Any

from google.auth.credentials import AnonymousCredentials

from kidp import tags as tagging
from kidp.gcp_emulator import GcpEmulator
from kidp.models import (
    CloudResource,
    Deployment,
)
from kidp.ports import Credentials
from kidp.providers.gcp import GcpProvider

REGION = "europe-west1"
PASSWORD = "Kx7vQ2mP9tR4wZ8nB3yL6hDq5sJ2cF8g"
PREFIX = "platform_company_com_"


def new_provider(
    emulator: GcpEmulator, project: str, calls: list[tuple[str, str]] | None = None, **kw: Any
) -> GcpProvider:
    """A provider on the stand-in; retries stop after half a second so faults
    that outlast them are seen quickly."""
    # Topics go to the real Pub/Sub emulator: only the tests that start it turn them on.
    options: dict[str, Any] = {"retry_seconds": 0.5, "timeout": 5.0, "topics": False}
    options.update(kw)
    return GcpProvider(
        project=project,
        region=REGION,
        credentials=AnonymousCredentials(),
        api_endpoint=emulator.url,
        on_call=None if calls is None else (lambda t, op: calls.append((t, op))),
        **options,
    )


class Operator:
    """What an operator would use to look: Google's clients, on their own."""

    def __init__(self, emulator: GcpEmulator, project: str) -> None:
        from google.cloud import redis_v1, run_v2, storage
        from googleapiclient.discovery import build

        credentials = AnonymousCredentials()
        base = emulator.url.rstrip("/")
        self.project = project
        self.sql = build(
            "sqladmin",
            "v1",
            credentials=credentials,
            client_options={"api_endpoint": emulator.url},
            static_discovery=True,
        )
        self.redis = redis_v1.CloudRedisClient(
            credentials=credentials, transport="rest", client_options={"api_endpoint": base}
        )
        self.run = run_v2.ServicesClient(
            credentials=credentials, transport="rest", client_options={"api_endpoint": base}
        )
        self.storage = storage.Client(
            project=project, credentials=credentials, client_options={"api_endpoint": base}
        )

    @property
    def location(self) -> str:
        return f"projects/{self.project}/locations/{REGION}"

    def sql_instances(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (
            self.sql.instances().list(project=self.project).execute().get("items", [])
        )
        return items

    def sql_instance(self, name: str) -> dict[str, Any]:
        instance: dict[str, Any] = (
            self.sql.instances().get(project=self.project, instance=name).execute()
        )
        return instance

    def redis_instances(self) -> list[Any]:
        return list(self.redis.list_instances(parent=self.location))

    def run_services(self) -> list[Any]:
        return list(self.run.list_services(parent=self.location))

    def buckets(self) -> list[Any]:
        return list(self.storage.list_buckets())


def expected_labels(deployment: Deployment, managed_by: str = "kidp") -> dict[str, str]:
    """The labels a user would find on the resource: the five tags, GCP-encoded."""
    return {
        f"{PREFIX}managed-by": managed_by,
        f"{PREFIX}deployment-id": deployment.id,
        f"{PREFIX}resource-uid": deployment.resource_uid,
        f"{PREFIX}team": "payments",
        f"{PREFIX}application": "checkout",
    }


def deploy(
    provider: GcpProvider, deployment: Deployment, credentials: Credentials | None = None
) -> CloudResource:
    return provider.deploy(deployment, tagging.logical_tags(deployment), credentials)


def settle(provider: GcpProvider, deployment: Deployment, polls: int = 10) -> CloudResource:
    """Poll get_status as the worker does until the resource is available or failed."""
    for _ in range(polls):
        resource = provider.get_status(deployment)
        if resource.state in ("available", "failed"):
            return resource
    raise AssertionError(f"still {resource.state} after {polls} polls: {resource.message}")


def delete_until_done(provider: GcpProvider, deployment: Deployment, attempts: int = 10) -> int:
    """Call delete() as the worker's delete job does; returns the calls made."""
    for attempt in range(1, attempts + 1):
        if provider.delete(deployment):
            return attempt
    raise AssertionError(f"delete did not finish in {attempts} calls")


CREDS = Credentials(username="postgres", password=PASSWORD)
