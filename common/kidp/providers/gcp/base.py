"""What every GCP resource kind shares: size and version tables, naming,
the request shape ``plan()`` shows, quota rules, and :class:`_Kind`, the base
each kind's module builds on (name, find, create, report, remove one kind).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from kidp import tags as tagging
from kidp.catalog import SIZES
from kidp.errors import ProvisioningFailed, QuotaExceeded
from kidp.models import CloudResource, Deployment, EncryptionSpec, ResourceType, Size
from kidp.ports import Credentials, PasswordPolicy, QuotaReport

if TYPE_CHECKING:
    from kidp.providers.gcp.provider import GcpProvider

#: ``CloudResource.state``'s values.
State = Literal["creating", "available", "failed", "deleting", "missing", "modifying"]

PROVIDER_NAME = "gcp"
NAME_PREFIX = "kidp-"

#: Google's production endpoint of each API the provider calls; ``api_endpoint``
#: (the stand-in in tests) or ``endpoints`` replace them.
DEFAULT_ENDPOINTS: dict[str, str] = {
    "sqladmin": "https://sqladmin.googleapis.com",
    "redis": "https://redis.googleapis.com",
    "storage": "https://storage.googleapis.com",
    "run": "https://run.googleapis.com",
    "serviceusage": "https://serviceusage.googleapis.com",
    "pubsub": "https://pubsub.googleapis.com",
}

# --- sizes -------------------------------------------------------------------
# Cloud SQL custom machine types are ``db-custom-<vCPUs>-<memory MB>``; a
# dedicated-core instance needs at least 3840 MB, so the small preset (1 vCPU,
# 2 GiB) gets the smallest Cloud SQL allows.
SQL_TIERS: dict[Size, str] = {
    Size.SMALL: "db-custom-1-3840",
    Size.MEDIUM: "db-custom-2-4096",
    Size.LARGE: "db-custom-4-8192",
    Size.XLARGE: "db-custom-8-16384",
}
#: Memorystore capacity in GB: the preset's memory.
REDIS_MEMORY_GB: dict[Size, int] = {size: preset.memory_gib for size, preset in SIZES.items()}
#: Cloud Run container limits: exactly the preset.
RUN_LIMITS: dict[Size, tuple[str, str]] = {
    size: (f"{preset.cpu:g}", f"{preset.memory_gib}Gi") for size, preset in SIZES.items()
}

# --- versions ------------------------------------------------------------------
SQL_VERSIONS: dict[tuple[str, str], str] = {
    **{("postgresql", v): f"POSTGRES_{v}" for v in ("12", "13", "14", "15", "16")},
    ("mysql", "5.7"): "MYSQL_5_7",
    ("mysql", "8.0"): "MYSQL_8_0",
    ("mysql", "8.4"): "MYSQL_8_4",
}
REDIS_VERSIONS: dict[str, str] = {"6.2": "REDIS_6_X", "7.0": "REDIS_7_0", "7.2": "REDIS_7_2"}

#: Cloud SQL keeps at most this many automated backups.
MAX_SQL_BACKUPS = 365
#: Pub/Sub keeps messages for 10 minutes to 31 days.
MAX_TOPIC_RETENTION_HOURS = 31 * 24


class _AlreadyExists(Exception):
    """A create lost to a resource of the same name (a race, or a retried create)."""


class _Refused(Exception):
    """An error answer the caller said it handles (``expect``): status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class _Request:
    """One API request as ``plan()`` shows it: never with a password in it."""

    method: str
    url: str
    body: dict[str, Any]
    secret_fields: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"method": self.method, "url": self.url, "body": self.body}
        if self.secret_fields:
            described["secretFields"] = list(self.secret_fields)
        return described


