"""The SQL databases the SQL store and the SQL job queue are tested on.

A fixture parametrized with :data:`SQL_BACKENDS` gets its database URL from
:func:`sql_url`, so both suites run on the same two databases the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: A SQLite file, and a fresh database on the PostgreSQL server.
SQL_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL for the backend ``request.param`` names.

    SQLite lives one directory down, so the store's creation of a missing
    parent directory is exercised too; PostgreSQL comes from ``postgres_url``.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'broker.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
