"""Cloud SQL for PostgreSQL and MySQL, through the SQL Admin API v1.

The API is called with ``googleapiclient``'s discovery client built from the
discovery document the library ships (no discovery request at run time, so
it works offline and against the stand-in): the request and response bodies
are the REST API's own JSON, which is also what ``plan()`` shows. Creation
returns an operation at once; later polls read the instance (and, while it
is being created or has failed, its latest operation) again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kidp.catalog import DEFAULT_PORTS, SIZES
from kidp.errors import ProvisioningFailed
from kidp.models import BackupSpec, CloudResource, DeletionPolicy, Deployment, ResourceType
from kidp.ports import Credentials, PasswordPolicy
from kidp.providers.gcp.base import (
    MAX_SQL_BACKUPS,
    SQL_TIERS,
    SQL_VERSIONS,
    QuotaRule,
    State,
    _Found,
    _Kind,
    _Refused,
    _Request,
    encryption_of,
    piece_name,
    size_name,
    size_of,
)

#: Cloud SQL refuses disks under 10 GB.
_MIN_STORAGE_GB = 10
#: The edition of every instance: the one whose machine types are the
#: ``db-custom-*`` tiers of :data:`SQL_TIERS`, for every version offered.
SQL_EDITION = "ENTERPRISE"

_STATES: dict[str, State] = {
    "RUNNABLE": "available",
    "PENDING_CREATE": "creating",
    "PENDING_DELETE": "deleting",
    "FAILED": "failed",
}


class _CloudSqlInstance(_Kind):
    key = "cloudsql"
    label = "Cloud SQL instance"
    api = "sqladmin"
    resource_type = ResourceType.DATABASE
    has_final_backup = True
    # Google documents Cloud SQL's default as 1000 instances per project.
    quota_rule = QuotaRule(
        service="sqladmin.googleapis.com",
        metric="sqladmin.googleapis.com/instances",
        default_limit=1000,
        unit="instances",
        per_region=False,
    )

    def name(self, deployment: Deployment) -> str:
        # A deleted instance's name stays taken for a week: a name per
        # deployment lets the same resource be provisioned again at once.
        return piece_name(deployment, 63)

    @property
    def sql(self) -> Any:
        return self.client

    def resource_id(self, name: str) -> str:
        return f"projects/{self.p.project}/instances/{name}"

    # --- the request -----------------------------------------------------------

    def body(self, deployment: Deployment, labels: dict[str, str]) -> dict[str, Any]:
        spec = deployment.spec
        engine = spec.engine or ""
        version = SQL_VERSIONS.get((engine, spec.version or ""))
        if version is None:
            raise ProvisioningFailed(
                f"Cloud SQL does not offer {engine} {spec.version}; supported: "
                + ", ".join(f"{e} {v}" for e, v in SQL_VERSIONS)
            )
        size = size_of(deployment)
        storage = spec.storage_gb or SIZES[size].storage_gb
        if storage < _MIN_STORAGE_GB:
            raise ProvisioningFailed(
                f"Cloud SQL needs at least {_MIN_STORAGE_GB} GB of storage; {storage} requested"
            )
        backup = spec.backup or BackupSpec()
        if backup.enabled and backup.retention_days > MAX_SQL_BACKUPS:
            raise ProvisioningFailed(
                f"Cloud SQL keeps at most {MAX_SQL_BACKUPS} automated backups; "
                f"{backup.retention_days} days requested"
            )
        backups: dict[str, Any] = {"enabled": backup.enabled}
        if backup.enabled:
            # One automated backup a day: keeping N of them is N days.
            backups["backupRetentionSettings"] = {
                "retentionUnit": "COUNT",
                "retainedBackups": backup.retention_days,
            }
            backups["startTime"] = "03:00"
            # Regional (HA) instances need point-in-time recovery (PostgreSQL)
            # or binary logs (MySQL); both make restores finer anyway.
            if engine == "mysql":
                backups["binaryLogEnabled"] = True
            else:
                backups["pointInTimeRecoveryEnabled"] = True
        elif spec.high_availability:
            raise ProvisioningFailed("Cloud SQL high availability needs backups enabled")
        ip: dict[str, Any] = {
            "sslMode": (
                "ENCRYPTED_ONLY"
                if encryption_of(deployment).in_transit
                else "ALLOW_UNENCRYPTED_AND_ENCRYPTED"
            )
        }
        if self.p.network:
            ip.update(ipv4Enabled=False, privateNetwork=self.p.network)
        else:
            # A public IP with no authorized networks: reachable only through the
            # Cloud SQL connectors, which authenticate with IAM.
            ip["ipv4Enabled"] = True
        body: dict[str, Any] = {
            "name": self.name(deployment),
            "databaseVersion": version,
            "region": self.p.region,
            "settings": {
                # Named, never left to Cloud SQL: PostgreSQL 16+ and MySQL 8.4
                # default to Enterprise Plus, which refuses db-custom-* tiers.
                "edition": SQL_EDITION,
                "tier": SQL_TIERS[size],
                "availabilityType": "REGIONAL" if spec.high_availability else "ZONAL",
                "dataDiskSizeGb": str(storage),
                "dataDiskType": "PD_SSD",
                "storageAutoResize": False,
                "deletionProtectionEnabled": False,
                "backupConfiguration": backups,
                "ipConfiguration": ip,
                "userLabels": labels,
            },
        }
        if self.p.kms_key:
            body["diskEncryptionConfiguration"] = {"kmsKeyName": self.p.kms_key}
        return body

    def plan(self, deployment: Deployment, labels: dict[str, str]) -> list[_Request]:
        return [
            _Request(
                "POST",
                f"{self.endpoint}/v1/projects/{self.p.project}/instances",
                self.body(deployment, labels),
                ("rootPassword",),
            )
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        user = self.password_policy(deployment).username
        return [
            "Cloud SQL always encrypts data at rest (Google-managed keys, or the "
            "configured KMS key)",
            f"the credentials are those of the built-in '{user}' user (rootPassword)",
            "instance names cannot be reused for a week after deletion, so the name "
            "carries a piece of the deployment id",
            "Snapshot deletion keeps a final backup (instances.delete enableFinalBackup)",
        ]

    # --- credentials -------------------------------------------------------------

    def password_policy(self, deployment: Deployment) -> PasswordPolicy:
        # The engine's built-in administrator: it exists as soon as the
        # instance does, so the password can travel with the create request.
        username = "root" if deployment.spec.engine == "mysql" else "postgres"
        return PasswordPolicy(length=32, username=username)

    def check_credentials(self, deployment: Deployment, credentials: Credentials | None) -> None:
        if credentials is None:
            raise ProvisioningFailed("a database needs credentials for its administrator")
        if credentials.username != self.password_policy(deployment).username:
            raise ProvisioningFailed(
                f"Cloud SQL's administrator is '{self.password_policy(deployment).username}'"
            )

    def _user_host(self, deployment: Deployment) -> dict[str, str]:
        # MySQL users are name@host; the built-in root is root@'%'.
        return {"host": "%"} if deployment.spec.engine == "mysql" else {}

    def rotate(self, deployment: Deployment, found: _Found, credentials: Credentials) -> None:
        self.call(
            "users.update",
            lambda: self.p.execute(
                self.sql.users().update(
                    project=self.p.project,
                    instance=found.name,
                    name=credentials.username,
                    body={"name": credentials.username, "password": credentials.password},
                    **self._user_host(deployment),
                )
            ),
            secrets=(credentials.password,),
        )

    # --- the resource ---------------------------------------------------------------

    def create(
        self, deployment: Deployment, labels: dict[str, str], credentials: Credentials | None
    ) -> None:
        assert credentials is not None  # check_credentials ran first
        body = {**self.body(deployment, labels), "rootPassword": credentials.password}
        self.start_create(
            "instances.insert",
            lambda: self.p.execute(self.sql.instances().insert(project=self.p.project, body=body)),
            secrets=(credentials.password,),
        )

    def _read(self, name: str) -> dict[str, Any] | None:
        instance: dict[str, Any] | None = self.read(
            "instances.get",
            lambda: self.p.execute(self.sql.instances().get(project=self.p.project, instance=name)),
        )
        return instance

    def _found(self, instance: dict[str, Any]) -> _Found:
        return _Found(
            name=instance["name"],
            resource_id=self.resource_id(instance["name"]),
            state=str(instance.get("state", "")),
            labels=dict((instance.get("settings") or {}).get("userLabels") or {}),
            raw=instance,
        )

    def find(self, deployment: Deployment) -> _Found | None:
        instance = self._read(self.name(deployment))
        return None if instance is None else self._found(instance)

    def latest_operation(self, name: str) -> dict[str, Any] | None:
        """The instance's most recent operation (the API lists newest first)."""
        page = self.call(
            "operations.list",
            lambda: self.p.execute(
                self.sql.operations().list(project=self.p.project, instance=name, maxResults=1)
            ),
        )
        items = page.get("items") or []
        return items[0] if items else None

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        raw = found.raw
        settings = raw.get("settings") or {}
        state: State = _STATES.get(found.state, "modifying")
        message = f"Cloud SQL state: {found.state}"
        progress: int | None = None
        if found.state in ("PENDING_CREATE", "FAILED"):
            op = self.latest_operation(found.name)
            if op is not None:
                errors = (op.get("error") or {}).get("errors") or []
                if errors:
                    first = errors[0]
                    state = "failed"
                    message = (
                        f"Cloud SQL operation {op.get('operationType', '')} failed: "
                        f"{first.get('code', '')}: {first.get('message', '')}"
                    )
                elif found.state == "PENDING_CREATE":
                    progress = {"PENDING": 20, "RUNNING": 60}.get(str(op.get("status")), 80)
                    message = f"Cloud SQL state: PENDING_CREATE (operation {op.get('status')})"
        engine, version = _catalog_version(raw)
        backups = settings.get("backupConfiguration") or {}
        retention = (backups.get("backupRetentionSettings") or {}).get("retainedBackups")
        actual: dict[str, Any] = {
            "engine": engine,
            "version": version,
            "size": size_name(settings.get("tier"), SQL_TIERS),
            "highAvailability": settings.get("availabilityType") == "REGIONAL",
            "storageGb": int(settings["dataDiskSizeGb"])
            if settings.get("dataDiskSizeGb")
            else None,
            "backupRetentionDays": int(retention) if backups.get("enabled") and retention else None,
            # Cloud SQL has no unencrypted storage.
            "encryptionAtRest": True,
        }
        addresses = {a.get("type"): a.get("ipAddress") for a in raw.get("ipAddresses") or []}
        endpoint = addresses.get("PRIVATE") or addresses.get("PRIMARY")
        return CloudResource(
            cloud_resource_id=found.resource_id,
            state=state,
            message=message,
            endpoint=endpoint,
            port=DEFAULT_PORTS.get(engine) if endpoint else None,
            actual_spec={k: v for k, v in actual.items() if v is not None},
            resource_usage={
                "storageGb": actual.get("storageGb"),
                "connectionName": raw.get("connectionName"),
            },
            tags=found.labels,
            progress=progress,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if found.state == "PENDING_DELETE":
            return False
        params: dict[str, Any] = {"project": self.p.project, "instance": found.name}
        if deployment.deletion_policy is DeletionPolicy.SNAPSHOT:
            backup = deployment.spec.backup or BackupSpec()
            params.update(
                enableFinalBackup=True,
                finalBackupTtlDays=str(max(backup.retention_days, 1)),
                finalBackupDescription=f"kidp final backup of {deployment.id}",
            )
        try:
            self.call(
                "instances.delete",
                lambda: self.p.execute(self.sql.instances().delete(**params)),
                expect=(404, 409),
            )
        except _Refused as refused:
            # 409: another operation (the create) is still running: next poll.
            return refused.status == 404
        return self._read(found.name) is None

    def relabel(self, found: _Found, labels: dict[str, str]) -> None:
        self.call(
            "instances.patch",
            lambda: self.p.execute(
                self.sql.instances().patch(
                    project=self.p.project,
                    instance=found.name,
                    body={"settings": {"userLabels": labels}},
                )
            ),
        )

    def list_all(self) -> Iterator[tuple[str, str, dict[str, str]]]:
        for instance in self._instances():
            found = self._found(instance)
            yield found.resource_id, found.name, found.labels

    def _instances(self) -> Iterator[dict[str, Any]]:
        token = ""
        while True:
            params: dict[str, Any] = {"project": self.p.project, "maxResults": 500}
            if token:
                params["pageToken"] = token
            page = self.call(
                "instances.list",
                lambda params=params: self.p.execute(self.sql.instances().list(**params)),
            )
            yield from page.get("items") or []
            token = page.get("nextPageToken") or ""
            if not token:
                return

    def usage(self, deployment: Deployment) -> tuple[int, int]:
        return sum(1 for _ in self._instances()), 1


def _catalog_version(instance: dict[str, Any]) -> tuple[str, str | None]:
    """(catalogue engine, version) from ``POSTGRES_15`` / ``MYSQL_8_0``; the
    installed minor (``POSTGRES_15_4`` -> ``15.4``) when the API says it."""
    version = str(instance.get("databaseVersion") or "")
    installed = str(instance.get("databaseInstalledVersion") or "")
    engine = "mysql" if version.startswith("MYSQL") else "postgresql"
    wanted = next((v for (e, v), api in SQL_VERSIONS.items() if api == version), None)
    if wanted is None:
        return engine, version or None
    if installed.startswith(f"{version}_"):
        return engine, f"{wanted}.{installed.removeprefix(f'{version}_')}"
    return engine, wanted