@dataclass
class _Found:
    """A resource as the API describes it, with its labels as a plain dict.

    ``raw`` is the API's own object (a dict from the discovery and storage
    clients, a proto message from the GAPIC clients)."""

    name: str
    resource_id: str
    state: str
    labels: dict[str, str]
    raw: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def gapic_found(resource: Any, state: str) -> _Found:
    """A GAPIC client's resource (``name`` is its full path) as a :class:`_Found`."""
    return _Found(
        name=resource.name.rsplit("/", 1)[-1],
        resource_id=resource.name,
        state=state,
        labels=dict(resource.labels),
        raw=resource,
    )


@dataclass(frozen=True)
class QuotaRule:
    """A project quota one kind consumes: the Service Usage metric that holds the
    project's effective limit, and Google's documented default for when the
    project does not list that metric."""

    service: str
    metric: str
    default_limit: int
    unit: str
    per_region: bool


def _short_hash(*parts: str, length: int = 6) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


def _base(deployment: Deployment) -> str:
    # '--' is refused by several Google name rules; the hash or the deployment
    # piece keeps collapsed names apart.
    return re.sub(r"-{2,}", "-", f"{NAME_PREFIX}{deployment.namespace}-{deployment.resource_name}")


def hashed_name(deployment: Deployment, limit: int) -> str:
    """``kidp-<namespace>-<name>-<hash>`` within ``limit`` characters. The hash of
    namespace/name keeps ``a-b``/``c`` and ``a``/``b-c`` apart."""
    suffix = _short_hash(deployment.namespace, deployment.resource_name)
    return f"{_base(deployment)[: limit - len(suffix) - 1].rstrip('-')}-{suffix}"


def deployment_piece(deployment: Deployment, length: int = 8) -> str:
    """A piece of the deployment id, for names that must differ per deployment."""
    hex_id = deployment.id.removeprefix("deploy-")
    if re.fullmatch(r"[0-9a-f]+", hex_id) and len(hex_id) >= length:
        return hex_id[:length]
    return _short_hash(deployment.id, length=length)


def piece_name(deployment: Deployment, limit: int) -> str:
    """``kidp-<namespace>-<name>-<deployment piece>`` within ``limit`` characters."""
    piece = deployment_piece(deployment)
    return f"{_base(deployment)[: limit - len(piece) - 1].rstrip('-')}-{piece}"


def size_of(deployment: Deployment) -> Size:
    return deployment.spec.size or Size.SMALL


def encryption_of(deployment: Deployment) -> EncryptionSpec:
    return deployment.spec.encryption or EncryptionSpec()


def size_name(value: Any, table: Mapping[Size, Any]) -> str:
    """The preset whose value is ``value``, else ``custom:<value>``."""
    for size, candidate in table.items():
        if candidate == value:
            return size.value
    return f"custom:{value}"


