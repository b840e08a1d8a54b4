"""The ports: what the core needs from the outside world.

Adapters live in ``kidp.providers``, ``kidp.stores``, ``kidp.queues`` and
``kidp.secrets``; the composition root (:mod:`kidp.bootstrap`) picks them from
settings. Every method here is synchronous: the core runs the same way in a
Lambda, an Azure Function, a worker thread or a test.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from kidp.models import (
    CallbackEvent,
    CloudResource,
    CostSnapshot,
    DeadLetter,
    Deployment,
    Job,
    ManagedResource,
    Phase,
    ResourceType,
    SecretRef,
)


@dataclass(frozen=True)
class Credentials:
    """Generated credentials handed to a provider; never logged (``repr`` hides them)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class QuotaReport:
    """What ``validate_quota`` found; raise ``QuotaExceeded`` instead when it does not fit."""

    checked: bool
    details: dict[str, Any]


@dataclass(frozen=True)
class PasswordPolicy:
    """What the cloud accepts as a password, so the core can generate one."""

    length: int = 32
    alphabet: str = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    username: str = "kidpadmin"


@runtime_checkable
class CloudProvider(Protocol):
    """Seed 000's plugin interface (Deploy, GetStatus, Delete, ValidateQuota) plus
    ``list_managed`` for the scans. Every operation is idempotent, keyed by the
    deployment's tags: ``deploy`` adopts a resource that already carries the
    deployment id, ``delete`` of an absent resource succeeds."""

    name: str
    region: str

    def supported(self) -> dict[ResourceType, dict[str, list[str]]]:
        """Resource types this provider can make, each mapped to engine -> versions
        (an empty engine name ``""`` for types without engines)."""
        ...

    def password_policy(self, deployment: Deployment) -> PasswordPolicy | None:
        """How to generate credentials for ``deployment``, or None if it takes none."""
        ...

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        """The cloud-specific parameters ``deploy`` would send (a dry run; no calls)."""
        ...

    def validate_quota(self, deployment: Deployment) -> QuotaReport:
        """Raise ``QuotaExceeded`` when the account cannot take this deployment."""
        ...

    def deploy(
        self,
        deployment: Deployment,
        tags: dict[str, str],
        credentials: Credentials | None,
    ) -> CloudResource:
        """Create the resource, or adopt the one already tagged with this deployment."""
        ...

    def get_status(self, deployment: Deployment) -> CloudResource:
        """The resource as the cloud sees it now (``state="missing"`` if gone)."""
        ...

    def delete(self, deployment: Deployment) -> bool:
        """Start or continue deleting; True once nothing is left. Honours
        ``deployment.deletion_policy`` (Snapshot takes a final snapshot first)."""
        ...

    def rotate_credentials(self, deployment: Deployment, credentials: Credentials) -> None:
        """Set new credentials on the running resource."""
        ...

    def list_managed(self) -> Sequence[ManagedResource]:
        """Every resource carrying this broker's managed-by tag, plus untagged
        resources in places only tagged ones should be (``tagged=False``)."""
        ...

    def check(self) -> None:
        """Raise ``CloudUnavailable`` when the cloud API cannot be reached."""
        ...


class ChangeWatcher(Protocol):
    """A running watch on the cloud's managed objects (seed 004's watcher)."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...


@runtime_checkable
class WatchableProvider(Protocol):
    """A provider whose cloud can push changes (Kubernetes watches). Providers
    without one rely on polls and the drift scan."""

    def change_watcher(self, on_change: Callable[[str], None]) -> ChangeWatcher:
        """A watcher calling ``on_change(deployment_id)`` for every change it sees."""
        ...


class SecretStore(Protocol):
    """Put, reference and rotate credentials in the cloud's secret store."""

    def ensure(
        self,
        name: str,
        create: Callable[[], dict[str, str]],
        tags: dict[str, str],
    ) -> tuple[SecretRef, dict[str, str]]:
        """Return the secret ``name``, creating it from ``create()`` if absent.
        Never regenerates an existing value: a retried provision must reuse it."""
        ...

    def put_version(self, name: str, value: dict[str, str]) -> SecretRef:
        """Store a new current version of an existing secret (rotation)."""
        ...

    def delete(self, name: str) -> None:
        """Delete the secret; deleting an absent secret succeeds."""
        ...

    def check(self) -> None:
        """Raise ``TemporaryError`` when the secret store cannot be reached."""
        ...


