"""ElastiCache: Redis (Valkey) replication groups and Memcached clusters."""

from __future__ import annotations

import string
from collections.abc import Iterator
from typing import Any

from kidp.catalog import DEFAULT_PORTS
from kidp.errors import ProvisioningFailed
from kidp.models import (
    CloudResource,
    DeletionPolicy,
    Deployment,
    ResourceType,
)
from kidp.ports import Credentials, PasswordPolicy
from kidp.providers.aws.base import (
    _REDIS_ENGINE_FOR_VERSION,
    CACHE_NODE_TYPES,
    NAME_PREFIX,
    REDIS_AUTH_ALPHABET,
    _AlreadyExists,
    _cache_state,
    _Call,
    _encryption,
    _Found,
    _hashed_name,
    _Kind,
    _newest_matching,
    _retention_days,
    _size,
    _size_name,
    _tag_dict,
    _tag_list,
    final_snapshot_name,
)
from kidp.providers.aws.errors import Refused as _Refused


class _ElastiCacheBase(_Kind):
    service = "elasticache"
    resource_type = ResourceType.CACHE

    def name(self, deployment: Deployment) -> str:
        # Replication group ids are at most 40 characters (cluster ids 50).
        return _hashed_name(deployment, 40)

    def tags_of(self, arn: str) -> dict[str, str]:
        try:
            response = self.call(
                "list_tags_for_resource",
                expect=("CacheClusterNotFound", "ReplicationGroupNotFoundFault", "InvalidARN"),
                ResourceName=arn,
            )
        except _Refused:
            return {}
        return _tag_dict(response.get("TagList"))

    def placement(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.p.cache_subnet_group:
            params["CacheSubnetGroupName"] = self.p.cache_subnet_group
        if self.p.security_group_ids:
            params["SecurityGroupIds"] = list(self.p.security_group_ids)
        return params

    def retain(self, deployment: Deployment, found: _Found) -> None:
        self.call(
            "add_tags_to_resource", ResourceName=found.arn, Tags=_tag_list(self.retained_tags())
        )


class _RedisGroup(_ElastiCacheBase):
    """Redis as a replication group: the form that offers encryption, AUTH,
    automatic failover and snapshots."""

    key = "redis"
    label = "ElastiCache replication group"

    def engine(self, deployment: Deployment) -> str:
        return _REDIS_ENGINE_FOR_VERSION.get(deployment.spec.version or "", "redis")

    def uses_auth(self, deployment: Deployment) -> bool:
        return _encryption(deployment).in_transit

    def password_policy(self, deployment: Deployment) -> PasswordPolicy | None:
        if not self.uses_auth(deployment):
            return None
        return PasswordPolicy(length=32, alphabet=REDIS_AUTH_ALPHABET, username="default")

    def check_credentials(self, deployment: Deployment, credentials: Credentials | None) -> None:
        if credentials is None or not self.uses_auth(deployment):
            return
        token = credentials.password
        allowed = set(string.ascii_letters + string.digits + "!&#$^<>-")
        if not 16 <= len(token) <= 128 or any(c not in allowed for c in token):
            raise ProvisioningFailed(
                "the generated AUTH token does not meet ElastiCache rules "
                "(16-128 characters: letters, digits and !&#$^<>-)"
            )

    def params(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        spec = deployment.spec
        ha = spec.high_availability
        params: dict[str, Any] = {
            "ReplicationGroupId": self.name(deployment),
            "ReplicationGroupDescription": (
                f"KIDP {deployment.namespace}/{deployment.resource_name} ({deployment.id})"
            ),
            "Engine": self.engine(deployment),
            "CacheNodeType": CACHE_NODE_TYPES[_size(deployment)],
            "NumCacheClusters": 2 if ha else 1,
            "AutomaticFailoverEnabled": ha,
            "MultiAZEnabled": ha,
            "AtRestEncryptionEnabled": _encryption(deployment).at_rest,
            "TransitEncryptionEnabled": self.uses_auth(deployment),
            "SnapshotRetentionLimit": _retention_days(deployment, minimum=0),
            "Tags": _tag_list(tags),
            **self.placement(),
        }
        if spec.version:
            params["EngineVersion"] = spec.version
        return params

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        secret = ("AuthToken",) if self.uses_auth(deployment) else ()
        return [
            _Call("elasticache", "create_replication_group", self.params(deployment, tags), secret)
        ]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        params = self.params(deployment, tags)
        secrets: tuple[str, ...] = ()
        if credentials is not None and self.uses_auth(deployment):
            params["AuthToken"] = credentials.password
            secrets = (credentials.password,)
        try:
            self.call(
                "create_replication_group",
                expect=("ReplicationGroupAlreadyExists", "ReplicationGroupAlreadyExistsFault"),
                secrets=secrets,
                **params,
            )
        except _Refused:
            raise _AlreadyExists from None

    def find(self, deployment: Deployment) -> _Found | None:
        try:
            response = self.call(
                "describe_replication_groups",
                expect=("ReplicationGroupNotFoundFault", "ReplicationGroupNotFound"),
                ReplicationGroupId=self.name(deployment),
            )
        except _Refused:
            return None
        groups = response.get("ReplicationGroups", [])
        if not groups:
            return None
        group = groups[0]
        return _Found(
            name=group["ReplicationGroupId"],
            arn=group["ARN"],
            status=group.get("Status", ""),
            tags=self.tags_of(group["ARN"]),
            raw=group,
        )

    def engine_version(self, group: dict[str, Any]) -> str | None:
        # Replication groups do not report their version; their clusters do.
        for member in group.get("MemberClusters", []):
            try:
                response = self.call(
                    "describe_cache_clusters",
                    expect=("CacheClusterNotFound", "CacheClusterNotFoundFault"),
                    CacheClusterId=member,
                )
            except _Refused:
                continue
            for cluster in response.get("CacheClusters", []):
                if cluster.get("EngineVersion"):
                    return str(cluster["EngineVersion"])
        return None

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        raw = found.raw
        endpoint: dict[str, Any] = raw.get("ConfigurationEndpoint") or {}
        if not endpoint:
            for group in raw.get("NodeGroups", []):
                endpoint = group.get("PrimaryEndpoint") or {}
                if endpoint:
                    break
        actual: dict[str, Any] = {
            "engine": "redis",
            "version": self.engine_version(raw),
            "size": _size_name(raw.get("CacheNodeType", ""), CACHE_NODE_TYPES),
            "highAvailability": raw.get("MultiAZ") == "enabled"
            or raw.get("AutomaticFailover") in ("enabled", "enabling"),
            "encryptionAtRest": bool(raw.get("AtRestEncryptionEnabled")),
            "backupRetentionDays": raw.get("SnapshotRetentionLimit"),
        }
        return CloudResource(
            cloud_resource_id=found.arn,
            state=_cache_state(found.status),
            message=f"ElastiCache status: {found.status}",
            endpoint=endpoint.get("Address"),
            port=endpoint.get("Port") or DEFAULT_PORTS["redis"],
            actual_spec={k: v for k, v in actual.items() if v is not None},
            resource_usage={"nodes": len(raw.get("MemberClusters", []))},
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if found.status == "deleting":
            return False
        params: dict[str, Any] = {"ReplicationGroupId": found.name, "RetainPrimaryCluster": False}
        if deployment.deletion_policy is DeletionPolicy.SNAPSHOT:
            params["FinalSnapshotIdentifier"] = final_snapshot_name(deployment)
        try:
            self.call(
                "delete_replication_group",
                expect=(
                    "ReplicationGroupNotFoundFault",
                    "InvalidReplicationGroupState",
                    "InvalidReplicationGroupStateFault",
                ),
                **params,
            )
        except _Refused as refused:
            # Not found: already gone; invalid state: busy, try again next poll.
            return refused.code.startswith("ReplicationGroupNotFound")
        return self.find(deployment) is None

    def rotate(self, deployment: Deployment, found: _Found, credentials: Credentials) -> None:
        if not found.raw.get("AuthTokenEnabled") and not self.uses_auth(deployment):
            raise ProvisioningFailed("this Redis has no AUTH token (in-transit encryption is off)")
        # ROTATE keeps the previous token valid next to the new one, so clients
        # that have not re-read the secret yet keep working.
        self.call(
            "modify_replication_group",
            secrets=(credentials.password,),
            ReplicationGroupId=found.name,
            AuthToken=credentials.password,
            AuthTokenUpdateStrategy="ROTATE",
            ApplyImmediately=True,
        )

    def untagged_candidates(self) -> Iterator[tuple[str, str, ResourceType]]:
        marker = ""
        while True:
            page = self.call(
                "describe_replication_groups", **({"Marker": marker} if marker else {})
            )
            for group in page.get("ReplicationGroups", []):
                if group["ReplicationGroupId"].startswith(NAME_PREFIX):
                    yield group["ARN"], group["ReplicationGroupId"], self.resource_type
            marker = page.get("Marker") or ""
            if not marker:
                return


class _MemcachedCluster(_ElastiCacheBase):
    key = "memcached"
    label = "ElastiCache cluster"

    def params(
        self, deployment: Deployment, tags: dict[str, str], version: str | None
    ) -> dict[str, Any]:
        ha = deployment.spec.high_availability
        params: dict[str, Any] = {
            "CacheClusterId": self.name(deployment),
            "Engine": "memcached",
            "CacheNodeType": CACHE_NODE_TYPES[_size(deployment)],
            "NumCacheNodes": 2 if ha else 1,
            "AZMode": "cross-az" if ha else "single-az",
            "Tags": _tag_list(tags),
            **self.placement(),
        }
        if version:
            params["EngineVersion"] = version
        return params

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        return [
            _Call(
                "elasticache",
                "create_cache_cluster",
                self.params(deployment, tags, deployment.spec.version),
            )
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "EngineVersion is resolved at deploy time to the newest Memcached "
            f"{deployment.spec.version}.x; Memcached has no snapshots, so the "
            "Snapshot deletion policy deletes like Delete"
        ]

    def resolve_version(self, deployment: Deployment) -> str | None:
        wanted = deployment.spec.version
        if not wanted:
            return None
        page = self.p.optional_call(
            "elasticache", "cache", "describe_cache_engine_versions", Engine="memcached"
        )
        if page is None:
            return wanted
        versions = [v["EngineVersion"] for v in page.get("CacheEngineVersions", [])]
        resolved = _newest_matching(versions, wanted)
        if resolved is None:
            raise ProvisioningFailed(f"ElastiCache offers no Memcached {wanted} in {self.p.region}")
        return resolved

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        params = self.params(deployment, tags, self.resolve_version(deployment))
        try:
            self.call(
                "create_cache_cluster",
                expect=("CacheClusterAlreadyExists", "CacheClusterAlreadyExistsFault"),
                **params,
            )
        except _Refused:
            raise _AlreadyExists from None

    def find(self, deployment: Deployment) -> _Found | None:
        try:
            response = self.call(
                "describe_cache_clusters",
                expect=("CacheClusterNotFound", "CacheClusterNotFoundFault"),
                CacheClusterId=self.name(deployment),
                ShowCacheNodeInfo=True,
            )
        except _Refused:
            return None
        clusters = [
            c for c in response.get("CacheClusters", []) if c.get("CacheClusterStatus") != "deleted"
        ]
        if not clusters:
            return None
        cluster = clusters[0]
        return _Found(
            name=cluster["CacheClusterId"],
            arn=cluster["ARN"],
            status=cluster.get("CacheClusterStatus", ""),
            tags=self.tags_of(cluster["ARN"]),
            raw=cluster,
        )

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        raw = found.raw
        endpoint = raw.get("ConfigurationEndpoint") or {}
        nodes = int(raw.get("NumCacheNodes") or 0)
        actual: dict[str, Any] = {
            "engine": "memcached",
            "version": raw.get("EngineVersion"),
            "size": _size_name(raw.get("CacheNodeType", ""), CACHE_NODE_TYPES),
            "highAvailability": nodes > 1,
        }
        return CloudResource(
            cloud_resource_id=found.arn,
            state=_cache_state(found.status),
            message=f"ElastiCache status: {found.status}",
            endpoint=endpoint.get("Address"),
            port=endpoint.get("Port") or DEFAULT_PORTS["memcached"],
            actual_spec={k: v for k, v in actual.items() if v is not None},
            resource_usage={"nodes": nodes},
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if found.status == "deleting":
            return False
        try:
            self.call(
                "delete_cache_cluster",
                expect=(
                    "CacheClusterNotFound",
                    "CacheClusterNotFoundFault",
                    "InvalidCacheClusterState",
                    "InvalidCacheClusterStateFault",
                ),
                CacheClusterId=found.name,
            )
        except _Refused as refused:
            return refused.code.startswith("CacheClusterNotFound")
        return self.find(deployment) is None

    def untagged_candidates(self) -> Iterator[tuple[str, str, ResourceType]]:
        marker = ""
        while True:
            page = self.call("describe_cache_clusters", **({"Marker": marker} if marker else {}))
            for cluster in page.get("CacheClusters", []):
                # Members of a replication group are judged with their group.
                if cluster.get("ReplicationGroupId"):
                    continue
                if cluster["CacheClusterId"].startswith(NAME_PREFIX):
                    yield cluster["ARN"], cluster["CacheClusterId"], self.resource_type
            marker = page.get("Marker") or ""
            if not marker:
                return
