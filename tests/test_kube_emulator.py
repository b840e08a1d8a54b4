"""The Kubernetes API stand-in, exercised through the real ``kubernetes`` client.

What the on-prem provider relies on must behave as on a real API server:
statuses and Status bodies, selectors, patch kinds, resourceVersion conflicts,
watches, controllers that produce realistic status, faults and quota refusals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from kidp.kube_emulator import (  # noqa: E402
    OPERATOR_CRDS,
    KubeEmulator,
    canonical_quantity,
    format_quantity,
    json_patch,
    labels_match,
    parse_label_selector,
    parse_quantity,
    start_kubernetes_emulator,
    strategic_merge_patch,
)

ROOT = Path(__file__).resolve().parents[1]


def wait_for(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll until ``check()`` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


def read_or_none(read: Callable[..., Any], *args: Any) -> Any:
    """``read(*args)``, or None while the object does not exist yet."""
    try:
        return read(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def status_of(exc: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


@pytest.fixture(scope="module")
def emulator() -> Iterator[KubeEmulator]:
    emu = start_kubernetes_emulator(ready_delay=0.05)
    yield emu
    emu.stop()


@pytest.fixture
def kube(emulator: KubeEmulator) -> Iterator[KubeEmulator]:
    emulator.clear_faults()
    emulator.enable_metrics(True)
    yield emulator
    emulator.clear_faults()


@pytest.fixture
def ns(kube: KubeEmulator) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube.create_namespace(name)
    return name


@pytest.fixture
def core(kube: KubeEmulator) -> Any:
    return client.CoreV1Api(kube.api_client())


@pytest.fixture
def apps(kube: KubeEmulator) -> Any:
    return client.AppsV1Api(kube.api_client())


@pytest.fixture
def custom(kube: KubeEmulator) -> Any:
    return client.CustomObjectsApi(kube.api_client())


def selected_pods(labels: dict[str, str], container: Any) -> dict[str, Any]:
    """A workload's ``selector`` and one-container pod ``template``, both on ``labels``."""
    return {
        "selector": client.V1LabelSelector(match_labels=labels),
        "template": client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels=labels),
            spec=client.V1PodSpec(containers=[container]),
        ),
    }


def statefulset(
    name: str,
    *,
    replicas: int = 1,
    image: str = "postgres:16.3",
    labels: dict[str, str] | None = None,
    cpu: str = "250m",
) -> Any:
    labels = labels or {"app": name}
    container = client.V1Container(
        name="db",
        image=image,
        resources=client.V1ResourceRequirements(
            requests={"cpu": cpu, "memory": "256Mi"},
            limits={"cpu": cpu, "memory": "256Mi"},
        ),
        volume_mounts=[client.V1VolumeMount(name="data", mount_path="/data")],
    )
    return client.V1StatefulSet(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1StatefulSetSpec(
            replicas=replicas,
            service_name=name,
            **selected_pods(labels, container),
            volume_claim_templates=[
                client.V1PersistentVolumeClaim(
                    metadata=client.V1ObjectMeta(name="data"),
                    spec=client.V1PersistentVolumeClaimSpec(
                        access_modes=["ReadWriteOnce"],
                        resources=client.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
                    ),
                )
            ],
        ),
    )


def deployment(name: str, *, image: str = "nginx:1.27", replicas: int = 2) -> Any:
    labels = {"app": name}
    container = client.V1Container(
        name="web", image=image, ports=[client.V1ContainerPort(container_port=8080)]
    )
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(replicas=replicas, **selected_pods(labels, container)),
    )


# --------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------


def test_quantities_parse_and_read_back_canonical() -> None:
    assert parse_quantity("500m") == Fraction(1, 2)
    assert parse_quantity("1Gi") == 2**30
    assert parse_quantity("1e3") == 1000
    assert canonical_quantity("1024Mi") == "1Gi"
    assert canonical_quantity("0.5") == "500m"
    assert canonical_quantity("1000m") == "1"
    assert canonical_quantity("1536Mi") == "1536Mi"
    assert canonical_quantity("2000") == "2k"
    assert format_quantity(Fraction(3), binary=False) == "3"
    with pytest.raises(ValueError):
        parse_quantity("lots")


