"""The Azure provider: Azure SQL, PostgreSQL and MySQL flexible servers, Azure
Cache for Redis, Service Bus topics, storage accounts and Container Apps.

Everything goes through the ``azure-mgmt-*`` clients to Azure Resource Manager
(or the stand-in, :mod:`kidp.arm_emulator`). The provider keeps no state: a
resource is found again by a deterministic name (namespace and resource name,
plus a piece of the deployment id where Azure names are global), or failing
that by its ``deployment-id`` tag, and is only treated as ours when it carries
this deployment's id. ``deploy`` adopts what it finds, ``delete`` of what is
gone succeeds.

Long-running operations are started with the SDK's ``begin_*`` methods and
never waited on (``polling=False``: no poller thread, no sleep): ``deploy``
returns while Azure works, and ``get_status``, which the worker's poll job
calls, reads ``provisioningState`` again. A resource made in steps (a SQL
server, then its database) takes its next step from ``get_status`` while the
deployment is being provisioned.

Errors leave as the broker's: throttling, server faults, no answer and no
token are :class:`~kidp.errors.CloudUnavailable` with ``retry_after`` (the
client retries short waits itself and hands back longer ones, so nothing
sleeps for long); quota codes are ``QuotaExceeded``; any other refusal is
``ProvisioningFailed``. Messages carry the service, the operation, ARM's code
and explanation with any password masked, never a request body.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.policies import RetryPolicy

from kidp import tags as tagging
from kidp.catalog import ENGINES, PROVIDER_ENGINES
from kidp.errors import (
    BrokerError,
    CloudUnavailable,
    ProvisioningFailed,
    QuotaExceeded,
    ValidationFailed,
)
from kidp.models import (
    CloudResource,
    DeletionPolicy,
    Deployment,
    ManagedResource,
    Phase,
    ResourceType,
)
from kidp.ports import Credentials, QuotaReport
from kidp.providers.azure.base import (
    ACTIVITY_LOG_API_VERSION,
    API_VERSIONS,
    NAME_PREFIX,
    PROVIDER_NAME,
    Json,
    _Found,
    _Kind,
    body_bytes,
)
from kidp.providers.azure.containerapps import _ContainerApp
from kidp.providers.azure.errors import (
    QUOTA_CODES,
    describe,
    error_code,
    error_message,
    http_status,
    is_temporary,
    retry_after,
)
from kidp.providers.azure.flexible import _MysqlFlexible, _PostgresFlexible
from kidp.providers.azure.redis import _RedisCache
from kidp.providers.azure.servicebus import _ServiceBusTopic
from kidp.providers.azure.sql import _SqlDatabase
from kidp.providers.azure.storage import _StorageAccount
from kidp.providers.plumbing import (
    ClientCache,
    ProviderPlumbing,
    find_or_create,
    foreign_resource,
    missing_resource,
    nothing_to_rotate,
)

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

logger = logging.getLogger(__name__)

PUBLIC_ARM = "https://management.azure.com"

#: The management client behind each service name, imported on first use.
_CLIENTS = {
    "sql": ("azure.mgmt.sql", "SqlManagementClient"),
    "postgresql": ("azure.mgmt.postgresqlflexibleservers", "PostgreSQLManagementClient"),
    "mysql": ("azure.mgmt.mysqlflexibleservers", "MySQLManagementClient"),
    "redis": ("azure.mgmt.redis", "RedisManagementClient"),
    "servicebus": ("azure.mgmt.servicebus", "ServiceBusManagementClient"),
    "storage": ("azure.mgmt.storage", "StorageManagementClient"),
    "appcontainers": ("azure.mgmt.appcontainers", "ContainerAppsAPIClient"),
    "resource": ("azure.mgmt.resource.resources", "ResourceManagementClient"),
}
#: PostgreSQL versions Azure's flexible server still offers, of the catalogue's.
_POSTGRES_VERSIONS = ("13", "14", "15", "16")


class _BoundedRetryPolicy(RetryPolicy[Any, Any]):
    """azure-core's retries, except that an answer asking to wait longer than
    ``max_wait`` seconds is handed back at once: the broker re-enqueues the
    job with that delay instead of holding a worker (or a Function) asleep."""

    def __init__(self, *, max_wait: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_wait = max_wait

    def is_retry(self, settings: dict[str, Any], response: Any) -> bool:
        if not super().is_retry(settings, response):
            return False
        wait = self.get_retry_after(response)
        return wait is None or wait <= self._max_wait


def _raw_json(pipeline_response: Any, deserialized: Any, headers: Any) -> Json:
    """A ``cls`` hook: the response's JSON as ARM sent it, whatever the SDK's models."""
    text = pipeline_response.http_response.text()
    parsed: Json = json.loads(text) if text else {}
    return parsed


def _as_json(model: Any) -> Json:
    """A listed SDK model as ARM's JSON (older SDKs' models serialise, newer
    ones are mappings already)."""
    if isinstance(model, dict):
        return model
    serialize = getattr(model, "serialize", None)
    if callable(serialize) and not isinstance(model, Mapping):
        result: Json = serialize(keep_readonly=True)
        return result
    as_dict: Json = model.as_dict()
    return as_dict


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def credential_for(kind: str, arm_endpoint: str | None) -> TokenCredential | None:
    """The credential ``KIDP_AZURE_CREDENTIAL`` names: None for "default" (the
    provider makes a ``DefaultAzureCredential`` when first needed), the
    stand-in's fixed token for "emulator" (only for a loopback endpoint, so a
    fake token is never sent to Azure)."""
    if kind == "default":
        return None
    if kind == "emulator":
        if not arm_endpoint or not _is_loopback(arm_endpoint):
            raise ValidationFailed(
                "KIDP_AZURE_CREDENTIAL=emulator needs KIDP_AZURE_ARM_ENDPOINT on loopback"
            )
        from kidp.arm_emulator import ArmEmulatorCredential

        return ArmEmulatorCredential()
    raise ValidationFailed(f"KIDP_AZURE_CREDENTIAL '{kind}' is not supported; use default")


class AzureProvider(ProviderPlumbing):
    """:class:`kidp.ports.CloudProvider` for Azure, in one subscription,
    resource group and location (``region``).

    ``credential`` is any ``TokenCredential`` (default: ``DefaultAzureCredential``,
    made when first needed: managed identity in Azure, environment or CLI
    locally). ``base_url`` is the ARM endpoint (a sovereign cloud's, or a
    stand-in's) and ``connection_verify`` the CA bundle to trust for it.
    ``clients`` injects management clients by service name (``sql``,
    ``postgresql``, ``mysql``, ``redis``, ``servicebus``, ``storage``,
    ``appcontainers``, ``resource``). Topics are offered only with a
    ``servicebus_namespace`` and services only with a
    ``containerapps_environment`` (a name in the resource group, or a resource
    id). ``on_call(resource_type, operation)`` runs once per API call.
    ``retry_total``/``retry_backoff`` tune the client's own retries and
    ``max_retry_wait`` caps the ``Retry-After`` it will sleep for.

    Passwords (``password_policy``): administrator passwords for the three
    database kinds; Redis and storage use Microsoft Entra ID, not keys.
    """

    name = PROVIDER_NAME
    tag_dialect = "azure"

    def __init__(
        self,
        *,
        subscription_id: str,
        resource_group: str,
        region: str,
        credential: TokenCredential | None = None,
        base_url: str | None = None,
        connection_verify: bool | str = True,
        clients: Mapping[str, Any] | None = None,
        tag_prefix: str = tagging.DEFAULT_PREFIX,
        managed_by: str = tagging.MANAGED_BY_VALUE,
        servicebus_namespace: str | None = None,
        containerapps_environment: str | None = None,
        on_call: Callable[[str, str], None] | None = None,
        retry_total: int = 3,
        retry_backoff: float = 0.5,
        max_retry_wait: float = 2.0,
        timeout: float = 30.0,
    ) -> None:
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.region = region
        self.base_url = (base_url or PUBLIC_ARM).rstrip("/")
        self.connection_verify = connection_verify
        self.tag_prefix = tag_prefix
        self.managed_by = managed_by
        self.servicebus_namespace = servicebus_namespace
        self.containerapps_environment = containerapps_environment
        self.retry_total = retry_total
        self.retry_backoff = retry_backoff
        self.max_retry_wait = max_retry_wait
        self.timeout = timeout
        self._credential = credential
        self._clients = ClientCache(clients)
        self._on_call = on_call
        self._kinds: dict[str, _Kind] = {
            kind.key: kind
            for kind in (
                _SqlDatabase(self),
                _PostgresFlexible(self),
                _MysqlFlexible(self),
                _RedisCache(self),
                _ServiceBusTopic(self),
                _StorageAccount(self),
                _ContainerApp(self),
            )
        }

    def __repr__(self) -> str:
        return (
            f"AzureProvider(subscription_id={self.subscription_id!r}, "
            f"resource_group={self.resource_group!r}, region={self.region!r}, "
            f"base_url={self.base_url!r})"
        )

    # --- plumbing ------------------------------------------------------------

    def _token_credential(self) -> TokenCredential:
        if self._credential is None:
            from azure.identity import DefaultAzureCredential

            self._credential = DefaultAzureCredential()
        return self._credential

    def _client(self, service: str) -> Any:
        return self._clients.get(service, self._new_client)

    def _new_client(self, service: str) -> Any:
        module, class_name = _CLIENTS[service]
        factory = getattr(importlib.import_module(module), class_name)
        return factory(
            self._token_credential(),
            self.subscription_id,
            base_url=self.base_url,
            api_version=API_VERSIONS[service],
            # Tokens are for the ARM endpoint in use (sovereign clouds differ).
            credential_scopes=[f"{self.base_url}/.default"],
            retry_policy=_BoundedRetryPolicy(
                max_wait=self.max_retry_wait,
                retry_total=self.retry_total,
                retry_backoff_factor=self.retry_backoff,
                retry_backoff_max=8,
            ),
            connection_verify=self.connection_verify,
            connection_timeout=10,
            read_timeout=self.timeout,
            user_agent="kidp-broker",
        )

    def call(
        self,
        service: str,
        resource_type: str,
        operation: str,
        /,
        *args: Any,
        raw: bool = False,
        paged: bool = False,
        missing_ok: bool = False,
        secrets: Collection[str] = (),
        **kwargs: Any,
    ) -> Any:
        """Call ``operation`` (``"servers.get"``) on ``service``'s client and map
        failures to the broker's errors.

        ``raw`` returns ARM's JSON, ``paged`` a list of JSON items, ``missing_ok``
        None on 404; ``secrets`` are masked out of any message, and the SDK's
        exception is not chained then (its request holds them)."""
        self._count(resource_type, operation)
        target = self._client(service)
        for part in operation.split("."):
            target = getattr(target, part)
        if raw:
            kwargs["cls"] = _raw_json
        try:
            result = target(*args, **kwargs)
            if paged:
                return [_as_json(item) for item in result]
            return result
        except ResourceNotFoundError as exc:
            if missing_ok:
                return None
            error = self._map(exc, service, operation, tuple(secrets))
            if secrets:
                raise error from None
            raise error from exc
        except AzureError as exc:
            error = self._map(exc, service, operation, tuple(secrets))
            if secrets:
                raise error from None
            raise error from exc

    def _map(
        self, exc: AzureError, service: str, operation: str, secrets: tuple[str, ...]
    ) -> BrokerError:
        code = error_code(exc)
        details = {"service": service, "operation": operation, "azureErrorCode": code}
        where = f"Azure {describe(exc, service=service, operation=operation)}"
        if isinstance(exc, ClientAuthenticationError) and http_status(exc) in (0, 401):
            # No token (the identity endpoint is down) or one ARM refused.
            return CloudUnavailable(
                f"{where}: the broker's Azure credentials were not accepted or are unavailable",
                retry_after=60.0,
                details=details,
            )
        if isinstance(exc, ServiceRequestError | ServiceResponseError):
            return CloudUnavailable(where, retry_after=30.0, details=details)
        if is_temporary(exc):
            status = http_status(exc)
            default = 5.0 if status == 429 else 15.0
            wait = retry_after(exc, default=default)
            reason = "throttled; retry later" if status == 429 else "temporarily unavailable"
            return CloudUnavailable(f"{where}: {reason}", retry_after=wait, details=details)
        message = error_message(exc, secrets=secrets)
        text = f"{where}: {message}" if message else where
        if code in QUOTA_CODES:
            return QuotaExceeded(text, details=details)
        return ProvisioningFailed(text, details=details)

    @property
    def environment_id(self) -> str | None:
        """The Container Apps environment's resource id, if one is configured."""
        env = self.containerapps_environment
        if not env:
            return None
        if env.startswith("/subscriptions/"):
            return env
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.App/managedEnvironments/{env}"
        )

    def _kind(self, deployment: Deployment) -> _Kind:
        spec = deployment.spec
        rtype = deployment.resource_type
        offered = self.supported()
        if rtype not in offered:
            raise ProvisioningFailed(self._unavailable(rtype))
        if spec.engine is not None and spec.engine not in offered[rtype]:
            raise ProvisioningFailed(
                f"{rtype.value} engine '{spec.engine}' is not offered on Azure; "
                f"supported: {', '.join(sorted(offered[rtype]))}"
            )
        key = {
            ResourceType.DATABASE: {
                "sqlserver": "sql",
                "postgresql": "postgresql",
                "mysql": "mysql",
            }.get(spec.engine or "", ""),
            ResourceType.CACHE: "redis",
            ResourceType.TOPIC: "servicebus",
            ResourceType.BUCKET: "storage",
            ResourceType.SERVICE: "containerapps",
        }[rtype]
        if not key:
            raise ProvisioningFailed(f"a {rtype.value} on Azure needs spec.engine")
        return self._kinds[key]

    def _unavailable(self, rtype: ResourceType) -> str:
        if rtype is ResourceType.TOPIC:
            return (
                "topics are not available: this broker has no Service Bus namespace "
                "configured (azure_servicebus_namespace)"
            )
        if rtype is ResourceType.SERVICE:
            return (
                "services are not available: this broker has no Container Apps environment "
                "configured (azure_containerapps_environment)"
            )
        return f"resourceType '{rtype.value}' is not offered on Azure"

    def _ensure_owner(self, kind: _Kind, found: _Found, deployment: Deployment) -> None:
        if not kind.taggable or self.owned_by(found, deployment):
            return
        raise foreign_resource(
            label=kind.label,
            name=found.name,
            holder=found.tags.get(self.tag_key(tagging.DEPLOYMENT_ID)),
            resource_id=found.id,
        )

    def _locate(self, kind: _Kind, deployment: Deployment) -> _Found | None:
        """The resource by its name, else the one tagged with this deployment's id
        (a resource named by an earlier naming rule, or renamed by hand)."""
        found = kind.find(deployment)
        if found is not None or not kind.taggable:
            return found
        root = next(iter(kind.arm_types))
        key = self.tag_key(tagging.DEPLOYMENT_ID)
        tagged = self.call(
            "resource",
            kind.resource_type.value,
            "resources.list_by_resource_group",
            self.resource_group,
            filter=f"tagName eq '{key}' and tagValue eq '{deployment.id}'",
            paged=True,
        )
        for item in tagged:
            if str(item.get("type", "")).lower() == root.lower():
                return kind.find(deployment, str(item["name"]))
        return None

    def _retag(self, kind: _Kind, found: _Found) -> None:
        """Mark a kept resource ``<managed_by>-retained`` so scans stop counting it."""
        if not kind.taggable:
            return
        body = {
            "operation": "Merge",
            "properties": {"tags": {self.tag_key(tagging.MANAGED_BY): self.retained_value}},
        }
        for resource_id in kind.tagged_ids(found):
            self.call(
                "resource",
                kind.resource_type.value,
                "tags.begin_update_at_scope",
                resource_id.lstrip("/"),
                body_bytes(body),
                polling=False,
            )

    def _failure_code(self, kind: _Kind, found: _Found, deployment: Deployment) -> str | None:
        """Azure's error code for a failed resource, from the activity log (the
        resource itself only says Failed)."""
        from azure.core.rest import HttpRequest

        since = (deployment.created_at - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
        for resource_id in reversed(kind.tagged_ids(found)):
            self._count(kind.resource_type.value, "activity_log.list")
            request = HttpRequest(
                "GET",
                f"/subscriptions/{self.subscription_id}/providers/Microsoft.Insights/"
                "eventtypes/management/values",
                params={
                    "api-version": ACTIVITY_LOG_API_VERSION,
                    "$filter": f"eventTimestamp ge '{since}' and resourceUri eq '{resource_id}'",
                },
            )
            try:
                response = self._client("resource").send_request(request)
            except AzureError:
                return None  # the code is a nicety: the deployment fails either way
            if response.status_code != 200:
                return None
            for event in response.json().get("value", []):
                if (event.get("status") or {}).get("value") != "Failed":
                    continue
                try:
                    message = str((event.get("properties") or {}).get("statusMessage"))
                    return str(json.loads(message)["error"]["code"])
                except (TypeError, ValueError, KeyError):
                    continue
        return None

    def _provisioning(self, deployment: Deployment) -> bool:
        return deployment.phase in (Phase.PENDING, Phase.PROVISIONING)

    # --- the CloudProvider port --------------------------------------------

    def supported(self) -> dict[ResourceType, dict[str, list[str]]]:
        """PostgreSQL and MySQL flexible servers and Azure SQL, Azure Cache for
        Redis, storage accounts; Service Bus topics and Container Apps services
        when their namespace and environment are configured."""
        database = ENGINES[ResourceType.DATABASE]
        azure = PROVIDER_ENGINES[PROVIDER_NAME]
        supported: dict[ResourceType, dict[str, list[str]]] = {
            ResourceType.DATABASE: {
                "postgresql": [v for v in database["postgresql"] if v in _POSTGRES_VERSIONS],
                "mysql": list(database["mysql"]),
                **{e: list(v) for e, v in azure[ResourceType.DATABASE].items()},
            },
            ResourceType.CACHE: {e: list(v) for e, v in azure[ResourceType.CACHE].items()},
            ResourceType.BUCKET: {"": []},
        }
        if self.servicebus_namespace:
            supported[ResourceType.TOPIC] = {
                e: list(v) for e, v in azure[ResourceType.TOPIC].items()
            }
        if self.containerapps_environment:
            supported[ResourceType.SERVICE] = {"": []}
        return supported

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        """The ARM requests ``deploy`` would send, in order (method, path with
        api-version, body); no calls, no password (``secretFields`` names where
        one would go)."""
        kind = self._kind(deployment)
        encoded = self.encode_tags(deployment, tags)
        return {
            "provider": self.name,
            "region": self.region,
            "subscriptionId": self.subscription_id,
            "resourceGroup": self.resource_group,
            "resourceType": deployment.resource_type.value,
            "identifier": kind.name(deployment),
            "requests": [request.describe() for request in kind.requests(deployment, encoded)],
            "notes": kind.notes(deployment),
        }

    def validate_quota(self, deployment: Deployment) -> QuotaReport:
        """Refuse what the Azure service cannot do (``ValidationFailed``), then
        check the subscription's usages for the location (``QuotaExceeded``)."""
        kind = self._kind(deployment)
        kind.validate(deployment)
        return kind.quota(deployment)

    def deploy(
        self,
        deployment: Deployment,
        tags: dict[str, str],
        credentials: Credentials | None,
    ) -> CloudResource:
        """Start creating the resource, or adopt the one tagged with this
        deployment; returns at once (the state is usually ``creating``)."""
        kind = self._kind(deployment)
        encoded = self.encode_tags(deployment, tags)
        kind.check_credentials(deployment, credentials)
        found, _ = find_or_create(
            label=kind.label,
            name=kind.name(deployment),
            deployment_id=deployment.id,
            find=lambda: self._locate(kind, deployment),
            create=lambda: kind.create(deployment, encoded, credentials),
            reread=lambda: kind.find(deployment),
            started="started",
            unreadable="accepted",
        )
        self._ensure_owner(kind, found, deployment)
        if kind.advance(deployment, found, encoded):
            found = kind.find(deployment, found.name) or found
        return kind.status(deployment, found)

    def get_status(self, deployment: Deployment) -> CloudResource:
        """The resource as Azure sees it now (``missing`` when nothing of this
        deployment's exists); while provisioning, also takes the next step of a
        resource made in several."""
        kind = self._kind(deployment)
        found = self._locate(kind, deployment)
        if found is None or (kind.taggable and not self.owned_by(found, deployment)):
            return missing_resource(deployment, label=kind.label, name=kind.name(deployment))
        if self._provisioning(deployment) and kind.advance(
            deployment, found, kind.logical_tags(deployment)
        ):
            found = kind.find(deployment, found.name) or found
        resource = kind.status(deployment, found)
        if resource.state == "failed":
            code = self._failure_code(kind, found, deployment)
            reason = f" (Azure error {code})" if code else ""
            resource = resource.model_copy(update={"message": f"{resource.message}{reason}"})
        return resource

    def delete(self, deployment: Deployment) -> bool:
        """Start or continue deleting; True once nothing is left. Retain re-tags
        the resource ``<managed_by>-retained`` and leaves it; Snapshot does the
        same where the resource holds data Azure would delete with it (its
        backups go with it), and deletes otherwise."""
        kind = self._kind(deployment)
        found = self._locate(kind, deployment)
        if found is None:
            return True
        if kind.taggable and not self.owned_by(found, deployment):
            # Somebody else's resource under our name: never ours to remove.
            return True
        policy = deployment.deletion_policy
        if policy is DeletionPolicy.RETAIN or (
            policy is DeletionPolicy.SNAPSHOT and kind.snapshot_keeps
        ):
            self._retag(kind, found)
            logger.info("kept %s %s of %s (%s)", kind.label, found.name, deployment.id, policy)
            return True
        return kind.delete(deployment, found)

    def rotate_credentials(self, deployment: Deployment, credentials: Credentials) -> None:
        """Set a new administrator password (an update Azure applies on its own time)."""
        kind = self._kind(deployment)
        if kind.password_policy(deployment) is None:
            raise ProvisioningFailed(
                f"a {kind.label} takes no credentials from the broker: nothing to rotate"
            )
        kind.check_credentials(deployment, credentials)
        found = self._locate(kind, deployment)
        if found is None or (kind.taggable and not self.owned_by(found, deployment)):
            raise nothing_to_rotate(label=kind.label, name=kind.name(deployment))
        kind.rotate(deployment, found, credentials)

    def list_managed(self) -> Sequence[ManagedResource]:
        """Resources in the resource group tagged managed-by=<this broker> (one per
        deployment and type: a SQL database rather than its server), plus
        resources named like ours (``kidp-``, storage accounts ``kidp``) with no
        managed-by tag (``tagged=False``). A resource whose managed-by tag holds
        another value is someone else's and in neither: a retained one
        (``<managed_by>-retained``), another broker's, or the broker's own
        infrastructure (the Bicep tags it ``<managed_by>-broker-infra``; its
        storage account is named ``kidpst...``). Service Bus topics cannot carry
        tags, so they are not listed."""
        managed_key = self.tag_key(tagging.MANAGED_BY)
        deployment_key = self.tag_key(tagging.DEPLOYMENT_ID)
        ranks: dict[str, tuple[ResourceType, int, _Kind]] = {
            arm_type.lower(): (kind.resource_type, rank, kind)
            for kind in self._kinds.values()
            if kind.taggable
            for arm_type, rank in kind.arm_types.items()
        }
        items = self.call(
            "resource",
            "any",
            "resources.list_by_resource_group",
            self.resource_group,
            paged=True,
        )
        best: dict[tuple[str, ResourceType], tuple[int, ManagedResource]] = {}
        found: list[ManagedResource] = []
        for item in items:
            known = ranks.get(str(item.get("type", "")).lower())
            if known is None:
                continue
            rtype, rank, kind = known
            name = str(item.get("name", ""))
            cloud_tags = {str(k): str(v) for k, v in (item.get("tags") or {}).items()}
            managed_by = cloud_tags.get(managed_key)
            if managed_by is None:
                if kind.looks_like_ours(name):
                    found.append(
                        ManagedResource(
                            cloud_resource_id=str(item["id"]),
                            resource_type=rtype,
                            name=name,
                            tags=cloud_tags,
                            tagged=False,
                        )
                    )
                continue
            if managed_by != self.managed_by:
                continue  # someone else's (see the docstring)
            resource = ManagedResource(
                cloud_resource_id=str(item["id"]), resource_type=rtype, name=name, tags=cloud_tags
            )
            deployment_id = cloud_tags.get(deployment_key)
            if deployment_id is None:
                found.append(resource)
                continue
            current = best.get((deployment_id, rtype))
            if current is None or rank > current[0]:
                best[(deployment_id, rtype)] = (rank, resource)
        return [resource for _, resource in best.values()] + found

    def check(self) -> None:
        """Raise ``CloudUnavailable`` unless ARM answers for the resource group."""
        try:
            group = self.call(
                "resource",
                "any",
                "resource_groups.get",
                self.resource_group,
                raw=True,
                missing_ok=True,
            )
        except CloudUnavailable:
            raise
        except BrokerError as exc:
            raise CloudUnavailable(
                f"Azure refused to describe the resource group: {exc.message}", retry_after=60.0
            ) from None
        if group is None:
            raise CloudUnavailable(
                f"the resource group '{self.resource_group}' does not exist in subscription "
                f"{self.subscription_id}",
                retry_after=60.0,
            )


__all__ = ["NAME_PREFIX", "AzureProvider", "credential_for"]
