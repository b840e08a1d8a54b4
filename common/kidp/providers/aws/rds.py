"""RDS: what DB instances and Aurora clusters share (:class:`_RdsBase`:
credentials, placement, account quotas), and single DB instances.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from kidp.catalog import DEFAULT_PORTS, SIZES
from kidp.errors import ProvisioningFailed, QuotaExceeded
from kidp.models import (
    CloudResource,
    DeletionPolicy,
    Deployment,
    ResourceType,
)
from kidp.ports import Credentials, PasswordPolicy, QuotaReport
from kidp.providers.aws.base import (
    _CATALOG_ENGINE,
    _RDS_ENGINES,
    _RDS_MIN_STORAGE_GB,
    NAME_PREFIX,
    RDS_CLASSES,
    RDS_DEFAULT_QUOTAS,
    RDS_FORBIDDEN_PASSWORD_CHARS,
    RDS_PASSWORD_ALPHABET,
    _AlreadyExists,
    _Call,
    _encryption,
    _Found,
    _hashed_name,
    _Kind,
    _rds_state,
    _retention_days,
    _size,
    _size_name,
    _tag_dict,
    _tag_list,
    final_snapshot_name,
)
from kidp.providers.aws.errors import Refused as _Refused


class _RdsBase(_Kind):
    service = "rds"
    resource_type = ResourceType.DATABASE

    def delete_keeping_backups_by_policy(
        self,
        deployment: Deployment,
        found: _Found,
        *,
        operation: str,
        identifier: str,
        gone: tuple[str, ...],
        busy: tuple[str, ...],
        snapshot_exists: tuple[str, ...],
    ) -> bool:
        """Delete an RDS instance or cluster as the deletion policy says:
        Snapshot takes a final snapshot and keeps the automated backups (they
        expire on their own), Delete removes both. True once it is gone."""
        if found.status == "deleting":
            return False
        policy = deployment.deletion_policy
        params: dict[str, Any] = {
            identifier: found.name,
            "SkipFinalSnapshot": policy is not DeletionPolicy.SNAPSHOT,
            "DeleteAutomatedBackups": policy is DeletionPolicy.DELETE,
        }
        if policy is DeletionPolicy.SNAPSHOT:
            params["FinalDBSnapshotIdentifier"] = final_snapshot_name(deployment)
        for _ in range(2):
            try:
                self.call(operation, expect=gone + busy + snapshot_exists, **params)
                break
            except _Refused as refused:
                if refused.code in gone:
                    return True
                if refused.code in busy:
                    return False  # creating, backing up, modifying: next poll
                # This deployment's final snapshot exists from an earlier attempt:
                # the data is kept there, so finish without another.
                params.update(SkipFinalSnapshot=True)
                params.pop("FinalDBSnapshotIdentifier", None)
        return self.find(deployment) is None

    def password_policy(self, deployment: Deployment) -> PasswordPolicy:
        return PasswordPolicy(length=32, alphabet=RDS_PASSWORD_ALPHABET, username="kidpadmin")

    def check_credentials(self, deployment: Deployment, credentials: Credentials | None) -> None:
        if credentials is None:
            raise ProvisioningFailed("a database needs credentials for its master user")
        password = credentials.password
        # MySQL (and Aurora MySQL) master passwords stop at 41 characters.
        longest = 41 if deployment.spec.engine == "mysql" else 128
        bad = any(
            c in RDS_FORBIDDEN_PASSWORD_CHARS or not (c.isascii() and c.isprintable())
            for c in password
        )
        if bad or not 8 <= len(password) <= longest:
            raise ProvisioningFailed(
                "the generated master password does not meet RDS rules "
                f"(8-{longest} printable ASCII characters without '/', '@', '\"' or space)"
            )

    def catalog_engine(self, engine: str) -> str:
        return _CATALOG_ENGINE.get(engine, engine)

    def placement(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.p.db_subnet_group:
            params["DBSubnetGroupName"] = self.p.db_subnet_group
        if self.p.security_group_ids:
            params["VpcSecurityGroupIds"] = list(self.p.security_group_ids)
        return params

    def describe_instance(self, identifier: str) -> dict[str, Any] | None:
        try:
            response = self.call(
                "describe_db_instances",
                expect=("DBInstanceNotFound", "DBInstanceNotFoundFault"),
                DBInstanceIdentifier=identifier,
            )
        except _Refused:
            return None
        instances = response.get("DBInstances", [])
        return instances[0] if instances else None

    def account_quotas(self) -> tuple[dict[str, tuple[int, int]], str]:
        """RDS quotas as name -> (used, max), and where they came from: read from
        the provider's cache (kept for ``quota_ttl`` seconds and refreshed in the
        background), because the accept path must not wait for three RDS calls."""
        cached = self.p.rds_quotas
        return cached.get() if cached is not None else self.fetch_account_quotas()

    def fetch_account_quotas(self) -> tuple[dict[str, tuple[int, int]], str]:
        """RDS quotas as name -> (used, max), and where they came from, asked of RDS now."""
        response = self.p.optional_call("rds", "database", "describe_account_attributes")
        if response is not None:
            return {
                q["AccountQuotaName"]: (int(q["Used"]), int(q["Max"]))
                for q in response.get("AccountQuotas", [])
            }, "rds:DescribeAccountAttributes"
        # Count what exists ourselves against AWS's documented defaults.
        instances = list(self._paginate("describe_db_instances", "DBInstances"))
        clusters = list(self._paginate("describe_db_clusters", "DBClusters"))
        storage = sum(
            int(i.get("AllocatedStorage") or 0)
            for i in instances
            if not i.get("DBClusterIdentifier")
        )
        used = {
            "DBInstances": len(instances),
            "DBClusters": len(clusters),
            "AllocatedStorage": storage,
        }
        return {name: (used[name], limit) for name, limit in RDS_DEFAULT_QUOTAS.items()}, "defaults"

    def _paginate(self, operation: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
        marker = ""
        while True:
            page = self.call(operation, **params, **({"Marker": marker} if marker else {}))
            yield from page.get(key, [])
            marker = page.get("Marker") or ""
            if not marker:
                return

    def check_quotas(self, deployment: Deployment, needs: dict[str, int]) -> QuotaReport:
        quotas, source = self.account_quotas()
        report: dict[str, Any] = {}
        for name, extra in needs.items():
            if name not in quotas:
                continue
            used, limit = quotas[name]
            report[name] = {"used": used, "max": limit, "requested": extra}
            if used + extra > limit:
                unit = " GiB" if name == "AllocatedStorage" else ""
                raise QuotaExceeded(
                    f"RDS quota {name} would be exceeded: {used}{unit} used of {limit}{unit} "
                    f"allowed, and this deployment needs {extra}{unit} more",
                    details={"quota": name, "used": used, "max": limit, "requested": extra},
                )
        details: dict[str, Any] = {
            "source": source,
            "quotas": report,
            "maxAgeSeconds": self.p.quota_ttl,
        }
        if source == "defaults":
            details["note"] = (
                "DescribeAccountAttributes is not available on this endpoint; usage was "
                "counted from the account's DB instances and clusters against AWS's "
                "documented default quotas"
            )
        return QuotaReport(checked=True, details=details)

    def untagged_candidates(self) -> Iterator[tuple[str, str, ResourceType]]:
        for instance in self._paginate("describe_db_instances", "DBInstances"):
            if instance["DBInstanceIdentifier"].startswith(NAME_PREFIX):
                yield (
                    instance["DBInstanceArn"],
                    instance["DBInstanceIdentifier"],
                    self.resource_type,
                )

    def tag(self, arn: str, tags: Mapping[str, str]) -> None:
        self.call("add_tags_to_resource", ResourceName=arn, Tags=_tag_list(tags))


class _RdsInstance(_RdsBase):
    key = "rds"
    label = "RDS DB instance"

    def name(self, deployment: Deployment) -> str:
        return _hashed_name(deployment, 63)

    def params(self, deployment: Deployment, tags: dict[str, str], username: str) -> dict[str, Any]:
        spec = deployment.spec
        size = _size(deployment)
        storage = spec.storage_gb or SIZES[size].storage_gb
        if storage < _RDS_MIN_STORAGE_GB:
            raise ProvisioningFailed(
                f"RDS needs at least {_RDS_MIN_STORAGE_GB} GiB of storage; {storage} requested"
            )
        params: dict[str, Any] = {
            "DBInstanceIdentifier": self.name(deployment),
            "Engine": _RDS_ENGINES[spec.engine or ""],
            "DBInstanceClass": RDS_CLASSES[size],
            "AllocatedStorage": storage,
            "StorageType": "gp3",
            "MasterUsername": username,
            # High availability is served by Aurora; a plain instance is single-AZ.
            "MultiAZ": False,
            "StorageEncrypted": _encryption(deployment).at_rest,
            "BackupRetentionPeriod": _retention_days(deployment, minimum=0),
            "DeletionProtection": False,
            "CopyTagsToSnapshot": True,
            "PubliclyAccessible": False,
            "Tags": _tag_list(tags),
            **self.placement(),
        }
        if spec.version:
            params["EngineVersion"] = spec.version
        return params

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        username = self.password_policy(deployment).username
        return [
            _Call(
                "rds",
                "create_db_instance",
                self.params(deployment, tags, username),
                ("MasterUserPassword",),
            )
        ]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        assert credentials is not None  # check_credentials ran first
        params = self.params(deployment, tags, credentials.username)
        try:
            self.call(
                "create_db_instance",
                expect=("DBInstanceAlreadyExists", "DBInstanceAlreadyExistsFault"),
                secrets=(credentials.password,),
                MasterUserPassword=credentials.password,
                **params,
            )
        except _Refused:
            raise _AlreadyExists from None

    def find(self, deployment: Deployment) -> _Found | None:
        instance = self.describe_instance(self.name(deployment))
        if instance is None:
            return None
        return _Found(
            name=instance["DBInstanceIdentifier"],
            arn=instance["DBInstanceArn"],
            status=instance.get("DBInstanceStatus", ""),
            tags=_tag_dict(instance.get("TagList")),
            raw=instance,
        )

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        raw = found.raw
        endpoint = raw.get("Endpoint") or {}
        actual = {
            "engine": self.catalog_engine(raw.get("Engine", "")),
            "version": raw.get("EngineVersion"),
            "size": _size_name(raw.get("DBInstanceClass", ""), RDS_CLASSES),
            "highAvailability": bool(raw.get("MultiAZ")),
            "storageGb": raw.get("AllocatedStorage"),
            "backupRetentionDays": raw.get("BackupRetentionPeriod"),
            "encryptionAtRest": bool(raw.get("StorageEncrypted")),
        }
        return CloudResource(
            cloud_resource_id=found.arn,
            state=_rds_state(found.status),
            message=f"RDS status: {found.status}",
            endpoint=endpoint.get("Address"),
            port=endpoint.get("Port") or DEFAULT_PORTS.get(deployment.spec.engine or ""),
            actual_spec={k: v for k, v in actual.items() if v is not None},
            resource_usage={"allocatedStorageGb": raw.get("AllocatedStorage")},
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        return self.delete_keeping_backups_by_policy(
            deployment,
            found,
            operation="delete_db_instance",
            identifier="DBInstanceIdentifier",
            gone=("DBInstanceNotFound", "DBInstanceNotFoundFault"),
            busy=("InvalidDBInstanceState", "InvalidDBInstanceStateFault"),
            snapshot_exists=("DBSnapshotAlreadyExists", "DBSnapshotAlreadyExistsFault"),
        )

    def retain(self, deployment: Deployment, found: _Found) -> None:
        self.tag(found.arn, self.retained_tags())

    def rotate(self, deployment: Deployment, found: _Found, credentials: Credentials) -> None:
        self.call(
            "modify_db_instance",
            secrets=(credentials.password,),
            DBInstanceIdentifier=found.name,
            MasterUserPassword=credentials.password,
            ApplyImmediately=True,
        )

    def quota(self, deployment: Deployment) -> QuotaReport:
        storage = deployment.spec.storage_gb or SIZES[_size(deployment)].storage_gb
        return self.check_quotas(deployment, {"DBInstances": 1, "AllocatedStorage": storage})
