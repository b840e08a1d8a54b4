"""A local stand-in for Azure Resource Manager, for tests and ``serve --provider azure --emulate``.

No Azure subscription is reachable here, so the Azure provider is tested
through the real ``azure-mgmt-*`` clients against this HTTPS server. It
follows ARM's documented protocol for the resource types the provider uses::

    arm = start_arm_emulator()
    client = SqlManagementClient(
        ArmEmulatorCredential(), arm.subscription_id, base_url=arm.url,
        connection_verify=arm.ca_file,
    )
    ...
    arm.stop()

Faithful to ARM (the resource-provider contract and the async operation protocol):

- resources addressed by id (``/subscriptions/{sub}/resourceGroups/{rg}/providers/
  {Namespace}/{type}/{name}[/{type}/{name}...]``), case-insensitive, ``api-version``
  required (400 ``MissingApiVersionParameter``); GET, PUT, PATCH (a JSON merge of
  the body; ``tags`` replaced whole), DELETE; list by parent, by resource group
  and by subscription; the generic ``resources`` lists with ``$filter`` on
  ``tagName``/``tagValue`` or ``resourceType``; tags at scope
  (``.../providers/Microsoft.Resources/tags/default``, Merge/Replace/Delete);
- long-running operations: PUT answers 201 (or 202) with ``Azure-AsyncOperation``,
  202 with ``Location`` for storage accounts, DELETE 202 with ``Location``, PATCH
  202; every one with ``Retry-After``. The operation status resource moves
  InProgress -> Succeeded or Failed (with ``error``); the ``Location`` resource
  answers 202 until done, then 200/204 or the error. ``properties.provisioningState``
  on the resource follows the operation (Creating/Updating/Deleting -> Succeeded/
  Failed), and a resource being deleted disappears when its operation completes;
- what each service returns on its own: secrets (``administratorLoginPassword``)
  are never returned; host names, ``state: Ready``, SQL database ``status``,
  Redis ``redisVersion`` ("6" reads back "6.0.14"), container app ``runningStatus``
  and ingress ``fqdn``; implicit defaults (``blobServices/default``, a database's
  ``backupShortTermRetentionPolicies/default`` of 7 days) exist with their parent;
- errors as ``{"error": {"code", "message"}}``: 404 ``ResourceNotFound``,
  ``ResourceGroupNotFound``, ``ParentResourceNotFound``; 400 for names a service
  refuses and missing locations; 409 ``AnotherOperationInProgress`` while an
  operation runs on the resource; 401 without a bearer token (or another than
  the one configured);
- usages for quota checks (SQL ``ServerQuota`` and vCores, PostgreSQL flexible
  cores per SKU family, storage accounts, Container Apps environment cores),
  counted from what exists against configurable limits;
- the activity log (``Microsoft.Insights/eventtypes/management/values``) with a
  Failed event, and its error code, for every operation that failed.

Fault injection: the next N requests answer 429 with ``Retry-After`` or any
status and error code (optionally only for one method or path fragment), and
the next create of a resource whose name contains a given text ends Failed
with a given error code.

Simplified, on purpose: an operation finishes after ``polls`` reads of its
status or of its resource (or ``delay`` seconds), not on a real schedule;
names are not checked for global uniqueness across subscriptions; quotas are
reported, not enforced on create; bodies are not validated beyond names and
locations; PUT on an existing resource merges rather than replaces; no RBAC,
no ETags, no pagination (every list fits one page).

TLS is on by default, with a throwaway CA made at start (``ca_file``): the
management clients' bearer-token policy refuses plain http, and serving
HTTPS keeps that policy, and the client's certificate checks, in play.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from kidp.localhttp import JsonHandler, serve_in_thread, stop_serving

if TYPE_CHECKING:
    from azure.core.credentials import AccessToken

    from kidp.emulator import EmulatedCloud

DEFAULT_SUBSCRIPTION = "00000000-0000-0000-0000-00000000c1d9"
DEFAULT_TOKEN = "kidp-arm-emulator-token"  # noqa: S105 - a fixed token for a local stand-in
DEFAULT_LOCATION = "westeurope"

Json = dict[str, Any]


class ArmEmulatorCredential:
    """A ``TokenCredential`` for the stand-in: a fixed bearer token that never
    comes near a real identity endpoint."""

    def __init__(self, token: str = DEFAULT_TOKEN) -> None:
        self.token = token

    def __repr__(self) -> str:
        return "ArmEmulatorCredential()"

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        """A token valid for an hour, whatever the scopes."""
        from azure.core.credentials import AccessToken

        return AccessToken(self.token, int(time.time()) + 3600)

    def close(self) -> None:
        """Nothing to release."""


# --- what each resource type does ---------------------------------------------


def _host(suffix: str) -> Callable[[Json, ArmEmulator], None]:
    def fill(resource: Json, arm: ArmEmulator) -> None:
        resource["properties"].setdefault("fullyQualifiedDomainName", f"{resource['name']}{suffix}")
        resource["properties"]["state"] = "Ready"

    return fill


def _sql_server(resource: Json, arm: ArmEmulator) -> None:
    _host(".database.windows.net")(resource, arm)
    resource["properties"].setdefault("version", "12.0")
    resource.setdefault("kind", "v12.0")


def _sql_database(resource: Json, arm: ArmEmulator) -> None:
    props = resource["properties"]
    sku = resource.get("sku") or {"name": "GP_Gen5", "tier": "GeneralPurpose", "capacity": 2}
    resource["sku"] = sku
    props["status"] = "Online"
    props["currentSku"] = dict(sku)
    props["currentServiceObjectiveName"] = f"{sku['name']}_{sku.get('capacity', '')}".rstrip("_")
    props.setdefault("maxSizeBytes", 32 * 1024**3)
    props.setdefault("zoneRedundant", False)
    props.setdefault("collation", "SQL_Latin1_General_CP1_CI_AS")
    props.setdefault("databaseId", str(uuid.uuid4()))
    resource.setdefault("kind", "v12.0,user")


_PG_MINOR = {"12": "22", "13": "18", "14": "15", "15": "10", "16": "6", "17": "2"}
_MYSQL_FULL = {"5.7": "5.7.44", "8.0.21": "8.0.40", "8.4": "8.4.3"}


def _postgres(resource: Json, arm: ArmEmulator) -> None:
    _host(".postgres.database.azure.com")(resource, arm)
    props = resource["properties"]
    props.setdefault("minorVersion", _PG_MINOR.get(str(props.get("version")), "0"))
    props.setdefault("highAvailability", {"mode": "Disabled"})
    props["highAvailability"].setdefault("state", "Healthy")


def _mysql(resource: Json, arm: ArmEmulator) -> None:
    _host(".mysql.database.azure.com")(resource, arm)
    props = resource["properties"]
    props.setdefault("fullVersion", _MYSQL_FULL.get(str(props.get("version")), "8.0.40"))
    props.setdefault("highAvailability", {"mode": "Disabled"})
    props.setdefault("databasePort", 3306)


def _redis(resource: Json, arm: ArmEmulator) -> None:
    props = resource["properties"]
    props["hostName"] = f"{resource['name']}.redis.cache.windows.net"
    props["port"], props["sslPort"] = 6379, 6380
    requested = str(props.get("redisVersion") or "6")
    props["redisVersion"] = "6.0.14" if requested in ("6", "latest") else requested
    props.setdefault("enableNonSslPort", False)


def _topic(resource: Json, arm: ArmEmulator) -> None:
    props = resource["properties"]
    props.setdefault("status", "Active")
    props.setdefault("sizeInBytes", 0)
    props.setdefault("enablePartitioning", False)
    props.setdefault("defaultMessageTimeToLive", "P10675199DT2H48M5.4775807S")


def _storage(resource: Json, arm: ArmEmulator) -> None:
    name, props = resource["name"], resource["properties"]
    props["primaryEndpoints"] = {
        kind: f"https://{name}.{kind}.core.windows.net/" for kind in ("blob", "queue", "table")
    }
    props.setdefault(
        "encryption",
        {"services": {"blob": {"enabled": True}}, "keySource": "Microsoft.Storage"},
    )
    props.setdefault("supportsHttpsTrafficOnly", True)
    props["statusOfPrimary"] = "available"


def _environment(resource: Json, arm: ArmEmulator) -> None:
    location = str(resource.get("location") or DEFAULT_LOCATION).replace(" ", "").lower()
    resource["properties"].setdefault(
        "defaultDomain", f"{uuid.uuid4().hex[:10]}.{location}.azurecontainerapps.io"
    )


def _container_app(resource: Json, arm: ArmEmulator) -> None:
    props = resource["properties"]
    props["runningStatus"] = "Running"
    props["latestRevisionName"] = f"{resource['name']}--{uuid.uuid4().hex[:7]}"
    environment = arm.resource(
        str(props.get("managedEnvironmentId") or props.get("environmentId") or "")
    )
    domain = (environment or {}).get("properties", {}).get("defaultDomain", "emulated.invalid")
    ingress = (props.get("configuration") or {}).get("ingress")
    if ingress is not None:
        internal = "" if ingress.get("external") else ".internal"
        ingress["fqdn"] = f"{resource['name']}{internal}.{domain}"
        props["latestRevisionFqdn"] = f"{props['latestRevisionName']}{internal}.{domain}"


@dataclass(frozen=True)
class _Type:
    """How ARM treats one resource type (``Namespace/type[/child...]``)."""

    #: Methods answered as long-running operations.
    lro: frozenset[str] = frozenset({"PUT", "PATCH", "DELETE"})
    #: Status of a PUT that creates / that replaces, when it is an LRO.
    put_new: int = 201
    put_existing: int = 200
    #: Status of a synchronous PUT that creates (some services say 200).
    sync_created: int = 201
    #: Tracked resources have a location and tags; proxy resources have neither.
    tracked: bool = True
    #: PUT answered with Location only (and no body) instead of Azure-AsyncOperation.
    location_only: bool = False
    name_rule: re.Pattern[str] | None = None
    name_hint: str = ""
    #: Properties ARM accepts but never returns.
    secrets: tuple[str, ...] = ()
    #: Properties while the create runs (besides provisioningState).
    creating: tuple[tuple[str, str], ...] = ()
    #: Fills what the service computes once the create succeeded.
    ready: Callable[[Json, ArmEmulator], None] | None = None
    #: A body that exists implicitly with its parent (``blobServices/default``).
    implicit: Json | None = None
    #: Value of provisioningState while a create runs.
    creating_state: str = "Creating"


_DNS = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_FLEXIBLE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$")


def _flexible_server(state: str, ready: Callable[[Json, ArmEmulator], None]) -> _Type:
    """A PostgreSQL or MySQL flexible server: ARM treats both alike but for the
    ``state`` a create shows and what the service fills in once ``ready``."""
    return _Type(
        put_new=202,
        put_existing=202,
        name_rule=_FLEXIBLE,
        name_hint="lowercase letters, digits and hyphens, 3-63, not starting or ending with '-'",
        secrets=("administratorLoginPassword",),
        creating=(("state", state),),
        ready=ready,
    )


TYPES: dict[str, _Type] = {
    "microsoft.sql/servers": _Type(
        name_rule=_DNS,
        name_hint="lowercase letters, digits and hyphens, 1-63, not starting or ending with '-'",
        secrets=("administratorLoginPassword",),
        creating=(("state", "Creating"),),
        ready=_sql_server,
    ),
    "microsoft.sql/servers/databases": _Type(
        creating=(("status", "Creating"),), ready=_sql_database
    ),
    "microsoft.sql/servers/databases/backupshorttermretentionpolicies": _Type(
        lro=frozenset({"PUT"}),
        put_new=202,
        put_existing=202,
        tracked=False,
        implicit={"properties": {"retentionDays": 7, "diffBackupIntervalInHours": 12}},
    ),
    "microsoft.dbforpostgresql/flexibleservers": _flexible_server("Provisioning", _postgres),
    "microsoft.dbformysql/flexibleservers": _flexible_server("Updating", _mysql),
    "microsoft.cache/redis": _Type(
        name_rule=re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"),
        name_hint="letters, digits and hyphens, 1-63, not starting or ending with '-'",
        ready=_redis,
    ),
    "microsoft.servicebus/namespaces": _Type(),
    "microsoft.servicebus/namespaces/topics": _Type(
        lro=frozenset(),
        sync_created=200,
        tracked=False,
        name_rule=re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,258}[A-Za-z0-9_])?$"),
        name_hint="letters, digits, '.', '-', '_' and '/', 1-260",
        ready=_topic,
    ),
    "microsoft.storage/storageaccounts": _Type(
        lro=frozenset({"PUT"}),
        put_new=202,
        put_existing=200,
        location_only=True,
        name_rule=re.compile(r"^[a-z0-9]{3,24}$"),
        name_hint="3-24 lowercase letters and digits",
        ready=_storage,
    ),
    "microsoft.storage/storageaccounts/blobservices": _Type(
        lro=frozenset(),
        sync_created=200,
        tracked=False,
        name_rule=re.compile(r"^default$"),
        name_hint="'default'",
        implicit={
            "properties": {
                "isVersioningEnabled": False,
                "deleteRetentionPolicy": {"enabled": False},
            }
        },
    ),
    "microsoft.storage/storageaccounts/blobservices/containers": _Type(
        lro=frozenset(),
        tracked=False,
        name_rule=re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"),
        name_hint="3-63 lowercase letters, digits and single hyphens",
    ),
    "microsoft.app/managedenvironments": _Type(ready=_environment),
    "microsoft.app/containerapps": _Type(
        name_rule=re.compile(r"^(?!.*--)[a-z][a-z0-9-]{0,30}[a-z0-9]$"),
        name_hint="2-32 lowercase letters, digits and single hyphens, starting with a letter",
        creating_state="InProgress",
        ready=_container_app,
    ),
}

_DISPLAY_TYPES = {
    "microsoft.sql": "Microsoft.Sql",
    "microsoft.dbforpostgresql": "Microsoft.DBforPostgreSQL",
    "microsoft.dbformysql": "Microsoft.DBforMySQL",
    "microsoft.cache": "Microsoft.Cache",
    "microsoft.servicebus": "Microsoft.ServiceBus",
    "microsoft.storage": "Microsoft.Storage",
    "microsoft.app": "Microsoft.App",
}

_CORES = re.compile(r"^Standard_[A-Z]+?(\d+)", re.IGNORECASE)


def _sku_family(sku_name: str) -> str:
    """The compute family a SKU's vCores count against, named as Azure's quotas
    name them: ``Standard_B1ms`` -> ``standardBSFamily``, ``Standard_D2ds_v5`` ->
    ``standardDDSv5Family``."""
    match = re.match(r"^Standard_([A-Z]+)\d+([a-z]*)(?:_(v\d+))?$", sku_name)
    if not match:
        return "unknownFamily"
    series, features, version = match.groups()
    if series == "B":
        return "standardBSFamily"
    return f"standard{series}{features.upper()}{version or ''}Family"


def _cores(sku_name: str) -> int:
    match = _CORES.match(sku_name)
    return int(match.group(1)) if match else 0


def _cpu(app: Json) -> float:
    template = app.get("properties", {}).get("template") or {}
    scale = template.get("scale") or {}
    replicas = int(scale.get("minReplicas") or 1)
    per_replica = sum(
        float((container.get("resources") or {}).get("cpu") or 0)
        for container in template.get("containers") or []
    )
    return per_replica * replicas


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Operation:
    id: str
    resource_id: str
    method: str
    namespace: str
    location: str
    api_version: str
    status: str = "InProgress"
    reads: int = 0
    started: float = field(default_factory=time.monotonic)
    start_time: str = field(default_factory=_now)
    end_time: str | None = None
    error: Json | None = None
    error_status: int = 400


@dataclass
class _Fault:
    status: int
    code: str
    message: str
    retry_after: float | None
    method: str | None
    path: str | None
    remaining: int


def _merge(target: Json, patch: Json) -> None:
    """JSON merge patch (RFC 7396), in place; ``tags`` are replaced whole, as ARM does."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict) and key != "tags":
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class ArmError(Exception):
    """An ARM error answer: status, code, message and headers."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


@dataclass(frozen=True)
class _Path:
    """A parsed resource path: the resource group and the type/name pairs."""

    subscription: str
    group: str
    namespace: str
    pairs: tuple[tuple[str, str], ...]
    #: A trailing type without a name: a list of that type under the rest.
    list_type: str | None = None

    @property
    def type_key(self) -> str:
        types = [t for t, _ in self.pairs] + ([self.list_type] if self.list_type else [])
        return "/".join([self.namespace, *types]).lower()

    @property
    def display_type(self) -> str:
        types = [t for t, _ in self.pairs] + ([self.list_type] if self.list_type else [])
        namespace = _DISPLAY_TYPES.get(self.namespace.lower(), self.namespace)
        return "/".join([namespace, *types])

    def resource_id(self, pairs: tuple[tuple[str, str], ...] | None = None) -> str:
        chosen = self.pairs if pairs is None else pairs
        namespace = _DISPLAY_TYPES.get(self.namespace.lower(), self.namespace)
        tail = "/".join(f"{t}/{n}" for t, n in chosen)
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.group}"
            f"/providers/{namespace}/{tail}"
        )

    def parent(self) -> _Path | None:
        if len(self.pairs) <= 1:
            return None
        return _Path(self.subscription, self.group, self.namespace, self.pairs[:-1])


def parse_resource_id(resource_id: str) -> _Path | None:
    """The parts of an ARM resource id (or list path); None if it is not one."""
    parts = [unquote(p) for p in resource_id.strip("/").split("/")]
    if (
        len(parts) < 6
        or parts[0].lower() != "subscriptions"
        or parts[2].lower() != "resourcegroups"
        or parts[4].lower() != "providers"
    ):
        return None
    rest = parts[6:]
    pairs = tuple((rest[i], rest[i + 1]) for i in range(0, len(rest) - 1, 2))
    list_type = rest[-1] if len(rest) % 2 == 1 else None
    return _Path(parts[1], parts[3], parts[5], pairs, list_type)


class ArmEmulator:
    """The stand-in's state and behaviour; :func:`start_arm_emulator` serves it.

    ``polls``: reads of an operation (its status URL or its resource) before it
    finishes; ``delay``: or seconds, whichever comes first; ``retry_after``:
    the ``Retry-After`` sent with every accepted operation.
    """

    def __init__(
        self,
        *,
        subscription_id: str = DEFAULT_SUBSCRIPTION,
        resource_groups: tuple[str, ...] = ("kidp",),
        location: str = DEFAULT_LOCATION,
        polls: int = 2,
        delay: float | None = None,
        retry_after: int = 0,
        token: str | None = DEFAULT_TOKEN,
    ) -> None:
        self.subscription_id = subscription_id
        self.location = location
        self.polls = polls
        self.delay = delay
        self.retry_after = retry_after
        self.token = token
        self.url = ""
        self.ca_file: Path | None = None
        self.quota_limits: dict[tuple[str, str], int] = {
            ("microsoft.sql", "ServerQuota"): 250,
            ("microsoft.sql", "RegionalVCoreQuotaForSQLDBAndDW"): 1000,
            ("microsoft.storage", "StorageAccounts"): 250,
            ("microsoft.app", "ManagedEnvironmentConsumptionCores"): 100,
        }
        #: PostgreSQL flexible servers: vCores per SKU family (others get 100).
        self.family_limits: dict[str, int] = {
            "standardBSFamily": 100,
            "standardDDSv5Family": 100,
            "standardEDSv5Family": 100,
        }
        self.default_family_limit = 100
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._groups: dict[str, Json] = {}
        self._resources: dict[str, Json] = {}
        self._secrets: dict[str, Json] = {}
        self._operations: dict[str, _Operation] = {}
        self._busy: dict[str, str] = {}
        self._faults: list[_Fault] = []
        self._failures: list[tuple[str, str, str]] = []
        self._events: list[Json] = []
        for group in resource_groups:
            self.create_resource_group(group)

    # --- what tests and the emulated broker use -----------------------------

    def create_resource_group(self, name: str, location: str | None = None) -> Json:
        """Create (or keep) the resource group ``name``."""
        with self._lock:
            group = {
                "id": f"/subscriptions/{self.subscription_id}/resourceGroups/{name}",
                "name": name,
                "type": "Microsoft.Resources/resourceGroups",
                "location": location or self.location,
                "properties": {"provisioningState": "Succeeded"},
            }
            return copy.deepcopy(self._groups.setdefault(name.lower(), group))

    def resource_id(self, group: str, namespace: str, *pairs: str) -> str:
        """``/subscriptions/.../resourceGroups/{group}/providers/{namespace}/{t}/{n}...``."""
        tail = "/".join(pairs)
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{group}"
            f"/providers/{namespace}/{tail}"
        )

    def seed(self, resource_id: str, body: Json) -> Json:
        """Store a finished resource as if it had been created long ago (a
        Service Bus namespace, a Container Apps environment, a stray resource)."""
        path = parse_resource_id(resource_id)
        if path is None or not path.pairs:
            raise ValueError(f"not a resource id: {resource_id}")
        with self._lock:
            resource = self._new_resource(path, copy.deepcopy(body))
            self._finish_create(path, resource)
            self._resources[path.resource_id().lower()] = resource
            return copy.deepcopy(resource)

    def resource(self, resource_id: str) -> Json | None:
        """The resource as ARM stores it (a copy), or None."""
        with self._lock:
            found = self._resources.get(self._key(resource_id))
            return copy.deepcopy(found) if found is not None else None

    def resources(self, type_name: str | None = None) -> list[Json]:
        """Every resource (of ``type_name``, e.g. ``Microsoft.Sql/servers``), copied."""
        with self._lock:
            return [
                copy.deepcopy(r)
                for r in self._resources.values()
                if type_name is None or r["type"].lower() == type_name.lower()
            ]

    def change(self, resource_id: str, patch: Json) -> Json:
        """Change a resource behind the provider's back (a drift), as a merge patch."""
        with self._lock:
            resource = self._resources[self._key(resource_id)]
            _merge(resource, patch)
            return copy.deepcopy(resource)

    def remove(self, resource_id: str) -> None:
        """Delete a resource and its children at once (someone deleted it by hand)."""
        with self._lock:
            self._drop(self._key(resource_id))

    def secret(self, resource_id: str, name: str) -> Any:
        """A secret property the resource was given (never returned over HTTP)."""
        with self._lock:
            return self._secrets.get(self._key(resource_id), {}).get(name)

    def fail_requests(
        self,
        status: int,
        *,
        code: str | None = None,
        count: int = 1,
        retry_after: float | None = None,
        method: str | None = None,
        path: str | None = None,
        message: str = "injected fault",
    ) -> None:
        """Answer the next ``count`` requests (matching ``method`` and a ``path``
        fragment, when given) with ``status`` and error ``code``."""
        default = {429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable"}
        with self._lock:
            self._faults.append(
                _Fault(
                    status=status,
                    code=code or default.get(status, "InjectedFault"),
                    message=message,
                    retry_after=retry_after,
                    method=method.upper() if method else None,
                    path=path.lower() if path else None,
                    remaining=count,
                )
            )

    def throttle(self, *, count: int = 1, retry_after: float = 30) -> None:
        """Answer the next ``count`` requests 429 with ``Retry-After``."""
        self.fail_requests(429, count=count, retry_after=retry_after, message="Rate limit exceeded")

    def fail_provisioning(self, name_contains: str, *, code: str, message: str = "") -> None:
        """The next create of a resource whose name contains ``name_contains``
        ends with provisioningState Failed and error ``code``."""
        with self._lock:
            self._failures.append((name_contains.lower(), code, message or f"{code} (injected)"))

    def set_quota(self, namespace: str, usage: str, limit: int) -> None:
        """Set a usage's limit (``Microsoft.Sql``/``ServerQuota``, ...); PostgreSQL
        flexible families go through ``family_limits``."""
        with self._lock:
            self.quota_limits[(namespace.lower(), usage)] = limit

    # --- request handling -----------------------------------------------------

    def _key(self, resource_id: str) -> str:
        path = parse_resource_id(resource_id)
        return path.resource_id().lower() if path else resource_id.lower()

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], Json | None]:
        """Answer one request: (status, headers, JSON body or None)."""
        url = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = re.sub(r"/{2,}", "/", url.path)
        with self._lock:
            self.requests.append((method, raw_path))
            try:
                self._authenticate(headers)
                self._inject(method, path)
                if "api-version" not in query:
                    raise ArmError(
                        400,
                        "MissingApiVersionParameter",
                        "The api-version query parameter (?api-version=) is required for "
                        "all requests.",
                    )
                payload: Json = json.loads(body) if body.strip() else {}
                return self._route(method, path, query, payload)
            except ArmError as exc:
                return (
                    exc.status,
                    exc.headers,
                    {"error": {"code": exc.code, "message": exc.message}},
                )
            except json.JSONDecodeError:
                return 400, {}, {"error": {"code": "InvalidRequestContent", "message": "bad JSON"}}

    def _authenticate(self, headers: dict[str, str]) -> None:
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ArmError(
                401,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
                {"WWW-Authenticate": 'Bearer authorization_uri="https://login.invalid/"'},
            )
        if self.token is not None and token != self.token:
            raise ArmError(401, "InvalidAuthenticationToken", "The access token is invalid.", {})

    def _inject(self, method: str, path: str) -> None:
        for fault in self._faults:
            if fault.remaining <= 0:
                continue
            if fault.method and fault.method != method:
                continue
            if fault.path and fault.path not in path.lower():
                continue
            fault.remaining -= 1
            headers: dict[str, str] = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = str(int(fault.retry_after))
            raise ArmError(fault.status, fault.code, fault.message, headers)

    def _route(
        self, method: str, path: str, query: dict[str, str], body: Json
    ) -> tuple[int, dict[str, str], Json | None]:
        parts = path.strip("/").split("/")
        lower = [p.lower() for p in parts]
        if len(parts) < 2 or lower[0] != "subscriptions":
            raise ArmError(404, "NotFound", f"no route for {path}")
        if parts[1].lower() != self.subscription_id.lower():
            raise ArmError(
                404, "SubscriptionNotFound", f"The subscription '{parts[1]}' could not be found."
            )
        rest, low = parts[2:], lower[2:]
        version = query["api-version"]
        if low[:1] == ["providers"] and len(rest) >= 3:
            return self._subscription_provider(method, rest, low, query)
        if low == ["resources"] and method == "GET":
            return 200, {}, {"value": self._list(None, query)}
        if low[:1] == ["resourcegroups"] and len(rest) >= 2:
            group = self._groups.get(low[1])
            if len(rest) == 2:
                return self._resource_group(method, rest[1], group)
            if group is None:
                raise ArmError(
                    404, "ResourceGroupNotFound", f"Resource group '{rest[1]}' could not be found."
                )
            if low[2:] == ["resources"] and method == "GET":
                return 200, {}, {"value": self._list(group["name"], query)}
            if "microsoft.resources" in lower and lower[-2:] == ["tags", "default"]:
                # /{resource id}/providers/Microsoft.Resources/tags/default
                scope = "/" + "/".join(parts[: lower.index("microsoft.resources") - 1])
                return self._tags_at_scope(method, scope, body)
        parsed = parse_resource_id(path)
        if parsed is None:
            raise ArmError(404, "NotFound", f"no route for {path}")
        if parsed.list_type is not None and parsed.type_key == (
            "microsoft.app/managedenvironments/usages"
        ):
            if self._get_stored(parsed) is None:
                raise ArmError(404, "ResourceNotFound", "The managed environment was not found.")
            return 200, {}, self._environment_usages(parsed)
        if parsed.list_type is not None:
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", f"{method} is not allowed on a collection")
            return 200, {}, {"value": self._list_children(parsed)}
        return self._resource(method, parsed, body, version)

    # --- resource groups, lists, tags ------------------------------------------

    def _resource_group(
        self, method: str, name: str, group: Json | None
    ) -> tuple[int, dict[str, str], Json | None]:
        if method == "GET":
            if group is None:
                raise ArmError(
                    404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found."
                )
            return 200, {}, copy.deepcopy(group)
        if method == "PUT":
            return (201 if group is None else 200), {}, self.create_resource_group(name)
        raise ArmError(405, "MethodNotAllowed", f"{method} on a resource group is not modelled")

    def _list(self, group: str | None, query: dict[str, str]) -> list[Json]:
        wanted = _tag_filter(query.get("$filter", ""))
        found: list[Json] = []
        for resource in self._resources.values():
            if (
                group is not None
                and f"/resourcegroups/{group.lower()}/" not in resource["id"].lower() + "/"
            ):
                continue
            if not _matches(resource, wanted):
                continue
            if not TYPES.get(resource["type"].lower(), _Type()).tracked:
                continue
            self._read(resource["id"])
            entry: Json = {
                k: copy.deepcopy(resource[k])
                for k in ("id", "name", "type", "location", "tags", "sku", "kind")
                if k in resource
            }
            if "provisioningstate" in query.get("$expand", "").lower():
                entry["provisioningState"] = resource.get("properties", {}).get("provisioningState")
            found.append(entry)
        return found

    def _list_children(self, parsed: _Path) -> list[Json]:
        parent = parsed.resource_id() if parsed.pairs else None
        if parent is not None and self._get_stored(parsed) is None:
            raise ArmError(
                404, "ParentResourceNotFound", f"Resource '{parent}' could not be found."
            )
        prefix = (parent or "").lower()
        found = []
        for key, resource in self._resources.items():
            candidate = parse_resource_id(resource["id"])
            if candidate is None or candidate.type_key != parsed.type_key:
                continue
            if parent is None and candidate.group.lower() != parsed.group.lower():
                continue
            if parent is not None and not key.startswith(prefix + "/"):
                continue
            self._read(resource["id"])
            found.append(self._public(resource))
        return found

    def _tags_at_scope(
        self, method: str, scope: str, body: Json
    ) -> tuple[int, dict[str, str], Json | None]:
        key = self._key(scope)
        resource = self._resources.get(key)
        if resource is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource '{scope}' was not found.")
        tags: dict[str, str] = resource.setdefault("tags", {})
        given = dict((body.get("properties") or {}).get("tags") or {})
        if method == "PUT":
            tags.clear()
            tags.update(given)
        elif method == "PATCH":
            operation = str(body.get("operation", "Merge")).lower()
            if operation == "replace":
                tags.clear()
                tags.update(given)
            elif operation == "delete":
                for name, value in given.items():
                    if tags.get(name) == value or value == "":
                        tags.pop(name, None)
            else:
                tags.update(given)
        elif method != "GET":
            raise ArmError(405, "MethodNotAllowed", f"{method} on tags is not modelled")
        return (
            200,
            {},
            {
                "id": f"{resource['id']}/providers/Microsoft.Resources/tags/default",
                "name": "default",
                "type": "Microsoft.Resources/tags",
                "properties": {"tags": dict(tags)},
            },
        )

    # --- subscription-level provider paths ------------------------------------

    def _subscription_provider(
        self, method: str, rest: list[str], low: list[str], query: dict[str, str]
    ) -> tuple[int, dict[str, str], Json | None]:
        namespace = low[1]
        if low[1:4] == ["microsoft.insights", "eventtypes", "management"]:
            return 200, {}, {"value": self._activity(query.get("$filter", ""))}
        if (
            len(low) >= 6
            and low[2] == "locations"
            and low[4]
            in (
                "operationstatuses",
                "operationresults",
                "azureasyncoperation",
            )
        ):
            return self._operation(rest[5], status_resource=low[4] != "operationresults")
        if len(low) >= 5 and low[2] == "locations" and "usages" in low[-2:]:
            single = rest[-1] if low[-2] == "usages" else None
            return 200, {}, self._usages(namespace, rest[3], single)
        if len(low) == 3 and method == "GET":
            type_key = f"{namespace}/{low[2]}"
            found = [
                self._public(r)
                for r in self._resources.values()
                if (p := parse_resource_id(r["id"])) is not None and p.type_key == type_key
            ]
            return 200, {}, {"value": found}
        raise ArmError(404, "NotFound", "no route for /" + "/".join(rest))

    def _usages(self, namespace: str, location: str, single: str | None) -> Json:
        entries: list[tuple[str, int, int, str]] = []
        counts = self._counts(location)
        if namespace == "microsoft.dbforpostgresql":
            families = {name: 0 for name in self.family_limits}
            for resource in self._of_type("microsoft.dbforpostgresql/flexibleservers", location):
                sku = str((resource.get("sku") or {}).get("name", ""))
                family = _sku_family(sku)
                families[family] = families.get(family, 0) + _cores(sku)
            for family, used in sorted(families.items()):
                limit = self.family_limits.get(family, self.default_family_limit)
                entries.append((family, used, limit, "Count"))
            return {
                "value": [
                    {
                        "id": f"/subscriptions/{self.subscription_id}/providers/"
                        f"Microsoft.DBforPostgreSQL/locations/{location}/usages/{name}",
                        "name": {"value": name, "localizedValue": name},
                        "currentValue": used,
                        "limit": limit,
                        "unit": unit,
                    }
                    for name, used, limit, unit in entries
                ]
            }
        for (space, usage), limit in self.quota_limits.items():
            if space == namespace:
                entries.append((usage, counts.get(usage, 0), limit, "Count"))
        if namespace == "microsoft.sql":
            items: list[Json] = [
                {
                    "id": f"/subscriptions/{self.subscription_id}/providers/Microsoft.Sql/"
                    f"locations/{location}/usages/{name}",
                    "name": name,
                    "type": "Microsoft.Sql/locations/usages",
                    "properties": {
                        "displayName": name,
                        "currentValue": used,
                        "limit": limit,
                        "unit": unit,
                    },
                }
                for name, used, limit, unit in entries
            ]
            if single is not None:
                for item in items:
                    if str(item["name"]).lower() == single.lower():
                        return item
                raise ArmError(404, "ResourceNotFound", f"usage '{single}' not found")
            return {"value": items}
        return {
            "value": [
                {
                    "name": {"value": name, "localizedValue": name},
                    "currentValue": used,
                    "limit": limit,
                    "unit": unit,
                }
                for name, used, limit, unit in entries
            ]
        }

    def _of_type(self, type_key: str, location: str | None = None) -> Iterator[Json]:
        for resource in self._resources.values():
            if resource["type"].lower() != type_key:
                continue
            if location and str(resource.get("location", "")).lower() != location.lower():
                continue
            yield resource

    def _counts(self, location: str) -> dict[str, int]:
        vcores = sum(
            int((r.get("sku") or {}).get("capacity") or 0)
            for r in self._of_type("microsoft.sql/servers/databases", location)
        )
        return {
            "ServerQuota": sum(1 for _ in self._of_type("microsoft.sql/servers", location)),
            "RegionalVCoreQuotaForSQLDBAndDW": vcores,
            "StorageAccounts": sum(
                1 for _ in self._of_type("microsoft.storage/storageaccounts", location)
            ),
            "ManagedEnvironmentConsumptionCores": int(
                sum(_cpu(r) for r in self._of_type("microsoft.app/containerapps"))
            ),
        }

    def _environment_usages(self, parsed: _Path) -> Json:
        environment_id = parsed.resource_id().lower()
        used = sum(
            _cpu(app)
            for app in self._of_type("microsoft.app/containerapps")
            if str(app["properties"].get("managedEnvironmentId", "")).lower() == environment_id
        )
        limit = self.quota_limits[("microsoft.app", "ManagedEnvironmentConsumptionCores")]
        name = "ManagedEnvironmentConsumptionCores"
        return {
            "value": [
                {
                    "name": {"value": name, "localizedValue": name},
                    "currentValue": used,
                    "limit": limit,
                    "unit": "Count",
                }
            ]
        }

    def _activity(self, flt: str) -> list[Json]:
        uri = re.search(r"resourceUri eq '([^']+)'", flt, re.IGNORECASE)
        since = re.search(r"eventTimestamp ge '([^']+)'", flt, re.IGNORECASE)
        found = []
        for event in self._events:
            if uri and event["resourceId"].lower() != uri.group(1).lower():
                continue
            if since and event["eventTimestamp"] < since.group(1).replace("+00:00", "Z"):
                continue
            found.append(copy.deepcopy(event))
        return list(reversed(found))

    # --- operations -------------------------------------------------------------

    def _operation(
        self, operation_id: str, *, status_resource: bool
    ) -> tuple[int, dict[str, str], Json | None]:
        op = self._operations.get(operation_id)
        if op is None:
            raise ArmError(404, "OperationNotFound", f"operation {operation_id} not found")
        self._tick(op)
        wait = {"Retry-After": str(self.retry_after)}
        if status_resource:
            body: Json = {
                "id": self._operation_path(op, "operationStatuses"),
                "name": op.id,
                "status": op.status,
                "startTime": op.start_time,
            }
            if op.end_time:
                body["endTime"] = op.end_time
            if op.error:
                body["error"] = op.error
            return 200, ({} if op.end_time else wait), body
        if op.status == "InProgress":
            return 202, {**wait, "Location": self._operation_url(op, "operationResults")}, None
        if op.status == "Failed":
            assert op.error is not None
            return op.error_status, {}, {"error": op.error}
        resource = self._resources.get(op.resource_id.lower())
        if op.method == "DELETE" or resource is None:
            return 204, {}, None
        return 200, {}, self._public(resource)

    def _operation_path(self, op: _Operation, kind: str) -> str:
        namespace = _DISPLAY_TYPES.get(op.namespace, op.namespace)
        return (
            f"/subscriptions/{self.subscription_id}/providers/{namespace}/locations/"
            f"{op.location}/{kind}/{op.id}"
        )

    def _operation_url(self, op: _Operation, kind: str) -> str:
        return f"{self.url}{self._operation_path(op, kind)}?api-version={op.api_version}"

    def _start(self, parsed: _Path, method: str, version: str, location: str) -> _Operation:
        op = _Operation(
            id=str(uuid.uuid4()),
            resource_id=parsed.resource_id(),
            method=method,
            namespace=parsed.namespace.lower(),
            # Proxy resources have no location: ARM tracks their operations in the region's.
            location=(location or self.location).replace(" ", "").lower(),
            api_version=version,
        )
        self._operations[op.id] = op
        self._busy[op.resource_id.lower()] = op.id
        return op

    def _read(self, resource_id: str) -> None:
        """A read of a resource also advances the operation running on it."""
        op_id = self._busy.get(resource_id.lower())
        if op_id is not None:
            self._tick(self._operations[op_id])

    def _tick(self, op: _Operation) -> None:
        if op.status != "InProgress":
            return
        op.reads += 1
        elapsed = time.monotonic() - op.started
        if op.reads < self.polls and (self.delay is None or elapsed < self.delay):
            return
        self._complete(op)

    def _complete(self, op: _Operation) -> None:
        key = op.resource_id.lower()
        self._busy.pop(key, None)
        op.end_time = _now()
        resource = self._resources.get(key)
        if op.method == "DELETE":
            self._drop(key)
            op.status = "Succeeded"
            return
        if resource is None:
            op.status = "Canceled"
            return
        failure = self._failure_for(resource["name"]) if op.method == "PUT-new" else None
        props = resource.setdefault("properties", {})
        if failure is not None:
            code, message = failure
            op.status, op.error = "Failed", {"code": code, "message": message}
            props["provisioningState"] = "Failed"
            self._events.append(
                {
                    "eventTimestamp": op.end_time,
                    "resourceId": resource["id"],
                    "operationName": {
                        "value": f"{resource['type']}/write",
                        "localizedValue": f"Create or update {resource['type']}",
                    },
                    "status": {"value": "Failed", "localizedValue": "Failed"},
                    "level": "Error",
                    "properties": {
                        "statusCode": "BadRequest",
                        "statusMessage": json.dumps({"status": "Failed", "error": op.error}),
                    },
                }
            )
            return
        op.status = "Succeeded"
        path = parse_resource_id(resource["id"])
        assert path is not None
        self._finish_create(path, resource)

    def _failure_for(self, name: str) -> tuple[str, str] | None:
        for index, (fragment, code, message) in enumerate(self._failures):
            if fragment in name.lower():
                del self._failures[index]
                return code, message
        return None

    def _finish_create(self, path: _Path, resource: Json) -> None:
        kind = TYPES.get(path.type_key, _Type())
        props = resource.setdefault("properties", {})
        if kind.lro:
            props["provisioningState"] = "Succeeded"
        if kind.ready is not None:
            kind.ready(resource, self)

    def _drop(self, key: str) -> None:
        for other in [k for k in self._resources if k == key or k.startswith(key + "/")]:
            self._resources.pop(other, None)
            self._secrets.pop(other, None)
            self._busy.pop(other, None)

    # --- one resource -----------------------------------------------------------

    def _get_stored(self, parsed: _Path) -> Json | None:
        """The stored resource, or an implicit one whose parent exists."""
        resource = self._resources.get(parsed.resource_id().lower())
        if resource is not None:
            return resource
        kind = TYPES.get(parsed.type_key)
        parent = parsed.parent()
        if kind is None or kind.implicit is None or parent is None:
            return None
        if self._get_stored(parent) is None:
            return None
        implicit = copy.deepcopy(kind.implicit)
        implicit.update(id=parsed.resource_id(), name=parsed.pairs[-1][1], type=parsed.display_type)
        return implicit

    def _new_resource(self, parsed: _Path, body: Json) -> Json:
        kind = TYPES.get(parsed.type_key, _Type())
        resource: Json = {
            "id": parsed.resource_id(),
            "name": parsed.pairs[-1][1],
            "type": parsed.display_type,
        }
        if kind.tracked:
            resource["location"] = body.get("location") or self.location
            resource["tags"] = dict(body.get("tags") or {})
        for key in ("sku", "kind", "identity", "zones"):
            if key in body:
                resource[key] = copy.deepcopy(body[key])
        resource["properties"] = copy.deepcopy(body.get("properties") or {})
        resource["systemData"] = {"createdAt": _now(), "createdByType": "Application"}
        return resource

    def _public(self, resource: Json) -> Json:
        public = copy.deepcopy(resource)
        kind = TYPES.get(str(public["type"]).lower(), _Type())
        for name in kind.secrets:
            public.get("properties", {}).pop(name, None)
        return public

    def _keep_secrets(self, key: str, kind: _Type, resource: Json) -> None:
        props = resource.get("properties", {})
        for name in kind.secrets:
            if name in props:
                self._secrets.setdefault(key, {})[name] = props.pop(name)

    def _resource(
        self, method: str, parsed: _Path, body: Json, version: str
    ) -> tuple[int, dict[str, str], Json | None]:
        key = parsed.resource_id().lower()
        type_key = parsed.type_key
        kind = TYPES.get(type_key)
        if kind is None:
            raise ArmError(
                400,
                "InvalidResourceType",
                f"The resource type '{parsed.display_type}' could not be found in the "
                f"namespace '{parsed.namespace}' for api version '{version}'.",
            )
        parent = parsed.parent()
        if parent is not None and self._get_stored(parent) is None:
            raise ArmError(
                404,
                "ParentResourceNotFound",
                f"Can not perform requested operation on nested resource. Parent resource "
                f"'{parent.pairs[-1][1]}' not found.",
            )
        if method == "GET":
            self._read(parsed.resource_id())
            resource = self._get_stored(parsed)
            if resource is None:
                raise ArmError(
                    404,
                    "ResourceNotFound",
                    f"The Resource '{parsed.display_type}/{parsed.pairs[-1][1]}' under "
                    f"resource group '{parsed.group}' was not found.",
                )
            return 200, {}, self._public(resource)
        if key in self._busy:
            raise ArmError(
                409,
                "AnotherOperationInProgress",
                f"An operation is already in progress on '{parsed.pairs[-1][1]}'.",
            )
        if method == "PUT":
            return self._put(parsed, kind, body, version)
        if method == "PATCH":
            return self._patch(parsed, kind, body, version)
        if method == "DELETE":
            return self._delete(parsed, kind, version)
        raise ArmError(405, "MethodNotAllowed", f"{method} is not allowed here")

    def _put(
        self, parsed: _Path, kind: _Type, body: Json, version: str
    ) -> tuple[int, dict[str, str], Json | None]:
        key = parsed.resource_id().lower()
        name = parsed.pairs[-1][1]
        if kind.name_rule is not None and not kind.name_rule.match(name):
            raise ArmError(
                400,
                "InvalidResourceName",
                f"The name '{name}' is not valid for {parsed.display_type}: {kind.name_hint}.",
            )
        existing = self._resources.get(key)
        if existing is None and kind.implicit is not None:
            # A PUT on an implicit child (blobServices/default) changes its defaults.
            defaults = copy.deepcopy(kind.implicit)
            _merge(defaults, body)
            body = defaults
        if existing is None and kind.tracked and not body.get("location"):
            raise ArmError(400, "LocationRequired", "The location property is required.")
        if existing is None:
            resource = self._new_resource(parsed, body)
            self._keep_secrets(key, kind, resource)
            self._resources[key] = resource
        else:
            resource = existing
            update = copy.deepcopy(body)
            update.pop("location", None)
            _merge(resource, update)
            self._keep_secrets(key, kind, resource)
        if "PUT" not in kind.lro:
            self._finish_create(parsed, resource)
            status = kind.sync_created if existing is None else 200
            return status, {}, self._public(resource)
        props = resource.setdefault("properties", {})
        props["provisioningState"] = kind.creating_state if existing is None else "Updating"
        if existing is None:
            for prop, value in kind.creating:
                props[prop] = value
        op = self._start(
            parsed, "PUT-new" if existing is None else "PUT", version, resource.get("location", "")
        )
        status = kind.put_new if existing is None else kind.put_existing
        headers = {"Retry-After": str(self.retry_after)}
        if kind.location_only and existing is None:
            headers["Location"] = self._operation_url(op, "operationResults")
            return status, headers, None
        headers["Azure-AsyncOperation"] = self._operation_url(op, "operationStatuses")
        if status == 202:
            headers["Location"] = self._operation_url(op, "operationResults")
        return status, headers, self._public(resource)

    def _patch(
        self, parsed: _Path, kind: _Type, body: Json, version: str
    ) -> tuple[int, dict[str, str], Json | None]:
        key = parsed.resource_id().lower()
        resource = self._resources.get(key)
        if resource is None:
            raise ArmError(
                404, "ResourceNotFound", f"The Resource '{parsed.pairs[-1][1]}' was not found."
            )
        update = copy.deepcopy(body)
        update.pop("location", None)
        _merge(resource, update)
        self._keep_secrets(key, kind, resource)
        if "PATCH" not in kind.lro:
            return 200, {}, self._public(resource)
        resource.setdefault("properties", {})["provisioningState"] = "Updating"
        op = self._start(parsed, "PATCH", version, resource.get("location", ""))
        return (
            202,
            {
                "Retry-After": str(self.retry_after),
                "Azure-AsyncOperation": self._operation_url(op, "operationStatuses"),
                "Location": self._operation_url(op, "operationResults"),
            },
            None,
        )

    def _delete(
        self, parsed: _Path, kind: _Type, version: str
    ) -> tuple[int, dict[str, str], Json | None]:
        key = parsed.resource_id().lower()
        resource = self._resources.get(key)
        if resource is None:
            return 204, {}, None
        if "DELETE" not in kind.lro:
            self._drop(key)
            return 200, {}, None
        resource.setdefault("properties", {})["provisioningState"] = "Deleting"
        op = self._start(parsed, "DELETE", version, resource.get("location", ""))
        return (
            202,
            {
                "Retry-After": str(self.retry_after),
                "Location": self._operation_url(op, "operationResults"),
            },
            None,
        )


