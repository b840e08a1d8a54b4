"""A local stand-in for the Kubernetes API server, for tests, the on-prem demo and benchmarks.

No cluster is reachable here (no Docker, no kind), so the on-prem provider is
tested through the real ``kubernetes`` client against this HTTP server. It
speaks the API server's wire protocol for what a broker provider uses, and runs
small simulated controllers so the provider sees realistic status:

    emulator = start_kubernetes_emulator(ready_delay=0.2)
    api = kubernetes.client.AppsV1Api(emulator.api_client())
    ...
    emulator.stop()

or as a separate process (the demo, the benchmark, multi-process scale tests)::

    python -m kidp.kube_emulator --port 0 --kubeconfig /tmp/kubeconfig

which prints the URL once it listens and stops on SIGTERM.

Faithful to the real API server (status codes and ``Status`` bodies included):

- discovery: ``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>``,
  ``/apis/<group>/<version>``, ``/version``; a CustomResourceDefinition created
  through the API makes its group/version/plural served, deleting it stops that
  and removes its objects; metrics.k8s.io appears only while metrics are enabled;
- create (201; 409 AlreadyExists; ``generateName``; uid, resourceVersion from one
  global counter, creationTimestamp, generation; 404 when the namespace does not
  exist, 403 while it terminates), get, list (label selectors ``= == != in notin
  exists !key``; field selectors on the fields the real server supports, 400
  otherwise; all namespaces; ``limit``/``continue``; items of built-in lists
  carry no kind/apiVersion, as on the wire), replace (409 Conflict on a stale
  resourceVersion, no-op writes do not bump it), patch (JSON merge patch, JSON
  patch RFC 6902 with all six operations, strategic merge patch for built-in
  kinds with the list merge keys of the usual fields; 415 for strategic merge
  on custom resources; server-side apply creating or merging), delete (the
  object or a ``Status``; 202 while finalizers hold it; propagationPolicy
  Background/Foreground/Orphan through ownerReferences; preconditions),
  deletecollection, ``status`` and ``scale`` subresources, ``dryRun=All``;
- defaulting and canonical forms as read back from a real cluster: quantities
  (``1024Mi`` reads back ``1Gi``, ``0.5`` CPU reads back ``500m``), container and
  pod defaults (imagePullPolicy, terminationMessagePath, probe thresholds),
  Service clusterIP and target ports, Secret ``stringData`` folded into ``data``,
  StatefulSet and Deployment spec defaults, default storage class on claims;
- validation that answers 422 Invalid: names (RFC 1123 subdomain, label,
  RFC 1035 for Services), label keys and values, required fields of pods,
  workloads, Services and claims, selector vs template labels, requests above
  limits, immutable fields (StatefulSet spec other than replicas/template/...,
  Deployment selector, claims other than a storage increase, Service clusterIP,
  immutable Secrets and ConfigMaps);
- admission: LimitRange defaults and min/max, ResourceQuota ``exceeded quota``
  403 for pods, claims and object counts, also for pods that a controller
  creates (then a ``FailedCreate`` Event on the StatefulSet or ReplicaSet);
- watch (``watch=true|1``, also the old ``/watch/`` paths): chunked
  newline-delimited events, replay since a resourceVersion from a bounded
  history, ``ERROR`` 410 Expired when it is too old, synthetic ADDED events when
  no resourceVersion is given, ADDED/DELETED when an object enters or leaves a
  label selector, BOOKMARK with ``allowWatchBookmarks``, ``timeoutSeconds``;
- controllers: scheduler and kubelet (pods scheduled on one of three nodes,
  Ready after ``ready_delay``, Events Scheduled/Pulling/Pulled/Created/Started),
  StatefulSet (ordered or parallel pods ``<name>-<i>``, claims
  ``<template>-<name>-<i>`` kept on delete and scale-down unless the retention
  policy says Delete, rolling updates from the highest ordinal, status with
  revisions), Deployment with ReplicaSets and ``pod-template-hash``, conditions
  Available/Progressing and ProgressDeadlineExceeded, claims bound with
  capacity and resized, ResourceQuota ``status.used``, garbage collection,
  namespace termination, metrics.k8s.io PodMetrics for running pods;
- operators, once their CRDs are installed: zalando ``postgresql`` (StatefulSet,
  Services ``<name>`` and ``<name>-repl``, credentials Secrets
  ``<user>.<name>.credentials.postgresql.acid.zalan.do``, status
  ``PostgresClusterStatus`` Creating/Running, ``Invalid`` when the name does not
  start with ``<teamId>-``), spotahome ``RedisFailover`` (``rfr-<name>``
  StatefulSet, ``rfs-<name>`` Deployment, Services; the real CRD has no status,
  so neither has this one), Strimzi ``KafkaTopic`` (status Ready once labelled
  ``strimzi.io/cluster``, as the topic operator only handles labelled topics);
- faults: image pull failures (ErrImagePull then ImagePullBackOff, Events
  ``Failed`` "Failed to pull image ..."), unschedulable pods (PodScheduled False
  Unschedulable, Event ``FailedScheduling``), the next N requests answering
  429/500/503, forced Conflicts on one object. Driven from Python or over HTTP
  (``POST /_emulator/faults``) by another process;
- auth: a bearer token is required when one is configured (401 otherwise).

Simplified, on purpose:

- plain HTTP, no TLS; the bearer token is the only authentication; no RBAC;
- strategic merge patch knows the merge keys of common fields only (containers,
  volumes, volumeMounts, env, ports, imagePullSecrets, conditions,
  ownerReferences, ...), other lists are replaced as in a merge patch; apply
  patches merge without field ownership (no managedFields);
- custom resources are not validated against their openAPIV3Schema;
- pods are deleted at once (no grace period); namespace termination removes
  the namespace's objects without waiting for their finalizers; Deployments
  roll by surging the whole new ReplicaSet, then scaling the old ones to zero;
- delete answers the object for pods, Services, namespaces and custom
  resources and a ``Status`` otherwise (the real server decides per resource);
  deletecollection answers the list of deleted objects;
- a list with ``resourceVersion`` always serves the latest state;
- ResourceQuota scopes and scope selectors are ignored; quota is checked on
  create only;
- Events are core/v1 only (no events.k8s.io), aggregated by object, reason and
  message (``count`` goes up) as the kubelet's recorder does;
- no logs, exec, port-forward, evictions, server-side apply conflicts or protobuf.

Client behaviour worth knowing: a 429 carries ``Retry-After: 1`` as on a real
server, and urllib3 under the ``kubernetes`` client honours it by retrying up
to three times on its own; inject more than three 429s, or 503s (sent without
Retry-After), to make a throttling error reach the caller.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import fnmatch
import hashlib
import importlib
import json
import math
import operator
import queue
import random
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from kidp.emulator import EmulatedCloud

__all__ = [
    "DEFAULT_UNSCHEDULABLE_MESSAGE",
    "OPERATOR_CRDS",
    "ApiError",
    "KubeEmulator",
    "ResourceType",
    "main",
    "start_kubernetes_emulator",
]

JSON = dict[str, Any]

DEFAULT_UNSCHEDULABLE_MESSAGE = (
    "0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are available: "
    "3 No preemption victims found for incoming pod."
)
"""What the scheduler says in the FailedScheduling Event and the PodScheduled
condition when a pod does not fit (``make_unschedulable``)."""

NODE_NAMES = ("kidp-node-1", "kidp-node-2", "kidp-node-3")


# --------------------------------------------------------------------------------------
# The public API
# --------------------------------------------------------------------------------------


class KubeEmulator:
    """A running emulated API server; build it with :func:`start_kubernetes_emulator`.

    Everything here is thread-safe. Objects returned by the helpers are copies.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ready_delay: float = 0.2,
        token: str | None = "kidp-test-token",  # noqa: S107 - a test stand-in's default
        metrics: bool = True,
        history_limit: int = 10_000,
        seed: int = 0,
        bookmark_interval: float = 5.0,
        state_file: str | Path | None = None,
    ) -> None:
        self.token = token
        self.state_file = Path(state_file) if state_file else None
        self.cluster = _Cluster(
            ready_delay=ready_delay,
            metrics=metrics,
            history_limit=history_limit,
            seed=seed,
        )
        self.bookmark_interval = bookmark_interval
        if self.state_file is not None and self.state_file.exists():
            self.cluster.restore(json.loads(self.state_file.read_text()))
        self._stopping = threading.Event()
        self._server = _Server((host, port), _Handler)
        self._server.emulator = self
        bound_host, bound_port = self._server.server_address[:2]
        self.host = str(bound_host)
        self.port = int(bound_port)
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="kube-emulator-http",
            daemon=True,
        )
        self._controllers = _Controllers(self.cluster)
        self._controller_thread = threading.Thread(
            target=self._controllers.run,
            args=(self._stopping,),
            name="kube-emulator-controllers",
            daemon=True,
        )

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server's base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    @property
    def ready_delay(self) -> float:
        """Seconds from a pod being scheduled to it being Ready (and operator status)."""
        return self.cluster.ready_delay

    @ready_delay.setter
    def ready_delay(self, value: float) -> None:
        self.cluster.ready_delay = value

    def start(self) -> KubeEmulator:
        """Start serving and the controllers; returns once the socket listens."""
        self._serve_thread.start()
        self._controller_thread.start()
        return self

    def stop(self) -> None:
        """Stop the server, end open watches and the controllers; save ``state_file``."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.cluster.changed.set()
        self._server.shutdown()
        self._server.server_close()
        self._controller_thread.join(timeout=5)
        if self.state_file is not None:
            self.state_file.write_text(json.dumps(self.snapshot()))

    def __enter__(self) -> KubeEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------

    def write_kubeconfig(
        self, path: str | Path, *, context: str = "kidp-emulator", namespace: str = "default"
    ) -> Path:
        """Write a kubeconfig for this server (bearer token user) and return its path.

        ``kubernetes.config.load_kube_config(config_file=path)`` and
        ``kubernetes.config.new_client_from_config(config_file=path)`` load it; so
        does ``KUBECONFIG=path``. The file is JSON, which YAML loaders read.
        """
        user: JSON = {"token": self.token} if self.token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": user}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": context, "user": context, "namespace": namespace},
                }
            ],
            "current-context": context,
            "preferences": {},
        }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(config, indent=2) + "\n")
        return target

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` pointed at this server with its token.

        Typed ``Any`` because the kubernetes client ships no type information.
        """
        k8s = importlib.import_module("kubernetes.client")
        configuration = k8s.Configuration()
        configuration.host = self.url
        if self.token:
            configuration.api_key = {"authorization": f"Bearer {self.token}"}
        return k8s.ApiClient(configuration)

    # -- cluster content -------------------------------------------------------------

    def install_operator_crds(self, *names: str) -> list[str]:
        """Install operator CRDs as ``kubectl apply`` would; returns the CRD names.

        ``names`` are keys of :data:`OPERATOR_CRDS` (``postgresql``,
        ``redisfailover``, ``kafkatopic``) or full CRD names
        (``postgresqls.acid.zalan.do``); none means all three. Installing one
        that exists is a no-op.
        """
        wanted = names or tuple(OPERATOR_CRDS)
        installed: list[str] = []
        for name in wanted:
            manifest = _operator_crd(name)
            crd_name = manifest["metadata"]["name"]
            with self.cluster.lock:
                if self.cluster.get(_CRD_TYPE, "", crd_name) is None:
                    self.cluster.create(_CRD_TYPE, "", copy.deepcopy(manifest))
            installed.append(crd_name)
        return installed

    def create_namespace(self, name: str, *, labels: dict[str, str] | None = None) -> JSON:
        """Create a namespace (no-op when it exists) and return it."""
        with self.cluster.lock:
            existing = self.cluster.get(_type("v1", "namespaces"), "", name)
            if existing is not None:
                return copy.deepcopy(existing)
            body: JSON = {"metadata": {"name": name, "labels": dict(labels or {})}}
            return copy.deepcopy(self.cluster.create(_type("v1", "namespaces"), "", body))

    def create_object(self, manifest: JSON) -> JSON:
        """Create any object from a manifest (``apiVersion``/``kind`` pick the type).

        Goes through the same defaulting, validation and admission as the HTTP
        API and raises :class:`ApiError` the same way; e.g. to seed a
        ResourceQuota or LimitRange in a test.
        """
        rt = self.cluster.type_for_manifest(manifest)
        namespace = (
            manifest.get("metadata", {}).get("namespace", "default") if rt.namespaced else ""
        )
        return copy.deepcopy(self.cluster.create(rt, namespace, copy.deepcopy(manifest)))

    def delete_object(
        self, group_version: str, plural: str, name: str, namespace: str | None = None
    ) -> bool:
        """Delete an object as a person with kubectl would (background propagation).

        Returns False when it did not exist.
        """
        rt = _type(group_version, plural, self.cluster)
        try:
            self.cluster.delete(rt, namespace or "", name, {})
        except ApiError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    def objects(self, group_version: str, plural: str, namespace: str | None = None) -> list[JSON]:
        """Snapshot of stored objects of one type (e.g. ``"apps/v1", "statefulsets"``).

        Sorted by namespace and name; ``namespace=None`` means all namespaces.
        """
        rt = _type(group_version, plural, self.cluster)
        with self.cluster.lock:
            items = self.cluster.select(rt, namespace)
            return copy.deepcopy(items)

    def get_object(
        self, group_version: str, plural: str, name: str, namespace: str | None = None
    ) -> JSON | None:
        """One stored object, or None."""
        rt = _type(group_version, plural, self.cluster)
        with self.cluster.lock:
            obj = self.cluster.get(rt, namespace or "", name)
            return copy.deepcopy(obj) if obj is not None else None

    def events_for(self, name: str, namespace: str) -> list[JSON]:
        """The core v1 Events whose involvedObject is ``name`` in ``namespace``."""
        return [
            e
            for e in self.objects("v1", "events", namespace)
            if e.get("involvedObject", {}).get("name") == name
        ]

    def snapshot(self) -> JSON:
        """Every stored object and the resourceVersion counter, JSON-serialisable."""
        return self.cluster.snapshot()

    # -- faults ----------------------------------------------------------------------

    def fail_images(self, pattern: str) -> None:
        """Pods whose container image matches ``pattern`` (fnmatch glob, e.g.
        ``"postgres:99*"`` or ``"*spilo*"``) fail to pull: the container waits with
        reason ErrImagePull, then ImagePullBackOff, with Warning Events ``Failed``
        ("Failed to pull image ...") on the pod. Running pods are not affected;
        clearing the fault lets waiting pods start."""
        with self.cluster.lock:
            self.cluster.faults.image_patterns.append(pattern)
        self.cluster.changed.set()

    def make_unschedulable(
        self,
        pod_pattern: str = "*",
        *,
        namespace: str | None = None,
        message: str = DEFAULT_UNSCHEDULABLE_MESSAGE,
    ) -> None:
        """Pods not yet scheduled whose name matches ``pod_pattern`` (glob) stay
        Pending with condition PodScheduled False reason Unschedulable and a
        Warning Event ``FailedScheduling`` carrying ``message``."""
        with self.cluster.lock:
            self.cluster.faults.unschedulable.append((pod_pattern, namespace, message))
        self.cluster.changed.set()

    def fail_next(
        self,
        n: int,
        status: int = 503,
        *,
        methods: Iterable[str] | None = None,
        resource: str | None = None,
    ) -> None:
        """The next ``n`` API requests (optionally only these HTTP ``methods`` and
        this resource plural) answer ``status``: 429 TooManyRequests with
        Retry-After, 500 InternalError, 503 ServiceUnavailable, or any other code."""
        with self.cluster.lock:
            self.cluster.faults.fail_next.append(
                _RequestFault(
                    remaining=n,
                    status=status,
                    methods=frozenset(m.upper() for m in methods) if methods else None,
                    resource=resource,
                )
            )

    def inject_conflicts(
        self,
        group_version: str,
        plural: str,
        name: str,
        *,
        namespace: str | None = None,
        count: int = 1,
    ) -> None:
        """The next ``count`` writes (update, patch, delete) of one object answer
        409 Conflict, as when another writer got there first."""
        with self.cluster.lock:
            key = (group_version, plural, namespace or "", name)
            self.cluster.faults.conflicts[key] = count

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        with self.cluster.lock:
            self.cluster.faults = _Faults()
        self.cluster.changed.set()

    def enable_metrics(self, enabled: bool = True) -> None:
        """Serve metrics.k8s.io/v1beta1 (discovery and PodMetrics) or not."""
        with self.cluster.lock:
            self.cluster.metrics_enabled = enabled

    def set_pod_usage(
        self,
        namespace: str,
        pod: str,
        *,
        cpu: str,
        memory: str,
        container: str | None = None,
    ) -> None:
        """Pin the usage PodMetrics reports for a pod (every container, or one).

        By default usage is a fixed share of the container's requests."""
        with self.cluster.lock:
            self.cluster.pod_usage[(namespace, pod, container)] = (cpu, memory)


class _EmulatorOptions(TypedDict, total=False):
    """The keyword options of :class:`KubeEmulator`, named once for what passes them on."""

    ready_delay: float
    token: str | None
    metrics: bool
    history_limit: int
    seed: int
    bookmark_interval: float
    state_file: str | Path | None


def start_kubernetes_emulator(
    host: str = "127.0.0.1", port: int = 0, **options: Unpack[_EmulatorOptions]
) -> KubeEmulator:
    """Start an emulated Kubernetes API server on a thread; returns once it listens.

    ``port=0`` picks a free port (see ``.url``). ``options`` are those of
    :class:`KubeEmulator`, with its defaults. ``token=None`` accepts any
    request; otherwise ``Authorization: Bearer <token>`` is required.
    ``history_limit`` bounds the watch history (older resourceVersions get 410).
    ``state_file``: load objects from it at start when it exists, save at stop.
    """
    return KubeEmulator(host=host, port=port, **options).start()


