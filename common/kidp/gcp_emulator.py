"""A local stand-in for the Google Cloud admin APIs the GCP provider calls.

No Google project is reachable from here, so :mod:`kidp.providers.gcp` is
tested through Google's real client libraries against this HTTP server (the
Pub/Sub topics go to the Cloud CLI's real Pub/Sub emulator instead). It
answers the REST shapes those clients send and parse::

    emulator = start_gcp_emulator(operation_polls=2)
    provider = GcpProvider(project="p", region="europe-west1", api_endpoint=emulator.url,
                           credentials=AnonymousCredentials())
    ...
    emulator.stop()

What it serves (paths as the clients build them):

- SQL Admin v1 (``/v1/projects/{p}/...``): instances insert/get/list/patch/delete
  (``enableFinalBackup`` keeps a FINAL backup), users insert/update/list,
  backupRuns insert/list, Backups list, operations get/list. Operations go
  PENDING -> RUNNING -> DONE as they, or their instance, are read;
  a failed one carries ``error.errors[]`` and leaves the instance FAILED.
  An instance without ``settings.edition`` is Enterprise Plus from PostgreSQL
  16 and MySQL 8.4 on, which refuses the Enterprise edition's ``db-custom-*``
  and shared-core tiers (400, Cloud SQL's message).
  A deleted instance's name cannot be used again, as on Cloud SQL (a week).
- Memorystore for Redis v1 (``/v1/projects/{p}/locations/{l}/instances``):
  create/get/list/patch(``updateMask``)/delete, long-running operations with
  ``done``, ``metadata`` and ``response`` or ``error`` (a failed create
  leaves no instance, as on Memorystore).
- Cloud Storage JSON v1 (``/storage/v1/b``): buckets insert/get/list/patch/delete
  (409 while objects remain), objects list/delete (tests add objects with
  :meth:`GcpEmulator.put_object`).
- Cloud Run Admin v2 (``/v2/projects/{p}/locations/{l}/services``):
  create/get/list/patch/delete and operations; ``terminalCondition`` turns
  CONDITION_SUCCEEDED (or CONDITION_FAILED) when the operation finishes.
- Service Usage v1beta1 consumer quota metrics, as :meth:`GcpEmulator.set_quota` sets them.

Errors carry Google's body, ``{"error": {"code", "message", "status",
"errors", "details"}}``: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 409
ALREADY_EXISTS/ABORTED, 429 RESOURCE_EXHAUSTED, 5xx. Faults for tests:
:meth:`GcpEmulator.fail_next` (the next N matching requests answer an error,
or no answer at all) and :meth:`GcpEmulator.fail_next_operation`.

The GAPIC clients send enums as numbers (``rest_numeric_enums``); the few
this server reasons about are read in either form. Everything lives in memory.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from kidp.gcp_standin import STATUS_NAMES
from kidp.localhttp import JsonHandler, serve_in_thread, stop_serving

if TYPE_CHECKING:
    from kidp.emulator import EmulatedCloud

JSON = dict[str, Any]

#: Google's status names, with the gateway errors :meth:`GcpEmulator.fail_next` may inject.
_STATUS_NAMES = {**STATUS_NAMES, 502: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_LEGACY_REASONS = {
    400: "invalid",
    403: "forbidden",
    404: "notFound",
    409: "conflict",
    429: "rateLimitExceeded",
    500: "backendError",
    503: "backendError",
}
#: google.rpc.Code numbers, for long-running operations' ``error.code``.
_RPC_CODES = {
    "INVALID_ARGUMENT": 3,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
}
_REDIS_TIERS = {1: "BASIC", 3: "STANDARD_HA"}
_REDIS_TRANSIT = {1: "SERVER_AUTHENTICATION", 2: "DISABLED"}

_SQL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,96}[a-z0-9]$")
_REDIS_ID = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")
_RUN_ID = re.compile(r"^[a-z][a-z0-9-]{0,47}[a-z0-9]$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


#: Machine types of the Enterprise edition only: custom and shared-core.
_ENTERPRISE_TIERS = ("db-custom-", "db-f1-micro", "db-g1-small")


def _default_sql_edition(version: str) -> str:
    """The edition Cloud SQL gives an instance whose create names none:
    Enterprise Plus for PostgreSQL 16 and later and for MySQL 8.4, which takes
    its own ``db-perf-optimized-N-*`` tiers, not Enterprise's; Enterprise
    before them."""
    match = re.fullmatch(r"POSTGRES_(\d+)", version)
    if (match and int(match.group(1)) >= 16) or version.startswith("MYSQL_8_4"):
        return "ENTERPRISE_PLUS"
    return "ENTERPRISE"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """An error answer, rendered in Google's error body."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        status: str | None = None,
        reason: str | None = None,
        domain: str = "googleapis.com",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or _STATUS_NAMES.get(code, "UNKNOWN")
        self.reason = reason or _LEGACY_REASONS.get(code, self.status.lower())
        self.domain = domain

    def body(self) -> JSON:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "status": self.status,
                "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": self.status if self.code != 429 else "RATE_LIMIT_EXCEEDED",
                        "domain": self.domain,
                    }
                ],
            }
        }


@dataclass
class Fault:
    """The next ``count`` requests matching ``method`` and ``path`` (a regular
    expression searched in the path) answer ``status``; 0 closes the
    connection without an answer."""

    status: int
    count: int = 1
    method: str | None = None
    path: str | None = None
    message: str = "injected fault"
    reason: str | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        return self.path is None or re.search(self.path, path) is not None


@dataclass
class _Operation:
    api: str
    name: str
    kind: str
    project: str
    target: str
    target_link: str
    on_done: Callable[[], JSON | None]
    on_fail: Callable[[], None]
    error: tuple[str, str] | None = None
    reads: int = 0
    done: bool = False
    response: JSON | None = None
    created: str = field(default_factory=_now)
    ended: str | None = None


