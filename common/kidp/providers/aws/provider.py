"""The AWS provider: RDS and Aurora, ElastiCache, MSK topics, S3 and ECS on Fargate.

Everything goes through the AWS SDK (botocore). The provider keeps no state of its own: a
resource is found again from a deterministic identifier (namespace and
resource name, plus a piece of the deployment id for globally named S3
buckets) and is only ever treated as ours when it carries this deployment's
``deployment-id`` tag. That single rule makes every operation idempotent:
``deploy`` adopts what it finds instead of creating a second resource, a
create that loses a race (or whose response was lost and retried) re-reads
the winner, and ``delete`` never touches a resource that belongs to someone
else.

Errors leave in the broker's two kinds: throttling, server faults and
connection problems are :class:`~kidp.errors.CloudUnavailable` (temporary,
with ``retry_after``); anything the cloud refuses on its merits is
:class:`~kidp.errors.ProvisioningFailed` (or ``QuotaExceeded`` for limit
errors). Messages carry the service, the operation and AWS's error code,
with any credential in play masked out, and never the request parameters.

One object serves one region; clients are created lazily, once, and shared
between threads (clients are thread-safe, sessions are not, hence the lock
around their creation).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import string
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.parsers import ResponseParserError

from kidp import tags as tagging
from kidp.catalog import DEFAULT_PORTS, ENGINES, SIZES
from kidp.errors import BrokerError, CloudUnavailable, ProvisioningFailed, QuotaExceeded
from kidp.models import (
    BackupSpec,
    CloudResource,
    DeletionPolicy,
    Deployment,
    EncryptionSpec,
    ManagedResource,
    ResourceType,
    Size,
)
from kidp.ports import Credentials, PasswordPolicy, QuotaReport
from kidp.providers.aws.clients import new_client
from kidp.providers.aws.errors import SERVER_CODES as _SERVER_CODES
from kidp.providers.aws.errors import THROTTLING_CODES
from kidp.providers.aws.errors import Refused as _Refused
from kidp.providers.aws.errors import error_code as _error_code
from kidp.providers.aws.errors import http_status as _http_status
from kidp.providers.aws.errors import redact as _redact
from kidp.providers.ownership import deployment_tags

if TYPE_CHECKING:
    from boto3.session import Session

logger = logging.getLogger(__name__)

PROVIDER_NAME = "aws"
NAME_PREFIX = "kidp-"

State = Literal["creating", "available", "failed", "deleting", "missing", "modifying"]

# --- sizes -----------------------------------------------------------------
# Preset -> instance class. The catalogue's presets are 1/2, 2/4, 4/8 and
# 8/16 (vCPU/GiB); database and cache classes are matched on memory, which is
# what those engines run out of first. x86 classes are used because every
# catalogued engine version (including MySQL 5.7 and PostgreSQL 12) runs on
# them. Aurora has no class below 4 GiB and no general-purpose m-classes, so
# its presets are the nearest classes Aurora offers at or above the preset.
RDS_CLASSES: dict[Size, str] = {
    Size.SMALL: "db.t3.small",
    Size.MEDIUM: "db.t3.medium",
    Size.LARGE: "db.m5.large",
    Size.XLARGE: "db.m5.xlarge",
}
AURORA_CLASSES: dict[Size, str] = {
    Size.SMALL: "db.t3.medium",
    Size.MEDIUM: "db.t3.large",
    Size.LARGE: "db.r5.large",
    Size.XLARGE: "db.r5.xlarge",
}
CACHE_NODE_TYPES: dict[Size, str] = {
    Size.SMALL: "cache.t3.small",
    Size.MEDIUM: "cache.t3.medium",
    Size.LARGE: "cache.m5.large",
    Size.XLARGE: "cache.m5.xlarge",
}
#: Fargate task size in CPU units and MiB: exactly the catalogue's presets.
FARGATE_SIZES: dict[Size, tuple[str, str]] = {
    size: (str(int(preset.cpu * 1024)), str(preset.memory_gib * 1024))
    for size, preset in SIZES.items()
}

# --- engines ---------------------------------------------------------------
_RDS_ENGINES = {"postgresql": "postgres", "mysql": "mysql"}
_AURORA_ENGINES = {"postgresql": "aurora-postgresql", "mysql": "aurora-mysql"}
_CATALOG_ENGINE = {
    "postgres": "postgresql",
    "aurora-postgresql": "postgresql",
    "mysql": "mysql",
    "aurora-mysql": "mysql",
    "redis": "redis",
    "valkey": "redis",
    "memcached": "memcached",
}
# ElastiCache's Redis OSS line ends at 7.1; its 7.2 is Valkey 7.2, which speaks
# the same protocol, so a request for Redis 7.2 is served by Valkey.
_REDIS_ENGINE_FOR_VERSION = {"7.2": "valkey"}

# RDS limits that a request can exceed before any call is made.
_RDS_MIN_STORAGE_GB = 20
_MAX_BACKUP_DAYS = 35

#: Characters RDS refuses in a master password (besides non-printables).
RDS_FORBIDDEN_PASSWORD_CHARS = frozenset('/@" ')
#: Safe in RDS passwords and in connection URLs without escaping.
RDS_PASSWORD_ALPHABET = string.ascii_letters + string.digits + "-_.~"
#: ElastiCache AUTH tokens allow alphanumerics and only ``!&#$^<>-`` as specials.
REDIS_AUTH_ALPHABET = string.ascii_letters + string.digits + "-"

#: AWS's documented default RDS quotas, used only when the account's real ones
#: cannot be read (an emulator without ``DescribeAccountAttributes``).
RDS_DEFAULT_QUOTAS = {"DBInstances": 40, "DBClusters": 40, "AllocatedStorage": 100_000}

# --- error classification (the shared part is in aws_errors) ----------------
_QUOTA_CODES = frozenset(
    {
        "InstanceQuotaExceeded",
        "StorageQuotaExceeded",
        "DBClusterQuotaExceededFault",
        "DBClusterQuotaExceeded",
        "NodeQuotaForCustomerExceeded",
        "NodeQuotaForClusterExceeded",
        "ClusterQuotaForCustomerExceeded",
        "TooManyBuckets",
        "ServiceQuotaExceededException",
        "LimitExceededException",
    }
)
#: Stands for an answer that is not an AWS API response at all (an HTML error
#: page): what an emulator server sends for an operation it does not model.
NOT_AN_API_ANSWER = "NotAnApiAnswer"
#: How an endpoint says it does not implement an operation at all.
_UNAVAILABLE_CODES = (
    "InvalidAction",
    "NotImplemented",
    "UnknownOperationException",
    NOT_AN_API_ANSWER,
)


class _AlreadyExists(Exception):
    """A create lost to a resource of the same name (a race, or a retried create)."""


@dataclass(frozen=True)
class _Call:
    """One API call as ``plan()`` shows it (never with a password in it)."""

    service: str
    operation: str
    parameters: dict[str, Any]
    secret_parameters: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "service": self.service,
            "operation": self.operation,
            "parameters": self.parameters,
        }
        if self.secret_parameters:
            described["secretParameters"] = list(self.secret_parameters)
        return described


@dataclass
class _Found:
    """A resource as described by the cloud, with its tags as a plain dict."""

    name: str
    arn: str
    status: str
    tags: dict[str, str]
    raw: dict[str, Any] = field(default_factory=dict)
    members: list[dict[str, Any]] = field(default_factory=list)


def _tag_dict(tag_list: Sequence[Mapping[str, str]] | None) -> dict[str, str]:
    """AWS's ``[{"Key", "Value"}]`` (or ECS's lowercase variant) as a dict."""
    out: dict[str, str] = {}
    for tag in tag_list or ():
        key = tag.get("Key", tag.get("key"))
        if key is not None:
            out[key] = tag.get("Value", tag.get("value", ""))
    return out


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def _size_name(value: str, table: Mapping[Size, Any]) -> str:
    """The preset whose value is ``value``, else ``custom:<value>``."""
    for size, candidate in table.items():
        if candidate == value:
            return size.value
    return f"custom:{value}"


def _short_hash(*parts: str, length: int = 6) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


def _hashed_name(deployment: Deployment, limit: int) -> str:
    """``kidp-<namespace>-<name>-<hash>`` within ``limit`` characters.

    The hash of namespace/name is always there because '-' is legal inside
    both parts: ``a-b``/``c`` and ``a``/``b-c`` would otherwise share a name.
    RDS and ElastiCache forbid ``--``, so runs of hyphens are collapsed (the
    hash keeps collapsed names distinct).
    """
    suffix = _short_hash(deployment.namespace, deployment.resource_name)
    base = re.sub(r"-{2,}", "-", f"{NAME_PREFIX}{deployment.namespace}-{deployment.resource_name}")
    room = limit - len(suffix) - 1
    return f"{base[:room].rstrip('-')}-{suffix}"


def _deployment_piece(deployment: Deployment, length: int = 8) -> str:
    hex_id = deployment.id.removeprefix("deploy-")
    if re.fullmatch(r"[0-9a-f]+", hex_id) and len(hex_id) >= length:
        return hex_id[:length]
    return _short_hash(deployment.id, length=length)


def final_snapshot_name(deployment: Deployment) -> str:
    """Name of the final snapshot the Snapshot deletion policy leaves behind."""
    return f"{deployment.id}-final"


def _retention_days(deployment: Deployment, *, minimum: int) -> int:
    backup = deployment.spec.backup or BackupSpec()
    if not backup.enabled:
        return minimum
    days = backup.retention_days
    if days > _MAX_BACKUP_DAYS:
        raise ProvisioningFailed(
            f"backup retention of {days} days exceeds the AWS maximum of {_MAX_BACKUP_DAYS} days"
        )
    return max(days, minimum)


def _encryption(deployment: Deployment) -> EncryptionSpec:
    return deployment.spec.encryption or EncryptionSpec()


def _size(deployment: Deployment) -> Size:
    return deployment.spec.size or Size.SMALL


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(part), "") if part.isdigit() else (-1, part) for part in version.split("."))


def _newest_matching(versions: Sequence[str], wanted: str) -> str | None:
    """The newest ``versions`` entry that is ``wanted`` or a minor/patch of it."""
    matching = [v for v in versions if v == wanted or v.startswith(f"{wanted}.")]
    return max(matching, key=_version_key) if matching else None


_RDS_AVAILABLE = frozenset({"available", "backing-up", "storage-optimization"})
_RDS_FAILED = frozenset(
    {
        "failed",
        "incompatible-network",
        "incompatible-option-group",
        "incompatible-parameters",
        "incompatible-restore",
        "inaccessible-encryption-credentials",
        "inaccessible-encryption-credentials-recoverable",
        "restore-error",
        "storage-full",
    }
)


def _rds_state(status: str) -> State:
    if status in _RDS_AVAILABLE:
        return "available"
    if status == "creating":
        return "creating"
    if status == "deleting":
        return "deleting"
    if status in _RDS_FAILED:
        return "failed"
    # modifying, rebooting, upgrading, stopped, starting, maintenance, ...:
    # the resource exists and will come back without our help.
    return "modifying"


def _cache_state(status: str) -> State:
    if status in ("available", "snapshotting"):
        return "available"
    if status == "creating":
        return "creating"
    if status == "deleting":
        return "deleting"
    if status in ("create-failed", "incompatible-network", "restore-failed"):
        return "failed"
    return "modifying"


_MSK_STATES: dict[str, State] = {
    "CREATING": "creating",
    "UPDATING": "modifying",
    "DELETING": "deleting",
    "ACTIVE": "available",
}


class AwsProvider:
    """:class:`kidp.ports.CloudProvider` for AWS.

    ``clients`` injects clients by service name (tests); otherwise they are
    created from ``session`` (a boto3 session, for tests that hook its
    events) or a private botocore session, with ``endpoint_url`` and
    standard-mode retries. ``on_call(resource_type, operation)`` runs once per
    API call made, for the ``kidp_broker_cloud_api_calls_total`` counter.
    Topics are offered only when ``msk_cluster_arn`` names the MSK cluster to
    create them in; services run in the ECS cluster ``ecs_cluster`` on
    ``subnet_ids``. ``db_subnet_group``, ``cache_subnet_group``,
    ``security_group_ids`` and ``ecs_execution_role_arn`` place resources in
    a VPC other than the account's default.
    """

    name = PROVIDER_NAME

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        session: Session | None = None,
        clients: Mapping[str, Any] | None = None,
        tag_prefix: str = tagging.DEFAULT_PREFIX,
        managed_by: str = tagging.MANAGED_BY_VALUE,
        msk_cluster_arn: str | None = None,
        ecs_cluster: str = "kidp",
        subnet_ids: Sequence[str] = (),
        on_call: Callable[[str, str], None] | None = None,
        security_group_ids: Sequence[str] = (),
        db_subnet_group: str | None = None,
        cache_subnet_group: str | None = None,
        ecs_execution_role_arn: str | None = None,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.tag_prefix = tag_prefix
        self.managed_by = managed_by
        self.msk_cluster_arn = msk_cluster_arn
        self.ecs_cluster = ecs_cluster
        self.subnet_ids = tuple(subnet_ids)
        self.security_group_ids = tuple(security_group_ids)
        self.db_subnet_group = db_subnet_group
        self.cache_subnet_group = cache_subnet_group
        self.ecs_execution_role_arn = ecs_execution_role_arn
        # The factory serialises creation itself; the provider's lock also
        # keeps two threads from making the same service's client.
        self._make_client: Callable[..., Any] = (
            session.client if session is not None else new_client
        )
        self._clients: dict[str, Any] = dict(clients or {})
        self._on_call = on_call
        self._lock = threading.Lock()
        self._config = Config(
            region_name=region,
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=5,
            read_timeout=30,
            user_agent_extra="kidp-broker",
            # Emulators and private endpoints do not resolve <bucket>.<host>.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._kinds: dict[str, _Kind] = {
            kind.key: kind
            for kind in (
                _RdsInstance(self),
                _AuroraCluster(self),
                _RedisGroup(self),
                _MemcachedCluster(self),
                _S3Bucket(self),
                _EcsService(self),
                _MskTopic(self),
            )
        }

    def __repr__(self) -> str:
        return f"AwsProvider(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    # --- plumbing ------------------------------------------------------------

    def _client(self, service: str) -> Any:
        with self._lock:
            client = self._clients.get(service)
            if client is None:
                client = self._make_client(
                    service,
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    config=self._config,
                )
                self._clients[service] = client
            return client

    def _count(self, resource_type: str, operation: str) -> None:
        if self._on_call is None:
            return
        try:
            self._on_call(resource_type, operation)
        except Exception:
            # A broken metric must not fail a deployment.
            logger.warning("on_call hook failed for %s %s", resource_type, operation, exc_info=True)

    def call(
        self,
        service: str,
        resource_type: str,
        operation: str,
        /,
        *,
        expect: Collection[str] = (),
        secrets: Collection[str] = (),
        **params: Any,
    ) -> dict[str, Any]:
        """Make one API call and translate its failure into the broker's errors.

        ``expect`` lists error codes the caller handles itself (raised as
        ``_Refused``); ``secrets`` are masked out of any message, and when
        present the botocore exception is not chained (it may echo them).
        """
        self._count(resource_type, operation)
        client = self._client(service)
        try:
            response: dict[str, Any] = getattr(client, operation)(**params)
        except ClientError as exc:
            code = _error_code(exc)
            message = _redact(str(exc.response.get("Error", {}).get("Message", "")), secrets)
            if _http_status(exc) >= 500 and message.lstrip().startswith("<"):
                code, message = NOT_AN_API_ANSWER, "the endpoint answered with an HTML page"
            if code in expect:
                raise _Refused(code, message) from None
            error = self._map_client_error(exc, service, operation, code, message)
            if secrets:
                raise error from None
            raise error from exc
        except ResponseParserError:
            if NOT_AN_API_ANSWER in expect:
                raise _Refused(NOT_AN_API_ANSWER, "unparseable response") from None
            raise CloudUnavailable(
                f"AWS {service} answered {operation} with an unreadable response",
                retry_after=15.0,
                details={"service": service, "operation": operation},
            ) from None
        except ParamValidationError as exc:
            # botocore's text can quote a parameter's value: only show it when
            # no secret is in play.
            detail = "" if secrets else f": {exc}"
            raise ProvisioningFailed(
                f"AWS {service} {operation} was called with invalid parameters{detail}",
                details={"service": service, "operation": operation},
            ) from None
        except (BotoConnectionError, HTTPClientError) as exc:
            raise CloudUnavailable(
                f"cannot reach AWS {service} for {operation} ({type(exc).__name__})",
                retry_after=30.0,
                details={"service": service, "operation": operation},
            ) from None
        except NoCredentialsError:
            # Usually the instance/task credential endpoint hiccuping: worth a retry.
            raise CloudUnavailable(
                f"no AWS credentials available for {service} {operation}",
                retry_after=30.0,
                details={"service": service, "operation": operation},
            ) from None
        return response

    def optional_call(
        self, service: str, resource_type: str, operation: str, /, **params: Any
    ) -> dict[str, Any] | None:
        """Like :meth:`call`, but None when the endpoint does not implement the
        operation at all: real AWS always does, local emulators often don't (moto
        raises ``NotImplementedError`` in process and serves an HTML page as a
        server)."""
        try:
            return self.call(service, resource_type, operation, expect=_UNAVAILABLE_CODES, **params)
        except _Refused:
            return None
        except NotImplementedError:
            # moto, in process, raises this for operations it does not model.
            logger.info("%s %s is not available on this endpoint", service, operation)
            return None

    def _map_client_error(
        self, exc: ClientError, service: str, operation: str, code: str, message: str
    ) -> BrokerError:
        details = {"service": service, "operation": operation, "awsErrorCode": code}
        status = _http_status(exc)
        text = f"AWS {service} {operation} failed ({code}): {message}".rstrip(": ")
        if code in THROTTLING_CODES or status == 429:
            return CloudUnavailable(
                f"AWS {service} throttled {operation} ({code}); retry later",
                retry_after=5.0,
                details=details,
            )
        if code in _SERVER_CODES or status >= 500:
            return CloudUnavailable(text, retry_after=15.0, details=details)
        if code in _QUOTA_CODES:
            return QuotaExceeded(f"AWS {service} quota reached for {operation} ({code}): {message}")
        return ProvisioningFailed(text, details=details)

    def tag_key(self, name: str) -> str:
        """The AWS tag key for the logical tag ``name`` under this provider's prefix."""
        return tagging.encode_key(name, dialect="aws", prefix=self.tag_prefix)

    def owned_by(self, found: _Found, deployment: Deployment) -> bool:
        """True when ``found`` carries ``deployment``'s id in its tags."""
        return found.tags.get(self.tag_key(tagging.DEPLOYMENT_ID)) == deployment.id

    @property
    def retained_value(self) -> str:
        """The managed-by value a retained resource is re-tagged with."""
        return f"{self.managed_by}-retained"

    @property
    def partition(self) -> str:
        """The ARN partition of this provider's region."""
        if self.region.startswith("cn-"):
            return "aws-cn"
        if self.region.startswith("us-gov-"):
            return "aws-us-gov"
        return "aws"

    def _kind(self, deployment: Deployment) -> _Kind:
        spec = deployment.spec
        rtype = deployment.resource_type
        key: str
        if rtype is ResourceType.DATABASE:
            if spec.engine not in _RDS_ENGINES:
                raise ProvisioningFailed(
                    f"database engine '{spec.engine}' is not offered on AWS; "
                    f"supported: {', '.join(sorted(_RDS_ENGINES))}"
                )
            key = "aurora" if spec.high_availability else "rds"
        elif rtype is ResourceType.CACHE:
            if spec.engine == "redis":
                key = "redis"
            elif spec.engine == "memcached":
                key = "memcached"
            else:
                raise ProvisioningFailed(
                    f"cache engine '{spec.engine}' is not offered on AWS; "
                    "supported: memcached, redis"
                )
        elif rtype is ResourceType.TOPIC:
            if not self.msk_cluster_arn:
                raise ProvisioningFailed(
                    "topics are not available: this broker has no MSK cluster configured "
                    "(msk_cluster_arn)"
                )
            key = "msk"
        elif rtype is ResourceType.BUCKET:
            key = "s3"
        else:
            key = "ecs"
        return self._kinds[key]

    def _encoded_tags(self, deployment: Deployment, tags: Mapping[str, str]) -> dict[str, str]:
        logical = deployment_tags(deployment, tags, managed_by=self.managed_by)
        return tagging.encode(logical, dialect="aws", prefix=self.tag_prefix)

    def _ensure_owner(self, kind: _Kind, found: _Found, deployment: Deployment) -> None:
        if not kind.taggable or self.owned_by(found, deployment):
            return
        holder = found.tags.get(self.tag_key(tagging.DEPLOYMENT_ID))
        whose = (
            f"belongs to deployment {holder}"
            if holder
            else "carries no KIDP deployment tag (it was not created by this broker)"
        )
        raise ProvisioningFailed(
            f"{kind.label} '{found.name}' already exists and {whose}; "
            "delete or rename it, or choose another resourceName",
            details={"cloudResourceId": found.arn, "heldBy": holder},
        )

    # --- the CloudProvider port --------------------------------------------

    def supported(self) -> dict[ResourceType, dict[str, list[str]]]:
        """RDS/Aurora databases, ElastiCache caches, S3 buckets, ECS services, and
        MSK topics when an MSK cluster is configured; versions from the catalogue."""
        database = ENGINES[ResourceType.DATABASE]
        supported: dict[ResourceType, dict[str, list[str]]] = {
            ResourceType.DATABASE: {e: list(database[e]) for e in ("postgresql", "mysql")},
            ResourceType.CACHE: {e: list(v) for e, v in ENGINES[ResourceType.CACHE].items()},
            ResourceType.BUCKET: {"": []},
            ResourceType.SERVICE: {"": []},
        }
        if self.msk_cluster_arn:
            supported[ResourceType.TOPIC] = {
                e: list(v) for e, v in ENGINES[ResourceType.TOPIC].items()
            }
        return supported

    def identifier(self, deployment: Deployment) -> str:
        """The cloud identifier ``deployment``'s resource has (or will have)."""
        return self._kind(deployment).name(deployment)

    def password_policy(self, deployment: Deployment) -> PasswordPolicy | None:
        """RDS master passwords; Redis AUTH tokens when in-transit encryption is on
        (ElastiCache only accepts AUTH over TLS); None for everything else."""
        return self._kind(deployment).password_policy(deployment)

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        """The calls ``deploy`` would make to create the resource; no API calls,
        no password (``secretParameters`` names where credentials would go)."""
        kind = self._kind(deployment)
        encoded = self._encoded_tags(deployment, tags)
        return {
            "provider": self.name,
            "region": self.region,
            "resourceType": deployment.resource_type.value,
            "identifier": kind.name(deployment),
            "calls": [call.describe() for call in kind.plan(deployment, encoded)],
            "notes": kind.notes(deployment),
        }

    def validate_quota(self, deployment: Deployment) -> QuotaReport:
        """Check the account's room for this deployment; raises ``QuotaExceeded``
        naming the quota, its usage and its maximum."""
        return self._kind(deployment).quota(deployment)

    def deploy(
        self,
        deployment: Deployment,
        tags: dict[str, str],
        credentials: Credentials | None,
    ) -> CloudResource:
        """Create the resource, or adopt the one already tagged with this deployment."""
        kind = self._kind(deployment)
        encoded = self._encoded_tags(deployment, tags)
        kind.check_credentials(deployment, credentials)
        found = kind.find(deployment)
        adopted = found is not None
        if found is None:
            try:
                kind.create(deployment, encoded, credentials)
                logger.info(
                    "created %s %s for %s", kind.label, kind.name(deployment), deployment.id
                )
            except _AlreadyExists:
                # Someone created it between our look and our create: maybe a
                # concurrent worker on this deployment, maybe a retried create
                # whose first response was lost. Adopt only if it is ours.
                logger.info(
                    "%s %s already exists; re-reading it", kind.label, kind.name(deployment)
                )
                adopted = True
            found = kind.find(deployment)
            if found is None:
                raise CloudUnavailable(
                    f"{kind.label} '{kind.name(deployment)}' was created but cannot be read yet",
                    retry_after=10.0,
                )
        if adopted:
            # What we just created is ours even before its tags are readable
            # (S3 applies tags in a second call on endpoints without creation tags).
            self._ensure_owner(kind, found, deployment)
        if kind.converge(deployment, found, encoded, credentials):
            found = kind.find(deployment) or found
        return kind.status(deployment, found)

    def get_status(self, deployment: Deployment) -> CloudResource:
        """The resource as AWS sees it now; ``missing`` when nothing of this
        deployment's carries its id."""
        kind = self._kind(deployment)
        found = kind.find(deployment)
        if found is None or (kind.taggable and not self.owned_by(found, deployment)):
            return CloudResource(
                cloud_resource_id=deployment.cloud_resource_id or kind.name(deployment),
                state="missing",
                message=f"no {kind.label} '{kind.name(deployment)}' of this deployment exists",
            )
        return kind.status(deployment, found)

    def delete(self, deployment: Deployment) -> bool:
        """Start or continue deleting; True once nothing is left. Retain re-tags
        the resource as retained and leaves it; Snapshot takes a final snapshot
        named after the deployment where the service has snapshots."""
        kind = self._kind(deployment)
        found = kind.find(deployment)
        if found is None:
            kind.after_gone(deployment)
            return True
        if kind.taggable and not self.owned_by(found, deployment):
            # Somebody else's resource under our name: never ours to remove.
            return True
        if deployment.deletion_policy is DeletionPolicy.RETAIN:
            kind.retain(deployment, found)
            logger.info("retained %s %s of %s", kind.label, found.name, deployment.id)
            return True
        done = kind.delete(deployment, found)
        if done:
            kind.after_gone(deployment)
        return done

    def rotate_credentials(self, deployment: Deployment, credentials: Credentials) -> None:
        """Set a new master password (RDS/Aurora) or AUTH token (Redis), applied now."""
        kind = self._kind(deployment)
        kind.check_credentials(deployment, credentials)
        found = kind.find(deployment)
        if found is None or (kind.taggable and not self.owned_by(found, deployment)):
            raise ProvisioningFailed(
                f"cannot rotate credentials: no {kind.label} '{kind.name(deployment)}' "
                "of this deployment exists"
            )
        kind.rotate(deployment, found, credentials)

    def list_managed(self) -> Sequence[ManagedResource]:
        """Resources tagged managed-by=<this broker> (one per deployment and type:
        an Aurora cluster rather than its instances), plus ``kidp-`` resources with
        no managed-by tag at all (``tagged=False``). Retained resources carry
        ``<managed_by>-retained`` and are in neither list. MSK topics cannot carry
        tags, so they are not listed."""
        managed_key = self.tag_key(tagging.MANAGED_BY)
        deployment_key = self.tag_key(tagging.DEPLOYMENT_ID)
        keyed: set[str] = set()
        best: dict[tuple[str, ResourceType], tuple[int, ManagedResource]] = {}
        loose: list[ManagedResource] = []
        for arn, cloud_tags in self._tagged_resources(managed_key):
            keyed.add(arn)
            classified = _classify_arn(arn)
            if classified is None or cloud_tags.get(managed_key) != self.managed_by:
                continue
            rtype, name, rank = classified
            resource = ManagedResource(
                cloud_resource_id=arn, resource_type=rtype, name=name, tags=cloud_tags
            )
            deployment_id = cloud_tags.get(deployment_key)
            if deployment_id is None:
                loose.append(resource)
                continue
            current = best.get((deployment_id, rtype))
            if current is None or rank > current[0]:
                best[(deployment_id, rtype)] = (rank, resource)
        found = [resource for _, resource in best.values()] + loose
        seen: set[str] = set()
        for kind in self._kinds.values():
            for arn, name, rtype in kind.untagged_candidates():
                if arn in keyed or arn in seen:
                    continue
                seen.add(arn)
                found.append(
                    ManagedResource(
                        cloud_resource_id=arn, resource_type=rtype, name=name, tags={}, tagged=False
                    )
                )
        return found

    def _tagged_resources(self, key: str) -> Iterator[tuple[str, dict[str, str]]]:
        token = ""
        while True:
            params: dict[str, Any] = {"TagFilters": [{"Key": key}], "ResourcesPerPage": 100}
            if token:
                params["PaginationToken"] = token
            page = self.call("resourcegroupstaggingapi", "any", "get_resources", **params)
            for mapping in page.get("ResourceTagMappingList", []):
                yield mapping["ResourceARN"], _tag_dict(mapping.get("Tags"))
            token = page.get("PaginationToken") or ""
            if not token:
                return

    def check(self) -> None:
        """Raise ``CloudUnavailable`` unless STS answers ``GetCallerIdentity``."""
        try:
            self.call("sts", "account", "get_caller_identity")
        except CloudUnavailable:
            raise
        except BrokerError as exc:
            raise CloudUnavailable(
                f"AWS credentials were rejected: {exc.message}", retry_after=60.0
            ) from None


