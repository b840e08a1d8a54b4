"""What only the SQL store has: engines, tables, connection loss. The behaviour
every store shares is in ``test_contract.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from tests.stores.sql_backends import SQL_BACKENDS, sql_url

from kidp.errors import StoreUnavailable
from kidp.models import Deployment
from kidp.ports import DeploymentStore
from kidp.stores.sql import SqlDeploymentStore, create_engine_for

Make = Callable[..., Deployment]


@pytest.fixture(params=SQL_BACKENDS)
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlDeploymentStore]:
    """A store on an empty SQLite file or a fresh PostgreSQL database."""
    store = SqlDeploymentStore(sql_url(request, tmp_path))
    yield store
    store.close()


def test_sqlite_engine_creates_directory_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "broker.db"
    engine = create_engine_for(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert path.exists()
    finally:
        engine.dispose()


def test_engine_urls() -> None:
    engine = create_engine_for("postgresql://postgres@127.0.0.1:5432/x")
    assert engine.url.drivername == "postgresql+psycopg"
    engine.dispose()
    with pytest.raises(ValueError, match="in-memory"):
        create_engine_for("sqlite://")
    with pytest.raises(ValueError, match="unsupported"):
        create_engine_for("mysql://localhost/x")
    with pytest.raises(ValueError, match="exactly one"):
        SqlDeploymentStore()


def test_tables_survive_a_second_store_on_the_same_file(tmp_path: Path, make: Make) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    first = SqlDeploymentStore(url)
    d = first.create(make())
    first.close()
    second = SqlDeploymentStore(url)
    assert second.get(d.id) == d
    second.close()


def test_implements_the_port(sql_store: SqlDeploymentStore) -> None:
    # Checked by mypy: the store satisfies the DeploymentStore protocol.
    port: DeploymentStore = sql_store
    assert port.engine is sql_store.engine  # type: ignore[attr-defined]


@pytest.mark.postgres
def test_unreachable_postgres_is_store_unavailable() -> None:
    # Nothing listens on port 1: connecting fails fast with "connection refused".
    with pytest.raises(StoreUnavailable):
        SqlDeploymentStore("postgresql://postgres@127.0.0.1:1/kidp")


@pytest.mark.postgres
def test_lost_database_is_store_unavailable(postgres_url: str, make: Make) -> None:
    store = SqlDeploymentStore(postgres_url)
    d = store.create(make())
    name = sa.make_url(postgres_url).database
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    with pytest.raises(StoreUnavailable):
        store.check()
    with pytest.raises(StoreUnavailable):
        store.get(d.id)
    store.close()