# --------------------------------------------------------------------------------------
# Resource types
# --------------------------------------------------------------------------------------

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    """One served resource: ``apps/v1`` ``statefulsets`` kind ``StatefulSet``."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    status: bool = False
    scale: bool = False
    custom: bool = False
    verbs: tuple[str, ...] = ALL_VERBS

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group_version, self.plural)

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def resource(self) -> str:
        """``statefulsets.apps`` or ``pods``: how the server names it in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """``StatefulSet.apps`` or ``Pod``: how Invalid messages name it."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


def _rt(gv: str, plural: str, kind: str, **kw: Any) -> ResourceType:
    group, _, version = gv.rpartition("/")
    return ResourceType(group=group, version=version, plural=plural, kind=kind, **kw)


BUILTIN_TYPES: tuple[ResourceType, ...] = (
    _rt("v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",), status=True),
    _rt("v1", "nodes", "Node", namespaced=False, short_names=("no",), status=True),
    _rt("v1", "pods", "Pod", short_names=("po",), status=True),
    _rt("v1", "services", "Service", short_names=("svc",), status=True),
    _rt("v1", "secrets", "Secret"),
    _rt("v1", "configmaps", "ConfigMap", short_names=("cm",)),
    _rt("v1", "events", "Event", short_names=("ev",)),
    _rt("v1", "persistentvolumeclaims", "PersistentVolumeClaim", short_names=("pvc",), status=True),
    _rt("v1", "resourcequotas", "ResourceQuota", short_names=("quota",), status=True),
    _rt("v1", "limitranges", "LimitRange", short_names=("limits",)),
    _rt("v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    _rt("v1", "endpoints", "Endpoints", short_names=("ep",)),
    _rt("apps/v1", "statefulsets", "StatefulSet", short_names=("sts",), status=True, scale=True),
    _rt("apps/v1", "deployments", "Deployment", short_names=("deploy",), status=True, scale=True),
    _rt("apps/v1", "replicasets", "ReplicaSet", short_names=("rs",), status=True, scale=True),
    _rt("batch/v1", "jobs", "Job", status=True),
    _rt("batch/v1", "cronjobs", "CronJob", short_names=("cj",), status=True),
    _rt(
        "policy/v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        short_names=("pdb",),
        status=True,
    ),
    _rt("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", short_names=("netpol",)),
    _rt("networking.k8s.io/v1", "ingresses", "Ingress", short_names=("ing",), status=True),
    _rt("rbac.authorization.k8s.io/v1", "roles", "Role"),
    _rt("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding"),
    _rt("rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", namespaced=False),
    _rt(
        "rbac.authorization.k8s.io/v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        namespaced=False,
    ),
    _rt(
        "apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short_names=("crd", "crds"),
        status=True,
    ),
)

METRICS_TYPES: tuple[ResourceType, ...] = (
    _rt("metrics.k8s.io/v1beta1", "pods", "PodMetrics", verbs=("get", "list")),
    _rt("metrics.k8s.io/v1beta1", "nodes", "NodeMetrics", namespaced=False, verbs=("get", "list")),
)

_BUILTIN_BY_KEY = {rt.key: rt for rt in BUILTIN_TYPES}
_CRD_TYPE = _BUILTIN_BY_KEY[("apiextensions.k8s.io/v1", "customresourcedefinitions")]
_POD = _BUILTIN_BY_KEY[("v1", "pods")]
_PVC = _BUILTIN_BY_KEY[("v1", "persistentvolumeclaims")]
_EVENT = _BUILTIN_BY_KEY[("v1", "events")]
_NAMESPACE = _BUILTIN_BY_KEY[("v1", "namespaces")]
_NODE = _BUILTIN_BY_KEY[("v1", "nodes")]
_SERVICE = _BUILTIN_BY_KEY[("v1", "services")]
_SECRET = _BUILTIN_BY_KEY[("v1", "secrets")]
_QUOTA = _BUILTIN_BY_KEY[("v1", "resourcequotas")]
_LIMITRANGE = _BUILTIN_BY_KEY[("v1", "limitranges")]
_STS = _BUILTIN_BY_KEY[("apps/v1", "statefulsets")]
_DEPLOY = _BUILTIN_BY_KEY[("apps/v1", "deployments")]
_RS = _BUILTIN_BY_KEY[("apps/v1", "replicasets")]
_PDB = _BUILTIN_BY_KEY[("policy/v1", "poddisruptionbudgets")]


def _type(group_version: str, plural: str, cluster: _Cluster | None = None) -> ResourceType:
    """The served type for ``(group_version, plural)``; KeyError when unknown."""
    if cluster is not None:
        with cluster.lock:
            found = cluster.types.get((group_version, plural))
        if found is not None:
            return found
    try:
        return _BUILTIN_BY_KEY[(group_version, plural)]
    except KeyError:
        raise KeyError(f"{plural} is not served in {group_version}") from None


def _crd_manifest(
    *,
    group: str,
    plural: str,
    kind: str,
    versions: tuple[str, ...],
    short_names: list[str],
    categories: list[str],
    status: bool,
) -> JSON:
    version_list: list[JSON] = []
    for index, version in enumerate(versions):
        entry: JSON = {
            "name": version,
            "served": True,
            "storage": index == 0,
            "schema": {
                "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            },
        }
        if status:
            entry["subresources"] = {"status": {}}
        version_list.append(entry)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": categories,
            },
            "scope": "Namespaced",
            "versions": version_list,
        },
    }


OPERATOR_CRDS: dict[str, JSON] = {
    # zalando postgres-operator: acid.zalan.do/v1 postgresql, status subresource.
    "postgresql": _crd_manifest(
        group="acid.zalan.do",
        plural="postgresqls",
        kind="postgresql",
        versions=("v1",),
        short_names=["pg"],
        categories=["all"],
        status=True,
    ),
    # spotahome redis-operator: databases.spotahome.com/v1 RedisFailover, no status.
    "redisfailover": _crd_manifest(
        group="databases.spotahome.com",
        plural="redisfailovers",
        kind="RedisFailover",
        versions=("v1",),
        short_names=["rf"],
        categories=[],
        status=False,
    ),
    # Strimzi: kafka.strimzi.io/v1beta2 KafkaTopic, status subresource.
    "kafkatopic": _crd_manifest(
        group="kafka.strimzi.io",
        plural="kafkatopics",
        kind="KafkaTopic",
        versions=("v1beta2",),
        short_names=["kt"],
        categories=["strimzi"],
        status=True,
    ),
}
"""The operator CRDs :meth:`KubeEmulator.install_operator_crds` installs, by key."""


def _operator_crd(name: str) -> JSON:
    if name in OPERATOR_CRDS:
        return OPERATOR_CRDS[name]
    for manifest in OPERATOR_CRDS.values():
        if manifest["metadata"]["name"] == name:
            return manifest
    raise KeyError(f"unknown operator CRD {name!r}; known: {', '.join(OPERATOR_CRDS)}")


def _types_from_crd(crd: JSON) -> list[ResourceType]:
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    found: list[ResourceType] = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        found.append(
            ResourceType(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=tuple(names.get("shortNames", []) or []),
                status="status" in (version.get("subresources") or {}),
                scale="scale" in (version.get("subresources") or {}),
                custom=True,
            )
        )
    return found


# --------------------------------------------------------------------------------------
# Errors: the API server's Status objects
# --------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the API server refuses; rendered as a ``Status`` object."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: JSON | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> JSON:
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details:
            body["details"] = self.details
        body["code"] = self.code
        return body


def _details(rt: ResourceType, name: str, kind: str | None = None) -> JSON:
    details: JSON = {"name": name}
    if rt.group:
        details["group"] = rt.group
    details["kind"] = kind or rt.plural
    return details


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.resource} "{name}" not found', _details(rt, name))


def _namespace_not_found(name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'namespaces "{name}" not found', {"name": name, "kind": "namespaces"}
    )


def _already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        409, "AlreadyExists", f'{rt.resource} "{name}" already exists', _details(rt, name)
    )


def _conflict(rt: ResourceType, name: str, why: str | None = None) -> ApiError:
    why = why or (
        "the object has been modified; please apply your changes to the latest version "
        "and try again"
    )
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rt.resource} "{name}": {why}',
        _details(rt, name),
    )


def _forbidden(rt: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(
        403, "Forbidden", f'{rt.resource} "{name}" is forbidden: {why}', _details(rt, name)
    )


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _not_served() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _method_not_allowed() -> ApiError:
    return ApiError(
        405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
    )


def _expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


@dataclass
class _Cause:
    field: str
    reason: str  # FieldValueRequired, FieldValueInvalid, FieldValueForbidden, ...
    message: str

    def text(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def _required(path: str, detail: str = "") -> _Cause:
    return _Cause(path, "FieldValueRequired", "Required value" + (f": {detail}" if detail else ""))


def _invalid_value(path: str, value: Any, detail: str) -> _Cause:
    rendered = json.dumps(value) if isinstance(value, str) else _go_repr(value)
    return _Cause(path, "FieldValueInvalid", f"Invalid value: {rendered}: {detail}")


def _forbidden_field(path: str, detail: str) -> _Cause:
    return _Cause(path, "FieldValueForbidden", f"Forbidden: {detail}")


def _go_repr(value: Any) -> str:
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        inner = ", ".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in value.items())
        return f"map[string]string{{{inner}}}"
    return json.dumps(value, sort_keys=True)


def _invalid(rt: ResourceType, name: str, causes: list[_Cause]) -> ApiError:
    texts = [c.text() for c in causes]
    summary = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details = _details(rt, name, kind=rt.kind)
    details["causes"] = [
        {"reason": c.reason, "message": c.message, "field": c.field} for c in causes
    ]
    return ApiError(422, "Invalid", f'{rt.qualified_kind} "{name}" is invalid: {summary}', details)


def _fault_error(status: int) -> ApiError:
    if status == 429:
        return ApiError(
            429,
            "TooManyRequests",
            "Too many requests, please try again later.",
            {"retryAfterSeconds": 1},
            headers={"Retry-After": "1"},
        )
    if status == 500:
        return ApiError(
            500,
            "InternalError",
            "Internal error occurred: emulated fault",
            {"causes": [{"message": "emulated fault"}]},
        )
    if status == 503:
        return ApiError(
            503, "ServiceUnavailable", "the server is currently unable to handle the request"
        )
    if status == 504:
        return ApiError(
            504, "Timeout", "the server was unable to return a response in the time allotted"
        )
    return ApiError(status, "InternalError", f"emulated fault {status}")


# --------------------------------------------------------------------------------------
# Label and field selectors
# --------------------------------------------------------------------------------------

_LABEL_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_NAME_RE = re.compile(rf"^{_LABEL_NAME}$")
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL_RE = re.compile(rf"^{_DNS1123_LABEL}$")
_DNS1123_SUBDOMAIN = rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*"
_DNS1123_SUBDOMAIN_RE = re.compile(rf"^{_DNS1123_SUBDOMAIN}$")
_DNS1035_LABEL_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
_QUALIFIED_NAME_MSG = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and "
    "end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex "
    "used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_DNS1035_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with "
    "an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)


def _qualified_name_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label/annotation key, or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN_RE.match(prefix)):
        return "prefix part " + _SUBDOMAIN_MSG
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _LABEL_NAME_RE.match(name):
        return _QUALIFIED_NAME_MSG
    return None


def _label_value_problem(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if value and not _LABEL_NAME_RE.match(value):
        return _LABEL_VALUE_MSG
    return None


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value in self.values
        if self.op == "!=":
            return not present or value not in self.values
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


_SET_RE = re.compile(r"^(\S+?)\s+(in|notin)\s*\((.*)\)$")
_EQ_RE = re.compile(r"^([^=!\s]+)\s*(==|!=|=)\s*(.*)$")


def parse_label_selector(text: str | None) -> list[_Requirement]:
    """Parse a label selector string as the API server does; 400 when malformed."""
    if not text:
        return []
    requirements: list[_Requirement] = []
    for term in _split_top_level(text):
        if term.startswith("!"):
            requirement = _Requirement(term[1:].strip(), "!")
        elif match := _SET_RE.match(term):
            values = frozenset(v.strip() for v in match.group(3).split(",") if v.strip())
            requirement = _Requirement(match.group(1), match.group(2), values)
            for value in values:
                if _label_value_problem(value):
                    raise _bad_request(
                        f"unable to parse requirement: values[0][{match.group(1)}]: Invalid "
                        f'value: "{value}": {_LABEL_VALUE_MSG}'
                    )
        elif match := _EQ_RE.match(term):
            op = "!=" if match.group(2) == "!=" else "="
            value = match.group(3).strip()
            if _label_value_problem(value):
                raise _bad_request(
                    f"unable to parse requirement: values[0][{match.group(1)}]: Invalid "
                    f'value: "{value}": {_LABEL_VALUE_MSG}'
                )
            requirement = _Requirement(match.group(1), op, frozenset({value}))
        else:
            requirement = _Requirement(term, "exists")
        problem = _qualified_name_problem(requirement.key)
        if problem or " " in requirement.key:
            raise _bad_request(
                f'unable to parse requirement: key: Invalid value: "{requirement.key}": '
                f"{problem or _QUALIFIED_NAME_MSG}"
            )
        requirements.append(requirement)
    return requirements


def _labels_of(obj: JSON) -> dict[str, str]:
    labels = obj.get("metadata", {}).get("labels")
    return labels if isinstance(labels, dict) else {}


def labels_match(requirements: list[_Requirement], obj: JSON) -> bool:
    labels = _labels_of(obj)
    return all(r.matches(labels) for r in requirements)


def selector_matches(selector: JSON | None, labels: dict[str, str]) -> bool:
    """A ``LabelSelector`` object (matchLabels/matchExpressions) against labels.

    An empty selector matches everything, as in a workload's selector."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key = expr.get("key", "")
        op = expr.get("operator", "")
        values = set(expr.get("values") or [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _selector_string(selector: JSON | None) -> str:
    if not selector:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        op = expr.get("operator")
        values = ",".join(sorted(expr.get("values") or []))
        if op == "In":
            parts.append(f"{expr['key']} in ({values})")
        elif op == "NotIn":
            parts.append(f"{expr['key']} notin ({values})")
        elif op == "Exists":
            parts.append(expr["key"])
        elif op == "DoesNotExist":
            parts.append(f"!{expr['key']}")
    return ",".join(parts)


_FIELD_LABELS: dict[tuple[str, str], frozenset[str]] = {
    ("v1", "pods"): frozenset(
        {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.podIPs",
            "status.nominatedNodeName",
        }
    ),
    ("v1", "events"): frozenset(
        {
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        }
    ),
    ("v1", "secrets"): frozenset({"type"}),
    ("v1", "namespaces"): frozenset({"status.phase"}),
    ("v1", "nodes"): frozenset({"spec.unschedulable"}),
    ("apps/v1", "replicasets"): frozenset({"status.replicas"}),
}


@dataclass(frozen=True)
class _FieldRequirement:
    path: str
    value: str
    negate: bool

    def matches(self, obj: JSON) -> bool:
        return (_field_value(obj, self.path) == self.value) != self.negate


def _field_value(obj: JSON, path: str) -> str:
    if path == "source":
        path = "source.component"
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, dict):
            return ""
        current = current.get(part)
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


def parse_field_selector(text: str | None, rt: ResourceType) -> list[_FieldRequirement]:
    """Parse a field selector; 400 for fields the real server does not index."""
    if not text:
        return []
    allowed = {"metadata.name", "metadata.namespace"} | _FIELD_LABELS.get(rt.key, frozenset())
    found: list[_FieldRequirement] = []
    for term in _split_top_level(text):
        match = _EQ_RE.match(term)
        if not match:
            raise _bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        path, op, value = match.group(1), match.group(2), match.group(3).strip()
        if path not in allowed:
            raise _bad_request(f"field label not supported: {path}")
        found.append(_FieldRequirement(path, value, op == "!="))
    return found


# --------------------------------------------------------------------------------------
# Quantities
# --------------------------------------------------------------------------------------

_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES: dict[str, Fraction] = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_QUANTITY_RE = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?$"
)


def parse_quantity(value: str | int | float) -> Fraction:
    """A Kubernetes quantity (``500m``, ``1Gi``, ``2``, ``1e3``) as an exact number."""
    if isinstance(value, bool):
        raise ValueError(f"quantities are not booleans: {value!r}")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(str(value))
    match = _QUANTITY_RE.match(value.strip())
    if not match:
        raise ValueError(
            f"quantities must match the regular expression "
            f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {value!r}"
        )
    number = Fraction(match.group(1))
    if match.group(2):
        return number * Fraction(10) ** int(match.group(2)[1:])
    suffix = match.group(3) or ""
    if suffix in _BINARY_SUFFIXES:
        return number * _BINARY_SUFFIXES[suffix]
    return number * _DECIMAL_SUFFIXES[suffix]


def _is_binary(value: str | int | float) -> bool:
    return isinstance(value, str) and value.strip()[-2:] in _BINARY_SUFFIXES


def format_quantity(value: Fraction, *, binary: bool) -> str:
    """The canonical form the API server writes back (``1Gi``, ``500m``, ``2k``)."""
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    value = abs(value)
    if binary and value.denominator == 1 and value >= 1024:
        for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
            mult = _BINARY_SUFFIXES[suffix]
            if value % mult == 0:
                return f"{sign}{value // mult}{suffix}"
        return f"{sign}{value.numerator}"
    if binary and value.denominator == 1:
        return f"{sign}{value.numerator}"
    for suffix in ("E", "P", "T", "G", "M", "k", "", "m", "u", "n"):
        mantissa = value / _DECIMAL_SUFFIXES[suffix]
        if mantissa.denominator == 1:
            return f"{sign}{mantissa.numerator}{suffix}"
    return f"{sign}{math.ceil(value * 10**9)}n"


def canonical_quantity(value: str | int | float) -> str:
    """``parse_quantity`` then ``format_quantity`` in the input's own format."""
    return format_quantity(parse_quantity(value), binary=_is_binary(value))


