"""The use cases: submit, deprovision, read, and work the jobs that move a
deployment through its phases.

``BrokerService`` knows no cloud and no platform: it talks to the ports. The
HTTP API, every worker edge and every timer call into it.

How nothing is lost or done twice:

* A deployment and the callbacks it owes are written in one store
  transaction (the outbox); the job that sends a callback can be lost and is
  re-created by :meth:`BrokerService.reconcile`.
* Jobs are idempotent. Each deployment carries a ``job_token``: only the job
  with that id may drive it, so a duplicate delivery or a superseded job drops
  itself. State changes use optimistic versions, so two workers racing on one
  deployment make one change.
* Providers adopt the resource tagged with the deployment id instead of
  creating a second one, so a crash between "cloud call made" and "state
  saved" is repaired by simply running the job again.
"""

from __future__ import annotations

import logging
import secrets as random_secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kidp import catalog, pricing
from kidp.callbacks import CallbackSender
from kidp.callers import SCOPE_DELETE, SCOPE_DEPLOY, SCOPE_READ, Caller
from kidp.drift import compare
from kidp.errors import (
    BrokerError,
    ConcurrentUpdate,
    Conflict,
    DuplicateDeployment,
    Forbidden,
    NotFound,
    PermanentError,
    TemporaryError,
    ValidationFailed,
)
from kidp.models import (
    ACTIVE_PHASES,
    Accepted,
    CallbackEvent,
    CallbackPayload,
    CloudResource,
    Cost,
    DeadLetter,
    DeletionPolicy,
    Deployment,
    DeprovisionRequest,
    Job,
    JobKind,
    Phase,
    ProvisionRequest,
    ResourceSpec,
    ResourceType,
    SecretRef,
    new_deployment_id,
    phase_totals,
    utcnow,
)
from kidp.observability import Metrics
from kidp.ports import CloudProvider, Credentials, DeploymentStore, JobQueue, SecretStore
from kidp.settings import Settings
from kidp.ssrf import Allowlist, check_callback_url
from kidp.tags import logical_tags

log = logging.getLogger("kidp.service")
audit = logging.getLogger("kidp.audit")

#: Dead letters retried per reconcile pass (each may wait out the callback timeout).
DEAD_LETTERS_PER_PASS = 10

#: Scheduled syncs remembered before the ones already run are forgotten.
SCHEDULED_SYNCS_KEPT = 10_000

#: How long ``/health`` reuses its dependency checks.
HEALTH_CACHE_SECONDS = 5.0

#: Rough provisioning times, for ``estimatedCompletion`` while in progress.
TYPICAL_DURATION = {
    ResourceType.DATABASE: timedelta(minutes=15),
    ResourceType.CACHE: timedelta(minutes=10),
    ResourceType.TOPIC: timedelta(minutes=1),
    ResourceType.BUCKET: timedelta(minutes=1),
    ResourceType.SERVICE: timedelta(minutes=5),
}


