"""The Kubernetes objects the on-prem provider creates, as plain dicts.

Pure functions only: no API calls and no ``kubernetes`` import, so every
manifest can be built, inspected and validated (``kubernetes-validate``) in a
test without a cluster. :mod:`kidp.providers.onprem` sends them.

What one deployment becomes
===========================

=========================  ==================================================
request                    objects (all in the deployment's namespace)
=========================  ==================================================
database / cache (plain)   Secret ``<name>-credentials``, headless Service
                           ``<name>-hl``, client Service ``<name>``,
                           StatefulSet ``<name>`` (+ ConfigMap ``<name>-config``
                           for PostgreSQL), volumeClaimTemplate ``data``
database postgresql with   Secret ``<name>-credentials``, the operator's user
zalando postgres-operator  Secret, ``postgresql`` ``<team>-<name>`` (the
                           operator makes its StatefulSet and Services), client
                           Service ``<name>`` on the current primary
redis with spotahome       Secret ``<name>-credentials`` (``auth.secretPath``),
redis-operator             ``RedisFailover`` ``<name>``, client Service
                           ``<name>`` on the current master
topic (Strimzi only)       ``KafkaTopic`` in the Kafka cluster's namespace
cache memcached            Deployment + Service ``<name>`` (no credentials)
service                    Deployment + Service ``<name>``
=========================  ==================================================

Every object carries the five tracking labels (``tags.encode`` with the
``kubernetes`` dialect) plus the ``app.kubernetes.io`` recommended labels.

Images are pinned to exact tags per catalogue version (:data:`IMAGES`), so a
pod restart never silently changes the engine; the tag is also how drift
reads the running version back (:func:`version_from_image`).

Pods are hardened as far as each image allows: they start as the image's own
non-root user (:data:`ENGINE_USERS`; a ``service`` as :data:`SERVICE_USER`),
drop every capability, cannot escalate, use the RuntimeDefault seccomp
profile, mount no service-account token and have a read-only root filesystem,
with emptyDirs where the image writes (:data:`SCRATCH_PATHS`). So a
``service`` image must run as an arbitrary non-root uid, listen on a port
above 1023 and write only to /tmp. ``scripts/check-k8s.sh`` scans a sample of
everything built here (:func:`sample_objects`) with checkov; what cannot pass
is skipped per object by ``checkov.io/skipN`` annotations with the reason.

Sizes follow the catalogue presets (seed 001: small 1 CPU/2Gi ... xlarge
8 CPU/16Gi) with requests equal to limits: databases get the Guaranteed QoS
class (last to be evicted) and a namespace ResourceQuota on ``limits.*`` can
always be checked.
"""

from kidp.providers.onprem.manifests.common import (
    APP,
    CONNECTION_SECRET_ANNOTATION,
    DATA_PATHS,
    ENGINE_USERS,
    HA_REPLICAS,
    IMAGES,
    MAX_LABEL,
    MAX_WORKLOAD,
    MAX_ZALANDO,
    POD_NAME_LABEL,
    RESTART_ANNOTATION,
    SCRATCH_PATHS,
    SECRET_DATA_PASSWORD,
    SECRET_DATA_PREVIOUS,
    SECRET_DATA_USERNAME,
    SENTINELS_HA,
    SERVICE_USER,
    Target,
    client_service_name,
    config_map_name,
    credentials_secret,
    credentials_secret_name,
    fit,
    format_cpu,
    gib,
    headless_service_name,
    namespace_object,
    parse_quantity,
    plain_ha_supported,
    service_dns,
    short_hash,
    size_of,
    size_resources,
    version_from_image,
    workload_name,
    zalando_user_secret_name,
)
from kidp.providers.onprem.manifests.deployment import (
    deployment_objects,
)
from kidp.providers.onprem.manifests.kafkatopic import (
    STRIMZI_CLUSTER_LABEL,
    STRIMZI_GROUP,
    STRIMZI_KAFKA_PLURAL,
    STRIMZI_TOPIC_PLURAL,
    kafka_topic_name,
    kafka_topic_objects,
)
from kidp.providers.onprem.manifests.quota import (
    quota_needs,
)
from kidp.providers.onprem.manifests.redisfailover import (
    SPOTAHOME_GROUP,
    SPOTAHOME_MASTER_LABELS,
    SPOTAHOME_PLURAL,
    SPOTAHOME_VERSION,
    redis_failover_objects,
)
from kidp.providers.onprem.manifests.samples import (
    SAMPLE_DEPLOYMENT_LABEL,
    SAMPLE_NAMESPACE,
    SAMPLE_PASSWORD,
    SAMPLE_SERVICE_IMAGE,
    SAMPLE_USERNAME,
    operator_objects,
    plain_objects,
    sample_deployment,
    sample_objects,
    sample_target,
    sample_targets,
)
from kidp.providers.onprem.manifests.statefulset import (
    stateful_objects,
)
from kidp.providers.onprem.manifests.zalando import (
    SPILO_MASTER_LABELS,
    ZALANDO_GROUP,
    ZALANDO_PLURAL,
    ZALANDO_VERSION,
    zalando_client_service,
    zalando_cluster_name,
    zalando_objects,
    zalando_user_secret,
)

__all__ = [
    "APP",
    "CONNECTION_SECRET_ANNOTATION",
    "DATA_PATHS",
    "ENGINE_USERS",
    "HA_REPLICAS",
    "IMAGES",
    "MAX_LABEL",
    "MAX_WORKLOAD",
    "MAX_ZALANDO",
    "POD_NAME_LABEL",
    "RESTART_ANNOTATION",
    "SAMPLE_DEPLOYMENT_LABEL",
    "SAMPLE_NAMESPACE",
    "SAMPLE_PASSWORD",
    "SAMPLE_SERVICE_IMAGE",
    "SAMPLE_USERNAME",
    "SCRATCH_PATHS",
    "SECRET_DATA_PASSWORD",
    "SECRET_DATA_PREVIOUS",
    "SECRET_DATA_USERNAME",
    "SENTINELS_HA",
    "SERVICE_USER",
    "SPILO_MASTER_LABELS",
    "SPOTAHOME_GROUP",
    "SPOTAHOME_MASTER_LABELS",
    "SPOTAHOME_PLURAL",
    "SPOTAHOME_VERSION",
    "STRIMZI_CLUSTER_LABEL",
    "STRIMZI_GROUP",
    "STRIMZI_KAFKA_PLURAL",
    "STRIMZI_TOPIC_PLURAL",
    "ZALANDO_GROUP",
    "ZALANDO_PLURAL",
    "ZALANDO_VERSION",
    "Target",
    "client_service_name",
    "config_map_name",
    "credentials_secret",
    "credentials_secret_name",
    "deployment_objects",
    "fit",
    "format_cpu",
    "gib",
    "headless_service_name",
    "kafka_topic_name",
    "kafka_topic_objects",
    "namespace_object",
    "operator_objects",
    "parse_quantity",
    "plain_ha_supported",
    "plain_objects",
    "quota_needs",
    "redis_failover_objects",
    "sample_deployment",
    "sample_objects",
    "sample_target",
    "sample_targets",
    "service_dns",
    "short_hash",
    "size_of",
    "size_resources",
    "stateful_objects",
    "version_from_image",
    "workload_name",
    "zalando_client_service",
    "zalando_cluster_name",
    "zalando_objects",
    "zalando_user_secret",
    "zalando_user_secret_name",
]