def test_label_selector_grammar() -> None:
    labels = {"metadata": {"labels": {"app": "db", "tier": "data", "env": "prod"}}}
    for selector, expected in [
        ("app=db", True),
        ("app==db", True),
        ("app!=db", False),
        ("tier in (data, cache)", True),
        ("tier notin (data)", False),
        ("env", True),
        ("!env", False),
        ("!missing,app=db,tier in (data)", True),
        ("missing!=x", True),
    ]:
        assert labels_match(parse_label_selector(selector), labels) is expected, selector


def test_patch_helpers() -> None:
    doc = {"spec": {"containers": [{"name": "a", "image": "x:1", "ports": [{"containerPort": 1}]}]}}
    merged = strategic_merge_patch(doc, {"spec": {"containers": [{"name": "a", "image": "x:2"}]}})
    assert merged["spec"]["containers"] == [
        {"name": "a", "image": "x:2", "ports": [{"containerPort": 1}]}
    ]
    patched = json_patch(
        {"a": [1, 2], "b": {"c": 1}},
        [
            {"op": "add", "path": "/a/-", "value": 3},
            {"op": "replace", "path": "/b/c", "value": 2},
            {"op": "move", "from": "/b/c", "path": "/d"},
            {"op": "copy", "from": "/d", "path": "/e"},
            {"op": "test", "path": "/e", "value": 2},
            {"op": "remove", "path": "/a/0"},
        ],
    )
    assert patched == {"a": [2, 3], "b": {}, "d": 2, "e": 2}


# --------------------------------------------------------------------------------------
# CRUD and Status objects
# --------------------------------------------------------------------------------------


def test_crud_with_real_statuses(core: Any, ns: str) -> None:
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings"), data={"a": "1"})
    created = core.create_namespaced_config_map(ns, body)
    assert created.metadata.uid
    assert created.metadata.namespace == ns
    assert created.metadata.creation_timestamp is not None
    first_rv = int(created.metadata.resource_version)

    with pytest.raises(ApiException) as conflict:
        core.create_namespaced_config_map(ns, body)
    assert conflict.value.status == 409
    assert status_of(conflict.value)["reason"] == "AlreadyExists"
    assert status_of(conflict.value)["details"] == {"name": "settings", "kind": "configmaps"}

    with pytest.raises(ApiException) as missing:
        core.read_namespaced_config_map("nope", ns)
    assert missing.value.status == 404
    assert status_of(missing.value)["reason"] == "NotFound"
    assert status_of(missing.value)["message"] == 'configmaps "nope" not found'

    with pytest.raises(ApiException) as no_namespace:
        core.create_namespaced_config_map("does-not-exist", body)
    assert no_namespace.value.status == 404
    assert status_of(no_namespace.value)["details"]["kind"] == "namespaces"

    generated = core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(generate_name="gen-"))
    )
    assert generated.metadata.name.startswith("gen-")
    assert len(generated.metadata.name) == len("gen-") + 5
    assert int(generated.metadata.resource_version) > first_rv

    deleted = core.delete_namespaced_config_map("settings", ns)
    assert deleted.status == "Success"
    with pytest.raises(ApiException) as gone:
        core.delete_namespaced_config_map("settings", ns)
    assert gone.value.status == 404


def test_validation_and_defaulting_as_a_real_server(core: Any, apps: Any, ns: str) -> None:
    with pytest.raises(ApiException) as bad_label:
        core.create_namespaced_config_map(
            ns,
            client.V1ConfigMap(metadata=client.V1ObjectMeta(name="x", labels={"team": "a b"})),
        )
    assert bad_label.value.status == 422
    assert status_of(bad_label.value)["reason"] == "Invalid"
    assert status_of(bad_label.value)["details"]["causes"][0]["field"] == "metadata.labels"

    secret = core.create_namespaced_secret(
        ns,
        client.V1Secret(metadata=client.V1ObjectMeta(name="creds"), string_data={"password": "pw"}),
    )
    assert secret.data == {"password": "cHc="}
    assert secret.string_data is None
    assert secret.type == "Opaque"

    sts = apps.create_namespaced_stateful_set(ns, statefulset("db", cpu="0.5"))
    container = sts.spec.template.spec.containers[0]
    assert container.resources.requests == {"cpu": "500m", "memory": "256Mi"}
    assert container.image_pull_policy == "IfNotPresent"
    assert sts.spec.pod_management_policy == "OrderedReady"
    assert sts.metadata.generation == 1

    with pytest.raises(ApiException) as immutable:
        apps.patch_namespaced_stateful_set(
            "db",
            ns,
            {
                "spec": {
                    "volumeClaimTemplates": [
                        {
                            "metadata": {"name": "data"},
                            "spec": {
                                "accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": "5Gi"}},
                            },
                        }
                    ]
                }
            },
        )
    assert immutable.value.status == 422
    assert (
        "updates to statefulset spec for fields other than" in status_of(immutable.value)["message"]
    )

    service = core.create_namespaced_service(
        ns,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="db"),
            spec=client.V1ServiceSpec(
                selector={"app": "db"}, ports=[client.V1ServicePort(port=5432)]
            ),
        ),
    )
    assert service.spec.cluster_ip.startswith("10.96.")
    assert service.spec.ports[0].target_port == 5432