# --------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new document."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: JSON = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# patchMergeKey of the list fields a provider patches (from the API's Go struct tags).
_MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "env": ("name",),
    "ports": ("containerPort", "port"),
    "imagePullSecrets": ("name",),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "hostAliases": ("ip",),
    "topologySpreadConstraints": ("topologyKey",),
    "secrets": ("name",),
    "subsets": (),
}
_MERGED_PRIMITIVE_LISTS = {"finalizers"}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A strategic merge patch for built-in kinds (see the module docstring)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result: JSON = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            if isinstance(result.get(name), list):
                result[name] = [v for v in result[name] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = copy.deepcopy(value)
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(name: str, current: list[Any], patch: list[Any]) -> list[Any]:
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and "$patch" in i)]
    if name in _MERGED_PRIMITIVE_LISTS:
        merged = list(current)
        merged.extend(v for v in patch if v not in merged)
        return merged
    keys = _MERGE_KEYS.get(name)
    if not keys or not all(isinstance(i, dict) for i in patch + current):
        return copy.deepcopy(patch)
    result = copy.deepcopy(current)
    for item in patch:
        key = next((k for k in keys if k in item), None)
        if key is None:
            result.append(copy.deepcopy(item))
            continue
        index = next((i for i, e in enumerate(result) if e.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
            continue
        if index is None:
            result.append(copy.deepcopy(item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


class _JsonPatchError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _JsonPatchError(f"path {path!r} does not start with a slash")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    """The value at ``parts`` inside ``doc``; ``path`` names the whole pointer in errors."""
    current = doc
    for part in parts:
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise _JsonPatchError(f"doc is missing path: {path!r}")
    return current


def _list_index(target: list[Any], part: str, path: str, *, insert: bool) -> int:
    if part == "-" and insert:
        return len(target)
    if not part.isdigit():
        raise _JsonPatchError(f"invalid array index in path {path!r}")
    index = int(part)
    if index > len(target) or (index == len(target) and not insert):
        raise _JsonPatchError(f"index out of bounds in path {path!r}")
    return index


def _get_path(doc: Any, path: str) -> Any:
    return _walk(doc, _pointer(path), path)


def _remove_path(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        raise _JsonPatchError("cannot remove the whole document")
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _JsonPatchError(f"unable to remove nonexistent key: {last}: missing value")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_list_index(parent, last, path, insert=False))
    raise _JsonPatchError(f"doc is missing path: {path!r}")


def _add_path(doc: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_list_index(parent, last, path, insert=True), value)
    else:
        raise _JsonPatchError(f"doc is missing path: {path!r}")
    return doc


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    if not isinstance(operations, list):
        raise _JsonPatchError("a JSON patch must be a list of operations")
    result = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise _JsonPatchError(f"invalid operation {op!r}")
        kind, path = op["op"], op["path"]
        if kind == "add":
            result = _add_path(result, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _remove_path(result, path)
        elif kind == "replace":
            if not _pointer(path):
                result = copy.deepcopy(op.get("value"))
                continue
            _get_path(result, path)
            parts = _pointer(path)
            parent = _walk(result, parts[:-1], path)
            if isinstance(parent, list):
                parent[_list_index(parent, parts[-1], path, insert=False)] = copy.deepcopy(
                    op.get("value")
                )
            else:
                parent[parts[-1]] = copy.deepcopy(op.get("value"))
        elif kind == "move":
            value = _remove_path(result, op["from"])
            result = _add_path(result, path, value)
        elif kind == "copy":
            result = _add_path(result, path, copy.deepcopy(_get_path(result, op["from"])))
        elif kind == "test":
            if _get_path(result, path) != op.get("value"):
                raise _JsonPatchError(f"testing value {path} failed")
        else:
            raise _JsonPatchError(f"Unexpected kind: {kind}")
    return result


def _apply_patch(media_type: str, target: Any, patch: Any, *, strategic: bool) -> Any:
    """``patch`` applied to ``target`` as its media type says; a merge patch otherwise.

    ``strategic`` says whether a strategic merge patch is honoured as one (the
    Scale subresource here reads it as a merge patch). A patch that does not
    apply is 422 Invalid, as on the real server.
    """
    try:
        if media_type == "application/json-patch+json":
            return json_patch(target, patch)
        if strategic and media_type == "application/strategic-merge-patch+json":
            return strategic_merge_patch(target, patch)
        return merge_patch(target, patch)
    except _JsonPatchError as exc:
        raise ApiError(422, "Invalid", str(exc)) from None


# --------------------------------------------------------------------------------------
# Faults and watches
# --------------------------------------------------------------------------------------


@dataclass
class _RequestFault:
    remaining: int
    status: int
    methods: frozenset[str] | None = None
    resource: str | None = None


@dataclass
class _Faults:
    image_patterns: list[str] = field(default_factory=list)
    unschedulable: list[tuple[str, str | None, str]] = field(default_factory=list)
    fail_next: list[_RequestFault] = field(default_factory=list)
    conflicts: dict[tuple[str, str, str, str], int] = field(default_factory=dict)

    def image_fails(self, image: str) -> bool:
        return any(fnmatch.fnmatchcase(image, p) for p in self.image_patterns)

    def unschedulable_message(self, namespace: str, name: str) -> str | None:
        for pattern, ns, message in self.unschedulable:
            if (ns is None or ns == namespace) and fnmatch.fnmatchcase(name, pattern):
                return message
        return None

    def take_request_fault(self, method: str, resource: str | None) -> int | None:
        for fault in self.fail_next:
            if fault.remaining <= 0:
                continue
            if fault.methods is not None and method not in fault.methods:
                continue
            if fault.resource is not None and fault.resource != resource:
                continue
            fault.remaining -= 1
            return fault.status
        self.fail_next = [f for f in self.fail_next if f.remaining > 0]
        return None

    def take_conflict(self, rt: ResourceType, namespace: str, name: str) -> bool:
        key = (rt.group_version, rt.plural, namespace, name)
        left = self.conflicts.get(key, 0)
        if left <= 0:
            return False
        self.conflicts[key] = left - 1
        return True

    def describe(self) -> JSON:
        return {
            "failImages": list(self.image_patterns),
            "unschedulable": [
                {"pattern": p, "namespace": ns, "message": m} for p, ns, m in self.unschedulable
            ],
            "failNext": [
                {
                    "count": f.remaining,
                    "status": f.status,
                    "methods": sorted(f.methods) if f.methods else None,
                    "resource": f.resource,
                }
                for f in self.fail_next
                if f.remaining > 0
            ],
            "conflicts": [
                {"groupVersion": k[0], "plural": k[1], "namespace": k[2], "name": k[3], "count": v}
                for k, v in self.conflicts.items()
                if v > 0
            ],
        }


@dataclass
class _Event:
    rv: int
    key: tuple[str, str]
    namespace: str
    type: str
    obj: JSON
    prev: JSON | None
    text: str


class _Watcher:
    """One open watch: events are queued under the cluster lock, rendered by the
    request thread (label selector transitions become ADDED/DELETED)."""

    def __init__(
        self,
        rt: ResourceType,
        namespace: str | None,
        labels: list[_Requirement],
        fields: list[_FieldRequirement],
    ) -> None:
        self.rt = rt
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.queue: queue.SimpleQueue[_Event] = queue.SimpleQueue()

    def wants(self, event: _Event) -> bool:
        return event.key == self.rt.key and (
            self.namespace is None or event.namespace == self.namespace
        )

    def matches(self, obj: JSON) -> bool:
        return labels_match(self.labels, obj) and all(f.matches(obj) for f in self.fields)

    def render(self, event: _Event) -> str | None:
        now = self.matches(event.obj)
        if event.type == "MODIFIED":
            before = event.prev is not None and self.matches(event.prev)
            if now and before:
                kind = "MODIFIED"
            elif now:
                kind = "ADDED"
            elif before:
                kind = "DELETED"
            else:
                return None
        elif now:
            kind = event.type
        else:
            return None
        return _watch_line(kind, event.text)


def _watch_line(kind: str, text: str) -> str:
    return f'{{"type":"{kind}","object":{text}}}\n'


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: JSON) -> JSON:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
        obj["metadata"] = meta
    return meta


def _name(obj: JSON) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def _ns(obj: JSON) -> str:
    return str(obj.get("metadata", {}).get("namespace", ""))


def _uid(obj: JSON) -> str:
    return str(obj.get("metadata", {}).get("uid", ""))


def _spec_part(obj: JSON) -> JSON:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def _without_rv(obj: JSON) -> JSON:
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


_INITIAL_STATUS: dict[tuple[str, str], JSON] = {
    ("apps/v1", "statefulsets"): {"replicas": 0, "availableReplicas": 0},
    ("apps/v1", "replicasets"): {"replicas": 0},
    ("policy/v1", "poddisruptionbudgets"): {
        "disruptionsAllowed": 0,
        "currentHealthy": 0,
        "desiredHealthy": 0,
        "expectedPods": 0,
    },
    ("networking.k8s.io/v1", "ingresses"): {"loadBalancer": {}},
}
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_GENERATION_GROUPS = {"apps", "batch", "policy", "networking.k8s.io", "apiextensions.k8s.io"}
_RETURNS_OBJECT_ON_DELETE = {("v1", "pods"), ("v1", "services"), ("v1", "namespaces")}


# --------------------------------------------------------------------------------------
# The cluster: storage, CRUD, defaulting, validation, admission
# --------------------------------------------------------------------------------------


class _Cluster:
    def __init__(self, *, ready_delay: float, metrics: bool, history_limit: int, seed: int) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Event()
        self.ready_delay = ready_delay
        self.metrics_enabled = metrics
        self.types: dict[tuple[str, str], ResourceType] = {rt.key: rt for rt in BUILTIN_TYPES}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], JSON]] = {}
        self.by_uid: dict[str, tuple[ResourceType, str, str]] = {}
        self.rv = 1000
        self.history: deque[_Event] = deque(maxlen=max(1, history_limit))
        self.history_floor = self.rv
        self.watchers: set[_Watcher] = set()
        self.faults = _Faults()
        self.pod_usage: dict[tuple[str, str, str | None], tuple[str, str]] = {}
        self.rng = random.Random(seed)  # noqa: S311 - deterministic names, not secrets
        self.born: dict[str, float] = {}
        self.ip_seq = 0
        self.event_seq = 0
        self._bootstrap()

    # -- storage -------------------------------------------------------------------------

    def _bootstrap(self) -> None:
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(_NAMESPACE, "", {"metadata": {"name": name}})
        for index, name in enumerate(NODE_NAMES):
            node: JSON = {
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "topology.kubernetes.io/zone": f"zone-{'abc'[index]}",
                    },
                },
                "spec": {"podCIDR": f"10.244.{index}.0/24"},
            }
            created = self.create(_NODE, "", node)
            status = {
                "capacity": {
                    "cpu": "4",
                    "memory": "16Gi",
                    "pods": "110",
                    "ephemeral-storage": "100Gi",
                },
                "allocatable": {
                    "cpu": "3800m",
                    "memory": "15Gi",
                    "pods": "110",
                    "ephemeral-storage": "95Gi",
                },
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": f"172.18.0.{index + 2}"},
                    {"type": "Hostname", "address": name},
                ],
                "nodeInfo": {
                    "kubeletVersion": "v1.30.0",
                    "containerRuntimeVersion": "containerd://1.7.15",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            }
            self.put(_NODE, {**created, "status": status}, created)

    def bucket(self, rt: ResourceType) -> dict[tuple[str, str], JSON]:
        return self.objects.setdefault(rt.key, {})

    def get(self, rt: ResourceType, namespace: str, name: str) -> JSON | None:
        return self.objects.get(rt.key, {}).get((namespace if rt.namespaced else "", name))

    def select(
        self,
        rt: ResourceType,
        namespace: str | None = None,
        labels: list[_Requirement] | None = None,
        fields: list[_FieldRequirement] | None = None,
    ) -> list[JSON]:
        bucket = self.objects.get(rt.key, {})
        found = []
        for key, obj in bucket.items():
            if namespace and key[0] != namespace:
                continue
            if labels and not labels_match(labels, obj):
                continue
            if fields and not all(f.matches(obj) for f in fields):
                continue
            found.append((key, obj))
        found.sort(key=lambda item: item[0])
        return [obj for _, obj in found]

    def stored(self) -> Iterator[tuple[ResourceType, JSON]]:
        """Every stored object of a served type, from a copy of the store taken per
        type, so that the caller may remove objects as it goes."""
        for key, bucket in list(self.objects.items()):
            rt = self.types.get(key)
            if rt is not None:
                yield from ((rt, obj) for obj in list(bucket.values()))

    def lookup_uid(self, uid: str) -> JSON | None:
        found = self.by_uid.get(uid)
        if found is None:
            return None
        return self.get(*found)

    def put(self, rt: ResourceType, obj: JSON, prev: JSON | None) -> JSON:
        """Store ``obj`` (a fresh dict, never mutated afterwards) and emit its event."""
        return self._commit(rt, obj, "ADDED" if prev is None else "MODIFIED", prev)

    def remove(self, rt: ResourceType, obj: JSON) -> JSON:
        final = copy.deepcopy(obj)
        return self._commit(rt, final, "DELETED", obj)

    def _commit(self, rt: ResourceType, obj: JSON, kind: str, prev: JSON | None) -> JSON:
        self.rv += 1
        meta = _meta(obj)
        meta["resourceVersion"] = str(self.rv)
        obj.setdefault("apiVersion", rt.group_version)
        obj.setdefault("kind", rt.kind)
        key = (meta.get("namespace", "") if rt.namespaced else "", meta["name"])
        bucket = self.bucket(rt)
        uid = meta.get("uid", "")
        if kind == "DELETED":
            bucket.pop(key, None)
            self.by_uid.pop(uid, None)
            self.born.pop(uid, None)
        else:
            bucket[key] = obj
            self.by_uid[uid] = (rt, key[0], key[1])
            self.born.setdefault(uid, time.monotonic())
        event = _Event(
            rv=self.rv,
            key=rt.key,
            namespace=key[0],
            type=kind,
            obj=obj,
            prev=prev if kind == "MODIFIED" else None,
            text=json.dumps(obj, separators=(",", ":")),
        )
        if len(self.history) == self.history.maxlen:
            self.history_floor = self.history[0].rv
        self.history.append(event)
        for watcher in self.watchers:
            if watcher.wants(event):
                watcher.queue.put(event)
        self.changed.set()
        return obj

    def type_for_manifest(self, manifest: JSON) -> ResourceType:
        api_version = manifest.get("apiVersion", "")
        kind = manifest.get("kind", "")
        with self.lock:
            for rt in self.types.values():
                if rt.group_version == api_version and rt.kind == kind:
                    return rt
        raise _bad_request(f'no matches for kind "{kind}" in version "{api_version}"')

    def snapshot(self) -> JSON:
        with self.lock:
            items = []
            order = sorted(self.objects, key=lambda k: (k != _CRD_TYPE.key, k))
            for key in order:
                for obj in self.select(self.types.get(key) or _type(*key)):
                    items.append({"groupVersion": key[0], "plural": key[1], "object": obj})
            return copy.deepcopy({"resourceVersion": self.rv, "objects": items})

    def restore(self, data: JSON) -> None:
        with self.lock:
            self.objects.clear()
            self.by_uid.clear()
            for item in data.get("objects", []):
                obj = item["object"]
                key = (item["groupVersion"], item["plural"])
                if key == _CRD_TYPE.key:
                    for rt in _types_from_crd(obj):
                        self.types.setdefault(rt.key, rt)
                rt = self.types[key]
                ns = obj["metadata"].get("namespace", "") if rt.namespaced else ""
                self.bucket(rt)[(ns, obj["metadata"]["name"])] = obj
                self.by_uid[_uid(obj)] = (rt, ns, obj["metadata"]["name"])
                self.born[_uid(obj)] = time.monotonic()
            self.rv = int(data.get("resourceVersion", self.rv))
            self.history.clear()
            self.history_floor = self.rv
            self.changed.set()

    # -- helpers -------------------------------------------------------------------------

    def generate_name(self, prefix: str) -> str:
        return prefix + "".join(self.rng.choice(_GENERATE_ALPHABET) for _ in range(5))

    def next_ip(self, base: str) -> str:
        self.ip_seq += 1
        return f"{base}.{(self.ip_seq // 250) % 250}.{self.ip_seq % 250 + 2}"

    def _check_type_meta(self, rt: ResourceType, body: JSON) -> None:
        api_version = body.get("apiVersion")
        kind = body.get("kind")
        if rt.custom and (not api_version or not kind):
            missing = "Kind" if not kind else "APIVersion"
            raise _bad_request(f"Object '{missing}' is missing in '{json.dumps(body)[:200]}'")
        if api_version and api_version != rt.group_version:
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({rt.group_version})"
            )
        if kind and kind != rt.kind:
            raise _bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        body["apiVersion"] = rt.group_version
        body["kind"] = rt.kind

    # -- verbs ---------------------------------------------------------------------------

    def create(self, rt: ResourceType, namespace: str, body: Any, *, dry_run: bool = False) -> JSON:
        if not isinstance(body, dict):
            raise _bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled: not an object'
            )
        with self.lock:
            self._check_type_meta(rt, body)
            meta = _meta(body)
            if rt.namespaced:
                if meta.get("namespace") and meta["namespace"] != namespace:
                    raise _bad_request(
                        "the namespace of the provided object does not match the namespace "
                        "sent on the request"
                    )
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                for _ in range(10):
                    meta["name"] = self.generate_name(str(meta["generateName"]))
                    if self.get(rt, namespace, meta["name"]) is None:
                        break
            name = str(meta.get("name") or "")
            if not name:
                raise _invalid(
                    rt, "", [_required("metadata.name", "name or generateName is required")]
                )
            if rt.namespaced:
                ns_obj = self.get(_NAMESPACE, "", namespace)
                if ns_obj is None:
                    raise _namespace_not_found(namespace)
                if ns_obj["metadata"].get("deletionTimestamp"):
                    raise _forbidden(
                        rt,
                        name,
                        f"unable to create new content in namespace {namespace} because it is "
                        "being terminated",
                    )
            if self.get(rt, namespace, name) is not None:
                raise _already_exists(rt, name)
            for key in (
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "managedFields",
                "selfLink",
            ):
                meta.pop(key, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            if rt.custom or rt.group in _GENERATION_GROUPS:
                meta["generation"] = 1
            if rt.status:
                body.pop("status", None)
            self._default(rt, body, None)
            causes = self._validate(rt, body, None)
            if causes:
                raise _invalid(rt, name, causes)
            if rt.namespaced:
                self._admit(rt, body)
            if rt is _CRD_TYPE:
                self._accept_crd(body)
            if dry_run:
                meta.pop("uid", None)
                return body
            created = self.put(rt, body, None)
            if rt is _CRD_TYPE:
                for served in _types_from_crd(created):
                    if served.key not in _BUILTIN_BY_KEY:
                        self.types[served.key] = served
            return created

    def replace(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        body: Any,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> JSON:
        if not isinstance(body, dict):
            raise _bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled: not an object'
            )
        with self.lock:
            current = self.get(rt, namespace, name)
            if current is None:
                raise _not_found(rt, name)
            self._check_type_meta(rt, body)
            meta = _meta(body)
            if meta.get("name") and meta["name"] != name:
                raise _bad_request(
                    f"the name of the object ({meta['name']}) does not match the name on the "
                    f"URL ({name})"
                )
            if rt.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request"
                )
            if self.faults.take_conflict(rt, namespace, name):
                raise _conflict(rt, name)
            wanted = meta.get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise _conflict(rt, name)
            return self._update(rt, current, body, subresource, dry_run)

    def patch(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        raw: bytes,
        content_type: str,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        field_manager: str | None = None,
    ) -> tuple[JSON, bool]:
        """Apply a patch; returns the object and whether it was created (apply)."""
        kind = content_type.split(";", maxsplit=1)[0].strip().lower()
        accepted = [
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/apply-patch+yaml",
        ]
        if not rt.custom:
            accepted.append("application/strategic-merge-patch+json")
        if kind not in accepted:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types "
                "include: " + ", ".join(accepted),
            )
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            raise _bad_request(f"error decoding patch: {exc}") from None
        with self.lock:
            current = self.get(rt, namespace, name)
            if kind == "application/apply-patch+yaml":
                if not field_manager:
                    raise _bad_request("PATCH /apply requires fieldManager")
                if current is None:
                    if not isinstance(body, dict):
                        raise _bad_request("apply patches must be objects")
                    _meta(body).setdefault("name", name)
                    return self.create(rt, namespace, body, dry_run=dry_run), True
            if current is None:
                raise _not_found(rt, name)
            if self.faults.take_conflict(rt, namespace, name):
                raise _conflict(rt, name)
            patched = _apply_patch(kind, current, body, strategic=True)
            if not isinstance(patched, dict):
                raise ApiError(422, "Invalid", "the patched object is not a JSON object")
            meta = _meta(patched)
            wanted = meta.get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise _conflict(rt, name)
            meta["name"] = name
            if rt.namespaced:
                meta["namespace"] = namespace
            if patched.get("apiVersion") != rt.group_version or patched.get("kind") != rt.kind:
                raise _bad_request("apiVersion and kind cannot be changed by a patch")
            return self._update(rt, current, patched, subresource, dry_run), False

    def _update(
        self,
        rt: ResourceType,
        current: JSON,
        new: JSON,
        subresource: str | None,
        dry_run: bool,
    ) -> JSON:
        new = copy.deepcopy(new)
        if subresource == "status":
            merged = copy.deepcopy(current)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        elif rt.status:
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
            else:
                new.pop("status", None)
        meta = _meta(new)
        old_meta = current["metadata"]
        for key in (
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if rt is _SERVICE:
            spec = new.setdefault("spec", {})
            old_spec = current.get("spec", {})
            for key in ("clusterIP", "clusterIPs"):
                if key not in spec and key in old_spec:
                    spec[key] = copy.deepcopy(old_spec[key])
        self._default(rt, new, current)
        if "generation" in meta and _spec_part(new) != _spec_part(current):
            meta["generation"] = int(meta["generation"]) + 1
        causes = self._validate(rt, new, current)
        if causes:
            raise _invalid(rt, meta["name"], causes)
        if _without_rv(new) == _without_rv(current):
            return current
        if dry_run:
            return new
        if rt is not _NAMESPACE and meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self.remove(rt, new)
        return self.put(rt, new, current)

    def delete(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        options: JSON,
        *,
        dry_run: bool = False,
    ) -> JSON:
        with self.lock:
            current = self.get(rt, namespace, name)
            if current is None:
                raise _not_found(rt, name)
            pre = options.get("preconditions") or {}
            meta = current["metadata"]
            if pre.get("uid") and pre["uid"] != meta.get("uid"):
                raise _conflict(
                    rt,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object "
                    f"meta: {meta.get('uid')}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
                raise _conflict(
                    rt,
                    name,
                    "Precondition failed: ResourceVersion in precondition: "
                    f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                    f"{meta['resourceVersion']}",
                )
            if self.faults.take_conflict(rt, namespace, name):
                raise _conflict(rt, name)
            policy = options.get("propagationPolicy")
            if policy is None and options.get("orphanDependents") is not None:
                policy = "Orphan" if options["orphanDependents"] else "Background"
            policy = policy or "Background"
            if policy not in ("Background", "Foreground", "Orphan"):
                raise _invalid(
                    rt,
                    name,
                    [
                        _Cause(
                            "propagationPolicy",
                            "FieldValueNotSupported",
                            f'Unsupported value: "{policy}": supported values: "Foreground", '
                            '"Background", "Orphan"',
                        )
                    ],
                )
            if dry_run:
                return self._delete_response(rt, current)
            if meta.get("deletionTimestamp"):
                return current
            finalizers = list(meta.get("finalizers") or [])
            if policy == "Foreground" and "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
            if rt is _NAMESPACE or finalizers:
                updated = copy.deepcopy(current)
                umeta = updated["metadata"]
                umeta["deletionTimestamp"] = _now()
                umeta["deletionGracePeriodSeconds"] = 0
                if finalizers:
                    umeta["finalizers"] = finalizers
                if rt is _NAMESPACE:
                    updated.setdefault("status", {})["phase"] = "Terminating"
                return self.put(rt, updated, current)
            if policy == "Orphan":
                self.orphan_dependents(_uid(current))
            final = self.remove(rt, current)
            if rt is _CRD_TYPE:
                self._forget_crd(final)
            return self._delete_response(rt, final)

    def _delete_response(self, rt: ResourceType, obj: JSON) -> JSON:
        if rt.custom or rt.key in _RETURNS_OBJECT_ON_DELETE:
            return obj
        details = _details(rt, _name(obj))
        details["uid"] = _uid(obj)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    def orphan_dependents(self, owner_uid: str) -> None:
        for rt_key, bucket in list(self.objects.items()):
            rt = self.types.get(rt_key)
            if rt is None:
                continue
            for obj in list(bucket.values()):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == owner_uid for r in refs):
                    updated = copy.deepcopy(obj)
                    kept = [r for r in refs if r.get("uid") != owner_uid]
                    if kept:
                        updated["metadata"]["ownerReferences"] = kept
                    else:
                        updated["metadata"].pop("ownerReferences", None)
                    self.put(rt, updated, obj)

    def delete_collection(
        self,
        rt: ResourceType,
        namespace: str | None,
        labels: list[_Requirement],
        fields: list[_FieldRequirement],
        options: JSON,
        *,
        dry_run: bool = False,
    ) -> JSON:
        with self.lock:
            deleted = []
            for obj in self.select(rt, namespace, labels, fields):
                result = self.delete(rt, _ns(obj), _name(obj), options, dry_run=dry_run)
                deleted.append(obj if result.get("kind") == "Status" else result)
            return self.list_body(rt, deleted)

    def list_body(
        self, rt: ResourceType, items: list[JSON], cont: str | None = None, remaining: int = 0
    ) -> JSON:
        meta: JSON = {"resourceVersion": str(self.rv)}
        if cont:
            meta["continue"] = cont
            meta["remainingItemCount"] = remaining
        if rt.custom:
            rendered = items
        else:
            rendered = [
                {k: v for k, v in i.items() if k not in ("kind", "apiVersion")} for i in items
            ]
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.group_version,
            "metadata": meta,
            "items": rendered,
        }

    def list_objects(
        self,
        rt: ResourceType,
        namespace: str | None,
        labels: list[_Requirement],
        fields: list[_FieldRequirement],
        *,
        limit: int | None = None,
        cont: str | None = None,
    ) -> JSON:
        with self.lock:
            items = self.select(rt, namespace, labels, fields)
            start_after: tuple[str, str] | None = None
            if cont:
                try:
                    token = json.loads(base64.urlsafe_b64decode(cont.encode()).decode())
                    start_after = (token["ns"], token["name"])
                except (ValueError, KeyError, TypeError):
                    raise _bad_request("continue key is not valid: invalid token") from None
                items = [i for i in items if (_ns(i), _name(i)) > start_after]
            next_token = None
            remaining = 0
            if limit and limit > 0 and len(items) > limit:
                last = items[limit - 1]
                remaining = len(items) - limit
                items = items[:limit]
                next_token = base64.urlsafe_b64encode(
                    json.dumps({"ns": _ns(last), "name": _name(last), "rv": self.rv}).encode()
                ).decode()
            return self.list_body(rt, items, next_token, remaining)

    def subscribe(
        self,
        rt: ResourceType,
        namespace: str | None,
        labels: list[_Requirement],
        fields: list[_FieldRequirement],
        resource_version: str | None,
    ) -> tuple[list[str], _Watcher | None]:
        """Register a watch; returns the lines to send first and the watcher
        (None when the stream must end at once, e.g. 410 Expired)."""
        with self.lock:
            watcher = _Watcher(rt, namespace, labels, fields)
            lines: list[str] = []
            if resource_version in (None, "", "0"):
                for obj in self.select(rt, namespace):
                    if watcher.matches(obj):
                        lines.append(_watch_line("ADDED", json.dumps(obj, separators=(",", ":"))))
            else:
                try:
                    since = int(str(resource_version))
                except ValueError:
                    raise _bad_request(f"invalid resource version: {resource_version}") from None
                if since < self.history_floor:
                    status = _expired(
                        f"too old resource version: {since} ({self.history_floor})"
                    ).status()
                    return [_watch_line("ERROR", json.dumps(status))], None
                for event in self.history:
                    if event.rv > since and watcher.wants(event):
                        line = watcher.render(event)
                        if line:
                            lines.append(line)
            self.watchers.add(watcher)
            return lines, watcher

    def unsubscribe(self, watcher: _Watcher) -> None:
        with self.lock:
            self.watchers.discard(watcher)

    # -- defaulting ----------------------------------------------------------------------

    def _default(self, rt: ResourceType, obj: JSON, old: JSON | None) -> None:
        meta = _meta(obj)
        if old is None and not rt.custom and rt.status:
            # Go structs always serialise: a new object reads back with its empty status.
            obj["status"] = copy.deepcopy(_INITIAL_STATUS.get(rt.key, {}))
        if rt is _NAMESPACE:
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            if old is None:
                obj["status"] = {"phase": "Active"}
        elif rt is _POD:
            spec = obj.setdefault("spec", {})
            if isinstance(spec, dict):
                _default_pod_spec(spec, pod=True)
                if old is None:
                    spec.setdefault("serviceAccountName", "default")
                    spec.setdefault("serviceAccount", spec["serviceAccountName"])
                    obj["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}
        elif rt in (_STS, _DEPLOY, _RS) or rt.key == ("batch/v1", "jobs"):
            spec = obj.setdefault("spec", {})
            template = spec.get("template")
            if isinstance(template, dict) and isinstance(template.get("spec"), dict):
                _default_pod_spec(template["spec"], pod=False)
            if rt.key != ("batch/v1", "jobs"):
                spec.setdefault("replicas", 1)
                spec.setdefault("revisionHistoryLimit", 10)
            if rt is _STS:
                spec.setdefault("podManagementPolicy", "OrderedReady")
                strategy = spec.setdefault("updateStrategy", {"type": "RollingUpdate"})
                if strategy.get("type", "RollingUpdate") == "RollingUpdate":
                    strategy.setdefault("type", "RollingUpdate")
                    strategy.setdefault("rollingUpdate", {}).setdefault("partition", 0)
                policy = spec.setdefault("persistentVolumeClaimRetentionPolicy", {})
                policy.setdefault("whenDeleted", "Retain")
                policy.setdefault("whenScaled", "Retain")
                for claim in spec.get("volumeClaimTemplates") or []:
                    if isinstance(claim, dict):
                        claim.setdefault("apiVersion", "v1")
                        claim.setdefault("kind", "PersistentVolumeClaim")
                        claim_spec = claim.setdefault("spec", {})
                        claim_spec.setdefault("volumeMode", "Filesystem")
                        _canon_resources(claim_spec.get("resources"))
                        claim.setdefault("status", {"phase": "Pending"})
            if rt is _DEPLOY:
                strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
                if strategy.get("type", "RollingUpdate") == "RollingUpdate":
                    strategy.setdefault("type", "RollingUpdate")
                    rolling = strategy.setdefault("rollingUpdate", {})
                    rolling.setdefault("maxUnavailable", "25%")
                    rolling.setdefault("maxSurge", "25%")
                spec.setdefault("progressDeadlineSeconds", 600)
        elif rt is _SERVICE:
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if old is None and spec.get("type") != "ExternalName":
                if not spec.get("clusterIP"):
                    spec["clusterIP"] = self.next_ip("10.96")
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
            for port in spec.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
                    port.setdefault("targetPort", port.get("port"))
            spec.setdefault("sessionAffinity", "None")
            if spec.get("type") != "ExternalName":
                spec.setdefault("ipFamilies", ["IPv4"])
                spec.setdefault("ipFamilyPolicy", "SingleStack")
                spec.setdefault("internalTrafficPolicy", "Cluster")
            if old is None:
                obj["status"] = {"loadBalancer": {}}
        elif rt is _SECRET:
            obj.setdefault("type", "Opaque")
            data = obj.get("data") or {}
            for key, value in data.items():
                try:
                    base64.b64decode(str(value), validate=True)
                except ValueError:
                    raise _bad_request(
                        'Secret in version "v1" cannot be handled as a Secret: illegal base64 '
                        f"data in key {key}"
                    ) from None
            string_data = obj.pop("stringData", None)
            if isinstance(string_data, dict) and string_data:
                data = dict(data)
                for key, value in string_data.items():
                    data[key] = base64.b64encode(str(value).encode()).decode()
                obj["data"] = data
        elif rt is _PVC:
            spec = obj.setdefault("spec", {})
            if old is None:
                spec.setdefault("storageClassName", "standard")
                obj["status"] = {"phase": "Pending"}
            spec.setdefault("volumeMode", "Filesystem")
            _canon_resources(spec.get("resources"))
        elif rt is _QUOTA:
            hard = obj.get("spec", {}).get("hard")
            if isinstance(hard, dict):
                obj["spec"]["hard"] = {k: _canon_or_400(v) for k, v in hard.items()}
        elif rt is _LIMITRANGE:
            for item in obj.get("spec", {}).get("limits") or []:
                for key in ("max", "min", "default", "defaultRequest", "maxLimitRequestRatio"):
                    if isinstance(item.get(key), dict):
                        item[key] = {k: _canon_or_400(v) for k, v in item[key].items()}
        elif rt.key == ("networking.k8s.io/v1", "networkpolicies"):
            spec = obj.setdefault("spec", {})
            if "policyTypes" not in spec:
                spec["policyTypes"] = ["Ingress"] + (["Egress"] if spec.get("egress") else [])

    # -- validation ----------------------------------------------------------------------

    def _validate(self, rt: ResourceType, obj: JSON, old: JSON | None) -> list[_Cause]:
        causes: list[_Cause] = []
        meta = obj["metadata"]
        name = str(meta.get("name", ""))
        if old is None:
            if rt is _NAMESPACE:
                if len(name) > 63 or not _DNS1123_LABEL_RE.match(name):
                    causes.append(_invalid_value("metadata.name", name, _LABEL_MSG))
            elif rt is _SERVICE:
                if len(name) > 63 or not _DNS1035_LABEL_RE.match(name):
                    causes.append(_invalid_value("metadata.name", name, _DNS1035_MSG))
            elif len(name) > 253 or not _DNS1123_SUBDOMAIN_RE.match(name):
                causes.append(_invalid_value("metadata.name", name, _SUBDOMAIN_MSG))
        causes += _validate_labels(meta.get("labels"), "metadata.labels")
        for key in meta.get("annotations") or {}:
            problem = _qualified_name_problem(key)
            if problem:
                causes.append(_invalid_value("metadata.annotations", key, problem))
        spec = obj.get("spec")
        if rt is _POD and isinstance(spec, dict):
            causes += _validate_pod_spec(spec, "spec", set())
            if old is not None:
                causes += _pod_update_causes(spec, old.get("spec", {}))
        elif rt in (_STS, _DEPLOY, _RS):
            causes += _validate_workload(rt, spec if isinstance(spec, dict) else {})
            if old is not None:
                causes += _workload_update_causes(rt, obj.get("spec", {}), old.get("spec", {}))
        elif rt is _SERVICE and isinstance(spec, dict):
            causes += _validate_service(spec)
            if old is not None:
                old_ip = old.get("spec", {}).get("clusterIP")
                if old_ip and spec.get("clusterIP") != old_ip:
                    causes.append(
                        _invalid_value(
                            "spec.clusterIPs[0]", spec.get("clusterIP"), "may not change once set"
                        )
                    )
        elif rt is _PVC and isinstance(spec, dict):
            causes += _validate_claim_spec(spec, "spec")
            if old is not None:
                causes += _claim_update_causes(spec, old.get("spec", {}))
        elif rt.key in (("v1", "secrets"), ("v1", "configmaps")) and old and old.get("immutable"):
            for key in ("data", "binaryData"):
                if obj.get(key) != old.get(key):
                    causes.append(
                        _forbidden_field(key, "field is immutable when `immutable` is set")
                    )
            if not obj.get("immutable"):
                causes.append(
                    _forbidden_field("immutable", "field is immutable when `immutable` is set")
                )
        return causes

    # -- admission: LimitRange and ResourceQuota -----------------------------------------

    def _admit(self, rt: ResourceType, obj: JSON) -> None:
        namespace = obj["metadata"]["namespace"]
        name = obj["metadata"]["name"]
        if rt is _POD:
            problems = self._limit_pod(namespace, obj.get("spec", {}))
            if problems:
                raise _forbidden(rt, name, _join_problems(problems))
        elif rt is _PVC:
            problems = self._limit_claim(namespace, obj.get("spec", {}))
            if problems:
                raise _forbidden(rt, name, _join_problems(problems))
        for quota in self.select(_QUOTA, namespace):
            hard: dict[str, str] = quota.get("spec", {}).get("hard") or {}
            if not hard:
                continue
            quota_name = _name(quota)
            if rt is _POD and not _pod_terminal(obj):
                missing = _missing_compute(obj.get("spec", {}), hard)
                if missing:
                    raise _forbidden(
                        rt, name, f"failed quota: {quota_name}: must specify {missing}"
                    )
            exceeded: list[tuple[str, Fraction, Fraction, Fraction]] = []  # key, asked, used, hard
            for key in sorted(hard):
                delta = self._usage_of(rt, obj, key)
                if not delta:
                    continue
                used = self.namespace_usage(namespace, key)
                limit = parse_quantity(hard[key])
                if used + delta > limit:
                    exceeded.append((key, delta, used, limit))
            if exceeded:
                parts = [
                    ",".join(
                        f"{key}={format_quantity(values[i], binary=_binary_key(key, hard[key]))}"
                        for key, *values in exceeded
                    )
                    for i in (0, 1, 2)
                ]
                raise _forbidden(
                    rt,
                    name,
                    f"exceeded quota: {quota_name}, requested: {parts[0]}, used: {parts[1]}, "
                    f"limited: {parts[2]}",
                )

    def _limit_pod(self, namespace: str, spec: JSON) -> list[str]:
        problems: list[str] = []
        for limit_range in self.select(_LIMITRANGE, namespace):
            for item in limit_range.get("spec", {}).get("limits") or []:
                if item.get("type") != "Container":
                    continue
                default = item.get("default") or {}
                default_request = item.get("defaultRequest") or default
                for container in spec.get("containers") or []:
                    resources = container.setdefault("resources", {})
                    limits = resources.setdefault("limits", {})
                    requests = resources.setdefault("requests", {})
                    for res, value in default.items():
                        limits.setdefault(res, value)
                    for res, value in default_request.items():
                        requests.setdefault(res, value)
                    if not limits:
                        resources.pop("limits")
                    if not requests:
                        resources.pop("requests")
                    # A maximum bounds the limit, a minimum the request.
                    for bound, word, given in (
                        ("max", "limit", limits),
                        ("min", "request", requests),
                    ):
                        for res, value in (item.get(bound) or {}).items():
                            problem = _range_problem(
                                bound, "Container", res, value, word, given.get(res)
                            )
                            if problem:
                                problems.append(problem)
        return problems

    def _limit_claim(self, namespace: str, spec: JSON) -> list[str]:
        problems: list[str] = []
        requested = (spec.get("resources") or {}).get("requests", {}).get("storage")
        if requested is None:
            return problems
        for limit_range in self.select(_LIMITRANGE, namespace):
            for item in limit_range.get("spec", {}).get("limits") or []:
                if item.get("type") != "PersistentVolumeClaim":
                    continue
                for bound in ("max", "min"):
                    value = (item.get(bound) or {}).get("storage")
                    problem = value and _range_problem(
                        bound, "PersistentVolumeClaim", "storage", value, "request", requested
                    )
                    if problem:
                        problems.append(problem)
        return problems

    def _usage_of(self, rt: ResourceType, obj: JSON, key: str) -> Fraction:
        """What ``obj`` counts against quota resource ``key``."""
        if key.startswith("count/"):
            target = key[len("count/") :]
            plural, _, group = target.partition(".")
            return Fraction(1) if (rt.plural == plural and rt.group == group) else Fraction(0)
        if rt is _POD:
            if _pod_terminal(obj):
                return Fraction(0)
            if key == "pods":
                return Fraction(1)
            if key in ("cpu", "memory", "ephemeral-storage"):
                key = f"requests.{key}"
            kind, _, res = key.partition(".")
            if kind in ("requests", "limits") and res and res != "storage":
                return _pod_resource(obj.get("spec", {}), kind, res)
            return Fraction(0)
        if rt is _PVC:
            spec = obj.get("spec", {})
            storage_class = spec.get("storageClassName", "")
            scoped = ".storageclass.storage.k8s.io/"
            if scoped in key:
                wanted_class, _, key = key.partition(scoped)
                if wanted_class != storage_class:
                    return Fraction(0)
            if key == "persistentvolumeclaims":
                return Fraction(1)
            if key == "requests.storage":
                value = (spec.get("resources") or {}).get("requests", {}).get("storage")
                return parse_quantity(value) if value is not None else Fraction(0)
            return Fraction(0)
        if rt is _SERVICE:
            kind = obj.get("spec", {}).get("type", "ClusterIP")
            if key == "services":
                return Fraction(1)
            if key == "services.loadbalancers" and kind == "LoadBalancer":
                return Fraction(1)
            if key == "services.nodeports" and kind in ("NodePort", "LoadBalancer"):
                return Fraction(len(obj.get("spec", {}).get("ports") or []))
            return Fraction(0)
        simple = {
            "secrets": "secrets",
            "configmaps": "configmaps",
            "resourcequotas": "resourcequotas",
        }
        if rt.group == "" and simple.get(key) == rt.plural:
            return Fraction(1)
        return Fraction(0)

    def namespace_usage(self, namespace: str, key: str) -> Fraction:
        total = Fraction(0)
        candidates: list[ResourceType] = [_POD, _PVC, _SERVICE, _SECRET]
        if key.startswith("count/"):
            plural, _, group = key[len("count/") :].partition(".")
            gv_match = [
                rt for rt in self.types.values() if rt.plural == plural and rt.group == group
            ]
            candidates = gv_match[:1]
        elif key in ("configmaps", "resourcequotas"):
            candidates = [self.types[("v1", key)]]
        for rt in candidates:
            for obj in self.select(rt, namespace):
                total += self._usage_of(rt, obj, key)
        return total

    # -- CRDs ----------------------------------------------------------------------------

    def _accept_crd(self, crd: JSON) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        group = spec.get("group", "")
        plural = names.get("plural", "")
        causes: list[_Cause] = []
        if not group or "." not in group:
            causes.append(
                _invalid_value("spec.group", group, "should be a domain with at least one dot")
            )
        if not plural:
            causes.append(_required("spec.names.plural"))
        if not names.get("kind"):
            causes.append(_required("spec.names.kind"))
        if not spec.get("versions"):
            causes.append(
                _required(
                    "spec.versions", "must have exactly one version marked as storage version"
                )
            )
        if crd["metadata"]["name"] != f"{plural}.{group}":
            causes.append(
                _invalid_value(
                    "metadata.name",
                    crd["metadata"]["name"],
                    'must be spec.names.plural+"."+spec.group',
                )
            )
        if causes:
            raise _invalid(_CRD_TYPE, crd["metadata"]["name"], causes)
        accepted = dict(names)
        accepted.setdefault("singular", str(names.get("kind", "")).lower())
        accepted.setdefault("listKind", f"{names.get('kind')}List")
        now = _now()
        crd["status"] = {
            "acceptedNames": accepted,
            "conditions": [
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "reason": "NoConflicts",
                    "message": "no conflicts found",
                    "lastTransitionTime": now,
                },
                {
                    "type": "Established",
                    "status": "True",
                    "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted",
                    "lastTransitionTime": now,
                },
            ],
            "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
        }

    def _forget_crd(self, crd: JSON) -> None:
        for rt in _types_from_crd(crd):
            if rt.key in _BUILTIN_BY_KEY:
                continue
            for obj in list(self.objects.get(rt.key, {}).values()):
                self.remove(rt, obj)
            self.objects.pop(rt.key, None)
            self.types.pop(rt.key, None)


