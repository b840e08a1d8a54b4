"""What every manifest builder shares: images, names and quantities, the size
presets, :class:`Target` (what one deployment becomes), the credentials Secret
and Services, probes, security contexts and the checkov exceptions.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from kidp.catalog import DEFAULT_PORTS, SIZES
from kidp.models import DeletionPolicy, Deployment, ResourceType, Size

#: Exact image per engine and catalogue version. Alpine variants where the
#: official image has one (smaller, fewer CVEs); MySQL and MongoDB publish none.
IMAGES: dict[str, dict[str, str]] = {
    "postgresql": {
        "12": "postgres:12.22-alpine",
        "13": "postgres:13.18-alpine",
        "14": "postgres:14.15-alpine",
        "15": "postgres:15.10-alpine",
        "16": "postgres:16.6-alpine",
    },
    "mysql": {
        "5.7": "mysql:5.7.44",
        "8.0": "mysql:8.0.40",
        "8.4": "mysql:8.4.3",
    },
    "mongodb": {
        "5.0": "mongo:5.0.28",
        "6.0": "mongo:6.0.16",
        "7.0": "mongo:7.0.12",
    },
    "redis": {
        "6.2": "redis:6.2.16-alpine",
        "7.0": "redis:7.0.15-alpine",
        "7.2": "redis:7.2.6-alpine",
    },
    "memcached": {"1.6": "memcached:1.6.29-alpine"},
}

#: Pods per StatefulSet when ``highAvailability`` is asked for (one primary at
#: ordinal 0, the rest replicate from it). Engines missing here cannot
#: replicate on a plain StatefulSet; see :func:`plain_ha_supported`.
HA_REPLICAS: dict[str, int] = {"postgresql": 2, "redis": 3, "memcached": 2}

#: RedisFailover sentinels; Sentinel needs a majority, so three for HA.
SENTINELS_HA = 3

#: Where each engine keeps its data inside the container.
DATA_PATHS: dict[str, str] = {
    "postgresql": "/var/lib/postgresql/data",
    "mysql": "/var/lib/mysql",
    "mongodb": "/data/db",
    "redis": "/data",
}

#: (uid, gid) of the user each official image runs its engine as. Pods start
#: as that user instead of as root (the entrypoints step down with gosu or
#: su-exec only when started as root), so no capability is ever needed; fsGroup
#: gives the user the volumes. The user stays the image's own, not a uid >=
#: 10000: it owns the files on every existing volume, and PostgreSQL refuses a
#: data directory owned by anyone else.
ENGINE_USERS: dict[str, tuple[int, int]] = {
    "postgresql": (70, 70),  # postgres, alpine
    "mysql": (999, 999),  # mysql
    "mongodb": (999, 999),  # mongodb; HOME=/data/db, where mongosh keeps its state
    "redis": (999, 1000),  # redis, alpine (gid 999 is taken there)
    "memcached": (11211, 11211),  # memcache, the image's USER
}

#: Where each image writes outside its data volume: emptyDirs there let the
#: root filesystem be read-only. /tmp: the entrypoints' here-documents and
#: temporary files, mysqld's tmpdir, mongod's socket; /var/run/postgresql and
#: /var/run/mysqld: the server's socket, lock and pid files.
SCRATCH_PATHS: dict[str, tuple[str, ...]] = {
    "postgresql": ("/tmp", "/var/run/postgresql"),  # noqa: S108 - an emptyDir mount
    "mysql": ("/tmp", "/var/run/mysqld"),  # noqa: S108 - an emptyDir mount
    "mongodb": ("/tmp",),  # noqa: S108 - an emptyDir mount
    "redis": (),
    "memcached": (),
    "": ("/tmp",),  # noqa: S108 - a service's scratch space, an emptyDir
}

#: A ``service`` runs the team's own image as this unprivileged user (not root,
#: outside the range images and hosts give their own users) with a read-only
#: root filesystem; /tmp is its only writable path.
SERVICE_USER = 10001

#: Kubernetes object names: DNS labels of at most 63 characters. Workloads are
#: kept to 52 because the controller appends a revision hash to label values.
MAX_LABEL = 63
MAX_WORKLOAD = 52
#: The zalando operator's limit on cluster names.
MAX_ZALANDO = 53

APP = "app.kubernetes.io/"
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
#: Pod-template annotation whose change rolls the pods (what ``kubectl rollout
#: restart`` does); rotation sets it so engines pick up the new password.
RESTART_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
#: Annotation naming the Secret that holds a deployment's connection details.
CONNECTION_SECRET_ANNOTATION = "connection-secret"  # noqa: S105 - an annotation key

SECRET_DATA_USERNAME = "username"  # noqa: S105 - a key name
SECRET_DATA_PASSWORD = "password"  # noqa: S105 - a key name, not a password
SECRET_DATA_PREVIOUS = "previous-password"  # noqa: S105 - a key name

_PG_HBA = """\
# Written by the KIDP broker. Local socket connections are trusted (only
# processes inside the pod reach the socket); everything else needs a password.
local   all          all                 trust
host    all          all   all           scram-sha-256
host    replication  all   all           scram-sha-256
"""

# --------------------------------------------------------------------------
# names and quantities


def short_hash(*parts: str, length: int = 6) -> str:
    """A stable hex digest of ``parts`` (keeps truncated names distinct)."""
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


def fit(name: str, limit: int, suffix: str = "") -> str:
    """``name + suffix`` within ``limit`` characters; a too long name is cut and
    given a hash of the full name, so two long names never collide."""
    if len(name) + len(suffix) <= limit:
        return f"{name}{suffix}"
    tail = f"-{short_hash(name)}{suffix}"
    return f"{name[: limit - len(tail)].rstrip('-')}{tail}"


def workload_name(resource_name: str) -> str:
    """The StatefulSet, Deployment or operator resource of a deployment."""
    return fit(resource_name, MAX_WORKLOAD)


def client_service_name(resource_name: str) -> str:
    """The Service clients connect to: the endpoint's first label."""
    return fit(resource_name, MAX_LABEL)


