"""Google Cloud Secret Manager as the broker's :class:`kidp.ports.SecretStore`.

A secret's value is a JSON object of strings (``{"username": ..., "password":
...}``), stored as a secret version; references carry the secret's resource
name (``projects/<p>/secrets/<id>``) and the version number. The broker's
secret names (``kidp/<namespace>/<name>-credentials``) become secret ids by
turning ``/`` into ``_`` (ids allow letters, digits, ``_`` and ``-``; names
of namespaces and resources are DNS labels, which never hold ``_``, so the
mapping is one to one). The logical tags become labels through
:func:`kidp.tags.encode` (GCP's label rules).

Creating a secret is two calls on Secret Manager (the secret, then its first
version), so ``ensure`` keeps its promise in two steps: a worker that finds
the secret already created by another reads that worker's version, never
writes its own (:func:`kidp.secrets.base.ensure_once`); and a secret left
without any version by a worker that died between its two calls is adopted
once it is older than ``orphan_after`` seconds. Every payload travels with
its CRC32C, checked both ways as Google recommends. Error messages name the
secret and the status, never a value.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from google.api_core import exceptions as api_exceptions

from kidp import tags as tagging
from kidp.errors import BrokerError, NotFound, ProvisioningFailed, StoreUnavailable
from kidp.models import SecretRef
from kidp.providers.gcp.endpoints import credentials_for
from kidp.providers.gcp.errors import CLIENT_ERRORS, describe, http_status, is_temporary
from kidp.secrets.base import check_reachable, ensure_once

__all__ = ["STORE_NAME", "SecretManagerStore", "secret_id"]

logger = logging.getLogger(__name__)

STORE_NAME: Final = "gcp-secretmanager"
_SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
#: A secret without any version this old was left by a worker that died.
ORPHAN_AFTER_SECONDS: Final = 60.0


def secret_id(name: str) -> str:
    """The Secret Manager id of the broker's secret ``name``."""
    candidate = name.replace("/", "_")
    if (
        not candidate
        or len(candidate) > 255
        or not all(c.isalnum() or c in "_-" for c in candidate)
    ):
        raise ProvisioningFailed(f"secret name {name!r} cannot be a Secret Manager id")
    return candidate


class _SecretExists(Exception):
    """Secret Manager already holds a secret of the id: another worker won."""