# --------------------------------------------------------------------------------------
# Defaulting and validation helpers
# --------------------------------------------------------------------------------------


def _range_problem(
    bound: str, per: str, res: str, value: str, word: str, got: str | None
) -> str | None:
    """Why ``got`` (a limit or request, by ``word``) breaks a LimitRange ``min`` or ``max``.

    None when it keeps within the bound; the wording is the LimitRanger's.
    """
    adjective, beyond = ("maximum", operator.gt) if bound == "max" else ("minimum", operator.lt)
    rule = f"{adjective} {res} usage per {per} is {value}"
    if got is None:
        return f"{rule}.  No {word} is specified"
    if beyond(parse_quantity(got), parse_quantity(value)):
        return f"{rule}, but {word} is {got}"
    return None


def _canon_or_400(value: Any) -> str:
    try:
        return canonical_quantity(value)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None


def _canon_resources(resources: Any) -> None:
    if not isinstance(resources, dict):
        return
    for kind in ("requests", "limits"):
        values = resources.get(kind)
        if isinstance(values, dict):
            resources[kind] = {k: _canon_or_400(v) for k, v in values.items()}


def _image_is_latest(image: str) -> bool:
    if "@" in image:
        return False
    last = image.rsplit("/", 1)[-1]
    return ":" not in last or last.rsplit(":", 1)[1] == "latest"