class GcpEmulator:
    """The stand-in's state, its HTTP server, and the controls tests use.

    ``operation_polls`` is how many reads (of an operation or of the resource
    it changes) pass before an operation is DONE; 0 finishes them at once.
    """

    def __init__(self, *, operation_polls: int = 2, region_zone_suffix: str = "b") -> None:
        self.operation_polls = operation_polls
        self.zone_suffix = region_zone_suffix
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self._failing_ops: list[tuple[str, str | None, str, str]] = []
        self._ids = itertools.count(1)
        self.operations: dict[str, _Operation] = {}
        # SQL Admin: (project, instance) -> instance
        self.sql_instances: dict[tuple[str, str], JSON] = {}
        self.sql_users: dict[tuple[str, str], dict[tuple[str, str], JSON]] = {}
        self.sql_passwords: dict[tuple[str, str, str, str], str] = {}
        self.sql_backup_runs: dict[tuple[str, str], list[JSON]] = {}
        self.sql_backups: dict[str, list[JSON]] = {}
        self.sql_deleted_names: set[tuple[str, str]] = set()
        # Memorystore and Cloud Run: full resource name -> resource
        self.redis_instances: dict[str, JSON] = {}
        self.run_services: dict[str, JSON] = {}
        # Cloud Storage: bucket -> bucket; bucket -> object name -> generations
        self.buckets: dict[str, JSON] = {}
        self.objects: dict[str, dict[str, list[int]]] = {}
        # Service Usage: (project, service) -> metrics
        self.quota_metrics: dict[tuple[str, str], list[JSON]] = {}
        self.server: ThreadingHTTPServer | None = None
        self.url = ""

    # --- life ------------------------------------------------------------

    def start(self, *, host: str = "127.0.0.1", port: int = 0) -> GcpEmulator:
        """Listen on ``host:port`` (a free port by default) in a daemon thread."""
        emulator = self

        class Handler(_Handler):
            state = emulator

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/"
        serve_in_thread(self.server, "gcp-emulator")
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self.server is not None:
            stop_serving(self.server)
            self.server = None

    # --- controls for tests ---------------------------------------------------

    def fail_next(
        self,
        status: int,
        *,
        count: int = 1,
        method: str | None = None,
        path: str | None = None,
        message: str = "injected fault",
        reason: str | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests with ``status`` (0: no
        answer); ``reason`` is the legacy ``errors[].reason`` (``quotaExceeded``)."""
        with self.lock:
            self.faults.append(Fault(status, count, method, path, message, reason))

    def fail_next_operation(
        self,
        api: str,
        *,
        kind: str | None = None,
        status: str = "INTERNAL",
        message: str = "injected operation failure",
    ) -> None:
        """Make the next operation of ``api`` (``sqladmin``, ``redis``, ``run``),
        of ``kind`` (CREATE, UPDATE, DELETE, ...) if given, finish with an error."""
        with self.lock:
            self._failing_ops.append((api, kind, status, message))

    def set_quota(
        self,
        project: str,
        service: str,
        metric: str,
        limit: int,
        *,
        region: str | None = None,
        unit: str = "1/{project}/{region}",
    ) -> None:
        """Publish a consumer quota metric for ``project`` as Service Usage does;
        ``region`` makes it a per-region bucket next to the project-wide default."""
        with self.lock:
            metrics = self.quota_metrics.setdefault((project, service), [])
            entry = next((m for m in metrics if m["metric"] == metric), None)
            if entry is None:
                encoded = metric.replace("/", "%2F")
                entry = {
                    "name": f"projects/{project}/services/{service}/consumerQuotaMetrics/{encoded}",
                    "metric": metric,
                    "displayName": metric.rsplit("/", 1)[-1],
                    "unit": unit,
                    "consumerQuotaLimits": [
                        {
                            "name": f"{metric}/limits/{unit}",
                            "metric": metric,
                            "unit": unit,
                            "isPrecise": True,
                            "quotaBuckets": [],
                        }
                    ],
                }
                metrics.append(entry)
            buckets = entry["consumerQuotaLimits"][0]["quotaBuckets"]
            dimensions = {"region": region} if region else {}
            buckets[:] = [b for b in buckets if b.get("dimensions", {}) != dimensions]
            bucket: JSON = {"effectiveLimit": str(limit), "defaultLimit": str(limit)}
            if dimensions:
                bucket["dimensions"] = dimensions
            buckets.append(bucket)

    def put_object(self, bucket: str, name: str) -> None:
        """Add an object (a new generation when versioned) to ``bucket``."""
        with self.lock:
            if bucket not in self.buckets:
                raise KeyError(bucket)
            generations = self.objects.setdefault(bucket, {}).setdefault(name, [])
            versioned = self.buckets[bucket].get("versioning", {}).get("enabled", False)
            generation = next(self._ids) + 1_700_000_000_000_000
            generations[:] = [*generations, generation] if versioned else [generation]

    def sql_instance(self, project: str, name: str) -> JSON | None:
        """The live record of a Cloud SQL instance (edit it under ``lock`` to drift)."""
        return self.sql_instances.get((project, name))

    def sql_password(self, project: str, instance: str, user: str, host: str = "") -> str | None:
        """The password a Cloud SQL user was last given (never served by the API)."""
        return self.sql_passwords.get((project, instance, user, host))

    @contextlib.contextmanager
    def edit(self) -> Iterator[GcpEmulator]:
        """Hold the lock while a test changes resources behind the provider's back."""
        with self.lock:
            yield self

    # --- plumbing -------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.count > 0 and fault.matches(method, path):
                    fault.count -= 1
                    if fault.count == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def _new_operation(
        self,
        api: str,
        kind: str,
        project: str,
        target: str,
        target_link: str,
        *,
        name: str,
        on_done: Callable[[], JSON | None],
        on_fail: Callable[[], None] = lambda: None,
    ) -> _Operation:
        op = _Operation(api, name, kind, project, target, target_link, on_done, on_fail)
        for failing in self._failing_ops:
            if failing[0] == api and failing[1] in (None, kind):
                self._failing_ops.remove(failing)
                op.error = (failing[2], failing[3])
                break
        self.operations[name] = op
        if self.operation_polls <= 0:
            self._finish(op)
        return op

    def _finish(self, op: _Operation) -> None:
        op.done = True
        op.ended = _now()
        if op.error is not None:
            op.on_fail()
        else:
            op.response = op.on_done()

    def _advance(self, op: _Operation) -> None:
        if op.done:
            return
        op.reads += 1
        if op.reads >= self.operation_polls:
            self._finish(op)

    def _advance_target(self, target: str) -> None:
        for op in list(self.operations.values()):
            if op.target == target and not op.done:
                self._advance(op)

    def _pending_on(self, target: str) -> bool:
        return any(op.target == target and not op.done for op in self.operations.values())

    # --- SQL Admin v1 -----------------------------------------------------------

    def _sql_operation_json(self, op: _Operation) -> JSON:
        if op.done:
            status = "DONE"
        elif op.reads == 0:
            status = "PENDING"
        else:
            status = "RUNNING"
        body: JSON = {
            "kind": "sql#operation",
            "name": op.name,
            "operationType": op.kind,
            "status": status,
            "targetId": op.target.split("/", 1)[1],
            "targetProject": op.project,
            "targetLink": op.target_link,
            "selfLink": f"{self.url}v1/projects/{op.project}/operations/{op.name}",
            "insertTime": op.created,
            "user": "anonymous@example.com",
        }
        if op.ended:
            body["endTime"] = op.ended
        if op.done and op.error is not None:
            body["error"] = {
                "kind": "sql#operationErrors",
                "errors": [
                    {"kind": "sql#operationError", "code": op.error[0], "message": op.error[1]}
                ],
            }
        return body

    def _sql_op(
        self,
        kind: str,
        project: str,
        instance: str,
        on_done: Callable[[], JSON | None],
        on_fail: Callable[[], None] = lambda: None,
    ) -> JSON:
        op = self._new_operation(
            "sqladmin",
            kind,
            project,
            f"{project}/{instance}",
            f"{self.url}v1/projects/{project}/instances/{instance}",
            name=str(uuid.uuid4()),
            on_done=on_done,
            on_fail=on_fail,
        )
        return self._sql_operation_json(op)

    def _sql_get(self, project: str, name: str) -> JSON:
        self._advance_target(f"{project}/{name}")
        instance = self.sql_instances.get((project, name))
        if instance is None:
            raise ApiError(
                404, "The Cloud SQL instance does not exist.", reason="instanceDoesNotExist"
            )
        return instance

    def sql_insert(self, project: str, body: JSON) -> JSON:
        name = str(body.get("name") or "")
        if not _SQL_NAME.match(name):
            raise ApiError(400, "Invalid request: instance name is invalid.", reason="invalid")
        version = body.get("databaseVersion")
        settings = body.get("settings") or {}
        if not version or not settings.get("tier"):
            raise ApiError(400, "Invalid request: databaseVersion and settings.tier are required.")
        tier = str(settings["tier"])
        edition = str(settings.get("edition") or _default_sql_edition(str(version)))
        if edition == "ENTERPRISE_PLUS" and tier.startswith(_ENTERPRISE_TIERS):
            engine = "mysql" if str(version).startswith("MYSQL") else "postgres"
            raise ApiError(
                400,
                f"Invalid request: Invalid Tier ({tier}) for (ENTERPRISE_PLUS) Edition. Use a "
                "predefined Tier like db-perf-optimized-N-* instead. Learn more at "
                f"https://cloud.google.com/sql/docs/{engine}/create-instance#machine-types.",
                reason="invalid",
            )
        if (project, name) in self.sql_instances or (project, name) in self.sql_deleted_names:
            raise ApiError(
                409,
                "The Cloud SQL instance already exists. When you delete an instance, you "
                "can't reuse the name of the deleted instance until one week from the "
                "deletion date.",
                reason="instanceAlreadyExists",
            )
        region = body.get("region") or "us-central1"
        instance: JSON = {
            **{k: v for k, v in body.items() if k != "rootPassword"},
            "kind": "sql#instance",
            "name": name,
            "project": project,
            "region": region,
            "gceZone": f"{region}-{self.zone_suffix}",
            "state": "PENDING_CREATE",
            "backendType": "SECOND_GEN",
            "instanceType": "CLOUD_SQL_INSTANCE",
            "connectionName": f"{project}:{region}:{name}",
            "selfLink": f"{self.url}v1/projects/{project}/instances/{name}",
            "createTime": _now(),
            "databaseInstalledVersion": f"{version}_4",
            "settings": {
                **copy.deepcopy(settings),
                "kind": "sql#settings",
                "settingsVersion": "1",
                "edition": edition,
                "userLabels": dict(settings.get("userLabels") or {}),
            },
            "ipAddresses": [],
        }
        if body.get("diskEncryptionConfiguration"):
            instance["diskEncryptionStatus"] = {
                "kind": "sql#diskEncryptionStatus",
                "kmsKeyVersionName": f"{body['diskEncryptionConfiguration']['kmsKeyName']}"
                "/cryptoKeyVersions/1",
            }
        self.sql_instances[(project, name)] = instance
        self.sql_users[(project, name)] = {}
        builtin = ("root", "%") if str(version).startswith("MYSQL") else ("postgres", "")
        self._sql_put_user(project, name, builtin[0], builtin[1], body.get("rootPassword"))

        def done() -> None:
            instance["state"] = "RUNNABLE"
            network = (settings.get("ipConfiguration") or {}).get("privateNetwork")
            digest = hashlib.sha256(f"{project}/{name}".encode()).digest()
            instance["ipAddresses"] = [
                {
                    "type": "PRIVATE" if network else "PRIMARY",
                    "ipAddress": f"10.{digest[0]}.{digest[1]}.{digest[2] or 1}",
                }
            ]

        def failed() -> None:
            instance["state"] = "FAILED"

        return self._sql_op("CREATE", project, name, done, failed)

    def _sql_put_user(
        self, project: str, instance: str, user: str, host: str, password: str | None
    ) -> None:
        self.sql_users[(project, instance)][(user, host)] = {
            "kind": "sql#user",
            "name": user,
            "host": host,
            "instance": instance,
            "project": project,
        }
        if password is not None:
            self.sql_passwords[(project, instance, user, host)] = password

    def sql_patch(self, project: str, name: str, body: JSON) -> JSON:
        instance = self._sql_get(project, name)

        def done() -> None:
            settings = instance["settings"]
            for key, value in (body.get("settings") or {}).items():
                if isinstance(value, dict) and isinstance(settings.get(key), dict):
                    settings[key] = {**settings[key], **value}
                else:
                    settings[key] = value
            settings["settingsVersion"] = str(int(settings["settingsVersion"]) + 1)

        return self._sql_op("UPDATE", project, name, done)

    def sql_delete(self, project: str, name: str, query: dict[str, str]) -> JSON:
        instance = self._sql_get(project, name)
        if self._pending_on(f"{project}/{name}"):
            raise ApiError(
                409,
                "Operation failed because another operation was already in progress.",
                status="ABORTED",
                reason="operationInProgress",
            )
        instance["state"] = "PENDING_DELETE"

        def done() -> None:
            self.sql_instances.pop((project, name), None)
            self.sql_users.pop((project, name), None)
            self.sql_backup_runs.pop((project, name), None)
            self.sql_deleted_names.add((project, name))
            if query.get("enableFinalBackup", "").lower() == "true":
                self.sql_backups.setdefault(project, []).append(
                    {
                        "kind": "sql#backup",
                        "name": f"projects/{project}/backups/{uuid.uuid4()}",
                        "instance": name,
                        "type": "FINAL",
                        "state": "SUCCESSFUL",
                        "description": query.get("finalBackupDescription", ""),
                        "ttlDays": query.get("finalBackupTtlDays"),
                        "databaseVersion": instance.get("databaseVersion"),
                        "location": instance.get("region"),
                    }
                )

        def failed() -> None:
            instance["state"] = "RUNNABLE"

        return self._sql_op("DELETE", project, name, done, failed)

    def sql_users_update(self, project: str, name: str, query: dict[str, str], body: JSON) -> JSON:
        self._sql_get(project, name)
        user, host = query.get("name", ""), query.get("host", "")
        if (user, host) not in self.sql_users[(project, name)]:
            raise ApiError(404, f"User does not exist: {user}", reason="userDoesNotExist")
        password = body.get("password")

        def done() -> None:
            if password is not None:
                self.sql_passwords[(project, name, user, host)] = password

        return self._sql_op("UPDATE_USER", project, name, done)

    def sql_users_insert(self, project: str, name: str, body: JSON) -> JSON:
        self._sql_get(project, name)
        user, host = str(body.get("name") or ""), str(body.get("host") or "")
        if not user:
            raise ApiError(400, "Invalid request: user name is required.")
        if (user, host) in self.sql_users[(project, name)]:
            raise ApiError(409, "User already exists.", reason="userAlreadyExists")

        def done() -> None:
            self._sql_put_user(project, name, user, host, body.get("password"))

        return self._sql_op("CREATE_USER", project, name, done)

    def sql_backup_run(self, project: str, name: str, body: JSON) -> JSON:
        instance = self._sql_get(project, name)
        if instance["state"] != "RUNNABLE":
            raise ApiError(
                400, "Invalid request: the instance is not running.", reason="invalidState"
            )
        run: JSON = {
            "kind": "sql#backupRun",
            "id": str(next(self._ids)),
            "status": "RUNNING",
            "type": "ON_DEMAND",
            "instance": name,
            "description": body.get("description", ""),
            "enqueuedTime": _now(),
        }
        self.sql_backup_runs.setdefault((project, name), []).append(run)

        def done() -> None:
            run["status"] = "SUCCESSFUL"
            run["endTime"] = _now()

        def failed() -> None:
            run["status"] = "FAILED"

        return self._sql_op("BACKUP_VOLUME", project, name, done, failed)

    # --- long-running operations of the resource-oriented APIs --------------------

    def _lro_json(self, op: _Operation, metadata_type: str, response_type: str) -> JSON:
        metadata: JSON = {"@type": metadata_type}
        if metadata_type.endswith("OperationMetadata"):
            metadata.update(
                createTime=op.created,
                target=op.target,
                verb=op.kind.lower(),
                apiVersion="v1",
            )
        else:
            # Cloud Run's operations carry the resource itself as metadata.
            current = self.run_services.get(op.target) or op.response or {}
            metadata.update(current)
        body: JSON = {"name": op.name, "metadata": metadata, "done": op.done}
        if op.done and op.error is not None:
            body["error"] = {"code": _RPC_CODES.get(op.error[0], 2), "message": op.error[1]}
        elif op.done:
            body["response"] = {"@type": response_type, **(op.response or {})}
        return body

    def _lro(
        self,
        api: str,
        kind: str,
        parent: str,
        target: str,
        on_done: Callable[[], JSON | None],
        on_fail: Callable[[], None] = lambda: None,
    ) -> _Operation:
        project = parent.split("/")[1]
        return self._new_operation(
            api,
            kind,
            project,
            target,
            target,
            name=f"{parent}/operations/operation-{uuid.uuid4().hex[:16]}",
            on_done=on_done,
            on_fail=on_fail,
        )

    def _operation(self, name: str) -> _Operation:
        op = self.operations.get(name)
        if op is None:
            raise ApiError(404, f"Operation {name} not found.")
        self._advance(op)
        return op

    # --- Memorystore for Redis v1 ---------------------------------------------------

    _REDIS_META = "type.googleapis.com/google.cloud.redis.v1.OperationMetadata"
    _REDIS_INSTANCE = "type.googleapis.com/google.cloud.redis.v1.Instance"
    _EMPTY = "type.googleapis.com/google.protobuf.Empty"

    def _redis_json(self, op: _Operation) -> JSON:
        response = self._EMPTY if op.kind == "DELETE" else self._REDIS_INSTANCE
        return self._lro_json(op, self._REDIS_META, response)

    def _redis_get(self, name: str) -> JSON:
        self._advance_target(name)
        instance = self.redis_instances.get(name)
        if instance is None:
            raise ApiError(404, f"Resource '{name}' was not found")
        return instance

    @staticmethod
    def _redis_enums(body: JSON) -> JSON:
        fixed = dict(body)
        if isinstance(fixed.get("tier"), int):
            fixed["tier"] = _REDIS_TIERS.get(fixed["tier"], "TIER_UNSPECIFIED")
        if isinstance(fixed.get("transitEncryptionMode"), int):
            fixed["transitEncryptionMode"] = _REDIS_TRANSIT.get(
                fixed["transitEncryptionMode"], "TRANSIT_ENCRYPTION_MODE_UNSPECIFIED"
            )
        return fixed

    def redis_create(self, parent: str, query: dict[str, str], body: JSON) -> JSON:
        instance_id = query.get("instanceId", "")
        if not _REDIS_ID.match(instance_id):
            raise ApiError(400, "instance_id must be 1-40 lowercase letters, digits or hyphens")
        body = self._redis_enums(body)
        if int(body.get("memorySizeGb") or 0) <= 0 or body.get("tier") in (
            None,
            "TIER_UNSPECIFIED",
        ):
            raise ApiError(400, "memory_size_gb and tier are required")
        name = f"{parent}/instances/{instance_id}"
        if name in self.redis_instances:
            raise ApiError(409, f"Resource '{name}' already exists")
        region = parent.rsplit("/", 1)[-1]
        instance: JSON = {
            **body,
            "name": name,
            "locationId": body.get("locationId") or f"{region}-{self.zone_suffix}",
            "redisVersion": body.get("redisVersion") or "REDIS_7_2",
            "port": 6379,
            "state": "CREATING",
            "createTime": _now(),
            "authorizedNetwork": body.get("authorizedNetwork")
            or f"projects/{parent.split('/')[1]}/global/networks/default",
            "connectMode": body.get("connectMode") or "DIRECT_PEERING",
        }
        self.redis_instances[name] = instance

        def done() -> JSON:
            instance["state"] = "READY"
            digest = hashlib.sha256(name.encode()).digest()
            instance["host"] = f"10.{digest[0]}.{digest[1]}.{digest[2] or 1}"
            instance["currentLocationId"] = instance["locationId"]
            return copy.deepcopy(instance)

        def failed() -> None:
            self.redis_instances.pop(name, None)

        return self._redis_json(self._lro("redis", "CREATE", parent, name, done, failed))

    def redis_patch(self, name: str, query: dict[str, str], body: JSON) -> JSON:
        instance = self._redis_get(name)
        body = self._redis_enums(body)
        mask = [m for m in query.get("updateMask", "").split(",") if m]
        if not mask:
            raise ApiError(400, "update_mask is required")
        instance["state"] = "UPDATING"

        def done() -> JSON:
            for path in mask:
                key = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), path)
                if key in body:
                    instance[key] = body[key]
                else:
                    instance.pop(key, None)
            instance["state"] = "READY"
            return copy.deepcopy(instance)

        def failed() -> None:
            instance["state"] = "READY"

        parent = name.rsplit("/instances/", 1)[0]
        return self._redis_json(self._lro("redis", "UPDATE", parent, name, done, failed))

    def redis_delete(self, name: str) -> JSON:
        instance = self._redis_get(name)
        if instance["state"] in ("CREATING", "DELETING") and self._pending_on(name):
            raise ApiError(409, "Conflicting operation in progress", status="FAILED_PRECONDITION")
        instance["state"] = "DELETING"

        def done() -> JSON:
            self.redis_instances.pop(name, None)
            return {}

        def failed() -> None:
            instance["state"] = "READY"

        parent = name.rsplit("/instances/", 1)[0]
        return self._redis_json(self._lro("redis", "DELETE", parent, name, done, failed))

    # --- Cloud Run Admin v2 ------------------------------------------------------

    _RUN_SERVICE = "type.googleapis.com/google.cloud.run.v2.Service"

    def _run_json(self, op: _Operation) -> JSON:
        return self._lro_json(op, self._RUN_SERVICE, self._RUN_SERVICE)

    def _run_get(self, name: str) -> JSON:
        self._advance_target(name)
        service = self.run_services.get(name)
        if service is None:
            raise ApiError(404, f"Resource '{name}' was not found")
        return service

    def _run_rollout(self, service: JSON) -> tuple[Callable[[], JSON], Callable[[], None]]:
        def done() -> JSON:
            service_id = service["name"].rsplit("/", 1)[-1]
            revision = f"{service_id}-{service['generation']:05d}-{uuid.uuid4().hex[:3]}"
            service.update(
                reconciling=False,
                observedGeneration=service["generation"],
                latestCreatedRevision=f"{service['name']}/revisions/{revision}",
                latestReadyRevision=f"{service['name']}/revisions/{revision}",
                terminalCondition={
                    "type": "Ready",
                    "state": "CONDITION_SUCCEEDED",
                    "lastTransitionTime": _now(),
                },
            )
            digest = hashlib.sha256(service["name"].encode()).hexdigest()[:10]
            service["uri"] = f"https://{service_id}-{digest}-ew.a.run.app"
            return copy.deepcopy(service)

        def failed() -> None:
            service.update(
                reconciling=False,
                observedGeneration=service["generation"],
                terminalCondition={
                    "type": "Ready",
                    "state": "CONDITION_FAILED",
                    "reason": "CONTAINER_MISSING",
                    "message": "Revision failed to become ready",
                    "lastTransitionTime": _now(),
                },
            )

        return done, failed

    def run_create(self, parent: str, query: dict[str, str], body: JSON) -> JSON:
        service_id = query.get("serviceId", "")
        if not _RUN_ID.match(service_id):
            raise ApiError(400, "service_id must be 1-49 lowercase letters, digits or hyphens")
        containers = (body.get("template") or {}).get("containers") or []
        if not containers or not containers[0].get("image"):
            raise ApiError(400, "template.containers[0].image is required")
        name = f"{parent}/services/{service_id}"
        if name in self.run_services:
            raise ApiError(409, f"Resource '{name}' already exists")
        service: JSON = {
            **body,
            "name": name,
            "uid": str(uuid.uuid4()),
            "generation": 1,
            "createTime": _now(),
            "updateTime": _now(),
            "creator": "anonymous@example.com",
            "lastModifier": "anonymous@example.com",
            "launchStage": "GA",
            "reconciling": True,
            "terminalCondition": {"type": "Ready", "state": "CONDITION_PENDING"},
            "etag": uuid.uuid4().hex,
        }
        self.run_services[name] = service
        done, failed = self._run_rollout(service)
        return self._run_json(self._lro("run", "CREATE", parent, name, done, failed))

    def run_patch(self, name: str, body: JSON) -> JSON:
        service = self._run_get(name)
        keep: JSON = {
            k: service[k]
            for k in ("name", "uid", "createTime", "creator", "launchStage", "uri")
            if k in service
        }
        generation = int(service["generation"]) + 1
        service.clear()
        service.update(
            {
                **body,
                **keep,
                "generation": generation,
                "updateTime": _now(),
                "reconciling": True,
                "terminalCondition": {"type": "Ready", "state": "CONDITION_PENDING"},
                "etag": uuid.uuid4().hex,
            }
        )
        done, failed = self._run_rollout(service)
        parent = name.rsplit("/services/", 1)[0]
        return self._run_json(self._lro("run", "UPDATE", parent, name, done, failed))

    def run_delete(self, name: str) -> JSON:
        service = self._run_get(name)

        def done() -> JSON:
            gone = self.run_services.pop(name, None) or service
            return copy.deepcopy(gone)

        parent = name.rsplit("/services/", 1)[0]
        return self._run_json(self._lro("run", "DELETE", parent, name, done))

    # --- Cloud Storage JSON v1 -------------------------------------------------------

    def _bucket(self, name: str) -> JSON:
        bucket = self.buckets.get(name)
        if bucket is None:
            raise ApiError(404, "The specified bucket does not exist.")
        return bucket

    def bucket_insert(self, query: dict[str, str], body: JSON) -> JSON:
        name = str(body.get("name") or "")
        if not _BUCKET.match(name) or name.startswith("goog"):
            raise ApiError(400, "Invalid bucket name", reason="invalid")
        if not query.get("project"):
            raise ApiError(400, "Required parameter: project", reason="required")
        if name in self.buckets:
            raise ApiError(
                409,
                "Your previous request to create the named bucket succeeded and you already "
                "own it.",
                reason="conflict",
            )
        now = _now()
        bucket: JSON = {
            **body,
            "kind": "storage#bucket",
            "id": name,
            "name": name,
            "selfLink": f"{self.url}storage/v1/b/{name}",
            "projectNumber": str(
                int(hashlib.sha256(query["project"].encode()).hexdigest()[:10], 16)
            ),
            "timeCreated": now,
            "updated": now,
            "metageneration": "1",
            "location": str(body.get("location") or "US").upper(),
            "locationType": "region" if body.get("location") else "multi-region",
            "storageClass": body.get("storageClass") or "STANDARD",
            "etag": "CAE=",
            "_project": query["project"],
        }
        self.buckets[name] = bucket
        return bucket

    def bucket_patch(self, name: str, body: JSON) -> JSON:
        bucket = self._bucket(name)
        for key, value in body.items():
            if key == "labels" and isinstance(value, dict):
                labels = dict(bucket.get("labels") or {})
                for label, label_value in value.items():
                    if label_value is None:
                        labels.pop(label, None)
                    else:
                        labels[label] = label_value
                bucket["labels"] = labels
            elif value is None:
                bucket.pop(key, None)
            else:
                bucket[key] = value
        bucket["metageneration"] = str(int(bucket["metageneration"]) + 1)
        bucket["updated"] = _now()
        return bucket

    def bucket_delete(self, name: str) -> None:
        self._bucket(name)
        if any(self.objects.get(name, {}).values()):
            raise ApiError(409, "The bucket you tried to delete is not empty.", reason="conflict")
        self.buckets.pop(name)
        self.objects.pop(name, None)

    def objects_list(self, bucket: str, query: dict[str, str]) -> JSON:
        self._bucket(bucket)
        versions = query.get("versions", "").lower() == "true"
        limit = int(query.get("maxResults") or 1000)
        items: list[JSON] = []
        for name, generations in sorted(self.objects.get(bucket, {}).items()):
            for generation in generations if versions else generations[-1:]:
                items.append(
                    {
                        "kind": "storage#object",
                        "id": f"{bucket}/{name}/{generation}",
                        "name": name,
                        "bucket": bucket,
                        "generation": str(generation),
                        "metageneration": "1",
                        "size": "1",
                    }
                )
        return {"kind": "storage#objects", "items": items[:limit]}

    def object_delete(self, bucket: str, name: str, query: dict[str, str]) -> None:
        self._bucket(bucket)
        generations = self.objects.get(bucket, {}).get(name)
        if not generations:
            raise ApiError(404, f"No such object: {bucket}/{name}")
        if query.get("generation"):
            wanted = int(query["generation"])
            if wanted not in generations:
                raise ApiError(404, f"No such object: {bucket}/{name}")
            generations.remove(wanted)
        else:
            generations.pop()

    @staticmethod
    def bucket_json(bucket: JSON) -> JSON:
        return {k: v for k, v in bucket.items() if not k.startswith("_")}


