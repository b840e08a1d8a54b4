"""The AWS provider: RDS and Aurora, ElastiCache, MSK topics, S3 and ECS on Fargate.

Everything goes through the AWS SDK (botocore). The provider keeps no state of its own: a
resource is found again from a deterministic identifier (namespace and
resource name, plus a piece of the deployment id for globally named S3
buckets) and is only ever treated as ours when it carries this deployment's
``deployment-id`` tag. That single rule makes every operation idempotent:
``deploy`` adopts what it finds instead of creating a second resource, a
create that loses a race (or whose response was lost and retried) re-reads
the winner, and ``delete`` never touches a resource that belongs to someone
else.

Errors leave in the broker's two kinds: throttling, server faults and
connection problems are :class:`~kidp.errors.CloudUnavailable` (temporary,
with ``retry_after``); anything the cloud refuses on its merits is
:class:`~kidp.errors.ProvisioningFailed` (or ``QuotaExceeded`` for limit
errors). Messages carry the service, the operation and AWS's error code,
with any credential in play masked out, and never the request parameters.

One object serves one region; clients are created lazily, once, and shared
between threads (clients are thread-safe, sessions are not, hence the lock
around their creation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.parsers import ResponseParserError

from kidp import tags as tagging
from kidp.caching import Refreshing
from kidp.catalog import ENGINES
from kidp.errors import BrokerError, CloudUnavailable, ProvisioningFailed, QuotaExceeded
from kidp.models import (
    CloudResource,
    DeletionPolicy,
    Deployment,
    ManagedResource,
    ResourceType,
)
from kidp.ports import Credentials
from kidp.providers.aws.aurora import _AuroraCluster
from kidp.providers.aws.base import (
    _QUOTA_CODES,
    _RDS_ENGINES,
    _UNAVAILABLE_CODES,
    NOT_AN_API_ANSWER,
    PROVIDER_NAME,
    _AlreadyExists,
    _Found,
    _Kind,
    _tag_dict,
)
from kidp.providers.aws.clients import new_client
from kidp.providers.aws.ecs import _EcsService
from kidp.providers.aws.elasticache import _MemcachedCluster, _RedisGroup
from kidp.providers.aws.errors import SERVER_CODES as _SERVER_CODES
from kidp.providers.aws.errors import THROTTLING_CODES
from kidp.providers.aws.errors import Refused as _Refused
from kidp.providers.aws.errors import error_code as _error_code
from kidp.providers.aws.errors import http_status as _http_status
from kidp.providers.aws.errors import redact as _redact
from kidp.providers.aws.msk import _MskTopic
from kidp.providers.aws.rds import _RdsInstance
from kidp.providers.aws.s3 import _S3Bucket
from kidp.providers.ownership import deployment_tags
from kidp.providers.plumbing import (
    ClientCache,
    ProviderPlumbing,
    find_or_create,
    foreign_resource,
    missing_resource,
    nothing_to_rotate,
)

if TYPE_CHECKING:
    from boto3.session import Session

logger = logging.getLogger(__name__)


class AwsProvider(ProviderPlumbing):
    """:class:`kidp.ports.CloudProvider` for AWS.

    ``clients`` injects clients by service name (tests); otherwise they are
    created from ``session`` (a boto3 session, for tests that hook its
    events) or a private botocore session, with ``endpoint_url`` and
    standard-mode retries. ``on_call(resource_type, operation)`` runs once per
    API call made, for the ``kidp_broker_cloud_api_calls_total`` counter.
    Topics are offered only when ``msk_cluster_arn`` names the MSK cluster to
    create them in; services run in the ECS cluster ``ecs_cluster`` on
    ``subnet_ids``. ``db_subnet_group``, ``cache_subnet_group``,
    ``security_group_ids`` and ``ecs_execution_role_arn`` place resources in
    a VPC other than the account's default. RDS quota usage is read at most
    every ``quota_ttl`` seconds, in the background once it is first known.

    Passwords (``password_policy``): RDS master passwords, and Redis AUTH tokens
    when in-transit encryption is on (ElastiCache only accepts AUTH over TLS).
    """

    name = PROVIDER_NAME
    tag_dialect = "aws"

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        session: Session | None = None,
        clients: Mapping[str, Any] | None = None,
        tag_prefix: str = tagging.DEFAULT_PREFIX,
        managed_by: str = tagging.MANAGED_BY_VALUE,
        msk_cluster_arn: str | None = None,
        ecs_cluster: str = "kidp",
        subnet_ids: Sequence[str] = (),
        on_call: Callable[[str, str], None] | None = None,
        security_group_ids: Sequence[str] = (),
        db_subnet_group: str | None = None,
        cache_subnet_group: str | None = None,
        ecs_execution_role_arn: str | None = None,
        quota_ttl: float = 60.0,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.tag_prefix = tag_prefix
        self.managed_by = managed_by
        self.msk_cluster_arn = msk_cluster_arn
        self.ecs_cluster = ecs_cluster
        self.subnet_ids = tuple(subnet_ids)
        self.security_group_ids = tuple(security_group_ids)
        self.db_subnet_group = db_subnet_group
        self.cache_subnet_group = cache_subnet_group
        self.ecs_execution_role_arn = ecs_execution_role_arn
        # The factory serialises creation itself; the provider's lock also
        # keeps two threads from making the same service's client.
        self._make_client: Callable[..., Any] = (
            session.client if session is not None else new_client
        )
        self._clients = ClientCache(clients)
        self._on_call = on_call
        self._config = Config(
            region_name=region,
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=5,
            read_timeout=30,
            user_agent_extra="kidp-broker",
            # Emulators and private endpoints do not resolve <bucket>.<host>.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._kinds: dict[str, _Kind] = {
            kind.key: kind
            for kind in (
                _RdsInstance(self),
                _AuroraCluster(self),
                _RedisGroup(self),
                _MemcachedCluster(self),
                _S3Bucket(self),
                _EcsService(self),
                _MskTopic(self),
            )
        }
        rds = self._kinds["rds"]
        assert isinstance(rds, _RdsInstance)
        # Usage a minute old is fine for a pre-flight check: RDS itself refuses
        # the create that would go over, and that fails the deployment clearly.
        self.quota_ttl = quota_ttl
        self.rds_quotas: Refreshing[tuple[dict[str, tuple[int, int]], str]] | None = (
            Refreshing(
                rds.fetch_account_quotas,
                ttl=quota_ttl,
                max_age=15 * quota_ttl,
                name="RDS account quotas",
            )
            if quota_ttl > 0
            else None  # read at every check
        )

    def __repr__(self) -> str:
        return f"AwsProvider(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    # --- plumbing ------------------------------------------------------------

    def _client(self, service: str) -> Any:
        return self._clients.get(service, self._new_client)

    def _new_client(self, service: str) -> Any:
        return self._make_client(
            service,
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            config=self._config,
        )

    def call(
        self,
        service: str,
        resource_type: str,
        operation: str,
        /,
        *,
        expect: Collection[str] = (),
        secrets: Collection[str] = (),
        **params: Any,
    ) -> dict[str, Any]:
        """Make one API call and translate its failure into the broker's errors.

        ``expect`` lists error codes the caller handles itself (raised as
        ``_Refused``); ``secrets`` are masked out of any message, and when
        present the botocore exception is not chained (it may echo them).
        """
        self._count(resource_type, operation)
        client = self._client(service)
        try:
            response: dict[str, Any] = getattr(client, operation)(**params)
        except ClientError as exc:
            code = _error_code(exc)
            message = _redact(str(exc.response.get("Error", {}).get("Message", "")), secrets)
            if _http_status(exc) >= 500 and message.lstrip().startswith("<"):
                code, message = NOT_AN_API_ANSWER, "the endpoint answered with an HTML page"
            if code in expect:
                raise _Refused(code, message) from None
            error = self._map_client_error(exc, service, operation, code, message)
            if secrets:
                raise error from None
            raise error from exc
        except ResponseParserError:
            if NOT_AN_API_ANSWER in expect:
                raise _Refused(NOT_AN_API_ANSWER, "unparseable response") from None
            raise CloudUnavailable(
                f"AWS {service} answered {operation} with an unreadable response",
                retry_after=15.0,
                details={"service": service, "operation": operation},
            ) from None
        except ParamValidationError as exc:
            # botocore's text can quote a parameter's value: only show it when
            # no secret is in play.
            detail = "" if secrets else f": {exc}"
            raise ProvisioningFailed(
                f"AWS {service} {operation} was called with invalid parameters{detail}",
                details={"service": service, "operation": operation},
            ) from None
        except (BotoConnectionError, HTTPClientError) as exc:
            raise CloudUnavailable(
                f"cannot reach AWS {service} for {operation} ({type(exc).__name__})",
                retry_after=30.0,
                details={"service": service, "operation": operation},
            ) from None
        except NoCredentialsError:
            # Usually the instance/task credential endpoint hiccuping: worth a retry.
            raise CloudUnavailable(
                f"no AWS credentials available for {service} {operation}",
                retry_after=30.0,
                details={"service": service, "operation": operation},
            ) from None
        return response

    def optional_call(
        self, service: str, resource_type: str, operation: str, /, **params: Any
    ) -> dict[str, Any] | None:
        """Like :meth:`call`, but None when the endpoint does not implement the
        operation at all: real AWS always does, local emulators often don't (moto
        raises ``NotImplementedError`` in process and serves an HTML page as a
        server)."""
        try:
            return self.call(service, resource_type, operation, expect=_UNAVAILABLE_CODES, **params)
        except _Refused:
            return None
        except NotImplementedError:
            # moto, in process, raises this for operations it does not model.
            logger.info("%s %s is not available on this endpoint", service, operation)
            return None

    def _map_client_error(
        self, exc: ClientError, service: str, operation: str, code: str, message: str
    ) -> BrokerError:
        details = {"service": service, "operation": operation, "awsErrorCode": code}
        status = _http_status(exc)
        text = f"AWS {service} {operation} failed ({code}): {message}".rstrip(": ")
        if code in THROTTLING_CODES or status == 429:
            return CloudUnavailable(
                f"AWS {service} throttled {operation} ({code}); retry later",
                retry_after=5.0,
                details=details,
            )
        if code in _SERVER_CODES or status >= 500:
            return CloudUnavailable(text, retry_after=15.0, details=details)
        if code in _QUOTA_CODES:
            return QuotaExceeded(f"AWS {service} quota reached for {operation} ({code}): {message}")
        return ProvisioningFailed(text, details=details)

    @property
    def partition(self) -> str:
        """The ARN partition of this provider's region."""
        if self.region.startswith("cn-"):
            return "aws-cn"
        if self.region.startswith("us-gov-"):
            return "aws-us-gov"
        return "aws"

    def _kind(self, deployment: Deployment) -> _Kind:
        spec = deployment.spec
        rtype = deployment.resource_type
        key: str
        if rtype is ResourceType.DATABASE:
            if spec.engine not in _RDS_ENGINES:
                raise ProvisioningFailed(
                    f"database engine '{spec.engine}' is not offered on AWS; "
                    f"supported: {', '.join(sorted(_RDS_ENGINES))}"
                )
            key = "aurora" if spec.high_availability else "rds"
        elif rtype is ResourceType.CACHE:
            if spec.engine == "redis":
                key = "redis"
            elif spec.engine == "memcached":
                key = "memcached"
            else:
                raise ProvisioningFailed(
                    f"cache engine '{spec.engine}' is not offered on AWS; "
                    "supported: memcached, redis"
                )
        elif rtype is ResourceType.TOPIC:
            if not self.msk_cluster_arn:
                raise ProvisioningFailed(
                    "topics are not available: this broker has no MSK cluster configured "
                    "(msk_cluster_arn)"
                )
            key = "msk"
        elif rtype is ResourceType.BUCKET:
            key = "s3"
        else:
            key = "ecs"
        return self._kinds[key]

    def _encoded_tags(self, deployment: Deployment, tags: Mapping[str, str]) -> dict[str, str]:
        logical = deployment_tags(deployment, tags, managed_by=self.managed_by)
        return tagging.encode(logical, dialect="aws", prefix=self.tag_prefix)

    def _ensure_owner(self, kind: _Kind, found: _Found, deployment: Deployment) -> None:
        if not kind.taggable or self.owned_by(found, deployment):
            return
        raise foreign_resource(
            label=kind.label,
            name=found.name,
            holder=found.tags.get(self.tag_key(tagging.DEPLOYMENT_ID)),
            resource_id=found.arn,
        )

    # --- the CloudProvider port --------------------------------------------

    def supported(self) -> dict[ResourceType, dict[str, list[str]]]:
        """RDS/Aurora databases, ElastiCache caches, S3 buckets, ECS services, and
        MSK topics when an MSK cluster is configured; versions from the catalogue."""
        database = ENGINES[ResourceType.DATABASE]
        supported: dict[ResourceType, dict[str, list[str]]] = {
            ResourceType.DATABASE: {e: list(database[e]) for e in ("postgresql", "mysql")},
            ResourceType.CACHE: {e: list(v) for e, v in ENGINES[ResourceType.CACHE].items()},
            ResourceType.BUCKET: {"": []},
            ResourceType.SERVICE: {"": []},
        }
        if self.msk_cluster_arn:
            supported[ResourceType.TOPIC] = {
                e: list(v) for e, v in ENGINES[ResourceType.TOPIC].items()
            }
        return supported

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        """The calls ``deploy`` would make to create the resource; no API calls,
        no password (``secretParameters`` names where credentials would go)."""
        kind = self._kind(deployment)
        encoded = self.encode_tags(deployment, tags)
        return {
            "provider": self.name,
            "region": self.region,
            "resourceType": deployment.resource_type.value,
            "identifier": kind.name(deployment),
            "calls": [call.describe() for call in kind.plan(deployment, encoded)],
            "notes": kind.notes(deployment),
        }

    def deploy(
        self,
        deployment: Deployment,
        tags: dict[str, str],
        credentials: Credentials | None,
    ) -> CloudResource:
        """Create the resource, or adopt the one already tagged with this deployment."""
        kind = self._kind(deployment)
        encoded = self.encode_tags(deployment, tags)
        kind.check_credentials(deployment, credentials)
        found, adopted = find_or_create(
            label=kind.label,
            name=kind.name(deployment),
            deployment_id=deployment.id,
            find=lambda: kind.find(deployment),
            create=lambda: kind.create(deployment, encoded, credentials),
            lost_race=_AlreadyExists,
        )
        if adopted:
            # What we just created is ours even before its tags are readable
            # (S3 applies tags in a second call on endpoints without creation tags).
            self._ensure_owner(kind, found, deployment)
        if kind.converge(deployment, found, encoded, credentials):
            found = kind.find(deployment) or found
        return kind.status(deployment, found)

    def get_status(self, deployment: Deployment) -> CloudResource:
        """The resource as AWS sees it now; ``missing`` when nothing of this
        deployment's carries its id."""
        kind = self._kind(deployment)
        found = kind.find(deployment)
        if found is None or (kind.taggable and not self.owned_by(found, deployment)):
            return missing_resource(deployment, label=kind.label, name=kind.name(deployment))
        return kind.status(deployment, found)

    def delete(self, deployment: Deployment) -> bool:
        """Start or continue deleting; True once nothing is left. Retain re-tags
        the resource as retained and leaves it; Snapshot takes a final snapshot
        named after the deployment where the service has snapshots."""
        kind = self._kind(deployment)
        found = kind.find(deployment)
        if found is None:
            kind.after_gone(deployment)
            return True
        if kind.taggable and not self.owned_by(found, deployment):
            # Somebody else's resource under our name: never ours to remove.
            return True
        if deployment.deletion_policy is DeletionPolicy.RETAIN:
            kind.retain(deployment, found)
            logger.info("retained %s %s of %s", kind.label, found.name, deployment.id)
            return True
        done = kind.delete(deployment, found)
        if done:
            kind.after_gone(deployment)
        return done

    def rotate_credentials(self, deployment: Deployment, credentials: Credentials) -> None:
        """Set a new master password (RDS/Aurora) or AUTH token (Redis), applied now."""
        kind = self._kind(deployment)
        kind.check_credentials(deployment, credentials)
        found = kind.find(deployment)
        if found is None or (kind.taggable and not self.owned_by(found, deployment)):
            raise nothing_to_rotate(label=kind.label, name=kind.name(deployment))
        kind.rotate(deployment, found, credentials)

    def list_managed(self) -> Sequence[ManagedResource]:
        """Resources tagged managed-by=<this broker> (one per deployment and type:
        an Aurora cluster rather than its instances), plus ``kidp-`` resources with
        no managed-by tag at all (``tagged=False``). Retained resources carry
        ``<managed_by>-retained`` and are in neither list. MSK topics cannot carry
        tags, so they are not listed."""
        managed_key = self.tag_key(tagging.MANAGED_BY)
        deployment_key = self.tag_key(tagging.DEPLOYMENT_ID)
        keyed: set[str] = set()
        best: dict[tuple[str, ResourceType], tuple[int, ManagedResource]] = {}
        loose: list[ManagedResource] = []
        for arn, cloud_tags in self._tagged_resources(managed_key):
            keyed.add(arn)
            classified = _classify_arn(arn)
            if classified is None or cloud_tags.get(managed_key) != self.managed_by:
                continue
            rtype, name, rank = classified
            resource = ManagedResource(
                cloud_resource_id=arn, resource_type=rtype, name=name, tags=cloud_tags
            )
            deployment_id = cloud_tags.get(deployment_key)
            if deployment_id is None:
                loose.append(resource)
                continue
            current = best.get((deployment_id, rtype))
            if current is None or rank > current[0]:
                best[(deployment_id, rtype)] = (rank, resource)
        found = [resource for _, resource in best.values()] + loose
        seen: set[str] = set()
        for kind in self._kinds.values():
            for arn, name, rtype in kind.untagged_candidates():
                if arn in keyed or arn in seen:
                    continue
                seen.add(arn)
                found.append(
                    ManagedResource(
                        cloud_resource_id=arn, resource_type=rtype, name=name, tags={}, tagged=False
                    )
                )
        return found

    def _tagged_resources(self, key: str) -> Iterator[tuple[str, dict[str, str]]]:
        token = ""
        while True:
            params: dict[str, Any] = {"TagFilters": [{"Key": key}], "ResourcesPerPage": 100}
            if token:
                params["PaginationToken"] = token
            page = self.call("resourcegroupstaggingapi", "any", "get_resources", **params)
            for mapping in page.get("ResourceTagMappingList", []):
                yield mapping["ResourceARN"], _tag_dict(mapping.get("Tags"))
            token = page.get("PaginationToken") or ""
            if not token:
                return

    def check(self) -> None:
        """Raise ``CloudUnavailable`` unless STS answers ``GetCallerIdentity``."""
        try:
            self.call("sts", "account", "get_caller_identity")
        except CloudUnavailable:
            raise
        except BrokerError as exc:
            raise CloudUnavailable(
                f"AWS credentials were rejected: {exc.message}", retry_after=60.0
            ) from None


def _classify_arn(arn: str) -> tuple[ResourceType, str, int] | None:
    """(resource type, name, rank) for the ARNs this provider creates; the
    higher rank is the deployment's primary resource (cluster over instance)."""
    parts = arn.split(":", 5)
    if len(parts) != 6:
        return None
    service, resource = parts[2], parts[5]
    kind, _, name = resource.partition(":")
    if service == "rds":
        return {
            "db": (ResourceType.DATABASE, name, 1),
            "cluster": (ResourceType.DATABASE, name, 2),
        }.get(kind)
    if service == "elasticache":
        ranks = {"cluster": 1, "replicationgroup": 2}
        return (ResourceType.CACHE, name, ranks[kind]) if kind in ranks else None
    if service == "s3" and resource and "/" not in resource:
        return ResourceType.BUCKET, resource, 1
    if service == "ecs" and resource.startswith("service/"):
        return ResourceType.SERVICE, resource.rsplit("/", 1)[-1], 1
    return None


# --- one class per kind of AWS resource ---------------------------------------
