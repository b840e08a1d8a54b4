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

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from kidp import catalog, tags
from kidp.catalog import DEFAULT_PORTS, SIZES
from kidp.models import DeletionPolicy, Deployment, ResourceSpec, ResourceType, Size

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


# --- per-engine container details -------------------------------------------


def _postgres(target: Target, secret: str) -> dict[str, Any]:
    primary = service_dns(
        f"{target.workload}-0.{headless_service_name(target.name)}", target.namespace
    )
    data = DATA_PATHS["postgresql"]
    env = [
        _secret_env("POSTGRES_USER", secret, SECRET_DATA_USERNAME),
        _secret_env("POSTGRES_PASSWORD", secret, SECRET_DATA_PASSWORD),
        {"name": "PGDATA", "value": f"{data}/pgdata"},
        {"name": "POSTGRES_INITDB_ARGS", "value": "--auth-host=scram-sha-256"},
    ]
    # The replication password comes from a passfile written at every start
    # from the Secret, so a rotated password reaches replicas on restart. The
    # container runs as postgres, so the file is postgres's own.
    start = (
        "set -e; mkdir -p /run/kidp; "
        'printf "*:*:*:%s:%s\\n" "$POSTGRES_USER" "$POSTGRES_PASSWORD" > /run/kidp/pgpass; '
        "chmod 600 /run/kidp/pgpass; "
        'exec docker-entrypoint.sh postgres "$@"'
    )
    # Applies the Secret's password to the running primary (the image only
    # reads POSTGRES_PASSWORD at initdb); a replica just returns.
    post_start = (
        "for i in $(seq 1 90); do "
        "if pg_isready -q -h 127.0.0.1 -p 5432; then "
        'r=$(psql -U "$POSTGRES_USER" -d postgres -tAc "SELECT pg_is_in_recovery()" || true); '
        'if [ "$r" = f ]; then '
        "printf 'ALTER ROLE \"%s\" PASSWORD '\"'\"'%s'\"'\"';\\n' "
        '"$POSTGRES_USER" "$POSTGRES_PASSWORD" | psql -q -U "$POSTGRES_USER" -d postgres; fi; '
        "exit 0; fi; sleep 2; done; exit 0"
    )
    container: dict[str, Any] = {
        "command": ["sh", "-c", start, "postgres"],
        "args": [
            "-c",
            "hba_file=/etc/kidp/pg_hba.conf",
            "-c",
            "password_encryption=scram-sha-256",
        ],
        "env": env,
        "lifecycle": {"postStart": _exec(post_start)},
        "volumeMounts": [
            {"name": "data", "mountPath": data},
            {"name": "config", "mountPath": "/etc/kidp", "readOnly": True},
            {"name": "run", "mountPath": "/run/kidp"},
        ],
    }
    init: list[dict[str, Any]] = []
    if target.replicas > 1:
        # A replica clones the primary once (empty volume), then starts as a
        # streaming standby that reads its password from the passfile.
        clone = (
            'set -e; if [ "${HOSTNAME##*-}" = 0 ] || [ -s "$PGDATA/PG_VERSION" ]; then exit 0; fi; '
            f"until pg_isready -q -h {primary} -p 5432; do sleep 2; done; "
            # Cloned aside and moved in last: an interrupted clone never
            # leaves a PGDATA that looks complete.
            'export PGPASSWORD="$POSTGRES_PASSWORD"; c="$PGDATA.clone"; rm -rf "$c"; '
            f'pg_basebackup -h {primary} -p 5432 -U "$POSTGRES_USER" -D "$c" -X stream; '
            'touch "$c/standby.signal"; '
            f"printf \"primary_conninfo = 'host={primary} port=5432 user=%s "
            "passfile=/run/kidp/pgpass application_name=%s'\\n\" "
            '"$POSTGRES_USER" "$HOSTNAME" >> "$c/postgresql.auto.conf"; '
            'chmod 700 "$c"; rm -rf "$PGDATA"; mv "$c" "$PGDATA"'
        )
        init.append(
            {
                "name": "clone-primary",
                "image": target.image,
                "command": ["sh", "-c", clone],
                "env": env[:3],
                "resources": size_resources(target.size),
                "securityContext": _container_security(),
                "volumeMounts": [{"name": "data", "mountPath": data}],
            }
        )
    return {"container": container, "init": init, "config": {"pg_hba.conf": _PG_HBA}}