# --- routing ------------------------------------------------------------------------

_Route = tuple[
    str, re.Pattern[str], Callable[[GcpEmulator, re.Match[str], dict[str, str], JSON], Any]
]

_P = r"(?P<p>[^/]+)"
_L = r"(?P<l>[^/]+)"
_N = r"(?P<n>[^/:]+)"


def _list(items_key: str, items: list[JSON], kind: str | None = None) -> JSON:
    body: JSON = {items_key: items} if items else {}
    if kind:
        body["kind"] = kind
    return body


def _sql_list(s: GcpEmulator, m: re.Match[str], q: dict[str, str], b: JSON) -> JSON:
    project = m["p"]
    for (p, name), _instance in list(s.sql_instances.items()):
        if p == project:
            s._advance_target(f"{p}/{name}")
    items = [i for (p, _), i in s.sql_instances.items() if p == project]
    return _list("items", items, "sql#instancesList")


def _sql_operations(s: GcpEmulator, m: re.Match[str], q: dict[str, str], b: JSON) -> JSON:
    target = f"{m['p']}/{q.get('instance', '')}"
    ops = [op for op in s.operations.values() if op.api == "sqladmin" and op.target == target]
    ops.sort(key=lambda op: op.created, reverse=True)
    return _list("items", [s._sql_operation_json(op) for op in ops], "sql#operationsList")


