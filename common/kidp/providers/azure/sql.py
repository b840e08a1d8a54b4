"""Azure SQL Database: a logical server (global name, administrator login),
then the database in it, then its short-term backup retention.
"""

from __future__ import annotations

from typing import Any

from kidp.catalog import DEFAULT_PORTS, SIZES
from kidp.errors import QuotaExceeded
from kidp.models import CloudResource, Deployment, Phase, Size
from kidp.ports import Credentials, QuotaReport
from kidp.providers.azure.base import (
    Json,
    State,
    _DatabaseServer,
    _Found,
    _Request,
    arm_state,
    body_bytes,
    encryption_of,
    global_name,
    retention_days,
    size_name,
    size_of,
)

NAMESPACE = "Microsoft.Sql"

#: Preset -> vCore SKU (General Purpose, Gen5). Provisioned General Purpose
#: starts at 2 vCores, so ``small`` (1 vCPU) is the serverless 1-vCore SKU.
SQL_SKUS: dict[Size, Json] = {
    Size.SMALL: {"name": "GP_S_Gen5", "tier": "GeneralPurpose", "family": "Gen5", "capacity": 1},
    Size.MEDIUM: {"name": "GP_Gen5", "tier": "GeneralPurpose", "family": "Gen5", "capacity": 2},
    Size.LARGE: {"name": "GP_Gen5", "tier": "GeneralPurpose", "family": "Gen5", "capacity": 4},
    Size.XLARGE: {"name": "GP_Gen5", "tier": "GeneralPurpose", "family": "Gen5", "capacity": 8},
}
_SKU_KEYS = {size: (sku["name"], sku["capacity"]) for size, sku in SQL_SKUS.items()}
_GIB = 1024**3


