"""Deployment store fixtures: one ``store`` over every backend, and a record factory.

``store`` runs each contract test (``test_contract.py``) against a SQLite
file, a fresh PostgreSQL database, a DynamoDB table on moto and an Azure
Table Storage table on Azurite, all through their real clients.
Backend-specific tests live in ``test_sql.py``, ``test_dynamodb.py`` and
``test_azuretable.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.stores.cloudsql_backend import cloudsql_database, cloudsql_emulator
from tests.stores.sql_backends import SQL_BACKENDS, sql_url

from kidp.models import (
    DeletionPolicy,
    Deployment,
    Phase,
    ResourceSpec,
    ResourceType,
    Size,
    new_deployment_id,
)
from kidp.ports import DeploymentStore

# GCP: the Cloud SQL connector through its stand-in, in front of PostgreSQL.
__all__ = ["cloudsql_database", "cloudsql_emulator"]  # fixtures, imported for pytest

BACKENDS = [
    *SQL_BACKENDS,
    "dynamodb",
    pytest.param("azuretable", marks=pytest.mark.azurite),
    pytest.param("cloudsql", marks=pytest.mark.postgres),
]

# moto's in-process DynamoDB applies a transaction as check-then-write with
# no lock, and rolls back by restoring a copy of the whole table, so two
# threads inside moto at once can interleave in ways DynamoDB never does
# (each DynamoDB request is atomic). One lock around each request models
# DynamoDB; the store's own multi-request sequences still interleave freely.
_MOTO_REQUEST_LOCK = threading.Lock()


def new_deployment(
    name: str = "orders-db",
    *,
    namespace: str = "team-a",
    phase: Phase = Phase.PENDING,
    request_id: str | None = None,
    resource_type: ResourceType = ResourceType.DATABASE,
    **changes: Any,
) -> Deployment:
    """A valid deployment record (a fresh id every call); ``changes`` set or
    override any other field."""
    fields: dict[str, Any] = {
        "id": new_deployment_id(),
        "namespace": namespace,
        "resource_type": resource_type,
        "resource_name": name,
        "team": "payments",
        "owner": "owner@example.com",
        "application": name,
        "resource_uid": "5f0c6a4e-0000-4000-8000-000000000001",
        "callback_url": "https://ci.example.com/hook",
        "spec": ResourceSpec(engine="postgresql", version="15", size=Size.MEDIUM),
        "spec_fingerprint": "f" * 64,
        "deletion_policy": DeletionPolicy.DELETE,
        "provider": "aws",
        "region": "eu-west-1",
        "phase": phase,
        "request_id": request_id,
    }
    return Deployment(**(fields | changes))


@pytest.fixture
def make() -> Callable[..., Deployment]:
    """The record factory, :func:`new_deployment`."""
    return new_deployment


@pytest.fixture
def dynamodb_client(aws: None) -> Any:
    """A boto3 DynamoDB client on moto whose requests run one at a time."""
    import boto3

    client = boto3.client("dynamodb", region_name="us-east-1")
    call = client._make_api_call

    def one_at_a_time(operation: str, params: dict[str, Any]) -> Any:
        with _MOTO_REQUEST_LOCK:
            return call(operation, params)

    # Every client method and paginator goes through _make_api_call.
    client._make_api_call = one_at_a_time
    return client


@pytest.fixture
def dynamodb_store(dynamodb_client: Any) -> Any:
    """A :class:`DynamoDbDeploymentStore` on a fresh moto table."""
    from kidp.stores.dynamodb import DynamoDbDeploymentStore

    store = DynamoDbDeploymentStore("kidp-test", region="us-east-1", client=dynamodb_client)
    store.create_table()
    return store


@pytest.fixture
def azure_table_store(azurite: Any) -> Iterator[Any]:
    """A :class:`TableDeploymentStore` on a fresh Azurite table."""
    from tests.conftest import azure_name

    from kidp.stores.azuretable import TableDeploymentStore

    store = TableDeploymentStore.from_url(
        f"azuretable://{azurite.account_name}/{azure_name('t')}",
        connection_string=azurite.connection_string,
    )
    store.create_table()
    yield store
    store.close()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeploymentStore]:
    """An empty store: a SQLite file, a fresh PostgreSQL database, a moto table,
    an Azurite table, or PostgreSQL through the Cloud SQL connector."""
    if request.param == "dynamodb":
        yield request.getfixturevalue("dynamodb_store")
        return
    if request.param == "azuretable":
        yield request.getfixturevalue("azure_table_store")
        return
    if request.param == "cloudsql":
        from kidp.stores.cloudsql import CloudSqlDeploymentStore

        database = request.getfixturevalue("cloudsql_database")
        cloudsql = CloudSqlDeploymentStore(database.url, admin_endpoint=database.admin_endpoint)
        yield cloudsql
        cloudsql.close()
        return
    from kidp.stores.sql import SqlDeploymentStore

    sql = SqlDeploymentStore(sql_url(request, tmp_path))
    yield sql
    sql.close()