def _sql_users(s: GcpEmulator, m: re.Match[str], q: dict[str, str], b: JSON) -> JSON:
    s._sql_get(m["p"], m["n"])
    users = list(s.sql_users.get((m["p"], m["n"]), {}).values())
    return _list("items", users, "sql#usersList")


def _sql_backup_runs(s: GcpEmulator, m: re.Match[str], q: dict[str, str], b: JSON) -> JSON:
    s._sql_get(m["p"], m["n"])
    runs = list(reversed(s.sql_backup_runs.get((m["p"], m["n"]), [])))
    return _list("items", runs, "sql#backupRunsListResponse")


def _redis_list(s: GcpEmulator, m: re.Match[str], q: dict[str, str], b: JSON) -> JSON:
    prefix = f"projects/{m['p']}/locations/" + ("" if m["l"] == "-" else f"{m['l']}/")
    for name in list(s.redis_instances):
        if name.startswith(prefix):
            s._advance_target(name)
    items = [i for n, i in s.redis_instances.items() if n.startswith(prefix)]
    return _list("instances", items)


def _run_list(s: GcpEmulator, m: re.Match[str], q: dict[str, str], b: JSON) -> JSON:
    prefix = f"projects/{m['p']}/locations/{m['l']}/services/"
    for name in list(s.run_services):
        if name.startswith(prefix):
            s._advance_target(name)
    return _list("services", [v for n, v in s.run_services.items() if n.startswith(prefix)])


