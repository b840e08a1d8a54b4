"""What every Azure resource kind shares: API versions, naming, sizes and
states, the ARM request that ``plan()`` shows, and :class:`_Kind`, the base
each kind's module builds on (name, find, create, report, remove one kind).
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from kidp.errors import ProvisioningFailed, ValidationFailed
from kidp.models import BackupSpec, CloudResource, Deployment, EncryptionSpec, ResourceType, Size
from kidp.ports import Credentials, PasswordPolicy, QuotaReport

if TYPE_CHECKING:
    from kidp.providers.azure.provider import AzureProvider

PROVIDER_NAME = "azure"
NAME_PREFIX = "kidp-"
Json = dict[str, Any]
State = Literal["creating", "available", "failed", "deleting", "missing", "modifying"]

#: The ARM API version each client is pinned to: what ``plan()`` shows is what
#: is sent, and an SDK upgrade cannot change the wire contract unnoticed.
API_VERSIONS = {
    "sql": "2023-08-01",
    "postgresql": "2024-08-01",
    "mysql": "2023-12-30",
    "redis": "2024-11-01",
    "servicebus": "2024-01-01",
    "storage": "2024-01-01",
    "appcontainers": "2024-03-01",
    "resource": "2022-09-01",
}
#: The activity log (Microsoft.Insights), read through the resource client.
ACTIVITY_LOG_API_VERSION = "2015-04-01"

#: Characters for SQL, PostgreSQL and MySQL administrator passwords: safe in
#: connection URLs unescaped. All three services require three of upper, lower,
#: digit and symbol; the classes are balanced so that 64 random characters miss
#: two of them with odds below 1e-10 (``check_credentials`` still checks).
DB_PASSWORD_ALPHABET = "ABCDEFGHJKLMNPQR" + "abcdefghijkmnopq" + "0123456789" + "-_.~"
DB_PASSWORD_LENGTH = 64
DB_ADMIN = "kidpadmin"

_MIN_BACKUP_DAYS, _MAX_BACKUP_DAYS = 1, 35


@dataclass(frozen=True)
class _Request:
    """One ARM request as ``plan()`` shows it (a password is never in it)."""

    method: str
    path: str
    api_version: str
    body: Json | None = None
    secret_fields: tuple[str, ...] = ()

    def describe(self) -> Json:
        described: Json = {
            "method": self.method,
            "path": f"{self.path}?api-version={self.api_version}",
        }
        if self.body is not None:
            described["body"] = self.body
        if self.secret_fields:
            described["secretFields"] = list(self.secret_fields)
        return described


@dataclass
class _Found:
    """A resource as ARM describes it: its raw JSON, tags, and children a kind reads."""

    name: str
    id: str
    raw: Json
    children: dict[str, Json | None] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.raw.get("tags") or {})

    @property
    def properties(self) -> Json:
        props = self.raw.get("properties")
        return props if isinstance(props, dict) else {}

    @property
    def provisioning_state(self) -> str:
        return str(self.properties.get("provisioningState") or "")


def body_bytes(body: Json) -> bytes:
    """The JSON a request carries, as the clients send it verbatim: the same
    bytes whatever the SDK generation (the older ones would re-serialise a
    dict through their models and drop what they do not know)."""
    return json.dumps(body, separators=(",", ":")).encode()


# --- names ---------------------------------------------------------------------


def _short_hash(*parts: str, length: int = 6) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


def deployment_piece(deployment: Deployment, length: int = 8) -> str:
    """A piece of the deployment id: globally named resources differ per deployment."""
    hex_id = deployment.id.removeprefix("deploy-")
    if re.fullmatch(r"[0-9a-f]+", hex_id) and len(hex_id) >= length:
        return hex_id[:length]
    return _short_hash(deployment.id, length=length)


def hashed_name(deployment: Deployment, limit: int) -> str:
    """``kidp-<namespace>-<name>-<hash of both>`` within ``limit`` characters.

    The hash keeps ``a-b``/``c`` and ``a``/``b-c`` apart; runs of hyphens are
    collapsed because Container Apps (and storage containers) refuse ``--``."""
    return _join(deployment, _short_hash(deployment.namespace, deployment.resource_name), limit)


def global_name(deployment: Deployment, limit: int = 63) -> str:
    """Like :func:`hashed_name`, but ending in a piece of the deployment id, for
    names that are global across Azure (they become host names)."""
    return _join(deployment, deployment_piece(deployment), limit)


def _join(deployment: Deployment, suffix: str, limit: int) -> str:
    base = re.sub(r"-{2,}", "-", f"{NAME_PREFIX}{deployment.namespace}-{deployment.resource_name}")
    room = limit - len(suffix) - 1
    return f"{base[:room].rstrip('-')}-{suffix}"


# --- sizes, backups, states ------------------------------------------------------


def size_of(deployment: Deployment) -> Size:
    return deployment.spec.size or Size.SMALL


def size_name(value: Any, table: dict[Size, Any]) -> str:
    """The preset whose value is ``value``, else ``custom:<value>``."""
    for size, candidate in table.items():
        if candidate == value:
            return size.value
    return f"custom:{value}"


def encryption_of(deployment: Deployment) -> EncryptionSpec:
    return deployment.spec.encryption or EncryptionSpec()


def retention_days(deployment: Deployment, *, minimum: int, service: str) -> int:
    """Backup retention in days; ``minimum`` when backups are off (Azure keeps
    them whatever is asked). Raises ``ProvisioningFailed`` outside the range."""
    backup = deployment.spec.backup or BackupSpec()
    if not backup.enabled:
        return minimum
    days = backup.retention_days
    if not max(minimum, _MIN_BACKUP_DAYS) <= days <= _MAX_BACKUP_DAYS:
        raise ProvisioningFailed(
            f"{service} keeps backups for {minimum} to {_MAX_BACKUP_DAYS} days; "
            f"{days} days requested"
        )
    return days


def arm_state(found: _Found, *, ready: bool = True) -> State:
    """The broker's state of an ARM resource from its ``provisioningState``;
    ``ready`` is the service's own health once that says Succeeded."""
    state = found.provisioning_state.lower()
    if state in ("failed", "canceled"):
        return "failed"
    if state in ("deleting", "dropping", "unprovisioning"):
        return "deleting"
    if state in ("creating", "inprogress", "accepted", "provisioning", "resolvingdns"):
        return "creating"
    if state not in ("", "succeeded"):
        return "modifying"  # Updating, Scaling, ...: it exists and comes back on its own
    return "available" if ready else "modifying"