def test_label_and_field_selectors(core: Any, kube: KubeEmulator, ns: str) -> None:
    other = f"{ns}-b"
    kube.create_namespace(other)
    for namespace, name, labels in [
        (ns, "a", {"app": "db", "tier": "data"}),
        (ns, "b", {"app": "web"}),
        (ns, "c", {"app": "db", "tier": "cache"}),
        (other, "d", {"app": "db", "tier": "data"}),
    ]:
        core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels=labels))
        )

    def names(selector: str, namespace: str | None = ns, fields: str | None = None) -> list[str]:
        kwargs: dict[str, Any] = {"label_selector": selector}
        if fields:
            kwargs["field_selector"] = fields
        if namespace is None:
            items = core.list_config_map_for_all_namespaces(**kwargs).items
        else:
            items = core.list_namespaced_config_map(namespace, **kwargs).items
        return sorted(i.metadata.name for i in items if i.metadata.namespace in (ns, other))

    assert names("app=db") == ["a", "c"]
    assert names("app==db,tier!=cache") == ["a"]
    assert names("tier in (data,cache)") == ["a", "c"]
    assert names("tier notin (data)") == ["b", "c"]
    assert names("tier") == ["a", "c"]
    assert names("!tier") == ["b"]
    assert names("app=db", namespace=None) == ["a", "c", "d"]
    assert names("", fields="metadata.name=b") == ["b"]
    assert names("app=db", namespace=None, fields=f"metadata.namespace={other}") == ["d"]

    with pytest.raises(ApiException) as bad_field:
        core.list_namespaced_config_map(ns, field_selector="data.a=1")
    assert bad_field.value.status == 400

    page = core.list_namespaced_config_map(ns, limit=2)
    assert len(page.items) == 2
    assert page.metadata._continue
    rest = core.list_namespaced_config_map(ns, limit=2, _continue=page.metadata._continue)
    assert [i.metadata.name for i in rest.items] == ["c"]

    core.delete_collection_namespaced_config_map(ns, label_selector="app=db")
    assert names("") == ["b"]