def _lro_list(s: GcpEmulator, m: re.Match[str], api: str) -> JSON:
    parent = f"projects/{m['p']}/locations/{m['l']}/operations/"
    ops = [op for n, op in s.operations.items() if op.api == api and n.startswith(parent)]
    render = s._redis_json if api == "redis" else s._run_json
    return _list("operations", [render(op) for op in ops])


def _buckets_list(s: GcpEmulator, m: re.Match[str], q: dict[str, str], b: JSON) -> JSON:
    prefix = q.get("prefix", "")
    items = [
        GcpEmulator.bucket_json(bucket)
        for name, bucket in sorted(s.buckets.items())
        if bucket.get("_project") == q.get("project") and name.startswith(prefix)
    ]
    return _list("items", items, "storage#buckets")


def _quota_metrics(s: GcpEmulator, m: re.Match[str], q: dict[str, str], b: JSON) -> JSON:
    return _list("metrics", s.quota_metrics.get((m["p"], m["svc"]), []))


def _routes() -> list[_Route]:
    sql = f"/v1/projects/{_P}"
    loc = f"/v1/projects/{_P}/locations/{_L}"
    run = f"/v2/projects/{_P}/locations/{_L}"
    table: list[tuple[str, str, Callable[..., Any]]] = [
        # SQL Admin v1
        ("POST", f"{sql}/instances", lambda s, m, q, b: s.sql_insert(m["p"], b)),
        ("GET", f"{sql}/instances", _sql_list),
        ("GET", f"{sql}/instances/{_N}", lambda s, m, q, b: s._sql_get(m["p"], m["n"])),
        ("PATCH", f"{sql}/instances/{_N}", lambda s, m, q, b: s.sql_patch(m["p"], m["n"], b)),
        ("DELETE", f"{sql}/instances/{_N}", lambda s, m, q, b: s.sql_delete(m["p"], m["n"], q)),
        ("GET", f"{sql}/instances/{_N}/users", _sql_users),
        (
            "POST",
            f"{sql}/instances/{_N}/users",
            lambda s, m, q, b: s.sql_users_insert(m["p"], m["n"], b),
        ),
        (
            "PUT",
            f"{sql}/instances/{_N}/users",
            lambda s, m, q, b: s.sql_users_update(m["p"], m["n"], q, b),
        ),
        ("GET", f"{sql}/instances/{_N}/backupRuns", _sql_backup_runs),
        (
            "POST",
            f"{sql}/instances/{_N}/backupRuns",
            lambda s, m, q, b: s.sql_backup_run(m["p"], m["n"], b),
        ),
        (
            "GET",
            f"{sql}/backups",
            lambda s, m, q, b: _list("backups", s.sql_backups.get(m["p"], [])),
        ),
        ("GET", f"{sql}/operations", _sql_operations),
        (
            "GET",
            f"{sql}/operations/{_N}",
            lambda s, m, q, b: s._sql_operation_json(s._operation(m["n"])),
        ),
        # Memorystore for Redis v1
        (
            "POST",
            f"{loc}/instances",
            lambda s, m, q, b: s.redis_create(f"projects/{m['p']}/locations/{m['l']}", q, b),
        ),
        ("GET", f"{loc}/instances", _redis_list),
        (
            "GET",
            f"{loc}/instances/{_N}",
            lambda s, m, q, b: s._redis_get(_name(m, "instances")),
        ),
        (
            "PATCH",
            f"{loc}/instances/{_N}",
            lambda s, m, q, b: s.redis_patch(_name(m, "instances"), q, b),
        ),
        (
            "DELETE",
            f"{loc}/instances/{_N}",
            lambda s, m, q, b: s.redis_delete(_name(m, "instances")),
        ),
        ("GET", f"{loc}/operations", lambda s, m, q, b: _lro_list(s, m, "redis")),
        (
            "GET",
            f"{loc}/operations/{_N}",
            lambda s, m, q, b: s._redis_json(s._operation(_name(m, "operations"))),
        ),
        # Cloud Run Admin v2
        (
            "POST",
            f"{run}/services",
            lambda s, m, q, b: s.run_create(f"projects/{m['p']}/locations/{m['l']}", q, b),
        ),
        ("GET", f"{run}/services", _run_list),
        ("GET", f"{run}/services/{_N}", lambda s, m, q, b: s._run_get(_name(m, "services"))),
        (
            "PATCH",
            f"{run}/services/{_N}",
            lambda s, m, q, b: s.run_patch(_name(m, "services"), b),
        ),
        (
            "DELETE",
            f"{run}/services/{_N}",
            lambda s, m, q, b: s.run_delete(_name(m, "services")),
        ),
        ("GET", f"{run}/operations", lambda s, m, q, b: _lro_list(s, m, "run")),
        (
            "GET",
            f"{run}/operations/{_N}",
            lambda s, m, q, b: s._run_json(s._operation(_name(m, "operations"))),
        ),
        # Cloud Storage JSON v1
        (
            "POST",
            "/storage/v1/b",
            lambda s, m, q, b: GcpEmulator.bucket_json(s.bucket_insert(q, b)),
        ),
        ("GET", "/storage/v1/b", _buckets_list),
        (
            "GET",
            f"/storage/v1/b/{_N}",
            lambda s, m, q, b: GcpEmulator.bucket_json(s._bucket(m["n"])),
        ),
        (
            "PATCH",
            f"/storage/v1/b/{_N}",
            lambda s, m, q, b: GcpEmulator.bucket_json(s.bucket_patch(m["n"], b)),
        ),
        ("DELETE", f"/storage/v1/b/{_N}", lambda s, m, q, b: s.bucket_delete(m["n"])),
        ("GET", f"/storage/v1/b/{_N}/o", lambda s, m, q, b: s.objects_list(m["n"], q)),
        (
            "DELETE",
            f"/storage/v1/b/{_N}/o/(?P<o>.+)",
            lambda s, m, q, b: s.object_delete(m["n"], unquote(m["o"]), q),
        ),
        # Service Usage v1beta1
        (
            "GET",
            f"/v1beta1/projects/{_P}/services/(?P<svc>[^/]+)/consumerQuotaMetrics",
            _quota_metrics,
        ),
    ]
    return [(method, re.compile(f"^{pattern}$"), handler) for method, pattern, handler in table]


