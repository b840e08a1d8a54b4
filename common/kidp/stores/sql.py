"""The deployment store on SQL: SQLite (embedded) and PostgreSQL (on-prem, GCP).

Each record is kept whole as pydantic JSON next to the few columns the store
filters, orders or constrains on. The JSON body is the truth; the columns are
derived from it on every write, so they cannot drift apart.

Two database rules carry the broker's guarantees, so they hold across
processes and not only inside one:

* ``UNIQUE (namespace, resource_type, resource_name, active_slot)`` where
  ``active_slot`` is 1 for an active deployment and NULL otherwise. NULLs never
  collide, so finished deployments keep their rows while only one active
  deployment can hold a name, however many requests race.
* ``UPDATE ... WHERE version = :expected`` for every change (optimistic
  versioning): a lost race is a ``ConcurrentUpdate``, never a silent overwrite.

Tables are created on construction. Schema migrations (Alembic) are future
work: a column added later needs a migration, not ``create_all``.

This module also holds the engine helpers the SQL job queue shares
(:func:`create_engine_for`, :func:`prepare_engine`, :func:`write_engine`,
:func:`translate_errors`, :func:`upsert`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, CursorResult, Dialect, Engine

from kidp.errors import DuplicateDeployment, StoreUnavailable
from kidp.models import (
    ACTIVE_PHASES,
    CallbackEvent,
    CostSnapshot,
    DeadLetter,
    Deployment,
    Phase,
    ResourceType,
    phase_totals,
)
from kidp.stores.records import as_utc, stale, started

__all__ = [
    "SqlDeploymentStore",
    "create_engine_for",
    "prepare_engine",
    "translate_errors",
    "upsert",
    "write_engine",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

SUPPORTED_DIALECTS = frozenset({"sqlite", "postgresql"})
# Long enough to ride out another process's write transaction, short enough
# that a wedged database surfaces as StoreUnavailable instead of a hung request.
SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
# Execution option read by the SQLite "begin" hook; see write_engine().
_BEGIN_MODE_OPTION = "kidp_sqlite_begin"
# First key of the two-key advisory lock, so our locks cannot collide with
# another application's single-key advisory locks on a shared server ("KIDP").
ADVISORY_LOCK_CLASS = 0x4B494450
_SCHEMA_LOCK_KEY = 0


# --------------------------------------------------------------------------- engine


def create_engine_for(url: str) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql://...``, set up for the broker.

    SQLite: the parent directory is created; WAL journal (readers never wait for
    the writer), a 30 s busy timeout, foreign keys on, usable from any thread.
    In-memory SQLite is refused: every pooled connection would see a different
    empty database. PostgreSQL: a URL without a driver gets psycopg 3, and the
    pool pings connections before use so a restarted server costs no request.
    """
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in {"", ":memory:"} or parsed.query.get("mode") == "memory":
            raise ValueError("an in-memory SQLite store is not supported; use a file path")
        if not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        )
    elif backend in {"postgresql", "postgres"}:
        if parsed.drivername in {"postgresql", "postgres"}:
            parsed = parsed.set(drivername="postgresql+psycopg")
        engine = sa.create_engine(parsed, pool_pre_ping=True)
    else:
        raise ValueError(f"unsupported store URL scheme {parsed.drivername!r}")
    prepare_engine(engine)
    return engine


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own implicit BEGIN (only before DML) would split our
    # read-then-write transactions; the "begin" hook issues BEGIN instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        # FULL, not NORMAL: a 202 or an enqueued job promises the row survives
        # a power cut, not only a process crash.
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _on_sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get(_BEGIN_MODE_OPTION, "DEFERRED")
    if mode not in {"DEFERRED", "IMMEDIATE"}:
        raise ValueError(f"bad SQLite begin mode {mode!r}")
    conn.exec_driver_sql(f"BEGIN {mode}")