def test_patch_kinds(core: Any, apps: Any, custom: Any, kube: KubeEmulator, ns: str) -> None:
    apps.create_namespaced_deployment(ns, deployment("web"))
    # The client sends a dict body to a built-in as a strategic merge patch: containers
    # merge by name, so the port survives an image change.
    patched = apps.patch_namespaced_deployment(
        "web",
        ns,
        {"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:1.28"}]}}}},
    )
    container = patched.spec.template.spec.containers[0]
    assert container.image == "nginx:1.28"
    assert container.ports[0].container_port == 8080
    assert patched.metadata.generation == 2

    core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg"), data={"a": "1", "b": "2"})
    )
    merged = core.patch_namespaced_config_map(
        "cfg",
        ns,
        {"data": {"a": None, "c": "3"}},
        _content_type="application/merge-patch+json",
    )
    assert merged.data == {"b": "2", "c": "3"}

    json_patched = core.patch_namespaced_config_map(
        "cfg",
        ns,
        [
            {"op": "add", "path": "/metadata/labels", "value": {"x": "y"}},
            {"op": "replace", "path": "/data/b", "value": "20"},
            {"op": "remove", "path": "/data/c"},
        ],
    )
    assert json_patched.metadata.labels == {"x": "y"}
    assert json_patched.data == {"b": "20"}

    with pytest.raises(ApiException) as failed_test:
        core.patch_namespaced_config_map(
            "cfg", ns, [{"op": "test", "path": "/data/b", "value": "nope"}]
        )
    assert failed_test.value.status == 422

    kube.install_operator_crds("kafkatopic")
    topic = {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaTopic",
        "metadata": {"name": "orders"},
        "spec": {"partitions": 3, "replicas": 1},
    }
    custom.create_namespaced_custom_object("kafka.strimzi.io", "v1beta2", ns, "kafkatopics", topic)
    updated = custom.patch_namespaced_custom_object(
        "kafka.strimzi.io", "v1beta2", ns, "kafkatopics", "orders", {"spec": {"partitions": 6}}
    )
    assert updated["spec"] == {"partitions": 6, "replicas": 1}
    with pytest.raises(ApiException) as unsupported:
        custom.patch_namespaced_custom_object(
            "kafka.strimzi.io",
            "v1beta2",
            ns,
            "kafkatopics",
            "orders",
            {"spec": {"partitions": 7}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert unsupported.value.status == 415


def test_resource_version_conflicts(core: Any, kube: KubeEmulator, ns: str) -> None:
    created = core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg"), data={"a": "1"})
    )
    fresh = core.replace_namespaced_config_map(
        "cfg", ns, client.V1ConfigMap(metadata=created.metadata, data={"a": "2"})
    )
    assert int(fresh.metadata.resource_version) > int(created.metadata.resource_version)

    with pytest.raises(ApiException) as stale:
        core.replace_namespaced_config_map(
            "cfg", ns, client.V1ConfigMap(metadata=created.metadata, data={"a": "3"})
        )
    assert stale.value.status == 409
    assert status_of(stale.value)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(stale.value)["message"]

    with pytest.raises(ApiException) as stale_patch:
        core.patch_namespaced_config_map(
            "cfg",
            ns,
            {
                "metadata": {"resourceVersion": created.metadata.resource_version},
                "data": {"a": "4"},
            },
        )
    assert stale_patch.value.status == 409

    same = core.patch_namespaced_config_map("cfg", ns, {"data": {"a": "2"}})
    assert same.metadata.resource_version == fresh.metadata.resource_version  # no-op write

    kube.inject_conflicts("v1", "configmaps", "cfg", namespace=ns, count=1)
    with pytest.raises(ApiException) as injected:
        core.patch_namespaced_config_map("cfg", ns, {"data": {"a": "5"}})
    assert injected.value.status == 409
    assert core.patch_namespaced_config_map("cfg", ns, {"data": {"a": "5"}}).data == {"a": "5"}


# --------------------------------------------------------------------------------------
# Watches
# --------------------------------------------------------------------------------------


def test_watch_streams_added_modified_deleted(core: Any, ns: str) -> None:
    start = core.list_namespaced_config_map(ns).metadata.resource_version
    seen: list[tuple[str, str]] = []
    stream = watch.Watch()

    def consume() -> None:
        for event in stream.stream(
            core.list_namespaced_config_map,
            ns,
            label_selector="app=db",
            resource_version=start,
            timeout_seconds=5,
        ):
            seen.append((event["type"], event["object"].metadata.name))
            if event["type"] == "DELETED" and event["object"].metadata.name == "a":
                stream.stop()

    thread = threading.Thread(target=consume)
    thread.start()
    labels = {"app": "db"}
    core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="a", labels=labels))
    )
    core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="other", labels={"app": "x"}))
    )
    core.patch_namespaced_config_map("a", ns, {"data": {"k": "v"}})
    core.patch_namespaced_config_map("other", ns, {"metadata": {"labels": {"app": "db"}}})
    core.delete_namespaced_config_map("a", ns)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert seen == [("ADDED", "a"), ("MODIFIED", "a"), ("ADDED", "other"), ("DELETED", "a")]


def test_watch_of_a_statefulset_sees_it_become_ready(apps: Any, ns: str) -> None:
    apps.create_namespaced_stateful_set(ns, statefulset("db", replicas=2))
    ready = None
    stream = watch.Watch()
    for event in stream.stream(apps.list_namespaced_stateful_set, ns, timeout_seconds=5):
        if (event["object"].status.ready_replicas or 0) == 2:
            ready = event
            stream.stop()
    assert ready is not None
    assert ready["object"].status.observed_generation == 1


def test_watch_from_a_too_old_resource_version_is_410() -> None:
    with start_kubernetes_emulator(ready_delay=0.01, history_limit=5, token=None) as emu:
        core = client.CoreV1Api(emu.api_client())
        emu.create_namespace("old")
        first = core.create_namespaced_config_map(
            "old", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c0"))
        ).metadata.resource_version
        for i in range(1, 10):
            core.create_namespaced_config_map(
                "old", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"c{i}"))
            )
        with pytest.raises(ApiException) as expired:
            for _ in watch.Watch().stream(
                core.list_namespaced_config_map, "old", resource_version=first, timeout_seconds=2
            ):
                pass
        assert expired.value.status == 410
        assert "Expired" in str(expired.value.reason)


