"""The timers' work: drift, orphans, cost and credential rotation.

The embedded service runs these from its scheduler; the cloud timers
(EventBridge, timer triggers, Cloud Scheduler, a CronJob) call the same
functions through :func:`run_scan`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import date, timedelta
from typing import Any, Literal

from kidp.errors import BrokerError, NotFound, ValidationFailed
from kidp.models import CostSnapshot, Deployment, Phase
from kidp.ports import Credentials
from kidp.service import BrokerService, generate_password, secret_name
from kidp.tags import DEPLOYMENT_ID, decode

#: Skipped deployments listed in a drift report (the rest are counted).
SKIPPED_SHOWN = 20

log = logging.getLogger("kidp.scans")

ScanName = Literal["drift", "orphans", "cost", "rotation", "reconcile"]
SCANS: tuple[ScanName, ...] = ("drift", "orphans", "cost", "rotation", "reconcile")
GROUPS = ("team", "application", "namespace")
#: Scans walk every deployment, not a page of them.
ALL = 10_000_000


class Scanner:
    """Drift, orphan, cost and rotation scans over a :class:`BrokerService`."""

    def __init__(self, service: BrokerService) -> None:
        self.service = service

    # ------------------------------------------------------------------ drift

    def drift(self) -> dict[str, Any]:
        """Compare every Ready deployment with the cloud; callback once per change."""
        svc = self.service
        checked = changed = 0
        skipped: list[dict[str, str]] = []
        for deployment in svc.store.list(phases=[Phase.READY], limit=ALL):
            try:
                result = svc.check_drift(deployment)
            except BrokerError as exc:
                # One resource the cloud will not describe must not stop the scan.
                log.warning(
                    "drift check skipped",
                    extra={"deploymentId": deployment.id, "reason": exc.message},
                )
                skipped.append({"deploymentId": deployment.id, "reason": exc.message})
                continue
            checked += 1
            changed += result
        report: dict[str, Any] = {"checked": checked, "changed": changed}
        if skipped:
            # Whoever runs the scan sees why a deployment was not checked
            # (most often: the cloud could not be reached with these settings).
            report["skipped"] = skipped[:SKIPPED_SHOWN]
            report["skippedTotal"] = len(skipped)
        return report

    # ---------------------------------------------------------------- orphans

    def orphans(self) -> dict[str, Any]:
        """Tagged resources with no live deployment, and untagged look-alikes.
        Reports only: nothing is deleted."""
        svc = self.service
        found: list[dict[str, Any]] = []
        for resource in svc.provider.list_managed():
            entry = {
                "cloudResourceId": resource.cloud_resource_id,
                "resourceType": resource.resource_type.value,
                "name": resource.name,
                "tags": resource.tags,
            }
            if not resource.tagged:
                found.append(
                    {
                        **entry,
                        "deploymentId": None,
                        "reason": "untagged resource among managed ones",
                    }
                )
                continue
            logical = decode(
                resource.tags, dialect=_dialect(svc.provider.name), prefix=svc.settings.tag_prefix
            )
            deployment_id = logical.get(DEPLOYMENT_ID)
            deployment = svc.store.get(deployment_id) if deployment_id else None
            if deployment is None:
                reason = "no deployment with this id"
            elif deployment.phase in (Phase.DELETED, Phase.FAILED):
                reason = f"deployment is {deployment.phase.value}"
            else:
                continue
            found.append({**entry, "deploymentId": deployment_id, "reason": reason})
        svc.metrics.orphans.set(len(found))
        if found:
            log.warning("orphaned resources found", extra={"count": len(found)})
        return {"orphans": found, "total": len(found)}

    # ------------------------------------------------------------------- cost

    def cost(self) -> dict[str, Any]:
        """Snapshot today's cost per deployment; flag week-over-week rises."""
        svc = self.service
        today = svc.clock.now().date()
        snapshots = 0
        for deployment in svc.store.list(phases=[Phase.READY, Phase.PROVISIONING], limit=ALL):
            if deployment.cost is None:
                continue
            svc.store.put_cost_snapshot(
                CostSnapshot(
                    deployment_id=deployment.id,
                    day=today.isoformat(),
                    namespace=deployment.namespace,
                    team=deployment.team,
                    application=deployment.application,
                    resource_type=deployment.resource_type.value,
                    amount=deployment.cost.estimated_monthly,
                )
            )
            snapshots += 1
        alerts = self.cost_alerts()
        for alert in alerts:
            svc.metrics.cost_jumps.labels(alert["groupBy"]).inc()
            log.warning("cost jump", extra=alert)
        return {"snapshots": snapshots, "alerts": alerts}

    def cost_alerts(self, namespaces: set[str] | None = None) -> list[dict[str, Any]]:
        """Groups whose cost rose more than the threshold against a week ago,
        counting only ``namespaces`` when given (what a caller may see)."""
        svc = self.service
        today = svc.clock.now().date()

        def visible(day: date) -> list[CostSnapshot]:
            found = svc.store.cost_snapshots(day=day.isoformat())
            return [s for s in found if namespaces is None or s.namespace in namespaces]

        now, before = visible(today), visible(today - timedelta(days=7))
        alerts: list[dict[str, Any]] = []
        for group in GROUPS:
            current, previous = _totals(now, group), _totals(before, group)
            for key, amount in sorted(current.items()):
                old = previous.get(key)
                if old and (amount - old) / old > svc.settings.cost_jump_threshold:
                    alerts.append(
                        {
                            "groupBy": group,
                            "group": key,
                            "previousMonthly": round(old, 2),
                            "currentMonthly": round(amount, 2),
                            "increasePercent": round((amount - old) / old * 100, 1),
                        }
                    )
        return alerts

    def costs(self, *, group_by: str, namespaces: set[str] | None) -> dict[str, Any]:
        """``GET /v1/costs?groupBy=``: current estimated monthly cost by group."""
        if group_by not in GROUPS:
            raise ValidationFailed(f"groupBy must be one of: {', '.join(GROUPS)}")
        svc = self.service
        totals: dict[str, dict[str, Any]] = {}
        for deployment in svc.store.list(phases=[Phase.READY, Phase.PROVISIONING], limit=ALL):
            if namespaces is not None and deployment.namespace not in namespaces:
                continue
            if deployment.cost is None:
                continue
            key = getattr(deployment, group_by)
            entry = totals.setdefault(
                key,
                {
                    group_by: key,
                    "estimatedMonthly": 0.0,
                    "deployments": 0,
                    "breakdown": defaultdict(float),
                },
            )
            entry["estimatedMonthly"] += deployment.cost.estimated_monthly
            entry["deployments"] += 1
            for part, amount in deployment.cost.breakdown.items():
                entry["breakdown"][part] += amount
        groups = []
        for entry in sorted(totals.values(), key=lambda e: -e["estimatedMonthly"]):
            entry["estimatedMonthly"] = round(entry["estimatedMonthly"], 2)
            entry["breakdown"] = {k: round(v, 2) for k, v in entry["breakdown"].items()}
            groups.append(entry)
        alerts = [a for a in self.cost_alerts(namespaces) if a["groupBy"] == group_by]
        return {
            "groupBy": group_by,
            "currency": "USD",
            "groups": groups,
            "total": round(sum(g["estimatedMonthly"] for g in groups), 2),
            "alerts": alerts,
        }

    # --------------------------------------------------------------- rotation

    def rotation(self) -> dict[str, Any]:
        """Rotate credentials older than the configured age (default 90 days)."""
        svc = self.service
        cutoff = svc.clock.now() - timedelta(days=svc.settings.rotation_max_age_days)
        rotated = failed = 0
        for deployment in svc.store.list(phases=[Phase.READY], limit=ALL):
            if deployment.secret_ref is None:
                continue
            last = deployment.credentials_rotated_at or deployment.created_at
            if last > cutoff:
                continue
            if self.rotate(deployment):
                rotated += 1
            else:
                failed += 1
        return {"rotated": rotated, "failed": failed}

    def rotate(self, deployment: Deployment) -> bool:
        """New credentials in the secret store, then in the cloud; a callback
        carries the new secret reference.

        The store is written first so that apps reading it never hold a
        password older than the resource's; if the cloud then refuses, the
        previous value is written back. (A crash between the two leaves the
        store ahead of the resource until the next rotation run.)
        """
        svc = self.service
        policy = svc.provider.password_policy(deployment)
        if policy is None or deployment.secret_ref is None:
            raise NotFound(f"deployment {deployment.id} has no credentials to rotate")
        name = secret_name(deployment)
        value = {
            "username": policy.username,
            "password": generate_password(policy.length, policy.alphabet),
            "engine": deployment.spec.engine or deployment.resource_type.value,
        }
        try:
            _, previous = svc.secrets.ensure(name, lambda: value, {})
            ref = svc.secrets.put_version(name, value)
        except BrokerError as exc:
            return self._rotation_failed(deployment, exc)
        try:
            svc.provider.rotate_credentials(
                deployment, Credentials(username=value["username"], password=value["password"])
            )
        except BrokerError as exc:
            try:
                svc.secrets.put_version(name, previous)
            except BrokerError:
                log.error(
                    "rotation: could not restore the previous secret",
                    extra={"deploymentId": deployment.id},
                )
            return self._rotation_failed(deployment, exc)
        svc.metrics.rotations.labels("success").inc()
        changes = {
            "secret_ref": ref,
            "credentials_rotated_at": svc.clock.now(),
            "message": "Credentials rotated",
        }
        extra = {"additionalMetadata": {"credentialsRotated": True}}
        current: Deployment | None = deployment
        while current is not None and svc.notify(current, changes, dict(extra)) is None:
            current = svc.store.get(deployment.id)  # changed meanwhile: apply to the newest
        return True

    def _rotation_failed(self, deployment: Deployment, exc: BrokerError) -> bool:
        self.service.metrics.rotations.labels("failure").inc()
        log.warning("rotation failed", extra={"deploymentId": deployment.id, "reason": exc.message})
        return False


def run_scan(scanner: Scanner, name: str) -> dict[str, Any]:
    """Run one scan by name (the timers' and the CLI's entry)."""
    if name == "reconcile":
        return scanner.service.reconcile()
    if name not in SCANS:
        raise ValidationFailed(f"unknown scan '{name}'; one of: {', '.join(SCANS)}")
    result: dict[str, Any] = getattr(scanner, name)()
    return result


def _totals(snapshots: list[CostSnapshot], group: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for snapshot in snapshots:
        totals[getattr(snapshot, group)] += snapshot.amount
    return totals


def _dialect(provider: str) -> Any:
    return {"aws": "aws", "onprem": "kubernetes", "azure": "azure", "gcp": "gcp"}.get(
        provider, "aws"
    )
