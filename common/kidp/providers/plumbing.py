"""Plumbing the cloud providers (AWS, Azure, GCP) share, free of any cloud SDK.

Each provider still translates its own cloud's errors and builds its own
clients; what is the same everywhere lives here: the ``on_call`` metric hook,
the lazily made client per service, the delegations of the port's simple
questions to the resource kind, the five tags in the cloud's dialect and the
ownership rule that rests on them, the adopt-or-create flow of ``deploy`` and
the messages for a resource that is somebody else's or not there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from kidp import tags as tagging
from kidp.errors import CloudUnavailable, ProvisioningFailed
from kidp.models import CloudResource, Deployment
from kidp.ports import PasswordPolicy, QuotaReport
from kidp.providers.ownership import deployment_tags

logger = logging.getLogger(__name__)

F = TypeVar("F")


class ClientCache:
    """Clients by service name, each made once on first use and then shared
    between threads; ``clients`` are injected ready (tests). ``lock`` serialises
    the making (an ``RLock`` where making a client takes the lock again)."""

    def __init__(
        self,
        clients: Mapping[str, Any] | None = None,
        *,
        lock: threading.Lock | threading.RLock | None = None,
    ) -> None:
        self._clients: dict[str, Any] = dict(clients or {})
        self._lock = lock if lock is not None else threading.Lock()

    def get(self, service: str, make: Callable[[str], Any]) -> Any:
        """The client for ``service``, made with ``make(service)`` the first time."""
        with self._lock:
            client = self._clients.get(service)
            if client is None:
                client = make(service)
                self._clients[service] = client
            return client


class ProviderPlumbing:
    """The part of a provider that is the same on every cloud. A subclass sets
    ``_on_call`` and implements ``_kind`` (the resource kind serving a deployment)."""

    _on_call: Callable[[str, str], None] | None
    #: How this cloud spells tag (label) keys and values.
    tag_dialect: ClassVar[tagging.TagDialect]
    tag_prefix: str
    managed_by: str

    def _kind(self, deployment: Deployment) -> Any:
        raise NotImplementedError

    def tag_key(self, name: str) -> str:
        """This cloud's key for the logical tag ``name`` under the provider's prefix."""
        return tagging.encode_key(name, dialect=self.tag_dialect, prefix=self.tag_prefix)

    def encode_tags(self, deployment: Deployment, tags: Mapping[str, str]) -> dict[str, str]:
        """``deployment``'s five tags (overlaid with ``tags``) in this cloud's dialect."""
        logical = deployment_tags(deployment, tags, managed_by=self.managed_by)
        return tagging.encode(logical, dialect=self.tag_dialect, prefix=self.tag_prefix)

    def cloud_tags(self, found: Any) -> Mapping[str, str]:
        """The tags (labels) a found resource carries."""
        tags: Mapping[str, str] = found.tags
        return tags

    def owned_by(self, found: Any, deployment: Deployment) -> bool:
        """True when ``found`` carries ``deployment``'s id: the one rule that
        makes adopt, delete and the scans idempotent and safe."""
        wanted = tagging.encode_value(deployment.id, dialect=self.tag_dialect)
        return self.cloud_tags(found).get(self.tag_key(tagging.DEPLOYMENT_ID)) == wanted

    @property
    def retained_value(self) -> str:
        """The managed-by value a retained resource is re-tagged with."""
        return tagging.encode_value(f"{self.managed_by}-retained", dialect=self.tag_dialect)

    def _count(self, resource_type: str, operation: str) -> None:
        if self._on_call is None:
            return
        try:
            self._on_call(resource_type, operation)
        except Exception:
            # A broken metric must not fail a deployment.
            logger.warning("on_call hook failed for %s %s", resource_type, operation, exc_info=True)

    def identifier(self, deployment: Deployment) -> str:
        """The cloud name ``deployment``'s resource has (or will have)."""
        name: str = self._kind(deployment).name(deployment)
        return name

    def password_policy(self, deployment: Deployment) -> PasswordPolicy | None:
        """The password the kind's resource takes from the broker, if any (see
        the provider's class docstring for which ones do)."""
        policy: PasswordPolicy | None = self._kind(deployment).password_policy(deployment)
        return policy

    def validate_quota(self, deployment: Deployment) -> QuotaReport:
        """Check the account's room for this deployment; raises ``QuotaExceeded``
        naming the quota, its usage and its limit."""
        report: QuotaReport = self._kind(deployment).quota(deployment)
        return report


def find_or_create(
    *,
    label: str,
    name: str,
    deployment_id: str,
    find: Callable[[], F | None],
    create: Callable[[], None],
    reread: Callable[[], F | None] | None = None,
    lost_race: type[BaseException] | tuple[type[BaseException], ...] = (),
    started: str = "created",
    unreadable: str = "created",
    failed: Callable[[], str | None] | None = None,
) -> tuple[F, bool]:
    """``deploy``'s adopt-or-create: the resource ``find`` returns, else the one
    ``create`` makes, read again with ``reread`` (``find`` unless given).

    Returns it and whether it was adopted (there before, or created by someone
    else: ``create`` raised ``lost_race``), which is when ownership must be
    checked. A resource that cannot be read back is ``ProvisioningFailed`` when
    ``failed`` gives a reason, else ``CloudUnavailable`` (retried later)."""
    found = find()
    if found is not None:
        return found, True
    adopted = False
    try:
        create()
        logger.info("%s %s %s for %s", started, label, name, deployment_id)
    except lost_race:
        # Someone created it between our look and our create: maybe a
        # concurrent worker on this deployment, maybe a retried create
        # whose first response was lost. Adopt only if it is ours.
        logger.info("%s %s already exists; re-reading it", label, name)
        adopted = True
    found = (reread or find)()
    if found is None:
        if failed is not None and (reason := failed()) is not None:
            raise ProvisioningFailed(reason)
        raise CloudUnavailable(
            f"{label} '{name}' was {unreadable} but cannot be read yet", retry_after=10.0
        )
    return found, adopted


def foreign_resource(
    *, label: str, name: str, holder: str | None, resource_id: str, marker: str = "tag"
) -> ProvisioningFailed:
    """The error for a resource under our name that ``holder`` (another
    deployment, or nobody: not the broker's) owns; ``marker`` is what the cloud
    calls its tags."""
    whose = (
        f"belongs to deployment {holder}"
        if holder
        else f"carries no KIDP deployment {marker} (it was not created by this broker)"
    )
    return ProvisioningFailed(
        f"{label} '{name}' already exists and {whose}; "
        "delete or rename it, or choose another resourceName",
        details={"cloudResourceId": resource_id, "heldBy": holder},
    )


def missing_resource(deployment: Deployment, *, label: str, name: str) -> CloudResource:
    """``get_status``'s answer when nothing of ``deployment``'s exists."""
    return CloudResource(
        cloud_resource_id=deployment.cloud_resource_id or name,
        state="missing",
        message=f"no {label} '{name}' of this deployment exists",
    )


def nothing_to_rotate(*, label: str, name: str) -> ProvisioningFailed:
    """``rotate_credentials``' error when nothing of the deployment's exists."""
    return ProvisioningFailed(
        f"cannot rotate credentials: no {label} '{name}' of this deployment exists"
    )