def _previous_password_engine(
    *,
    accepts_current: str,
    switch_from_previous: str,
    env: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    secret: str,
    setup: str = "",
) -> dict[str, Any]:
    """Container details of an engine whose image applies its password only at
    initialisation. A postStart hook makes a rotated password current: it waits
    until the engine answers (``accepts_current`` succeeds) and, while the new
    password is refused, runs ``switch_from_previous``, which logs in with the
    previous password the Secret keeps and sets the new one."""
    post_start = (
        f"{setup}for i in $(seq 1 90); do "
        f"{accepts_current} >/dev/null 2>&1 && exit 0; "
        'if [ -n "$KIDP_PREVIOUS_PASSWORD" ]; then '
        f"{switch_from_previous} >/dev/null 2>&1 && exit 0; fi; sleep 2; done; exit 0"
    )
    previous = _secret_env("KIDP_PREVIOUS_PASSWORD", secret, SECRET_DATA_PREVIOUS, optional=True)
    container = {
        "env": [*env, previous],
        "lifecycle": {"postStart": _exec(post_start)},
        "volumeMounts": mounts,
    }
    return {"container": container, "init": [], "config": None}


def _mysql(target: Target, secret: str) -> dict[str, Any]:
    return _previous_password_engine(
        accepts_current='MYSQL_PWD="$MYSQL_ROOT_PASSWORD" mysql -uroot -h127.0.0.1 -e "SELECT 1"',
        switch_from_previous=(
            "printf \"ALTER USER 'root'@'%%' IDENTIFIED BY '%s'; "
            "ALTER USER IF EXISTS 'root'@'localhost' IDENTIFIED BY '%s'; "
            "ALTER USER IF EXISTS '%s'@'%%' IDENTIFIED BY '%s';\\n\" "
            '"$MYSQL_ROOT_PASSWORD" "$MYSQL_ROOT_PASSWORD" "$MYSQL_USER" "$MYSQL_PASSWORD" '
            '| MYSQL_PWD="$KIDP_PREVIOUS_PASSWORD" mysql -uroot -h127.0.0.1'
        ),
        env=[
            _secret_env("MYSQL_ROOT_PASSWORD", secret, SECRET_DATA_PASSWORD),
            _secret_env("MYSQL_USER", secret, SECRET_DATA_USERNAME),
            _secret_env("MYSQL_PASSWORD", secret, SECRET_DATA_PASSWORD),
            {"name": "MYSQL_DATABASE", "value": "app"},
        ],
        # A fresh volume holds lost+found, which mysqld refuses as a data dir.
        mounts=[{"name": "data", "mountPath": DATA_PATHS["mysql"], "subPath": "mysql"}],
        secret=secret,
    )


def _mongodb(target: Target, secret: str) -> dict[str, Any]:
    return _previous_password_engine(
        setup="if command -v mongosh >/dev/null 2>&1; then s=mongosh; else s=mongo; fi; ",
        accepts_current=(
            '$s --quiet -u "$MONGO_INITDB_ROOT_USERNAME" -p "$MONGO_INITDB_ROOT_PASSWORD" '
            "--authenticationDatabase admin --eval 'db.adminCommand({ping: 1}).ok'"
        ),
        switch_from_previous=(
            '$s --quiet -u "$MONGO_INITDB_ROOT_USERNAME" -p "$KIDP_PREVIOUS_PASSWORD" '
            "--authenticationDatabase admin --eval "
            "\"db.getSiblingDB('admin').changeUserPassword("
            "'$MONGO_INITDB_ROOT_USERNAME', '$MONGO_INITDB_ROOT_PASSWORD')\""
        ),
        env=[
            _secret_env("MONGO_INITDB_ROOT_USERNAME", secret, SECRET_DATA_USERNAME),
            _secret_env("MONGO_INITDB_ROOT_PASSWORD", secret, SECRET_DATA_PASSWORD),
        ],
        mounts=[{"name": "data", "mountPath": DATA_PATHS["mongodb"]}],
        secret=secret,
    )


