"""Aurora: a DB cluster and its member instances (the high-availability
database).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kidp.catalog import DEFAULT_PORTS
from kidp.errors import ProvisioningFailed
from kidp.models import (
    CloudResource,
    Deployment,
    ResourceType,
)
from kidp.ports import Credentials, QuotaReport
from kidp.providers.aws.base import (
    _AURORA_ENGINES,
    AURORA_CLASSES,
    NAME_PREFIX,
    State,
    _AlreadyExists,
    _Call,
    _encryption,
    _Found,
    _hashed_name,
    _newest_matching,
    _rds_state,
    _retention_days,
    _size,
    _size_name,
    _tag_dict,
    _tag_list,
    _version_key,
)
from kidp.providers.aws.errors import Refused as _Refused
from kidp.providers.aws.rds import _RdsBase


class _AuroraCluster(_RdsBase):
    """Aurora for highAvailability: a cluster with a writer and a reader in
    another AZ, so a failover promotes a running replica (about 30 s) instead
    of building a new instance (about 10 min)."""

    key = "aurora"
    label = "Aurora DB cluster"
    members = 2

    def name(self, deployment: Deployment) -> str:
        # Leaves room for the member suffix within RDS's 63 characters.
        return _hashed_name(deployment, 60)

    def member_names(self, deployment: Deployment) -> list[str]:
        cluster = self.name(deployment)
        return [f"{cluster}-{n}" for n in range(1, self.members + 1)]

    def engine(self, deployment: Deployment) -> str:
        return _AURORA_ENGINES[deployment.spec.engine or ""]

    def cluster_params(
        self, deployment: Deployment, tags: dict[str, str], username: str, version: str | None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "DBClusterIdentifier": self.name(deployment),
            "Engine": self.engine(deployment),
            "MasterUsername": username,
            "StorageEncrypted": _encryption(deployment).at_rest,
            # Aurora cannot turn automated backups off; one day is its minimum.
            "BackupRetentionPeriod": _retention_days(deployment, minimum=1),
            "DeletionProtection": False,
            "CopyTagsToSnapshot": True,
            "Tags": _tag_list(tags),
            **self.placement(),
        }
        if version:
            params["EngineVersion"] = version
        return params

    def instance_params(
        self, deployment: Deployment, tags: dict[str, str], member: str
    ) -> dict[str, Any]:
        return {
            "DBInstanceIdentifier": member,
            "DBClusterIdentifier": self.name(deployment),
            "Engine": self.engine(deployment),
            "DBInstanceClass": AURORA_CLASSES[_size(deployment)],
            "PubliclyAccessible": False,
            "Tags": _tag_list(tags),
        }

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        username = self.password_policy(deployment).username
        calls = [
            _Call(
                "rds",
                "create_db_cluster",
                self.cluster_params(deployment, tags, username, deployment.spec.version),
                ("MasterUserPassword",),
            )
        ]
        calls += [
            _Call("rds", "create_db_instance", self.instance_params(deployment, tags, member))
            for member in self.member_names(deployment)
        ]
        return calls

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "EngineVersion is resolved at deploy time to the newest Aurora version "
            f"matching {deployment.spec.version}"
        ]

    def resolve_version(self, deployment: Deployment) -> str | None:
        wanted = deployment.spec.version
        if not wanted:
            return None
        engine = self.engine(deployment)
        versions: list[str] = []
        marker = ""
        while True:
            page = self.p.optional_call(
                "rds",
                "database",
                "describe_db_engine_versions",
                Engine=engine,
                **({"Marker": marker} if marker else {}),
            )
            if page is None:
                # The endpoint cannot list versions; let it judge the one asked for.
                return wanted
            versions += [v["EngineVersion"] for v in page.get("DBEngineVersions", [])]
            marker = page.get("Marker") or ""
            if not marker:
                break
        resolved = _newest_matching(versions, wanted)
        if resolved is None:
            raise ProvisioningFailed(
                f"{engine} offers no version {wanted} in {self.p.region}; "
                f"available: {', '.join(sorted(set(versions), key=_version_key)) or 'none'}"
            )
        return resolved

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        assert credentials is not None  # check_credentials ran first
        version = self.resolve_version(deployment)
        params = self.cluster_params(deployment, tags, credentials.username, version)
        try:
            self.call(
                "create_db_cluster",
                expect=("DBClusterAlreadyExistsFault", "DBClusterAlreadyExists"),
                secrets=(credentials.password,),
                MasterUserPassword=credentials.password,
                **params,
            )
        except _Refused:
            raise _AlreadyExists from None

    def converge(
        self,
        deployment: Deployment,
        found: _Found,
        tags: dict[str, str],
        credentials: Credentials | None,
    ) -> bool:
        present = {m["DBInstanceIdentifier"] for m in found.members}
        changed = False
        for member in self.member_names(deployment):
            if member in present:
                continue
            try:
                self.call(
                    "create_db_instance",
                    expect=("DBInstanceAlreadyExists", "DBInstanceAlreadyExistsFault"),
                    **self.instance_params(deployment, tags, member),
                )
            except _Refused:
                other = self.describe_instance(member)
                if other is not None and other.get("DBClusterIdentifier") != found.name:
                    raise ProvisioningFailed(
                        f"RDS DB instance '{member}' already exists outside cluster "
                        f"'{found.name}'; delete or rename it"
                    ) from None
            changed = True
        return changed

    def find(self, deployment: Deployment) -> _Found | None:
        identifier = self.name(deployment)
        try:
            response = self.call(
                "describe_db_clusters",
                expect=("DBClusterNotFoundFault", "DBClusterNotFound"),
                DBClusterIdentifier=identifier,
            )
        except _Refused:
            return None
        clusters = response.get("DBClusters", [])
        if not clusters:
            return None
        cluster = clusters[0]
        members = list(
            self._paginate(
                "describe_db_instances",
                "DBInstances",
                Filters=[{"Name": "db-cluster-id", "Values": [identifier]}],
            )
        )
        return _Found(
            name=identifier,
            arn=cluster["DBClusterArn"],
            status=cluster.get("Status", ""),
            tags=_tag_dict(cluster.get("TagList")),
            raw=cluster,
            members=members,
        )

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        raw = found.raw
        cluster_state = _rds_state(found.status)
        member_states = [_rds_state(m.get("DBInstanceStatus", "")) for m in found.members]
        states = [cluster_state, *member_states]
        state: State
        if "failed" in states:
            state = "failed"
        elif cluster_state == "deleting":
            state = "deleting"
        elif all(s == "available" for s in states) and len(found.members) >= self.members:
            state = "available"
        elif "creating" in states or len(found.members) < self.members:
            state = "creating"
        else:
            state = "modifying"
        writer = next(
            (m for m in found.raw.get("DBClusterMembers", []) if m.get("IsClusterWriter")), None
        )
        writer_id = writer["DBInstanceIdentifier"] if writer else None
        classes = [
            m.get("DBInstanceClass", "")
            for m in found.members
            if writer_id is None or m["DBInstanceIdentifier"] == writer_id
        ]
        actual: dict[str, Any] = {
            "engine": self.catalog_engine(raw.get("Engine", "")),
            "version": raw.get("EngineVersion"),
            "highAvailability": len(found.members) >= 2,
            "backupRetentionDays": raw.get("BackupRetentionPeriod"),
            "encryptionAtRest": bool(raw.get("StorageEncrypted")),
        }
        if classes:
            actual["size"] = _size_name(classes[0], AURORA_CLASSES)
        statuses = ", ".join(
            f"{m['DBInstanceIdentifier']}={m.get('DBInstanceStatus')}" for m in found.members
        )
        return CloudResource(
            cloud_resource_id=found.arn,
            state=state,
            message=f"Aurora cluster status: {found.status}; instances: {statuses or 'none'}",
            endpoint=raw.get("Endpoint"),
            port=raw.get("Port") or DEFAULT_PORTS.get(deployment.spec.engine or ""),
            actual_spec={k: v for k, v in actual.items() if v is not None},
            resource_usage={"instances": len(found.members)},
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        # A cluster can only be deleted once it has no instances; members are
        # removed without snapshots (the data lives in the cluster volume).
        remaining = False
        for member in found.members:
            remaining = True
            if member.get("DBInstanceStatus") == "deleting":
                continue
            try:
                self.call(
                    "delete_db_instance",
                    expect=(
                        "DBInstanceNotFound",
                        "DBInstanceNotFoundFault",
                        "InvalidDBInstanceState",
                    ),
                    DBInstanceIdentifier=member["DBInstanceIdentifier"],
                    SkipFinalSnapshot=True,
                )
            except _Refused:
                continue
        if remaining:
            refreshed = self.find(deployment)
            if refreshed is None:
                return True
            if refreshed.members:
                return False
            found = refreshed
        return self.delete_keeping_backups_by_policy(
            deployment,
            found,
            operation="delete_db_cluster",
            identifier="DBClusterIdentifier",
            gone=("DBClusterNotFoundFault",),
            busy=("InvalidDBClusterStateFault",),
            snapshot_exists=("DBClusterSnapshotAlreadyExistsFault",),
        )

    def retain(self, deployment: Deployment, found: _Found) -> None:
        retained = self.retained_tags()
        self.tag(found.arn, retained)
        for member in found.members:
            self.tag(member["DBInstanceArn"], retained)

    def rotate(self, deployment: Deployment, found: _Found, credentials: Credentials) -> None:
        self.call(
            "modify_db_cluster",
            secrets=(credentials.password,),
            DBClusterIdentifier=found.name,
            MasterUserPassword=credentials.password,
            ApplyImmediately=True,
        )

    def quota(self, deployment: Deployment) -> QuotaReport:
        return self.check_quotas(deployment, {"DBClusters": 1, "DBInstances": self.members})

    def untagged_candidates(self) -> Iterator[tuple[str, str, ResourceType]]:
        for cluster in self._paginate("describe_db_clusters", "DBClusters"):
            if cluster["DBClusterIdentifier"].startswith(NAME_PREFIX):
                yield cluster["DBClusterArn"], cluster["DBClusterIdentifier"], self.resource_type