class _Kind(ABC):
    """How one kind of Azure resource is named, found, created, reported and removed."""

    key: ClassVar[str]
    label: ClassVar[str]
    #: The provider's client (``sql``, ``redis``, ...) this kind calls.
    service: ClassVar[str]
    resource_type: ClassVar[ResourceType]
    #: ARM types this kind creates, with a rank: the highest is the deployment's
    #: primary resource in ``list_managed`` (a SQL database over its server).
    arm_types: ClassVar[dict[str, int]]
    #: False where ARM cannot tag the resource: ownership cannot be verified.
    taggable: ClassVar[bool] = True
    #: What the Snapshot deletion policy does here: keep it (data that Azure
    #: deletes with the resource), or delete it (nothing to keep).
    snapshot_keeps: ClassVar[bool] = True

    def __init__(self, provider: AzureProvider) -> None:
        self.p = provider

    def call(self, operation: str, /, *args: Any, **kwargs: Any) -> Any:
        return self.p.call(self.service, self.resource_type.value, operation, *args, **kwargs)

    def get(self, operation: str, /, *args: Any) -> Json | None:
        """A GET through ``operation``: the raw JSON, or None on 404."""
        found: Json | None = self.p.call(
            self.service, self.resource_type.value, operation, *args, raw=True, missing_ok=True
        )
        return found

    def begin(
        self, operation: str, /, *names: str, body: Json, secrets: tuple[str, ...] = ()
    ) -> None:
        """Start the long-running ``operation`` on ``names`` in the resource group,
        sending ``body``; never waited on (polls read the resource again)."""
        self.call(
            operation,
            self.p.resource_group,
            *names,
            body_bytes(body),
            polling=False,
            secrets=secrets,
        )

    def found(self, operation: str, /, *names: str) -> _Found | None:
        """GET the resource ``names`` lead to in the resource group (the last is
        its name) as a :class:`_Found`, or None when ARM has no such resource."""
        raw = self.get(operation, self.p.resource_group, *names)
        return None if raw is None else _Found(name=names[-1], id=str(raw["id"]), raw=raw)

    @property
    def api_version(self) -> str:
        return API_VERSIONS[self.service]

    def arm_path(self, namespace: str, *pairs: str) -> str:
        """A resource id in the provider's subscription and resource group."""
        return (
            f"/subscriptions/{self.p.subscription_id}/resourceGroups/{self.p.resource_group}"
            f"/providers/{namespace}/{'/'.join(pairs)}"
        )

    @abstractmethod
    def name(self, deployment: Deployment) -> str: ...

    @abstractmethod
    def find(self, deployment: Deployment, name: str | None = None) -> _Found | None:
        """GET the resource by name (this deployment's, or ``name``), or None."""

    @abstractmethod
    def requests(self, deployment: Deployment, tags: dict[str, str]) -> list[_Request]:
        """Every request a deploy sends, in order, without credentials."""

    @abstractmethod
    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        """Start creating the resource (an LRO is started, never waited on)."""

    @abstractmethod
    def status(self, deployment: Deployment, found: _Found) -> CloudResource: ...

    @abstractmethod
    def delete(self, deployment: Deployment, found: _Found) -> bool:
        """Start or continue deleting an owned resource; True once it is gone."""

    def advance(self, deployment: Deployment, found: _Found, tags: dict[str, str]) -> bool:
        """Take the next step of a resource made in several (a database once its
        server is ready); True if a request was sent. Never waits."""
        return False

    def tagged_ids(self, found: _Found) -> list[str]:
        """Resource ids to re-tag on Retain: the resource and its tagged children."""
        return [found.id]

    def check_credentials(self, deployment: Deployment, credentials: Credentials | None) -> None:
        return None

    def password_policy(self, deployment: Deployment) -> PasswordPolicy | None:
        return None

    def rotate(self, deployment: Deployment, found: _Found, credentials: Credentials) -> None:
        raise ProvisioningFailed(f"a {self.label} has no credentials the broker sets")

    def validate(self, deployment: Deployment) -> None:
        """Refuse, as a caller's error, what this Azure service cannot do."""
        return None

    def quota(self, deployment: Deployment) -> QuotaReport:
        return QuotaReport(
            checked=False,
            details={
                "reason": f"Azure has no usage API for {self.label}s; quota errors at "
                "create time are reported as quota_exceeded"
            },
        )

    def notes(self, deployment: Deployment) -> list[str]:
        return []

    def logical_tags(self, deployment: Deployment) -> dict[str, str]:
        """This deployment's tags, encoded: what a later step stamps on a child."""
        return self.p.encode_tags(deployment, {})

    def looks_like_ours(self, name: str) -> bool:
        """Named the way this broker names its resources (for untagged look-alikes)."""
        return name.startswith(NAME_PREFIX)