def _redis(target: Target, secret: str) -> dict[str, Any]:
    primary = service_dns(
        f"{target.workload}-0.{headless_service_name(target.name)}", target.namespace
    )
    persistent = target.storage_gb is not None
    persistence = "appendonly yes" if persistent else "appendonly no\\nsave ''"
    # The password goes into a config file written at start (never onto the
    # command line, where `ps` would show it); replicas follow ordinal 0.
    start = (
        "set -e; umask 077; "
        'printf "port %s\\ndir /data\\nrequirepass %s\\nmasterauth %s\\n' + persistence + '\\n" '
        f'{target.port} "$REDIS_PASSWORD" "$REDIS_PASSWORD" > /run/kidp/redis.conf; '
        'if [ "${HOSTNAME##*-}" != 0 ]; then '
        f'echo "replicaof {primary} {target.port}" >> /run/kidp/redis.conf; fi; '
        "exec docker-entrypoint.sh redis-server /run/kidp/redis.conf"
    )
    mounts = [{"name": "run", "mountPath": "/run/kidp"}]
    mounts.append({"name": "data", "mountPath": DATA_PATHS["redis"]})
    container = {
        "command": ["sh", "-c", start],
        "env": [_secret_env("REDIS_PASSWORD", secret, SECRET_DATA_PASSWORD)],
        "volumeMounts": mounts,
    }
    return {"container": container, "init": [], "config": None}


_ENGINES = {"postgresql": _postgres, "mysql": _mysql, "mongodb": _mongodb, "redis": _redis}


def stateful_objects(target: Target) -> list[dict[str, Any]]:
    """Services, optional ConfigMap and the StatefulSet of a plain database or
    Redis cache (the credentials Secret is built separately: it holds values)."""
    secret = credentials_secret_name(target.name)
    parts = _ENGINES[target.engine](target, secret)
    readiness, liveness = _probes(target)
    selector = target.selector()
    labels = target.labels()
    pod_labels = {**labels, **selector}
    container: dict[str, Any] = {
        "name": target.engine,
        "image": target.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": target.component, "containerPort": target.port, "protocol": "TCP"}],
        "resources": size_resources(target.size),
        "readinessProbe": readiness,
        "livenessProbe": liveness,
        "securityContext": _container_security(),
        **parts["container"],
    }
    volumes: list[dict[str, Any]] = []
    objects: list[dict[str, Any]] = []
    if parts["config"]:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": target.metadata(config_map_name(target.name)),
                "data": parts["config"],
            }
        )
        volumes.append({"name": "config", "configMap": {"name": config_map_name(target.name)}})
    mounted = {mount["name"] for mount in container["volumeMounts"]}
    if "run" in mounted:
        volumes.append({"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    scratch_volumes, scratch_mounts = _scratch(target.engine)
    volumes += scratch_volumes
    container["volumeMounts"] = [*container["volumeMounts"], *scratch_mounts]
    claims: list[dict[str, Any]] = []
    if target.storage_gb is not None:
        claim_spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": f"{target.storage_gb}Gi"}},
        }
        if target.storage_class:
            claim_spec["storageClassName"] = target.storage_class
        claims.append({"metadata": {"name": "data", "labels": pod_labels}, "spec": claim_spec})
    else:
        volumes.append({"name": "data", "emptyDir": {}})
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": _pod_security(*ENGINE_USERS[target.engine], fs_group=True),
        "containers": [container],
    }
    if parts["init"]:
        pod_spec["initContainers"] = parts["init"]
    if volumes:
        pod_spec["volumes"] = volumes
    if target.replicas > 1:
        # Spread the copies over nodes so one node failure keeps a copy.
        pod_spec["affinity"] = {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": selector},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            }
        }
    spec: dict[str, Any] = {
        "serviceName": headless_service_name(target.name),
        "replicas": target.replicas,
        "podManagementPolicy": "OrderedReady",
        "selector": {"matchLabels": selector},
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {
                    f"{target.annotation_prefix}{CONNECTION_SECRET_ANNOTATION}": secret
                },
            },
            "spec": pod_spec,
        },
    }
    if claims:
        spec["volumeClaimTemplates"] = claims
        spec["persistentVolumeClaimRetentionPolicy"] = {
            "whenDeleted": "Retain" if target.retain else "Delete",
            "whenScaled": "Retain",
        }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": target.metadata(target.workload),
        "spec": spec,
    }
    _annotate_skips(
        statefulset,
        [
            _skip_digest(target.image, team_image=False),
            _skip_pull_policy(target.image),
            _skip_env_secrets(target.engine),
            _skip_low_uid(target.engine, ENGINE_USERS[target.engine][0]),
            _SKIP_NETWORK_POLICY,
        ],
    )
    # Clients always reach ordinal 0: the primary the others replicate from.
    primary_selector = {**selector, POD_NAME_LABEL: f"{target.workload}-0"}
    objects += [
        _service(target, headless_service_name(target.name), selector, headless=True),
        _service(target, client_service_name(target.name), primary_selector),
        statefulset,
    ]
    return objects