def prepare_engine(engine: Engine) -> None:
    """Install the SQLite connection and transaction hooks on ``engine`` (idempotent).

    :func:`create_engine_for` already does this; stores and queues call it again
    so that an engine built elsewhere behaves the same. Refuses dialects other
    than SQLite and PostgreSQL, whose upsert and locking this module relies on.
    """
    if engine.dialect.name not in SUPPORTED_DIALECTS:
        raise ValueError(f"unsupported database dialect {engine.dialect.name!r}")
    if engine.dialect.name != "sqlite" or event.contains(engine, "begin", _on_sqlite_begin):
        return
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    # Connections pooled before the hooks existed lack the pragmas; drop them.
    engine.dispose()


class Writer:
    """Read-modify-write transactions on one database.

    On SQLite they start with ``BEGIN IMMEDIATE``: the write lock is taken up
    front, so a transaction that reads and then writes can neither see a stale
    snapshot nor fail to upgrade its lock. Threads of this process share a
    group commit (:class:`GroupCommit`) rather than queueing on SQLite's busy
    handler, which sleeps in steps of up to 100 ms. Other processes still
    queue on the busy timeout. PostgreSQL needs neither: its own group commit
    and row locks serve concurrent transactions.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine.execution_options(**{_BEGIN_MODE_OPTION: "IMMEDIATE"})
        self._group = _sqlite_group(self.engine) if engine.dialect.name == "sqlite" else None

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction holding the database's write lock until it ends; on
        return from the block its writes are committed (durably, on SQLite with
        ``synchronous=FULL``). An exception in the block undoes them."""
        if self._group is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._group.transaction() as conn:
            yield conn


class _Batch:
    """The transactions that one SQLite commit makes durable together."""

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self.members = 0
        self.done = threading.Event()
        self.error: BaseException | None = None


class GroupCommit:
    """Group commit for SQLite: one fsync for the transactions of many threads.

    With ``synchronous=FULL`` every commit waits for the disk (about 4 ms on
    this project's machines), and SQLite commits one transaction at a time, so
    a process that commits each request on its own tops out near 250 writes a
    second however many threads it has. Here the threads of a process share
    one open ``BEGIN IMMEDIATE`` transaction: each runs its block inside a
    ``SAVEPOINT`` (an exception undoes that block alone), and the thread that
    finds nobody else waiting to join, or a batch older than
    :attr:`MAX_WAIT_SECONDS` or larger than :attr:`MAX_MEMBERS`, commits it.
    Every member returns only once that commit is durable, so a caller's
    promise ("the row survives a power cut") is the same as with a commit of
    its own; a failed commit fails every member of the batch.
    """

    #: A batch is committed once it holds this many transactions...
    MAX_MEMBERS = 64
    #: ...or has been open this long, so a steady stream of writers cannot
    #: hold the first one back for ever.
    MAX_WAIT_SECONDS = 0.005

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._counter = threading.Lock()
        self._waiting = 0
        self._conn: Connection | None = None
        self._transaction: sa.RootTransaction | None = None
        self._batch: _Batch | None = None
        self._owner = threading.local()
        self._between_processes = _FileLock(f"{engine.url.database}.writer")

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """Run the block in the open batch; return (or raise what the block
        raised) once the batch is committed, so whatever the caller does next
        sees the writes of everyone who was in the batch with it."""
        if getattr(self._owner, "inside", False):
            # The lock is not re-entrant: a nested block would wait for itself.
            raise RuntimeError("a write transaction was opened inside another one")
        with self._counter:
            self._waiting += 1
        acquired = self._lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_SECONDS)
        with self._counter:
            self._waiting -= 1
        if not acquired:
            raise StoreUnavailable("the database stayed busy; try again")
        self._owner.inside = True
        batch: _Batch | None = None
        failed = False
        try:
            conn, batch = self._open()
            savepoint = conn.begin_nested()
            try:
                yield conn
                savepoint.commit()
            except BaseException:
                failed = True
                self._undo(savepoint, batch)
                raise
            batch.members += 1
        finally:
            self._owner.inside = False
            try:
                self._commit_if_due()
            finally:
                self._lock.release()
            if failed and batch is not None:
                # A block that failed on another member's uncommitted row (a
                # duplicate) must not look it up before that row is
                # committed: the lookup runs on another connection.
                self._await(batch)
        assert batch is not None
        self._await(batch)
        if batch.error is not None:
            raise StoreUnavailable(
                f"the database did not commit ({type(batch.error).__name__}); try again"
            ) from batch.error

    def _await(self, batch: _Batch) -> None:
        """Wait until ``batch`` is committed. A batch is left open for the
        writers queued behind it; should they all be gone (a writer that gave
        up waiting for the lock), a member commits it itself."""
        while not batch.done.wait(4 * self.MAX_WAIT_SECONDS):
            if not self._lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_SECONDS):
                continue
            try:
                if self._batch is batch:
                    self._finish(batch, None, commit=batch.members > 0)
            finally:
                self._lock.release()

    def _open(self) -> tuple[Connection, _Batch]:
        if self._batch is None:
            conn = self._conn or self._engine.connect()
            self._between_processes.acquire()
            try:
                self._transaction = conn.begin()
            except BaseException:
                self._between_processes.release()
                self._conn = None
                conn.close()
                raise
            self._conn = conn
            self._batch = _Batch(time.monotonic())
        assert self._conn is not None
        return self._conn, self._batch

    def _undo(self, savepoint: sa.NestedTransaction, batch: _Batch) -> None:
        try:
            if savepoint.is_active:
                savepoint.rollback()
        except BaseException as error:  # noqa: BLE001 - handed to every member of the batch
            # The connection itself failed: the batch cannot be committed.
            self._finish(batch, error, commit=False)

    def _commit_if_due(self) -> None:
        batch = self._batch
        if batch is None:
            return
        with self._counter:
            waiting = self._waiting
        due = (
            waiting == 0
            or batch.members >= self.MAX_MEMBERS
            or time.monotonic() - batch.opened_at >= self.MAX_WAIT_SECONDS
        )
        if due:
            self._finish(batch, None, commit=batch.members > 0)

    def _finish(self, batch: _Batch, error: BaseException | None, *, commit: bool) -> None:
        conn, transaction = self._conn, self._transaction
        self._transaction = self._batch = None
        try:
            if transaction is not None and transaction.is_active:
                if commit and error is None:
                    transaction.commit()
                else:
                    transaction.rollback()
        except BaseException as failure:  # noqa: BLE001 - handed to every member of the batch
            error = error or failure
            log.warning("group commit failed: %s", failure)
        finally:
            try:
                with self._counter:
                    busy = self._waiting > 0
                # Under load the next batch starts at once on the same connection
                # (no trip through the pool); an idle or failed one goes back.
                if conn is not None and (error is not None or not busy):
                    self._conn = None
                    conn.close()
            finally:
                self._between_processes.release()
                # Whatever closing did, every member learns how the batch ended.
                batch.error = error
                batch.done.set()


