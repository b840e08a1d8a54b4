"""A sample of everything the provider generates, for the checks that run
without a cluster.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from kidp import catalog, tags
from kidp.models import DeletionPolicy, Deployment, ResourceSpec, ResourceType, Size
from kidp.providers.onprem.manifests.common import (
    Target,
    client_service_name,
    credentials_secret,
    namespace_object,
    plain_ha_supported,
    service_dns,
)
from kidp.providers.onprem.manifests.deployment import deployment_objects
from kidp.providers.onprem.manifests.kafkatopic import STRIMZI_GROUP, kafka_topic_objects
from kidp.providers.onprem.manifests.redisfailover import redis_failover_objects
from kidp.providers.onprem.manifests.statefulset import stateful_objects
from kidp.providers.onprem.manifests.zalando import (
    zalando_client_service,
    zalando_objects,
    zalando_user_secret,
)

# --- a sample of everything the provider generates ---------------------------
# One matrix for every check that runs without a cluster: the tests validate it
# against the Kubernetes schemas, scripts/render-generated.py writes it out for
# checkov. Values are placeholders; shapes are the provider's.

SAMPLE_NAMESPACE = "team-platform"
SAMPLE_DEPLOYMENT_LABEL = tags.encode_key(tags.DEPLOYMENT_ID, dialect="kubernetes")
SAMPLE_SERVICE_IMAGE = "ghcr.io/example/user-api:1.4.2"
SAMPLE_USERNAME = "kidpadmin"
SAMPLE_PASSWORD = "p" * 32  # a placeholder: shapes matter here, not values


def sample_deployment(
    resource_type: ResourceType = ResourceType.DATABASE,
    *,
    name: str = "app-db",
    namespace: str = SAMPLE_NAMESPACE,
    policy: DeletionPolicy = DeletionPolicy.DELETE,
    **spec: Any,
) -> Deployment:
    """A deployment record as the broker stores it, its spec normalised by the
    catalogue; a database without an engine is PostgreSQL 15."""
    if resource_type is ResourceType.DATABASE and "engine" not in spec:
        spec["engine"] = "postgresql"
        spec.setdefault("version", "15")
    normalized = catalog.normalize(resource_type, ResourceSpec(**spec), catalog.ENGINES)
    return Deployment(
        id="deploy-" + "ab" * 16,
        namespace=namespace,
        resource_type=resource_type,
        resource_name=name,
        team="platform-team",
        owner="owner@example.com",
        application="user-service",
        resource_uid="550e8400-e29b-41d4-a716-446655440000",
        callback_url=None,
        spec=normalized,
        spec_fingerprint="x",
        deletion_policy=policy,
        provider="onprem",
        region="sample",
    )


def sample_target(deployment: Deployment, *, storage_class: str | None = None) -> Target:
    """``deployment`` as the provider targets it, with the default tag prefix."""
    return Target(
        deployment=deployment,
        namespace=deployment.namespace,
        tag_labels=tags.encode(tags.logical_tags(deployment), dialect="kubernetes"),
        deployment_label=SAMPLE_DEPLOYMENT_LABEL,
        storage_class=storage_class,
    )


def sample_targets(sizes: Iterable[Size] = tuple(Size)) -> list[Target]:
    """Every engine, version and highAvailability the provider accepts on the
    plain path, in ``sizes``, with both deletion policies and with/without a
    storage class; and a ``service`` in each size, with and without HA."""
    sizes = tuple(sizes)
    found: list[Target] = []
    for rtype in (ResourceType.DATABASE, ResourceType.CACHE):
        for engine, versions in catalog.ENGINES[rtype].items():
            for version, size, ha in itertools.product(versions, sizes, (False, True)):
                if ha and not plain_ha_supported(engine):
                    continue
                for policy, storage_class in (
                    (DeletionPolicy.DELETE, None),
                    (DeletionPolicy.RETAIN, "fast-ssd"),
                ):
                    dep = sample_deployment(
                        rtype,
                        engine=engine,
                        version=version,
                        size=size,
                        high_availability=ha,
                        policy=policy,
                    )
                    found.append(sample_target(dep, storage_class=storage_class))
    for size, ha in itertools.product(sizes, (False, True)):
        dep = sample_deployment(
            ResourceType.SERVICE,
            name="user-api",
            image=SAMPLE_SERVICE_IMAGE,
            port=8080,
            size=size,
            high_availability=ha,
        )
        found.append(sample_target(dep))
    return found


def plain_objects(target: Target) -> list[dict[str, Any]]:
    """What the provider sends on the plain (operator-less) path, Secret first."""
    objects: list[dict[str, Any]] = []
    if target.engine != "memcached" and target.deployment.resource_type is not ResourceType.SERVICE:
        objects.append(
            credentials_secret(
                target,
                username=SAMPLE_USERNAME,
                password=SAMPLE_PASSWORD,
                endpoint=service_dns(client_service_name(target.name), target.namespace),
                port=target.port,
            )
        )
    if target.deployment.resource_type is ResourceType.SERVICE or target.engine == "memcached":
        return objects + deployment_objects(target)
    return objects + stateful_objects(target)


def operator_objects(target: Target) -> list[dict[str, Any]]:
    """What the provider sends when an operator runs ``target``: the zalando
    postgres-operator for PostgreSQL, spotahome's redis-operator for Redis."""
    secret = credentials_secret(
        target,
        username=SAMPLE_USERNAME,
        password=SAMPLE_PASSWORD,
        endpoint=service_dns(client_service_name(target.name), target.namespace),
        port=target.port,
    )
    if target.engine == "postgresql":
        return [
            secret,
            zalando_user_secret(target, username=SAMPLE_USERNAME, password=SAMPLE_PASSWORD),
            *zalando_objects(target, SAMPLE_USERNAME),
            zalando_client_service(target),
        ]
    if target.engine == "redis":
        return [secret, *redis_failover_objects(target)]
    raise ValueError(f"no operator runs {target.engine!r}")