def _classify_arn(arn: str) -> tuple[ResourceType, str, int] | None:
    """(resource type, name, rank) for the ARNs this provider creates; the
    higher rank is the deployment's primary resource (cluster over instance)."""
    parts = arn.split(":", 5)
    if len(parts) != 6:
        return None
    service, resource = parts[2], parts[5]
    kind, _, name = resource.partition(":")
    if service == "rds":
        return {
            "db": (ResourceType.DATABASE, name, 1),
            "cluster": (ResourceType.DATABASE, name, 2),
        }.get(kind)
    if service == "elasticache":
        ranks = {"cluster": 1, "replicationgroup": 2}
        return (ResourceType.CACHE, name, ranks[kind]) if kind in ranks else None
    if service == "s3" and resource and "/" not in resource:
        return ResourceType.BUCKET, resource, 1
    if service == "ecs" and resource.startswith("service/"):
        return ResourceType.SERVICE, resource.rsplit("/", 1)[-1], 1
    return None


# --- one class per kind of AWS resource ---------------------------------------


class _Kind(ABC):
    """How one kind of AWS resource is named, found, created, reported and removed."""

    key: ClassVar[str]
    label: ClassVar[str]
    service: ClassVar[str]
    resource_type: ClassVar[ResourceType]
    #: False where AWS cannot tag the resource: ownership cannot be verified.
    taggable: ClassVar[bool] = True

    def __init__(self, provider: AwsProvider) -> None:
        self.p = provider

    def call(self, operation: str, /, **params: Any) -> dict[str, Any]:
        return self.p.call(self.service, self.resource_type.value, operation, **params)

    @abstractmethod
    def name(self, deployment: Deployment) -> str: ...

    @abstractmethod
    def find(self, deployment: Deployment) -> _Found | None:
        """Describe the resource by name (whoever owns it), or None."""

    @abstractmethod
    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        """The create calls, without credentials."""

    @abstractmethod
    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        """Create the resource; raise ``_AlreadyExists`` when the name is taken."""

    @abstractmethod
    def status(self, deployment: Deployment, found: _Found) -> CloudResource: ...

    @abstractmethod
    def delete(self, deployment: Deployment, found: _Found) -> bool:
        """Start or continue deleting an owned resource; True once it is gone."""

    @abstractmethod
    def retain(self, deployment: Deployment, found: _Found) -> None:
        """Re-tag the resource as retained so scans stop counting it."""

    def converge(
        self,
        deployment: Deployment,
        found: _Found,
        tags: dict[str, str],
        credentials: Credentials | None,
    ) -> bool:
        """Finish a resource made in several steps; True if anything changed.
        Runs after creation and after adoption, so an interrupted deploy resumes."""
        return False

    def after_gone(self, deployment: Deployment) -> None:
        """Clean up companions that outlive the resource (task definitions)."""
        return None

    def check_credentials(self, deployment: Deployment, credentials: Credentials | None) -> None:
        """Refuse credentials the service would refuse, without echoing them."""
        return None

    def password_policy(self, deployment: Deployment) -> PasswordPolicy | None:
        return None

    def rotate(self, deployment: Deployment, found: _Found, credentials: Credentials) -> None:
        raise ProvisioningFailed(f"a {self.label} has no credentials to rotate")

    def quota(self, deployment: Deployment) -> QuotaReport:
        return QuotaReport(
            checked=False,
            details={
                "reason": f"no pre-flight quota check for {self.label}s; AWS limit errors "
                "at create time are reported as quota_exceeded"
            },
        )

    def notes(self, deployment: Deployment) -> list[str]:
        return []

    def untagged_candidates(self) -> Iterator[tuple[str, str, ResourceType]]:
        """(arn, name, type) of every ``kidp-`` resource of this kind."""
        return iter(())

    def retained_tags(self) -> dict[str, str]:
        return {self.p.tag_key(tagging.MANAGED_BY): self.p.retained_value}


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
        """RDS quotas as name -> (used, max), and where they came from."""
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
        details: dict[str, Any] = {"source": source, "quotas": report}
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