def _name(m: re.Match[str], collection: str) -> str:
    return f"projects/{m['p']}/locations/{m['l']}/{collection}/{m['n']}"


_ROUTES = _routes()
#: Where the emulated credentials file sends its token refreshes.
TOKEN_PATH = "/token"  # noqa: S105 - a URL path, not a secret


class _Handler(JsonHandler):
    state: GcpEmulator

    def _handle(self) -> None:
        method = self.command
        url = urlsplit(self.path)
        path = unquote(url.path) if "/o/" not in url.path else url.path
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        raw = self.read_body()
        state = self.state
        with state.lock:
            state.requests.append((method, path))
        fault = state._take_fault(method, path)
        if fault is not None:
            if fault.status == 0:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)
                return
            error = ApiError(fault.status, fault.message, reason=fault.reason)
            self.send_json(fault.status, error.body())
            return
        if (method, path) == ("POST", TOKEN_PATH):
            # OAuth 2.0 token endpoint of the emulated ADC file (see start_gcp):
            # any refresh token buys a short-lived bearer token.
            self.send_json(
                200,
                {
                    "access_token": "emulated-access-token",
                    "expires_in": 3600,
                    "token_type": "Bearer",
                },
            )
            return
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            self.send_json(400, ApiError(400, "Invalid JSON payload received.").body())
            return
        for route_method, pattern, handler in _ROUTES:
            if route_method != method:
                continue
            match = pattern.match(path)
            if match is None:
                continue
            try:
                with state.lock:
                    result = handler(state, match, query, body)
                    data = None if result is None else json.loads(json.dumps(result))
            except ApiError as error:
                self.send_json(error.code, error.body())
                return
            self.send_json(204 if data is None else 200, data)
            return
        self.send_json(404, ApiError(404, f"No route for {method} {path}").body())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815