def headless_service_name(resource_name: str) -> str:
    """The headless Service that gives each StatefulSet pod a stable DNS name."""
    return fit(resource_name, MAX_LABEL, "-hl")


def config_map_name(resource_name: str) -> str:
    return fit(resource_name, MAX_LABEL, "-config")


def credentials_secret_name(resource_name: str) -> str:
    """The connection Secret; the same name as ``service.connection_secret``."""
    return f"{resource_name}-credentials"


def zalando_user_secret_name(username: str, cluster: str) -> str:
    """The Secret the zalando operator reads a user's password from (and only
    generates one when it is absent)."""
    return f"{username}.{cluster}.credentials.postgresql.acid.zalan.do"


def service_dns(service: str, namespace: str) -> str:
    """``<service>.<namespace>.svc.cluster.local``."""
    return f"{service}.{namespace}.svc.cluster.local"


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes quantity (``"500m"``, ``"2Gi"``, ``"1e3"``, ``4``) as a number
    of base units. Raises ``ValueError`` for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float | Decimal):
        return Decimal(str(value))
    match = _QUANTITY.match(str(value).strip())
    if match is None or match.group(2) not in _SUFFIXES:
        raise ValueError(f"not a quantity: {value!r}")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:
        raise ValueError(f"not a quantity: {value!r}") from None
    return number * _SUFFIXES[match.group(2)]


def format_cpu(cores: float) -> str:
    """CPU cores as a quantity: whole cores plain, fractions in millicores."""
    if float(cores).is_integer():
        return str(int(cores))
    return f"{round(cores * 1000)}m"


def gib(value: Decimal) -> int | float:
    """Bytes as GiB, an int when whole (what ``storageGb`` compares against)."""
    amount = value / Decimal(2) ** 30
    return int(amount) if amount == amount.to_integral_value() else float(round(amount, 2))


# --------------------------------------------------------------------------
# sizes


def size_resources(size: Size) -> dict[str, dict[str, str]]:
    """Requests and limits of one pod of ``size`` (requests == limits)."""
    preset = SIZES[size]
    amounts = {"cpu": format_cpu(preset.cpu), "memory": f"{preset.memory_gib}Gi"}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def size_of(resources: Mapping[str, Any] | None) -> str:
    """The preset whose requests ``resources`` has, else ``custom:cpu=..,memory=..``."""
    requests = dict((resources or {}).get("requests") or (resources or {}).get("limits") or {})
    try:
        cpu = parse_quantity(requests.get("cpu", "0"))
        memory = parse_quantity(requests.get("memory", "0"))
    except ValueError:
        return "custom"
    for size, preset in SIZES.items():
        if cpu == Decimal(str(preset.cpu)) and memory == Decimal(preset.memory_gib) * 2**30:
            return size.value
    return f"custom:cpu={requests.get('cpu')},memory={requests.get('memory')}"


_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)")


def version_from_image(image: str) -> str | None:
    """The engine version an image tag names (``postgres:15.10-alpine`` ->
    ``15.10``); None for an untagged, ``latest`` or digest-only image."""
    reference = image.split("@", 1)[0]
    last = reference.rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    match = _VERSION.match(last.rsplit(":", 1)[1])
    return match.group(1) if match else None