class _FileLock:
    """An exclusive lock on ``path`` that the processes writing one SQLite file
    take around each write transaction.

    SQLite's own busy handler sleeps 1, 2, 5 ... up to 100 ms between tries,
    so a process that finds the file locked by another (the API process and
    its worker process, say) waits much longer than the lock was held, and
    under steady writes from both it can lose one try after another. Waiting
    here instead, the kernel hands the lock over the moment it is released.
    The kernel also drops it if its holder dies. Bounded like SQLite's own
    wait: after ``SQLITE_BUSY_TIMEOUT_SECONDS`` it is ``StoreUnavailable``.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
        pause = 0.0001
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreUnavailable("the database stayed locked; try again") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.001)

    def release(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


_SQLITE_GROUPS: dict[str, GroupCommit] = {}
_SQLITE_GROUPS_GUARD = threading.Lock()


def _sqlite_group(engine: Engine) -> GroupCommit:
    # One per database file, shared by every engine of this process on it: the
    # file admits one writer, so two groups would only queue on each other.
    with _SQLITE_GROUPS_GUARD:
        return _SQLITE_GROUPS.setdefault(str(engine.url), GroupCommit(engine))


def write_engine(engine: Engine) -> Writer:
    """The :class:`Writer` for ``engine``."""
    return Writer(engine)


def translate_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn database connectivity failures into ``StoreUnavailable`` (temporary).

    The server being down, a locked SQLite file past the busy timeout, a
    serialization failure or an exhausted pool all mean "try again later". The
    driver's text can name hosts and users, so it is logged, not shown.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (exc.OperationalError, exc.InterfaceError, exc.TimeoutError) as error:
            log.warning("database unavailable in %s: %s", fn.__qualname__, error)
            raise StoreUnavailable(
                f"the database is unavailable ({type(error).__name__}); try again"
            ) from error
        except exc.DBAPIError as error:
            if not error.connection_invalidated:
                raise
            log.warning("database connection lost in %s: %s", fn.__qualname__, error)
            raise StoreUnavailable("the database connection was lost; try again") from error

    return wrapper


def upsert(
    conn: Connection,
    table: sa.Table,
    values: Mapping[str, Any],
    *,
    keys: Sequence[str],
    update: bool = True,
    where: sa.ColumnElement[bool] | None = None,
) -> CursorResult[Any]:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE`` (or ``DO NOTHING``) on SQLite and PostgreSQL.

    With ``where``, the existing row is only replaced when it matches.
    """
    shape = (conn.dialect.name, table.name, tuple(values), tuple(keys), update)
    stmt = None if where is not None else _UPSERTS.get(shape)
    if stmt is None:
        insert: Any
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(table)
        if update:
            changes = {name: stmt.excluded[name] for name in values if name not in keys}
            stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=changes, where=where)
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
        if where is None:
            # Built once per shape and run with the values as parameters:
            # building the statement costs more than running it on SQLite.
            _UPSERTS[shape] = stmt
    result: CursorResult[Any] = conn.execute(stmt, dict(values))
    return result