class DeploymentStore(Protocol):
    """Deployments, the callback outbox, dead letters and cost history."""

    def create(self, deployment: Deployment) -> Deployment:
        """Insert a new deployment. Raise ``DuplicateDeployment`` carrying the existing
        record when an active one holds the same namespace/type/name, or the
        same namespace/request id exists."""
        ...

    def get(self, deployment_id: str) -> Deployment | None: ...

    def find_active(
        self, namespace: str, resource_type: ResourceType, resource_name: str
    ) -> Deployment | None: ...

    def find_by_request_id(self, namespace: str, request_id: str) -> Deployment | None: ...

    def save(
        self,
        deployment: Deployment,
        *,
        expected_version: int,
        events: Sequence[CallbackEvent] = (),
    ) -> Deployment:
        """Write ``deployment`` if the stored version is still ``expected_version``,
        together with ``events`` in the same transaction (the outbox). Returns the
        record with its version incremented; raises ``ConcurrentUpdate`` otherwise."""
        ...

    def try_start(self, deployment_id: str, *, expected_version: int, cap: int) -> bool:
        """Move a Pending deployment to Provisioning only while fewer than ``cap``
        deployments of its namespace are Provisioning. Atomic. Raises
        ``ConcurrentUpdate`` when the stored version is no longer ``expected_version``."""
        ...

    def list(
        self,
        *,
        namespace: str | None = None,
        phases: Iterable[Phase] | None = None,
        resource_type: ResourceType | None = None,
        resource_name: str | None = None,
        updated_before: datetime | None = None,
        limit: int = 1000,
    ) -> builtins.list[Deployment]: ...

    def count_by_phase(self) -> dict[Phase, int]: ...

    def count_by_namespace_type_phase(self) -> dict[tuple[str, ResourceType, Phase], int]:
        """How many deployments per (namespace, resource type, phase), in one
        pass over what ``count_by_phase`` reads; groups without any are absent."""
        ...

    def purge_finished(self, *, before: datetime) -> int:
        """Forget Deleted deployments finished before ``before``; returns how many."""
        ...

    # outbox
    def get_event(self, event_id: str) -> CallbackEvent | None: ...

    def save_event(self, event: CallbackEvent) -> None: ...

    def pending_events(
        self, *, created_before: datetime, limit: int = 100
    ) -> builtins.list[CallbackEvent]:
        """Undelivered, not dead-lettered events (to re-enqueue after a crash)."""
        ...

    # dead letters
    def add_dead_letter(self, letter: DeadLetter) -> None: ...

    def get_dead_letter(self, letter_id: str) -> DeadLetter | None: ...

    def save_dead_letter(self, letter: DeadLetter) -> None: ...

    def list_dead_letters(self, *, include_resolved: bool = False) -> builtins.list[DeadLetter]: ...

    # cost history
    def put_cost_snapshot(self, snapshot: CostSnapshot) -> None:
        """Insert or replace the snapshot for (deployment, day)."""
        ...

    def cost_snapshots(self, *, day: str) -> builtins.list[CostSnapshot]: ...

    def check(self) -> None: ...


@dataclass(frozen=True)
class Delivery:
    """A job handed out by a pull queue; ``attempt`` counts deliveries from 1."""

    job: Job
    receipt: str
    attempt: int


class JobQueue(Protocol):
    """At-least-once jobs with a delay. Push platforms (SQS to Lambda) only use
    ``enqueue``; pull runtimes also use ``receive``/``ack``/``retry``."""

    def enqueue(self, job: Job, *, delay: float = 0.0) -> None:
        """Add ``job``. Enqueueing the id of a job that is waiting is a no-op;
        enqueueing the id of a job that is leased runs it once more after its
        current holder acknowledges it (a job may re-enqueue itself)."""
        ...

    def receive(self, *, max_jobs: int, lease_seconds: float) -> list[Delivery]:
        """Jobs due now, leased to the caller; an unacknowledged lease expires and
        the job is delivered again (that is what survives a kill -9)."""
        ...

    def ack(self, delivery: Delivery) -> None: ...

    def retry(self, delivery: Delivery, *, delay: float) -> None: ...

    def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        """Give up on a job after its maximum deliveries."""
        ...

    def check(self) -> None: ...


@runtime_checkable
class DeadJobQueue(Protocol):
    """A job queue that keeps the jobs it gave up on (the SQL table's dead rows,
    the SQS dead-letter queue, the NATS dead stream, an Azure poison queue, a
    Pub/Sub dead-letter subscription), so an operator can list them and send
    them back (:mod:`kidp.deadletters`)."""

    def dead_jobs(self) -> list[tuple[Job, str]]:
        """Dead jobs with the reason each was given up, oldest first."""
        ...

    def replay_dead(self, job_id: str) -> Job | None:
        """Enqueue the dead job ``job_id`` afresh (deliveries counted from 1) and
        forget its dead copy; None when no job with that id is dead."""
        ...


class RateLimiter(Protocol):
    def hit(self, key: str, *, limit: int, window_seconds: float) -> float | None:
        """Count one request for ``key``; None if allowed, else seconds to wait."""
        ...