def start_gcp_emulator(
    *, host: str = "127.0.0.1", port: int = 0, operation_polls: int = 2
) -> GcpEmulator:
    """Start the stand-in on ``host:port`` (a free port by default); its base
    URL, ``.url``, is every admin API's endpoint. Stop it with ``.stop()``."""
    return GcpEmulator(operation_polls=operation_polls).start(host=host, port=port)


def start_gcp(state_dir: Path) -> EmulatedCloud:
    """:data:`kidp.emulator.EMULATORS` starter for GCP: this stand-in for the
    admin APIs, Application Default Credentials that work against it, and,
    when the Cloud CLI has its Pub/Sub emulator, the data plane of
    :mod:`kidp.gcp_platform_emulator` (the Pub/Sub job queue with Cloud Tasks
    for delays, Secret Manager for credentials) and Pub/Sub topics. Without
    it the broker keeps its jobs in its own store and offers no topics.
    Everything lives in memory and ends with ``stop``."""
    from kidp.emulator import EmulatedCloud
    from kidp.gcp_platform_emulator import start_gcp_platform
    from kidp.pubsub_emulator import find_launcher

    stops: list[Callable[[], None]] = []

    def stop() -> None:
        for each in reversed(stops):
            with contextlib.suppress(Exception):
                each()

    try:
        admin = start_gcp_emulator()
        stops.append(admin.stop)
        environ: dict[str, str | None] = {
            "GOOGLE_APPLICATION_CREDENTIALS": str(_write_adc(state_dir, admin.url))
        }
        settings: dict[str, Any] = {
            "cloud": "gcp",
            "gcp_api_endpoint": admin.url,
            "gcp_project": EMULATED_PROJECT,
            "gcp_topics": False,
        }
        if find_launcher() is not None:
            platform = start_gcp_platform(state_dir, project=EMULATED_PROJECT)
            stops.append(platform.stop)
            settings.update(platform.settings, gcp_topics=True)
            environ.update(platform.environ)
    except BaseException:
        stop()
        raise
    return EmulatedCloud(provider="gcp", settings=settings, environ=environ, stop=stop)


#: The project an emulated GCP broker runs in.
EMULATED_PROJECT = "kidp-emulated"


def _write_adc(state_dir: Path, token_host: str) -> Path:
    """Application Default Credentials: a service-account key file of a
    throwaway key whose token endpoint is the stand-in. The broker finds
    credentials the way it does with GOOGLE_APPLICATION_CREDENTIALS, and no
    token it gets is good anywhere else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    adc = state_dir / "application_default_credentials.json"
    fd = os.open(adc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {
                "type": "service_account",
                "project_id": EMULATED_PROJECT,
                "private_key_id": "emulated",
                "private_key": pem,
                "client_email": f"kidp-broker@{EMULATED_PROJECT}.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"{token_host}{TOKEN_PATH}",
            },
            handle,
        )
    return adc