class _SqlDatabase(_DatabaseServer):
    key = "sql"
    label = "Azure SQL database"
    service = "sql"
    arm_types = {"Microsoft.Sql/servers": 1, "Microsoft.Sql/servers/databases": 2}

    def name(self, deployment: Deployment) -> str:
        # Server names become <name>.database.windows.net: global, hence the id piece.
        return global_name(deployment)

    def database_name(self, deployment: Deployment) -> str:
        return deployment.resource_name

    # --- bodies ------------------------------------------------------------------

    def server_body(self, deployment: Deployment, tags: dict[str, str], username: str) -> Json:
        properties: Json = {
            "administratorLogin": username,
            "version": deployment.spec.version or "12.0",
            "publicNetworkAccess": "Disabled",
        }
        if encryption_of(deployment).in_transit:
            properties["minimalTlsVersion"] = "1.2"
        return {"location": self.p.region, "tags": tags, "properties": properties}

    def database_body(self, deployment: Deployment, tags: dict[str, str]) -> Json:
        size = size_of(deployment)
        storage = deployment.spec.storage_gb or SIZES[size].storage_gb
        ha = deployment.spec.high_availability
        properties: Json = {
            "maxSizeBytes": storage * _GIB,
            "zoneRedundant": ha,
            "requestedBackupStorageRedundancy": "Zone" if ha else "Local",
        }
        if SQL_SKUS[size]["name"] == "GP_S_Gen5":
            # Serverless pauses after an hour idle; half a vCore is its floor.
            properties.update(autoPauseDelay=60, minCapacity=0.5)
        return {
            "location": self.p.region,
            "tags": tags,
            "sku": dict(SQL_SKUS[size]),
            "properties": properties,
        }

    def policy_body(self, deployment: Deployment) -> Json:
        return {"properties": {"retentionDays": self.retention(deployment)}}

    def retention(self, deployment: Deployment) -> int:
        return retention_days(deployment, minimum=1, service=self.label)

    def requests(self, deployment: Deployment, tags: dict[str, str]) -> list[_Request]:
        server = self.name(deployment)
        database = self.database_name(deployment)
        server_path = self.arm_path(NAMESPACE, "servers", server)
        database_path = f"{server_path}/databases/{database}"
        return [
            _Request(
                "PUT",
                server_path,
                self.api_version,
                self.server_body(deployment, tags, self.password_policy(deployment).username),
                ("properties.administratorLoginPassword",),
            ),
            _Request("PUT", database_path, self.api_version, self.database_body(deployment, tags)),
            _Request(
                "PUT",
                f"{database_path}/backupShortTermRetentionPolicies/default",
                self.api_version,
                self.policy_body(deployment),
            ),
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "the database is created once the server is ready, and its backup retention "
            "once the database is (each step from a later status poll)",
            "Azure SQL encrypts at rest with TDE whatever is asked",
            "Snapshot keeps the server and database like Retain: deleting a server "
            "deletes its backups",
        ]

    def validate(self, deployment: Deployment) -> None:
        self.validate_retention(deployment, minimum=1)

    # --- operations ----------------------------------------------------------------

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        assert credentials is not None  # check_credentials ran first
        body = self.server_body(deployment, tags, credentials.username)
        body["properties"]["administratorLoginPassword"] = credentials.password
        self.begin(
            "servers.begin_create_or_update",
            self.name(deployment),
            body=body,
            secrets=(credentials.password,),
        )

    def find(self, deployment: Deployment, name: str | None = None) -> _Found | None:
        server_name = name or self.name(deployment)
        found = self.found("servers.get", server_name)
        if found is None:
            return None
        database = self.get(
            "databases.get", self.p.resource_group, server_name, self.database_name(deployment)
        )
        found.children["database"] = database
        found.children["policy"] = None
        if database is not None and arm_state(_Found("", "", database)) == "available":
            found.children["policy"] = self.get(
                "backup_short_term_retention_policies.get",
                self.p.resource_group,
                server_name,
                self.database_name(deployment),
                "default",
            )
        return found

    def advance(self, deployment: Deployment, found: _Found, tags: dict[str, str]) -> bool:
        if arm_state(found, ready=found.properties.get("state", "Ready") == "Ready") != (
            "available"
        ):
            return False
        database = found.children.get("database")
        if database is None:
            self.call(
                "databases.begin_create_or_update",
                self.p.resource_group,
                found.name,
                self.database_name(deployment),
                body_bytes(self.database_body(deployment, tags)),
                polling=False,
            )
            return True
        if self.database_state(database) != "available":
            return False
        policy = found.children.get("policy") or {}
        if (policy.get("properties") or {}).get("retentionDays") != self.retention(deployment):
            self.call(
                "backup_short_term_retention_policies.begin_create_or_update",
                self.p.resource_group,
                found.name,
                self.database_name(deployment),
                "default",
                body_bytes(self.policy_body(deployment)),
                polling=False,
            )
            return True
        return False

    def database_state(self, database: Json) -> State:
        status = (database.get("properties") or {}).get("status")
        return arm_state(_Found("", "", database), ready=status in (None, "Online"))

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        server_state = arm_state(found, ready=found.properties.get("state", "Ready") == "Ready")
        database = found.children.get("database")
        policy = found.children.get("policy")
        provisioning = deployment.phase in (Phase.PENDING, Phase.PROVISIONING)
        state: State
        if server_state != "available":
            state, what = server_state, f"server provisioningState {found.provisioning_state}"
        elif database is None:
            state = "creating" if provisioning else "missing"
            what = "server ready, database not created yet" if provisioning else "database gone"
        else:
            state = self.database_state(database)
            db_props = database.get("properties") or {}
            what = (
                f"database provisioningState {db_props.get('provisioningState', '')}, "
                f"status {db_props.get('status', '')}"
            ).strip(", ")
            wanted = self.retention(deployment)
            have = ((policy or {}).get("properties") or {}).get("retentionDays")
            if state == "available" and provisioning and have != wanted:
                state, what = "creating", "database ready, setting backup retention"
        actual: dict[str, Any] = {
            "engine": "sqlserver",
            "version": found.properties.get("version"),
            "encryptionAtRest": True,
        }
        usage: dict[str, Any] = {}
        if database is not None:
            db_props = database.get("properties") or {}
            sku = database.get("sku") or {}
            actual["size"] = size_name((sku.get("name"), sku.get("capacity")), _SKU_KEYS)
            actual["highAvailability"] = bool(db_props.get("zoneRedundant"))
            if db_props.get("maxSizeBytes"):
                actual["storageGb"] = int(db_props["maxSizeBytes"]) // _GIB
                usage["maxSizeGb"] = actual["storageGb"]
            if policy is not None:
                actual["backupRetentionDays"] = (policy.get("properties") or {}).get(
                    "retentionDays"
                )
        return CloudResource(
            cloud_resource_id=str((database or {}).get("id") or found.id),
            state=state,
            message=f"Azure SQL {what}",
            endpoint=found.properties.get("fullyQualifiedDomainName"),
            port=DEFAULT_PORTS["sqlserver"],
            actual_spec={k: v for k, v in actual.items() if v is not None},
            resource_usage=usage,
            tags=found.tags,
        )

    def tagged_ids(self, found: _Found) -> list[str]:
        database = found.children.get("database")
        return [found.id] + ([str(database["id"])] if database else [])

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if arm_state(found) == "deleting":
            return False
        # Deleting the server deletes its databases (and, with them, their backups).
        self.call("servers.begin_delete", self.p.resource_group, found.name, polling=False)
        return self.find(deployment, found.name) is None

    def quota(self, deployment: Deployment) -> QuotaReport:
        vcores = int(SQL_SKUS[size_of(deployment)]["capacity"])
        needs = {"ServerQuota": 1, "RegionalVCoreQuotaForSQLDBAndDW": vcores}
        usages = self.call("subscription_usages.list_by_location", self.p.region, paged=True)
        report: dict[str, Any] = {}
        for usage in usages:
            name = str(usage.get("name", ""))
            if name not in needs:
                continue
            props = usage.get("properties") or {}
            used, limit = int(props.get("currentValue") or 0), int(props.get("limit") or 0)
            report[name] = {"used": used, "max": limit, "requested": needs[name]}
            if used + needs[name] > limit:
                raise QuotaExceeded(
                    f"Azure SQL quota {name} in {self.p.region} would be exceeded: {used} used "
                    f"of {limit}, and this deployment needs {needs[name]} more",
                    details={"quota": name, "used": used, "max": limit, "requested": needs[name]},
                )
        return QuotaReport(
            checked=True,
            details={"source": "Microsoft.Sql/locations/usages", "quotas": report},
        )