# --------------------------------------------------------------------------------------
# Controllers
# --------------------------------------------------------------------------------------


def test_statefulset_becomes_ready_and_keeps_its_claims(
    apps: Any, core: Any, kube: KubeEmulator, ns: str
) -> None:
    apps.create_namespaced_stateful_set(ns, statefulset("db", replicas=2))
    sts = wait_for(
        lambda: (s := apps.read_namespaced_stateful_set("db", ns)).status.ready_replicas == 2 and s
    )
    assert sts.status.replicas == 2
    assert sts.status.current_replicas == 2
    assert sts.status.updated_replicas == 2
    assert sts.status.observed_generation == 1
    pods = core.list_namespaced_pod(ns, label_selector="app=db").items
    assert sorted(p.metadata.name for p in pods) == ["db-0", "db-1"]
    assert all(p.metadata.owner_references[0].kind == "StatefulSet" for p in pods)
    assert all(p.status.phase == "Running" for p in pods)
    claims = core.list_namespaced_persistent_volume_claim(ns).items
    assert sorted(c.metadata.name for c in claims) == ["data-db-0", "data-db-1"]
    wait_for(
        lambda: all(
            c.status.phase == "Bound"
            for c in core.list_namespaced_persistent_volume_claim(ns).items
        )
    )

    # A spec change bumps the generation and rolls the pods.
    apps.patch_namespaced_stateful_set(
        "db",
        ns,
        {
            "spec": {
                "template": {"spec": {"containers": [{"name": "db", "image": "postgres:16.4"}]}}
            }
        },
    )
    rolled = wait_for(
        lambda: (
            (s := apps.read_namespaced_stateful_set("db", ns)).status.updated_replicas == 2
            and s.status.ready_replicas == 2
            and s
        )
    )
    assert rolled.metadata.generation == 2
    assert rolled.status.current_revision == rolled.status.update_revision

    apps.delete_namespaced_stateful_set("db", ns)
    wait_for(lambda: not core.list_namespaced_pod(ns).items)
    remaining = core.list_namespaced_persistent_volume_claim(ns).items
    assert sorted(c.metadata.name for c in remaining) == ["data-db-0", "data-db-1"]


def test_deployment_becomes_available(apps: Any, core: Any, ns: str) -> None:
    apps.create_namespaced_deployment(ns, deployment("web", replicas=2))
    ready = wait_for(
        lambda: (
            (d := apps.read_namespaced_deployment("web", ns)).status.available_replicas == 2 and d
        )
    )
    conditions = {c.type: c for c in ready.status.conditions}
    assert conditions["Available"].status == "True"
    assert conditions["Progressing"].reason == "NewReplicaSetAvailable"
    replica_sets = apps.list_namespaced_replica_set(ns).items
    assert len(replica_sets) == 1
    pods = core.list_namespaced_pod(ns, label_selector="app=web").items
    assert len(pods) == 2
    assert all("pod-template-hash" in p.metadata.labels for p in pods)


def test_image_pull_failure_shows_in_pod_status_and_events(
    apps: Any, core: Any, kube: KubeEmulator, ns: str
) -> None:
    kube.fail_images("postgres:99*")
    apps.create_namespaced_stateful_set(ns, statefulset("db", image="postgres:99.0"))

    def waiting_reason() -> str | None:
        try:
            pod = core.read_namespaced_pod("db-0", ns)
        except ApiException:
            return None
        statuses = pod.status.container_statuses or []
        waiting = statuses[0].state.waiting if statuses else None
        return waiting.reason if waiting and waiting.reason == "ImagePullBackOff" else None

    assert wait_for(waiting_reason) == "ImagePullBackOff"
    events = core.list_namespaced_event(ns, field_selector="involvedObject.name=db-0").items
    failed = [e for e in events if e.reason == "Failed" and e.type == "Warning"]
    assert any(e.message.startswith('Failed to pull image "postgres:99.0"') for e in failed)
    assert all(e.involved_object.kind == "Pod" for e in failed)
    assert apps.read_namespaced_stateful_set("db", ns).status.ready_replicas is None

    kube.clear_faults()
    wait_for(lambda: apps.read_namespaced_stateful_set("db", ns).status.ready_replicas == 1)


