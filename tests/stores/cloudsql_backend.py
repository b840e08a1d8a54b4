"""The Cloud SQL store's backend for the store tests: the real Cloud SQL
Python Connector against the Cloud SQL stand-in (SQL Admin API + the
instance's TLS proxy), in front of this machine's PostgreSQL.

Each test gets a fresh database owned by an IAM database user of its own
(``kidp-<hex>@kidp-test.iam``, the role Cloud SQL creates for a service
account), both dropped afterwards; one stand-in serves the session.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from tests.conftest import POSTGRES_HOST, POSTGRES_PORT, require_service

from kidp.cloudsql_emulator import CloudSqlEmulator, start_cloudsql_emulator


@pytest.fixture(scope="session")
def cloudsql_emulator() -> Iterator[CloudSqlEmulator]:
    """The SQL Admin API stand-in and the instance proxy (on port 3307 of a
    loopback address of its own) in front of the PostgreSQL server."""
    require_service("PostgreSQL", POSTGRES_HOST, POSTGRES_PORT)
    emulator = start_cloudsql_emulator(upstream=(POSTGRES_HOST, POSTGRES_PORT))
    yield emulator
    emulator.stop()


@dataclass(frozen=True)
class CloudSqlDatabase:
    """A database on a stand-in instance, and how the broker names it."""

    url: str
    service_account: str
    database_user: str
    instance: str
    admin_endpoint: str


@pytest.fixture
def cloudsql_database(cloudsql_emulator: CloudSqlEmulator) -> Iterator[CloudSqlDatabase]:
    """A fresh database owned by a fresh IAM database user, on a fresh instance."""
    import psycopg

    tag = uuid.uuid4().hex[:10]
    service_account = f"kidp-{tag}@kidp-test.iam.gserviceaccount.com"
    user = f"kidp-{tag}@kidp-test.iam"
    database = f"kidp_test_{tag}"
    instance = f"kidp-test:us-central1:kidp-{tag}"
    admin = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{user}" LOGIN')
        conn.execute(f'CREATE DATABASE "{database}" OWNER "{user}"')
    cloudsql_emulator.add_instance(instance)
    try:
        yield CloudSqlDatabase(
            url=(
                f"postgresql+cloudsql://{service_account.replace('@', '%40')}@/{database}"
                f"?instance={instance}"
            ),
            service_account=service_account,
            database_user=user,
            instance=instance,
            admin_endpoint=cloudsql_emulator.url,
        )
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{user}"')
