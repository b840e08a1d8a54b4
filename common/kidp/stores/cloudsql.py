"""The deployment store on Cloud SQL for PostgreSQL (GCP), through the Cloud
SQL Python Connector with IAM database authentication.

The store is :class:`~kidp.stores.sql.SqlDeploymentStore` unchanged: only the
way to a connection differs. Its engine's ``creator`` asks the connector for
a pg8000 connection, and the connector does what Cloud SQL needs: it fetches
the instance's address and CA from the SQL Admin API, has an ephemeral client
certificate signed for a key of its own, opens TLS 1.3 to the instance's
server-side proxy and logs in as the IAM user with an OAuth token instead of
a password. No password exists anywhere, and the instance needs no
authorized networks.

``KIDP_STORE_URL``::

    postgresql+cloudsql://<iam-user>@/<database>?instance=<project:region:instance>[&ip_type=public|private|psc][&max_connections=<n>]

``<iam-user>`` is the service account's email (``kidp-broker@my-proj.iam.gserviceaccount.com``;
``@`` may be written ``%40``); the connector turns it into the database user
Cloud SQL created for it (``kidp-broker@my-proj.iam``). ``ip_type`` defaults
to ``public`` (the instance's public IP, reached only through the connector's
mTLS); ``private`` needs the function on the instance's VPC.

Connections are made lazily (refresh strategy ``lazy``): on Cloud Functions
the CPU is throttled between requests, so a background certificate refresh
would not run. ``max_connections`` caps the connections one process opens
(its pool, with no overflow): the instance's ``max_connections`` must hold
every instance of every function at full scale-out, so ``infra/gcp`` sets
each function's cap and checks the sum against the instance. Requests beyond
the cap wait for a pooled connection (up to 30 seconds, then the store is
unavailable: try again). Without it a process keeps 2 and opens up to 4.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import ExceptionContext

from kidp.errors import ValidationFailed
from kidp.providers.gcp.endpoints import credentials_for
from kidp.providers.gcp.errors import CLIENT_ERRORS
from kidp.stores.sql import SqlDeploymentStore

__all__ = ["SCHEME", "CloudSqlDeploymentStore", "CloudSqlTarget", "parse_cloudsql_url"]

log = logging.getLogger(__name__)

SCHEME: Final = "postgresql+cloudsql"
_IP_TYPES: Final = {"public": "PUBLIC", "private": "PRIVATE", "psc": "PSC"}


@dataclass(frozen=True)
class CloudSqlTarget:
    """Where a ``postgresql+cloudsql://`` URL points."""

    user: str
    database: str
    instance: str
    ip_type: str = "PUBLIC"
    #: At most this many connections per process (``None``: the default pool).
    max_connections: int | None = None


