"""The on-prem provider: a Kubernetes cluster, through the official client.

:mod:`~kidp.providers.onprem.provider` holds :class:`KubernetesProvider`,
:mod:`~kidp.providers.onprem.api` the API wrapper it shares with the Kubernetes
secret store, :mod:`~kidp.providers.onprem.watcher` the change watcher, and
:mod:`~kidp.providers.onprem.manifests` the pure builders of the objects it
sends, one module per path (StatefulSet, Deployment, each operator's resource).
"""

from kidp.providers.onprem.api import (
    BUILTIN_KINDS,
    CONFIG_MAP,
    DEPLOYMENT,
    EVENT,
    IN_CLUSTER,
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
    Refused,
    decode_secret,
    labels_of,
    load_api_client,
    redact,
    selector_string,
)
from kidp.providers.onprem.provider import PROVIDER_NAME, KubernetesProvider
from kidp.providers.onprem.watcher import WATCHED_KINDS, KubernetesChangeWatcher, WatchedKind

__all__ = [
    "BUILTIN_KINDS",
    "CONFIG_MAP",
    "DEPLOYMENT",
    "EVENT",
    "IN_CLUSTER",
    "KAFKA",
    "KAFKA_TOPIC",
    "LIMIT_RANGE",
    "POD",
    "POD_METRICS",
    "PROVIDER_NAME",
    "PVC",
    "QUOTA",
    "REDIS_FAILOVER",
    "SECRET",
    "SERVICE",
    "STATEFUL_SET",
    "WATCHED_KINDS",
    "ZALANDO",
    "AlreadyExists",
    "Kind",
    "KubeApi",
    "KubernetesChangeWatcher",
    "KubernetesProvider",
    "Refused",
    "WatchedKind",
    "decode_secret",
    "labels_of",
    "load_api_client",
    "redact",
    "selector_string",
]
