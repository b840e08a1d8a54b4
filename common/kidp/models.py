"""Wire models (requests, responses, callbacks) and the deployment record.

Field names on the wire are camelCase exactly as in the API reference (seed
001); Python attributes are snake_case. Requests forbid unknown fields so a
caller who sets ``phase`` or ``deploymentId`` on a provision gets a 400 rather
than a silently ignored value.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
)
from pydantic.alias_generators import to_camel

# Kubernetes DNS-1123 label: what a namespace or a resource name must be.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_RETENTION = re.compile(r"^[1-9][0-9]{0,3}d$")
_CRON = re.compile(r"^(\S+\s+){4}\S+$")
DEPLOYMENT_ID = re.compile(r"^deploy-[0-9a-f]{32}$")


def _dns_label(value: str) -> str:
    if not _DNS_LABEL.match(value):
        raise ValueError(
            "must be a Kubernetes name: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


def _email(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError("must be an e-mail address")
    return value


KubeName = Annotated[
    str, StringConstraints(min_length=1, max_length=63), AfterValidator(_dns_label)
]
Email = Annotated[str, StringConstraints(max_length=254), AfterValidator(_email)]
DeploymentId = Annotated[str, StringConstraints(pattern=DEPLOYMENT_ID.pattern)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=63), AfterValidator(_dns_label)]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def new_deployment_id() -> str:
    """A fresh ``deploy-<32 hex>`` identifier."""
    return f"deploy-{uuid.uuid4().hex}"


class Phase(StrEnum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    READY = "Ready"
    FAILED = "Failed"
    DELETING = "Deleting"
    DELETED = "Deleted"


#: Phases in which a deployment holds its name: a second provision of the same
#: namespace/type/name is either the same request again or a conflict.
ACTIVE_PHASES = frozenset({Phase.PENDING, Phase.PROVISIONING, Phase.READY, Phase.DELETING})
FINISHED_PHASES = frozenset({Phase.READY, Phase.FAILED, Phase.DELETED})


class ResourceType(StrEnum):
    DATABASE = "database"
    CACHE = "cache"
    TOPIC = "topic"
    BUCKET = "bucket"
    SERVICE = "service"


class Size(StrEnum):
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"
    XLARGE = "xlarge"


class DeletionPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"
    SNAPSHOT = "Snapshot"


class WireModel(BaseModel):
    """Base for models on the wire: camelCase aliases, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=False,
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict with camelCase keys, unset optionals dropped."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class BackupSpec(WireModel):
    enabled: bool = True
    retention: Annotated[str, StringConstraints(pattern=_RETENTION.pattern)] = Field(
        default="7d", description="How long backups are kept, in days: '7d'."
    )
    schedule: Annotated[str, StringConstraints(pattern=_CRON.pattern, max_length=100)] | None = (
        Field(default=None, description="Cron expression (five fields) for the backup window.")
    )

    @property
    def retention_days(self) -> int:
        return int(self.retention[:-1])


class EncryptionSpec(WireModel):
    at_rest: bool = True
    in_transit: bool = True


class ResourceSpec(WireModel):
    """What the caller wants. Which fields apply depends on the resource type;
    the catalogue refuses a field that does not apply to the requested type."""

    engine: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = None
    version: Annotated[str, StringConstraints(min_length=1, max_length=16)] | None = None
    size: Size | None = None
    high_availability: bool = False
    storage_gb: Annotated[int, Field(ge=1, le=65536)] | None = None
    backup: BackupSpec | None = None
    encryption: EncryptionSpec | None = None
    # topic
    partitions: Annotated[int, Field(ge=1, le=1000)] | None = None
    replication_factor: Annotated[int, Field(ge=1, le=5)] | None = None
    retention_hours: Annotated[int, Field(ge=1, le=87600)] | None = None
    # bucket
    versioning: bool | None = None
    # service
    image: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    replicas: Annotated[int, Field(ge=1, le=100)] | None = None


class Target(WireModel):
    """Where the caller expects the resource; must match this broker."""

    cloud: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    region: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None


class ProvisionRequest(WireModel):
    """``POST /v1/provision`` (alias ``POST /api/v1/deploy``)."""

    resource_type: ResourceType
    resource_name: KubeName
    namespace: KubeName
    team: Label
    owner: Email
    callback_url: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = None
    application: Label | None = Field(
        default=None, description="Tagged as application; defaults to resourceName."
    )
    resource_uid: uuid.UUID | None = Field(
        default=None,
        description="The caller's id for this resource (a CR uid); defaults to a UUID "
        "derived from namespace/resourceType/resourceName.",
    )
    deletion_policy: DeletionPolicy = DeletionPolicy.DELETE
    target: Target | None = None
    spec: ResourceSpec = Field(default_factory=ResourceSpec)


class DeprovisionRequest(WireModel):
    """``POST /v1/deprovision``: by deploymentId, or by namespace/type/name."""

    deployment_id: DeploymentId | None = None
    resource_type: ResourceType | None = None
    resource_name: KubeName | None = None
    namespace: KubeName
    callback_url: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = None
    deletion_policy: DeletionPolicy | None = None


class ResourceQuery(WireModel):
    """``POST /v1/resources`` body (the same filters as the GET query)."""

    namespace: KubeName
    resource_type: ResourceType | None = None
    resource_name: KubeName | None = None
    deployment_id: DeploymentId | None = None


class Accepted(WireModel):
    status: Literal["accepted", "exists"] = "accepted"
    deployment_id: str | None = None
    message: str