def fingerprint(spec: ResourceSpec, team: str, application: str, deletion_policy: str) -> str:
    """Equal fingerprints mean "the same request again" (after defaults are filled)."""
    import hashlib
    import json

    material = {
        "spec": spec.wire(),
        "team": team,
        "application": application,
        "deletionPolicy": deletion_policy,
    }
    return hashlib.sha256(
        json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def secret_name(deployment: Deployment) -> str:
    """Where a deployment's credentials live in the secret store."""
    return f"kidp/{deployment.namespace}/{deployment.resource_name}-credentials"


def connection_secret(deployment: Deployment) -> str:
    """The seed's ``connectionSecret``: the credentials' name, never their value."""
    return f"{deployment.resource_name}-credentials"


def generate_password(length: int, alphabet: str) -> str:
    """A random password from ``alphabet`` (the provider's rules)."""
    return "".join(random_secrets.choice(alphabet) for _ in range(length))


@dataclass
class DryRunPlan:
    """What ``POST /v1/provision?dryRun=true`` reports."""

    body: dict[str, Any]


@dataclass
class ServiceClock:
    """Wall clock for records, monotonic clock for uptime; injectable in tests."""

    now: Callable[[], datetime] = utcnow
    monotonic: Callable[[], float] = time.monotonic


@dataclass
class BrokerService:
    """The broker's use cases over its ports."""

    settings: Settings
    provider: CloudProvider
    store: DeploymentStore
    queue: JobQueue
    secrets: SecretStore
    sender: CallbackSender
    metrics: Metrics = field(default_factory=Metrics)
    clock: ServiceClock = field(default_factory=ServiceClock)

    def __post_init__(self) -> None:
        self.allowlist = Allowlist.parse(self.settings.callback_allowlist)
        self.started = self.clock.monotonic()
        self._checks_lock = threading.Lock()
        self._checks: dict[str, tuple[float, bool, dict[str, Any]]] = {}
        self._syncs_lock = threading.Lock()
        #: When the sync scheduled for each deployment runs (monotonic clock).
        self._syncs: dict[str, float] = {}
        self.metrics.use_provider(self.provider.name)

    # ------------------------------------------------------------------ submit

    def submit_provision(
        self,
        caller: Caller,
        request: ProvisionRequest,
        *,
        request_id: str | None = None,
        dry_run: bool = False,
    ) -> Accepted | DryRunPlan:
        """Validate, deduplicate, check quota, store Pending and enqueue the work."""
        caller.require_scope(SCOPE_DEPLOY)
        if not caller.may_access(request.namespace):
            raise Forbidden(f"token may not deploy to namespace '{request.namespace}'")
        spec = catalog.normalize(request.resource_type, request.spec, self.provider.supported())
        self._check_target(request)
        if request.callback_url is not None:
            check_callback_url(request.callback_url, self.allowlist)
        application = request.application or request.resource_name
        resource_uid = str(
            request.resource_uid
            or uuid.uuid5(
                uuid.NAMESPACE_URL,
                f"kidp:{request.namespace}/{request.resource_type.value}/{request.resource_name}",
            )
        )
        now = self.clock.now()
        job = Job(kind=JobKind.PROVISION, deployment_id="")
        deployment = Deployment(
            id=new_deployment_id(),
            namespace=request.namespace,
            resource_type=request.resource_type,
            resource_name=request.resource_name,
            team=request.team,
            owner=request.owner,
            application=application,
            resource_uid=resource_uid,
            callback_url=request.callback_url,
            spec=spec,
            spec_fingerprint=fingerprint(
                spec, request.team, application, request.deletion_policy.value
            ),
            deletion_policy=request.deletion_policy,
            provider=self.provider.name,
            region=self.provider.region,
            message=f"Provisioning request accepted for "
            f"{request.resource_type.value}/{request.resource_name}",
            request_id=request_id,
            subject=caller.subject,
            created_at=now,
            updated_at=now,
            job_token=job.id,
        )
        if dry_run:
            existing = self._existing(deployment)
            if existing is not None:
                return self._same_or_conflict(deployment, existing, dry_run=True)
            return self._plan(deployment, self.provider.validate_quota(deployment).details)
        try:
            self.provider.validate_quota(deployment)
        except BrokerError:
            # A request that already exists is answered as such, whatever the
            # cloud says now (a client retrying after a timeout must get its id).
            existing = self._existing(deployment)
            if existing is not None:
                return self._same_or_conflict(deployment, existing, dry_run=False)
            raise
        try:
            # No lookup first: the store's unique rules find an existing
            # deployment (same resource, or same X-Request-ID) in the insert itself.
            deployment = self.store.create(deployment)
        except DuplicateDeployment as duplicate:
            return self._same_or_conflict(deployment, duplicate.existing, dry_run=False)
        self._enqueue(job.model_copy(update={"deployment_id": deployment.id}))
        self.metrics.provision_requests.labels(deployment.resource_type.value, "accepted").inc()
        audit.info(
            "provision accepted",
            extra={
                "deploymentId": deployment.id,
                "subject": caller.subject,
                "namespace": deployment.namespace,
            },
        )
        return Accepted(status="accepted", deployment_id=deployment.id, message=deployment.message)

    def _check_target(self, request: ProvisionRequest) -> None:
        target = request.target
        if target is None:
            return
        if target.cloud.lower() != self.settings.cloud.lower() or (
            target.region is not None and target.region != self.provider.region
        ):
            raise ValidationFailed(
                f"target {target.cloud}/{target.region or '*'} does not match this broker "
                f"({self.settings.cloud}/{self.provider.region})"
            )

    def _existing(self, deployment: Deployment) -> Deployment | None:
        if deployment.request_id:
            found = self.store.find_by_request_id(deployment.namespace, deployment.request_id)
            if found is not None:
                return found
        return self.store.find_active(
            deployment.namespace, deployment.resource_type, deployment.resource_name
        )

    def _same_or_conflict(
        self, wanted: Deployment, existing: Deployment, *, dry_run: bool
    ) -> Accepted | DryRunPlan:
        same_resource = (existing.resource_type, existing.resource_name) == (
            wanted.resource_type,
            wanted.resource_name,
        )
        if existing.phase is Phase.DELETING and same_resource:
            raise Conflict(
                f"{existing.resource_type.value}/{existing.resource_name} is being deleted "
                f"(deployment {existing.id}); provision it again once it is Deleted"
            )
        if same_resource and existing.spec_fingerprint == wanted.spec_fingerprint:
            if dry_run:
                return DryRunPlan(
                    {
                        "dryRun": True,
                        "action": "none",
                        "existingDeploymentId": existing.id,
                        "message": "an identical deployment already exists; nothing would change",
                    }
                )
            return Accepted(
                status="exists",
                deployment_id=existing.id,
                message=f"Deployment {existing.id} already exists for "
                f"{existing.resource_type.value}/{existing.resource_name} "
                f"(phase {existing.phase.value})",
            )
        if wanted.request_id and existing.request_id == wanted.request_id and not same_resource:
            raise Conflict(f"X-Request-ID was already used for deployment {existing.id}")
        raise Conflict(
            f"{existing.resource_type.value}/{existing.resource_name} in namespace "
            f"{existing.namespace} is held by deployment {existing.id} "
            f"(phase {existing.phase.value}) with a different spec"
        )

    def _plan(self, deployment: Deployment, quota: dict[str, Any]) -> DryRunPlan:
        tags = self._tags(deployment)
        policy = self.provider.password_policy(deployment)
        cost = pricing.estimate(
            self.provider.name, deployment.resource_type, deployment.spec.wire()
        )
        return DryRunPlan(
            {
                "dryRun": True,
                "action": "create",
                "resourceType": deployment.resource_type.value,
                "resourceName": deployment.resource_name,
                "namespace": deployment.namespace,
                "provider": self.provider.name,
                "region": self.provider.region,
                "spec": deployment.spec.wire(),
                "cloud": self.provider.plan(deployment, tags),
                "tags": tags,
                "secret": (
                    {
                        "store": type(self.secrets).__name__,
                        "name": secret_name(deployment),
                        "connectionSecret": connection_secret(deployment),
                    }
                    if policy is not None
                    else None
                ),
                "quota": {"ok": True, **quota},
                "cost": cost.model_dump(),
            }
        )

    # --------------------------------------------------------------- deprovision

    def submit_deprovision(self, caller: Caller, request: DeprovisionRequest) -> Accepted:
        """Move a deployment to Deleting and enqueue the delete (idempotent)."""
        caller.require_scope(SCOPE_DELETE)
        if request.callback_url is not None:
            check_callback_url(request.callback_url, self.allowlist)
        for _ in range(5):
            deployment = self._find_for_delete(caller, request)
            if deployment.phase in (Phase.DELETING, Phase.DELETED):
                return Accepted(
                    deployment_id=deployment.id,
                    message=f"Deprovisioning already {deployment.phase.value.lower()} for "
                    f"deployment {deployment.id}",
                )
            job = Job(kind=JobKind.DELETE, deployment_id=deployment.id)
            changes: dict[str, Any] = {
                "phase": Phase.DELETING,
                "deleting_since": self.clock.now(),
                "message": f"Deleting {deployment.resource_type.value}/{deployment.resource_name}",
                "job_token": job.id,
                "error": None,
            }
            if request.callback_url is not None:
                changes["callback_url"] = request.callback_url
            if request.deletion_policy is not None:
                changes["deletion_policy"] = request.deletion_policy
            try:
                saved = self._transition(deployment, changes, notify=True)
            except DuplicateDeployment as duplicate:
                # A Failed deployment whose name was provisioned again: the new one
                # holds the name (and, on most clouds, the resource name).
                raise Conflict(
                    f"{deployment.resource_type.value}/{deployment.resource_name} is now held "
                    f"by deployment {duplicate.existing.id}; deprovision that one"
                ) from None
            if saved is None:
                continue  # changed under us (a poll, a scan): look again
            self._enqueue(job)
            audit.info(
                "deprovision accepted",
                extra={"deploymentId": deployment.id, "subject": caller.subject},
            )
            return Accepted(
                deployment_id=deployment.id,
                message=f"Deprovisioning request accepted for deployment {deployment.id}",
            )
        raise ConcurrentUpdate("the deployment kept changing while deleting; try again")

    def _find_for_delete(self, caller: Caller, request: DeprovisionRequest) -> Deployment:
        if not caller.may_access(request.namespace):
            raise NotFound("no such deployment")
        if request.deployment_id:
            found = self.store.get(request.deployment_id)
            if found is None or found.namespace != request.namespace:
                raise NotFound(f"deployment {request.deployment_id} not found")
            if request.resource_name and request.resource_name != found.resource_name:
                raise ValidationFailed(
                    f"deployment {found.id} is {found.resource_type.value}/"
                    f"{found.resource_name}, not {request.resource_name}"
                )
            return found
        if request.resource_type is None or request.resource_name is None:
            raise ValidationFailed("deploymentId, or resourceType and resourceName, are required")
        active = self.store.find_active(
            request.namespace, request.resource_type, request.resource_name
        )
        if active is None:
            raise NotFound(
                f"{request.resource_type.value}/{request.resource_name} not found in "
                f"namespace {request.namespace}"
            )
        return active

    # ------------------------------------------------------------------- reads

    def get_visible(self, caller: Caller, deployment_id: str) -> Deployment:
        """A deployment the caller may read; 404 (not 403) when it may not, so
        existence does not leak across namespaces."""
        caller.require_scope(SCOPE_READ)
        found = self.store.get(deployment_id)
        if found is not None and not caller.may_access(found.namespace):
            audit.warning(
                "read refused: namespace not allowed",
                extra={"deploymentId": deployment_id, "subject": caller.subject},
            )
            found = None
        if found is None:
            raise NotFound(f"deployment {deployment_id} not found")
        return found

    def status(self, deployment: Deployment) -> dict[str, Any]:
        """``GET /v1/status`` (seed 001)."""
        return {
            "deploymentId": deployment.id,
            "phase": deployment.phase.value,
            "message": deployment.message,
            "lastUpdated": _iso(deployment.updated_at),
        }

    def detailed_status(self, deployment: Deployment) -> dict[str, Any]:
        """``GET /api/v1/deployments/{id}``: seed 000's progress, error and ETA."""
        body = self.status(deployment)
        estimated = None
        if deployment.phase in (Phase.PENDING, Phase.PROVISIONING):
            estimated = _iso(
                (deployment.started_at or deployment.created_at)
                + TYPICAL_DURATION[deployment.resource_type]
            )
        body.update(
            {
                "resourceType": deployment.resource_type.value,
                "resourceName": deployment.resource_name,
                "namespace": deployment.namespace,
                "progress": deployment.progress,
                "error": deployment.error,
                "estimatedCompletion": estimated,
                "createdAt": _iso(deployment.created_at),
                "endpoint": deployment.endpoint,
                "port": deployment.port,
                "connectionSecret": (
                    connection_secret(deployment) if deployment.secret_ref else None
                ),
                "secretRef": deployment.secret_ref.wire() if deployment.secret_ref else None,
                "cloudResourceId": deployment.cloud_resource_id,
                "tags": self._tags(deployment),
                "cost": deployment.cost.model_dump() if deployment.cost else None,
                "deletionPolicy": deployment.deletion_policy.value,
                "spec": deployment.spec.wire(),
            }
        )
        return body

    def resources(
        self,
        caller: Caller,
        *,
        namespace: str,
        resource_type: ResourceType | None = None,
        resource_name: str | None = None,
        deployment_id: str | None = None,
    ) -> dict[str, Any]:
        """``GET/POST /v1/resources``: actual vs desired, checked live in the cloud."""
        caller.require_scope(SCOPE_READ)
        if not caller.may_access(namespace):
            audit.warning(
                "resources refused: namespace not allowed",
                extra={"namespace": namespace, "subject": caller.subject},
            )
            return {"resources": [], "total": 0, "namespace": namespace}
        found = self.store.list(
            namespace=namespace,
            phases=ACTIVE_PHASES | {Phase.FAILED},
            resource_type=resource_type,
            resource_name=resource_name,
        )
        if deployment_id:
            found = [d for d in found if d.id == deployment_id]
        views = [self._resource_view(d) for d in found]
        return {"resources": views, "total": len(views), "namespace": namespace}

    def _resource_view(self, deployment: Deployment) -> dict[str, Any]:
        from kidp.drift import compare

        checked = self.clock.now()
        actual: dict[str, Any] | None = deployment.actual_spec or None
        usage = deployment.resource_usage
        health = "Unknown"
        message = deployment.message
        if deployment.cloud_resource_id and deployment.phase in (Phase.READY, Phase.PROVISIONING):
            try:
                resource = self.provider.get_status(deployment)
            except BrokerError as exc:
                message = f"{deployment.message} (cloud check failed: {exc.message}; last known)"
                checked = deployment.last_checked_at or deployment.updated_at
            else:
                actual = None if resource.state == "missing" else resource.actual_spec
                usage = resource.resource_usage or usage
                health = _health(resource)
        desired = deployment.spec.wire()
        report = compare(desired, actual) if actual is not None or health == "Missing" else None
        view: dict[str, Any] = {
            "deploymentId": deployment.id,
            "resourceType": deployment.resource_type.value,
            "resourceName": deployment.resource_name,
            "namespace": deployment.namespace,
            "phase": deployment.phase.value,
            "healthStatus": health,
            "message": message,
            "lastChecked": _iso(checked),
            "endpoint": deployment.endpoint,
            "port": deployment.port,
            "connectionSecret": connection_secret(deployment) if deployment.secret_ref else None,
            "actualSpec": actual or {},
            "desiredSpec": desired,
            "driftDetected": bool(report and report.significant),
            "driftDetails": report.details if report else [],
            "resourceUsage": usage,
            "estimatedMonthlyCost": deployment.cost.estimated_monthly if deployment.cost else None,
        }
        return view

    def catalog(self) -> dict[str, Any]:
        """``GET /v1/catalog``."""
        body = catalog.describe(self.provider.supported())
        body.update(
            {
                "provider": self.provider.name,
                "cloud": self.settings.cloud,
                "region": self.provider.region,
            }
        )
        return body

    # ----------------------------------------------------------------- health

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``GET /health`` (seeds 001 and 002) with per-dependency checks.

        The checks and counts are reused for ``HEALTH_CACHE_SECONDS``: probes
        from every replica and manager must not become load on the store and
        the cloud API. Time and uptime are always current.
        """
        serving, body = self._cached("health", self._check_health)
        uptime = int(self.clock.monotonic() - self.started)
        return serving, {
            **body,
            "time": _iso(self.clock.now()),
            "uptime": _duration(uptime),
            "uptimeSeconds": uptime,
        }

    def count_resources(self) -> dict[Phase, int]:
        """Deployments per phase, counted once per (namespace, type, phase) and
        set as ``broker_resources_total``: by the health check, every scrape
        (:meth:`render_metrics`) and every reconcile, which is when a Lambda,
        which no scraper visits, emits it."""
        grouped = self.store.count_by_namespace_type_phase()
        self.metrics.set_resources(grouped)
        return phase_totals(grouped)

    def render_metrics(self) -> bytes:
        """The Prometheus exposition with ``broker_resources_total`` counted
        now; a store that does not answer leaves the gauge at its last counts
        and the other metrics still answer."""
        try:
            self.count_resources()
        except BrokerError as exc:
            log.warning("resource counts unavailable", extra={"reason": exc.message})
        return self.metrics.render()

    def _check_health(self) -> tuple[bool, dict[str, Any]]:
        counts = self.count_resources()
        checks = {
            "store": _probe(self.store.check),
            "queue": _probe(self.queue.check),
            "cloudApi": _probe(self.provider.check),
        }
        self.metrics.cloud_available.set(1 if checks["cloudApi"]["status"] == "ok" else 0)
        active = sum(n for phase, n in counts.items() if phase in ACTIVE_PHASES)
        self.metrics.active_deployments.set(active)
        serving = checks["store"]["status"] == "ok" and checks["queue"]["status"] == "ok"
        if not serving:
            status = "unhealthy"
        elif checks["cloudApi"]["status"] != "ok":
            status = "degraded"
        else:
            status = "healthy"
        return serving, {
            "status": status,
            "version": self.settings.version,
            "activeDeployments": active,
            "totalDeployments": sum(counts.values()),
            "failedDeployments": counts.get(Phase.FAILED, 0),
            "checks": checks,
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``GET /readiness``: ready when store, queue and cloud API answer
        (reused for ``HEALTH_CACHE_SECONDS``, like the health checks)."""
        return self._cached("readiness", self._check_readiness)

    def _cached(
        self, name: str, check: Callable[[], tuple[bool, dict[str, Any]]]
    ) -> tuple[bool, dict[str, Any]]:
        now = self.clock.monotonic()
        with self._checks_lock:
            hit = self._checks.get(name)
            if hit is None or now - hit[0] >= HEALTH_CACHE_SECONDS:
                hit = (now, *check())
                self._checks[name] = hit
        return hit[1], hit[2]

    def _check_readiness(self) -> tuple[bool, dict[str, Any]]:
        for name, check in (
            ("store", self.store.check),
            ("queue", self.queue.check),
            ("cloud API", self.provider.check),
        ):
            result = _probe(check)
            if result["status"] != "ok":
                return False, {
                    "ready": False,
                    "reason": f"{name} not accessible: {result['error']}",
                    "version": self.settings.version,
                }
        return True, {"ready": True, "reason": "ok", "version": self.settings.version}

    # -------------------------------------------------------------------- jobs

    def handle(self, job: Job) -> None:
        """Work one job. Returns normally when the job is done (including "nothing
        to do"); raises ``TemporaryError`` to have the queue deliver it again and
        ``PermanentError`` when it can never succeed."""
        if job.kind is JobKind.CALLBACK:
            self._deliver(job)
            return
        deployment = self.store.get(job.deployment_id)
        if deployment is None:
            log.info(
                "job for unknown deployment dropped",
                extra={"deploymentId": job.deployment_id, "kind": job.kind.value},
            )
            return
        if job.kind is JobKind.SYNC:
            # A sync never owns the deployment (no job token): it only reads the
            # cloud now instead of at the next poll or scan. Its own errors are
            # dropped by kidp.work, never turned into a Failed deployment.
            self._sync(deployment)
            return
        if deployment.job_token is not None and job.id != deployment.job_token:
            log.debug("superseded job dropped", extra={"deploymentId": deployment.id})
            return
        overdue = self._overdue(deployment)
        if overdue is not None:
            # Checked before any cloud call: a cloud that only ever answers with
            # temporary errors must still end in Failed, not hold a slot forever.
            self._fail(deployment.id, PermanentError(overdue), token=job.id)
            return
        try:
            if job.kind is JobKind.PROVISION:
                self._provision(deployment, job)
            elif job.kind is JobKind.POLL:
                self._poll(deployment, job)
            elif job.kind is JobKind.DELETE:
                self._delete(deployment)
        except PermanentError as exc:
            self._fail(deployment.id, exc, token=job.id)

    def changed(self, deployment_id: str) -> None:
        """A watcher saw the cloud objects of ``deployment_id`` change: sync it
        ``sync_delay_seconds`` after this first change. The changes that follow
        within that time (a StatefulSet, its pods, its claims, each changing
        several times as they start) ride on the sync already scheduled, here
        without a trip to the queue and in the queue by the job's fixed id; a
        later change schedules the next sync."""
        delay = self.settings.sync_delay_seconds
        now = self.clock.monotonic()
        with self._syncs_lock:
            due = self._syncs.get(deployment_id)
            if due is not None and now < due:
                return
        job = Job(kind=JobKind.SYNC, deployment_id=deployment_id, id=f"sync-{deployment_id}")
        if not self._enqueue(job, delay=delay):
            return  # not scheduled: the next change tries again
        with self._syncs_lock:
            self._syncs[deployment_id] = now + delay
            if len(self._syncs) > SCHEDULED_SYNCS_KEPT:
                for key in [k for k, at in self._syncs.items() if at <= now]:
                    del self._syncs[key]

    def _sync(self, deployment: Deployment) -> None:
        if deployment.phase is Phase.READY:
            self.check_drift(deployment)
        elif deployment.phase is Phase.PROVISIONING and deployment.cloud_resource_id:
            resource = self.provider.get_status(deployment)
            if resource.state == "available":
                self._ready(deployment, resource)
            elif resource.state == "failed":
                reason = resource.message or "cloud resource failed"
                self._fail(deployment.id, PermanentError(reason), token=None)

    def _overdue(self, deployment: Deployment) -> str | None:
        """Why the deployment has run out of time, or None."""
        limit = self.settings.provision_timeout_seconds
        since = {
            Phase.PROVISIONING: (deployment.started_at, "ready"),
            Phase.DELETING: (deployment.deleting_since, "deleted"),
        }.get(deployment.phase)
        if since is None or since[0] is None:
            return None
        if (self.clock.now() - since[0]).total_seconds() <= limit:
            return None
        return f"not {since[1]} after {int(limit)} s"

    def give_up(self, job: Job, reason: str) -> None:
        """A job exhausted its deliveries (a poison message): fail its deployment
        with a callback so the caller is never left waiting."""
        if job.kind is JobKind.CALLBACK:
            if job.event_id:
                event = self.store.get_event(job.event_id)
                if event is not None and event.delivered_at is None:
                    self._dead_letter(event, reason)
            return
        self._fail(
            job.deployment_id, PermanentError(f"job failed repeatedly: {reason}"), token=job.id
        )

    def _provision(self, deployment: Deployment, job: Job) -> None:
        if deployment.phase is Phase.PENDING:
            try:
                started_now = self.store.try_start(
                    deployment.id,
                    expected_version=deployment.version,
                    cap=self.settings.namespace_concurrency,
                )
            except ConcurrentUpdate:
                started_now = False
            if not started_now:
                current = self.store.get(deployment.id)
                if current is not None and current.phase is Phase.PENDING:
                    # The namespace is at its cap: wait as Pending, never fail for it.
                    self._enqueue(job, delay=self.settings.namespace_wait_seconds)
                    return
                deployment = current or deployment
            else:
                started = self.store.get(deployment.id)
                assert started is not None
                deployment = started
        if deployment.phase is not Phase.PROVISIONING or deployment.cloud_resource_id:
            return
        tags = self._tags(deployment)
        secret_ref, credentials = self._credentials(deployment, tags)
        resource = self.provider.deploy(deployment, tags, credentials)
        poll = Job(kind=JobKind.POLL, deployment_id=deployment.id)
        now = self.clock.now()
        cost = pricing.estimate(
            self.provider.name, deployment.resource_type, deployment.spec.wire()
        )
        saved = self._transition(
            deployment,
            {
                "cloud_resource_id": resource.cloud_resource_id,
                "secret_ref": secret_ref,
                "cost": cost,
                "message": f"Creating {deployment.resource_type.value} "
                f"{deployment.resource_name} on {self.provider.name}",
                "progress": max(deployment.progress, resource.progress or 10),
                "credentials_rotated_at": now if credentials else None,
                "last_checked_at": now,
                "last_progress_at": now,
                "job_token": poll.id,
            },
            notify=True,
        )
        if saved is not None:
            # Already up (a bucket, an emulated cloud): Ready now, from what the
            # cloud just said, with no poll to ask it again. Should that save
            # lose a race, or the worker die before it, the poll (or reconcile)
            # finishes the job.
            if resource.state == "available":
                try:
                    if self._ready(saved, resource) is not None:
                        return
                except TemporaryError:
                    # The store could not take Ready now: the poll this
                    # deployment now waits for (its token) asks the cloud again.
                    log.warning("ready not recorded; polling", extra={"deploymentId": saved.id})
            self._enqueue(poll, delay=self.settings.poll_interval_seconds)
            return
        current = self.store.get(deployment.id)
        if current is not None and current.phase in (Phase.DELETING, Phase.DELETED):
            # Deprovisioned while this job was creating: a delete job may already
            # have found nothing, so remove what was just made (both idempotent).
            log.info(
                "cleaning up after a deprovision during provisioning",
                extra={"deploymentId": deployment.id},
            )
            self.provider.delete(current)
            if current.deletion_policy is DeletionPolicy.DELETE and secret_ref is not None:
                self.secrets.delete(secret_name(current))

    def _credentials(
        self, deployment: Deployment, tags: dict[str, str]
    ) -> tuple[SecretRef | None, Credentials | None]:
        policy = self.provider.password_policy(deployment)
        if policy is None:
            return None, None
        engine = deployment.spec.engine or deployment.resource_type.value
        ref, value = self.secrets.ensure(
            secret_name(deployment),
            lambda: {
                "username": policy.username,
                "password": generate_password(policy.length, policy.alphabet),
                "engine": engine,
            },
            tags,
        )
        return ref, Credentials(username=value["username"], password=value["password"])

    def _poll(self, deployment: Deployment, job: Job) -> None:
        if deployment.phase is not Phase.PROVISIONING:
            return
        if not deployment.cloud_resource_id:
            # The provision step never saved (crash): run it again; it adopts by tags.
            self._reschedule(deployment, JobKind.PROVISION)
            return
        resource = self.provider.get_status(deployment)
        now = self.clock.now()
        if resource.state == "available":
            self._ready(deployment, resource)
            return
        if resource.state in ("failed", "missing"):
            reason = resource.message or f"cloud resource is {resource.state}"
            self._fail(deployment.id, PermanentError(reason), token=job.id)
            return
        started = deployment.started_at or deployment.created_at
        progress = resource.progress or min(90, deployment.progress + 10)
        last = deployment.last_progress_at or started
        due = (now - last).total_seconds() >= self.settings.progress_interval_seconds
        poll = Job(kind=JobKind.POLL, deployment_id=deployment.id)
        changes: dict[str, Any] = {
            "progress": progress,
            "last_checked_at": now,
            "job_token": poll.id,
            "message": f"Provisioning in progress ({progress}%): cloud state {resource.state}",
        }
        if due:
            changes["last_progress_at"] = now
        if self._transition(deployment, changes, notify=due) is not None:
            self._enqueue(poll, delay=self.settings.poll_interval_seconds)

    def _ready(self, deployment: Deployment, resource: CloudResource) -> Deployment | None:
        """Record ``deployment`` as Ready on ``resource``; None if it changed first."""
        now = self.clock.now()
        saved = self._transition(
            deployment,
            {
                "phase": Phase.READY,
                "message": f"{deployment.resource_type.value.capitalize()} provisioned and healthy",
                "progress": 100,
                "endpoint": resource.endpoint,
                "port": resource.port,
                "actual_spec": resource.actual_spec,
                "resource_usage": resource.resource_usage,
                "finished_at": now,
                "last_checked_at": now,
                "job_token": None,
            },
            notify=True,
        )
        if saved is not None:
            started = deployment.started_at or deployment.created_at
            self.metrics.provision_duration.labels(deployment.resource_type.value).observe(
                (now - started).total_seconds()
            )
            self.metrics.provision_requests.labels(deployment.resource_type.value, "success").inc()
            log.info("deployment ready", extra={"deploymentId": deployment.id})
        return saved

    def _fail(self, deployment_id: str, error: BrokerError, *, token: str | None) -> None:
        """Fail the deployment with a callback, unless ``token`` (the failing
        job's id) no longer owns it: a superseded job must not fail a deployment
        another job is driving, e.g. a stale poll during a delete."""
        for _ in range(5):
            deployment = self.store.get(deployment_id)
            if deployment is None or deployment.phase in (Phase.FAILED, Phase.DELETED):
                return
            if token is not None and deployment.job_token not in (None, token):
                return
            deleting = deployment.phase is Phase.DELETING
            saved = self._transition(
                deployment,
                {
                    "phase": Phase.FAILED,
                    "message": ("Deletion failed: " if deleting else "Provisioning failed: ")
                    + error.message,
                    "error": error.message,
                    "finished_at": self.clock.now(),
                    "job_token": None,
                },
                notify=True,
            )
            if saved is not None:
                self.metrics.provision_requests.labels(
                    deployment.resource_type.value, "failed"
                ).inc()
                log.warning(
                    "deployment failed",
                    extra={"deploymentId": deployment.id, "reason": error.message},
                )
                return

    def _delete(self, deployment: Deployment) -> None:
        if deployment.phase is not Phase.DELETING:
            return
        finished = self.provider.delete(deployment)
        now = self.clock.now()
        if finished:
            secret_ref = deployment.secret_ref
            if secret_ref is not None and deployment.deletion_policy is DeletionPolicy.DELETE:
                self.secrets.delete(secret_name(deployment))
                secret_ref = None
            kept = {
                DeletionPolicy.RETAIN: " (cloud resource retained)",
                DeletionPolicy.SNAPSHOT: " (final snapshot kept)",
            }.get(deployment.deletion_policy, "")
            self._transition(
                deployment,
                {
                    "phase": Phase.DELETED,
                    # What was deleted can no longer be connected to.
                    "endpoint": None,
                    "port": None,
                    "secret_ref": secret_ref,
                    "message": f"{deployment.resource_type.value.capitalize()} "
                    f"successfully removed{kept}",
                    "finished_at": now,
                    "last_checked_at": now,
                    "progress": 100,
                    "job_token": None,
                },
                notify=True,
            )
            return
        self._reschedule(deployment, JobKind.DELETE, delay=self.settings.poll_interval_seconds)

    def _reschedule(
        self, deployment: Deployment, kind: JobKind, *, delay: float = 0.0
    ) -> Job | None:
        """Hand the deployment to a new job (superseding any other) and enqueue it."""
        job = Job(kind=kind, deployment_id=deployment.id)
        saved = self._transition(
            deployment, {"job_token": job.id, "last_checked_at": self.clock.now()}, notify=False
        )
        if saved is None:
            return None
        self._enqueue(job, delay=delay)
        return job

    # --------------------------------------------------------------- callbacks

    def _transition(
        self,
        deployment: Deployment,
        changes: dict[str, Any],
        *,
        notify: bool,
        extra: dict[str, Any] | None = None,
    ) -> Deployment | None:
        """Save ``changes`` (and, if ``notify``, the callback they owe) atomically.
        Returns None when another worker changed the deployment first."""
        updated = deployment.evolve(**changes)
        events: list[CallbackEvent] = []
        if notify and updated.callback_url:
            events.append(self._event(updated, extra or {}))
        try:
            saved = self.store.save(updated, expected_version=deployment.version, events=events)
        except ConcurrentUpdate:
            return None
        for event in events:
            self._enqueue(callback_job(event))
        return saved

    def record(self, deployment: Deployment, changes: dict[str, Any]) -> Deployment | None:
        """Save ``changes`` without a callback; None if someone changed it first."""
        return self._transition(deployment, changes, notify=False)

    def notify(
        self, deployment: Deployment, changes: dict[str, Any], extra: dict[str, Any]
    ) -> Deployment | None:
        """Save ``changes`` and send a callback carrying ``extra`` fields (scans use this)."""
        return self._transition(deployment, changes, notify=True, extra=extra)

    # ------------------------------------------------------------------- drift

    def check_drift(self, deployment: Deployment) -> bool:
        """Compare one Ready deployment with the cloud and record the result; a
        callback goes out only when the drift changed. Returns whether it did.
        Used by the drift scan and by watcher-triggered syncs."""
        resource = self.provider.get_status(deployment)
        actual = None if resource.state == "missing" else resource.actual_spec
        report = compare(deployment.spec.wire(), actual)
        changes: dict[str, Any] = {
            "drift_details": report.details,
            "drift_detected": report.significant,
            "drift_fingerprint": report.fingerprint,
        }
        if actual is not None:
            changes["actual_spec"] = actual
            changes["resource_usage"] = resource.resource_usage
            changes["cost"] = self.cost_of(deployment, actual)
        if report.fingerprint == deployment.drift_fingerprint:
            if any(getattr(deployment, k) != v for k, v in changes.items()):
                changes["last_checked_at"] = self.clock.now()
                self.record(deployment, changes)
            return False
        changes["last_checked_at"] = self.clock.now()
        if report.significant:
            self.metrics.drift_detected.labels(
                deployment.namespace, deployment.resource_type.value
            ).inc()
            log.warning(
                "drift detected", extra={"deploymentId": deployment.id, "details": report.details}
            )
            message = "Drift detected: " + "; ".join(report.details)
        else:
            message = "Drift resolved: resource matches the desired spec"
        changes["message"] = message
        self.notify(
            deployment,
            changes,
            {"drift_detected": report.significant, "drift_details": report.details},
        )
        return True

    def cost_of(self, deployment: Deployment, actual: dict[str, Any]) -> Cost:
        """Cost of what actually runs; sizes the catalogue does not know fall back
        to the desired size rather than guessing a price."""
        merged = {**deployment.spec.wire(), **actual}
        try:
            ResourceSpec.model_validate({"size": merged.get("size")})
        except ValueError:
            merged["size"] = deployment.spec.size
        return pricing.estimate(deployment.provider, deployment.resource_type, merged)

    def _event(self, deployment: Deployment, extra: dict[str, Any]) -> CallbackEvent:
        now = self.clock.now()
        metadata: dict[str, Any] = {
            "engine": deployment.spec.engine,
            "version": deployment.actual_spec.get("version", deployment.spec.version),
            "provider": deployment.provider,
            "region": deployment.region,
            "cloudResourceId": deployment.cloud_resource_id,
            "progress": deployment.progress,
            "tags": self._tags(deployment),
            # Callbacks travel as separate jobs and retries can overtake each other:
            # receivers keep the highest sequence they have seen per deployment.
            "sequence": deployment.version + 1,
        }
        if deployment.secret_ref is not None:
            metadata["secretRef"] = deployment.secret_ref.wire()
        if deployment.cost is not None:
            metadata["cost"] = deployment.cost.model_dump()
        if deployment.error:
            metadata["error"] = deployment.error
        metadata.update(extra.pop("additionalMetadata", {}))
        payload = CallbackPayload(
            deployment_id=deployment.id,
            resource_type=deployment.resource_type.value,
            resource_name=deployment.resource_name,
            namespace=deployment.namespace,
            phase=deployment.phase,
            message=deployment.message,
            time=now,
            endpoint=deployment.endpoint,
            port=deployment.port,
            connection_secret=connection_secret(deployment) if deployment.secret_ref else None,
            additional_metadata={k: v for k, v in metadata.items() if v is not None},
            estimated_monthly_cost=deployment.cost.estimated_monthly if deployment.cost else None,
            **extra,
        )
        assert deployment.callback_url is not None
        return CallbackEvent(
            id=f"msg_{uuid.uuid4().hex}",
            deployment_id=deployment.id,
            url=deployment.callback_url,
            payload=payload.wire(),
            created_at=now,
        )

    def _deliver(self, job: Job) -> None:
        if job.event_id is None:
            return
        event = self.store.get_event(job.event_id)
        if event is None or event.delivered_at is not None or event.dead_at is not None:
            return
        if event.attempts != job.seq:
            return  # a stale copy of an earlier attempt
        result = self.sender.send(event)
        now = self.clock.now()
        attempts = event.attempts + 1
        if result.ok:
            self.metrics.callback_attempts.labels("success").inc()
            self.store.save_event(
                event.model_copy(
                    update={"attempts": attempts, "delivered_at": now, "last_error": None}
                )
            )
            return
        self.metrics.callback_attempts.labels("failure").inc()
        delays = self.settings.callback_retry_delays
        error = result.error or f"HTTP {result.status_code}"
        log.warning(
            "callback attempt failed",
            extra={
                "deploymentId": event.deployment_id,
                "webhookId": event.id,
                "attempt": attempts,
                "error": error,
            },
        )
        if attempts <= len(delays):
            delay = delays[attempts - 1]
            self.store.save_event(
                event.model_copy(
                    update={
                        "attempts": attempts,
                        "last_error": error,
                        "next_attempt_at": now + timedelta(seconds=delay),
                    }
                )
            )
            self._enqueue(callback_job(event, seq=attempts), delay=delay)
            return
        self._dead_letter(event.model_copy(update={"attempts": attempts}), error)

    def _dead_letter(self, event: CallbackEvent, reason: str) -> None:
        now = self.clock.now()
        self.store.add_dead_letter(
            DeadLetter(
                # Derived from the event: a redelivered job cannot make a second letter.
                id=f"dl_{event.id.removeprefix('msg_')[:24]}",
                event_id=event.id,
                deployment_id=event.deployment_id,
                url=event.url,
                payload=event.payload,
                reason=reason,
                attempts=event.attempts,
                created_at=now,
                next_retry_at=now + timedelta(seconds=self.settings.dead_letter_retry_seconds),
            )
        )
        self.store.save_event(event.model_copy(update={"dead_at": now, "last_error": reason}))
        self.metrics.dead_letters.inc()
        log.error(
            "callback dead-lettered",
            extra={"deploymentId": event.deployment_id, "webhookId": event.id, "reason": reason},
        )

    def dead_letters(self, *, include_resolved: bool = False) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        return self.store.list_dead_letters(include_resolved=include_resolved)

    def replay_dead_letter(self, letter_id: str) -> DeadLetter:
        """Send a dead letter again now (same ``webhook-id``); resolved on success."""
        letter = self.store.get_dead_letter(letter_id)
        if letter is None:
            raise NotFound(f"dead letter {letter_id} not found")
        return self._retry_dead_letter(letter, manual=True)

    def _retry_dead_letter(self, letter: DeadLetter, *, manual: bool) -> DeadLetter:
        event = CallbackEvent(
            id=letter.event_id,
            deployment_id=letter.deployment_id,
            url=letter.url,
            payload=letter.payload,
            attempts=letter.attempts,
        )
        result = self.sender.send(event)
        now = self.clock.now()
        self.metrics.callback_attempts.labels("success" if result.ok else "failure").inc()
        if result.ok:
            updated = letter.model_copy(
                update={"resolved_at": now, "attempts": letter.attempts + 1}
            )
            stored = self.store.get_event(letter.event_id)
            if stored is not None:
                self.store.save_event(stored.model_copy(update={"delivered_at": now}))
        else:
            age = (now - letter.created_at).total_seconds()
            give_up = not manual and age >= self.settings.dead_letter_max_age_seconds
            updated = letter.model_copy(
                update={
                    "attempts": letter.attempts + 1,
                    "reason": result.error or f"HTTP {result.status_code}",
                    "next_retry_at": None
                    if give_up
                    else now + timedelta(seconds=self.settings.dead_letter_retry_seconds),
                    "given_up_at": now if give_up else letter.given_up_at,
                }
            )
        self.store.save_dead_letter(updated)
        return updated

    # ------------------------------------------------------------- maintenance

    def reconcile(self) -> dict[str, int]:
        """Repair what a crash can leave behind; run on a timer (every 30 s).

        Re-creates lost jobs for deployments that stopped moving, re-sends
        callbacks whose job was lost, retries dead letters on the slow schedule
        and forgets Deleted deployments past their retention.
        """
        now = self.clock.now()
        stale = now - timedelta(
            seconds=2 * self.settings.job_lease_seconds + self.settings.poll_interval_seconds
        )
        repaired = {"jobs": 0, "callbacks": 0, "deadLetters": 0, "purged": 0}
        kinds = {
            Phase.PENDING: JobKind.PROVISION,
            Phase.PROVISIONING: JobKind.POLL,
            Phase.DELETING: JobKind.DELETE,
        }
        for deployment in self.store.list(phases=kinds, updated_before=stale):
            if self._reschedule(deployment, kinds[deployment.phase]) is not None:
                repaired["jobs"] += 1
        for event in self.store.pending_events(created_before=stale):
            due = event.next_attempt_at is None or event.next_attempt_at <= stale
            if due:
                self._enqueue(callback_job(event, seq=event.attempts))
                repaired["callbacks"] += 1
        for letter in self.store.list_dead_letters():
            if letter.given_up_at or letter.resolved_at:
                continue
            if letter.next_retry_at is not None and letter.next_retry_at <= now:
                self._retry_dead_letter(letter, manual=False)
                repaired["deadLetters"] += 1
                if repaired["deadLetters"] >= DEAD_LETTERS_PER_PASS:
                    break  # each send may take the full timeout; the rest wait a pass
        repaired["purged"] = self.store.purge_finished(
            before=now - timedelta(days=self.settings.deleted_retention_days)
        )
        self.count_resources()
        if any(repaired.values()):
            log.info("reconciled", extra=repaired)
        return repaired

    # ----------------------------------------------------------------- helpers

    def _tags(self, deployment: Deployment) -> dict[str, str]:
        return logical_tags(deployment, managed_by=self.settings.managed_by)

    def _enqueue(self, job: Job, *, delay: float = 0.0) -> bool:
        """Enqueue ``job``; False when the queue refused for now (the state is
        saved, and reconcile re-creates the job once the queue is back)."""
        try:
            self.queue.enqueue(job, delay=delay)
        except TemporaryError:
            log.warning(
                "enqueue failed; reconcile will retry",
                extra={"deploymentId": job.deployment_id, "kind": job.kind.value},
            )
            return False
        return True


def callback_job(event: CallbackEvent, *, seq: int = 0) -> Job:
    """The job that sends attempt ``seq`` of ``event``; its id is derived from
    both, so enqueueing the same attempt twice is one job."""
    return Job(
        kind=JobKind.CALLBACK,
        deployment_id=event.deployment_id,
        event_id=event.id,
        seq=seq,
        id=f"{event.id}-{seq}",
    )


def _probe(check: Callable[[], None]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        check()
    except BrokerError as exc:
        return {"status": "error", "error": exc.message}
    except Exception as exc:  # noqa: BLE001 - a health check reports, never raises
        return {"status": "error", "error": type(exc).__name__}
    return {"status": "ok", "latencyMs": round((time.perf_counter() - started) * 1000, 1)}


def _health(resource: CloudResource) -> str:
    return {
        "available": "Healthy",
        "modifying": "Degraded",
        "creating": "Progressing",
        "failed": "Unhealthy",
        "deleting": "Unhealthy",
        "missing": "Missing",
    }[resource.state]


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s"
