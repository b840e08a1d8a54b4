"""The GCP provider: Cloud SQL, Memorystore for Redis, Pub/Sub topics, Cloud
Storage buckets and Cloud Run services.

Every call goes through Google's client libraries: the SQL Admin and Service
Usage APIs through ``googleapiclient``'s discovery clients (built from the
discovery documents the library ships, so nothing is fetched at run time),
Memorystore and Cloud Run through their GAPIC clients over REST, Cloud
Storage through ``google-cloud-storage`` and Pub/Sub through its publisher
client. The provider keeps no state: a resource is found again by its
deterministic name and is only ever treated as ours when its labels carry
this deployment's id. ``deploy`` adopts what it finds instead of creating a
second resource, a create that loses a race (or whose answer was lost and
retried) re-reads the winner, and ``delete`` never touches a resource that
belongs to someone else. Long-running operations are started and never
waited on: the worker's next poll reads the resource (and its operation)
again.

Errors leave as the broker's: throttling, server faults, no answer and no
token are :class:`~kidp.errors.CloudUnavailable` (temporary, with
``retry_after``) once the provider's own retries (``retry_seconds``) are
spent; a full allocation quota is :class:`~kidp.errors.QuotaExceeded`;
anything refused on its merits is :class:`~kidp.errors.ProvisioningFailed`.
Messages name the API, the operation, the HTTP status and Google's reason,
and never a password or a request body (Google's own message is added only
to calls that carried no secret).

Credentials are Application Default Credentials, fetched on first use, unless
``credentials`` is given (tests hand in ``AnonymousCredentials``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from kidp import tags as tagging
from kidp.catalog import ENGINES, PROVIDER_ENGINES
from kidp.errors import (
    BrokerError,
    CloudUnavailable,
    ProvisioningFailed,
    QuotaExceeded,
    ValidationFailed,
)
from kidp.models import CloudResource, DeletionPolicy, Deployment, ManagedResource, ResourceType
from kidp.ports import Credentials
from kidp.providers.gcp import errors as gerrors
from kidp.providers.gcp.base import (
    DEFAULT_ENDPOINTS,
    NAME_PREFIX,
    PROVIDER_NAME,
    QuotaRule,
    _AlreadyExists,
    _Found,
    _Kind,
    _Refused,
)
from kidp.providers.gcp.cloudrun import _RunService
from kidp.providers.gcp.cloudsql import _CloudSqlInstance
from kidp.providers.gcp.memorystore import _RedisInstance
from kidp.providers.gcp.pubsub import _PubSubTopic
from kidp.providers.gcp.storage import _Bucket
from kidp.providers.plumbing import (
    ClientCache,
    ProviderPlumbing,
    find_or_create,
    foreign_resource,
    missing_resource,
    nothing_to_rotate,
)

logger = logging.getLogger(__name__)

_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
#: The label Google's services put on what they create and manage themselves
#: (``cloudfunctions`` on a Cloud Function's Cloud Run service).
GOOGLE_MANAGED_BY = "goog-managed-by"
_SERVICE_NAMES = {
    "sqladmin": "Cloud SQL Admin",
    "redis": "Memorystore for Redis",
    "storage": "Cloud Storage",
    "run": "Cloud Run",
    "pubsub": "Pub/Sub",
    "serviceusage": "Service Usage",
}


class GcpProvider(ProviderPlumbing):
    """:class:`kidp.ports.CloudProvider` for Google Cloud.

    ``project`` and ``region`` place every resource (the project defaults to
    the one Application Default Credentials name). ``api_endpoint`` is one
    base URL for every admin API (the stand-in); ``endpoints`` overrides it
    per API (``sqladmin``, ``redis``, ``storage``, ``run``, ``serviceusage``,
    ``pubsub``). ``clients`` injects ready clients by the same names.
    ``network`` (``projects/<p>/global/networks/<vpc>``) gives Cloud SQL a
    private IP on that VPC and Memorystore private service access;
    ``kms_key`` is the customer-managed key for Cloud SQL, Memorystore and
    buckets; ``run_service_account`` runs Cloud Run services. ``topics=False``
    leaves Pub/Sub out (where no Pub/Sub endpoint is reachable, as in an
    emulated cloud without the Pub/Sub emulator). ``timeout`` is
    each request's, ``retry_seconds`` how long throttled or failed requests
    are retried before the error is returned. ``on_call(resource_type,
    operation)`` runs once per API call.

    Passwords (``password_policy``): Cloud SQL's built-in administrator only.
    """

    name = PROVIDER_NAME
    tag_dialect = "gcp"

    def __init__(
        self,
        *,
        region: str,
        project: str | None = None,
        credentials: Any = None,
        api_endpoint: str | None = None,
        endpoints: Mapping[str, str] | None = None,
        clients: Mapping[str, Any] | None = None,
        tag_prefix: str = tagging.DEFAULT_PREFIX,
        managed_by: str = tagging.MANAGED_BY_VALUE,
        network: str | None = None,
        kms_key: str | None = None,
        run_service_account: str | None = None,
        topics: bool = True,
        on_call: Callable[[str, str], None] | None = None,
        timeout: float = 30.0,
        retry_seconds: float = 20.0,
    ) -> None:
        self.region = region
        self._project = project
        self._credentials = credentials
        self.api_endpoint = api_endpoint.rstrip("/") if api_endpoint else None
        self._endpoints = {k: v.rstrip("/") for k, v in (endpoints or {}).items()}
        self.tag_prefix = tag_prefix
        self.managed_by = managed_by
        self.network = network
        self.kms_key = kms_key
        self.run_service_account = run_service_account
        self.topics = topics
        self._on_call = on_call
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        # Re-entrant: making a client loads the credentials, under the same lock.
        self._lock = threading.RLock()
        self._clients = ClientCache(clients, lock=self._lock)
        self._local = threading.local()
        self._kinds: dict[str, _Kind] = {
            kind.key: kind
            for kind in (
                _CloudSqlInstance(self),
                _RedisInstance(self),
                _PubSubTopic(self),
                _Bucket(self),
                _RunService(self),
            )
        }

    def __repr__(self) -> str:
        return (
            f"GcpProvider(project={self._project!r}, region={self.region!r}, "
            f"api_endpoint={self.api_endpoint!r})"
        )

    # --- credentials, endpoints and clients -----------------------------------

    def _adc(self) -> None:
        """Load Application Default Credentials (and their project) once."""
        with self._lock:
            if self._credentials is not None:
                return
            import google.auth
            from google.auth import exceptions as auth_exceptions

            try:
                credentials, project = google.auth.default(scopes=list(_SCOPES))
            except auth_exceptions.GoogleAuthError as exc:
                raise CloudUnavailable(
                    f"no Google credentials available ({type(exc).__name__}); set up "
                    "Application Default Credentials",
                    retry_after=60.0,
                ) from None
            self._credentials = credentials
            self._project = self._project or project

    @property
    def credentials(self) -> Any:
        """The credentials every client uses (Application Default Credentials unless given)."""
        self._adc()
        return self._credentials

    @property
    def project(self) -> str:
        """The project every resource lives in."""
        if not self._project:
            self._adc()
        if not self._project:
            raise ValidationFailed(
                "no GCP project configured: set KIDP_GCP_PROJECT (or a project in "
                "Application Default Credentials)"
            )
        return self._project

    def endpoint(self, api: str) -> str:
        """The base URL requests to ``api`` go to (Google's unless configured)."""
        return self._configured_endpoint(api) or DEFAULT_ENDPOINTS[api]

    def _configured_endpoint(self, api: str) -> str | None:
        if api == "pubsub":
            # Pub/Sub speaks gRPC, not the admin APIs' REST: the shared
            # api_endpoint (the stand-in) does not serve it. Its emulator is
            # found through PUBSUB_EMULATOR_HOST.
            return self._endpoints.get(api)
        return self._endpoints.get(api) or self.api_endpoint

    @property
    def call_options(self) -> dict[str, Any]:
        """Keyword arguments for every client call: no retries of the client's own
        (the provider retries every API the same way) and the request timeout."""
        return {"retry": None, "timeout": self.timeout}

    def client(self, api: str) -> Any:
        """The client for ``api``, created on first use and shared between threads."""
        return self._clients.get(api, self._new_client)

    def _new_client(self, api: str) -> Any:
        endpoint = self._configured_endpoint(api)
        if api in ("sqladmin", "serviceusage"):
            from googleapiclient.discovery import build

            version = "v1" if api == "sqladmin" else "v1beta1"
            return build(
                api,
                version,
                http=self._http(),
                client_options={"api_endpoint": f"{endpoint}/"} if endpoint else None,
                static_discovery=True,
                cache_discovery=False,
            )
        options = {"api_endpoint": endpoint} if endpoint else None
        if api == "redis":
            from google.cloud import redis_v1

            return redis_v1.CloudRedisClient(
                credentials=self.credentials, transport="rest", client_options=options
            )
        if api == "run":
            from google.cloud import run_v2

            return run_v2.ServicesClient(
                credentials=self.credentials, transport="rest", client_options=options
            )
        if api == "storage":
            import google.cloud.storage

            return google.cloud.storage.Client(
                project=self.project, credentials=self.credentials, client_options=options
            )
        if api == "pubsub":
            import google.cloud.pubsub_v1

            # With PUBSUB_EMULATOR_HOST set the client talks to the emulator itself.
            return google.cloud.pubsub_v1.PublisherClient(
                credentials=self.credentials, client_options=options
            )
        raise ValueError(f"unknown API {api!r}")

    def _http(self) -> Any:
        """An authorized httplib2 connection of this thread's own: httplib2 is not
        thread-safe, so discovery requests never share one between threads."""
        http = getattr(self._local, "http", None)
        if http is None:
            import google_auth_httplib2
            import httplib2

            http = google_auth_httplib2.AuthorizedHttp(
                self.credentials, http=httplib2.Http(timeout=self.timeout)
            )
            self._local.http = http
        return http

    def execute(self, request: Any) -> Any:
        """Send a discovery client's request on this thread's connection."""
        return request.execute(http=self._http())

    # --- calls -------------------------------------------------------------------

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        if self.retry_seconds <= 0:
            return fn()
        from google.api_core.retry import Retry

        retry = Retry(
            predicate=_worth_retrying,
            initial=0.2,
            maximum=2.0,
            multiplier=2.0,
            timeout=self.retry_seconds,
        )
        return retry(fn)()

    def call(
        self,
        api: str,
        resource_type: str,
        operation: str,
        fn: Callable[[], Any],
        /,
        *,
        expect: Collection[int] = (),
        secrets: Collection[str] = (),
    ) -> Any:
        """Make one API call (``fn``) and translate its failure into the broker's errors.

        ``expect`` lists HTTP statuses the caller handles itself (raised as
        ``_Refused``). With ``secrets`` in play Google's message is left out
        and the SDK's exception is not chained (either can quote the request).
        """
        self._count(resource_type, operation)
        try:
            return self._retrying(fn)
        except BrokerError:
            raise
        except Exception as exc:
            cause = _cause(exc)
            status = gerrors.http_status(cause)
            if status in expect:
                raise _Refused(status, gerrors.reason(cause)) from None
            if not _is_google_error(cause):
                raise
            error = self._map_error(cause, api, operation, bool(secrets))
            if secrets:
                raise error from None
            raise error from exc

    def _map_error(
        self, cause: BaseException, api: str, operation: str, secret: bool
    ) -> BrokerError:
        from google.auth import exceptions as auth_exceptions

        service = _SERVICE_NAMES.get(api, api)
        text = gerrors.describe(cause, service=service, operation=operation)
        status = gerrors.http_status(cause)
        details = {"api": api, "operation": operation, "httpStatus": status}
        details["reason"] = gerrors.reason(cause)
        if isinstance(cause, auth_exceptions.GoogleAuthError):
            return CloudUnavailable(
                f"{service} {operation}: no Google access token ({type(cause).__name__})",
                retry_after=30.0,
                details=details,
            )
        if status == 0 and gerrors.is_temporary(cause):
            return CloudUnavailable(text, retry_after=30.0, details=details)
        if status == 429:
            return CloudUnavailable(
                f"{text}; throttled, retry later", retry_after=5.0, details=details
            )
        if status >= 500 or status == 408:
            return CloudUnavailable(text, retry_after=15.0, details=details)
        if gerrors.is_quota(cause):
            return QuotaExceeded(f"{text}: a project quota is full", details=details)
        google_says = "" if secret else gerrors.message(cause)[:300]
        return ProvisioningFailed(f"{text}: {google_says}".rstrip(": "), details=details)

    def label_key(self, name: str) -> str:
        """The GCP label key for the logical tag ``name`` (labels are GCP's tags)."""
        return self.tag_key(name)

    def cloud_tags(self, found: Any) -> Mapping[str, str]:
        """A found resource's labels."""
        labels: Mapping[str, str] = found.labels
        return labels

    def quota_limit(self, rule: QuotaRule) -> tuple[int, str]:
        """The project's effective limit for ``rule`` (per region where it is
        regional) from Service Usage, or Google's documented default when the
        project lists no such metric."""
        usage = self.client("serviceusage")
        parent = f"projects/{self.project}/services/{rule.service}"
        try:
            page = self.call(
                "serviceusage",
                "quota",
                "consumerQuotaMetrics.list",
                lambda: self.execute(
                    usage.services().consumerQuotaMetrics().list(parent=parent, view="BASIC")
                ),
                expect=(403, 404),
            )
        except _Refused:
            # Service Usage not enabled, or not readable with these credentials.
            return rule.default_limit, "documented default (Service Usage not readable)"
        for metric in page.get("metrics") or []:
            if metric.get("metric") != rule.metric:
                continue
            buckets = [
                b
                for limit in metric.get("consumerQuotaLimits") or []
                for b in limit.get("quotaBuckets") or []
            ]
            regional = [
                b for b in buckets if (b.get("dimensions") or {}).get("region") == self.region
            ]
            default = [b for b in buckets if not b.get("dimensions")]
            for bucket in (regional if rule.per_region else []) + default:
                limit = int(bucket.get("effectiveLimit", rule.default_limit))
                # -1 is "unlimited".
                return (limit if limit >= 0 else 2**62), "serviceusage"
        return rule.default_limit, "documented default"

    def _kind(self, deployment: Deployment) -> _Kind:
        spec = deployment.spec
        rtype = deployment.resource_type
        offered = self.supported().get(rtype)
        if offered is None or (spec.engine is not None and spec.engine not in offered):
            can = ", ".join(sorted(e for e in (offered or {}) if e)) or "none"
            raise ProvisioningFailed(
                f"{rtype.value} engine '{spec.engine}' is not offered on GCP; supported: {can}"
            )
        encrypted_types = (ResourceType.DATABASE, ResourceType.CACHE, ResourceType.BUCKET)
        if rtype in encrypted_types and spec.encryption is not None and not spec.encryption.at_rest:
            raise ProvisioningFailed(
                "Google Cloud encrypts every database, cache and bucket at rest; "
                "encryption.atRest=false cannot be honoured"
            )
        key = {
            ResourceType.DATABASE: "cloudsql",
            ResourceType.CACHE: "memorystore",
            ResourceType.TOPIC: "pubsub",
            ResourceType.BUCKET: "storage",
            ResourceType.SERVICE: "cloudrun",
        }[rtype]
        return self._kinds[key]

    def _ensure_owner(self, kind: _Kind, found: _Found, deployment: Deployment) -> None:
        if self.owned_by(found, deployment):
            return
        raise foreign_resource(
            label=kind.label,
            name=found.name,
            holder=found.labels.get(self.label_key(tagging.DEPLOYMENT_ID)),
            resource_id=found.resource_id,
            marker="label",
        )

    def _missing(self, kind: _Kind, deployment: Deployment) -> CloudResource:
        reason = kind.failed_create(deployment)
        if reason is not None:
            return CloudResource(
                cloud_resource_id=deployment.cloud_resource_id or kind.name(deployment),
                state="failed",
                message=reason,
            )
        return missing_resource(deployment, label=kind.label, name=kind.name(deployment))

    # --- the CloudProvider port -----------------------------------------------

    def supported(self) -> dict[ResourceType, dict[str, list[str]]]:
        """Cloud SQL (PostgreSQL, MySQL), Memorystore Redis, Pub/Sub topics,
        Cloud Storage buckets and Cloud Run services; versions from the catalogue.
        Topics only while ``topics`` is on."""
        database = ENGINES[ResourceType.DATABASE]
        supported: dict[ResourceType, dict[str, list[str]]] = {
            ResourceType.DATABASE: {e: list(database[e]) for e in ("postgresql", "mysql")},
            ResourceType.CACHE: {"redis": list(ENGINES[ResourceType.CACHE]["redis"])},
            ResourceType.BUCKET: {"": []},
            ResourceType.SERVICE: {"": []},
        }
        if self.topics:
            supported[ResourceType.TOPIC] = {
                "pubsub": list(PROVIDER_ENGINES[PROVIDER_NAME][ResourceType.TOPIC]["pubsub"])
            }
        return supported

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        """The requests ``deploy`` would send (method, URL, body); no API call,
        no password (``secretFields`` names where it would go)."""
        kind = self._kind(deployment)
        labels = self.encode_tags(deployment, tags)
        return {
            "provider": self.name,
            "project": self._project,
            "region": self.region,
            "resourceType": deployment.resource_type.value,
            "identifier": kind.name(deployment),
            "requests": [request.describe() for request in kind.plan(deployment, labels)],
            "notes": kind.notes(deployment),
        }

    def deploy(
        self,
        deployment: Deployment,
        tags: dict[str, str],
        credentials: Credentials | None,
    ) -> CloudResource:
        """Start creating the resource, or adopt the one already labelled with
        this deployment; never waits for the operation."""
        kind = self._kind(deployment)
        labels = self.encode_tags(deployment, tags)
        kind.check_credentials(deployment, credentials)
        found, _ = find_or_create(
            label=kind.label,
            name=kind.name(deployment),
            deployment_id=deployment.id,
            find=lambda: kind.find(deployment),
            create=lambda: kind.create(deployment, labels, credentials),
            lost_race=_AlreadyExists,
            started="creating",
            failed=lambda: kind.failed_create(deployment),
        )
        # Labels are set with the create, so even what was just made is checked.
        self._ensure_owner(kind, found, deployment)
        return kind.status(deployment, found)

    def get_status(self, deployment: Deployment) -> CloudResource:
        """The resource as Google reports it now; ``failed`` with Google's reason
        when its operation failed; ``missing`` when nothing of this deployment's
        carries its id."""
        kind = self._kind(deployment)
        found = kind.find(deployment)
        if found is None or not self.owned_by(found, deployment):
            return self._missing(kind, deployment)
        return kind.status(deployment, found)

    def delete(self, deployment: Deployment) -> bool:
        """Start or continue deleting; True once nothing is left. Retain re-labels
        the resource as retained and leaves it; Snapshot keeps a final backup
        where the API has one (Cloud SQL) and otherwise retains the resource."""
        kind = self._kind(deployment)
        found = kind.find(deployment)
        if found is None or not self.owned_by(found, deployment):
            # Gone, or somebody else's resource under our name: never ours to remove.
            return True
        policy = deployment.deletion_policy
        if policy is DeletionPolicy.RETAIN or (
            policy is DeletionPolicy.SNAPSHOT and not kind.has_final_backup
        ):
            kind.retain(deployment, found)
            logger.info("retained %s %s of %s", kind.label, found.name, deployment.id)
            return True
        return kind.delete(deployment, found)

    def rotate_credentials(self, deployment: Deployment, credentials: Credentials) -> None:
        """Set a new password on Cloud SQL's administrator (``users.update``)."""
        kind = self._kind(deployment)
        kind.check_credentials(deployment, credentials)
        found = kind.find(deployment)
        if found is None or not self.owned_by(found, deployment):
            raise nothing_to_rotate(label=kind.label, name=kind.name(deployment))
        kind.rotate(deployment, found, credentials)

    def list_managed(self) -> Sequence[ManagedResource]:
        """Resources labelled managed-by=<this broker>, plus ``kidp-`` resources
        with no manager's label at all (``tagged=False``). A resource whose
        managed-by label holds another value is someone else's and in neither
        list: a retained one (``<managed_by>-retained``), the broker's own
        infrastructure (``infra/gcp`` labels it ``<managed_by>-broker-infra``),
        another broker's. So is one a Google service manages (``goog-managed-by``:
        the Cloud Run service behind each of the broker's Cloud Functions)."""
        managed_key = self.label_key(tagging.MANAGED_BY)
        managed_value = tagging.encode_value(self.managed_by, dialect="gcp")
        found: list[ManagedResource] = []
        for kind in self._kinds.values():
            if kind.resource_type not in self.supported():
                continue
            for resource_id, name, labels in kind.list_all():
                logical = tagging.decode(labels, dialect="gcp", prefix=self.tag_prefix)
                if labels.get(managed_key) == managed_value:
                    found.append(
                        ManagedResource(
                            cloud_resource_id=resource_id,
                            resource_type=kind.resource_type,
                            name=name,
                            tags=labels,
                        )
                    )
                elif (
                    tagging.MANAGED_BY not in logical
                    and GOOGLE_MANAGED_BY not in labels
                    and name.startswith(NAME_PREFIX)
                ):
                    found.append(
                        ManagedResource(
                            cloud_resource_id=resource_id,
                            resource_type=kind.resource_type,
                            name=name,
                            tags=labels,
                            tagged=False,
                        )
                    )
        return found

    def check(self) -> None:
        """Raise ``CloudUnavailable`` unless the SQL Admin API answers for the project."""
        sql = self.client("sqladmin")
        try:
            self.call(
                "sqladmin",
                "account",
                "instances.list",
                lambda: self.execute(sql.instances().list(project=self.project, maxResults=1)),
            )
        except CloudUnavailable:
            raise
        except BrokerError as exc:
            raise CloudUnavailable(
                f"Google Cloud refused the broker's credentials: {exc.message}", retry_after=60.0
            ) from None


def _cause(exc: BaseException) -> BaseException:
    """The error behind api_core's ``RetryError`` (the last attempt's)."""
    from google.api_core import exceptions as api_exceptions

    if isinstance(exc, api_exceptions.RetryError) and exc.cause is not None:
        cause: BaseException = exc.cause
        return cause
    return exc


def _is_google_error(exc: BaseException) -> bool:
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions

    return (
        isinstance(exc, api_exceptions.GoogleAPICallError | auth_exceptions.GoogleAuthError)
        or gerrors.http_status(exc) > 0
        or gerrors.is_temporary(exc)
    )


def _worth_retrying(exc: BaseException) -> bool:
    """Throttling, server faults and lost connections; a refused token is not
    retried here (the next job will try again)."""
    from google.auth import exceptions as auth_exceptions

    if isinstance(exc, auth_exceptions.GoogleAuthError):
        return False
    return gerrors.is_temporary(exc)