_UPSERTS: dict[tuple[Any, ...], Any] = {}


def create_tables(engine: Engine, metadata: sa.MetaData) -> None:
    """Create ``metadata``'s missing tables, safe when several processes start at once.

    Both databases have transactional DDL; the write lock (SQLite) or an
    advisory lock (PostgreSQL) makes the check-then-create a single step.
    """
    with write_engine(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(
                sa.select(sa.func.pg_advisory_xact_lock(ADVISORY_LOCK_CLASS, _SCHEMA_LOCK_KEY))
            )
        metadata.create_all(conn)


# --------------------------------------------------------------------------- schema


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on both databases.

    SQLite has no timezone type and SQLAlchemy stores the wall-clock digits, so
    values are normalised to UTC before they are stored or compared; naive
    values are taken as UTC.
    """

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return as_utc(value)


def _timestamp(name: str, *, nullable: bool = True) -> sa.Column[datetime]:
    return sa.Column(name, UtcDateTime(timezone=True), nullable=nullable)


metadata = sa.MetaData()

# Table and index names carry a prefix: on a platform-managed PostgreSQL the
# broker may share a schema with other applications.
deployments = sa.Table(
    "kidp_deployments",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("namespace", sa.String, nullable=False),
    sa.Column("resource_type", sa.String, nullable=False),
    sa.Column("resource_name", sa.String, nullable=False),
    sa.Column("phase", sa.String, nullable=False),
    sa.Column("request_id", sa.String, nullable=True),
    sa.Column("version", sa.Integer, nullable=False),
    _timestamp("created_at", nullable=False),
    _timestamp("updated_at", nullable=False),
    _timestamp("finished_at"),
    sa.Column("active_slot", sa.SmallInteger, nullable=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.UniqueConstraint(
        "namespace",
        "resource_type",
        "resource_name",
        "active_slot",
        name="kidp_deployments_one_active",
    ),
    sa.UniqueConstraint("namespace", "request_id", name="kidp_deployments_request_id"),
    sa.Index("kidp_deployments_namespace_phase", "namespace", "phase"),
    sa.Index("kidp_deployments_phase_updated", "phase", "updated_at"),
    sa.Index("kidp_deployments_created", "created_at", "id"),
)

callback_events = sa.Table(
    "kidp_callback_events",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("deployment_id", sa.String, nullable=False, index=True),
    _timestamp("created_at", nullable=False),
    _timestamp("delivered_at"),
    _timestamp("dead_at"),
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("kidp_callback_events_pending", "delivered_at", "dead_at", "created_at"),
)

dead_letters = sa.Table(
    "kidp_dead_letters",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("event_id", sa.String, nullable=False, index=True),
    sa.Column("deployment_id", sa.String, nullable=False, index=True),
    _timestamp("created_at", nullable=False),
    _timestamp("resolved_at"),
    sa.Column("body", sa.Text, nullable=False),
)

cost_snapshots = sa.Table(
    "kidp_cost_snapshots",
    metadata,
    sa.Column("deployment_id", sa.String, primary_key=True),
    sa.Column("day", sa.String, primary_key=True),
    sa.Column("namespace", sa.String, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("kidp_cost_snapshots_day", "day"),
)


#: Run with a deployment's values as parameters (see :func:`upsert` for why).
_INSERT_DEPLOYMENT = deployments.insert()


def _deployment_values(deployment: Deployment) -> dict[str, Any]:
    return {
        "id": deployment.id,
        "namespace": deployment.namespace,
        "resource_type": deployment.resource_type.value,
        "resource_name": deployment.resource_name,
        "phase": deployment.phase.value,
        "request_id": deployment.request_id,
        "version": deployment.version,
        "created_at": deployment.created_at,
        "updated_at": deployment.updated_at,
        "finished_at": deployment.finished_at,
        "active_slot": 1 if deployment.phase in ACTIVE_PHASES else None,
        "body": deployment.model_dump_json(),
    }


def _event_values(event: CallbackEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "deployment_id": event.deployment_id,
        "created_at": event.created_at,
        "delivered_at": event.delivered_at,
        "dead_at": event.dead_at,
        "body": event.model_dump_json(),
    }


def _letter_values(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "event_id": letter.event_id,
        "deployment_id": letter.deployment_id,
        "created_at": letter.created_at,
        "resolved_at": letter.resolved_at,
        "body": letter.model_dump_json(),
    }


# --------------------------------------------------------------------------- store


class SqlDeploymentStore:
    """``DeploymentStore`` on SQLite or PostgreSQL through SQLAlchemy Core.

    Pass a URL (the store builds and owns its engine) or an ``engine`` to share
    one with :class:`kidp.queues.sql.SqlJobQueue`. Safe to use from many threads
    and many processes at once.
    """

    _MAX_CREATE_ATTEMPTS = 3

    def __init__(self, url: str | None = None, *, engine: Engine | None = None) -> None:
        if (url is None) == (engine is None):
            raise ValueError("pass exactly one of url or engine")
        self._owns_engine = engine is None
        self._engine = engine if engine is not None else create_engine_for(str(url))
        prepare_engine(self._engine)
        self._writer = write_engine(self._engine)
        self._postgres = self._engine.dialect.name == "postgresql"
        try:
            translate_errors(create_tables)(self._engine, metadata)
        except Exception:
            self.close()
            raise

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (share it with the SQL job queue)."""
        return self._engine

    def close(self) -> None:
        """Release pooled connections if this store created the engine."""
        if self._owns_engine:
            self._engine.dispose()

    # ---------------------------------------------------------------- deployments

    @translate_errors
    def create(self, deployment: Deployment) -> Deployment:
        """Insert ``deployment``; ``DuplicateDeployment`` when its resource is held by
        an active deployment or its namespace/request id (or id) already exists."""
        values = _deployment_values(deployment)
        for attempt in range(1, self._MAX_CREATE_ATTEMPTS + 1):
            try:
                with self._writer.begin() as conn:
                    conn.execute(_INSERT_DEPLOYMENT, values)
                return deployment
            except exc.IntegrityError:
                holder = self._holder(deployment)
                if holder is not None:
                    raise DuplicateDeployment(holder) from None
                # The holder finished or was purged between our insert and the
                # lookup: the slot may be free now, so try again. Still nothing
                # after a few tries means the violation is ours: let it surface.
                if attempt == self._MAX_CREATE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    @translate_errors
    def get(self, deployment_id: str) -> Deployment | None:
        """The deployment with this id, or None."""
        return self._one(deployments.c.id == deployment_id)

    @translate_errors
    def find_active(
        self, namespace: str, resource_type: ResourceType, resource_name: str
    ) -> Deployment | None:
        """The active deployment holding namespace/type/name, or None."""
        return self._one(
            deployments.c.namespace == namespace,
            deployments.c.resource_type == resource_type.value,
            deployments.c.resource_name == resource_name,
            deployments.c.active_slot == 1,
        )

    @translate_errors
    def find_by_request_id(self, namespace: str, request_id: str) -> Deployment | None:
        """The deployment created for this namespace/request id, or None."""
        return self._one(
            deployments.c.namespace == namespace, deployments.c.request_id == request_id
        )

    @translate_errors
    def save(
        self,
        deployment: Deployment,
        *,
        expected_version: int,
        events: Sequence[CallbackEvent] = (),
    ) -> Deployment:
        """Write ``deployment`` and ``events`` in one transaction if the stored
        version is still ``expected_version``; returns it at ``expected_version + 1``.

        ``ConcurrentUpdate`` when someone else wrote first (nothing is written,
        events included); ``DuplicateDeployment`` when the change would make it a
        second active deployment of its resource.
        """
        record = deployment.model_copy(update={"version": expected_version + 1})
        values = _deployment_values(record)
        del values["id"]
        try:
            with self._writer.begin() as conn:
                result = conn.execute(
                    sa.update(deployments)
                    .where(
                        deployments.c.id == record.id,
                        deployments.c.version == expected_version,
                    )
                    .values(values)
                )
                if result.rowcount != 1:
                    # Raising inside the block rolls the transaction back, so
                    # the events below are never written without their state.
                    raise stale(record.id, expected_version)
                for item in events:
                    upsert(conn, callback_events, _event_values(item), keys=["id"])
        except exc.IntegrityError:
            holder = self._holder(record, exclude_id=record.id)
            if holder is None:
                raise
            raise DuplicateDeployment(holder) from None
        return record

    @translate_errors
    def try_start(self, deployment_id: str, *, expected_version: int, cap: int) -> bool:
        """Move a Pending deployment to Provisioning while fewer than ``cap`` of its
        namespace are Provisioning; True if it was started.

        False when the cap is reached, or the deployment is missing or not
        Pending; ``ConcurrentUpdate`` when its version is no longer
        ``expected_version``. The count and the change are one conditional
        UPDATE, and concurrent starts in a namespace are serialized (SQLite's
        write lock; a transaction-scoped advisory lock on PostgreSQL), so the
        cap holds across processes.
        """
        with self._writer.begin() as conn:
            current = self._version_and_body(conn, deployment_id)
            if current is None:
                return False
            version, body = current
            if version != expected_version:
                raise stale(deployment_id, expected_version)
            deployment = Deployment.model_validate_json(body)
            if deployment.phase is not Phase.PENDING:
                return False
            if self._postgres:
                # READ COMMITTED lets two transactions each count the other's
                # start as not yet there; one lock per namespace orders them,
                # and each statement after the lock sees the previous commit.
                conn.execute(
                    sa.select(
                        sa.func.pg_advisory_xact_lock(
                            ADVISORY_LOCK_CLASS, sa.func.hashtext(deployment.namespace)
                        )
                    )
                )
            busy = deployments.alias("busy")
            provisioning = (
                sa.select(sa.func.count())
                .select_from(busy)
                .where(
                    busy.c.namespace == deployment.namespace,
                    busy.c.phase == Phase.PROVISIONING.value,
                )
                .scalar_subquery()
            )
            values = _deployment_values(started(deployment, expected_version))
            del values["id"]
            result = conn.execute(
                sa.update(deployments)
                .where(
                    deployments.c.id == deployment_id,
                    deployments.c.version == expected_version,
                    deployments.c.phase == Phase.PENDING.value,
                    provisioning < cap,
                )
                .values(values)
            )
            if result.rowcount == 1:
                return True
            after = self._version_and_body(conn, deployment_id)
            if after is not None and after[0] != expected_version:
                raise stale(deployment_id, expected_version)
            return False

    @translate_errors
    def count_by_phase(self) -> dict[Phase, int]:
        """How many deployments are in each phase (every phase present, zeros included)."""
        return phase_totals(self.count_by_namespace_type_phase())

    @translate_errors
    def count_by_namespace_type_phase(self) -> dict[tuple[str, ResourceType, Phase], int]:
        """How many deployments per (namespace, resource type, phase); one grouped query."""
        columns = (deployments.c.namespace, deployments.c.resource_type, deployments.c.phase)
        stmt = sa.select(*columns, sa.func.count()).group_by(*columns)
        with self._engine.connect() as conn:
            return {
                (namespace, ResourceType(resource_type), Phase(phase)): int(count)
                for namespace, resource_type, phase, count in conn.execute(stmt)
            }

    @translate_errors
    def purge_finished(self, *, before: datetime) -> int:
        """Forget Deleted deployments that finished before ``before`` (their
        ``updated_at`` when ``finished_at`` was never set) and their delivered
        callback events; returns how many deployments were removed. Undelivered
        events, dead letters and cost history are kept."""
        finished = sa.func.coalesce(deployments.c.finished_at, deployments.c.updated_at)
        purgeable = (deployments.c.phase == Phase.DELETED.value, finished < before)
        with self._writer.begin() as conn:
            conn.execute(
                sa.delete(callback_events).where(
                    callback_events.c.deployment_id.in_(
                        sa.select(deployments.c.id).where(*purgeable)
                    ),
                    callback_events.c.delivered_at.is_not(None),
                )
            )
            result = conn.execute(sa.delete(deployments).where(*purgeable))
        return int(result.rowcount)

    # ---------------------------------------------------------------- outbox

    @translate_errors
    def get_event(self, event_id: str) -> CallbackEvent | None:
        """The outbox event with this id, or None."""
        with self._engine.connect() as conn:
            body = conn.execute(
                sa.select(callback_events.c.body).where(callback_events.c.id == event_id)
            ).scalar_one_or_none()
        return None if body is None else CallbackEvent.model_validate_json(body)

    @translate_errors
    def save_event(self, event: CallbackEvent) -> None:
        """Insert or replace an outbox event."""
        with self._writer.begin() as conn:
            upsert(conn, callback_events, _event_values(event), keys=["id"])

    @translate_errors
    def pending_events(self, *, created_before: datetime, limit: int = 100) -> list[CallbackEvent]:
        """Events neither delivered nor dead, created before ``created_before``, oldest first."""
        stmt = (
            sa.select(callback_events.c.body)
            .where(
                callback_events.c.delivered_at.is_(None),
                callback_events.c.dead_at.is_(None),
                callback_events.c.created_at < created_before,
            )
            .order_by(callback_events.c.created_at, callback_events.c.id)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [CallbackEvent.model_validate_json(b) for b in conn.execute(stmt).scalars()]

    # ---------------------------------------------------------------- dead letters

    @translate_errors
    def add_dead_letter(self, letter: DeadLetter) -> None:
        """Record a dead letter. Adding an id that exists keeps the stored one, so a
        redelivered job cannot reopen a letter an operator already resolved."""
        with self._writer.begin() as conn:
            upsert(conn, dead_letters, _letter_values(letter), keys=["id"], update=False)

    @translate_errors
    def get_dead_letter(self, letter_id: str) -> DeadLetter | None:
        """The dead letter with this id, or None."""
        with self._engine.connect() as conn:
            body = conn.execute(
                sa.select(dead_letters.c.body).where(dead_letters.c.id == letter_id)
            ).scalar_one_or_none()
        return None if body is None else DeadLetter.model_validate_json(body)

    @translate_errors
    def save_dead_letter(self, letter: DeadLetter) -> None:
        """Insert or replace a dead letter (replay bookkeeping, resolution)."""
        with self._writer.begin() as conn:
            upsert(conn, dead_letters, _letter_values(letter), keys=["id"])

    @translate_errors
    def list_dead_letters(self, *, include_resolved: bool = False) -> list[DeadLetter]:
        """Dead letters oldest first; unresolved ones only unless ``include_resolved``."""
        stmt = sa.select(dead_letters.c.body).order_by(dead_letters.c.created_at, dead_letters.c.id)
        if not include_resolved:
            stmt = stmt.where(dead_letters.c.resolved_at.is_(None))
        with self._engine.connect() as conn:
            return [DeadLetter.model_validate_json(b) for b in conn.execute(stmt).scalars()]

    # ---------------------------------------------------------------- cost history

    @translate_errors
    def put_cost_snapshot(self, snapshot: CostSnapshot) -> None:
        """Insert or replace the snapshot for (deployment, day)."""
        values = {
            "deployment_id": snapshot.deployment_id,
            "day": snapshot.day,
            "namespace": snapshot.namespace,
            "body": snapshot.model_dump_json(),
        }
        with self._writer.begin() as conn:
            upsert(conn, cost_snapshots, values, keys=["deployment_id", "day"])

    @translate_errors
    def cost_snapshots(self, *, day: str) -> list[CostSnapshot]:
        """Every snapshot taken on ``day`` (``YYYY-MM-DD``), by deployment id."""
        stmt = (
            sa.select(cost_snapshots.c.body)
            .where(cost_snapshots.c.day == day)
            .order_by(cost_snapshots.c.deployment_id)
        )
        with self._engine.connect() as conn:
            return [CostSnapshot.model_validate_json(b) for b in conn.execute(stmt).scalars()]

    @translate_errors
    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless the database answers ``SELECT 1``."""
        with self._engine.connect() as conn:
            conn.execute(sa.select(1))

    # ---------------------------------------------------------------- helpers

    def _one(self, *conditions: sa.ColumnElement[bool]) -> Deployment | None:
        with self._engine.connect() as conn:
            body = conn.execute(
                sa.select(deployments.c.body).where(*conditions).limit(1)
            ).scalar_one_or_none()
        return None if body is None else Deployment.model_validate_json(body)

    @staticmethod
    def _version_and_body(conn: Connection, deployment_id: str) -> tuple[int, str] | None:
        row = conn.execute(
            sa.select(deployments.c.version, deployments.c.body).where(
                deployments.c.id == deployment_id
            )
        ).one_or_none()
        return None if row is None else (int(row.version), str(row.body))

    def _holder(
        self, deployment: Deployment, *, exclude_id: str | None = None
    ) -> Deployment | None:
        """The record a unique constraint refused ``deployment`` for.

        The same request id wins over the same resource: a retried request must
        get back the deployment it created, even if another one holds the name.
        """
        d = deployments
        same_request = (
            sa.and_(d.c.namespace == deployment.namespace, d.c.request_id == deployment.request_id)
            if deployment.request_id is not None
            else sa.false()
        )
        same_resource = sa.and_(
            d.c.namespace == deployment.namespace,
            d.c.resource_type == deployment.resource_type.value,
            d.c.resource_name == deployment.resource_name,
            d.c.active_slot == 1,
        )
        candidates = [same_request, same_resource]
        if exclude_id is None:
            candidates.append(d.c.id == deployment.id)
        rank = sa.case((same_request, 0), (same_resource, 1), else_=2)
        stmt = sa.select(d.c.body).where(sa.or_(*candidates)).order_by(rank).limit(1)
        if exclude_id is not None:
            stmt = stmt.where(d.c.id != exclude_id)
        with self._engine.connect() as conn:
            body = conn.execute(stmt).scalar_one_or_none()
        return None if body is None else Deployment.model_validate_json(body)

    # ``list`` comes last: below it, the name would shadow the builtin in
    # annotations of this class.
    @translate_errors
    def list(
        self,
        *,
        namespace: str | None = None,
        phases: Iterable[Phase] | None = None,
        resource_type: ResourceType | None = None,
        resource_name: str | None = None,
        updated_before: datetime | None = None,
        limit: int = 1000,
    ) -> list[Deployment]:
        """Deployments matching every given filter, oldest created first."""
        d = deployments
        stmt = sa.select(d.c.body).order_by(d.c.created_at, d.c.id).limit(limit)
        if namespace is not None:
            stmt = stmt.where(d.c.namespace == namespace)
        if phases is not None:
            stmt = stmt.where(d.c.phase.in_([Phase(p).value for p in phases]))
        if resource_type is not None:
            stmt = stmt.where(d.c.resource_type == resource_type.value)
        if resource_name is not None:
            stmt = stmt.where(d.c.resource_name == resource_name)
        if updated_before is not None:
            stmt = stmt.where(d.c.updated_at < updated_before)
        with self._engine.connect() as conn:
            return [Deployment.model_validate_json(b) for b in conn.execute(stmt).scalars()]