def _default_probe(probe: Any) -> None:
    if not isinstance(probe, dict):
        return
    probe.setdefault("timeoutSeconds", 1)
    probe.setdefault("periodSeconds", 10)
    probe.setdefault("successThreshold", 1)
    probe.setdefault("failureThreshold", 3)
    if isinstance(probe.get("httpGet"), dict):
        probe["httpGet"].setdefault("scheme", "HTTP")
        probe["httpGet"].setdefault("path", "/")


def _default_pod_spec(spec: JSON, *, pod: bool) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or []:
            if not isinstance(container, dict):
                continue
            image = str(container.get("image", ""))
            container.setdefault(
                "imagePullPolicy", "Always" if _image_is_latest(image) else "IfNotPresent"
            )
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            for port in container.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
            resources = container.setdefault("resources", {})
            _canon_resources(resources)
            if pod and isinstance(resources, dict) and resources.get("limits"):
                requests = resources.setdefault("requests", {})
                for res, value in resources["limits"].items():
                    requests.setdefault(res, value)
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                _default_probe(container.get(probe))
    for volume in spec.get("volumes") or []:
        if not isinstance(volume, dict):
            continue
        for source in ("secret", "configMap"):
            if isinstance(volume.get(source), dict):
                volume[source].setdefault("defaultMode", 420)


def _qos_class(spec: JSON) -> str:
    containers = spec.get("containers") or []
    any_set = False
    guaranteed = bool(containers)
    for container in containers:
        resources = container.get("resources") or {}
        requests = resources.get("requests") or {}
        limits = resources.get("limits") or {}
        if requests or limits:
            any_set = True
        for res in ("cpu", "memory"):
            if res not in limits or requests.get(res, limits.get(res)) != limits.get(res):
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def _validate_labels(labels: Any, path: str) -> list[_Cause]:
    causes: list[_Cause] = []
    if not isinstance(labels, dict):
        return causes
    for key, value in labels.items():
        problem = _qualified_name_problem(str(key))
        if problem:
            causes.append(_invalid_value(path, key, problem))
        if not isinstance(value, str):
            causes.append(_invalid_value(f"{path}.{key}", value, "label values must be strings"))
            continue
        problem = _label_value_problem(value)
        if problem:
            causes.append(_invalid_value(path, value, problem))
    return causes


def _validate_pod_spec(spec: JSON, path: str, extra_volumes: set[str]) -> list[_Cause]:
    causes: list[_Cause] = []
    containers = spec.get("containers")
    if not containers:
        return [_required(f"{path}.containers")]
    volumes = {v.get("name") for v in spec.get("volumes") or [] if isinstance(v, dict)}
    volumes |= extra_volumes
    seen: set[str] = set()
    for key in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(key) or []):
            where = f"{path}.{key}[{index}]"
            if not isinstance(container, dict):
                causes.append(_invalid_value(where, container, "must be an object"))
                continue
            name = container.get("name")
            if not name:
                causes.append(_required(f"{where}.name"))
            elif name in seen:
                causes.append(
                    _Cause(f"{where}.name", "FieldValueDuplicate", f'Duplicate value: "{name}"')
                )
            elif len(name) > 63 or not _DNS1123_LABEL_RE.match(name):
                causes.append(_invalid_value(f"{where}.name", name, _LABEL_MSG))
            if name:
                seen.add(name)
            if not container.get("image"):
                causes.append(_required(f"{where}.image"))
            for port_index, port in enumerate(container.get("ports") or []):
                number = port.get("containerPort") if isinstance(port, dict) else None
                if not isinstance(number, int) or not 0 < number < 65536:
                    causes.append(
                        _invalid_value(
                            f"{where}.ports[{port_index}].containerPort",
                            number,
                            "must be between 1 and 65535, inclusive",
                        )
                    )
            resources = container.get("resources") or {}
            requests = resources.get("requests") or {}
            limits = resources.get("limits") or {}
            for res, value in requests.items():
                if res in limits and parse_quantity(value) > parse_quantity(limits[res]):
                    causes.append(
                        _invalid_value(
                            f"{where}.resources.requests",
                            value,
                            f"must be less than or equal to {res} limit of {limits[res]}",
                        )
                    )
            for mount_index, mount in enumerate(container.get("volumeMounts") or []):
                if isinstance(mount, dict) and mount.get("name") not in volumes:
                    causes.append(
                        _Cause(
                            f"{where}.volumeMounts[{mount_index}].name",
                            "FieldValueNotFound",
                            f'Not found: "{mount.get("name")}"',
                        )
                    )
    return causes


def _validate_claim_spec(spec: JSON, path: str) -> list[_Cause]:
    causes: list[_Cause] = []
    if not spec.get("accessModes"):
        causes.append(_required(f"{path}.accessModes", "at least 1 access mode is required"))
    storage = (spec.get("resources") or {}).get("requests", {}).get("storage")
    if storage is None:
        causes.append(_required(f"{path}.resources[storage]"))
    elif parse_quantity(storage) <= 0:
        causes.append(
            _invalid_value(f"{path}.resources[storage]", storage, "must be greater than zero")
        )
    return causes


def _validate_workload(rt: ResourceType, spec: JSON) -> list[_Cause]:
    causes: list[_Cause] = []
    selector = spec.get("selector")
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    if not selector or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        causes.append(_required("spec.selector"))
    elif not selector_matches(selector, labels):
        causes.append(
            _invalid_value(
                "spec.template.metadata.labels",
                labels,
                "`selector` does not match template `labels`",
            )
        )
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or replicas < 0:
        causes.append(
            _invalid_value("spec.replicas", replicas, "must be greater than or equal to 0")
        )
    causes += _validate_labels(labels, "spec.template.metadata.labels")
    claim_names: set[str] = set()
    if rt is _STS:
        for index, claim in enumerate(spec.get("volumeClaimTemplates") or []):
            claim_name = (claim.get("metadata") or {}).get("name")
            if not claim_name:
                causes.append(_required(f"spec.volumeClaimTemplates[{index}].metadata.name"))
            else:
                claim_names.add(claim_name)
            causes += _validate_claim_spec(
                claim.get("spec") or {}, f"spec.volumeClaimTemplates[{index}].spec"
            )
    pod_spec = template.get("spec")
    if not isinstance(pod_spec, dict):
        causes.append(_required("spec.template.spec.containers"))
    else:
        causes += _validate_pod_spec(pod_spec, "spec.template.spec", claim_names)
    return causes


_STS_MUTABLE = {
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "revisionHistoryLimit",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
}


def _workload_update_causes(rt: ResourceType, spec: JSON, old: JSON) -> list[_Cause]:
    if rt is _STS:
        frozen_new = {k: v for k, v in spec.items() if k not in _STS_MUTABLE}
        frozen_old = {k: v for k, v in old.items() if k not in _STS_MUTABLE}
        if frozen_new != frozen_old:
            return [
                _forbidden_field(
                    "spec",
                    "updates to statefulset spec for fields other than 'replicas', 'ordinals', "
                    "'template', 'updateStrategy', 'revisionHistoryLimit', "
                    "'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
                )
            ]
        return []
    if spec.get("selector") != old.get("selector"):
        return [_invalid_value("spec.selector", spec.get("selector"), "field is immutable")]
    return []


def _pod_update_causes(spec: JSON, old: JSON) -> list[_Cause]:
    def strip(value: JSON) -> JSON:
        clean = copy.deepcopy(value)
        for key in ("containers", "initContainers"):
            for container in clean.get(key) or []:
                container.pop("image", None)
        for key in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
            clean.pop(key, None)
        return clean

    if strip(spec) != strip(old):
        return [
            _forbidden_field(
                "spec",
                "pod updates may not change fields other than `spec.containers[*].image`,"
                "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
                "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
                "(allow it to be set to 1 if it was previously negative)",
            )
        ]
    return []


def _claim_update_causes(spec: JSON, old: JSON) -> list[_Cause]:
    def strip(value: JSON) -> JSON:
        clean = copy.deepcopy(value)
        (clean.get("resources") or {}).pop("requests", None)
        clean.pop("volumeAttributesClassName", None)
        clean.pop("volumeName", None)
        return clean

    causes: list[_Cause] = []
    if strip(spec) != strip(old):
        causes.append(
            _forbidden_field(
                "spec",
                "spec is immutable after creation except resources.requests and "
                "volumeAttributesClassName for bound claims",
            )
        )
    new_size = (spec.get("resources") or {}).get("requests", {}).get("storage")
    old_size = (old.get("resources") or {}).get("requests", {}).get("storage")
    if new_size and old_size and parse_quantity(new_size) < parse_quantity(old_size):
        causes.append(
            _forbidden_field(
                "spec.resources.requests.storage", "field can not be less than previous value"
            )
        )
    return causes


def _validate_service(spec: JSON) -> list[_Cause]:
    causes: list[_Cause] = []
    ports = spec.get("ports") or []
    headless = spec.get("clusterIP") == "None"
    if not ports and not headless and spec.get("type") != "ExternalName":
        causes.append(_required("spec.ports"))
    names: set[str] = set()
    for index, port in enumerate(ports):
        number = port.get("port")
        if not isinstance(number, int) or not 0 < number < 65536:
            causes.append(
                _invalid_value(
                    f"spec.ports[{index}].port", number, "must be between 1 and 65535, inclusive"
                )
            )
        port_name = port.get("name")
        if len(ports) > 1 and not port_name:
            causes.append(_required(f"spec.ports[{index}].name"))
        elif port_name in names:
            causes.append(
                _Cause(
                    f"spec.ports[{index}].name",
                    "FieldValueDuplicate",
                    f'Duplicate value: "{port_name}"',
                )
            )
        if port_name:
            names.add(port_name)
    return causes


def _pod_terminal(pod: JSON) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def _pod_resource(spec: JSON, kind: str, res: str) -> Fraction:
    def value(container: JSON) -> Fraction:
        raw = ((container.get("resources") or {}).get(kind) or {}).get(res)
        return parse_quantity(raw) if raw is not None else Fraction(0)

    total = sum((value(c) for c in spec.get("containers") or []), Fraction(0))
    init = max((value(c) for c in spec.get("initContainers") or []), default=Fraction(0))
    return max(total, init)


_COMPUTE_KEYS = {
    "cpu": ("requests", "cpu"),
    "memory": ("requests", "memory"),
    "requests.cpu": ("requests", "cpu"),
    "requests.memory": ("requests", "memory"),
    "limits.cpu": ("limits", "cpu"),
    "limits.memory": ("limits", "memory"),
}


def _missing_compute(spec: JSON, hard: dict[str, str]) -> str:
    missing: list[str] = []
    for key in sorted(hard):
        if key not in _COMPUTE_KEYS:
            continue
        kind, res = _COMPUTE_KEYS[key]
        lacking = [
            str(c.get("name"))
            for c in spec.get("containers") or []
            if res not in ((c.get("resources") or {}).get(kind) or {})
        ]
        if lacking:
            missing.append(f"{key} for: {','.join(lacking)}")
    return "; ".join(missing)


def _binary_key(key: str, hard: str) -> bool:
    return _is_binary(hard) or key.endswith(("memory", "storage"))


def _join_problems(problems: list[str]) -> str:
    return problems[0] if len(problems) == 1 else "[" + ", ".join(problems) + "]"


# --------------------------------------------------------------------------------------
# Simulated controllers: scheduler, kubelet, workloads, GC, quota, operators
# --------------------------------------------------------------------------------------

_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def _template_hash(value: Any) -> str:
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    return "".join(_HASH_ALPHABET[b % len(_HASH_ALPHABET)] for b in digest[:10])


def _pod_condition(kind: str, status: str, stamp: str, **why: str) -> JSON:
    """A pod condition as the kubelet writes it; ``why`` is a ``reason`` and ``message``."""
    return {
        "type": kind,
        "status": status,
        "lastProbeTime": None,
        "lastTransitionTime": stamp,
        **why,
    }


def _waiting_status(container: JSON, waiting: JSON) -> JSON:
    """The status of a container that has not started, waiting for ``waiting["reason"]``."""
    return {
        "name": container.get("name"),
        "image": container.get("image"),
        "imageID": "",
        "ready": False,
        "started": False,
        "restartCount": 0,
        "state": {"waiting": waiting},
        "lastState": {},
    }


def _owned(name: str, namespace: str, labels: JSON, owner: list[JSON], **fields: Any) -> JSON:
    """A manifest an operator writes: named, labelled and owned by its custom resource."""
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": owner,
        },
        **fields,
    }