# --------------------------------------------------------------------------
# what one deployment becomes


@dataclass(frozen=True)
class Target:
    """Everything the builders need to know about one deployment."""

    deployment: Deployment
    #: The Kubernetes namespace (the deployment's namespace plus any prefix).
    namespace: str
    #: The five tracking tags, encoded as Kubernetes label keys.
    tag_labels: dict[str, str]
    #: The label key whose value is the deployment id (the selector's anchor).
    deployment_label: str
    storage_class: str | None = None
    #: Annotation keys live under the tag prefix's domain.
    annotation_prefix: str = "platform.company.com/"

    @property
    def name(self) -> str:
        return self.deployment.resource_name

    @property
    def engine(self) -> str:
        return self.deployment.spec.engine or ""

    @property
    def size(self) -> Size:
        return self.deployment.spec.size or Size.SMALL

    @property
    def workload(self) -> str:
        return workload_name(self.name)

    @property
    def component(self) -> str:
        return self.engine or self.deployment.resource_type.value

    def labels(self, **more: str) -> dict[str, str]:
        """The labels every object of this deployment carries."""
        labels = {
            **self.tag_labels,
            f"{APP}name": self.component,
            f"{APP}instance": self.name,
            f"{APP}component": self.deployment.resource_type.value,
            f"{APP}part-of": "kidp",
        }
        version = self.image_version
        if version:
            labels[f"{APP}version"] = version
        labels.update(more)
        return labels

    def selector(self) -> dict[str, str]:
        """The pod selector: immutable once created, so only stable labels."""
        return {self.deployment_label: self.deployment.id, f"{APP}instance": self.name}

    @property
    def image(self) -> str:
        spec = self.deployment.spec
        if self.deployment.resource_type is ResourceType.SERVICE:
            return spec.image or ""
        return IMAGES[self.engine][spec.version or ""]

    @property
    def image_version(self) -> str | None:
        if self.deployment.resource_type is ResourceType.SERVICE or self.engine not in IMAGES:
            return None
        return version_from_image(self.image)

    @property
    def port(self) -> int:
        if self.deployment.resource_type is ResourceType.SERVICE:
            return self.deployment.spec.port or 8080
        return DEFAULT_PORTS[self.engine]

    @property
    def replicas(self) -> int:
        spec = self.deployment.spec
        if self.deployment.resource_type is ResourceType.SERVICE:
            return spec.replicas or (2 if spec.high_availability else 1)
        return HA_REPLICAS.get(self.engine, 1) if spec.high_availability else 1

    @property
    def storage_gb(self) -> int | None:
        spec = self.deployment.spec
        if self.deployment.resource_type is ResourceType.DATABASE:
            return spec.storage_gb or SIZES[self.size].storage_gb
        return None

    @property
    def retain(self) -> bool:
        return self.deployment.deletion_policy is not DeletionPolicy.DELETE

    def metadata(self, name: str, **labels: str) -> dict[str, Any]:
        return {"name": name, "namespace": self.namespace, "labels": self.labels(**labels)}


def plain_ha_supported(engine: str) -> bool:
    """Whether a plain StatefulSet can replicate ``engine`` (see :data:`HA_REPLICAS`)."""
    return engine in HA_REPLICAS


def credentials_secret(
    target: Target,
    *,
    username: str,
    password: str,
    endpoint: str,
    port: int,
    name: str | None = None,
) -> dict[str, Any]:
    """The connection Secret: credentials plus where to connect."""
    data = {
        SECRET_DATA_USERNAME: username,
        SECRET_DATA_PASSWORD: password,
        "engine": target.engine,
        "host": endpoint,
        "port": str(port),
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": target.metadata(name or credentials_secret_name(target.name)),
        "type": "Opaque",
        "stringData": data,
    }


def _service(
    target: Target,
    name: str,
    selector: dict[str, str],
    *,
    headless: bool = False,
    port_name: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": selector,
        "ports": [
            {
                "name": port_name or target.component,
                "port": target.port,
                "targetPort": target.port,
                "protocol": "TCP",
            }
        ],
    }
    if headless:
        # Every pod gets a DNS name, ready or not: replicas find the primary
        # while it is still starting.
        spec.update(clusterIP="None", publishNotReadyAddresses=True)
    else:
        spec["type"] = "ClusterIP"
    return {"apiVersion": "v1", "kind": "Service", "metadata": target.metadata(name), "spec": spec}