def sample_objects(sizes: Iterable[Size] = (Size.SMALL,)) -> dict[str, list[dict[str, Any]]]:
    """Every kind of object the provider generates, grouped by what produced it
    (``<path>-<type>-<engine>-<version>-<size>-<ha|single>-<policy>``): the
    plain matrix in ``sizes``, both operators' resources with and without HA,
    a Kafka topic and a new namespace. Sizes change only quantities, so one is
    representative. Raises ``ValueError`` if two targets would share a group,
    since one would silently replace the other."""
    sizes = tuple(sizes)
    groups: dict[str, list[dict[str, Any]]] = {}

    def add(path: str, target: Target, objects: list[dict[str, Any]]) -> None:
        spec = target.deployment.spec
        parts = [
            path,
            target.deployment.resource_type.value,
            target.engine,
            spec.version or "",
            target.size.value,
            "ha" if spec.high_availability else "single",
            target.deployment.deletion_policy.value.lower(),
        ]
        group = "-".join(part.replace(".", "_") for part in parts if part)
        if group in groups:
            raise ValueError(f"two sample targets share the group {group!r}")
        groups[group] = objects

    for target in sample_targets(sizes):
        add("plain", target, plain_objects(target))
    for engine, version in (("postgresql", "15"), ("redis", "7.2")):
        for size, ha in itertools.product(sizes, (False, True)):
            dep = sample_deployment(engine=engine, version=version, size=size, high_availability=ha)
            target = sample_target(dep, storage_class="fast-ssd")
            add("operator", target, operator_objects(target))
    topic = sample_target(
        sample_deployment(ResourceType.TOPIC, name="orders", engine="kafka", partitions=6)
    )
    add(
        "strimzi",
        topic,
        kafka_topic_objects(
            topic,
            kafka_cluster="events",
            kafka_namespace="kafka",
            api_version=f"{STRIMZI_GROUP}/v1beta2",
        ),
    )
    groups["namespace"] = [namespace_object(SAMPLE_NAMESPACE, topic.tag_labels)]
    return groups