def _tag_filter(flt: str) -> dict[str, str]:
    """What a generic list's ``$filter`` asks for: tagName, tagValue, resourceType."""
    wanted: dict[str, str] = {}
    for field_name in ("tagName", "tagValue", "resourceType"):
        match = re.search(rf"{field_name}\s+eq\s+'((?:[^']|'')*)'", flt, re.IGNORECASE)
        if match:
            wanted[field_name] = match.group(1).replace("''", "'")
    return wanted


def _matches(resource: Json, wanted: dict[str, str]) -> bool:
    if "resourceType" in wanted and resource["type"].lower() != wanted["resourceType"].lower():
        return False
    if "tagName" in wanted:
        tags = {k.lower(): v for k, v in (resource.get("tags") or {}).items()}
        value = tags.get(wanted["tagName"].lower())
        if value is None:
            return False
        if "tagValue" in wanted and value != wanted["tagValue"]:
            return False
    return True


# --- the HTTP server -------------------------------------------------------------


class _Handler(JsonHandler):
    server: _Server
    # Headers and body go out in two writes: without this, Nagle's algorithm and
    # the client's delayed ACK hold every answer back ~40 ms.
    disable_nagle_algorithm = True

    def _serve(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, extra, payload = self.server.arm.handle(
            self.command, self.path, headers, self.read_body()
        )
        self.send_json(status, payload, {"x-ms-request-id": str(uuid.uuid4()), **extra})

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST = _serve  # noqa: N815


class _Server(ThreadingHTTPServer):
    arm: ArmEmulator


class RunningArmEmulator(ArmEmulator):
    """An :class:`ArmEmulator` serving on loopback: ``url``, ``ca_file``, ``stop()``."""

    _server: _Server | None = None

    def serve(self, *, port: int = 0, tls: bool = True, directory: Path | None = None) -> None:
        server = _Server(("127.0.0.1", port), _Handler)
        server.arm = self
        scheme = "http"
        if tls:
            # Imported here: cryptography loads only when the stand-in serves HTTPS.
            from kidp.localtls import issue_tls_files, server_context

            where = directory or Path(tempfile.mkdtemp(prefix="kidp-arm-"))
            files = issue_tls_files(
                where, authority="kidp ARM emulator CA", valid_for=dt.timedelta(days=30)
            )
            server.socket = server_context(files).wrap_socket(server.socket, server_side=True)
            self.ca_file = files.ca
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
        self._server = server
        serve_in_thread(server, "arm-emulator")

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            stop_serving(self._server)
            self._server = None


def start_arm_emulator(
    *,
    port: int = 0,
    tls: bool = True,
    directory: Path | None = None,
    subscription_id: str = DEFAULT_SUBSCRIPTION,
    resource_groups: tuple[str, ...] = ("kidp",),
    location: str = DEFAULT_LOCATION,
    polls: int = 2,
    delay: float | None = None,
    retry_after: int = 0,
    token: str | None = DEFAULT_TOKEN,
) -> RunningArmEmulator:
    """Start the stand-in on 127.0.0.1 (a free port unless ``port``); HTTPS with
    a CA written to ``directory`` (a temporary one by default) unless ``tls`` is off."""
    arm = RunningArmEmulator(
        subscription_id=subscription_id,
        resource_groups=resource_groups,
        location=location,
        polls=polls,
        delay=delay,
        retry_after=retry_after,
        token=token,
    )
    arm.serve(port=port, tls=tls, directory=directory)
    return arm


#: What the emulated broker finds already there (made by the platform's IaC in Azure).
EMULATED_GROUP = "kidp"
EMULATED_SERVICEBUS_NAMESPACE = "kidp-events"
EMULATED_CONTAINERAPPS_ENVIRONMENT = "kidp-apps"


def seed_platform(arm: ArmEmulator, group: str = EMULATED_GROUP) -> dict[str, str]:
    """Create what an Azure broker expects to exist (its resource group, a Service
    Bus namespace, a Container Apps environment); returns their settings."""
    arm.create_resource_group(group)
    arm.seed(
        arm.resource_id(group, "Microsoft.ServiceBus", "namespaces", EMULATED_SERVICEBUS_NAMESPACE),
        {"location": arm.location, "sku": {"name": "Standard", "tier": "Standard"}},
    )
    arm.seed(
        arm.resource_id(
            group, "Microsoft.App", "managedEnvironments", EMULATED_CONTAINERAPPS_ENVIRONMENT
        ),
        {"location": arm.location, "properties": {}},
    )
    return {
        "azure_subscription_id": arm.subscription_id,
        "azure_resource_group": group,
        "azure_servicebus_namespace": EMULATED_SERVICEBUS_NAMESPACE,
        "azure_containerapps_environment": EMULATED_CONTAINERAPPS_ENVIRONMENT,
    }


def start_azure(state_dir: Path) -> EmulatedCloud:
    """:data:`kidp.emulator.EMULATORS` starter for Azure: this stand-in for the
    management plane over HTTPS (its CA in ``state_dir``), with the platform's
    resource group, Service Bus namespace and Container Apps environment in
    place; Azurite for the store's table and the jobs queue; the Key Vault
    stand-in for credentials, reached through a managed identity endpoint as
    in a function app. Operations finish after a few seconds, as the broker
    polls every few. Everything lives in memory and ends with ``stop``."""
    from kidp.azurite import start_azurite
    from kidp.emulator import EmulatedCloud
    from kidp.keyvault_emulator import start_keyvault

    started: list[Callable[[], None]] = []

    def stop() -> None:
        for each in reversed(started):
            with contextlib.suppress(Exception):
                each()

    try:
        arm = start_arm_emulator(directory=state_dir / "arm", delay=3.0, polls=1_000_000)
        started.append(arm.stop)
        azurite = start_azurite(log_file=state_dir / "azurite.log")
        started.append(azurite.stop)
        vault = start_keyvault()
        started.append(vault.stop)
        settings: dict[str, Any] = {
            **seed_platform(arm),
            "cloud": "azure",
            "region": arm.location,
            "azure_arm_endpoint": arm.url,
            "azure_arm_ca_file": str(arm.ca_file),
            "azure_credential": "emulator",
            **azurite.broker_settings(),
            "secret_store": "keyvault",
            "azure_key_vault_url": vault.vault_url,
        }
    except BaseException:
        stop()
        raise
    environ: dict[str, str | None] = dict(vault.environ())
    return EmulatedCloud(provider="azure", settings=settings, environ=environ, stop=stop)
