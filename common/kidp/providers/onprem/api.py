"""The Kubernetes API as the provider and the secret store use it: resource
kinds, one call wrapper, error mapping, and the small readers of objects
(labels, selectors, Secret data).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from kidp.errors import (
    BrokerError,
    CloudUnavailable,
    ProvisioningFailed,
    QuotaExceeded,
    TemporaryError,
    ValidationFailed,
)
from kidp.providers.onprem import manifests as m

logger = logging.getLogger(__name__)


IN_CLUSTER = "in-cluster"


# --------------------------------------------------------------------------
# The API: kinds, one call wrapper, error mapping (shared with the secret store)


@dataclass(frozen=True)
class Kind:
    """One Kubernetes resource type as the client addresses it."""

    kind: str
    api_version: str
    plural: str
    #: The typed API's method stem (``stateful_set``); None for custom resources.
    snake: str | None = None

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    def with_version(self, api_version: str) -> Kind:
        return Kind(self.kind, api_version, self.plural, self.snake)


SECRET = Kind("Secret", "v1", "secrets", "secret")
SERVICE = Kind("Service", "v1", "services", "service")
CONFIG_MAP = Kind("ConfigMap", "v1", "configmaps", "config_map")
PVC = Kind("PersistentVolumeClaim", "v1", "persistentvolumeclaims", "persistent_volume_claim")
POD = Kind("Pod", "v1", "pods", "pod")
EVENT = Kind("Event", "v1", "events", "event")
QUOTA = Kind("ResourceQuota", "v1", "resourcequotas", "resource_quota")
LIMIT_RANGE = Kind("LimitRange", "v1", "limitranges", "limit_range")
STATEFUL_SET = Kind("StatefulSet", "apps/v1", "statefulsets", "stateful_set")
DEPLOYMENT = Kind("Deployment", "apps/v1", "deployments", "deployment")
ZALANDO = Kind("postgresql", f"{m.ZALANDO_GROUP}/{m.ZALANDO_VERSION}", m.ZALANDO_PLURAL)
REDIS_FAILOVER = Kind(
    "RedisFailover", f"{m.SPOTAHOME_GROUP}/{m.SPOTAHOME_VERSION}", m.SPOTAHOME_PLURAL
)
KAFKA_TOPIC = Kind("KafkaTopic", f"{m.STRIMZI_GROUP}/v1beta2", m.STRIMZI_TOPIC_PLURAL)
KAFKA = Kind("Kafka", f"{m.STRIMZI_GROUP}/v1beta2", m.STRIMZI_KAFKA_PLURAL)
POD_METRICS = Kind("PodMetrics", "metrics.k8s.io/v1beta1", "pods")

BUILTIN_KINDS: dict[str, Kind] = {
    k.kind: k
    for k in (SECRET, SERVICE, CONFIG_MAP, PVC, POD, EVENT, QUOTA, LIMIT_RANGE, STATEFUL_SET)
}
BUILTIN_KINDS[DEPLOYMENT.kind] = DEPLOYMENT


class AlreadyExists(Exception):
    """A create answered 409 AlreadyExists."""


class Refused(Exception):
    """An answer the caller said it handles (by HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def redact(text: str, secrets: Collection[str]) -> str:
    """``text`` with every secret in ``secrets`` replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def load_api_client(*, kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """A ``kubernetes.client.ApiClient`` and the cluster's name, found as kubectl
    finds it: ``kubeconfig`` (or ``KUBECONFIG``, or ``~/.kube/config``) and its
    ``context``; failing that, the pod's service account when running in a cluster."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    # KUBECONFIG is read now: the kubernetes package fixes its default location
    # when it is first imported, which may be before the variable was set.
    config_file = kubeconfig if kubeconfig is not None else os.environ.get("KUBECONFIG") or None
    try:
        api_client = config.new_client_from_config(config_file=config_file, context=context)
    except (ConfigException, OSError) as kubeconfig_error:
        if kubeconfig is not None or context is not None:
            raise ValidationFailed(
                f"cannot load the Kubernetes configuration "
                f"{kubeconfig or '(default)'}: {kubeconfig_error}"
            ) from None
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException:
            raise ValidationFailed(
                "no Kubernetes configuration: set KUBECONFIG (or ~/.kube/config), "
                "or run the broker in a cluster with a service account"
            ) from None
        return client.ApiClient(configuration), IN_CLUSTER
    name = context
    if name is None:
        try:
            _, active = config.list_kube_config_contexts(config_file=config_file)
            name = str(active.get("name")) if active else None
        except ConfigException:
            name = None
    return api_client, name or "kubernetes"


def _status_message(body: Any) -> tuple[str, str]:
    """(reason, message) of a Kubernetes ``Status`` body, tolerating anything."""
    try:
        status = json.loads(body) if isinstance(body, str | bytes) else body
    except ValueError:
        return "", str(body or "")[:500]
    if not isinstance(status, dict):
        return "", ""
    return str(status.get("reason") or ""), str(status.get("message") or "")


def _retry_after(headers: Any, default: float) -> float:
    try:
        value = headers.get("Retry-After") if headers is not None else None
        return max(float(value), 0.0) if value is not None else default
    except (TypeError, ValueError):
        return default


def _what(kind: Kind, namespace: str, name: str) -> str:
    return f"{kind.kind} {namespace}/{name}"


class KubeApi:
    """The typed APIs of one ``ApiClient``, one call wrapper and the error
    mapping. Every object in and out is a plain wire dict (camelCase keys)."""

    def __init__(
        self,
        api_client: Any,
        *,
        temporary: type[TemporaryError] = CloudUnavailable,
        on_call: Callable[[str, str], None] | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.apis = client.ApisApi(api_client)
        self.core_versions = client.CoreApi(api_client)
        self.temporary = temporary
        self.on_call = on_call
        self.request_timeout = request_timeout

    # --- the one door ------------------------------------------------------

    def call(
        self,
        label: str,
        operation: str,
        fn: Callable[..., Any],
        /,
        *args: Any,
        expect: Collection[int] = (),
        secrets: Collection[str] = (),
        what: str = "",
        **kwargs: Any,
    ) -> Any:
        """Call ``fn`` and return the parsed JSON answer (None when empty).

        ``expect`` lists HTTP statuses the caller handles (raised as
        :class:`Refused`; 409 AlreadyExists on a create as :class:`AlreadyExists`
        when 409 is expected); ``secrets`` are masked out of any message.
        """
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        if self.on_call is not None:
            try:
                self.on_call(label, operation)
            except Exception:
                # A broken metric must not fail a deployment.
                logger.warning("on_call hook failed for %s %s", label, operation, exc_info=True)
        kwargs.setdefault("_request_timeout", self.request_timeout)
        kwargs["_preload_content"] = False
        try:
            response = fn(*args, **kwargs)
        except ApiException as exc:
            reason, message = _status_message(exc.body)
            message = redact(message or str(exc.reason or ""), secrets)
            status = int(exc.status or 0)
            if status in expect:
                if status == 409 and reason == "AlreadyExists":
                    raise AlreadyExists(message) from None
                raise Refused(status, message) from None
            raise self._error(status, reason, message, operation, what, exc.headers) from None
        except (HTTPError, OSError) as exc:
            raise self.temporary(
                f"cannot reach the Kubernetes API for {operation} {what} ({type(exc).__name__})",
                retry_after=30.0,
            ) from None
        raw = response.data
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise self.temporary(
                f"the Kubernetes API answered {operation} {what} with something not JSON",
                retry_after=15.0,
            ) from None

    def _error(
        self,
        status: int,
        reason: str,
        message: str,
        operation: str,
        what: str,
        headers: Any,
    ) -> BrokerError:
        subject = f"{operation} {what}".strip()
        details = {"httpStatus": status, "reason": reason}
        if status == 0:
            return self.temporary(f"Kubernetes API {subject} failed: {message}", retry_after=30.0)
        if status == 429:
            return self.temporary(
                f"the Kubernetes API throttled {subject} (429); retry later",
                retry_after=_retry_after(headers, 5.0),
                details=details,
            )
        if status >= 500:
            return self.temporary(
                f"the Kubernetes API failed {subject} ({status} {reason}): {message}",
                retry_after=_retry_after(headers, 15.0),
                details=details,
            )
        if status == 401:
            return self.temporary(
                f"the Kubernetes API rejected the broker's credentials for {subject} (401)",
                retry_after=60.0,
                details=details,
            )
        if status == 403 and "exceeded quota" in message:
            return QuotaExceeded(f"{subject} refused: {message}", details=details)
        if status == 403 and "being terminated" in message:
            return self.temporary(
                f"{subject}: {message}; retry once the namespace is gone",
                retry_after=15.0,
                details=details,
            )
        if status == 409:
            # A write raced another writer (resourceVersion): read and try again.
            return self.temporary(f"{subject} conflicted: {message}", retry_after=1.0)
        return ProvisioningFailed(
            f"Kubernetes refused {subject} ({status} {reason}): {message}".rstrip(": "),
            details=details,
        )

    # --- generic verbs over kinds ------------------------------------------

    def _typed(self, kind: Kind) -> Any:
        return self.apps if kind.api_version == "apps/v1" else self.core

    def _namespaced(
        self,
        verb: str,
        kind: Kind,
        namespace: str,
        name: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """The client method for ``verb`` (the typed API's: read, create, patch,
        delete, list) on ``kind`` in ``namespace``, and its positional arguments.

        Custom resources go through ``CustomObjectsApi``, addressed by group,
        version and plural (its ``read`` is named ``get``); the typed APIs take
        the name before the namespace. Both differences live here alone, so each
        verb below is a single call whatever the kind.
        """
        operands = () if name is None else (name,)
        if kind.snake is None:
            custom_verb = "get" if verb == "read" else verb
            method = getattr(self.custom, f"{custom_verb}_namespaced_custom_object")
            args: tuple[Any, ...] = (kind.group, kind.version, namespace, kind.plural, *operands)
        else:
            method = getattr(self._typed(kind), f"{verb}_namespaced_{kind.snake}")
            args = (*operands, namespace)
        return method, args if body is None else (*args, body)

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        method, args = self._namespaced("read", kind, namespace, name)
        try:
            found = self.call(
                kind.plural, "get", method, *args, expect=(404,), what=_what(kind, namespace, name)
            )
        except Refused:
            return None
        return dict(found) if isinstance(found, dict) else None

    def create(
        self,
        kind: Kind,
        namespace: str,
        body: dict[str, Any],
        *,
        secrets: Collection[str] = (),
    ) -> dict[str, Any]:
        """Create ``body``; raises :class:`AlreadyExists` on 409."""
        what = _what(kind, namespace, body["metadata"]["name"])
        method, args = self._namespaced("create", kind, namespace, body=body)
        try:
            created = self.call(
                kind.plural, "create", method, *args, expect=(409,), secrets=secrets, what=what
            )
        except Refused as refused:
            raise self.temporary(f"create {what} conflicted: {refused.message}") from None
        return dict(created or {})

    def patch(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        body: dict[str, Any],
        *,
        secrets: Collection[str] = (),
    ) -> dict[str, Any]:
        """JSON merge patch (RFC 7386) of one object."""
        method, args = self._namespaced("patch", kind, namespace, name, body)
        patched = self.call(
            kind.plural,
            "patch",
            method,
            *args,
            secrets=secrets,
            what=_what(kind, namespace, name),
            _content_type="application/merge-patch+json",
        )
        return dict(patched or {})

    def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Delete one object (dependents in the background); False if it was gone."""
        method, args = self._namespaced("delete", kind, namespace, name)
        try:
            self.call(
                kind.plural,
                "delete",
                method,
                *args,
                expect=(404,),
                what=_what(kind, namespace, name),
                propagation_policy="Background",
            )
        except Refused:
            return False
        return True

    def list(
        self,
        kind: Kind,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[dict[str, Any]]:
        """Every object of ``kind`` in ``namespace`` (None: all namespaces), paged."""
        method: Callable[..., Any]
        args: tuple[Any, ...]
        if namespace is not None:
            method, args = self._namespaced("list", kind, namespace)
            what = f"{kind.plural} in {namespace}"
        elif kind.snake is None:
            method = self.custom.list_custom_object_for_all_namespaces
            args = (kind.group, kind.version, kind.plural)
            what = f"{kind.plural} in all namespaces"
        else:
            method = getattr(self._typed(kind), f"list_{kind.snake}_for_all_namespaces")
            args = ()
            what = kind.plural
        params: dict[str, Any] = {"limit": 500}
        if label_selector:
            params["label_selector"] = label_selector
        if field_selector:
            params["field_selector"] = field_selector
        items: builtins.list[dict[str, Any]] = []
        while True:
            page = self.call(kind.plural, "list", method, *args, what=what, **params) or {}
            items.extend(dict(item) for item in page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue") or None
            if not token:
                return items
            params["_continue"] = token

    # --- namespaces ----------------------------------------------------------

    def _read_namespace(self, name: str) -> dict[str, Any] | None:
        try:
            found = self.call(
                "namespaces",
                "get",
                self.core.read_namespace,
                name,
                expect=(404,),
                what=f"Namespace {name}",
            )
        except Refused:
            return None
        return dict(found) if isinstance(found, dict) else None

    def ensure_namespace(self, name: str, labels: Mapping[str, str]) -> bool:
        """Create namespace ``name`` (labelled) unless it exists; True if created."""
        found = self._read_namespace(name)
        if found is not None:
            if (found.get("status") or {}).get("phase") == "Terminating":
                raise self.temporary(
                    f"namespace {name} is being deleted; retry once it is gone", retry_after=15.0
                )
            return False
        body = m.namespace_object(name, labels)
        try:
            self.call(
                "namespaces",
                "create",
                self.core.create_namespace,
                body,
                expect=(409,),
                what=f"Namespace {name}",
            )
        except (AlreadyExists, Refused):
            return False
        logger.info("created namespace %s", name)
        return True

    def namespace_exists(self, name: str) -> bool:
        """True when namespace ``name`` exists (terminating or not)."""
        return self._read_namespace(name) is not None

    # --- discovery -------------------------------------------------------------

    def served_groups(self) -> dict[str, builtins.list[str]]:
        """API group -> served versions (preferred first), from ``/apis``."""
        answer = self.call("discovery", "get", self.apis.get_api_versions, what="/apis") or {}
        groups: dict[str, builtins.list[str]] = {}
        for group in answer.get("groups") or []:
            preferred = (group.get("preferredVersion") or {}).get("version")
            versions = [v.get("version") for v in group.get("versions") or [] if v.get("version")]
            if preferred in versions:
                versions.remove(preferred)
                versions.insert(0, preferred)
            groups[str(group.get("name"))] = [str(v) for v in versions]
        return groups

    def served_plurals(self, group: str, version: str) -> set[str]:
        """The resources ``group/version`` serves (empty when it serves none)."""
        try:
            answer = self.call(
                "discovery",
                "get",
                self.custom.get_api_resources,
                group,
                version,
                expect=(404,),
                what=f"/apis/{group}/{version}",
            )
        except Refused:
            return set()
        return {str(r.get("name")) for r in (answer or {}).get("resources") or []}

    def check(self) -> None:
        """Raise the temporary error unless the API server answers ``/api`` with
        these credentials (``/version`` would answer anonymous callers too)."""
        try:
            self.call("discovery", "get", self.core_versions.get_api_versions, what="/api")
        except TemporaryError:
            raise
        except BrokerError as exc:
            raise self.temporary(f"the Kubernetes API refused /api: {exc.message}") from None


def labels_of(obj: Mapping[str, Any] | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("labels") or {})


def selector_string(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in labels.items())


def decode_secret(obj: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's ``data`` decoded (``stringData`` is folded into ``data`` by the API)."""
    import base64

    values = {
        str(key): base64.b64decode(value).decode("utf-8", errors="replace")
        for key, value in (obj.get("data") or {}).items()
    }
    values.update({str(k): str(v) for k, v in (obj.get("stringData") or {}).items()})
    return values