def test_unschedulable_pod_reports_failed_scheduling(
    core: Any, apps: Any, kube: KubeEmulator, ns: str
) -> None:
    kube.make_unschedulable("big-*", namespace=ns)
    apps.create_namespaced_stateful_set(ns, statefulset("big"))

    def scheduled_condition() -> Any:
        try:
            pod = core.read_namespaced_pod("big-0", ns)
        except ApiException:
            return None
        return next((c for c in pod.status.conditions or [] if c.type == "PodScheduled"), None)

    condition = wait_for(scheduled_condition)
    assert condition.status == "False"
    assert condition.reason == "Unschedulable"
    events = wait_for(
        lambda: [e for e in core.list_namespaced_event(ns).items if e.reason == "FailedScheduling"]
    )
    assert "Insufficient memory" in events[0].message
    assert events[0].source.component == "default-scheduler"


def test_temporary_errors_for_the_next_requests(core: Any, kube: KubeEmulator) -> None:
    kube.fail_next(2, 503)
    for _ in range(2):
        with pytest.raises(ApiException) as unavailable:
            core.list_namespace()
        assert unavailable.value.status == 503
        assert status_of(unavailable.value)["reason"] == "ServiceUnavailable"
    assert core.list_namespace().items

    # 429 carries Retry-After as on a real server; urllib3 under the client honours it
    # and retries by itself, so look at the raw answer.
    kube.fail_next(1, 429, methods=["GET"])
    request = urllib.request.Request(
        f"{kube.url}/api/v1/namespaces", headers={"Authorization": f"Bearer {kube.token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as throttled:
        urllib.request.urlopen(request, timeout=5)
    assert throttled.value.code == 429
    assert throttled.value.headers["Retry-After"] == "1"
    assert json.load(throttled.value)["reason"] == "TooManyRequests"

    kube.fail_next(1, 500)
    with pytest.raises(ApiException) as internal:
        core.list_namespace()
    assert internal.value.status == 500


def test_quota_refuses_what_exceeds_it_and_reports_usage(
    core: Any, apps: Any, kube: KubeEmulator, ns: str
) -> None:
    core.create_namespaced_resource_quota(
        ns,
        client.V1ResourceQuota(
            metadata=client.V1ObjectMeta(name="compute"),
            spec=client.V1ResourceQuotaSpec(
                hard={
                    "requests.cpu": "1",
                    "requests.memory": "1Gi",
                    "pods": "4",
                    "requests.storage": "10Gi",
                }
            ),
        ),
    )
    apps.create_namespaced_stateful_set(ns, statefulset("db", cpu="500m"))
    quota = wait_for(
        lambda: (
            (q := core.read_namespaced_resource_quota("compute", ns)).status.used
            and q.status.used.get("requests.cpu") == "500m"
            and q
        )
    )
    assert quota.status.hard["requests.memory"] == "1Gi"
    assert quota.status.used == {
        "requests.cpu": "500m",
        "requests.memory": "256Mi",
        "pods": "1",
        "requests.storage": "1Gi",
    }

    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="hog"),
        spec=client.V1PodSpec(
            containers=[
                client.V1Container(
                    name="hog",
                    image="busybox:1.36",
                    resources=client.V1ResourceRequirements(
                        requests={"cpu": "2", "memory": "64Mi"}
                    ),
                )
            ]
        ),
    )
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(ns, pod)
    assert refused.value.status == 403
    body = status_of(refused.value)
    assert body["reason"] == "Forbidden"
    assert body["message"] == (
        'pods "hog" is forbidden: exceeded quota: compute, requested: requests.cpu=2, '
        "used: requests.cpu=500m, limited: requests.cpu=1"
    )

    # A workload the quota cannot hold is accepted; its controller reports FailedCreate.
    apps.create_namespaced_stateful_set(ns, statefulset("big", cpu="800m"))
    events = wait_for(
        lambda: [e for e in core.list_namespaced_event(ns).items if e.reason == "FailedCreate"]
    )
    assert "exceeded quota: compute" in events[0].message
    assert events[0].involved_object.kind == "StatefulSet"


# --------------------------------------------------------------------------------------
# CRDs, operators, metrics, discovery
# --------------------------------------------------------------------------------------