def _secret_env(name: str, secret: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _exec(script: str) -> dict[str, Any]:
    return {"exec": {"command": ["sh", "-c", script]}}


def _tcp(port: int) -> dict[str, Any]:
    return {"tcpSocket": {"port": port}}


def _probes(target: Target) -> tuple[dict[str, Any], dict[str, Any]]:
    """(readiness, liveness). Readiness asks the engine itself; liveness only
    checks the port, generously, so a long crash recovery is not killed."""
    port = target.port
    ready: dict[str, Any]
    engine = target.engine
    if engine == "postgresql":
        ready = _exec(f'pg_isready -q -h 127.0.0.1 -p {port} -U "$POSTGRES_USER"')
    elif engine == "mysql":
        ready = _exec(
            f'MYSQL_PWD="$MYSQL_ROOT_PASSWORD" mysqladmin ping -uroot -h127.0.0.1 -P{port}'
        )
    elif engine == "mongodb":
        ready = _exec(
            "if command -v mongosh >/dev/null 2>&1; then s=mongosh; else s=mongo; fi; "
            f"$s --quiet --port {port} --eval 'db.adminCommand({{ping: 1}}).ok' | grep -q 1"
        )
    elif engine == "redis":
        ready = _exec(f'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p {port} ping | grep -q PONG')
    else:
        ready = _tcp(port)
    readiness = {
        **ready,
        "initialDelaySeconds": 5,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    liveness = {
        **_tcp(port),
        "initialDelaySeconds": 30,
        "periodSeconds": 20,
        "timeoutSeconds": 5,
        "failureThreshold": 6,
    }
    return readiness, liveness


def _container_security() -> dict[str, Any]:
    # The pod starts as the image's unprivileged user, so the process needs no
    # capability at all; it writes only to its volumes.
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security(uid: int, gid: int, *, fs_group: bool) -> dict[str, Any]:
    security: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": gid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if fs_group:
        security["fsGroup"] = gid
    return security


def _scratch(engine: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) of the emptyDirs an image writes to (:data:`SCRATCH_PATHS`)."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for index, path in enumerate(SCRATCH_PATHS[engine]):
        name = f"scratch-{index}"
        if path == "/tmp":  # noqa: S108 - an emptyDir mount
            # On disk: mysqld spills large sorts and temporary tables here.
            volumes.append({"name": name, "emptyDir": {}})
        else:
            # A socket, a lock and a pid file: memory is enough.
            volumes.append({"name": name, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
        mounts.append({"name": name, "mountPath": path})
    return volumes, mounts


# --- checkov exceptions ------------------------------------------------------
# scripts/check-k8s.sh scans what the builders make (scripts/render-generated.py);
# a check that cannot pass is skipped on the object it concerns, with why.

_SKIP_NETWORK_POLICY = (
    "CKV2_K8S_6=The provider makes no NetworkPolicy: the broker does not know which "
    "clients may reach a deployment, so isolation is the team namespace's own policy "
    "(a default-deny per namespace), not one object's."
)


def _skip_digest(image: str, *, team_image: bool) -> str:
    if team_image:
        return (
            f"CKV_K8S_43=The team's own image ({image}), used as the request gives it; "
            "the team pins a digest by asking for image@sha256:<digest>."
        )
    return (
        f"CKV_K8S_43=Pinned by exact tag ({image}, kidp.providers.onprem.manifests.IMAGES), "
        "chosen offline without registry access; the tag is also how drift reads the "
        "running version back."
    )


def _skip_pull_policy(image: str) -> str:
    return (
        f"CKV_K8S_15=IfNotPresent on an exact tag ({image}): the pod restarts from the "
        "node's copy while the registry is unreachable. The official images are public, "
        "so Always would add no pull-credential check."
    )


def _skip_env_secrets(engine: str) -> str:
    return (
        f"CKV_K8S_35=The official {engine} image takes its credentials from environment "
        "variables, and the postStart hook that applies a rotated password reads them "
        "there; they come from the credentials Secret by secretKeyRef, never inline."
    )


def _skip_low_uid(engine: str, uid: int) -> str:
    return (
        f"CKV_K8S_40=Runs as the official {engine} image's own non-root user (uid {uid}): "
        "it owns the files on existing volumes, which another uid could not use "
        "(PostgreSQL refuses a data directory owned by anyone else)."
    )


def _annotate_skips(obj: dict[str, Any], skips: list[str]) -> None:
    annotations = obj["metadata"].setdefault("annotations", {})
    for index, skip in enumerate(skips, start=1):
        annotations[f"checkov.io/skip{index}"] = skip


def namespace_object(name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """A Namespace the broker creates for a deployment that names a new one."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": dict(labels)},
    }
