"""Azure Database for PostgreSQL and for MySQL, flexible servers: one server
per deployment (global name), zone-redundant when highly available.
"""

from __future__ import annotations

from typing import Any, ClassVar

from kidp.catalog import DEFAULT_PORTS, SIZES
from kidp.errors import ProvisioningFailed, QuotaExceeded, ValidationFailed
from kidp.models import CloudResource, Deployment, Size
from kidp.ports import Credentials, QuotaReport
from kidp.providers.azure.base import (
    Json,
    _DatabaseServer,
    _Found,
    _Request,
    arm_state,
    global_name,
    retention_days,
    size_name,
    size_of,
)

#: Burstable for the two small presets (1/2 and 2/4 vCPU/GiB, exactly the
#: catalogue's), General Purpose from ``large`` on (Azure's nearest: 2/8, 4/16).
_BURSTABLE = "Burstable"
_GENERAL = "GeneralPurpose"


class _FlexibleServer(_DatabaseServer):
    engine: ClassVar[str]
    namespace: ClassVar[str]
    create_operation: ClassVar[str]
    skus: ClassVar[dict[Size, tuple[str, str]]]
    #: Catalogue version -> the version ARM takes.
    versions: ClassVar[dict[str, str]] = {}
    min_backup_days: ClassVar[int]

    def name(self, deployment: Deployment) -> str:
        # Server names become <name>.<engine>.database.azure.com: global.
        return global_name(deployment)

    def storage(self, deployment: Deployment) -> int:
        return deployment.spec.storage_gb or SIZES[size_of(deployment)].storage_gb

    def arm_storage(self, deployment: Deployment) -> int:
        """The size Azure is asked for (PostgreSQL only sells fixed tiers)."""
        return self.storage(deployment)

    def reported_storage(self, deployment: Deployment, actual: int) -> int:
        return actual

    def arm_version(self, deployment: Deployment) -> str:
        version = deployment.spec.version or ""
        return self.versions.get(version, version)

    def body(self, deployment: Deployment, tags: dict[str, str], username: str) -> Json:
        sku_name, tier = self.skus[size_of(deployment)]
        ha = deployment.spec.high_availability
        if ha and tier == _BURSTABLE:
            raise ProvisioningFailed(self.burstable_ha_message(deployment))
        return {
            "location": self.p.region,
            "tags": tags,
            "sku": {"name": sku_name, "tier": tier},
            "properties": {
                "administratorLogin": username,
                "version": self.arm_version(deployment),
                "createMode": "Create",
                "storage": {"storageSizeGB": self.arm_storage(deployment), "autoGrow": "Disabled"},
                "backup": {
                    "backupRetentionDays": retention_days(
                        deployment, minimum=self.min_backup_days, service=self.label
                    ),
                    "geoRedundantBackup": "Disabled",
                },
                "highAvailability": {"mode": "ZoneRedundant" if ha else "Disabled"},
                "network": {"publicNetworkAccess": "Disabled"},
            },
        }

    def burstable_ha_message(self, deployment: Deployment) -> str:
        return (
            f"zone-redundant high availability needs General Purpose compute, which the "
            f"'{size_of(deployment).value}' size is not on Azure {self.label}s; "
            "choose size large or xlarge, or turn highAvailability off"
        )

    def validate(self, deployment: Deployment) -> None:
        if deployment.spec.high_availability and self.skus[size_of(deployment)][1] == _BURSTABLE:
            raise ValidationFailed(self.burstable_ha_message(deployment))
        self.validate_retention(deployment, minimum=self.min_backup_days)

    def requests(self, deployment: Deployment, tags: dict[str, str]) -> list[_Request]:
        body = self.body(deployment, tags, self.password_policy(deployment).username)
        return [
            _Request(
                "PUT",
                self.arm_path(self.namespace, "flexibleServers", self.name(deployment)),
                self.api_version,
                body,
                ("properties.administratorLoginPassword",),
            )
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "Azure encrypts flexible servers at rest whatever is asked; backups cannot be "
            f"turned off ({self.min_backup_days} days is the least)",
            "Snapshot keeps the server like Retain: deleting a server deletes its backups",
        ]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        assert credentials is not None  # check_credentials ran first
        body = self.body(deployment, tags, credentials.username)
        body["properties"]["administratorLoginPassword"] = credentials.password
        self.begin(
            self.create_operation,
            self.name(deployment),
            body=body,
            secrets=(credentials.password,),
        )

    def find(self, deployment: Deployment, name: str | None = None) -> _Found | None:
        return self.found("servers.get", name or self.name(deployment))

    def actual_version(self, props: Json) -> Any:
        return props.get("version")

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        props = found.properties
        server_state = str(props.get("state") or "")
        state = arm_state(found, ready=server_state in ("", "Ready"))
        if state == "modifying" and not found.provisioning_state and server_state == "Provisioning":
            state = "creating"
        sku = found.raw.get("sku") or {}
        storage = (props.get("storage") or {}).get("storageSizeGB")
        actual: dict[str, Any] = {
            "engine": self.engine,
            "version": self.actual_version(props),
            "size": size_name((sku.get("name"), sku.get("tier")), self.skus),
            "highAvailability": (props.get("highAvailability") or {}).get("mode", "Disabled")
            != "Disabled",
            "storageGb": self.reported_storage(deployment, int(storage)) if storage else None,
            "backupRetentionDays": (props.get("backup") or {}).get("backupRetentionDays"),
            # Flexible servers are always encrypted at rest.
            "encryptionAtRest": True,
        }
        return CloudResource(
            cloud_resource_id=found.id,
            state=state,
            message=(
                f"{self.label} provisioningState {found.provisioning_state or '-'}, "
                f"state {server_state or '-'}"
            ),
            endpoint=props.get("fullyQualifiedDomainName"),
            port=DEFAULT_PORTS[self.engine],
            actual_spec={k: v for k, v in actual.items() if v is not None},
            resource_usage={"storageGb": storage} if storage else {},
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if arm_state(found) == "deleting" or found.properties.get("state") == "Dropping":
            return False
        self.call("servers.begin_delete", self.p.resource_group, found.name, polling=False)
        return self.find(deployment, found.name) is None


#: PostgreSQL flexible server storage tiers (GiB): a request is rounded up to one.
POSTGRES_STORAGE_TIERS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
#: vCore quota family and vCores of each PostgreSQL SKU the presets use.
POSTGRES_FAMILIES = {
    "Standard_B1ms": ("standardBSFamily", 1),
    "Standard_B2s": ("standardBSFamily", 2),
    "Standard_D2ds_v5": ("standardDDSv5Family", 2),
    "Standard_D4ds_v5": ("standardDDSv5Family", 4),
}


class _PostgresFlexible(_FlexibleServer):
    key = "postgresql"
    label = "Azure PostgreSQL flexible server"
    service = "postgresql"
    engine = "postgresql"
    namespace = "Microsoft.DBforPostgreSQL"
    create_operation = "servers.begin_create_or_update"
    arm_types = {"Microsoft.DBforPostgreSQL/flexibleServers": 1}
    skus = {
        Size.SMALL: ("Standard_B1ms", _BURSTABLE),
        Size.MEDIUM: ("Standard_B2s", _BURSTABLE),
        Size.LARGE: ("Standard_D2ds_v5", _GENERAL),
        Size.XLARGE: ("Standard_D4ds_v5", _GENERAL),
    }
    min_backup_days = 7

    def arm_storage(self, deployment: Deployment) -> int:
        wanted = self.storage(deployment)
        for tier in POSTGRES_STORAGE_TIERS:
            if tier >= wanted:
                return tier
        raise ProvisioningFailed(
            f"Azure PostgreSQL stores at most {POSTGRES_STORAGE_TIERS[-1]} GiB; {wanted} requested"
        )

    def reported_storage(self, deployment: Deployment, actual: int) -> int:
        # The tier a request was rounded up to is what was asked for, not drift.
        return self.storage(deployment) if actual == self.arm_storage(deployment) else actual

    def actual_version(self, props: Json) -> Any:
        major, minor = props.get("version"), props.get("minorVersion")
        return f"{major}.{minor}" if major and minor else major

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            *super().notes(deployment),
            f"storage is sold in tiers: {self.storage(deployment)} GiB is provisioned as "
            f"{self.arm_storage(deployment)} GiB",
        ]

    def validate(self, deployment: Deployment) -> None:
        super().validate(deployment)
        try:
            self.arm_storage(deployment)
        except ProvisioningFailed as exc:
            raise ValidationFailed(exc.message) from None

    def quota(self, deployment: Deployment) -> QuotaReport:
        sku_name = self.skus[size_of(deployment)][0]
        family, cores = POSTGRES_FAMILIES[sku_name]
        needed = cores * (2 if deployment.spec.high_availability else 1)
        usages = self.call("quota_usages.list", self.p.region, paged=True)
        for usage in usages:
            if (usage.get("name") or {}).get("value") != family:
                continue
            used, limit = int(usage.get("currentValue") or 0), int(usage.get("limit") or 0)
            if used + needed > limit:
                raise QuotaExceeded(
                    f"Azure PostgreSQL vCore quota {family} in {self.p.region} would be "
                    f"exceeded: {used} used of {limit}, and this deployment needs {needed} more",
                    details={"quota": family, "used": used, "max": limit, "requested": needed},
                )
            return QuotaReport(
                checked=True,
                details={
                    "source": "Microsoft.DBforPostgreSQL/locations/resourceType/flexibleServers"
                    "/usages",
                    "quotas": {family: {"used": used, "max": limit, "requested": needed}},
                },
            )
        return QuotaReport(
            checked=False,
            details={"reason": f"Azure lists no quota for the {family} vCores in {self.p.region}"},
        )