def test_crd_installation_makes_the_group_served() -> None:
    with start_kubernetes_emulator(ready_delay=0.02) as emu:
        api = emu.api_client()
        groups = {g.name for g in client.ApisApi(api).get_api_versions().groups}
        assert "apps" in groups
        assert "acid.zalan.do" not in groups
        crd = json.loads(json.dumps(OPERATOR_CRDS["postgresql"]))
        created = client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
        assert any(
            c.type == "Established" and c.status == "True" for c in created.status.conditions
        )
        groups = {g.name for g in client.ApisApi(api).get_api_versions().groups}
        assert "acid.zalan.do" in groups
        resources = client.CustomObjectsApi(api).get_api_resources("acid.zalan.do", "v1").resources
        assert {(r.name, r.kind, r.namespaced) for r in resources} >= {
            ("postgresqls", "postgresql", True)
        }

        emu.install_operator_crds()
        custom_api = client.CustomObjectsApi(api)
        emu.create_namespace("db")

        def create_postgresql(name: str, spec: dict[str, Any]) -> None:
            custom_api.create_namespaced_custom_object(
                "acid.zalan.do",
                "v1",
                "db",
                "postgresqls",
                {
                    "apiVersion": "acid.zalan.do/v1",
                    "kind": "postgresql",
                    "metadata": {"name": name},
                    "spec": spec,
                },
            )

        def postgresql_status(name: str) -> Any:
            found = custom_api.get_namespaced_custom_object(
                "acid.zalan.do", "v1", "db", "postgresqls", name
            )
            return found.get("status", {}).get("PostgresClusterStatus")

        create_postgresql(
            "acid-orders",
            {
                "teamId": "acid",
                "numberOfInstances": 2,
                "volume": {"size": "5Gi"},
                "users": {"orders": []},
                "postgresql": {"version": "15"},
            },
        )
        wait_for(lambda: postgresql_status("acid-orders") == "Running")
        secrets = {
            s.metadata.name for s in client.CoreV1Api(api).list_namespaced_secret("db").items
        }
        assert "orders.acid-orders.credentials.postgresql.acid.zalan.do" in secrets
        # The operator refuses a cluster whose name does not start with its team.
        create_postgresql(
            "orders", {"teamId": "acid", "numberOfInstances": 1, "volume": {"size": "1Gi"}}
        )
        wait_for(lambda: postgresql_status("orders") == "Invalid")

        custom_api.create_namespaced_custom_object(
            "kafka.strimzi.io",
            "v1beta2",
            "db",
            "kafkatopics",
            {
                "apiVersion": "kafka.strimzi.io/v1beta2",
                "kind": "KafkaTopic",
                "metadata": {"name": "events", "labels": {"strimzi.io/cluster": "main"}},
                "spec": {"partitions": 3, "replicas": 1},
            },
        )
        topic = wait_for(
            lambda: (
                (
                    t := custom_api.get_namespaced_custom_object(
                        "kafka.strimzi.io", "v1beta2", "db", "kafkatopics", "events"
                    )
                ).get("status")
                and t
            )
        )
        assert topic["status"]["conditions"][0]["type"] == "Ready"
        assert topic["status"]["conditions"][0]["status"] == "True"

        custom_api.create_namespaced_custom_object(
            "databases.spotahome.com",
            "v1",
            "db",
            "redisfailovers",
            {
                "apiVersion": "databases.spotahome.com/v1",
                "kind": "RedisFailover",
                "metadata": {"name": "cache"},
                "spec": {"redis": {"replicas": 2}, "sentinel": {"replicas": 1}},
            },
        )
        apps = client.AppsV1Api(api)
        wait_for(
            lambda: (
                (s := read_or_none(apps.read_namespaced_stateful_set, "rfr-cache", "db"))
                and s.status.ready_replicas == 2
            )
        )
        wait_for(
            lambda: (
                (d := read_or_none(apps.read_namespaced_deployment, "rfs-cache", "db"))
                and d.status.ready_replicas == 1
            )
        )