def deployment_objects(target: Target) -> list[dict[str, Any]]:
    """Deployment and Service for a ``service`` or a memcached cache."""
    selector = target.selector()
    labels = target.labels()
    readiness, liveness = _probes(target)
    service = target.deployment.resource_type is ResourceType.SERVICE
    name = "app" if service else target.engine
    uid, gid = (SERVICE_USER, SERVICE_USER) if service else ENGINE_USERS[target.engine]
    volumes, mounts = _scratch(target.engine)
    container: dict[str, Any] = {
        "name": name,
        "image": target.image,
        # A team's image may be private: Always makes every pod's pull present
        # the namespace's credentials instead of using a copy another team's
        # pod left on the node.
        "imagePullPolicy": "Always" if service else "IfNotPresent",
        "ports": [{"name": "main", "containerPort": target.port, "protocol": "TCP"}],
        "resources": size_resources(target.size),
        "readinessProbe": readiness,
        "livenessProbe": liveness,
        "securityContext": _container_security(),
    }
    if mounts:
        container["volumeMounts"] = mounts
    if target.engine == "memcached":
        memory_mb = SIZES[target.size].memory_gib * 1024 * 3 // 4
        # Leave a quarter of the pod's memory for connections and overhead.
        container["args"] = ["memcached", "-m", str(memory_mb)]
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(uid, gid, fs_group=False),
        "containers": [container],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": target.metadata(target.workload),
        "spec": {
            "replicas": target.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": {"labels": {**labels, **selector}}, "spec": pod_spec},
        },
    }
    skips = [_skip_digest(target.image, team_image=service), _SKIP_NETWORK_POLICY]
    if not service:
        skips.insert(1, _skip_pull_policy(target.image))
    _annotate_skips(deployment, skips)
    return [
        _service(target, client_service_name(target.name), selector, port_name="main"),
        deployment,
    ]


# --- operator custom resources ------------------------------------------------

ZALANDO_GROUP = "acid.zalan.do"
ZALANDO_VERSION = "v1"
ZALANDO_PLURAL = "postgresqls"
SPOTAHOME_GROUP = "databases.spotahome.com"
SPOTAHOME_VERSION = "v1"
SPOTAHOME_PLURAL = "redisfailovers"
STRIMZI_GROUP = "kafka.strimzi.io"
STRIMZI_TOPIC_PLURAL = "kafkatopics"
STRIMZI_KAFKA_PLURAL = "kafkas"
STRIMZI_CLUSTER_LABEL = "strimzi.io/cluster"

#: The RedisFailover pod labels of the current master (spotahome's own labels).
SPOTAHOME_MASTER_LABELS = {
    f"{APP}part-of": "redis-failover",
    f"{APP}component": "redis",
    "redisfailovers-role": "master",
}


def zalando_cluster_name(team: str, resource_name: str) -> str:
    """``<team>-<name>``: the operator refuses a cluster whose name does not start
    with its ``teamId`` (unless configured otherwise), and caps names at 53."""
    name = resource_name if resource_name.startswith(f"{team}-") else f"{team}-{resource_name}"
    return fit(name, MAX_ZALANDO)


#: The zalando (Spilo) pod labels of the current primary.
SPILO_MASTER_LABELS = {"application": "spilo", "spilo-role": "master"}