def parse_cloudsql_url(url: str) -> CloudSqlTarget:
    """The IAM user, database, instance connection name and IP type of ``url``."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ValidationFailed(f"a Cloud SQL store URL starts with {SCHEME}://")
    # rpartition: an unescaped '@' in the user (an email) stays in the user.
    userinfo, _, host = parts.netloc.rpartition("@")
    user = unquote(userinfo)
    database = parts.path.strip("/")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    instance = query.get("instance", "")
    problems = []
    if not user or ":" in user:
        problems.append("the IAM user (no password: IAM authentication)")
    if host:
        problems.append("no host (the instance is found through ?instance=)")
    if not database or "/" in database:
        problems.append("the database")
    if len(instance.split(":")) != 3 or not all(instance.split(":")):
        problems.append("?instance=<project:region:instance>")
    ip_type = _IP_TYPES.get(query.get("ip_type", "public").lower())
    if ip_type is None:
        problems.append("ip_type public, private or psc")
    cap = query.get("max_connections")
    if cap is not None and not (cap.isdigit() and int(cap) >= 1):
        problems.append("max_connections a whole number of at least 1")
    if problems:
        raise ValidationFailed(
            f"KIDP_STORE_URL for Cloud SQL is {SCHEME}://<iam-user>@/<database>?instance="
            f"<project:region:instance>; it needs {', '.join(problems)}"
        )
    assert ip_type is not None
    return CloudSqlTarget(
        user=user,
        database=database,
        instance=instance,
        ip_type=ip_type,
        max_connections=int(cap) if cap is not None else None,
    )


class CloudSqlDeploymentStore(SqlDeploymentStore):
    """:class:`~kidp.stores.sql.SqlDeploymentStore` on a Cloud SQL instance.

    ``connector`` injects a ``google.cloud.sql.connector.Connector``;
    otherwise one is made with IAM database authentication, ``credentials``
    (Application Default Credentials when None) and ``admin_endpoint`` (the
    SQL Admin API stand-in in tests). The store owns its engine and its
    connector and closes both.
    """

    def __init__(
        self,
        url: str,
        *,
        connector: Any = None,
        credentials: Any = None,
        admin_endpoint: str | None = None,
        pool_size: int = 2,
    ) -> None:
        self.target = parse_cloudsql_url(url)
        if connector is None:
            from google.cloud.sql.connector import Connector, RefreshStrategy

            connector = Connector(
                ip_type=self.target.ip_type,
                enable_iam_auth=True,
                credentials=credentials_for(admin_endpoint, credentials),
                sqladmin_api_endpoint=admin_endpoint,
                refresh_strategy=RefreshStrategy.LAZY,
            )
        self._connector = connector
        cap = self.target.max_connections
        engine = sa.create_engine(
            "postgresql+pg8000://",
            creator=self._connect,
            pool_pre_ping=True,
            # The URL's cap is the whole pool: no overflow beyond it.
            pool_size=cap or pool_size,
            max_overflow=0 if cap else 2,
            # Below Cloud SQL's idle timeouts, and a fresh IAM login now and then.
            pool_recycle=1800,
        )
        sa.event.listen(engine, "handle_error", _classify_pg8000_error)
        try:
            super().__init__(engine=engine)
        except Exception:
            engine.dispose()
            self._connector.close()
            raise

    def __repr__(self) -> str:
        return f"CloudSqlDeploymentStore({self.target.instance!r}, {self.target.database!r})"

    def close(self) -> None:
        """Close pooled connections and the connector's refresh loop."""
        self.engine.dispose()
        self._connector.close()

    def _connect(self) -> Any:
        """One pg8000 connection through the connector. A failure to get one
        (the Admin API, the proxy, TLS) is raised as the driver's
        ``OperationalError``, which the SQL store reports as
        ``StoreUnavailable``."""
        import aiohttp
        import pg8000.dbapi
        from google.cloud.sql.connector import exceptions as connector_errors

        failures: tuple[type[BaseException], ...] = (
            aiohttp.ClientError,
            *CLIENT_ERRORS,
            connector_errors.CloudSQLConnectionError,
            connector_errors.CloudSQLIPTypeError,
            connector_errors.RefreshNotValidError,
            connector_errors.DnsResolutionError,
        )
        try:
            return self._connector.connect(
                self.target.instance,
                "pg8000",
                user=self.target.user,
                db=self.target.database,
                enable_iam_auth=True,
            )
        except pg8000.dbapi.Error:
            raise
        except aiohttp.ClientResponseError as exc:
            text = f"Cloud SQL Admin API: HTTP {exc.status} {exc.message}"
        except failures as exc:
            text = f"Cloud SQL connector: {type(exc).__name__}"
        log.warning(
            "no connection to Cloud SQL",
            extra={"instance": self.target.instance, "reason": text},
        )
        raise pg8000.dbapi.OperationalError(f"{text} (instance {self.target.instance})")


#: SQLSTATE classes and the DB-API error each is (what psycopg raises for them).
_SQLSTATE_CLASSES: Final[dict[str, type[sa_exc.DBAPIError]]] = {
    "23": sa_exc.IntegrityError,  # integrity constraint violation
    "08": sa_exc.OperationalError,  # connection exception
    "40": sa_exc.OperationalError,  # transaction rollback: serialization, deadlock
    "53": sa_exc.OperationalError,  # insufficient resources
    "57": sa_exc.OperationalError,  # operator intervention: shutdown, cancel
}


def _classify_pg8000_error(context: ExceptionContext) -> sa_exc.DBAPIError | None:
    """pg8000 raises every server error as ``DatabaseError`` with the SQLSTATE
    in its fields; the SQL store, like the DB-API, tells a unique violation
    (``IntegrityError``: the resource is taken) and a lost connection or
    serialization failure (``OperationalError``: try again) apart by class.
    Re-raise pg8000's errors as the class their SQLSTATE means."""
    original = context.original_exception
    fields = original.args[0] if original.args else None
    code = fields.get("C", "") if isinstance(fields, dict) else ""
    wanted = _SQLSTATE_CLASSES.get(str(code)[:2])
    if wanted is None or isinstance(context.sqlalchemy_exception, wanted):
        return None
    return wanted(
        context.statement,
        context.parameters,
        original,
        connection_invalidated=context.is_disconnect,
    )