class _Kind(ABC):
    """How one kind of Google Cloud resource is named, found, created, reported
    and removed. ``p`` is the provider: its ``call`` makes every API call."""

    key: ClassVar[str]
    label: ClassVar[str]
    api: ClassVar[str]
    resource_type: ClassVar[ResourceType]
    #: Where the API has a final backup, Snapshot takes one; elsewhere it keeps
    #: the resource as Retain does (the data is not thrown away unasked).
    has_final_backup: ClassVar[bool] = False
    quota_rule: ClassVar[QuotaRule | None] = None

    def __init__(self, provider: GcpProvider) -> None:
        self.p = provider

    def call(
        self,
        operation: str,
        fn: Any,
        /,
        *,
        expect: tuple[int, ...] = (),
        secrets: tuple[str, ...] = (),
    ) -> Any:
        return self.p.call(
            self.api, self.resource_type.value, operation, fn, expect=expect, secrets=secrets
        )

    def read(self, operation: str, fn: Callable[[], Any], /) -> Any | None:
        """``fn``'s answer to a read, or None when the API answers 404."""
        try:
            return self.call(operation, fn, expect=(404,))
        except _Refused:
            return None

    def start_create(
        self, operation: str, fn: Callable[[], Any], /, *, secrets: tuple[str, ...] = ()
    ) -> None:
        """Send a create (``fn``); the name being taken (409) is ``_AlreadyExists``:
        ours from a lost answer, or somebody else's, which ``find`` tells."""
        try:
            self.call(operation, fn, expect=(409,), secrets=secrets)
        except _Refused:
            raise _AlreadyExists from None

    @property
    def endpoint(self) -> str:
        return self.p.endpoint(self.api)

    @property
    def client(self) -> Any:
        """The provider's client for this kind's API (made once, shared)."""
        return self.p.client(self.api)

    @property
    def parent(self) -> str:
        """The project's location in the provider's region: regional resources' parent."""
        return f"projects/{self.p.project}/locations/{self.p.region}"

    @abstractmethod
    def name(self, deployment: Deployment) -> str: ...

    @abstractmethod
    def find(self, deployment: Deployment) -> _Found | None:
        """Read the resource by name (whoever owns it), or None."""

    @abstractmethod
    def plan(self, deployment: Deployment, labels: dict[str, str]) -> list[_Request]:
        """The create requests, without credentials."""

    @abstractmethod
    def create(
        self, deployment: Deployment, labels: dict[str, str], credentials: Credentials | None
    ) -> None:
        """Start creating the resource (never wait for the operation); raise
        ``_AlreadyExists`` when the name is taken."""

    @abstractmethod
    def status(self, deployment: Deployment, found: _Found) -> CloudResource: ...

    @abstractmethod
    def delete(self, deployment: Deployment, found: _Found) -> bool:
        """Start or continue deleting an owned resource; True once it is gone."""

    @abstractmethod
    def relabel(self, found: _Found, labels: dict[str, str]) -> None:
        """Replace the resource's labels with ``labels``."""

    @abstractmethod
    def list_all(self) -> Iterator[tuple[str, str, dict[str, str]]]:
        """(resource id, name, labels) of every resource of this kind in the
        project (and region, for regional kinds)."""

    def retain(self, deployment: Deployment, found: _Found) -> None:
        """Re-label the resource as retained so scans stop counting it."""
        key = self.p.label_key(tagging.MANAGED_BY)
        self.relabel(found, {**found.labels, key: self.p.retained_value})

    def failed_create(self, deployment: Deployment) -> str | None:
        """Why this deployment's create failed, when its resource is gone because
        of it (Memorystore removes an instance whose create failed)."""
        return None

    def check_credentials(self, deployment: Deployment, credentials: Credentials | None) -> None:
        return None

    def password_policy(self, deployment: Deployment) -> PasswordPolicy | None:
        return None

    def rotate(self, deployment: Deployment, found: _Found, credentials: Credentials) -> None:
        raise ProvisioningFailed(f"a {self.label} has no credentials to rotate")

    def notes(self, deployment: Deployment) -> list[str]:
        return []

    def usage(self, deployment: Deployment) -> tuple[int, int]:
        """(used now, needed by ``deployment``) in the quota rule's unit."""
        raise NotImplementedError

    def quota(self, deployment: Deployment) -> QuotaReport:
        """Compare usage (counted from the API) with the project's effective limit
        (Service Usage, or Google's documented default)."""
        rule = self.quota_rule
        if rule is None:
            return QuotaReport(
                checked=False,
                details={"reason": f"{self.label}s have no allocation quota to check"},
            )
        limit, source = self.p.quota_limit(rule)
        used, needed = self.usage(deployment)
        details = {
            "quota": rule.metric,
            "used": used,
            "max": limit,
            "requested": needed,
            "unit": rule.unit,
            "source": source,
        }
        if used + needed > limit:
            where = f" in {self.p.region}" if rule.per_region else ""
            raise QuotaExceeded(
                f"GCP quota {rule.metric}{where} would be exceeded: {used} {rule.unit} used "
                f"of {limit} allowed, and this deployment needs {needed} more",
                details=details,
            )
        return QuotaReport(checked=True, details=details)

    def encoded(self, value: str) -> str:
        return tagging.encode_value(value, dialect="gcp")