def zalando_objects(target: Target, username: str) -> list[dict[str, Any]]:
    """The zalando ``postgresql`` resource (HA: two Patroni members)."""
    cluster = zalando_cluster_name(target.deployment.team, target.name)
    volume: dict[str, Any] = {"size": f"{target.storage_gb}Gi"}
    if target.storage_class:
        volume["storageClass"] = target.storage_class
    spec: dict[str, Any] = {
        "teamId": target.deployment.team,
        "numberOfInstances": 2 if target.deployment.spec.high_availability else 1,
        "postgresql": {"version": target.deployment.spec.version},
        "volume": volume,
        "resources": size_resources(target.size),
        "users": {username: ["superuser", "createdb"]},
        "databases": {"app": username},
    }
    return [
        {
            "apiVersion": f"{ZALANDO_GROUP}/{ZALANDO_VERSION}",
            "kind": "postgresql",
            "metadata": target.metadata(cluster),
            "spec": spec,
        }
    ]


def zalando_user_secret(target: Target, *, username: str, password: str) -> dict[str, Any]:
    """The user Secret in the zalando operator's own format, made before the
    cluster so the operator uses the broker's password instead of its own."""
    cluster = zalando_cluster_name(target.deployment.team, target.name)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": target.metadata(zalando_user_secret_name(username, cluster)),
        "type": "Opaque",
        "stringData": {SECRET_DATA_USERNAME: username, SECRET_DATA_PASSWORD: password},
    }


def zalando_client_service(target: Target) -> dict[str, Any]:
    """Service ``<name>`` on the cluster's primary, so the endpoint is
    ``<name>.<namespace>.svc.cluster.local`` as on every other path (the
    operator's own Service is named after the cluster, ``<team>-<name>``)."""
    cluster = zalando_cluster_name(target.deployment.team, target.name)
    selector = {**SPILO_MASTER_LABELS, "cluster-name": cluster}
    return _service(target, client_service_name(target.name), selector)


def redis_failover_objects(target: Target) -> list[dict[str, Any]]:
    """The spotahome ``RedisFailover`` and a client Service on its master."""
    ha = target.deployment.spec.high_availability
    name = workload_name(target.name)
    redis: dict[str, Any] = {
        "replicas": HA_REPLICAS["redis"] if ha else 1,
        "image": target.image,
        "resources": size_resources(target.size),
    }
    if target.storage_gb is not None:
        claim: dict[str, Any] = {
            "metadata": {"name": "data", "labels": target.labels()},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": f"{target.storage_gb}Gi"}},
            },
        }
        if target.storage_class:
            claim["spec"]["storageClassName"] = target.storage_class
        redis["storage"] = {"keepAfterDeletion": target.retain, "persistentVolumeClaim": claim}
    failover = {
        "apiVersion": f"{SPOTAHOME_GROUP}/{SPOTAHOME_VERSION}",
        "kind": "RedisFailover",
        "metadata": target.metadata(name),
        "spec": {
            "sentinel": {
                "replicas": SENTINELS_HA if ha else 1,
                "resources": {
                    "requests": {"cpu": "100m", "memory": "128Mi"},
                    "limits": {"cpu": "100m", "memory": "128Mi"},
                },
            },
            "redis": redis,
            "auth": {"secretPath": credentials_secret_name(target.name)},
        },
    }
    selector = {**SPOTAHOME_MASTER_LABELS, f"{APP}name": name}
    return [failover, _service(target, client_service_name(target.name), selector)]


def kafka_topic_name(target: Target, kafka_namespace: str) -> tuple[str, str]:
    """(object name, Kafka topic name). A topic in the deployment's own namespace
    keeps its name; one placed in a shared Kafka namespace is prefixed with the
    deployment's namespace so teams cannot collide."""
    if kafka_namespace == target.namespace:
        return target.name, target.name
    qualified = f"{target.namespace}.{target.name}"
    return fit(f"{target.namespace}-{target.name}", 253), qualified


def kafka_topic_objects(
    target: Target, *, kafka_cluster: str, kafka_namespace: str, api_version: str
) -> list[dict[str, Any]]:
    """A Strimzi ``KafkaTopic`` for ``kafka_cluster`` in its namespace."""
    spec = target.deployment.spec
    object_name, topic = kafka_topic_name(target, kafka_namespace)
    metadata = target.metadata(object_name, **{STRIMZI_CLUSTER_LABEL: kafka_cluster})
    metadata["namespace"] = kafka_namespace
    hours = spec.retention_hours or 168
    return [
        {
            "apiVersion": api_version,
            "kind": "KafkaTopic",
            "metadata": metadata,
            "spec": {
                "topicName": topic,
                "partitions": spec.partitions or 3,
                "replicas": spec.replication_factor or 3,
                "config": {"retention.ms": str(hours * 3_600_000)},
            },
        }
    ]