class _S3Bucket(_Kind):
    key = "s3"
    label = "S3 bucket"
    service = "s3"
    resource_type = ResourceType.BUCKET
    #: Pages of 1,000 object versions removed per delete() call: large buckets
    #: are emptied over several polls instead of in one long call.
    delete_pages_per_call = 5

    def name(self, deployment: Deployment) -> str:
        # Bucket names are global across all AWS accounts: the deployment id
        # piece keeps ours unique, and it differs per deployment.
        piece = _deployment_piece(deployment)
        base = re.sub(
            r"-{2,}", "-", f"{NAME_PREFIX}{deployment.namespace}-{deployment.resource_name}"
        )
        return f"{base[: 63 - len(piece) - 1].rstrip('-')}-{piece}"

    def arn(self, name: str) -> str:
        return f"arn:{self.p.partition}:s3:::{name}"

    def create_params(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        configuration: dict[str, Any] = {"Tags": _tag_list(tags)}
        if self.p.region != "us-east-1":
            configuration["LocationConstraint"] = self.p.region
        return {"Bucket": self.name(deployment), "CreateBucketConfiguration": configuration}

    def config_calls(
        self, deployment: Deployment, tags: Mapping[str, str], existing: Mapping[str, str]
    ) -> list[_Call]:
        name = self.name(deployment)
        # put_bucket_tagging replaces the whole set: keep tags others added.
        merged = {**existing, **tags}
        calls = [
            _Call(
                "s3",
                "put_bucket_tagging",
                {"Bucket": name, "Tagging": {"TagSet": _tag_list(merged)}},
            ),
            _Call(
                "s3",
                "put_public_access_block",
                {
                    "Bucket": name,
                    "PublicAccessBlockConfiguration": {
                        "BlockPublicAcls": True,
                        "IgnorePublicAcls": True,
                        "BlockPublicPolicy": True,
                        "RestrictPublicBuckets": True,
                    },
                },
            ),
            # S3 encrypts every object at rest (SSE-S3) whatever is asked; this
            # makes it explicit and turns on bucket keys.
            _Call(
                "s3",
                "put_bucket_encryption",
                {
                    "Bucket": name,
                    "ServerSideEncryptionConfiguration": {
                        "Rules": [
                            {
                                "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                                "BucketKeyEnabled": True,
                            }
                        ]
                    },
                },
            ),
        ]
        if deployment.spec.versioning:
            calls.append(
                _Call(
                    "s3",
                    "put_bucket_versioning",
                    {"Bucket": name, "VersioningConfiguration": {"Status": "Enabled"}},
                )
            )
        return calls

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        return [
            _Call("s3", "create_bucket", self.create_params(deployment, tags)),
            *self.config_calls(deployment, tags, {}),
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return ["S3 has no snapshots: the Snapshot deletion policy deletes like Delete"]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        try:
            self.call(
                "create_bucket",
                expect=("BucketAlreadyOwnedByYou", "BucketAlreadyExists"),
                **self.create_params(deployment, tags),
            )
        except _Refused as refused:
            if refused.code == "BucketAlreadyExists":
                raise ProvisioningFailed(
                    f"S3 bucket name '{self.name(deployment)}' is taken by another AWS account"
                ) from None
            raise _AlreadyExists from None

    def converge(
        self,
        deployment: Deployment,
        found: _Found,
        tags: dict[str, str],
        credentials: Credentials | None,
    ) -> bool:
        # Each call is idempotent; re-running them finishes a bucket whose
        # first deploy stopped after create_bucket.
        for call in self.config_calls(deployment, tags, found.tags):
            self.call(call.operation, **call.parameters)
        return True

    def find(self, deployment: Deployment) -> _Found | None:
        name = self.name(deployment)
        try:
            self.call(
                "head_bucket", expect=("404", "NoSuchBucket", "403", "AccessDenied"), Bucket=name
            )
        except _Refused as refused:
            if refused.code in ("404", "NoSuchBucket"):
                return None
            # Exists, but in another account: not ours, and not readable.
            return _Found(name=name, arn=self.arn(name), status="foreign", tags={})
        try:
            response = self.call("get_bucket_tagging", expect=("NoSuchTagSet",), Bucket=name)
            tags = _tag_dict(response.get("TagSet"))
        except _Refused:
            tags = {}
        return _Found(name=name, arn=self.arn(name), status="available", tags=tags)

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        versioning = self.call("get_bucket_versioning", Bucket=found.name)
        try:
            encryption = self.call(
                "get_bucket_encryption",
                expect=("ServerSideEncryptionConfigurationNotFoundError",),
                Bucket=found.name,
            )
            encrypted = bool(encryption.get("ServerSideEncryptionConfiguration", {}).get("Rules"))
        except _Refused:
            encrypted = False
        return CloudResource(
            cloud_resource_id=found.arn,
            state="available",
            message="S3 bucket exists",
            endpoint=f"{found.name}.s3.{self.p.region}.amazonaws.com",
            port=443,
            actual_spec={
                "versioning": versioning.get("Status") == "Enabled",
                "encryptionAtRest": encrypted,
            },
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        for _ in range(self.delete_pages_per_call):
            try:
                page = self.call(
                    "list_object_versions",
                    expect=("NoSuchBucket",),
                    Bucket=found.name,
                    MaxKeys=1000,
                )
            except _Refused:
                return True
            objects = [
                {"Key": item["Key"], "VersionId": item["VersionId"]}
                for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
            ]
            if not objects:
                break
            self.call(
                "delete_objects", Bucket=found.name, Delete={"Objects": objects, "Quiet": True}
            )
        else:
            # Budget used up with objects possibly left: continue next poll.
            return False
        try:
            self.call("delete_bucket", expect=("NoSuchBucket", "BucketNotEmpty"), Bucket=found.name)
        except _Refused as refused:
            # BucketNotEmpty: something wrote to it meanwhile; empty it again next time.
            return refused.code == "NoSuchBucket"
        return True

    def retain(self, deployment: Deployment, found: _Found) -> None:
        merged = {**found.tags, **self.retained_tags()}
        self.call("put_bucket_tagging", Bucket=found.name, Tagging={"TagSet": _tag_list(merged)})

    def untagged_candidates(self) -> Iterator[tuple[str, str, ResourceType]]:
        token = ""
        while True:
            params: dict[str, Any] = {"Prefix": NAME_PREFIX, "BucketRegion": self.p.region}
            if token:
                params["ContinuationToken"] = token
            page = self.call("list_buckets", **params)
            for bucket in page.get("Buckets", []):
                name = bucket["Name"]
                if name.startswith(NAME_PREFIX):
                    yield self.arn(name), name, self.resource_type
            token = page.get("ContinuationToken") or ""
            if not token:
                return


class _EcsService(_Kind):
    """An ECS service on Fargate: one task definition (family = service name)
    with one container, ``replicas`` tasks, in the broker's ECS cluster."""

    key = "ecs"
    label = "ECS service"
    service = "ecs"
    resource_type = ResourceType.SERVICE
    container = "app"

    def name(self, deployment: Deployment) -> str:
        # '_' cannot occur in Kubernetes names, so the join is unambiguous; ECS
        # allows 255 characters, more than namespace + name can reach.
        return f"{NAME_PREFIX}{deployment.namespace}_{deployment.resource_name}"

    def ecs_tags(self, tags: Mapping[str, str]) -> list[dict[str, str]]:
        return [{"key": key, "value": value} for key, value in tags.items()]

    def task_params(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        spec = deployment.spec
        cpu, memory = FARGATE_SIZES[_size(deployment)]
        container: dict[str, Any] = {"name": self.container, "image": spec.image, "essential": True}
        if spec.port:
            container["portMappings"] = [{"containerPort": spec.port, "protocol": "tcp"}]
        params: dict[str, Any] = {
            "family": self.name(deployment),
            "requiresCompatibilities": ["FARGATE"],
            "networkMode": "awsvpc",
            "cpu": cpu,
            "memory": memory,
            "containerDefinitions": [container],
            "tags": self.ecs_tags(tags),
        }
        if self.p.ecs_execution_role_arn:
            params["executionRoleArn"] = self.p.ecs_execution_role_arn
        return params

    def service_params(
        self, deployment: Deployment, tags: dict[str, str], task_definition: str
    ) -> dict[str, Any]:
        return {
            "cluster": self.p.ecs_cluster,
            "serviceName": self.name(deployment),
            "taskDefinition": task_definition,
            "desiredCount": deployment.spec.replicas or 1,
            "launchType": "FARGATE",
            "networkConfiguration": {
                "awsvpcConfiguration": {
                    "subnets": list(self.p.subnet_ids),
                    "securityGroups": list(self.p.security_group_ids),
                    "assignPublicIp": "DISABLED",
                }
            },
            "tags": self.ecs_tags(tags),
            "propagateTags": "SERVICE",
            "enableECSManagedTags": True,
            # ECS treats a repeated create with the same token as the same request.
            "clientToken": _deployment_piece(deployment, 32),
        }

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        return [
            _Call("ecs", "create_cluster", {"clusterName": self.p.ecs_cluster}),
            _Call("ecs", "register_task_definition", self.task_params(deployment, tags)),
            _Call(
                "ecs",
                "create_service",
                self.service_params(deployment, tags, "<registered task definition ARN>"),
            ),
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "create_cluster runs only when the ECS cluster does not exist; "
            "services have no snapshots, so the Snapshot deletion policy deletes like Delete"
        ]

    def ensure_cluster(self) -> None:
        response = self.call("describe_clusters", clusters=[self.p.ecs_cluster])
        active = [
            c for c in response.get("clusters", []) if c.get("status") in ("ACTIVE", "PROVISIONING")
        ]
        if not active:
            self.call("create_cluster", clusterName=self.p.ecs_cluster)

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        if not self.p.subnet_ids:
            raise ProvisioningFailed(
                "ECS services on Fargate need subnets: configure this broker's subnet_ids"
            )
        if not deployment.spec.image:
            raise ProvisioningFailed("a service needs spec.image")
        self.ensure_cluster()
        registered = self.call("register_task_definition", **self.task_params(deployment, tags))
        arn = registered["taskDefinition"]["taskDefinitionArn"]
        try:
            self.call(
                "create_service",
                expect=("InvalidParameterException",),
                **self.service_params(deployment, tags, arn),
            )
        except _Refused as refused:
            # A name held by an active service (or a different client token)
            # comes back as an invalid parameter; anything else really is one.
            if "idempotent" in refused.message.lower() or "already" in refused.message.lower():
                raise _AlreadyExists from None
            raise ProvisioningFailed(f"AWS ecs create_service failed: {refused.message}") from None

    def find(self, deployment: Deployment) -> _Found | None:
        try:
            response = self.call(
                "describe_services",
                expect=("ClusterNotFoundException",),
                cluster=self.p.ecs_cluster,
                services=[self.name(deployment)],
                include=["TAGS"],
            )
        except _Refused:
            return None
        for service in response.get("services", []):
            if service.get("status") != "INACTIVE":
                return _Found(
                    name=service["serviceName"],
                    arn=service["serviceArn"],
                    status=service.get("status", ""),
                    tags=_tag_dict(service.get("tags")),
                    raw=service,
                )
        return None

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        raw = found.raw
        desired = int(raw.get("desiredCount") or 0)
        running = int(raw.get("runningCount") or 0)
        deployments = raw.get("deployments", [])
        primary: dict[str, Any] = next((d for d in deployments if d.get("status") == "PRIMARY"), {})
        rollout = primary.get("rolloutState")
        state: State
        if found.status == "DRAINING":
            state = "deleting"
        elif rollout == "FAILED":
            state = "failed"
        elif running >= desired and rollout in (None, "COMPLETED"):
            state = "available"
        elif len(deployments) > 1:
            state = "modifying"
        else:
            state = "creating"
        actual: dict[str, Any] = {"replicas": desired}
        task = self.call("describe_task_definition", taskDefinition=raw["taskDefinition"])
        definition = task.get("taskDefinition", {})
        size = (str(definition.get("cpu")), str(definition.get("memory")))
        actual["size"] = _size_name(
            "/".join(size), {s: "/".join(v) for s, v in FARGATE_SIZES.items()}
        )
        containers = definition.get("containerDefinitions", [])
        port: int | None = None
        if containers:
            actual["image"] = containers[0].get("image")
            mappings = containers[0].get("portMappings") or []
            if mappings:
                port = mappings[0].get("containerPort")
                actual["port"] = port
        message = primary.get("rolloutStateReason") or f"ECS service {found.status}"
        return CloudResource(
            cloud_resource_id=found.arn,
            state=state,
            message=f"{message} ({running}/{desired} tasks running)",
            port=port,
            actual_spec=actual,
            resource_usage={"runningTasks": running, "desiredTasks": desired},
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if found.status == "DRAINING":
            return False
        try:
            self.call(
                "delete_service",
                expect=("ServiceNotFoundException", "ServiceNotActiveException"),
                cluster=self.p.ecs_cluster,
                service=found.name,
                force=True,
            )
        except _Refused:
            return True
        return self.find(deployment) is None

    def after_gone(self, deployment: Deployment) -> None:
        family = self.name(deployment)
        token = ""
        while True:
            params: dict[str, Any] = {"familyPrefix": family, "status": "ACTIVE"}
            if token:
                params["nextToken"] = token
            try:
                page = self.call("list_task_definitions", expect=("ClientException",), **params)
            except _Refused:
                return
            for arn in page.get("taskDefinitionArns", []):
                # familyPrefix is a prefix: 'kidp-a_b' also lists 'kidp-a_bc'.
                if arn.rsplit("/", 1)[-1].rsplit(":", 1)[0] != family:
                    continue
                described = self.call(
                    "describe_task_definition", taskDefinition=arn, include=["TAGS"]
                )
                if self.p.owned_by(
                    _Found(name=family, arn=arn, status="", tags=_tag_dict(described.get("tags"))),
                    deployment,
                ):
                    self.call("deregister_task_definition", taskDefinition=arn)
            token = page.get("nextToken") or ""
            if not token:
                return

    def retain(self, deployment: Deployment, found: _Found) -> None:
        retained = self.ecs_tags(self.retained_tags())
        self.call("tag_resource", resourceArn=found.arn, tags=retained)
        self.call("tag_resource", resourceArn=found.raw["taskDefinition"], tags=retained)

    def untagged_candidates(self) -> Iterator[tuple[str, str, ResourceType]]:
        token = ""
        while True:
            params: dict[str, Any] = {"cluster": self.p.ecs_cluster}
            if token:
                params["nextToken"] = token
            try:
                page = self.call("list_services", expect=("ClusterNotFoundException",), **params)
            except _Refused:
                return
            for arn in page.get("serviceArns", []):
                name = arn.rsplit("/", 1)[-1]
                if name.startswith(NAME_PREFIX):
                    yield arn, name, self.resource_type
            token = page.get("nextToken") or ""
            if not token:
                return


class _MskTopic(_Kind):
    """A topic in the configured MSK cluster, through MSK's topic API.

    Topics cannot carry AWS tags, so ownership rests on the deterministic
    name alone: a topic of that name is adopted, and Retain has nothing to
    re-tag (the topic is simply left alone).
    """

    key = "msk"
    label = "MSK topic"
    service = "kafka"
    resource_type = ResourceType.TOPIC
    taggable = False

    def name(self, deployment: Deployment) -> str:
        # '.' cannot occur in Kubernetes names: unambiguous, readable, and
        # well within Kafka's 249 characters.
        return f"{NAME_PREFIX}{deployment.namespace}.{deployment.resource_name}"

    @property
    def cluster_arn(self) -> str:
        assert self.p.msk_cluster_arn is not None  # _kind() refuses topics without it
        return self.p.msk_cluster_arn

    def params(self, deployment: Deployment) -> dict[str, Any]:
        spec = deployment.spec
        configs = {"retention.ms": str((spec.retention_hours or 168) * 3_600_000)}
        return {
            "ClusterArn": self.cluster_arn,
            "TopicName": self.name(deployment),
            "PartitionCount": spec.partitions or 3,
            "ReplicationFactor": spec.replication_factor or 3,
            # MSK takes topic configuration as a Base64-encoded JSON object.
            "Configs": base64.b64encode(json.dumps(configs).encode()).decode(),
        }

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        return [_Call("kafka", "create_topic", self.params(deployment))]

    def notes(self, deployment: Deployment) -> list[str]:
        return ["MSK topics cannot be tagged: they are identified by name only"]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        try:
            self.call(
                "create_topic",
                expect=("TopicExistsException", "ConflictException"),
                **self.params(deployment),
            )
        except _Refused:
            raise _AlreadyExists from None

    def find(self, deployment: Deployment) -> _Found | None:
        name = self.name(deployment)
        try:
            topic = self.call(
                "describe_topic",
                expect=("NotFoundException", "UnknownTopicOrPartitionException"),
                ClusterArn=self.cluster_arn,
                TopicName=name,
            )
        except _Refused:
            return None
        return _Found(
            name=name,
            arn=topic.get("TopicArn") or f"{self.cluster_arn}/topic/{name}",
            status=topic.get("Status", ""),
            tags={},
            raw=topic,
        )

    def bootstrap_brokers(self) -> str | None:
        brokers = self.p.optional_call(
            "kafka", "topic", "get_bootstrap_brokers", ClusterArn=self.cluster_arn
        )
        if brokers is None:
            return None
        for key in (
            "BootstrapBrokerStringSaslIam",
            "BootstrapBrokerStringSaslScram",
            "BootstrapBrokerStringTls",
            "BootstrapBrokerString",
        ):
            if brokers.get(key):
                return str(brokers[key])
        return None

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        raw = found.raw
        state = _MSK_STATES.get(found.status, "modifying")
        brokers = self.bootstrap_brokers() if state == "available" else None
        port: int | None = DEFAULT_PORTS["kafka"]
        if brokers:
            first = brokers.split(",")[0]
            port = int(first.rsplit(":", 1)[1]) if ":" in first else port
        actual: dict[str, Any] = {
            "engine": "kafka",
            "partitions": raw.get("PartitionCount"),
            "replicationFactor": raw.get("ReplicationFactor"),
        }
        return CloudResource(
            cloud_resource_id=found.arn,
            state=state,
            message=f"MSK topic status: {found.status}",
            endpoint=brokers,
            port=port,
            actual_spec={k: v for k, v in actual.items() if v is not None},
            tags={},
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        if found.status == "DELETING":
            return False
        try:
            self.call(
                "delete_topic",
                expect=("NotFoundException", "UnknownTopicOrPartitionException"),
                ClusterArn=self.cluster_arn,
                TopicName=found.name,
            )
        except _Refused:
            return True
        return self.find(deployment) is None

    def retain(self, deployment: Deployment, found: _Found) -> None:
        logger.info("retaining MSK topic %s: topics carry no tags to change", found.name)
