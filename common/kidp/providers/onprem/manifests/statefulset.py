"""The plain path for databases and Redis: a StatefulSet with its Services,
configuration and per-engine container details.
"""

from __future__ import annotations

from typing import Any

from kidp.providers.onprem.manifests.common import (
    _PG_HBA,
    _SKIP_NETWORK_POLICY,
    CONNECTION_SECRET_ANNOTATION,
    DATA_PATHS,
    ENGINE_USERS,
    POD_NAME_LABEL,
    SECRET_DATA_PASSWORD,
    SECRET_DATA_PREVIOUS,
    SECRET_DATA_USERNAME,
    Target,
    _annotate_skips,
    _container_security,
    _exec,
    _pod_security,
    _probes,
    _scratch,
    _secret_env,
    _service,
    _skip_digest,
    _skip_env_secrets,
    _skip_low_uid,
    _skip_pull_policy,
    client_service_name,
    config_map_name,
    credentials_secret_name,
    headless_service_name,
    service_dns,
    size_resources,
)

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