def test_pod_metrics_when_enabled(
    core: Any, apps: Any, custom: Any, kube: KubeEmulator, ns: str
) -> None:
    apps.create_namespaced_stateful_set(ns, statefulset("db"))
    wait_for(lambda: apps.read_namespaced_stateful_set("db", ns).status.ready_replicas == 1)
    kube.set_pod_usage(ns, "db-0", cpu="120m", memory="200Mi")
    metrics = custom.list_namespaced_custom_object("metrics.k8s.io", "v1beta1", ns, "pods")
    assert metrics["kind"] == "PodMetricsList"
    usage = metrics["items"][0]["containers"][0]["usage"]
    assert usage == {"cpu": "120000000n", "memory": "204800Ki"}
    kube.enable_metrics(False)
    with pytest.raises(ApiException) as absent:
        custom.list_namespaced_custom_object("metrics.k8s.io", "v1beta1", ns, "pods")
    assert absent.value.status == 404
    groups = {g.name for g in client.ApisApi(kube.api_client()).get_api_versions().groups}
    assert "metrics.k8s.io" not in groups


def test_scale_subresource_and_namespace_deletion(core: Any, apps: Any, kube: KubeEmulator) -> None:
    kube.create_namespace("doomed")
    apps.create_namespaced_stateful_set("doomed", statefulset("db"))
    scale = apps.patch_namespaced_stateful_set_scale("db", "doomed", {"spec": {"replicas": 2}})
    assert scale.spec.replicas == 2
    wait_for(lambda: apps.read_namespaced_stateful_set("db", "doomed").status.ready_replicas == 2)
    core.delete_namespace("doomed")
    wait_for(lambda: kube.get_object("v1", "namespaces", "doomed") is None)
    assert not kube.objects("apps/v1", "statefulsets", "doomed")
    assert not kube.objects("v1", "persistentvolumeclaims", "doomed")


# --------------------------------------------------------------------------------------
# Clients, processes, load
# --------------------------------------------------------------------------------------


def test_kubeconfig_is_loaded_by_the_real_client(kube: KubeEmulator, tmp_path: Path) -> None:
    path = kube.write_kubeconfig(tmp_path / "kubeconfig", namespace="team-a")
    api = config.new_client_from_config(config_file=str(path))
    assert client.CoreV1Api(api).read_namespace("default").metadata.name == "default"
    _, active = config.list_kube_config_contexts(config_file=str(path))
    assert active["context"]["namespace"] == "team-a"

    stranger = client.Configuration()
    stranger.host = kube.url
    stranger.api_key = {"authorization": "Bearer wrong"}
    with pytest.raises(ApiException) as denied:
        client.CoreV1Api(client.ApiClient(stranger)).list_namespace()
    assert denied.value.status == 401


def test_runs_as_a_separate_process(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "common")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kidp.kube_emulator",
            "--port",
            "0",
            "--kubeconfig",
            str(kubeconfig),
            "--crds",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        api = config.new_client_from_config(config_file=str(kubeconfig))
        core = client.CoreV1Api(api)
        assert any(n.metadata.name == "default" for n in core.list_namespace().items)
        groups = {g.name for g in client.ApisApi(api).get_api_versions().groups}
        assert "kafka.strimzi.io" in groups

        request = urllib.request.Request(
            f"{url}/_emulator/faults",
            data=json.dumps({"failNext": {"count": 1, "status": 503}}).encode(),
            headers={"Authorization": "Bearer kidp-test-token", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.load(response)["failNext"][0]["count"] == 1
        with pytest.raises(ApiException) as unavailable:
            core.list_namespace()
        assert unavailable.value.status == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_many_concurrent_clients_and_watches(kube: KubeEmulator, ns: str) -> None:
    watcher_api = client.CoreV1Api(kube.api_client())
    start = watcher_api.list_namespaced_config_map(ns).metadata.resource_version
    counts = [0, 0]

    def watch_all(slot: int) -> None:
        stream = watch.Watch()
        for event in stream.stream(
            watcher_api.list_namespaced_config_map, ns, resource_version=start, timeout_seconds=10
        ):
            if event["type"] == "ADDED":
                counts[slot] += 1
                if counts[slot] == 200:
                    stream.stop()

    watchers = [threading.Thread(target=watch_all, args=(i,)) for i in range(2)]
    for thread in watchers:
        thread.start()

    def writer(worker: int) -> None:
        api = client.CoreV1Api(kube.api_client())
        for i in range(25):
            api.create_namespaced_config_map(
                ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"w{worker}-{i}"))
            )
            api.list_namespaced_config_map(ns, label_selector="app!=x", limit=5)

    began = time.monotonic()
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for thread in writers:
        thread.start()
    for thread in writers + watchers:
        thread.join(timeout=20)
    assert counts == [200, 200]
    assert len(kube.objects("v1", "configmaps", ns)) == 200
    assert time.monotonic() - began < 10