def namespace_object(name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """A Namespace the broker creates for a deployment that names a new one."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": dict(labels)},
    }


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


# --- what a set of objects asks of a namespace's quota ----------------------


def _container_totals(containers: list[dict[str, Any]], replicas: int) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for container in containers:
        resources = container.get("resources") or {}
        for kind in ("requests", "limits"):
            for resource, amount in (resources.get(kind) or {}).items():
                key = f"{kind}.{resource}"
                totals[key] = totals.get(key, Decimal(0)) + parse_quantity(amount) * replicas
    return totals


def quota_needs(objects: list[dict[str, Any]]) -> dict[str, Decimal]:
    """What ``objects`` would add to a ResourceQuota's ``used``, in its own keys
    (``requests.cpu``, ``limits.memory``, ``requests.storage``, ``pods``,
    ``services``, ``count/statefulsets.apps`` ...). Operator resources are
    counted by what their operator will run."""
    needs: dict[str, Decimal] = {}

    def add(key: str, amount: Decimal) -> None:
        needs[key] = needs.get(key, Decimal(0)) + amount

    for obj in objects:
        kind, api = obj["kind"], obj["apiVersion"]
        group = api.split("/")[0] if "/" in api else ""
        plural = {
            "Secret": "secrets",
            "Service": "services",
            "ConfigMap": "configmaps",
            "StatefulSet": "statefulsets",
            "Deployment": "deployments",
        }.get(kind)
        if plural is not None:
            add(f"count/{plural}{'.' + group if group else ''}", Decimal(1))
            if kind in ("Secret", "Service", "ConfigMap"):
                add(plural, Decimal(1))
        spec = obj.get("spec") or {}
        if kind in ("StatefulSet", "Deployment"):
            replicas = int(spec.get("replicas", 1))
            pod = spec["template"]["spec"]
            add("pods", Decimal(replicas))
            for key, amount in _container_totals(pod["containers"], replicas).items():
                add(key, amount)
            for claim in spec.get("volumeClaimTemplates", []):
                size = parse_quantity(claim["spec"]["resources"]["requests"]["storage"])
                add("requests.storage", size * replicas)
                add("persistentvolumeclaims", Decimal(replicas))
                storage_class = claim["spec"].get("storageClassName")
                if storage_class:
                    prefix = f"{storage_class}.storageclass.storage.k8s.io/"
                    add(f"{prefix}requests.storage", size * replicas)
                    add(f"{prefix}persistentvolumeclaims", Decimal(replicas))
        elif kind == "postgresql":
            replicas = int(spec.get("numberOfInstances", 1))
            add("pods", Decimal(replicas))
            fake = [{"resources": spec.get("resources") or {}}]
            for key, amount in _container_totals(fake, replicas).items():
                add(key, amount)
            size = parse_quantity(spec["volume"]["size"])
            add("requests.storage", size * replicas)
            add("persistentvolumeclaims", Decimal(replicas))
        elif kind == "RedisFailover":
            for part in ("redis", "sentinel"):
                replicas = int(spec[part].get("replicas", 1))
                add("pods", Decimal(replicas))
                fake = [{"resources": spec[part].get("resources") or {}}]
                for key, amount in _container_totals(fake, replicas).items():
                    add(key, amount)
            claim = (spec["redis"].get("storage") or {}).get("persistentVolumeClaim")
            if claim:
                replicas = int(spec["redis"].get("replicas", 1))
                size = parse_quantity(claim["spec"]["resources"]["requests"]["storage"])
                add("requests.storage", size * replicas)
                add("persistentvolumeclaims", Decimal(replicas))
    # ``cpu`` and ``memory`` are the quota's short names for requests.
    for resource in ("cpu", "memory"):
        if f"requests.{resource}" in needs:
            needs[resource] = needs[f"requests.{resource}"]
    return needs
