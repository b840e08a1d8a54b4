"""What every deployment store does to a record the same way, whatever keeps it.

The SQL and DynamoDB stores differ in how they make a change atomic, not in
what the change is: the record a start writes, the error a lost race raises
and the UTC instant a timestamp stands for are decided here once, so the
backends cannot drift apart on them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from kidp.errors import ConcurrentUpdate
from kidp.models import Deployment, Phase, utcnow

__all__ = ["as_utc", "stale", "started"]


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime; a naive value is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def stale(deployment_id: str, expected_version: int) -> ConcurrentUpdate:
    """The error for a write that expected ``expected_version`` and lost a race."""
    return ConcurrentUpdate(f"deployment {deployment_id} changed since version {expected_version}")


def started(deployment: Deployment, expected_version: int) -> Deployment:
    """``deployment`` moved to Provisioning now, as ``try_start`` writes it
    over ``expected_version``."""
    now = utcnow()
    return deployment.model_copy(
        update={
            "phase": Phase.PROVISIONING,
            "started_at": now,
            "updated_at": now,
            "version": expected_version + 1,
        }
    )