class _DatabaseServer(_Kind):
    """What the three database kinds share: an administrator login whose
    password the broker generates, sets and rotates (8-128 characters on all three)."""

    resource_type = ResourceType.DATABASE
    max_password: ClassVar[int] = 128

    def password_policy(self, deployment: Deployment) -> PasswordPolicy:
        return PasswordPolicy(
            length=DB_PASSWORD_LENGTH, alphabet=DB_PASSWORD_ALPHABET, username=DB_ADMIN
        )

    def check_credentials(self, deployment: Deployment, credentials: Credentials | None) -> None:
        if credentials is None:
            raise ProvisioningFailed(f"a {self.label} needs credentials for its administrator")
        password = credentials.password
        classes = sum(
            (
                any(c.isupper() for c in password),
                any(c.islower() for c in password),
                any(c.isdigit() for c in password),
                any(not c.isalnum() for c in password),
            )
        )
        if not 8 <= len(password) <= self.max_password or classes < 3 or DB_ADMIN in password:
            raise ProvisioningFailed(
                f"the generated administrator password does not meet {self.label} rules "
                f"(8-{self.max_password} characters from three of upper, lower, digits and "
                "symbols, not containing the login)"
            )

    def rotate(self, deployment: Deployment, found: _Found, credentials: Credentials) -> None:
        self.begin(
            "servers.begin_update",
            found.name,
            body={"properties": {"administratorLoginPassword": credentials.password}},
            secrets=(credentials.password,),
        )

    def validate_retention(self, deployment: Deployment, minimum: int) -> None:
        try:
            retention_days(deployment, minimum=minimum, service=self.label)
        except ProvisioningFailed as exc:
            raise ValidationFailed(exc.message) from None