class SecretManagerStore:
    """:class:`kidp.ports.SecretStore` on Secret Manager in ``project``.

    ``client`` injects a ``SecretManagerServiceClient``; otherwise one is made
    over REST with ``credentials`` (Application Default Credentials when None)
    and ``endpoint`` (a stand-in's URL in tests). Logical tag names are written
    as labels under ``tag_prefix``. ``clock`` returns epoch seconds.
    """

    name: Final = STORE_NAME

    def __init__(
        self,
        project: str,
        *,
        client: Any = None,
        credentials: Any = None,
        endpoint: str | None = None,
        tag_prefix: str = tagging.DEFAULT_PREFIX,
        orphan_after: float = ORPHAN_AFTER_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not project:
            raise ValueError("Secret Manager needs a project")
        self.project = project
        self.tag_prefix = tag_prefix
        self.orphan_after = orphan_after
        self._client = client
        self._credentials = credentials_for(endpoint, credentials)
        self._endpoint = endpoint
        self._clock = clock

    def __repr__(self) -> str:
        return f"SecretManagerStore({self.project!r}, endpoint={self._endpoint!r})"

    @property
    def client(self) -> Any:
        """The Secret Manager client, created on first use."""
        if self._client is None:
            from google.cloud import secretmanager

            options = {"api_endpoint": self._endpoint} if self._endpoint else None
            self._client = secretmanager.SecretManagerServiceClient(
                credentials=self._credentials, transport="rest", client_options=options
            )
        return self._client

    def close(self) -> None:
        """Close the client's HTTP session."""
        if self._client is not None:
            self._client.transport.close()

    # -------------------------------------------------------------- SecretStore

    def ensure(
        self,
        name: str,
        create: Callable[[], dict[str, str]],
        tags: dict[str, str],
    ) -> tuple[SecretRef, dict[str, str]]:
        """The latest version of ``name``, stored from ``create()`` (labelled with
        ``tags``) only when Secret Manager has no secret of that id."""
        return ensure_once(
            lambda: self._read(name),
            lambda: self._create(name, create, tags),
            lost_race=_SecretExists,
            what=f"secret {name}",
        )

    def put_version(self, name: str, value: dict[str, str]) -> SecretRef:
        """Store ``value`` as the new latest version of ``name`` (rotation);
        raises ``NotFound`` if the secret does not exist."""
        try:
            return self._add_version(name, value, expect=(api_exceptions.NotFound,))
        except api_exceptions.NotFound:
            raise NotFound(f"secret {name} does not exist") from None

    def delete(self, name: str) -> None:
        """Delete ``name`` and every version of it; an absent secret is fine."""
        try:
            self._call(
                "delete_secret", name, expect=(api_exceptions.NotFound,), name=self._path(name)
            )
        except api_exceptions.NotFound:
            return

    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless Secret Manager answers a listing."""
        check_reachable(
            lambda: self._call(
                "list_secrets", "*", request={"parent": f"projects/{self.project}", "page_size": 1}
            )
        )

    # ---------------------------------------------------------------- helpers

    def _path(self, name: str) -> str:
        return f"projects/{self.project}/secrets/{secret_id(name)}"

    def _call(
        self,
        operation: str,
        name: str,
        /,
        *,
        expect: tuple[type[Exception], ...] = (),
        **params: Any,
    ) -> Any:
        """Call the client; the ``expect``-ed answers reach the caller, every
        other failure becomes the broker error that says how to retry."""
        try:
            return getattr(self.client, operation)(**params, timeout=30.0)
        except CLIENT_ERRORS as exc:
            if isinstance(exc, expect):
                raise
            raise _translate(exc, operation, name) from None

    def _read(self, name: str) -> tuple[SecretRef, dict[str, str]] | None:
        try:
            response = self._call(
                "access_secret_version",
                name,
                expect=(api_exceptions.NotFound,),
                name=f"{self._path(name)}/versions/latest",
            )
        except api_exceptions.NotFound:
            return None  # no secret, or a secret without a version yet
        data = bytes(response.payload.data)
        if response.payload.data_crc32c and response.payload.data_crc32c != _crc32c(data):
            raise StoreUnavailable(f"secret {name} was corrupted in transit", retry_after=1.0)
        return self._ref(name, response.name), _value(data, name)

    def _create(
        self, name: str, create: Callable[[], dict[str, str]], tags: Mapping[str, str]
    ) -> tuple[SecretRef, dict[str, str]]:
        """Raises ``_SecretExists`` when the secret exists already (a lost race)."""
        try:
            self._call(
                "create_secret",
                name,
                expect=(api_exceptions.Conflict,),
                request={
                    "parent": f"projects/{self.project}",
                    "secret_id": secret_id(name),
                    "secret": {"replication": {"automatic": {}}, "labels": self._labels(tags)},
                },
            )
        except api_exceptions.Conflict:
            if not self._orphaned(name):
                raise _SecretExists(name) from None
            logger.warning("adopting secret %s, left without a version", name)
        value = dict(create())
        ref = self._add_version(name, value)
        logger.info("created secret %s", name)
        return ref, value

    def _orphaned(self, name: str) -> bool:
        """True when ``name`` exists, has no version, and is old enough that its
        creator cannot still be adding one."""
        path = self._path(name)
        try:
            secret = self._call("get_secret", name, expect=(api_exceptions.NotFound,), name=path)
            versions = self._call(
                "list_secret_versions",
                name,
                expect=(api_exceptions.NotFound,),
                request={"parent": path, "page_size": 1},
            )
        except api_exceptions.NotFound:
            return False
        if any(True for _ in versions):
            return False
        created = secret.create_time.timestamp() if secret.create_time else self._clock()
        return self._clock() - created >= self.orphan_after

    def _add_version(
        self,
        name: str,
        value: Mapping[str, str],
        *,
        expect: tuple[type[Exception], ...] = (),
    ) -> SecretRef:
        data = json.dumps(dict(value)).encode()
        response = self._call(
            "add_secret_version",
            name,
            expect=expect,
            request={
                "parent": self._path(name),
                "payload": {"data": data, "data_crc32c": _crc32c(data)},
            },
        )
        return self._ref(name, response.name)

    def _labels(self, tags: Mapping[str, str]) -> dict[str, str]:
        logical = {k: v for k, v in tags.items() if k in tagging.TAG_NAMES}
        labels = tagging.encode(logical, dialect="gcp", prefix=self.tag_prefix)
        for key, value in tags.items():
            if key not in tagging.TAG_NAMES:
                encoded = tagging.encode_key(key, dialect="gcp", prefix="")
                labels[encoded] = tagging.encode_value(value, dialect="gcp")
        return labels

    def _ref(self, name: str, version_name: str) -> SecretRef:
        secret, _, version = version_name.rpartition("/versions/")
        return SecretRef(store=STORE_NAME, name=name, id=secret, version=version or None)


def _translate(exc: BaseException, operation: str, name: str) -> BrokerError:
    text = f"{describe(exc, service='Secret Manager', operation=operation)} for secret {name}"
    if is_temporary(exc):
        return StoreUnavailable(text, retry_after=5.0)
    return ProvisioningFailed(text, details={"gcpStatus": http_status(exc)})


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


def _value(raw: bytes, name: str) -> dict[str, str]:
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ProvisioningFailed(f"secret {name} does not hold a JSON object of strings")
    return {str(k): v for k, v in value.items()}
