"""What every AWS resource kind shares: the size and engine tables, naming
and state helpers, and :class:`_Kind`, the base each kind's module builds on
(name, find, create, report, remove one kind of resource).
"""

from __future__ import annotations

import hashlib
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from kidp import tags as tagging
from kidp.catalog import SIZES
from kidp.errors import ProvisioningFailed
from kidp.models import (
    BackupSpec,
    CloudResource,
    Deployment,
    EncryptionSpec,
    ResourceType,
    Size,
)
from kidp.ports import Credentials, PasswordPolicy, QuotaReport

if TYPE_CHECKING:
    from kidp.providers.aws.provider import AwsProvider

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

# --- error classification (the shared part is in errors.py) -----------------
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