class ErrorBody(BaseModel):
    """``{"error": "<code>", "message": "...", "code": <http status>}``."""

    model_config = ConfigDict(extra="forbid")
    error: str
    message: str
    code: int


class Cost(BaseModel):
    """Seed 000's cost attribution block (snake_case keys, as in the seed)."""

    model_config = ConfigDict(frozen=True)
    estimated_monthly: float
    currency: str = "USD"
    breakdown: dict[str, float]


class SecretRef(WireModel):
    """Where the credentials are; never the credentials themselves."""

    store: str
    name: str
    id: str
    version: str | None = None


class CloudResource(BaseModel):
    """What the provider reports about a resource it made or found."""

    model_config = ConfigDict(frozen=True)
    cloud_resource_id: str
    state: Literal["creating", "available", "failed", "deleting", "missing", "modifying"]
    message: str = ""
    endpoint: str | None = None
    port: int | None = None
    actual_spec: dict[str, Any] = Field(default_factory=dict)
    resource_usage: dict[str, Any] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    progress: int | None = None


class ManagedResource(BaseModel):
    """A resource found in the cloud by ``list_managed`` (for drift and orphans)."""

    model_config = ConfigDict(frozen=True)
    cloud_resource_id: str
    resource_type: ResourceType
    name: str
    tags: dict[str, str]
    tagged: bool = True


class Deployment(BaseModel):
    """The broker's record of one deployment: what was asked and where it is."""

    model_config = ConfigDict(frozen=True)

    id: str
    namespace: str
    resource_type: ResourceType
    resource_name: str
    team: str
    owner: str
    application: str
    resource_uid: str
    callback_url: str | None
    spec: ResourceSpec
    spec_fingerprint: str
    deletion_policy: DeletionPolicy
    provider: str
    region: str
    phase: Phase = Phase.PENDING
    message: str = ""
    error: str | None = None
    progress: int = 0
    request_id: str | None = None
    subject: str = ""
    cloud_resource_id: str | None = None
    endpoint: str | None = None
    port: int | None = None
    secret_ref: SecretRef | None = None
    actual_spec: dict[str, Any] = Field(default_factory=dict)
    resource_usage: dict[str, Any] = Field(default_factory=dict)
    cost: Cost | None = None
    drift_fingerprint: str | None = None
    drift_details: list[str] = Field(default_factory=list)
    drift_detected: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    last_checked_at: datetime | None = None
    last_progress_at: datetime | None = None
    credentials_rotated_at: datetime | None = None
    deleting_since: datetime | None = None
    #: Id of the one job allowed to drive this deployment next; a duplicate or
    #: superseded job sees a different token and drops itself.
    job_token: str | None = None
    version: int = 0

    @property
    def is_active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    def evolve(self, **changes: Any) -> Deployment:
        """A copy with ``changes`` applied and ``updated_at`` refreshed."""
        changes.setdefault("updated_at", utcnow())
        return self.model_copy(update=changes)


class CallbackPayload(WireModel):
    """The body POSTed to ``callbackUrl`` (seed 001), plus drift fields."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )
    deployment_id: str
    resource_type: str
    resource_name: str
    namespace: str
    phase: Phase
    message: str
    time: datetime
    endpoint: str | None = None
    port: int | None = None
    connection_secret: str | None = None
    additional_metadata: dict[str, Any] = Field(default_factory=dict)
    estimated_monthly_cost: float | None = None
    drift_detected: bool | None = None
    drift_details: list[str] | None = None


class CallbackEvent(BaseModel):
    """One callback in the outbox; ``id`` is the ``webhook-id`` of every attempt."""

    model_config = ConfigDict(frozen=True)
    id: str
    deployment_id: str
    url: str
    payload: dict[str, Any]
    created_at: datetime = Field(default_factory=utcnow)
    attempts: int = 0
    delivered_at: datetime | None = None
    dead_at: datetime | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None


class DeadLetter(BaseModel):
    """A callback that exhausted its fast retries, kept for inspection and replay."""

    model_config = ConfigDict(frozen=True)
    id: str
    event_id: str
    deployment_id: str
    url: str
    payload: dict[str, Any]
    reason: str
    attempts: int
    created_at: datetime = Field(default_factory=utcnow)
    next_retry_at: datetime | None = None
    given_up_at: datetime | None = None
    resolved_at: datetime | None = None


class CostSnapshot(BaseModel):
    model_config = ConfigDict(frozen=True)
    deployment_id: str
    day: str
    namespace: str
    team: str
    application: str
    resource_type: str
    amount: float
    currency: str = "USD"


class JobKind(StrEnum):
    PROVISION = "provision"
    POLL = "poll"
    DELETE = "delete"
    CALLBACK = "callback"
    ROTATE = "rotate"
    #: Re-read one deployment from the cloud now (a watcher saw its objects change).
    SYNC = "sync"


class Job(BaseModel):
    """A unit of asynchronous work; jobs are idempotent by design."""

    model_config = ConfigDict(frozen=True)
    kind: JobKind
    deployment_id: str
    event_id: str | None = None
    #: For callback jobs: the event's attempt count when scheduled (stale copies drop).
    seq: int = 0
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Job:
        return cls.model_validate_json(raw)


def phase_totals(grouped: Mapping[tuple[str, ResourceType, Phase], int]) -> dict[Phase, int]:
    """Deployments per phase (every phase present, zeros included) from counts
    per (namespace, resource type, phase)."""
    totals = dict.fromkeys(Phase, 0)
    for (_, _, phase), n in grouped.items():
        totals[phase] += n
    return totals