def _owner_ref(rt: ResourceType, obj: JSON, *, controller: bool = True) -> JSON:
    return {
        "apiVersion": rt.group_version,
        "kind": rt.kind,
        "name": _name(obj),
        "uid": _uid(obj),
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def _controller_uid(obj: JSON) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def _pod_ready(pod: JSON) -> bool:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def _deleting(obj: JSON) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def _image_ref(image: str) -> str:
    first = image.split("/", 1)[0]
    if "/" not in image:
        return f"docker.io/library/{image}"
    if "." in first or ":" in first or first == "localhost":
        return image
    return f"docker.io/{image}"


def _omit_zero(status: JSON, keys: Iterable[str]) -> JSON:
    return {k: v for k, v in status.items() if not (k in keys and not v)}


def _same_conditions(old: list[JSON], new: list[JSON]) -> list[JSON]:
    """Keep transition times of conditions whose status did not change."""
    before = {c.get("type"): c for c in old or []}
    merged = []
    for wanted in new:
        condition = dict(wanted)
        previous = before.get(condition.get("type"))
        if previous and previous.get("status") == condition.get("status"):
            condition["lastTransitionTime"] = previous.get("lastTransitionTime")
            if "lastUpdateTime" in condition:
                same = previous.get("reason") == condition.get("reason") and previous.get(
                    "message"
                ) == condition.get("message")
                if same:
                    condition["lastUpdateTime"] = previous.get("lastUpdateTime")
        merged.append(condition)
    return merged


def _pdb_count(raw: Any, expected: int) -> int:
    if isinstance(raw, str) and raw.endswith("%"):
        return math.ceil(expected * int(raw[:-1]) / 100)
    return int(raw)


_SPILO_IMAGE = "ghcr.io/zalando/spilo-16:3.3-p1"
_REDIS_IMAGE = "redis:7.2.4-alpine"
_DESIRED_HASH = "emulator.kidp.dev/desired-hash"


class _Controllers:
    """Reconciles the cluster in one background thread, under the cluster lock."""

    def __init__(self, cluster: _Cluster) -> None:
        self.c = cluster
        self.backoff: dict[str, float] = {}
        self.progress: dict[str, tuple[Any, float]] = {}
        self.pod_times: dict[str, dict[str, float]] = {}
        self.event_index: dict[tuple[str, str, str], tuple[str, str]] = {}
        self.node_seq = 0
        self.hashes: dict[tuple[str, int], str] = {}
        self._due: float | None = None

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self.c.changed.clear()
            began = time.monotonic()
            try:
                with self.c.lock:
                    due = self.reconcile(began)
            except Exception as exc:  # noqa: BLE001 - a controller bug must not stop the server
                print(f"kube emulator: controller error: {exc!r}", file=sys.stderr)
                due = time.monotonic() + 0.5
            # Leave the lock to API requests for at least as long as the pass held it,
            # so a burst of writes is reconciled in batches rather than one by one.
            spent = time.monotonic() - began
            if stopping.wait(min(0.05, max(0.005, spent))):
                return
            wait = 1.0 if due is None else min(1.0, max(0.0, due - time.monotonic()))
            if wait > 0:
                self.c.changed.wait(wait)

    def at(self, when: float) -> None:
        if self._due is None or when < self._due:
            self._due = when

    def reconcile(self, now: float) -> float | None:
        """One pass over every controller; returns when the next timed step is due."""
        self._due = None
        self.namespaces()
        self.garbage_collect()
        self.operators(now)
        for deployment in self.live(_DEPLOY):
            self.deployment(deployment, now)
        for rs in self.live(_RS):
            self.replicaset(rs, now)
        for sts in self.live(_STS):
            self.statefulset(sts, now)
        self.pods(now)
        self.claims()
        self.quotas()
        self.disruption_budgets()
        self.pod_times = {u: t for u, t in self.pod_times.items() if u in self.c.by_uid}
        self.hashes = {k: v for k, v in self.hashes.items() if k[0] in self.c.by_uid}
        return self._due

    # -- helpers -------------------------------------------------------------------------

    def event(
        self,
        rt: ResourceType,
        obj: JSON,
        reason: str,
        message: str,
        *,
        type_: str = "Normal",
        component: str = "kubelet",
        host: str | None = None,
        field_path: str | None = None,
    ) -> None:
        namespace = _ns(obj) or "default"
        if self.c.get(_NAMESPACE, "", namespace) is None:
            return
        key = (_uid(obj), reason, message)
        now = _now()
        existing_key = self.event_index.get(key)
        existing = self.c.get(_EVENT, *existing_key) if existing_key else None
        if existing is not None:
            updated = copy.deepcopy(existing)
            updated["count"] = int(updated.get("count", 1)) + 1
            updated["lastTimestamp"] = now
            self.c.put(_EVENT, updated, existing)
            return
        self.c.event_seq += 1
        name = f"{_name(obj)}.{int(time.time() * 1e9) + self.c.event_seq:x}"
        involved: JSON = {
            "kind": rt.kind,
            "namespace": _ns(obj) or None,
            "name": _name(obj),
            "uid": _uid(obj),
            "apiVersion": rt.group_version,
            "resourceVersion": obj.get("metadata", {}).get("resourceVersion"),
        }
        if field_path:
            involved["fieldPath"] = field_path
        source: JSON = {"component": component}
        if host:
            source["host"] = host
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now,
            },
            "involvedObject": {k: v for k, v in involved.items() if v is not None},
            "reason": reason,
            "message": message,
            "source": source,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": type_,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": host or "",
        }
        self.c.put(_EVENT, body, None)
        self.event_index[key] = (namespace, name)

    def template_hash(self, workload: JSON) -> str:
        """The pod template's hash, computed once per generation."""
        key = (_uid(workload), int(workload["metadata"].get("generation", 1)))
        found = self.hashes.get(key)
        if found is None:
            found = self.hashes[key] = _template_hash(workload.get("spec", {}).get("template", {}))
        return found

    def write_status(self, rt: ResourceType, obj: JSON, status: JSON) -> JSON:
        if obj.get("status") == status:
            return obj
        updated = copy.deepcopy(obj)
        updated["status"] = status
        return self.c.put(rt, updated, obj)

    def live(self, rt: ResourceType) -> list[JSON]:
        """The objects of one type that are not being deleted, for a controller to reconcile."""
        return [obj for obj in self.c.select(rt) if not _deleting(obj)]

    def try_create(self, rt: ResourceType, namespace: str, body: JSON) -> tuple[JSON | None, str]:
        try:
            return self.c.create(rt, namespace, body), ""
        except ApiError as exc:
            return None, exc.message

    def create_for(
        self,
        owner_rt: ResourceType,
        owner: JSON,
        rt: ResourceType,
        body: JSON,
        *,
        component: str,
        failed: str,
        succeeded: str | Callable[[JSON], str],
    ) -> JSON | None:
        """Create ``body`` in the owner's namespace as a workload controller does.

        The outcome goes on the owner as an Event: Warning ``FailedCreate`` with
        ``failed`` followed by the refusal, or ``SuccessfulCreate`` with
        ``succeeded`` (called with the created object when its name is generated).
        """
        created, error = self.try_create(rt, _ns(owner), body)
        if created is None:
            self.event(
                owner_rt,
                owner,
                "FailedCreate",
                failed + error,
                type_="Warning",
                component=component,
            )
            return None
        message = succeeded(created) if callable(succeeded) else succeeded
        self.event(owner_rt, owner, "SuccessfulCreate", message, component=component)
        return created

    def ensure(
        self, rt: ResourceType, namespace: str, body: JSON, *, keep: tuple[str, ...] = ()
    ) -> JSON | None:
        """Create ``body`` or bring the existing object's spec in line with it."""
        desired = _template_hash({k: v for k, v in body.items() if k != "metadata"})
        body = copy.deepcopy(body)
        body["metadata"].setdefault("annotations", {})[_DESIRED_HASH] = desired
        existing = self.c.get(rt, namespace, body["metadata"]["name"])
        if existing is None:
            created, _ = self.try_create(rt, namespace, body)
            return created
        if existing["metadata"].get("annotations", {}).get(_DESIRED_HASH) == desired:
            return existing
        replacement = copy.deepcopy(existing)
        replacement["metadata"].setdefault("annotations", {})[_DESIRED_HASH] = desired
        for key, value in body.items():
            if key in ("metadata", "status"):
                continue
            old = existing.get(key) or {}
            kept = {k: old[k] for k in keep if k in old} if isinstance(value, dict) else {}
            replacement[key] = {**value, **kept} if kept else value
        try:
            return self.c.replace(rt, namespace, _name(existing), replacement)
        except ApiError:
            return existing

    # -- namespaces and garbage collection -----------------------------------------------

    def namespaces(self) -> None:
        for namespace in self.c.select(_NAMESPACE):
            if not _deleting(namespace):
                continue
            name = _name(namespace)
            for rt, obj in self.c.stored():
                if rt.namespaced and _ns(obj) == name:
                    self.c.remove(rt, obj)
            self.c.remove(_NAMESPACE, namespace)

    def garbage_collect(self) -> None:
        dependents: dict[str, list[tuple[ResourceType, JSON]]] = {}
        for rt, obj in self.c.stored():
            refs = obj["metadata"].get("ownerReferences") or []
            if not refs:
                continue
            for ref in refs:
                dependents.setdefault(str(ref.get("uid")), []).append((rt, obj))
            if all(self.c.lookup_uid(str(r.get("uid"))) is None for r in refs):
                current = self.c.get(rt, _ns(obj), _name(obj))
                if current is not None and not _deleting(current):
                    self.c.delete(rt, _ns(obj), _name(obj), {})
        for owner_uid, found in dependents.items():
            owner = self.c.lookup_uid(owner_uid)
            if owner is None or not _deleting(owner):
                continue
            if "foregroundDeletion" not in (owner["metadata"].get("finalizers") or []):
                continue
            alive = False
            for rt, obj in found:
                current = self.c.get(rt, _ns(obj), _name(obj))
                if current is None:
                    continue
                alive = True
                if not _deleting(current):
                    self.c.delete(rt, _ns(obj), _name(obj), {"propagationPolicy": "Foreground"})
            if not alive:
                owner_rt = self.c.by_uid[owner_uid][0]
                updated = copy.deepcopy(owner)
                finalizers = [
                    f for f in owner["metadata"]["finalizers"] if f != "foregroundDeletion"
                ]
                updated["metadata"]["finalizers"] = finalizers
                if finalizers:
                    self.c.put(owner_rt, updated, owner)
                else:
                    self.c.remove(owner_rt, updated)
        # Owners in foreground deletion with no dependents at all.
        for rt, obj in self.c.stored():
            finalizers = obj["metadata"].get("finalizers") or []
            if (
                _deleting(obj)
                and finalizers == ["foregroundDeletion"]
                and _uid(obj) not in dependents
            ):
                self.c.remove(rt, obj)

    # -- scheduler and kubelet -----------------------------------------------------------

    def pods(self, now: float) -> None:
        delay = self.c.ready_delay
        for pod in self.c.select(_POD):
            if (
                _deleting(pod)
                or _pod_terminal(pod)
                or pod.get("status", {}).get("phase") == "Running"
            ):
                continue
            uid = _uid(pod)
            times = self.pod_times.setdefault(uid, {})
            spec = pod.get("spec", {})
            if not spec.get("nodeName"):
                self.schedule(pod, now, times)
                continue
            scheduled = times.setdefault("scheduled", now)
            failing = [
                c
                for c in spec.get("containers") or []
                if self.c.faults.image_fails(str(c.get("image", "")))
            ]
            if failing:
                self.pull_failure(pod, failing, now, times)
                continue
            start = scheduled
            if "pull_failed" in times:
                start = times.setdefault("retry", now)
            if now < start + delay:
                self.at(start + delay)
                continue
            self.start_containers(pod)

    def schedule(self, pod: JSON, now: float, times: dict[str, float]) -> None:
        namespace, name = _ns(pod), _name(pod)
        message = self.c.faults.unschedulable_message(namespace, name)
        if message:
            condition = _pod_condition(
                "PodScheduled", "False", _now(), reason="Unschedulable", message=message
            )
            status = pod.get("status", {})
            current = next(
                (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None
            )
            if current is None or current.get("message") != message:
                self.write_status(
                    _POD, pod, {**status, "phase": "Pending", "conditions": [condition]}
                )
                self.event(
                    _POD,
                    pod,
                    "FailedScheduling",
                    message,
                    type_="Warning",
                    component="default-scheduler",
                )
            return
        node = NODE_NAMES[self.node_seq % len(NODE_NAMES)]
        self.node_seq += 1
        updated = copy.deepcopy(pod)
        updated["spec"]["nodeName"] = node
        pod_ip = self.c.next_ip("10.244")
        stamp = _now()
        updated["status"] = {
            "phase": "Pending",
            "conditions": [_pod_condition("PodScheduled", "True", stamp)],
            "hostIP": f"172.18.0.{NODE_NAMES.index(node) + 2}",
            "hostIPs": [{"ip": f"172.18.0.{NODE_NAMES.index(node) + 2}"}],
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "startTime": stamp,
            "qosClass": pod.get("status", {}).get("qosClass", "BestEffort"),
            "containerStatuses": [
                _waiting_status(c, {"reason": "ContainerCreating"})
                for c in pod.get("spec", {}).get("containers") or []
            ],
        }
        stored = self.c.put(_POD, updated, pod)
        times["scheduled"] = now
        self.event(
            _POD,
            stored,
            "Scheduled",
            f"Successfully assigned {_ns(pod)}/{_name(pod)} to {node}",
            component="default-scheduler",
        )
        self.at(now + self.c.ready_delay)

    def pull_failure(
        self, pod: JSON, failing: list[JSON], now: float, times: dict[str, float]
    ) -> None:
        status = pod.get("status", {})
        statuses = status.get("containerStatuses") or []
        reasons = {
            s.get("name"): (s.get("state", {}).get("waiting") or {}).get("reason") for s in statuses
        }
        first = str(failing[0].get("name"))
        if "pull_failed" not in times or reasons.get(first) not in (
            "ErrImagePull",
            "ImagePullBackOff",
        ):
            times["pull_failed"] = now
            times.pop("retry", None)
            reason = "ErrImagePull"
        elif (
            reasons.get(first) == "ErrImagePull"
            and now >= times["pull_failed"] + self.c.ready_delay
        ):
            reason = "ImagePullBackOff"
        else:
            if reasons.get(first) == "ErrImagePull":
                self.at(times["pull_failed"] + self.c.ready_delay)
            return
        failing_names = {c.get("name") for c in failing}
        new_statuses = []
        for container in pod["spec"].get("containers") or []:
            image = str(container.get("image"))
            waiting: JSON = {"reason": "ContainerCreating"}
            if container.get("name") in failing_names:
                message = (
                    f'Back-off pulling image "{image}"'
                    if reason == "ImagePullBackOff"
                    else self.pull_error(image)
                )
                waiting = {"reason": reason, "message": message}
            new_statuses.append(_waiting_status(container, waiting))
        stamp = _now()
        unready = f"containers with unready status: [{' '.join(sorted(map(str, failing_names)))}]"
        conditions = [
            _pod_condition("PodReadyToStartContainers", "True", stamp),
            _pod_condition("Initialized", "True", stamp),
            _pod_condition("Ready", "False", stamp, reason="ContainersNotReady", message=unready),
            _pod_condition(
                "ContainersReady", "False", stamp, reason="ContainersNotReady", message=unready
            ),
            _pod_condition("PodScheduled", "True", stamp),
        ]
        new_status = {
            **status,
            "containerStatuses": new_statuses,
            "conditions": _same_conditions(status.get("conditions") or [], conditions),
        }
        stored = self.write_status(_POD, pod, new_status)
        for container in failing:
            image = str(container.get("image"))
            if reason == "ErrImagePull":
                self.container_events(
                    stored,
                    container,
                    ("Normal", "Pulling", f'Pulling image "{image}"'),
                    ("Warning", "Failed", self.pull_error(image)),
                    ("Warning", "Failed", "Error: ErrImagePull"),
                )
            else:
                self.container_events(
                    stored,
                    container,
                    ("Normal", "BackOff", f'Back-off pulling image "{image}"'),
                    ("Warning", "Failed", "Error: ImagePullBackOff"),
                )

    def container_events(self, pod: JSON, container: JSON, *events: tuple[str, str, str]) -> None:
        """Record the kubelet's ``(type, reason, message)`` Events about one container."""
        node = pod["spec"].get("nodeName")
        path = f"spec.containers{{{container.get('name')}}}"
        for type_, reason, message in events:
            self.event(_POD, pod, reason, message, type_=type_, host=node, field_path=path)

    @staticmethod
    def pull_error(image: str) -> str:
        ref = _image_ref(image)
        return (
            f'Failed to pull image "{image}": rpc error: code = NotFound desc = failed to pull and '
            f'unpack image "{ref}": failed to resolve reference "{ref}": {ref}: not found'
        )

    def start_containers(self, pod: JSON) -> None:
        stamp = _now()
        statuses = []
        for container in pod["spec"].get("containers") or []:
            image = str(container.get("image"))
            digest = hashlib.sha256(image.encode()).hexdigest()
            statuses.append(
                {
                    "name": container.get("name"),
                    "image": image,
                    "imageID": f"{_image_ref(image).rsplit(':', 1)[0]}@sha256:{digest}",
                    "containerID": "containerd://"
                    + hashlib.sha256(f"{_uid(pod)}/{container.get('name')}".encode()).hexdigest(),
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": stamp}},
                    "lastState": {},
                }
            )
        status = pod.get("status", {})
        conditions = [
            _pod_condition(kind, "True", stamp)
            for kind in (
                "PodReadyToStartContainers",
                "Initialized",
                "Ready",
                "ContainersReady",
                "PodScheduled",
            )
        ]
        stored = self.write_status(
            _POD,
            pod,
            {
                **status,
                "phase": "Running",
                "conditions": _same_conditions(status.get("conditions") or [], conditions),
                "containerStatuses": statuses,
            },
        )
        for container in pod["spec"].get("containers") or []:
            self.container_events(
                stored,
                container,
                (
                    "Normal",
                    "Pulled",
                    f'Container image "{container.get("image")}" already present on machine',
                ),
                ("Normal", "Created", f"Created container {container.get('name')}"),
                ("Normal", "Started", f"Started container {container.get('name')}"),
            )

    # -- StatefulSets ----------------------------------------------------------------------

    def statefulset(self, sts: JSON, now: float) -> None:
        namespace, name, uid = _ns(sts), _name(sts), _uid(sts)
        spec = sts.get("spec", {})
        replicas = int(spec.get("replicas", 1))
        revision = f"{name}-{self.template_hash(sts)}"
        pattern = re.compile(rf"{re.escape(name)}-(\d+)")
        pods: dict[int, JSON] = {}
        for pod in self.c.select(_POD, namespace):
            match = pattern.fullmatch(_name(pod))
            if match and _controller_uid(pod) == uid:
                pods[int(match.group(1))] = pod
        parallel = spec.get("podManagementPolicy") == "Parallel"
        blocked_until = self.backoff.get(uid, 0.0)
        if blocked_until > now:
            self.at(blocked_until)
        else:
            for ordinal in range(replicas):
                if ordinal in pods:
                    continue
                if not parallel and not all(
                    j in pods and _pod_ready(pods[j]) for j in range(ordinal)
                ):
                    break
                created = self.create_statefulset_pod(sts, ordinal, revision)
                if created is None:
                    self.backoff[uid] = now + 1.0
                    self.at(now + 1.0)
                    break
                pods[ordinal] = created
                if not parallel:
                    break
        policy = spec.get("persistentVolumeClaimRetentionPolicy") or {}
        self.statefulset_claim_owners(sts, pods)
        for ordinal in sorted((i for i in pods if i >= replicas), reverse=True):
            others = [p for i, p in pods.items() if i != ordinal]
            if not parallel and not all(_pod_ready(p) for p in others):
                break
            pod = pods.pop(ordinal)
            self.c.delete(_POD, namespace, _name(pod), {})
            self.event(
                _STS,
                sts,
                "SuccessfulDelete",
                f"delete Pod {_name(pod)} in StatefulSet {name} successful",
                component="statefulset-controller",
            )
            if policy.get("whenScaled") == "Delete":
                for template in spec.get("volumeClaimTemplates") or []:
                    claim = f"{template['metadata']['name']}-{name}-{ordinal}"
                    if self.c.get(_PVC, namespace, claim) is not None:
                        self.c.delete(_PVC, namespace, claim, {})
            if not parallel:
                break
        strategy = spec.get("updateStrategy") or {}
        if strategy.get("type", "RollingUpdate") == "RollingUpdate" and len(pods) == replicas:
            partition = int((strategy.get("rollingUpdate") or {}).get("partition", 0))
            if all(_pod_ready(p) for p in pods.values()):
                outdated = [
                    i
                    for i in sorted(pods, reverse=True)
                    if i >= partition
                    and _labels_of(pods[i]).get("controller-revision-hash") != revision
                ]
                if outdated:
                    pod = pods.pop(outdated[0])
                    self.c.delete(_POD, namespace, _name(pod), {})
        ready = sum(1 for p in pods.values() if _pod_ready(p))
        updated = sum(
            1 for p in pods.values() if _labels_of(p).get("controller-revision-hash") == revision
        )
        old_status = sts.get("status") or {}
        current_revision = old_status.get("currentRevision") or revision
        if updated == replicas == len(pods):
            current_revision = revision
        current = sum(
            1
            for p in pods.values()
            if _labels_of(p).get("controller-revision-hash") == current_revision
        )
        status = _omit_zero(
            {
                "observedGeneration": sts["metadata"].get("generation", 1),
                "replicas": len(pods),
                "readyReplicas": ready,
                "currentReplicas": current,
                "updatedReplicas": updated,
                "availableReplicas": ready,
                "currentRevision": current_revision,
                "updateRevision": revision,
                "collisionCount": 0,
            },
            ("readyReplicas", "currentReplicas", "updatedReplicas"),
        )
        self.write_status(_STS, sts, status)

    def statefulset_claim_owners(self, sts: JSON, pods: dict[int, JSON]) -> None:
        """Bring each pod's claims in line with ``whenDeleted``, as the real
        controller does on every sync: owned by the StatefulSet under Delete,
        not owned by it under Retain (only its own reference is touched)."""
        namespace, name, uid = _ns(sts), _name(sts), _uid(sts)
        spec = sts.get("spec", {})
        policy = spec.get("persistentVolumeClaimRetentionPolicy") or {}
        owned = policy.get("whenDeleted") == "Delete"
        for ordinal in sorted(pods):
            for template in spec.get("volumeClaimTemplates") or []:
                claim = self.c.get(
                    _PVC, namespace, f"{template['metadata']['name']}-{name}-{ordinal}"
                )
                if claim is None or claim["metadata"].get("deletionTimestamp"):
                    continue
                refs = claim["metadata"].get("ownerReferences") or []
                others = [ref for ref in refs if ref.get("uid") != uid]
                if owned == (len(others) != len(refs)):
                    continue
                updated = copy.deepcopy(claim)
                if owned:
                    updated["metadata"]["ownerReferences"] = [
                        *refs,
                        _owner_ref(_STS, sts, controller=False),
                    ]
                elif others:
                    updated["metadata"]["ownerReferences"] = others
                else:
                    updated["metadata"].pop("ownerReferences", None)
                with contextlib.suppress(ApiError):
                    self.c.replace(_PVC, namespace, _name(claim), updated)

    def create_statefulset_pod(self, sts: JSON, ordinal: int, revision: str) -> JSON | None:
        namespace, name = _ns(sts), _name(sts)
        spec = sts.get("spec", {})
        template = copy.deepcopy(spec.get("template") or {})
        pod_name = f"{name}-{ordinal}"
        policy = spec.get("persistentVolumeClaimRetentionPolicy") or {}
        selector_labels = (spec.get("selector") or {}).get("matchLabels") or {}
        volumes: list[JSON] = []
        for claim_template in spec.get("volumeClaimTemplates") or []:
            claim_meta = claim_template.get("metadata") or {}
            claim_name = f"{claim_meta['name']}-{name}-{ordinal}"
            volumes.append(
                {"name": claim_meta["name"], "persistentVolumeClaim": {"claimName": claim_name}}
            )
            if self.c.get(_PVC, namespace, claim_name) is not None:
                continue
            claim: JSON = {
                "metadata": {
                    "name": claim_name,
                    "namespace": namespace,
                    "labels": {**(claim_meta.get("labels") or {}), **selector_labels},
                },
                "spec": copy.deepcopy(claim_template.get("spec") or {}),
            }
            if claim_meta.get("annotations"):
                claim["metadata"]["annotations"] = dict(claim_meta["annotations"])
            if policy.get("whenDeleted") == "Delete":
                claim["metadata"]["ownerReferences"] = [_owner_ref(_STS, sts, controller=False)]
            if (
                self.create_for(
                    _STS,
                    sts,
                    _PVC,
                    claim,
                    component="statefulset-controller",
                    failed=f"create Claim {claim_name} for Pod {pod_name} in StatefulSet {name} "
                    "failed error: ",
                    succeeded=f"create Claim {claim_name} Pod {pod_name} in StatefulSet {name} "
                    "success",
                )
                is None
            ):
                return None
        template_meta = template.get("metadata") or {}
        pod_spec = template.get("spec") or {}
        pod_spec["hostname"] = pod_name
        if spec.get("serviceName"):
            pod_spec["subdomain"] = spec["serviceName"]
        claimed = {v["name"] for v in volumes}
        pod_spec["volumes"] = volumes + [
            v for v in pod_spec.get("volumes") or [] if v.get("name") not in claimed
        ]
        if not pod_spec["volumes"]:
            pod_spec.pop("volumes")
        body: JSON = {
            "metadata": {
                "name": pod_name,
                "namespace": namespace,
                "labels": {
                    **(template_meta.get("labels") or {}),
                    "controller-revision-hash": revision,
                    "statefulset.kubernetes.io/pod-name": pod_name,
                    "apps.kubernetes.io/pod-index": str(ordinal),
                },
                "ownerReferences": [_owner_ref(_STS, sts)],
            },
            "spec": pod_spec,
        }
        if template_meta.get("annotations"):
            body["metadata"]["annotations"] = dict(template_meta["annotations"])
        return self.create_for(
            _STS,
            sts,
            _POD,
            body,
            component="statefulset-controller",
            failed=f"create Pod {pod_name} in StatefulSet {name} failed error: ",
            succeeded=f"create Pod {pod_name} in StatefulSet {name} successful",
        )

    # -- Deployments and ReplicaSets -----------------------------------------------------------

    def deployment(self, deployment: JSON, now: float) -> None:
        namespace, name, uid = _ns(deployment), _name(deployment), _uid(deployment)
        spec = deployment.get("spec", {})
        replicas = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        pod_hash = self.template_hash(deployment)
        owned = [rs for rs in self.c.select(_RS, namespace) if _controller_uid(rs) == uid]
        new_rs = next(
            (rs for rs in owned if _labels_of(rs).get("pod-template-hash") == pod_hash), None
        )
        if new_rs is None:
            revisions = [
                int(
                    rs["metadata"]
                    .get("annotations", {})
                    .get("deployment.kubernetes.io/revision", "0")
                )
                for rs in owned
            ]
            template_meta = copy.deepcopy(template.get("metadata") or {})
            labels = {**(template_meta.get("labels") or {}), "pod-template-hash": pod_hash}
            template_meta["labels"] = labels
            selector = copy.deepcopy(spec.get("selector") or {})
            selector.setdefault("matchLabels", {})["pod-template-hash"] = pod_hash
            body: JSON = {
                "metadata": {
                    "name": f"{name}-{pod_hash}",
                    "namespace": namespace,
                    "labels": labels,
                    "annotations": {
                        "deployment.kubernetes.io/revision": str(max(revisions, default=0) + 1),
                        "deployment.kubernetes.io/desired-replicas": str(replicas),
                    },
                    "ownerReferences": [_owner_ref(_DEPLOY, deployment)],
                },
                "spec": {
                    "replicas": replicas,
                    "selector": selector,
                    "template": {
                        "metadata": template_meta,
                        "spec": copy.deepcopy(template.get("spec") or {}),
                    },
                },
            }
            new_rs, _ = self.try_create(_RS, namespace, body)
            if new_rs is None:
                return
            self.event(
                _DEPLOY,
                deployment,
                "ScalingReplicaSet",
                f"Scaled up replica set {_name(new_rs)} to {replicas}",
                component="deployment-controller",
            )
            owned.append(new_rs)
        elif new_rs["spec"].get("replicas") != replicas:
            before = new_rs["spec"].get("replicas")
            scaled = copy.deepcopy(new_rs)
            scaled["spec"]["replicas"] = replicas
            new_rs = self.c.replace(_RS, namespace, _name(new_rs), scaled)
            verb = "up" if replicas > int(before or 0) else "down"
            self.event(
                _DEPLOY,
                deployment,
                "ScalingReplicaSet",
                f"Scaled {verb} replica set {_name(new_rs)} to {replicas} from {before}",
                component="deployment-controller",
            )
        recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
        new_ready = int((new_rs.get("status") or {}).get("readyReplicas", 0))
        for rs in owned:
            if rs is new_rs or _uid(rs) == _uid(new_rs):
                continue
            if (recreate or new_ready >= replicas) and rs["spec"].get("replicas", 0) != 0:
                before = rs["spec"].get("replicas")
                scaled = copy.deepcopy(rs)
                scaled["spec"]["replicas"] = 0
                self.c.replace(_RS, namespace, _name(rs), scaled)
                self.event(
                    _DEPLOY,
                    deployment,
                    "ScalingReplicaSet",
                    f"Scaled down replica set {_name(rs)} to 0 from {before}",
                    component="deployment-controller",
                )
        owned = [rs for rs in self.c.select(_RS, namespace) if _controller_uid(rs) == uid]
        current_new = next((rs for rs in owned if _uid(rs) == _uid(new_rs)), new_rs)

        def total(rs_list: list[JSON], key: str) -> int:
            return sum(int((rs.get("status") or {}).get(key, 0)) for rs in rs_list)

        all_replicas = total(owned, "replicas")
        updated = int((current_new.get("status") or {}).get("replicas", 0))
        ready = total(owned, "readyReplicas")
        available = total(owned, "availableReplicas")
        max_unavailable = 0
        if not recreate:
            raw = ((spec.get("strategy") or {}).get("rollingUpdate") or {}).get(
                "maxUnavailable", "25%"
            )
            if isinstance(raw, str) and raw.endswith("%"):
                max_unavailable = math.floor(replicas * int(raw[:-1]) / 100)
            else:
                max_unavailable = int(raw)
        stamp = _now()
        rs_name = _name(current_new)
        available_ok = available >= replicas - max_unavailable
        complete = updated == replicas and available >= replicas and all_replicas == replicas
        signature = (rs_name, updated, ready, available, all_replicas)
        previous = self.progress.get(uid)
        if previous is None or previous[0] != signature:
            self.progress[uid] = (signature, now)
            since = now
        else:
            since = previous[1]
        deadline = float(spec.get("progressDeadlineSeconds", 600))
        if complete:
            progressing = (
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{rs_name}" has successfully progressed.',
            )
        elif now - since > deadline:
            progressing = (
                "False",
                "ProgressDeadlineExceeded",
                f'ReplicaSet "{rs_name}" has timed out progressing.',
            )
        else:
            progressing = ("True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.')
            self.at(since + deadline + 0.01)
        conditions = [
            {
                "type": "Available",
                "status": "True" if available_ok else "False",
                "lastUpdateTime": stamp,
                "lastTransitionTime": stamp,
                "reason": "MinimumReplicasAvailable"
                if available_ok
                else "MinimumReplicasUnavailable",
                "message": "Deployment has minimum availability."
                if available_ok
                else "Deployment does not have minimum availability.",
            },
            {
                "type": "Progressing",
                "status": progressing[0],
                "lastUpdateTime": stamp,
                "lastTransitionTime": stamp,
                "reason": progressing[1],
                "message": progressing[2],
            },
        ]
        old_status = deployment.get("status") or {}
        status = _omit_zero(
            {
                "observedGeneration": deployment["metadata"].get("generation", 1),
                "replicas": all_replicas,
                "updatedReplicas": updated,
                "readyReplicas": ready,
                "availableReplicas": available,
                "unavailableReplicas": max(0, replicas - available),
                "conditions": _same_conditions(old_status.get("conditions") or [], conditions),
            },
            (
                "replicas",
                "updatedReplicas",
                "readyReplicas",
                "availableReplicas",
                "unavailableReplicas",
            ),
        )
        self.write_status(_DEPLOY, deployment, status)

    def replicaset(self, rs: JSON, now: float) -> None:
        namespace, name, uid = _ns(rs), _name(rs), _uid(rs)
        spec = rs.get("spec", {})
        replicas = int(spec.get("replicas", 1))
        pods = [
            p
            for p in self.c.select(_POD, namespace)
            if _controller_uid(p) == uid and not _deleting(p)
        ]
        blocked_until = self.backoff.get(uid, 0.0)
        if len(pods) < replicas and blocked_until > now:
            self.at(blocked_until)
        elif len(pods) < replicas:
            template = copy.deepcopy(spec.get("template") or {})
            for _ in range(replicas - len(pods)):
                body: JSON = {
                    "metadata": {
                        "generateName": f"{name}-",
                        "namespace": namespace,
                        "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                        "ownerReferences": [_owner_ref(_RS, rs)],
                    },
                    "spec": copy.deepcopy(template.get("spec") or {}),
                }
                annotations = (template.get("metadata") or {}).get("annotations")
                if annotations:
                    body["metadata"]["annotations"] = dict(annotations)
                created = self.create_for(
                    _RS,
                    rs,
                    _POD,
                    body,
                    component="replicaset-controller",
                    failed="Error creating: ",
                    succeeded=lambda pod: f"Created pod: {_name(pod)}",
                )
                if created is None:
                    self.backoff[uid] = now + 1.0
                    self.at(now + 1.0)
                    break
                pods.append(created)
        elif len(pods) > replicas:
            victims = sorted(
                pods, key=lambda p: (_pod_ready(p), p["metadata"]["creationTimestamp"])
            )
            for pod in victims[: len(pods) - replicas]:
                self.c.delete(_POD, namespace, _name(pod), {})
                pods.remove(pod)
                self.event(
                    _RS,
                    rs,
                    "SuccessfulDelete",
                    f"Deleted pod: {_name(pod)}",
                    component="replicaset-controller",
                )
        ready = sum(1 for p in pods if _pod_ready(p))
        status = _omit_zero(
            {
                "replicas": len(pods),
                "fullyLabeledReplicas": len(pods),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "observedGeneration": rs["metadata"].get("generation", 1),
            },
            ("fullyLabeledReplicas", "readyReplicas", "availableReplicas"),
        )
        self.write_status(_RS, rs, status)

    # -- claims, quotas, disruption budgets ----------------------------------------------

    def claims(self) -> None:
        for claim in self.c.select(_PVC):
            if _deleting(claim):
                continue
            spec = claim.get("spec", {})
            requested = (spec.get("resources") or {}).get("requests", {}).get("storage")
            status = claim.get("status") or {}
            capacity = (status.get("capacity") or {}).get("storage")
            if status.get("phase") != "Bound":
                updated = copy.deepcopy(claim)
                updated["spec"]["volumeName"] = f"pvc-{_uid(claim)}"
                updated["status"] = {
                    "phase": "Bound",
                    "accessModes": list(spec.get("accessModes") or []),
                    "capacity": {"storage": requested},
                }
                self.c.put(_PVC, updated, claim)
            elif requested and capacity and parse_quantity(requested) > parse_quantity(capacity):
                self.write_status(_PVC, claim, {**status, "capacity": {"storage": requested}})

    def quotas(self) -> None:
        for quota in self.c.select(_QUOTA):
            hard = (quota.get("spec") or {}).get("hard") or {}
            used = {
                key: format_quantity(
                    self.c.namespace_usage(_ns(quota), key), binary=_binary_key(key, value)
                )
                for key, value in hard.items()
            }
            self.write_status(_QUOTA, quota, {"hard": dict(hard), "used": used})

    def disruption_budgets(self) -> None:
        for pdb in self.c.select(_PDB):
            spec = pdb.get("spec") or {}
            pods = [
                p
                for p in self.c.select(_POD, _ns(pdb))
                if selector_matches(spec.get("selector"), _labels_of(p)) and not _pod_terminal(p)
            ]
            expected = len(pods)
            healthy = sum(1 for p in pods if _pod_ready(p))

            if "minAvailable" in spec:
                desired = _pdb_count(spec["minAvailable"], expected)
            elif "maxUnavailable" in spec:
                desired = max(0, expected - _pdb_count(spec["maxUnavailable"], expected))
            else:
                desired = expected
            allowed = max(0, healthy - desired)
            old = pdb.get("status") or {}
            condition = {
                "type": "DisruptionAllowed",
                "status": "True" if allowed else "False",
                "reason": "SufficientPods" if allowed else "InsufficientPods",
                "message": "",
                "observedGeneration": pdb["metadata"].get("generation", 1),
                "lastTransitionTime": _now(),
            }
            status = {
                "observedGeneration": pdb["metadata"].get("generation", 1),
                "disruptionsAllowed": allowed,
                "currentHealthy": healthy,
                "desiredHealthy": desired,
                "expectedPods": expected,
                "conditions": _same_conditions(old.get("conditions") or [], [condition]),
            }
            self.write_status(_PDB, pdb, status)

    # -- operators -----------------------------------------------------------------------

    def operators(self, now: float) -> None:
        operators: tuple[tuple[tuple[str, str], Callable[[ResourceType, JSON], None]], ...] = (
            (("acid.zalan.do/v1", "postgresqls"), self.postgresql),
            (("databases.spotahome.com/v1", "redisfailovers"), self.redis_failover),
            (
                ("kafka.strimzi.io/v1beta2", "kafkatopics"),
                lambda rt, topic: self.kafka_topic(rt, topic, now),
            ),
        )
        # An operator does nothing until its CRD is installed.
        for key, reconcile in operators:
            rt = self.c.types.get(key)
            if rt is not None:
                for obj in self.live(rt):
                    reconcile(rt, obj)

    def postgresql(self, rt: ResourceType, cluster: JSON) -> None:
        namespace, name = _ns(cluster), _name(cluster)
        spec = cluster.get("spec") or {}
        team = str(spec.get("teamId") or "")
        current_phase = (cluster.get("status") or {}).get("PostgresClusterStatus")
        if not team or not name.lower().startswith(team.lower() + "-"):
            self.write_status(rt, cluster, {"PostgresClusterStatus": "Invalid"})
            return
        labels = {"application": "spilo", "cluster-name": name, "team": team}
        owner = [_owner_ref(rt, cluster)]
        users = ["postgres", "standby", *sorted((spec.get("users") or {}).keys())]
        for user in users:
            secret_name = f"{user.replace('_', '-')}.{name}.credentials.postgresql.acid.zalan.do"
            if self.c.get(_SECRET, namespace, secret_name) is None:
                password = "".join(
                    self.c.rng.choice(
                        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                    )
                    for _ in range(64)
                )
                self.try_create(
                    _SECRET,
                    namespace,
                    _owned(
                        secret_name,
                        namespace,
                        labels,
                        owner,
                        type="Opaque",
                        stringData={"username": user, "password": password},
                    ),
                )
        for service_name, role in ((name, "master"), (f"{name}-repl", "replica")):
            self.ensure(
                _SERVICE,
                namespace,
                _owned(
                    service_name,
                    namespace,
                    {**labels, "spilo-role": role},
                    owner,
                    spec={
                        "type": "ClusterIP",
                        "ports": [{"name": "postgresql", "port": 5432, "targetPort": 5432}],
                        "selector": {
                            "application": "spilo",
                            "cluster-name": name,
                            "spilo-role": role,
                        }
                        if role == "replica"
                        else {"application": "spilo", "cluster-name": name},
                    },
                ),
            )
        instances = int(spec.get("numberOfInstances", 1))
        volume = spec.get("volume") or {}
        claim_spec: JSON = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": volume.get("size", "1Gi")}},
        }
        if volume.get("storageClass"):
            claim_spec["storageClassName"] = volume["storageClass"]
        container: JSON = {
            "name": "postgres",
            "image": spec.get("dockerImage") or _SPILO_IMAGE,
            "ports": [
                {"name": "patroni", "containerPort": 8008},
                {"name": "postgresql", "containerPort": 5432},
            ],
            "env": [
                {
                    "name": "PGVERSION",
                    "value": str((spec.get("postgresql") or {}).get("version", "16")),
                }
            ],
            "volumeMounts": [{"name": "pgdata", "mountPath": "/home/postgres/pgdata"}],
        }
        if spec.get("resources"):
            container["resources"] = copy.deepcopy(spec["resources"])
        sts = self.ensure(
            _STS,
            namespace,
            _owned(
                name,
                namespace,
                labels,
                owner,
                spec={
                    "replicas": instances,
                    "serviceName": name,
                    "podManagementPolicy": "OrderedReady",
                    "selector": {"matchLabels": {"application": "spilo", "cluster-name": name}},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [container], "serviceAccountName": "postgres-pod"},
                    },
                    "volumeClaimTemplates": [
                        {"metadata": {"name": "pgdata", "labels": labels}, "spec": claim_spec}
                    ],
                },
            ),
            keep=("volumeClaimTemplates", "selector", "serviceName", "podManagementPolicy"),
        )
        wanted_size = volume.get("size")
        if wanted_size:
            for claim in self.c.select(_PVC, namespace):
                if _labels_of(claim).get("cluster-name") != name:
                    continue
                size = (
                    (claim.get("spec", {}).get("resources") or {})
                    .get("requests", {})
                    .get("storage")
                )
                if size and parse_quantity(size) < parse_quantity(wanted_size):
                    resized = copy.deepcopy(claim)
                    resized["spec"]["resources"]["requests"]["storage"] = wanted_size
                    with contextlib.suppress(ApiError):
                        self.c.replace(_PVC, namespace, _name(claim), resized)
        ready = int(((sts or {}).get("status") or {}).get("readyReplicas", 0))
        if ready >= instances:
            phase = "Running"
        elif current_phase in (None, "Creating", "Invalid"):
            phase = "Creating"
        else:
            phase = "Updating"
        self.write_status(
            rt, cluster, {**(cluster.get("status") or {}), "PostgresClusterStatus": phase}
        )

    def redis_failover(self, rt: ResourceType, failover: JSON) -> None:
        namespace, name = _ns(failover), _name(failover)
        spec = failover.get("spec") or {}
        redis = spec.get("redis") or {}
        sentinel = spec.get("sentinel") or {}
        owner = [_owner_ref(rt, failover)]
        base = {
            "app.kubernetes.io/name": name,
            "app.kubernetes.io/part-of": "redis-failover",
            "redisfailovers.databases.spotahome.com/name": name,
        }
        redis_labels = {**base, "app.kubernetes.io/component": "redis"}
        sentinel_labels = {**base, "app.kubernetes.io/component": "sentinel"}
        port = int(redis.get("port", 6379))
        redis_container: JSON = {
            "name": "redis",
            "image": redis.get("image") or _REDIS_IMAGE,
            "ports": [{"name": "redis", "containerPort": port}],
        }
        if redis.get("resources"):
            redis_container["resources"] = copy.deepcopy(redis["resources"])
        sts_spec: JSON = {
            "replicas": int(redis.get("replicas", 3)),
            "serviceName": f"rfr-{name}",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": redis_labels},
            "template": {
                "metadata": {"labels": redis_labels},
                "spec": {"containers": [redis_container]},
            },
        }
        storage = (redis.get("storage") or {}).get("persistentVolumeClaim")
        if storage:
            claim_name = (storage.get("metadata") or {}).get("name", "redis-data")
            sts_spec["volumeClaimTemplates"] = [
                {
                    "metadata": {"name": claim_name, "labels": redis_labels},
                    "spec": copy.deepcopy(storage.get("spec") or {}),
                }
            ]
            redis_container["volumeMounts"] = [{"name": claim_name, "mountPath": "/data"}]
            if not (redis.get("storage") or {}).get("keepAfterDeletion"):
                sts_spec["persistentVolumeClaimRetentionPolicy"] = {
                    "whenDeleted": "Delete",
                    "whenScaled": "Retain",
                }
        self.ensure(
            _STS,
            namespace,
            _owned(f"rfr-{name}", namespace, redis_labels, owner, spec=sts_spec),
            keep=("volumeClaimTemplates", "selector", "serviceName", "podManagementPolicy"),
        )
        sentinel_container: JSON = {
            "name": "sentinel",
            "image": sentinel.get("image") or _REDIS_IMAGE,
            "ports": [{"name": "sentinel", "containerPort": 26379}],
        }
        if sentinel.get("resources"):
            sentinel_container["resources"] = copy.deepcopy(sentinel["resources"])
        self.ensure(
            _DEPLOY,
            namespace,
            _owned(
                f"rfs-{name}",
                namespace,
                sentinel_labels,
                owner,
                spec={
                    "replicas": int(sentinel.get("replicas", 3)),
                    "selector": {"matchLabels": sentinel_labels},
                    "template": {
                        "metadata": {"labels": sentinel_labels},
                        "spec": {"containers": [sentinel_container]},
                    },
                },
            ),
            keep=("selector",),
        )
        for service_name, labels, service_port, selector in (
            (f"rfs-{name}", sentinel_labels, 26379, sentinel_labels),
            (f"rfrm-{name}", redis_labels, port, {**redis_labels, "redisfailovers-role": "master"}),
            (f"rfrs-{name}", redis_labels, port, {**redis_labels, "redisfailovers-role": "slave"}),
        ):
            self.ensure(
                _SERVICE,
                namespace,
                _owned(
                    service_name,
                    namespace,
                    labels,
                    owner,
                    spec={
                        "ports": [
                            {"name": "redis", "port": service_port, "targetPort": service_port}
                        ],
                        "selector": selector,
                    },
                ),
            )

    def kafka_topic(self, rt: ResourceType, topic: JSON, now: float) -> None:
        if not _labels_of(topic).get("strimzi.io/cluster"):
            return
        born = self.c.born.get(_uid(topic), now)
        if now < born + self.c.ready_delay:
            self.at(born + self.c.ready_delay)
            return
        spec = topic.get("spec") or {}
        problems = [
            f"Invalid spec.{key}: {spec[key]}"
            for key in ("partitions", "replicas")
            if key in spec and (not isinstance(spec[key], int) or spec[key] < 1)
        ]
        condition: JSON = {"type": "Ready", "status": "True", "lastTransitionTime": _now()}
        if problems:
            condition = {
                **condition,
                "status": "False",
                "reason": "InvalidResourceException",
                "message": "; ".join(problems),
            }
        old = topic.get("status") or {}
        status = {
            "conditions": _same_conditions(old.get("conditions") or [], [condition]),
            "observedGeneration": topic["metadata"].get("generation", 1),
            "topicName": spec.get("topicName") or _name(topic),
            "topicId": base64.urlsafe_b64encode(uuid.UUID(_uid(topic)).bytes).decode().rstrip("="),
        }
        self.write_status(rt, topic, status)


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------