class _MysqlFlexible(_FlexibleServer):
    key = "mysql"
    label = "Azure MySQL flexible server"
    service = "mysql"
    engine = "mysql"
    namespace = "Microsoft.DBforMySQL"
    create_operation = "servers.begin_create"
    arm_types = {"Microsoft.DBforMySQL/flexibleServers": 1}
    skus = {
        Size.SMALL: ("Standard_B1ms", _BURSTABLE),
        Size.MEDIUM: ("Standard_B2s", _BURSTABLE),
        Size.LARGE: ("Standard_D2ads_v5", _GENERAL),
        Size.XLARGE: ("Standard_D4ads_v5", _GENERAL),
    }
    # ARM names MySQL 8.0 by the minor version the service started from.
    versions = {"8.0": "8.0.21"}
    min_backup_days = 1
    storage_range = (20, 16384)

    def arm_storage(self, deployment: Deployment) -> int:
        wanted = self.storage(deployment)
        low, high = self.storage_range
        if not low <= wanted <= high:
            raise ProvisioningFailed(f"Azure MySQL stores {low} to {high} GiB; {wanted} requested")
        return wanted

    def validate(self, deployment: Deployment) -> None:
        super().validate(deployment)
        try:
            self.arm_storage(deployment)
        except ProvisioningFailed as exc:
            raise ValidationFailed(exc.message) from None

    def actual_version(self, props: Json) -> Any:
        version = props.get("fullVersion") or props.get("version")
        return "8.0" if version == "8.0.21" else version
