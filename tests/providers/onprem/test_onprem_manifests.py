"""The on-prem provider's manifests, without a cluster: every object it can
generate passes kubernetes-validate (strict, against the Kubernetes schemas),
carries the five tracking labels, and its shell snippets parse."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from decimal import Decimal
from typing import Any

import kubernetes_validate
import pytest
from tests.providers.onprem.support import deployment

from kidp import catalog, tags
from kidp.models import DeletionPolicy, ResourceType, Size
from kidp.providers.onprem import manifests as m

#: The Kubernetes release every manifest is checked against, and the releases
#: one manifest per engine is also checked against (oldest in common use,
#: newest kubernetes-validate knows).
KUBE_VERSION = "1.30"
KUBE_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())


#: Builds a target as the provider does (default tag prefix) from a deployment
#: made by ``support.deployment``.
target = m.sample_target
plain_objects = m.plain_objects

#: The matrix every plain-path check runs over; scripts/render-generated.py
#: writes the same one out for checkov.
ALL = m.sample_targets()


def test_the_matrix_covers_every_engine_version_size_and_ha() -> None:
    engines = {(t.deployment.resource_type, t.engine, t.deployment.spec.version) for t in ALL}
    for rtype in (ResourceType.DATABASE, ResourceType.CACHE):
        for engine, versions in catalog.ENGINES[rtype].items():
            for version in versions:
                assert (rtype, engine, version) in engines
    assert {t.size for t in ALL} == set(Size)
    assert any(t.deployment.spec.high_availability for t in ALL)


def test_sample_objects_keeps_one_group_per_target_so_no_sample_replaces_another() -> None:
    # Redis is in the catalogue as both database and cache; without the type
    # in the group name the cache samples would replace the database ones.
    sizes = (Size.SMALL, Size.LARGE)
    operators = 2 * len(sizes) * 2  # Zalando and Redis failover, with and without HA
    extras = operators + 1 + 1  # plus the KafkaTopic and the Namespace
    groups = m.sample_objects(sizes)
    assert len(groups) == len(m.sample_targets(sizes)) + extras
    assert any(g.startswith("plain-database-redis-") for g in groups)
    assert any(g.startswith("plain-cache-redis-") for g in groups)


def test_every_plain_manifest_passes_kubernetes_validate_strict() -> None:
    seen: set[str] = set()
    engines: set[tuple[str, str]] = set()
    for t in ALL:
        for obj in plain_objects(t):
            key = json.dumps(obj, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            if (t.component, obj["kind"]) not in engines:
                engines.add((t.component, obj["kind"]))
                for version in KUBE_VERSIONS:
                    kubernetes_validate.validate(obj, version, strict=True)
    assert len(seen) > 250


def test_operator_paths_core_objects_validate_and_resources_have_their_required_fields() -> None:
    for ha, size in itertools.product((False, True), Size):
        pg = target(deployment(engine="postgresql", version="15", size=size, high_availability=ha))
        secret = m.zalando_user_secret(pg, username="kidpadmin", password="p" * 32)
        service = m.zalando_client_service(pg)
        (cluster,) = m.zalando_objects(pg, "kidpadmin")
        for obj in (secret, service):
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        assert cluster["apiVersion"] == "acid.zalan.do/v1" and cluster["kind"] == "postgresql"
        spec = cluster["spec"]
        assert spec["teamId"] == "platform-team"
        assert cluster["metadata"]["name"] == "platform-team-app-db"
        assert spec["numberOfInstances"] == (2 if ha else 1)
        assert spec["postgresql"] == {"version": "15"}
        assert spec["volume"]["size"] == f"{catalog.SIZES[size].storage_gb}Gi"
        assert spec["resources"] == m.size_resources(size)
        assert secret["metadata"]["name"] == (
            "kidpadmin.platform-team-app-db.credentials.postgresql.acid.zalan.do"
        )
        assert service["spec"]["selector"]["cluster-name"] == "platform-team-app-db"

        redis = target(deployment(engine="redis", version="7.2", size=size, high_availability=ha))
        failover, client = m.redis_failover_objects(redis)
        kubernetes_validate.validate(client, KUBE_VERSION, strict=True)
        assert failover["apiVersion"] == "databases.spotahome.com/v1"
        assert failover["spec"]["redis"]["replicas"] == (3 if ha else 1)
        assert failover["spec"]["sentinel"]["replicas"] == (3 if ha else 1)
        assert failover["spec"]["redis"]["image"] == "redis:7.2.6-alpine"
        assert failover["spec"]["auth"] == {"secretPath": "app-db-credentials"}
        assert client["spec"]["selector"]["redisfailovers-role"] == "master"
        claim = failover["spec"]["redis"]["storage"]["persistentVolumeClaim"]
        # The claim template is a PVC: the schema of a real one must accept it.
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", **claim},
            KUBE_VERSION,
            strict=True,
        )


def test_every_pod_runs_unprivileged_as_its_images_user_on_a_read_only_root() -> None:
    for t in ALL:
        service = t.deployment.resource_type is ResourceType.SERVICE
        for obj in plain_objects(t):
            if obj["kind"] not in ("StatefulSet", "Deployment"):
                continue
            pod = obj["spec"]["template"]["spec"]
            security = pod["securityContext"]
            uid, gid = (m.SERVICE_USER, m.SERVICE_USER) if service else m.ENGINE_USERS[t.engine]
            assert security["runAsNonRoot"] is True and uid != 0
            assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}
            # The volumes belong to the image's user.
            assert security.get("fsGroup") == (gid if obj["kind"] == "StatefulSet" else None)
            assert pod["automountServiceAccountToken"] is False
            volumes = {v["name"] for v in pod.get("volumes", [])}
            volumes |= {c["metadata"]["name"] for c in obj["spec"].get("volumeClaimTemplates", [])}
            main = pod["containers"][0]
            # Where the image writes outside its data volume is an emptyDir.
            paths = {mount["mountPath"] for mount in main.get("volumeMounts", [])}
            assert set(m.SCRATCH_PATHS[t.engine]) <= paths
            for container in pod["containers"] + pod.get("initContainers", []):
                c = container["securityContext"]
                assert c["allowPrivilegeEscalation"] is False and c["privileged"] is False
                assert c["readOnlyRootFilesystem"] is True
                assert c["capabilities"] == {"drop": ["ALL"]}
                assert {v["name"] for v in container.get("volumeMounts", [])} <= volumes


def test_checkov_exceptions_name_a_check_and_give_a_reason() -> None:
    for t in ALL:
        for obj in plain_objects(t):
            annotations = obj["metadata"].get("annotations", {})
            skips = {k: v for k, v in annotations.items() if k.startswith("checkov.io/skip")}
            if obj["kind"] not in ("StatefulSet", "Deployment"):
                assert not skips
                continue
            checks = set()
            for value in skips.values():
                check, reason = value.split("=", 1)
                assert check.startswith(("CKV_K8S_", "CKV2_K8S_")) and len(reason) > 40
                checks.add(check)
            # What the hardening cannot fix, and nothing it can.
            assert {"CKV_K8S_43", "CKV2_K8S_6"} <= checks
            assert not checks & {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28"}
            assert not checks & {"CKV_K8S_37", "CKV_K8S_38", "CKV_K8S_31"}


def test_kafka_topic_in_the_kafka_namespace_is_qualified_and_labelled_for_its_cluster() -> None:
    t = target(deployment(ResourceType.TOPIC, name="orders", engine="kafka", partitions=6))
    (topic,) = m.kafka_topic_objects(
        t, kafka_cluster="events", kafka_namespace="kafka", api_version="kafka.strimzi.io/v1beta2"
    )
    assert topic["metadata"]["namespace"] == "kafka"
    assert topic["metadata"]["name"] == "team-platform-orders"
    assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "events"
    assert topic["spec"] == {
        "topicName": "team-platform.orders",
        "partitions": 6,
        "replicas": 3,
        "config": {"retention.ms": str(168 * 3_600_000)},
    }
    (local,) = m.kafka_topic_objects(
        t, kafka_cluster="events", kafka_namespace="team-platform", api_version="v"
    )
    assert local["metadata"]["name"] == "orders" and local["spec"]["topicName"] == "orders"


def test_every_object_and_pod_and_claim_carries_the_five_tags() -> None:
    expected = {f"platform.company.com/{name}" for name in tags.TAG_NAMES}
    for t in ALL:
        for obj in plain_objects(t):
            assert expected <= obj["metadata"]["labels"].keys(), obj["kind"]
            spec = obj.get("spec") or {}
            if "template" in spec:
                assert expected <= spec["template"]["metadata"]["labels"].keys()
                assert spec["selector"]["matchLabels"].items() <= (
                    spec["template"]["metadata"]["labels"].items()
                )
            for claim in spec.get("volumeClaimTemplates", []):
                assert expected <= claim["metadata"]["labels"].keys()


def test_sizes_set_requests_equal_to_limits_from_the_catalogue_presets() -> None:
    assert m.size_resources(Size.SMALL) == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    }
    assert m.size_resources(Size.XLARGE)["limits"] == {"cpu": "8", "memory": "16Gi"}
    for size in Size:
        assert m.size_of(m.size_resources(size)) == size.value
    assert m.size_of({"requests": {"cpu": "1500m", "memory": "3Gi"}}).startswith("custom:")
    # The API server reads quantities back in canonical form (2048Mi -> 2Gi).
    assert m.size_of({"requests": {"cpu": "1000m", "memory": "2048Mi"}}) == "small"


def test_images_are_pinned_to_exact_tags_of_the_catalogue_version() -> None:
    for rtype in (ResourceType.DATABASE, ResourceType.CACHE):
        for engine, versions in catalog.ENGINES[rtype].items():
            for version in versions:
                image = m.IMAGES[engine][version]
                actual = m.version_from_image(image)
                assert actual is not None and actual.startswith(f"{version}.")
                # One component more than the catalogue's: 15 -> 15.10, 8.0 -> 8.0.40.
                assert actual.count(".") == version.count(".") + 1, f"{image} is not pinned"


def test_replicas_and_primary_service_for_high_availability() -> None:
    for engine, replicas in (("postgresql", 2), ("redis", 3)):
        t = target(deployment(engine=engine, high_availability=True))
        objects = {(o["kind"], o["metadata"]["name"]): o for o in m.stateful_objects(t)}
        sts = objects[("StatefulSet", "app-db")]
        assert sts["spec"]["replicas"] == replicas
        assert sts["spec"]["serviceName"] == "app-db-hl"
        client = objects[("Service", "app-db")]
        assert client["spec"]["selector"][m.POD_NAME_LABEL] == "app-db-0"
        headless = objects[("Service", "app-db-hl")]
        assert headless["spec"]["clusterIP"] == "None"
    single = target(deployment(engine="mysql"))
    (sts,) = [o for o in m.stateful_objects(single) if o["kind"] == "StatefulSet"]
    assert sts["spec"]["replicas"] == 1
    assert not m.plain_ha_supported("mysql") and not m.plain_ha_supported("mongodb")


def test_probes_ask_the_engine_for_readiness_and_check_the_port_for_liveness() -> None:
    for engine in ("postgresql", "mysql", "mongodb", "redis"):
        t = target(deployment(engine=engine))
        (sts,) = [o for o in m.stateful_objects(t) if o["kind"] == "StatefulSet"]
        container = sts["spec"]["template"]["spec"]["containers"][0]
        assert "exec" in container["readinessProbe"]
        assert container["livenessProbe"]["tcpSocket"] == {"port": catalog.DEFAULT_PORTS[engine]}


def test_retain_keeps_claims_when_the_statefulset_goes() -> None:
    kept = target(deployment(engine="postgresql", policy=DeletionPolicy.RETAIN))
    gone = target(deployment(engine="postgresql"))
    for t, expected in ((kept, "Retain"), (gone, "Delete")):
        (sts,) = [o for o in m.stateful_objects(t) if o["kind"] == "StatefulSet"]
        assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == expected


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_every_shell_snippet_parses() -> None:
    scripts: set[str] = set()
    for t in ALL:
        for obj in plain_objects(t):
            pod = (obj.get("spec") or {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                command = container.get("command") or []
                if command[:2] == ["sh", "-c"]:
                    scripts.add(command[2])
                for probe in ("readinessProbe", "livenessProbe"):
                    exec_ = container.get(probe, {}).get("exec")
                    if exec_:
                        scripts.add(exec_["command"][2])
                hook = container.get("lifecycle", {}).get("postStart", {}).get("exec")
                if hook:
                    scripts.add(hook["command"][2])
    assert len(scripts) >= 8
    for script in scripts:
        result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, (script, result.stderr)


def test_redis_writes_its_password_to_a_config_file_never_onto_the_command_line(
    tmp_path: Any,
) -> None:
    t = target(deployment(ResourceType.CACHE, engine="redis", high_availability=True))
    (sts,) = [o for o in m.stateful_objects(t) if o["kind"] == "StatefulSet"]
    script = sts["spec"]["template"]["spec"]["containers"][0]["command"][2]
    # Run the part that writes the config (everything before exec) in a sandbox.
    prefix = script.split("exec ", 1)[0].replace("/run/kidp", str(tmp_path))
    env = {"REDIS_PASSWORD": "s3cret", "HOSTNAME": "app-db-1", "PATH": "/usr/bin:/bin"}
    subprocess.run(["sh", "-c", prefix], env=env, check=True)
    config = (tmp_path / "redis.conf").read_text().splitlines()
    assert "requirepass s3cret" in config and "masterauth s3cret" in config
    assert "appendonly no" in config and "save ''" in config
    assert config[-1] == "replicaof app-db-0.app-db-hl.team-platform.svc.cluster.local 6379"
    assert "s3cret" not in json.dumps(sts)


def test_long_names_are_cut_with_a_hash_and_stay_distinct() -> None:
    long_a = "a" * 60 + "-one"
    long_b = "a" * 60 + "-two"
    assert len(m.workload_name(long_a)) == m.MAX_WORKLOAD
    assert m.workload_name(long_a) != m.workload_name(long_b)
    assert len(m.headless_service_name(long_a)) <= 63
    assert m.headless_service_name("db") == "db-hl"
    assert m.zalando_cluster_name("team", "team-db") == "team-db"
    assert len(m.zalando_cluster_name("t" * 30, "d" * 40)) == m.MAX_ZALANDO


def test_quantities_parse_like_the_api_server() -> None:
    assert m.parse_quantity("500m") == Decimal("0.5")
    assert m.parse_quantity("2Gi") == 2 * 2**30
    assert m.parse_quantity("1e3") == 1000
    assert m.parse_quantity(4) == 4
    assert m.parse_quantity("1.5G") == Decimal("1.5e9")
    with pytest.raises(ValueError):
        m.parse_quantity("lots")
    assert m.gib(Decimal(100 * 2**30)) == 100
    assert m.version_from_image("registry.local:5000/postgres:15.10-alpine") == "15.10"
    assert m.version_from_image("postgres") is None
    assert m.version_from_image("postgres:latest") is None


def test_quota_needs_count_pods_resources_claims_and_objects() -> None:
    t = target(deployment(engine="postgresql", size="medium", high_availability=True))
    needs = m.quota_needs(plain_objects(t))
    assert needs["pods"] == 2
    assert needs["requests.cpu"] == needs["limits.cpu"] == 4
    assert needs["requests.memory"] == 8 * 2**30 == needs["memory"]
    assert needs["requests.storage"] == 200 * 2**30
    assert needs["persistentvolumeclaims"] == 2
    assert needs["services"] == 2 and needs["secrets"] == 1
    assert needs["count/statefulsets.apps"] == 1