VERSION_INFO: JSON = {
    "major": "1",
    "minor": "30",
    "gitVersion": "v1.30.0-kidp-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-04-17T00:00:00Z",
    "goVersion": "go1.22.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}

_METRICS_GV = "metrics.k8s.io/v1beta1"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 512
    allow_reuse_address = True
    emulator: KubeEmulator


@dataclass
class _Route:
    rt: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None
    watch: bool


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kidp-kube-emulator"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's
    # algorithm and the client's delayed ACK add 40 ms to every response.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- plumbing ------------------------------------------------------------------------

    @property
    def emulator(self) -> KubeEmulator:
        server = self.server
        assert isinstance(server, _Server)
        return server.emulator

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, code: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Audit-Id", str(uuid.uuid4()))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def _json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(body, separators=(",", ":")).encode(), headers)

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path).rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        try:
            raw = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        try:
            if path in ("/healthz", "/livez", "/readyz"):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                return
            if path == "/version":
                self._json(200, VERSION_INFO)
                return
            self._authenticate()
            if path.startswith("/_emulator"):
                self._control(method, path, raw)
                return
            self._api(method, path, query, raw)
        except ApiError as exc:
            self._json(exc.code, exc.status(), exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - answer 500 like the API server, keep serving
            error = ApiError(500, "InternalError", f"Internal error occurred: {exc!r}")
            self._json(500, error.status())

    def _authenticate(self) -> None:
        token = self.emulator.token
        if not token:
            return
        header = self.headers.get("Authorization", "")
        if header != f"Bearer {token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")

    # -- the Kubernetes API --------------------------------------------------------------

    def _api(self, method: str, path: str, query: dict[str, str], raw: bytes) -> None:
        cluster = self.emulator.cluster
        segments = [s for s in path.split("/") if s]
        plural_hint = _plural_hint(segments)
        with cluster.lock:
            fault = cluster.faults.take_request_fault(method, plural_hint)
        if fault is not None:
            raise _fault_error(fault)
        if method == "GET":
            discovery = self._discovery(segments)
            if discovery is not None:
                self._json(200, discovery)
                return
        if (
            len(segments) >= 3
            and segments[0] == "apis"
            and f"{segments[1]}/{segments[2]}" == _METRICS_GV
        ):
            if not cluster.metrics_enabled:
                raise _not_served()
            self._metrics(method, segments[3:], query)
            return
        route = self._route(segments)
        dry_run = query.get("dryRun") == "All"
        rt = route.rt
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(query.get("fieldSelector"), rt)
        if route.name is None:
            if route.subresource is not None:
                raise _not_served()
            if method == "GET":
                if route.watch or _go_bool(query.get("watch")):
                    _require_verb(rt, "watch")
                    self._watch(route, labels, fields, query)
                    return
                _require_verb(rt, "list")
                limit = int(query["limit"]) if query.get("limit") else None
                body = cluster.list_objects(
                    rt, route.namespace, labels, fields, limit=limit, cont=query.get("continue")
                )
                self._json(200, body)
                return
            if method == "POST":
                _require_verb(rt, "create")
                if rt.namespaced and route.namespace is None:
                    raise _method_not_allowed()
                created = cluster.create(
                    rt, route.namespace or "", _parse_json(raw), dry_run=dry_run
                )
                self._json(201, created)
                return
            if method == "DELETE":
                _require_verb(rt, "deletecollection")
                options = _delete_options(raw, query)
                self._json(
                    200,
                    cluster.delete_collection(
                        rt, route.namespace, labels, fields, options, dry_run=dry_run
                    ),
                )
                return
            raise _method_not_allowed()
        namespace = route.namespace or ""
        name = route.name
        if route.subresource == "scale":
            self._scale(method, rt, namespace, name, raw, query)
            return
        if method == "GET":
            _require_verb(rt, "get")
            with cluster.lock:
                obj = cluster.get(rt, namespace, name)
            if obj is None:
                raise _not_found(rt, name)
            self._json(200, obj)
            return
        if method == "PUT":
            _require_verb(rt, "update")
            updated = cluster.replace(
                rt,
                namespace,
                name,
                _parse_json(raw),
                subresource=route.subresource,
                dry_run=dry_run,
            )
            self._json(200, updated)
            return
        if method == "PATCH":
            _require_verb(rt, "patch")
            patched, was_created = cluster.patch(
                rt,
                namespace,
                name,
                raw,
                self.headers.get("Content-Type", ""),
                subresource=route.subresource,
                dry_run=dry_run,
                field_manager=query.get("fieldManager"),
            )
            self._json(201 if was_created else 200, patched)
            return
        if method == "DELETE" and route.subresource is None:
            _require_verb(rt, "delete")
            options = _delete_options(raw, query)
            self._json(200, cluster.delete(rt, namespace, name, options, dry_run=dry_run))
            return
        raise _method_not_allowed()

    def _route(self, segments: list[str]) -> _Route:
        cluster = self.emulator.cluster
        if len(segments) >= 2 and segments[0] == "api" and segments[1] == "v1":
            group_version, rest = "v1", segments[2:]
        elif len(segments) >= 4 and segments[0] == "apis":
            group_version, rest = f"{segments[1]}/{segments[2]}", segments[3:]
        else:
            raise _not_served()
        watch = False
        if rest and rest[0] == "watch":
            watch, rest = True, rest[1:]
        namespace = name = subresource = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            if len(rest) > 5:
                raise _not_served()
            namespace, plural = rest[1], rest[2]
            name = rest[3] if len(rest) > 3 else None
            subresource = rest[4] if len(rest) > 4 else None
        elif rest:
            if len(rest) > 3:
                raise _not_served()
            plural = rest[0]
            name = rest[1] if len(rest) > 1 else None
            subresource = rest[2] if len(rest) > 2 else None
        else:
            raise _not_served()
        with cluster.lock:
            rt = cluster.types.get((group_version, plural))
        if rt is None:
            raise _not_served()
        if (rt.namespaced and namespace is None and name is not None) or (
            not rt.namespaced and namespace is not None
        ):
            raise _not_served()
        if subresource not in (None, "status", "scale"):
            raise _not_served()
        if (subresource == "status" and not rt.status) or (subresource == "scale" and not rt.scale):
            raise _not_served()
        return _Route(rt, namespace, name, subresource, watch)

    def _discovery(self, segments: list[str]) -> JSON | None:
        cluster = self.emulator.cluster
        with cluster.lock:
            types = list(cluster.types.values())
            metrics = cluster.metrics_enabled
        if metrics:
            types += list(METRICS_TYPES)
        if not segments:
            paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]
            paths += sorted({f"/apis/{rt.group_version}" for rt in types if rt.group})
            return {"paths": paths}
        if segments == ["api"]:
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {
                        "clientCIDR": "0.0.0.0/0",
                        "serverAddress": f"{self.emulator.host}:{self.emulator.port}",
                    }
                ],
            }
        if segments == ["api", "v1"]:
            return _resource_list("v1", types)
        groups: dict[str, list[str]] = {}
        for rt in types:
            if rt.group and rt.version not in groups.setdefault(rt.group, []):
                groups[rt.group].append(rt.version)
        if segments == ["apis"]:
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_group_entry(g, v) for g, v in groups.items()],
            }
        if len(segments) == 2 and segments[0] == "apis":
            if segments[1] not in groups:
                raise _not_served()
            return {
                "kind": "APIGroup",
                "apiVersion": "v1",
                **_group_entry(segments[1], groups[segments[1]]),
            }
        if len(segments) == 3 and segments[0] == "apis":
            group_version = f"{segments[1]}/{segments[2]}"
            if segments[2] not in groups.get(segments[1], []):
                raise _not_served()
            return _resource_list(group_version, types)
        return None

    def _scale(
        self,
        method: str,
        rt: ResourceType,
        namespace: str,
        name: str,
        raw: bytes,
        query: dict[str, str],
    ) -> None:
        cluster = self.emulator.cluster
        with cluster.lock:
            obj = cluster.get(rt, namespace, name)
            if obj is None:
                raise _not_found(rt, name)
            scale = _scale_of(obj)
            if method == "GET":
                self._json(200, scale)
                return
            if method == "PUT":
                wanted = _parse_json(raw)
            elif method == "PATCH":
                kind = self.headers.get("Content-Type", "").split(";")[0].strip()
                wanted = _apply_patch(kind, scale, _parse_json(raw), strategic=False)
            else:
                raise _method_not_allowed()
            if not isinstance(wanted, dict):
                raise _bad_request("a Scale must be an object")
            wanted_rv = (wanted.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != obj["metadata"]["resourceVersion"]:
                raise _conflict(rt, name)
            replicas = (wanted.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise _invalid(
                    rt,
                    name,
                    [
                        _invalid_value(
                            "spec.replicas", replicas, "must be greater than or equal to 0"
                        )
                    ],
                )
            updated = copy.deepcopy(obj)
            updated.setdefault("spec", {})["replicas"] = replicas
            stored = cluster._update(rt, obj, updated, None, query.get("dryRun") == "All")
            self._json(200, _scale_of(stored))

    def _watch(
        self,
        route: _Route,
        labels: list[_Requirement],
        fields: list[_FieldRequirement],
        query: dict[str, str],
    ) -> None:
        emulator = self.emulator
        cluster = emulator.cluster
        try:
            timeout = float(query.get("timeoutSeconds") or 1800)
        except ValueError:
            raise _bad_request("timeoutSeconds must be a number") from None
        bookmarks = _go_bool(query.get("allowWatchBookmarks"))
        lines, watcher = cluster.subscribe(
            route.rt, route.namespace, labels, fields, query.get("resourceVersion")
        )
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        try:
            if lines:
                self._chunk("".join(lines))
            if watcher is None:
                return
            start = time.monotonic()
            deadline = start + timeout
            next_bookmark = start + emulator.bookmark_interval
            while not emulator._stopping.is_set():
                now = time.monotonic()
                if now >= deadline:
                    break
                try:
                    event: _Event | None = watcher.queue.get(timeout=min(0.25, deadline - now))
                except queue.Empty:
                    event = None
                if event is not None:
                    out = []
                    while event is not None:
                        line = watcher.render(event)
                        if line:
                            out.append(line)
                        try:
                            event = watcher.queue.get_nowait()
                        except queue.Empty:
                            event = None
                    if out:
                        self._chunk("".join(out))
                elif self._client_gone():
                    break
                if bookmarks and time.monotonic() >= next_bookmark:
                    next_bookmark = time.monotonic() + emulator.bookmark_interval
                    with cluster.lock:
                        quiet = watcher.queue.empty()
                        current = str(cluster.rv)
                    if quiet:
                        bookmark = {
                            "kind": route.rt.kind,
                            "apiVersion": route.rt.group_version,
                            "metadata": {"resourceVersion": current},
                        }
                        self._chunk(_watch_line("BOOKMARK", json.dumps(bookmark)))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            if watcher is not None:
                cluster.unsubscribe(watcher)

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:
                return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True
        return False

    # -- metrics.k8s.io ------------------------------------------------------------------

    def _metrics(self, method: str, rest: list[str], query: dict[str, str]) -> None:
        if method != "GET":
            raise _method_not_allowed()
        cluster = self.emulator.cluster
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or rest[0] not in ("pods", "nodes") or len(rest) > 2:
            raise _not_served()
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        labels = parse_label_selector(query.get("labelSelector"))
        metrics_rt = next(rt for rt in METRICS_TYPES if rt.plural == plural)
        with cluster.lock:
            if plural == "pods":
                items = [
                    _pod_metrics(cluster, p)
                    for p in cluster.select(_POD, namespace, labels)
                    if p.get("status", {}).get("phase") == "Running"
                ]
            else:
                items = [_node_metrics(cluster, n) for n in cluster.select(_NODE, None, labels)]
        if name is not None:
            for item in items:
                if item["metadata"]["name"] == name:
                    self._json(200, item)
                    return
            raise ApiError(
                404,
                "NotFound",
                f'{metrics_rt.singular.lower()}.metrics.k8s.io "{name}" not found',
                {"name": name, "group": "metrics.k8s.io", "kind": plural},
            )
        self._json(
            200,
            {
                "kind": f"{metrics_rt.kind}List",
                "apiVersion": _METRICS_GV,
                "metadata": {},
                "items": items,
            },
        )

    # -- the control endpoint for other processes ----------------------------------------

    def _control(self, method: str, path: str, raw: bytes) -> None:
        emulator = self.emulator
        body = _parse_json(raw) if raw else {}
        if not isinstance(body, dict):
            raise _bad_request("the control endpoints take a JSON object")
        if path == "/_emulator/faults":
            if method == "DELETE":
                emulator.clear_faults()
            elif method == "POST":
                _apply_control(emulator, body)
            elif method != "GET":
                raise _method_not_allowed()
            with emulator.cluster.lock:
                state = emulator.cluster.faults.describe()
                state["metrics"] = emulator.cluster.metrics_enabled
                state["readyDelay"] = emulator.cluster.ready_delay
            self._json(200, state)
            return
        if path == "/_emulator/crds" and method == "POST":
            names = body.get("names") or []
            self._json(200, {"installed": emulator.install_operator_crds(*names)})
            return
        if path == "/_emulator/usage" and method == "POST":
            emulator.set_pod_usage(
                body["namespace"],
                body["pod"],
                cpu=body["cpu"],
                memory=body["memory"],
                container=body.get("container"),
            )
            self._json(200, {"ok": True})
            return
        if path == "/_emulator/state" and method == "GET":
            self._json(200, emulator.snapshot())
            return
        raise _not_served()


def _plural_hint(segments: list[str]) -> str | None:
    if len(segments) >= 3 and segments[:2] == ["api", "v1"]:
        rest = segments[2:]
    elif len(segments) >= 4 and segments[0] == "apis":
        rest = segments[3:]
    else:
        return None
    if rest and rest[0] == "watch":
        rest = rest[1:]
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        return rest[2]
    return rest[0] if rest else None


def _go_bool(value: str | None) -> bool:
    """Query booleans as Go's strconv.ParseBool reads them (the client sends ``True``)."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _require_verb(rt: ResourceType, verb: str) -> None:
    if verb not in rt.verbs:
        raise _method_not_allowed()


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError as exc:
        raise _bad_request(f"couldn't get version/kind; json parse error: {exc}") from None


def _delete_options(raw: bytes, query: dict[str, str]) -> JSON:
    options: JSON = {}
    if raw.strip():
        parsed = _parse_json(raw)
        if isinstance(parsed, dict):
            options.update(parsed)
    if query.get("propagationPolicy"):
        options["propagationPolicy"] = query["propagationPolicy"]
    if query.get("orphanDependents"):
        options["orphanDependents"] = _go_bool(query["orphanDependents"])
    return options


def _resource_list(group_version: str, types: Iterable[ResourceType]) -> JSON:
    resources: list[JSON] = []
    for rt in sorted(
        (t for t in types if t.group_version == group_version), key=lambda t: t.plural
    ):
        entry: JSON = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(rt.verbs),
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        resources.append(entry)
        if rt.status:
            resources.append(
                {
                    "name": f"{rt.plural}/status",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        if rt.scale:
            resources.append(
                {
                    "name": f"{rt.plural}/scale",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "group": "autoscaling",
                    "version": "v1",
                    "kind": "Scale",
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def _group_entry(group: str, versions: list[str]) -> JSON:
    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": listed, "preferredVersion": listed[0]}


def _scale_of(obj: JSON) -> JSON:
    meta = obj["metadata"]
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
        "status": {
            "replicas": (obj.get("status") or {}).get("replicas", 0),
            "selector": _selector_string((obj.get("spec") or {}).get("selector")),
        },
    }


def _usage_for(cluster: _Cluster, pod: JSON, container: JSON) -> tuple[Fraction, Fraction]:
    namespace, name = _ns(pod), _name(pod)
    pinned = cluster.pod_usage.get(
        (namespace, name, container.get("name"))
    ) or cluster.pod_usage.get((namespace, name, None))
    if pinned is not None:
        return parse_quantity(pinned[0]), parse_quantity(pinned[1])
    requests = (container.get("resources") or {}).get("requests") or {}
    cpu = parse_quantity(requests["cpu"]) / 4 if "cpu" in requests else Fraction(2, 1000)
    memory = (
        parse_quantity(requests["memory"]) / 2 if "memory" in requests else Fraction(16 * 2**20)
    )
    return cpu, memory


def _cpu_text(value: Fraction) -> str:
    return f"{math.ceil(value * 10**9)}n"


def _memory_text(value: Fraction) -> str:
    return f"{math.ceil(value / 1024)}Ki"


def _metrics_item(kind: str, measured: JSON, window: str, **usage: Any) -> JSON:
    """A metrics.k8s.io item for ``measured`` (a pod or node), sampled now."""
    stamp = _now()
    metadata: JSON = {"name": _name(measured)}
    if _ns(measured):
        metadata["namespace"] = _ns(measured)
    return {
        "kind": kind,
        "apiVersion": _METRICS_GV,
        "metadata": {
            **metadata,
            "creationTimestamp": stamp,
            "labels": dict(_labels_of(measured)),
        },
        "timestamp": stamp,
        "window": window,
        **usage,
    }


def _pod_metrics(cluster: _Cluster, pod: JSON) -> JSON:
    containers = []
    for container in pod.get("spec", {}).get("containers") or []:
        cpu, memory = _usage_for(cluster, pod, container)
        containers.append(
            {
                "name": container.get("name"),
                "usage": {"cpu": _cpu_text(cpu), "memory": _memory_text(memory)},
            }
        )
    return _metrics_item("PodMetrics", pod, "15s", containers=containers)


def _node_metrics(cluster: _Cluster, node: JSON) -> JSON:
    cpu = Fraction(1, 10)
    memory = Fraction(512 * 2**20)
    for pod in cluster.select(_POD):
        if (
            pod.get("spec", {}).get("nodeName") == _name(node)
            and pod.get("status", {}).get("phase") == "Running"
        ):
            for container in pod["spec"].get("containers") or []:
                used = _usage_for(cluster, pod, container)
                cpu += used[0]
                memory += used[1]
    return _metrics_item(
        "NodeMetrics",
        node,
        "20s",
        usage={"cpu": _cpu_text(cpu), "memory": _memory_text(memory)},
    )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _apply_control(emulator: KubeEmulator, body: JSON) -> None:
    """``POST /_emulator/faults``: the same faults as the Python methods, as JSON::

    {"clear": true,
     "failImages": ["postgres:99*"],
     "unschedulable": [{"pattern": "db-*", "namespace": "team-a", "message": "..."}],
     "failNext": {"count": 3, "status": 503, "methods": ["POST"], "resource": "statefulsets"},
     "conflicts": [{"groupVersion": "apps/v1", "plural": "statefulsets",
                    "namespace": "team-a", "name": "db", "count": 1}],
     "metrics": false,
     "readyDelay": 0.5}
    """
    if body.get("clear"):
        emulator.clear_faults()
    for pattern in _as_list(body.get("failImages")):
        emulator.fail_images(str(pattern))
    for raw in _as_list(body.get("unschedulable")):
        item = raw if isinstance(raw, dict) else {"pattern": str(raw)}
        emulator.make_unschedulable(
            item.get("pattern", "*"),
            namespace=item.get("namespace"),
            message=item.get("message") or DEFAULT_UNSCHEDULABLE_MESSAGE,
        )
    for item in _as_list(body.get("failNext")):
        emulator.fail_next(
            int(item.get("count", 1)),
            int(item.get("status", 503)),
            methods=item.get("methods"),
            resource=item.get("resource"),
        )
    for item in _as_list(body.get("conflicts")):
        emulator.inject_conflicts(
            item["groupVersion"],
            item["plural"],
            item["name"],
            namespace=item.get("namespace"),
            count=int(item.get("count", 1)),
        )
    if "metrics" in body:
        emulator.enable_metrics(bool(body["metrics"]))
    if "readyDelay" in body:
        emulator.ready_delay = float(body["readyDelay"])


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m kidp.kube_emulator``: serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m kidp.kube_emulator",
        description="A local stand-in for the Kubernetes API server (tests, demo, benchmark).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for this server here")
    parser.add_argument("--context", default="kidp-emulator")
    parser.add_argument("--namespace", default="default", help="the kubeconfig's namespace")
    parser.add_argument(
        "--token", default="kidp-test-token", help="required bearer token; '' accepts any"
    )
    parser.add_argument("--ready-delay", type=float, default=0.2)
    parser.add_argument("--no-metrics", action="store_true", help="do not serve metrics.k8s.io")
    parser.add_argument(
        "--crds",
        nargs="*",
        metavar="NAME",
        help="install operator CRDs (postgresql, redisfailover, kafkatopic); no NAME means all",
    )
    parser.add_argument("--state", help="load objects from this file at start, save them at stop")
    parser.add_argument("--history-limit", type=int, default=10_000)
    args = parser.parse_args(argv)
    emulator = start_kubernetes_emulator(
        args.host,
        args.port,
        ready_delay=args.ready_delay,
        token=args.token or None,
        metrics=not args.no_metrics,
        history_limit=args.history_limit,
        state_file=args.state,
    )
    if args.crds is not None:
        emulator.install_operator_crds(*args.crds)
    if args.kubeconfig:
        emulator.write_kubeconfig(args.kubeconfig, context=args.context, namespace=args.namespace)
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print(emulator.url, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def start_onprem(state_dir: Path) -> EmulatedCloud:
    """:data:`kidp.emulator.EMULATORS` starter for on-prem: this stand-in (its
    objects in memory, like every emulated cloud's), found through
    ``KUBECONFIG`` as kubectl would find it."""
    from kidp.emulator import EmulatedCloud

    kube = start_kubernetes_emulator()
    kubeconfig = kube.write_kubeconfig(state_dir / "kubeconfig")
    return EmulatedCloud(provider="onprem", environ={"KUBECONFIG": str(kubeconfig)}, stop=kube.stop)
