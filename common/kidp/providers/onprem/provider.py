"""The on-prem provider: databases, caches, topics and services on a Kubernetes
cluster, through the official ``kubernetes`` client.

How a request maps to objects is in :mod:`kidp.providers.onprem.manifests`
(pure builders); :mod:`kidp.providers.onprem.api` wraps the API server, and
:mod:`kidp.providers.onprem.watcher` follows it.

Where things go
    A deployment's ``namespace`` is a Kubernetes namespace (``namespace_prefix``
    prepended). The broker creates it when absent, labelled with the managed-by
    label so an administrator can see which namespaces it made; it never deletes
    a namespace (other things may live there).

Which path
    When the cluster serves an operator's CRD the operator does the work (seed
    000): zalando ``postgresql`` for PostgreSQL, spotahome ``RedisFailover`` for
    Redis, Strimzi ``KafkaTopic`` for topics (there is no plain path for a topic:
    without Strimzi a topic is a 400 naming what is missing). Everything else
    is a plain StatefulSet (databases, Redis) or Deployment (services,
    memcached). The path is discovered through the API (``/apis``) at deploy
    time and recorded in ``cloud_resource_id`` (``<namespace>/<Kind>/<name>``),
    so a deployment keeps its path when an operator is installed later.

Idempotency
    Every object carries the five tracking labels. ``deploy`` creates what is
    missing and adopts what already carries this deployment's id (a retried
    job, or a create that lost a race: 409 AlreadyExists is re-read and
    adopted). An object of the same name that belongs to another deployment,
    or to nobody, is never touched: the deployment fails naming it. Objects a
    ``Retain`` delete left behind (``managed-by=<managed_by>-retained``) are
    adopted by a later deployment of the same name, so a re-provision finds its
    data (claim names are deterministic) and its password again.

Delete
    Everything labelled with the deployment id goes, claims included. With
    ``Retain`` (and ``Snapshot``: on Kubernetes the volumes are the snapshot)
    the claims and the credentials Secret stay, relabelled
    ``managed-by=<managed_by>-retained``; an operator's resource is kept
    running, relabelled, as the AWS provider keeps a retained database.

Watching
    :meth:`KubernetesProvider.change_watcher` watches the managed workloads,
    pods, Services and claims cluster-wide (seed 004's watcher), so a
    StatefulSet deleted by hand becomes a sync job within a second.

Errors
    429, 5xx, 401 and connection failures are :class:`~kidp.errors.CloudUnavailable`
    (``retry_after`` from ``Retry-After``); 403 "exceeded quota" is
    :class:`~kidp.errors.QuotaExceeded`; 422 and other refusals are
    :class:`~kidp.errors.ProvisioningFailed` with the API's message (credential
    values masked).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from kidp import tags as tagging
from kidp.caching import Refreshing
from kidp.catalog import DEFAULT_PORTS, ENGINES
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
    ResourceType,
)
from kidp.ports import Credentials, PasswordPolicy, QuotaReport
from kidp.providers.onprem import manifests as m
from kidp.providers.onprem.api import (
    BUILTIN_KINDS,
    CONFIG_MAP,
    DEPLOYMENT,
    EVENT,
    KAFKA,
    KAFKA_TOPIC,
    LIMIT_RANGE,
    POD,
    POD_METRICS,
    PVC,
    QUOTA,
    REDIS_FAILOVER,
    SECRET,
    SERVICE,
    STATEFUL_SET,
    ZALANDO,
    AlreadyExists,
    Kind,
    KubeApi,
    decode_secret,
    labels_of,
    load_api_client,
    selector_string,
)
from kidp.providers.onprem.watcher import KubernetesChangeWatcher
from kidp.providers.ownership import deployment_tags

logger = logging.getLogger(__name__)


PROVIDER_NAME = "onprem"


State = Literal["creating", "available", "failed", "deleting", "missing", "modifying"]
Path = Literal["statefulset", "deployment", "zalando", "redisfailover", "kafkatopic"]

#: Container states that will not resolve without someone changing something.
_STUCK_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
    }
)
#: Warning Events that explain a stuck workload.
_FAILURE_EVENTS = frozenset(
    {"Failed", "FailedScheduling", "FailedCreate", "BackOff", "FailedMount", "FailedAttachVolume"}
)
_ZALANDO_FAILED = frozenset({"CreateFailed", "UpdateFailed", "SyncFailed", "Invalid"})
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cpu(amount: Decimal) -> str:
    return f"{int(amount * 1000)}m"


def _memory(amount: Decimal) -> str:
    return f"{int(amount / 2**20)}Mi"


@dataclass
class _Discovery:
    at: float
    groups: dict[str, list[str]]
    plurals: dict[str, set[str]] = field(default_factory=dict)

    def version_serving(self, group: str, plural: str) -> str | None:
        for version in self.groups.get(group, []):
            if plural in self.plurals.get(f"{group}/{version}", set()):
                return version
        return None


@dataclass(frozen=True)
class _KafkaCluster:
    name: str
    namespace: str
    topic_api_version: str
    brokers: int | None = None
    kafka_version: str | None = None


# --------------------------------------------------------------------------
# The provider


@dataclass(frozen=True)
class _NamespaceLimits:
    """What bounds a namespace: whether it exists, its ResourceQuotas, its LimitRanges."""

    exists: bool
    quotas: list[dict[str, Any]]
    ranges: list[dict[str, Any]]


class KubernetesProvider:
    """:class:`kidp.ports.CloudProvider` for a Kubernetes cluster.

    ``api_client`` injects a ``kubernetes.client.ApiClient`` (tests point one at
    the emulator); otherwise the cluster comes from ``kubeconfig``/``context``
    (default: ``KUBECONFIG`` or ``~/.kube/config``) or the in-cluster service
    account. ``storage_class`` names the claims' class (default: the cluster's);
    ``namespace_prefix`` is prepended to every deployment namespace.
    ``kafka_cluster`` (``name`` or ``namespace/name``) is the Strimzi Kafka
    cluster topics go to; unset, the cluster's ``Kafka`` resources are
    discovered (one in the deployment's namespace, or the only one).
    ``on_call(resource, operation)`` runs once per API call (the
    ``kidp_broker_cloud_api_calls_total`` counter).
    """

    name = PROVIDER_NAME

    def __init__(
        self,
        *,
        api_client: Any | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        tag_prefix: str = tagging.DEFAULT_PREFIX,
        managed_by: str = tagging.MANAGED_BY_VALUE,
        storage_class: str | None = None,
        namespace_prefix: str = "",
        on_call: Callable[[str, str], None] | None = None,
        kafka_cluster: str | None = None,
        discovery_ttl_seconds: float = 60.0,
        request_timeout: float = 30.0,
        quota_ttl: float = 0.0,
    ) -> None:
        if api_client is None:
            api_client, region = load_api_client(kubeconfig=kubeconfig, context=context)
        else:
            region = context or _host_of(api_client)
        self.region = region
        self.tag_prefix = tag_prefix
        self.managed_by = managed_by
        self.storage_class = storage_class
        self.namespace_prefix = namespace_prefix
        self.kafka_cluster = kafka_cluster
        self.discovery_ttl_seconds = discovery_ttl_seconds
        self.api = KubeApi(api_client, on_call=on_call, request_timeout=request_timeout)
        self._lock = threading.Lock()
        self._discovery: _Discovery | None = None
        self.quota_ttl = quota_ttl
        self._limits: dict[str, Refreshing[_NamespaceLimits]] = {}

    def __repr__(self) -> str:
        return f"KubernetesProvider(region={self.region!r})"

    # --- labels and names ------------------------------------------------------

    def label_key(self, name: str) -> str:
        """The label key of the logical tag ``name`` under this provider's prefix."""
        return tagging.encode_key(name, dialect="kubernetes", prefix=self.tag_prefix)

    @property
    def retained_value(self) -> str:
        """The managed-by value objects kept by a ``Retain`` delete carry."""
        return f"{self.managed_by}-retained"

    def namespace(self, deployment: Deployment) -> str:
        """The Kubernetes namespace of ``deployment``."""
        return f"{self.namespace_prefix}{deployment.namespace}"

    def _tag_labels(self, deployment: Deployment, tags: Mapping[str, str]) -> dict[str, str]:
        logical = deployment_tags(deployment, tags, managed_by=self.managed_by)
        known = {k: v for k, v in logical.items() if k in tagging.TAG_NAMES}
        return tagging.encode(known, dialect="kubernetes", prefix=self.tag_prefix)

    def _target(self, deployment: Deployment, tags: Mapping[str, str] | None = None) -> m.Target:
        return m.Target(
            deployment=deployment,
            namespace=self.namespace(deployment),
            tag_labels=self._tag_labels(deployment, tags or {}),
            deployment_label=self.label_key(tagging.DEPLOYMENT_ID),
            storage_class=self.storage_class,
            annotation_prefix=self.tag_prefix,
        )

    def _by_deployment(self, deployment: Deployment) -> str:
        return f"{self.label_key(tagging.DEPLOYMENT_ID)}={deployment.id}"

    def owned(self, obj: Mapping[str, Any] | None, deployment: Deployment) -> bool:
        """True when ``obj`` carries ``deployment``'s id."""
        return labels_of(obj).get(self.label_key(tagging.DEPLOYMENT_ID)) == deployment.id

    def _retained_for(self, obj: Mapping[str, Any], deployment: Deployment) -> bool:
        labels = labels_of(obj)
        return (
            labels.get(self.label_key(tagging.MANAGED_BY)) == self.retained_value
            and labels.get(f"{m.APP}instance") == deployment.resource_name
        )

    # --- discovery ---------------------------------------------------------------

    def _discover(self, *, refresh: bool = False) -> _Discovery:
        now = time.monotonic()
        with self._lock:
            cached = self._discovery
        if cached is not None and not refresh and now - cached.at < self.discovery_ttl_seconds:
            return cached
        groups = self.api.served_groups()
        found = _Discovery(at=now, groups=groups)
        for group in (m.ZALANDO_GROUP, m.SPOTAHOME_GROUP, m.STRIMZI_GROUP, "metrics.k8s.io"):
            for version in groups.get(group, []):
                found.plurals[f"{group}/{version}"] = self.api.served_plurals(group, version)
        with self._lock:
            self._discovery = found
        return found

    def operators(self) -> dict[str, bool]:
        """Which operator CRDs the cluster serves now (for ``plan`` and the docs)."""
        found = self._discover()
        return {
            "zalando": found.version_serving(m.ZALANDO_GROUP, m.ZALANDO_PLURAL) is not None,
            "spotahome": found.version_serving(m.SPOTAHOME_GROUP, m.SPOTAHOME_PLURAL) is not None,
            "strimzi": found.version_serving(m.STRIMZI_GROUP, m.STRIMZI_TOPIC_PLURAL) is not None,
        }

    def _path(self, deployment: Deployment) -> Path:
        """How ``deployment`` is (or will be) run: recorded at deploy time in
        ``cloud_resource_id``, discovered before that."""
        recorded = (deployment.cloud_resource_id or "").split("/")
        if len(recorded) == 3:
            by_kind: dict[str, Path] = {
                STATEFUL_SET.kind: "statefulset",
                DEPLOYMENT.kind: "deployment",
                ZALANDO.kind: "zalando",
                REDIS_FAILOVER.kind: "redisfailover",
                KAFKA_TOPIC.kind: "kafkatopic",
            }
            if recorded[1] in by_kind:
                return by_kind[recorded[1]]
        rtype, engine = deployment.resource_type, deployment.spec.engine
        if rtype is ResourceType.SERVICE or engine == "memcached":
            return "deployment"
        if rtype is ResourceType.TOPIC:
            return "kafkatopic"
        operators = self.operators()
        if engine == "postgresql" and operators["zalando"]:
            return "zalando"
        if engine == "redis" and operators["spotahome"]:
            return "redisfailover"
        return "statefulset"

    def _kafka(self, deployment: Deployment) -> _KafkaCluster:
        """The Strimzi Kafka cluster topics go to; ValidationFailed naming what is missing."""
        found = self._discover()
        topic_version = found.version_serving(m.STRIMZI_GROUP, m.STRIMZI_TOPIC_PLURAL)
        if topic_version is None:
            raise ValidationFailed(
                "topics need the Strimzi operator: this cluster does not serve "
                f"{m.STRIMZI_TOPIC_PLURAL}.{m.STRIMZI_GROUP} (KafkaTopic); install Strimzi "
                "(its CRDs and topic operator) or use a broker for a cloud with managed Kafka"
            )
        api_version = f"{m.STRIMZI_GROUP}/{topic_version}"
        namespace = self.namespace(deployment)
        if self.kafka_cluster:
            kafka_ns, _, name = self.kafka_cluster.rpartition("/")
            return _KafkaCluster(name, kafka_ns or namespace, api_version)
        kafka_version = found.version_serving(m.STRIMZI_GROUP, m.STRIMZI_KAFKA_PLURAL)
        clusters: list[dict[str, Any]] = []
        if kafka_version is not None:
            clusters = self.api.list(KAFKA.with_version(f"{m.STRIMZI_GROUP}/{kafka_version}"), None)
        local = [c for c in clusters if c["metadata"].get("namespace") == namespace]
        chosen = local if len(local) == 1 else clusters
        if len(chosen) != 1:
            names = ", ".join(
                f"{c['metadata'].get('namespace')}/{c['metadata']['name']}" for c in clusters
            )
            raise ValidationFailed(
                "topics need a Strimzi Kafka cluster, and "
                + (
                    f"several exist ({names}): set the broker's Kafka cluster (kafka_cluster)"
                    if clusters
                    else "the cluster has no Kafka resource: create one with Strimzi, or set "
                    "the broker's Kafka cluster (kafka_cluster)"
                )
            )
        kafka = chosen[0]
        spec = (kafka.get("spec") or {}).get("kafka") or {}
        replicas = spec.get("replicas")
        return _KafkaCluster(
            kafka["metadata"]["name"],
            kafka["metadata"]["namespace"],
            api_version,
            brokers=int(replicas) if isinstance(replicas, int) else None,
            kafka_version=str(spec["version"]) if spec.get("version") else None,
        )

    # --- what a deployment becomes ---------------------------------------------

    def _preflight(self, deployment: Deployment) -> Path:
        """Refuse what this cluster cannot run, as a 400 naming why."""
        namespace = self.namespace(deployment)
        if len(namespace) > m.MAX_LABEL or not _DNS_1123.match(namespace):
            raise ValidationFailed(
                f"namespace '{namespace}' (prefix '{self.namespace_prefix}' + namespace) is "
                "not a valid Kubernetes namespace name (at most 63 characters)"
            )
        if not _DNS_1035.match(m.client_service_name(deployment.resource_name)):
            raise ValidationFailed(
                f"resourceName '{deployment.resource_name}' must start with a letter on "
                "Kubernetes: the endpoint is a Service, whose name is a DNS-1035 label"
            )
        engine = deployment.spec.engine or ""
        if (
            deployment.resource_type not in (ResourceType.SERVICE, ResourceType.TOPIC)
            and engine not in m.IMAGES
        ):
            raise ValidationFailed(f"engine '{engine}' is not offered on Kubernetes")
        path = self._path(deployment)
        if (
            path == "statefulset"
            and deployment.spec.high_availability
            and not m.plain_ha_supported(engine)
        ):
            raise ValidationFailed(
                f"highAvailability for {engine} needs an operator this cluster does not run; "
                f"plain StatefulSets replicate only {', '.join(sorted(m.HA_REPLICAS))}. "
                "Ask for highAvailability: false, or install an operator"
            )
        if path == "kafkatopic":
            kafka = self._kafka(deployment)
            wanted = deployment.spec.replication_factor or 3
            if kafka.brokers is not None and wanted > kafka.brokers:
                raise ValidationFailed(
                    f"replicationFactor {wanted} exceeds the {kafka.brokers} brokers of Kafka "
                    f"cluster {kafka.namespace}/{kafka.name}"
                )
        return path

    def _objects(
        self,
        deployment: Deployment,
        tags: Mapping[str, str],
        credentials: Credentials | None,
        path: Path,
    ) -> list[dict[str, Any]]:
        """Every object of ``deployment``, Secrets first (pods reference them)."""
        target = self._target(deployment, tags)
        objects: list[dict[str, Any]] = []
        endpoint, port = self._endpoint(deployment, path)
        if credentials is not None:
            objects.append(
                m.credentials_secret(
                    target,
                    username=credentials.username,
                    password=credentials.password,
                    endpoint=endpoint,
                    port=port,
                )
            )
        if path == "statefulset":
            objects += m.stateful_objects(target)
        elif path == "deployment":
            objects += m.deployment_objects(target)
        elif path == "zalando":
            if credentials is not None:
                objects.append(
                    m.zalando_user_secret(
                        target, username=credentials.username, password=credentials.password
                    )
                )
            cluster = m.zalando_cluster_name(deployment.team, deployment.resource_name)
            objects += m.zalando_objects(target, credentials.username if credentials else "app")
            service = m.client_service_name(deployment.resource_name)
            if service != cluster:
                objects.append(m.zalando_client_service(target))
        elif path == "redisfailover":
            objects += m.redis_failover_objects(target)
        else:
            kafka = self._kafka(deployment)
            objects += m.kafka_topic_objects(
                target,
                kafka_cluster=kafka.name,
                kafka_namespace=kafka.namespace,
                api_version=kafka.topic_api_version,
            )
        return objects

    def _endpoint(self, deployment: Deployment, path: Path) -> tuple[str, int]:
        namespace = self.namespace(deployment)
        if path == "kafkatopic":
            kafka = self._kafka(deployment)
            return m.service_dns(f"{kafka.name}-kafka-bootstrap", kafka.namespace), 9092
        service = m.client_service_name(deployment.resource_name)
        if deployment.resource_type is ResourceType.SERVICE:
            return m.service_dns(service, namespace), deployment.spec.port or 8080
        return m.service_dns(service, namespace), DEFAULT_PORTS[deployment.spec.engine or ""]

    def _primary(self, objects: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The object whose state is the deployment's (the workload or the CR)."""
        order = ("KafkaTopic", "postgresql", "RedisFailover", "StatefulSet", "Deployment")
        for kind in order:
            for obj in objects:
                if obj["kind"] == kind:
                    return obj
        raise ProvisioningFailed("nothing to create for this deployment")

    def _kind_of(self, obj: Mapping[str, Any]) -> Kind:
        kind = str(obj["kind"])
        if kind in BUILTIN_KINDS:
            return BUILTIN_KINDS[kind]
        custom = {k.kind: k for k in (ZALANDO, REDIS_FAILOVER, KAFKA_TOPIC)}[kind]
        return custom.with_version(str(obj["apiVersion"]))

    def _resource_id(self, obj: Mapping[str, Any], kind: Kind | None = None) -> str:
        # Items of a list carry no ``kind`` on the wire: the caller knows it.
        meta = obj["metadata"]
        return f"{meta['namespace']}/{kind.kind if kind else obj['kind']}/{meta['name']}"

    # --- the CloudProvider port -------------------------------------------------

    def supported(self) -> dict[ResourceType, dict[str, list[str]]]:
        """Databases (PostgreSQL, MySQL, MongoDB, Redis), caches (Redis,
        memcached), topics (Kafka, through Strimzi) and services, with the
        catalogue's versions. No buckets: a cluster has no object store. Topics
        are listed even before Strimzi is installed; a topic request then fails
        as a 400 naming the missing operator."""
        return {
            ResourceType.DATABASE: {
                engine: list(versions)
                for engine, versions in ENGINES[ResourceType.DATABASE].items()
                if engine in m.IMAGES
            },
            ResourceType.CACHE: {
                engine: list(versions)
                for engine, versions in ENGINES[ResourceType.CACHE].items()
                if engine in m.IMAGES
            },
            ResourceType.TOPIC: {e: list(v) for e, v in ENGINES[ResourceType.TOPIC].items()},
            ResourceType.SERVICE: {"": []},
        }

    def password_policy(self, deployment: Deployment) -> PasswordPolicy | None:
        """Generated credentials for every database and Redis; memcached, topics
        and services take none. Letters and digits only: the password goes into
        SQL, shell and Redis configuration without quoting trouble."""
        engine = deployment.spec.engine
        if deployment.resource_type in (ResourceType.SERVICE, ResourceType.TOPIC):
            return None
        if engine == "redis":
            return PasswordPolicy(length=32, username="default")
        if engine in ("postgresql", "mysql", "mongodb"):
            return PasswordPolicy(length=32, username="kidpadmin")
        return None

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        """The objects ``deploy`` would create, Secret values replaced by
        placeholders. Reads only API discovery (cached), to pick the path."""
        path = self._preflight(deployment)
        policy = self.password_policy(deployment)
        placeholder = (
            Credentials(username=policy.username, password="<generated>")  # noqa: S106
            if policy
            else None
        )
        objects = self._objects(deployment, tags, placeholder, path)
        endpoint, port = self._endpoint(deployment, path)
        return {
            "provider": self.name,
            "region": self.region,
            "namespace": self.namespace(deployment),
            "path": path,
            "endpoint": endpoint,
            "port": port,
            "objects": objects,
        }

    def validate_quota(self, deployment: Deployment) -> QuotaReport:
        """Refuse (400) what the cluster cannot run, then check the namespace's
        ResourceQuotas and LimitRanges; raises ``QuotaExceeded`` naming the limit."""
        path = self._preflight(deployment)
        namespace = self.namespace(deployment)
        limits = self._namespace_limits(namespace)
        if not limits.exists:
            return QuotaReport(
                checked=True,
                details={
                    "namespace": namespace,
                    "resourceQuotas": [],
                    "limitRanges": [],
                    "note": "namespace does not exist yet; it is created unconstrained",
                },
            )
        policy = self.password_policy(deployment)
        placeholder = (
            Credentials(username=policy.username, password="quota-check")  # noqa: S106
            if policy
            else None
        )
        objects = [
            obj
            for obj in self._objects(deployment, {}, placeholder, path)
            if obj["metadata"].get("namespace") == namespace
        ]
        # Counted as new even when the secret store made the Secret already: the
        # api role may not read Secrets, and one Secret too many is the safe error.
        needs = m.quota_needs(objects)
        for quota in limits.quotas:
            _check_quota(namespace, quota, needs)
        for limit_range in limits.ranges:
            _check_limit_range(namespace, limit_range, objects)
        return QuotaReport(
            checked=True,
            details={
                "namespace": namespace,
                "resourceQuotas": [q["metadata"]["name"] for q in limits.quotas],
                "limitRanges": [r["metadata"]["name"] for r in limits.ranges],
                "needs": {key: str(value) for key, value in sorted(needs.items())},
                "maxAgeSeconds": self.quota_ttl,
            },
        )

    def _namespace_limits(self, namespace: str) -> _NamespaceLimits:
        """The namespace's ResourceQuotas and LimitRanges: read now, or with a
        ``quota_ttl`` from memory and refreshed in the background (the accept
        path then makes no API call; the API server's own admission still
        refuses a create that goes over, as ``QuotaExceeded``)."""
        if self.quota_ttl <= 0:
            return self._read_limits(namespace)
        with self._lock:
            cached = self._limits.get(namespace)
            if cached is None:
                cached = Refreshing(
                    lambda: self._read_limits(namespace),
                    ttl=self.quota_ttl,
                    max_age=15 * self.quota_ttl,
                    name=f"quotas of namespace {namespace}",
                )
                self._limits[namespace] = cached
        return cached.get()

    def _read_limits(self, namespace: str) -> _NamespaceLimits:
        if not self.api.namespace_exists(namespace):
            return _NamespaceLimits(exists=False, quotas=[], ranges=[])
        return _NamespaceLimits(
            exists=True,
            quotas=self.api.list(QUOTA, namespace),
            ranges=self.api.list(LIMIT_RANGE, namespace),
        )

    def deploy(
        self,
        deployment: Deployment,
        tags: dict[str, str],
        credentials: Credentials | None,
    ) -> CloudResource:
        """Create every object of the deployment, adopting those that already
        carry its id; returns the state as the cluster reports it."""
        path = self._preflight(deployment)
        if self.password_policy(deployment) is not None and credentials is None:
            raise ProvisioningFailed(f"a {deployment.spec.engine} needs credentials")
        namespace = self.namespace(deployment)
        self.api.ensure_namespace(namespace, {self.label_key(tagging.MANAGED_BY): self.managed_by})
        objects = self._objects(deployment, tags, credentials, path)
        secrets = (credentials.password,) if credentials else ()
        for obj in objects:
            self._apply(deployment, obj, secrets)
        primary = self._primary(objects)
        self._adopt_retained_claims(deployment, primary)
        logger.info(
            "deployed %s %s for %s", primary["kind"], primary["metadata"]["name"], deployment.id
        )
        recorded = deployment.model_copy(update={"cloud_resource_id": self._resource_id(primary)})
        return self.get_status(recorded)

    def _apply(
        self, deployment: Deployment, desired: dict[str, Any], secrets: Sequence[str]
    ) -> None:
        """Create ``desired`` or adopt the object already there."""
        kind = self._kind_of(desired)
        meta = desired["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        existing = self.api.get(kind, namespace, name)
        if existing is None:
            try:
                self.api.create(kind, namespace, desired, secrets=secrets)
                return
            except AlreadyExists:
                # Someone made it between our look and our create: a concurrent
                # worker on this deployment, or a retried create whose answer was lost.
                existing = self.api.get(kind, namespace, name)
                if existing is None:
                    raise CloudUnavailable(
                        f"{kind.kind} {namespace}/{name} exists but cannot be read yet",
                        retry_after=5.0,
                    ) from None
        self._adopt(deployment, kind, existing, desired, secrets)

    def _adopt(
        self,
        deployment: Deployment,
        kind: Kind,
        existing: dict[str, Any],
        desired: dict[str, Any],
        secrets: Sequence[str],
    ) -> None:
        meta = existing["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        patch: dict[str, Any] = {}
        if not self.owned(existing, deployment):
            if self._retained_for(existing, deployment):
                # A Retain delete of an earlier deployment of this name left it.
                patch["metadata"] = {"labels": desired["metadata"]["labels"]}
                logger.info("adopting retained %s %s/%s", kind.kind, namespace, name)
            elif kind is SECRET and self._store_made(existing, deployment):
                patch["metadata"] = {"labels": desired["metadata"]["labels"]}
            else:
                holder = labels_of(existing).get(self.label_key(tagging.DEPLOYMENT_ID))
                whose = (
                    f"belongs to deployment {holder}"
                    if holder
                    else "carries no KIDP deployment label (the broker did not create it)"
                )
                raise ProvisioningFailed(
                    f"{kind.kind} {namespace}/{name} already exists and {whose}; delete or "
                    "rename it, or choose another resourceName",
                    details={"heldBy": holder},
                )
        if kind is SECRET:
            # The values handed to deploy come from the broker's secret store:
            # they win over whatever the Secret holds (same values when the
            # store is this cluster). Connection details are added if missing.
            current = decode_secret(existing)
            wanted = dict(desired.get("stringData") or {})
            changed = {k: v for k, v in wanted.items() if current.get(k) != v}
            if changed:
                patch["stringData"] = changed
        if patch:
            self.api.patch(kind, namespace, name, patch, secrets=secrets)

    def _adopt_retained_claims(self, deployment: Deployment, primary: dict[str, Any]) -> None:
        # A StatefulSet of the same name binds the claims a Retain delete left
        # (their names are deterministic): they become this deployment's again.
        if primary["kind"] != STATEFUL_SET.kind:
            return
        namespace = primary["metadata"]["namespace"]
        selector = (
            f"{self.label_key(tagging.MANAGED_BY)}={self.retained_value},"
            f"{m.APP}instance={deployment.resource_name}"
        )
        labels = primary["spec"]["template"]["metadata"]["labels"]
        for claim in self.api.list(PVC, namespace, label_selector=selector):
            self.api.patch(
                PVC, namespace, claim["metadata"]["name"], {"metadata": {"labels": labels}}
            )
            logger.info("adopted retained claim %s/%s", namespace, claim["metadata"]["name"])

    def _store_made(self, secret: Mapping[str, Any], deployment: Deployment) -> bool:
        # The secret store writes the Secret before deploy runs; it carries the
        # tags it was given, which may lack this deployment's id only when the
        # store was called without tags (a rotation of an older deployment).
        labels = labels_of(secret)
        return (
            labels.get(self.label_key(tagging.MANAGED_BY)) == self.managed_by
            and self.label_key(tagging.DEPLOYMENT_ID) not in labels
        )

    # --- status --------------------------------------------------------------

    def get_status(self, deployment: Deployment) -> CloudResource:
        """The deployment as the cluster reports it now; ``missing`` when its
        primary object is gone (or belongs to someone else)."""
        path = self._path(deployment)
        if path == "kafkatopic":
            return self._topic_status(deployment)
        namespace = self.namespace(deployment)
        name = deployment.resource_name
        if path == "zalando":
            kind, obj_name = ZALANDO, m.zalando_cluster_name(deployment.team, name)
        elif path == "redisfailover":
            kind, obj_name = REDIS_FAILOVER, m.workload_name(name)
        elif path == "deployment":
            kind, obj_name = DEPLOYMENT, m.workload_name(name)
        else:
            kind, obj_name = STATEFUL_SET, m.workload_name(name)
        found = self.api.get(kind, namespace, obj_name)
        resource_id = f"{namespace}/{kind.kind}/{obj_name}"
        if found is None or not self.owned(found, deployment):
            return CloudResource(
                cloud_resource_id=resource_id,
                state="missing",
                message=f"no {kind.kind} {namespace}/{obj_name} of this deployment exists",
            )
        endpoint, port = self._endpoint(deployment, path)
        if path == "zalando":
            state, message, progress, pod_selector, usage = self._zalando_state(found)
        elif path == "redisfailover":
            state, message, progress, pod_selector, usage = self._failover_state(found, namespace)
        else:
            state, message, progress, pod_selector, usage = self._workload_state(found)
        if state != "failed":
            failure = self._pod_failure(namespace, pod_selector, owner=obj_name)
            if failure:
                state, message = "failed", failure
        actual = self._actual_spec(deployment, path, found, namespace, pod_selector)
        usage.update(self._usage(namespace, pod_selector))
        return CloudResource(
            cloud_resource_id=resource_id,
            state=state,
            message=message,
            endpoint=endpoint,
            port=port,
            actual_spec=actual,
            resource_usage=usage,
            tags=labels_of(found),
            progress=progress,
        )

    def _workload_state(
        self, workload: dict[str, Any]
    ) -> tuple[State, str, int, str, dict[str, Any]]:
        spec, status = workload.get("spec") or {}, workload.get("status") or {}
        desired = int(spec.get("replicas", 1))
        ready = int(status.get("readyReplicas") or 0)
        current = int(status.get("observedGeneration") or 0) >= int(
            workload["metadata"].get("generation") or 0
        )
        updated = int(status.get("updatedReplicas") or 0) >= desired
        selector = selector_string((spec.get("selector") or {}).get("matchLabels") or {})
        kind = workload["kind"]
        usage: dict[str, Any] = {"replicas": desired, "readyReplicas": ready}
        if ready >= desired and current and (updated or kind == "StatefulSet"):
            return "available", f"{kind}: {ready}/{desired} pods ready", 100, selector, usage
        progress = 10 + (80 * ready // desired if desired else 0)
        return "creating", f"{kind}: {ready}/{desired} pods ready", progress, selector, usage

    def _zalando_state(
        self, cluster: dict[str, Any]
    ) -> tuple[State, str, int, str, dict[str, Any]]:
        status = (cluster.get("status") or {}).get("PostgresClusterStatus") or ""
        name = cluster["metadata"]["name"]
        instances = int((cluster.get("spec") or {}).get("numberOfInstances") or 1)
        selector = f"application=spilo,cluster-name={name}"
        usage: dict[str, Any] = {"replicas": instances}
        if status == "Running":
            return "available", "postgres-operator: Running", 100, selector, usage
        if status in _ZALANDO_FAILED:
            return "failed", f"postgres-operator reports {status}", 100, selector, usage
        return "creating", f"postgres-operator: {status or 'pending'}", 30, selector, usage

    def _failover_state(
        self, failover: dict[str, Any], namespace: str
    ) -> tuple[State, str, int, str, dict[str, Any]]:
        # The RedisFailover CRD has no status: read the operator's workloads.
        name = failover["metadata"]["name"]
        spec = failover.get("spec") or {}
        want_redis = int((spec.get("redis") or {}).get("replicas") or 1)
        want_sentinel = int((spec.get("sentinel") or {}).get("replicas") or 1)
        redis = self.api.get(STATEFUL_SET, namespace, f"rfr-{name}")
        sentinel = self.api.get(DEPLOYMENT, namespace, f"rfs-{name}")
        ready_redis = int(((redis or {}).get("status") or {}).get("readyReplicas") or 0)
        ready_sentinel = int(((sentinel or {}).get("status") or {}).get("readyReplicas") or 0)
        selector = f"{m.APP}name={name},{m.APP}part-of=redis-failover"
        message = (
            f"redis-operator: redis {ready_redis}/{want_redis}, "
            f"sentinel {ready_sentinel}/{want_sentinel} ready"
        )
        usage: dict[str, Any] = {"replicas": want_redis, "readyReplicas": ready_redis}
        if ready_redis >= want_redis and ready_sentinel >= want_sentinel:
            return "available", message, 100, selector, usage
        total = want_redis + want_sentinel
        progress = 10 + 80 * (ready_redis + ready_sentinel) // total
        return "creating", message, progress, selector, usage

    def _topic_status(self, deployment: Deployment) -> CloudResource:
        topics = self.api.list(
            self._topic_kind(), None, label_selector=self._by_deployment(deployment)
        )
        if not topics:
            return CloudResource(
                cloud_resource_id=deployment.cloud_resource_id or deployment.resource_name,
                state="missing",
                message="no KafkaTopic of this deployment exists",
            )
        topic = topics[0]
        meta = topic["metadata"]
        cluster = labels_of(topic).get(m.STRIMZI_CLUSTER_LABEL, "")
        conditions = {c.get("type"): c for c in (topic.get("status") or {}).get("conditions") or []}
        ready = conditions.get("Ready") or {}
        state: State = "creating"
        message = "KafkaTopic: waiting for the topic operator"
        if ready.get("status") == "True":
            state, message = "available", "KafkaTopic: Ready"
        elif ready.get("status") == "False":
            state = "failed"
            message = f"KafkaTopic not ready: {ready.get('reason', '')} {ready.get('message', '')}"
        spec = topic.get("spec") or {}
        retention = (spec.get("config") or {}).get("retention.ms")
        actual: dict[str, Any] = {
            "engine": "kafka",
            "partitions": spec.get("partitions"),
            "replicationFactor": spec.get("replicas"),
            "topicName": spec.get("topicName") or meta["name"],
        }
        if retention is not None:
            actual["retentionHours"] = int(int(retention) // 3_600_000)
        return CloudResource(
            cloud_resource_id=f"{meta['namespace']}/KafkaTopic/{meta['name']}",
            state=state,
            message=message.strip(),
            endpoint=m.service_dns(f"{cluster}-kafka-bootstrap", meta["namespace"]),
            port=9092,
            actual_spec={k: v for k, v in actual.items() if v is not None},
            tags=labels_of(topic),
            progress=100 if state == "available" else 50,
        )

    def _topic_kind(self) -> Kind:
        version = self._discover().version_serving(m.STRIMZI_GROUP, m.STRIMZI_TOPIC_PLURAL)
        return KAFKA_TOPIC.with_version(f"{m.STRIMZI_GROUP}/{version or 'v1beta2'}")

    def _pod_failure(self, namespace: str, selector: str, *, owner: str) -> str | None:
        """Why the pods cannot become ready (image pull, unschedulable, quota),
        from pod conditions, container states and Warning Events; None if nothing
        is stuck."""
        pods = self.api.list(POD, namespace, label_selector=selector)
        names = {p["metadata"]["name"] for p in pods} | {owner, f"rfr-{owner}", f"rfs-{owner}"}
        events = [
            e
            for e in self.api.list(EVENT, namespace, field_selector="type=Warning")
            if (e.get("involvedObject") or {}).get("name") in names
            and e.get("reason") in _FAILURE_EVENTS
        ]
        events.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))

        def event_for(name: str) -> str:
            # The newest explanation wins over the newest "Error: <reason>" echo.
            messages = [
                str(e.get("message") or "")
                for e in events
                if (e.get("involvedObject") or {}).get("name") == name
            ]
            telling = [text for text in messages if not text.startswith("Error: ")]
            return (telling or messages or [""])[-1]

        for pod in sorted(pods, key=lambda p: str(p["metadata"]["name"])):
            pod_name = pod["metadata"]["name"]
            status = pod.get("status") or {}
            for condition in status.get("conditions") or []:
                if (
                    condition.get("type") == "PodScheduled"
                    and condition.get("status") == "False"
                    and condition.get("reason") == "Unschedulable"
                ):
                    detail = condition.get("message") or event_for(pod_name)
                    return f"pod {pod_name} cannot be scheduled: {detail}"
            containers = (status.get("initContainerStatuses") or []) + (
                status.get("containerStatuses") or []
            )
            for container in containers:
                waiting = (container.get("state") or {}).get("waiting") or {}
                reason = waiting.get("reason")
                if reason in _STUCK_REASONS:
                    detail = event_for(pod_name) or waiting.get("message") or ""
                    return f"pod {pod_name} container {container.get('name')}: {reason}: {detail}"
        # The workload controller could not even create its pods (quota, admission).
        for event in reversed(events):
            if event.get("reason") == "FailedCreate":
                return f"{owner}: {event.get('message', '')}"
        return None

    def _actual_spec(
        self,
        deployment: Deployment,
        path: Path,
        found: dict[str, Any],
        namespace: str,
        pod_selector: str,
    ) -> dict[str, Any]:
        """What runs, in the wire spec's fields, for drift (``kidp.drift``)."""
        spec = found.get("spec") or {}
        engine = deployment.spec.engine
        actual: dict[str, Any] = {}
        if path == "zalando":
            replicas = int(spec.get("numberOfInstances") or 1)
            actual = {
                "engine": "postgresql",
                "version": str((spec.get("postgresql") or {}).get("version") or ""),
                "size": m.size_of(spec.get("resources")),
                "highAvailability": replicas > 1,
                "replicas": replicas,
                "storageGb": _gib_or_none((spec.get("volume") or {}).get("size")),
            }
        elif path == "redisfailover":
            redis = spec.get("redis") or {}
            replicas = int(redis.get("replicas") or 1)
            actual = {
                "engine": engine,
                "version": m.version_from_image(str(redis.get("image") or "")),
                "size": m.size_of(redis.get("resources")),
                "highAvailability": replicas > 1,
                "replicas": replicas,
                "image": redis.get("image"),
            }
            claim = (redis.get("storage") or {}).get("persistentVolumeClaim")
            if claim and deployment.resource_type is ResourceType.DATABASE:
                actual["storageGb"] = _gib_or_none(
                    ((claim.get("spec") or {}).get("resources") or {})
                    .get("requests", {})
                    .get("storage")
                )
        else:
            pod = (spec.get("template") or {}).get("spec") or {}
            containers = pod.get("containers") or [{}]
            main = containers[0]
            replicas = int(spec.get("replicas", 1))
            image = str(main.get("image") or "")
            actual = {
                "size": m.size_of(main.get("resources")),
                "replicas": replicas,
                "image": image,
            }
            if deployment.resource_type is ResourceType.SERVICE:
                ports = main.get("ports") or [{}]
                actual["port"] = ports[0].get("containerPort")
            else:
                actual.update(
                    engine=engine,
                    version=m.version_from_image(image),
                    highAvailability=replicas > 1,
                )
            if path == "statefulset" and deployment.resource_type is ResourceType.DATABASE:
                actual["storageGb"] = self._claimed_storage(found, namespace, pod_selector)
        return {k: v for k, v in actual.items() if v not in (None, "")}

    def _claimed_storage(
        self, statefulset: dict[str, Any], namespace: str, selector: str
    ) -> int | float | None:
        # Claims can be expanded by hand after creation; the largest one is
        # what the deployment has.
        sizes: list[Decimal] = []
        for claim in self.api.list(PVC, namespace, label_selector=selector):
            request = ((claim.get("spec") or {}).get("resources") or {}).get("requests") or {}
            if "storage" in request:
                sizes.append(m.parse_quantity(request["storage"]))
        if not sizes:
            for template in (statefulset.get("spec") or {}).get("volumeClaimTemplates") or []:
                request = ((template.get("spec") or {}).get("resources") or {}).get("requests")
                if request and "storage" in request:
                    sizes.append(m.parse_quantity(request["storage"]))
        return m.gib(max(sizes)) if sizes else None

    def _usage(self, namespace: str, selector: str) -> dict[str, Any]:
        """Seed 001's ``resourceUsage`` from metrics.k8s.io (when served) and claims."""
        usage: dict[str, Any] = {}
        discovery = self._discover()
        if discovery.version_serving("metrics.k8s.io", "pods") is not None:
            try:
                metrics = self.api.list(POD_METRICS, namespace, label_selector=selector)
            except BrokerError as exc:
                # Usage is a nicety; a flaky metrics-server must not fail a status read.
                logger.info("pod metrics unavailable: %s", exc.message)
                metrics = []
            cpu = memory = Decimal(0)
            for pod in metrics:
                for container in pod.get("containers") or []:
                    use = container.get("usage") or {}
                    try:
                        cpu += m.parse_quantity(use.get("cpu", "0"))
                        memory += m.parse_quantity(use.get("memory", "0"))
                    except ValueError:
                        logger.info("unreadable pod metrics in %s", namespace)
            if metrics:
                usage.update(cpuUsage=_cpu(cpu), memoryUsage=_memory(memory))
        capacity = Decimal(0)
        for claim in self.api.list(PVC, namespace, label_selector=selector):
            size = ((claim.get("status") or {}).get("capacity") or {}).get("storage")
            if size:
                capacity += m.parse_quantity(size)
        if capacity:
            usage["storageUsage"] = f"{m.gib(capacity)}Gi"
        return usage

    # --- delete ------------------------------------------------------------------

    def delete(self, deployment: Deployment) -> bool:
        """Remove every object labelled with the deployment's id; True once none
        is left. ``Retain`` (and ``Snapshot``, which on Kubernetes keeps the
        volumes themselves) keeps the claims and the credentials Secret,
        relabelled ``managed-by=<managed_by>-retained`` and without owner
        references, whatever policy the deployment was made with; on an
        operator path the operator's resource is kept running, relabelled, as
        the AWS provider keeps a retained database."""
        namespace = self.namespace(deployment)
        selector = self._by_deployment(deployment)
        keep = deployment.deletion_policy is not DeletionPolicy.DELETE
        discovery = self._discover()
        customs: list[Kind] = []
        for kind in (ZALANDO, REDIS_FAILOVER, KAFKA_TOPIC):
            version = discovery.version_serving(kind.group, kind.plural)
            if version is not None:
                customs.append(kind.with_version(f"{kind.group}/{version}"))
        for kind in customs:
            where = None if kind.plural == m.STRIMZI_TOPIC_PLURAL else namespace
            for obj in self.api.list(kind, where, label_selector=selector):
                meta = obj["metadata"]
                if keep:
                    self._relabel_retained(kind, obj)
                else:
                    self.api.delete(kind, meta["namespace"], meta["name"])
        kept_operator = keep and any(
            self.api.list(kind, namespace, label_selector=selector) for kind in customs
        )
        kinds: tuple[Kind, ...] = (STATEFUL_SET, DEPLOYMENT, SERVICE, CONFIG_MAP, SECRET, PVC)
        if keep and not kept_operator:
            # deletionPolicy may have been Delete at provision time: the
            # StatefulSet then owns its claims and the garbage collector would
            # take them with it. Its policy changes first, so its controller
            # stops re-adding the owner references the relabelling removes;
            # the claims are relabelled before the StatefulSet goes.
            for statefulset in self.api.list(STATEFUL_SET, namespace, label_selector=selector):
                self._retain_claims_on_delete(statefulset)
            kinds = (SECRET, PVC, STATEFUL_SET, DEPLOYMENT, SERVICE, CONFIG_MAP)
        for kind in kinds:
            for obj in self.api.list(kind, namespace, label_selector=selector):
                meta = obj["metadata"]
                if keep and (kind in (SECRET, PVC) or kept_operator):
                    self._relabel_retained(kind, obj)
                    continue
                self.api.delete(kind, namespace, meta["name"])
        if not keep:
            self._zalando_claims(deployment, namespace)
        # Done once a second look finds nothing of ours: controllers remove
        # pods in the background, so this may take another poll.
        return self._nothing_left(deployment, namespace, customs)

    def _zalando_claims(self, deployment: Deployment, namespace: str) -> None:
        # The operator's claims carry its labels, not ours.
        cluster = m.zalando_cluster_name(deployment.team, deployment.resource_name)
        for claim in self.api.list(
            PVC, namespace, label_selector=f"application=spilo,cluster-name={cluster}"
        ):
            self.api.delete(PVC, namespace, claim["metadata"]["name"])

    def _retain_claims_on_delete(self, statefulset: dict[str, Any]) -> None:
        meta = statefulset["metadata"]
        policy = (statefulset.get("spec") or {}).get("persistentVolumeClaimRetentionPolicy") or {}
        if policy.get("whenDeleted") != "Delete":
            return
        self.api.patch(
            STATEFUL_SET,
            meta["namespace"],
            meta["name"],
            {"spec": {"persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain"}}},
        )

    def _relabel_retained(self, kind: Kind, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = self.label_key(tagging.MANAGED_BY)
        # A kept claim must outlive whatever owned it: the StatefulSet
        # controller drops its reference only some time after the policy
        # change, possibly after the StatefulSet is gone.
        owned = kind is PVC and bool(meta.get("ownerReferences"))
        if labels_of(obj).get(key) == self.retained_value and not owned:
            return
        patch: dict[str, Any] = {"metadata": {"labels": {key: self.retained_value}}}
        if owned:
            patch["metadata"]["ownerReferences"] = None
        self.api.patch(kind, meta["namespace"], meta["name"], patch)
        logger.info("retained %s %s/%s", kind.kind, meta["namespace"], meta["name"])

    def _nothing_left(self, deployment: Deployment, namespace: str, customs: list[Kind]) -> bool:
        selector = self._by_deployment(deployment)
        managed = f"{self.label_key(tagging.MANAGED_BY)}={self.managed_by}"
        both = f"{selector},{managed}"
        for kind in customs:
            where = None if kind.plural == m.STRIMZI_TOPIC_PLURAL else namespace
            if self.api.list(kind, where, label_selector=both):
                return False
        for kind in (STATEFUL_SET, DEPLOYMENT, SERVICE, CONFIG_MAP, SECRET, PVC, POD):
            if self.api.list(kind, namespace, label_selector=both):
                return False
        return True

    # --- credentials ---------------------------------------------------------------

    def rotate_credentials(self, deployment: Deployment, credentials: Credentials) -> None:
        """Put the new password where the engine reads it and make it current.

        The connection Secret gets the new password and keeps the previous one
        as ``previous-password``. Plain StatefulSets are then restarted (the
        pod-template annotation ``kubectl rollout restart`` sets): Redis reads
        its password at start; PostgreSQL, MySQL and MongoDB apply it from their
        postStart hook. On the operator paths the operator's Secret is updated
        and the resource annotated, which makes the operator reconcile.
        """
        if self.password_policy(deployment) is None:
            raise ProvisioningFailed(
                f"a {deployment.spec.engine or deployment.resource_type.value} has no credentials"
            )
        namespace = self.namespace(deployment)
        name = m.credentials_secret_name(deployment.resource_name)
        secret = self.api.get(SECRET, namespace, name)
        if secret is None or not self.owned(secret, deployment):
            raise ProvisioningFailed(
                f"cannot rotate credentials: no Secret {namespace}/{name} of this deployment"
            )
        masked = (credentials.password,)
        current = decode_secret(secret)
        update = {
            m.SECRET_DATA_USERNAME: credentials.username,
            m.SECRET_DATA_PASSWORD: credentials.password,
        }
        old = current.get(m.SECRET_DATA_PASSWORD)
        if old and old != credentials.password:
            update[m.SECRET_DATA_PREVIOUS] = old
        changed = {k: v for k, v in update.items() if current.get(k) != v}
        if changed:
            self.api.patch(
                SECRET, namespace, name, {"stringData": changed}, secrets=(*masked, old or "")
            )
        path = self._path(deployment)
        stamp = {"metadata": {"annotations": {f"{self.tag_prefix}credentials-rotated-at": _now()}}}
        if path == "zalando":
            cluster = m.zalando_cluster_name(deployment.team, deployment.resource_name)
            user_secret = m.zalando_user_secret_name(credentials.username, cluster)
            if self.api.get(SECRET, namespace, user_secret) is not None:
                self.api.patch(
                    SECRET,
                    namespace,
                    user_secret,
                    {"stringData": {m.SECRET_DATA_PASSWORD: credentials.password}},
                    secrets=masked,
                )
            self.api.patch(ZALANDO, namespace, cluster, stamp)
        elif path == "redisfailover":
            self.api.patch(
                REDIS_FAILOVER, namespace, m.workload_name(deployment.resource_name), stamp
            )
        else:
            kind = DEPLOYMENT if path == "deployment" else STATEFUL_SET
            restart = {
                "spec": {"template": {"metadata": {"annotations": {m.RESTART_ANNOTATION: _now()}}}}
            }
            self.api.patch(kind, namespace, m.workload_name(deployment.resource_name), restart)
        logger.info("rotated credentials of %s", deployment.id)

    # --- scans -------------------------------------------------------------------

    def list_managed(self) -> Sequence[ManagedResource]:
        """The primary object of every deployment carrying managed-by=<this
        broker>, across namespaces (operator resources over the workloads an
        operator made from them). Retained objects carry ``<managed_by>-retained``
        and are not listed. Untagged look-alikes are not reported: a team's
        namespace legitimately holds workloads the broker never made."""
        selector = f"{self.label_key(tagging.MANAGED_BY)}={self.managed_by}"
        deployment_key = self.label_key(tagging.DEPLOYMENT_ID)
        discovery = self._discover()
        kinds: list[tuple[Kind, int]] = [(STATEFUL_SET, 1), (DEPLOYMENT, 1)]
        for kind in (ZALANDO, REDIS_FAILOVER, KAFKA_TOPIC):
            version = discovery.version_serving(kind.group, kind.plural)
            if version is not None:
                kinds.append((kind.with_version(f"{kind.group}/{version}"), 2))
        best: dict[str, tuple[int, ManagedResource]] = {}
        loose: list[ManagedResource] = []
        for kind, rank in kinds:
            for obj in self.api.list(kind, None, label_selector=selector):
                labels = labels_of(obj)
                rtype = _resource_type(labels.get(f"{m.APP}component"), kind)
                resource = ManagedResource(
                    cloud_resource_id=self._resource_id(obj, kind),
                    resource_type=rtype,
                    name=labels.get(f"{m.APP}instance") or obj["metadata"]["name"],
                    tags=labels,
                )
                deployment_id = labels.get(deployment_key)
                if deployment_id is None:
                    loose.append(resource)
                    continue
                current = best.get(deployment_id)
                if current is None or rank > current[0]:
                    best[deployment_id] = (rank, resource)
        return [resource for _, resource in best.values()] + loose

    def check(self) -> None:
        """Raise ``CloudUnavailable`` unless the API server answers ``/api``."""
        self.api.check()

    def change_watcher(self, on_change: Callable[[str], None]) -> KubernetesChangeWatcher:
        """A watch on every object labelled managed-by=<this broker> (seed 004's
        watcher), calling ``on_change(deployment_id)`` for each change it sees."""
        return KubernetesChangeWatcher(
            self.api.api_client,
            label_selector=f"{self.label_key(tagging.MANAGED_BY)}={self.managed_by}",
            deployment_label=self.label_key(tagging.DEPLOYMENT_ID),
            on_change=on_change,
        )


def _resource_type(component: str | None, kind: Kind) -> ResourceType:
    try:
        return ResourceType(component or "")
    except ValueError:
        if kind is DEPLOYMENT:
            return ResourceType.SERVICE
        if kind.plural == m.STRIMZI_TOPIC_PLURAL:
            return ResourceType.TOPIC
        return ResourceType.DATABASE


def _gib_or_none(value: Any) -> int | float | None:
    try:
        return m.gib(m.parse_quantity(value)) if value is not None else None
    except ValueError:
        return None


def _host_of(api_client: Any) -> str:
    host = str(getattr(getattr(api_client, "configuration", None), "host", "") or "")
    return re.sub(r"^https?://", "", host) or "kubernetes"


def _check_quota(namespace: str, quota: Mapping[str, Any], needs: Mapping[str, Decimal]) -> None:
    """Raise ``QuotaExceeded`` when ``needs`` does not fit the quota's room."""
    status = quota.get("status") or {}
    hard = status.get("hard") or (quota.get("spec") or {}).get("hard") or {}
    used = status.get("used") or {}
    name = quota["metadata"]["name"]
    for key, limit in sorted(hard.items()):
        need = needs.get(key)
        if not need:
            continue
        try:
            maximum = m.parse_quantity(limit)
            taken = m.parse_quantity(used.get(key, "0"))
        except ValueError:
            continue
        if taken + need > maximum:
            raise QuotaExceeded(
                f"namespace {namespace}: ResourceQuota {name} allows {key}={limit}; "
                f"{used.get(key, '0')} is used and this deployment needs {_show(key, need)}",
                details={"quota": name, "resource": key, "hard": str(limit)},
            )


def _show(key: str, amount: Decimal) -> str:
    if key.endswith("cpu"):
        return _cpu(amount)
    if key.endswith(("memory", "storage")):
        return f"{m.gib(amount)}Gi"
    return str(int(amount))


def _containers(obj: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    spec = obj.get("spec") or {}
    kind = obj["kind"]
    if kind in ("StatefulSet", "Deployment"):
        pod = spec["template"]["spec"]
        yield from pod.get("initContainers") or []
        yield from pod["containers"]
    elif kind == "postgresql":
        yield {"name": "postgres", "resources": spec.get("resources") or {}}
    elif kind == "RedisFailover":
        for part in ("redis", "sentinel"):
            yield {"name": part, "resources": (spec.get(part) or {}).get("resources") or {}}


def _claims(obj: Mapping[str, Any]) -> Iterable[str]:
    spec = obj.get("spec") or {}
    for claim in spec.get("volumeClaimTemplates") or []:
        yield claim["spec"]["resources"]["requests"]["storage"]
    if obj["kind"] == "postgresql":
        yield spec["volume"]["size"]
    if obj["kind"] == "RedisFailover":
        claim = ((spec.get("redis") or {}).get("storage") or {}).get("persistentVolumeClaim")
        if claim:
            yield claim["spec"]["resources"]["requests"]["storage"]


def _check_limit_range(
    namespace: str, limit_range: Mapping[str, Any], objects: Sequence[dict[str, Any]]
) -> None:
    """Raise ``QuotaExceeded`` when a container or claim falls outside the
    LimitRange's min/max (what admission would refuse pod by pod)."""
    name = limit_range["metadata"]["name"]
    for item in (limit_range.get("spec") or {}).get("limits") or []:
        kind = item.get("type")
        bounds = {"max": item.get("max") or {}, "min": item.get("min") or {}}
        if kind == "Container":
            for obj in objects:
                for container in _containers(obj):
                    resources = container.get("resources") or {}
                    for resource in ("cpu", "memory"):
                        for source in ("limits", "requests"):
                            value = (resources.get(source) or {}).get(resource)
                            if value is None:
                                continue
                            _within(
                                namespace, name, f"Container {resource}", value, bounds, resource
                            )
        elif kind == "PersistentVolumeClaim":
            for obj in objects:
                for size in _claims(obj):
                    _within(
                        namespace, name, "PersistentVolumeClaim storage", size, bounds, "storage"
                    )


def _within(
    namespace: str,
    range_name: str,
    what: str,
    value: Any,
    bounds: Mapping[str, Mapping[str, Any]],
    resource: str,
) -> None:
    amount = m.parse_quantity(value)
    maximum = bounds["max"].get(resource)
    minimum = bounds["min"].get(resource)
    if maximum is not None and amount > m.parse_quantity(maximum):
        raise QuotaExceeded(
            f"namespace {namespace}: LimitRange {range_name} allows at most {what} "
            f"{maximum}; this deployment needs {value}",
            details={"limitRange": range_name, "resource": resource, "max": str(maximum)},
        )
    if minimum is not None and amount < m.parse_quantity(minimum):
        raise QuotaExceeded(
            f"namespace {namespace}: LimitRange {range_name} requires at least {what} "
            f"{minimum}; this deployment has {value}",
            details={"limitRange": range_name, "resource": resource, "min": str(minimum)},
        )
