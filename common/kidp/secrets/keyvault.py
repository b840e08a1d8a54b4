"""Azure Key Vault as the broker's :class:`kidp.ports.SecretStore`
(``KIDP_SECRET_STORE=keyvault``, the vault at ``KIDP_AZURE_KEY_VAULT_URL``).

A secret's value is a JSON object of strings (``{"username": ..., "password":
...}``), stored with content type ``application/json``. References carry the
version's full identifier (``https://<vault>/secrets/<name>/<version>``) and
its version: consumers read that version.

**Names.** Key Vault allows ``[0-9a-zA-Z-]`` only (127 at most), case-blind.
The broker's names (``kidp/<namespace>/<name>-credentials``: DNS labels between
slashes) map one to one and back: every ``/`` becomes ``--``
(``kidp--team-a--orders-db-credentials``). A name outside that shape (upper
case, a part that starts, ends or doubles a hyphen, too long) is made
readable and given ``---`` and 16 hex digits of its SHA-256, which the
first form never produces (:func:`vault_secret_name`).

**Never regenerated.** Key Vault has no conditional create: a ``set`` always
adds a version. So every version the broker writes is tagged with its origin
(``kidp-origin``: ``create`` or ``rotate``), and the secret's value is that of
the newest version when it is a rotation, else of the *first* created one.
Two workers that race to create both write a version; each then waits until
Key Vault's clock (creation times are whole seconds) has moved past its own
version, lists the versions and takes the first: a worker that saw no other
version before deciding was first, so all agree. The loser writes the
winner's value as the newest version (so the unversioned secret holds it too)
and disables its own. A version whose content is lost to a crash is never
chosen unless first, in which case it is the value everyone uses.

**Deleting.** Vaults soft-delete (the Bicep also turns on purge protection):
``delete`` first disables every version, then deletes and purges where the
vault allows it. A soft-deleted secret belongs to a finished deployment, and
names are per namespace and resource name, so a new deployment of the same
name may need it: creating a name that is soft-deleted and cannot be purged
recovers it (the only way to reuse the name) and writes the new deployment's
value as the first version in use, by the same race rule as any creation.
The old value is never handed out again: a recovered secret comes back as it
was deleted, with no version in use, so a worker that dies right after the
recovery leaves a secret that reads as absent, and its retry creates the value.
A secret deleted with versions still enabled (by hand, or by an older broker)
has those versions, created no later than its last one, disabled right after
the recovery. Once the new value is written, the secret is live like any
other: a retried provision reads it, never regenerates it.

Errors name the secret, the status and Key Vault's code, never a value (Key
Vault's own message is left out: it can echo the request).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError
from azure.keyvault.secrets import SecretClient, SecretProperties

from kidp import tags as tagging
from kidp.errors import BrokerError, NotFound, ProvisioningFailed, StoreUnavailable
from kidp.models import SecretRef
from kidp.providers.azure.dataplane import default_credential
from kidp.providers.azure.errors import describe, error_code, http_status, is_temporary, retry_after
from kidp.secrets.base import check_reachable, ensure_once

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

__all__ = ["ORIGIN_TAG", "STORE_NAME", "KeyVaultSecretStore", "vault_secret_name"]

log = logging.getLogger(__name__)

STORE_NAME: Final = "azure-keyvault"
#: The tag that says whether a version was a creation or a rotation.
ORIGIN_TAG: Final = "kidp-origin"
_CREATE, _ROTATE = "create", "rotate"
_CONTENT_TYPE: Final = "application/json"
_MAX_NAME = 127
_PART = re.compile(r"^[0-9a-z]+(-[0-9a-z]+)*$")
_UNSAFE = re.compile(r"[^0-9a-zA-Z]+")
# Key Vault's creation times are whole seconds: a version made after a wait
# this long after ours has a later creation time than ours.
_SETTLE_SECONDS = 1.1
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def vault_secret_name(name: str) -> str:
    """The Key Vault name of the broker's secret ``name`` (see the module docstring)."""
    parts = name.split("/")
    readable = "--".join(parts)
    if all(_PART.match(part) for part in parts) and len(readable) <= _MAX_NAME:
        return readable
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    slug = _UNSAFE.sub("-", name).strip("-").lower()[: _MAX_NAME - len(digest) - 3].strip("-")
    return f"{slug}---{digest}" if slug else f"kidp---{digest}"


class _SecretExists(Exception):
    """The secret exists already (another worker won)."""


@dataclass(frozen=True)
class _Version:
    value: dict[str, str]
    properties: SecretProperties


@dataclass(frozen=True)
class _Found:
    ref: SecretRef
    value: dict[str, str]
    properties: SecretProperties


class KeyVaultSecretStore:
    """:class:`kidp.ports.SecretStore` on one Azure Key Vault.

    ``client`` injects an ``azure.keyvault.secrets.SecretClient`` (tests);
    otherwise one is made for ``vault_url`` with ``credential`` (default: the
    process's ``DefaultAzureCredential``). ``connection_verify`` is handed to
    the client's transport (a CA file, for a stand-in's certificate). A
    loopback vault is a stand-in: its challenge's resource is not checked
    against its host name (which a loopback address cannot be a subdomain
    of). Logical tag names (``team``...) are written under ``tag_prefix`` in
    Azure's tag alphabet.
    """

    name: Final = STORE_NAME

    def __init__(
        self,
        vault_url: str | None = None,
        *,
        credential: TokenCredential | None = None,
        client: SecretClient | None = None,
        connection_verify: str | bool | None = None,
        tag_prefix: str = tagging.DEFAULT_PREFIX,
    ) -> None:
        if client is None:
            if not vault_url:
                raise ValueError("pass vault_url or client")
            options: dict[str, Any] = {}
            if connection_verify is not None:
                options["connection_verify"] = connection_verify
            if (urlsplit(vault_url).hostname or "") in _LOOPBACK:
                options["verify_challenge_resource"] = False
            # A few SDK retries of throttling and server faults, not azure-core's
            # ten: past them the job is retried by its queue, without holding
            # a worker.
            client = SecretClient(
                vault_url, credential or default_credential(), retry_total=3, **options
            )
        self._client = client
        self.vault_url = client.vault_url
        self.tag_prefix = tag_prefix

    def __repr__(self) -> str:
        return f"KeyVaultSecretStore(vault_url={self.vault_url!r})"

    def close(self) -> None:
        """Release the client's connections."""
        self._client.close()

    # ----------------------------------------------------------------- the port

    def ensure(
        self,
        name: str,
        create: Callable[[], dict[str, str]],
        tags: dict[str, str],
    ) -> tuple[SecretRef, dict[str, str]]:
        """The value of ``name``, stored from ``create()`` (tagged with ``tags``)
        only when the vault has none; a lost race returns the winner's value."""
        vault_name = vault_secret_name(name)

        def read() -> tuple[SecretRef, dict[str, str]] | None:
            found = self._read(vault_name)
            return None if found is None else (found.ref, found.value)

        return ensure_once(
            read,
            lambda: self._create(vault_name, create, tags),
            lost_race=_SecretExists,
            what=f"secret {vault_name}",
        )

    def put_version(self, name: str, value: dict[str, str]) -> SecretRef:
        """Store ``value`` as the new current version of ``name`` (rotation),
        keeping the secret's tags; ``NotFound`` if the secret does not exist."""
        vault_name = vault_secret_name(name)
        found = self._read(vault_name)
        if found is None:
            raise NotFound(f"secret {vault_name} does not exist")
        tags = {**(found.properties.tags or {}), ORIGIN_TAG: _ROTATE}
        stored = self._set(vault_name, value, tags)
        return self._ref(vault_name, stored)

    def delete(self, name: str) -> None:
        """Take every version of ``name`` out of use, delete it and purge it where
        the vault allows (purge protection keeps it soft-deleted until its
        retention ends); absent is fine."""
        vault_name = vault_secret_name(name)
        # A recovery brings the versions back as they are now: disabled, the
        # finished deployment's value can never be read as current again.
        for version in self._versions(vault_name):
            try:
                self._disable(vault_name, str(version.version))
            except NotFound:
                break  # deleted meanwhile
        try:
            poller = self._call(
                "delete",
                vault_name,
                lambda: self._client.begin_delete_secret(vault_name, _polling_interval=1),
            )
        except NotFound:
            return
        self._call("delete", vault_name, poller.wait)
        try:
            self._call("purge", vault_name, lambda: self._client.purge_deleted_secret(vault_name))
        except NotFound:
            return
        except ProvisioningFailed as refused:
            if refused.details.get("status") != 403:
                raise
            # Purge protection (or no purge permission): Key Vault purges it
            # after the retention period; a re-creation recovers it meanwhile.
            log.info("secret %s deleted, not purged (%s)", vault_name, refused.message)

    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless the vault answers a listing."""
        check_reachable(
            lambda: self._call(
                "list",
                "*",
                lambda: next(iter(self._client.list_properties_of_secrets(max_page_size=1)), None),
            )
        )

    # ----------------------------------------------------------------- steps

    def _create(
        self, vault_name: str, create: Callable[[], dict[str, str]], tags: Mapping[str, str]
    ) -> tuple[SecretRef, dict[str, str]]:
        """Write a first version; raises ``_SecretExists`` when another one was
        first (its value is the secret's). A name held by a soft-deleted secret
        is reclaimed first (purged, or recovered with no version in use)."""
        value = dict(create())
        labels = {
            **tagging.encode(tags, dialect="azure", prefix=self.tag_prefix),
            ORIGIN_TAG: _CREATE,
        }
        try:
            ours = self._set(vault_name, value, labels)
        except _Recoverable:
            self._reclaim(vault_name)
            try:
                ours = self._set(vault_name, value, labels)
            except _Recoverable:
                raise StoreUnavailable(
                    f"secret {vault_name} was deleted again while being recovered",
                    retry_after=5.0,
                ) from None
        # Wait until any version made after our look below is later than ours.
        time.sleep(_SETTLE_SECONDS)
        versions = self._versions(vault_name)
        if all(v.version != ours.version for v in versions):
            # Ours was taken out of use (deleted meanwhile, or disabled as a
            # leftover of a recovered secret): what is in use is not ours.
            log.info("secret %s: our version was taken out of use", vault_name)
            raise _SecretExists(vault_name)
        first = _first_created(versions)
        if first is None or first.version == ours.version:
            log.info("created secret %s", vault_name)
            return self._ref(vault_name, ours), value
        # Another worker was first: its value is the secret's. Make it the
        # newest version too, and take ours out of use.
        winner = self._get(vault_name, str(first.version))
        self._set(vault_name, winner.value, {**(first.tags or {}), ORIGIN_TAG: _CREATE})
        self._disable(vault_name, str(ours.version))
        log.info("secret %s was created by another worker first; using theirs", vault_name)
        raise _SecretExists(vault_name)

    def _reclaim(self, vault_name: str) -> None:
        """Free a name held by a soft-deleted secret (a finished deployment's):
        purge it where the vault allows, else recover it with none of its
        versions in use. Another worker doing the same meanwhile is fine."""
        try:
            self._call("purge", vault_name, lambda: self._client.purge_deleted_secret(vault_name))
            return
        except NotFound:
            return  # recovered or purged by another worker meanwhile
        except ProvisioningFailed as refused:
            _busy_if_conflict(refused, vault_name)
            if refused.details.get("status") != 403:
                raise
        try:
            deleted = self._call(
                "get deleted", vault_name, lambda: self._client.get_deleted_secret(vault_name)
            )
            poller = self._call(
                "recover",
                vault_name,
                lambda: self._client.begin_recover_deleted_secret(vault_name, _polling_interval=1),
            )
            self._call("recover", vault_name, poller.wait)
        except NotFound:
            return  # recovered by another worker meanwhile
        except ProvisioningFailed as refused:
            _busy_if_conflict(refused, vault_name)
            raise
        log.info("recovered soft-deleted secret %s", vault_name)
        # ``delete`` disabled every version before deleting; a secret deleted
        # otherwise comes back with the old value in use. Its versions are the
        # ones no later than its last one (a new version is written after the
        # deletion, and so after them).
        last = deleted.properties.created_on or deleted.deleted_date
        for version in self._versions(vault_name):
            if last is None or version.created_on is None or version.created_on <= last:
                self._disable(vault_name, str(version.version))
                log.info("disabled version of deleted secret %s left in use", vault_name)

    def _disable(self, vault_name: str, version: str) -> None:
        self._call(
            "disable",
            vault_name,
            lambda: self._client.update_secret_properties(vault_name, version, enabled=False),
        )

    def _read(self, vault_name: str) -> _Found | None:
        """The secret's value: the newest version if it is a rotation, else the
        first created one; None when the secret does not exist."""
        versions = self._versions(vault_name)
        if not versions:
            return None
        newest = max(versions, key=_order)
        chosen = newest if (newest.tags or {}).get(ORIGIN_TAG) == _ROTATE else None
        chosen = chosen or _first_created(versions) or newest
        secret = self._get(vault_name, str(chosen.version))
        return _Found(
            ref=self._ref(vault_name, secret.properties),
            value=secret.value,
            properties=secret.properties,
        )

    def _get(self, vault_name: str, version: str) -> _Version:
        secret = self._call("get", vault_name, lambda: self._client.get_secret(vault_name, version))
        return _Version(value=_value(secret.value, vault_name), properties=secret.properties)

    def _versions(self, vault_name: str) -> list[SecretProperties]:
        try:
            found = self._call(
                "list versions",
                vault_name,
                lambda: list(self._client.list_properties_of_secret_versions(vault_name)),
            )
        except NotFound:
            return []
        return [v for v in found if v.enabled]

    def _set(
        self, vault_name: str, value: Mapping[str, str], tags: Mapping[str, str]
    ) -> SecretProperties:
        try:
            stored = self._client.set_secret(
                vault_name, json.dumps(dict(value)), tags=dict(tags), content_type=_CONTENT_TYPE
            )
        except HttpResponseError as exc:
            if http_status(exc) == 409 and _inner_code(exc) == "ObjectIsDeletedButRecoverable":
                raise _Recoverable(vault_name) from None
            if http_status(exc) == 409 and _inner_code(exc) == "ObjectIsBeingRecovered":
                # Being recovered (by another worker, or a recovery that the
                # vault reported finished a moment early): try again shortly.
                raise StoreUnavailable(
                    describe(exc, service="Key Vault", operation=f"set of secret {vault_name}")
                    + " ObjectIsBeingRecovered",
                    retry_after=2.0,
                ) from None
            self._raise(exc, "set", vault_name)
        except AzureError as exc:
            self._raise(exc, "set", vault_name)
        return stored.properties

    def _ref(self, vault_name: str, properties: SecretProperties) -> SecretRef:
        return SecretRef(
            store=STORE_NAME, name=vault_name, id=str(properties.id), version=properties.version
        )

    def _call(self, operation: str, vault_name: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except ResourceNotFoundError:
            raise NotFound(f"secret {vault_name} does not exist") from None
        except AzureError as exc:
            self._raise(exc, operation, vault_name)

    @staticmethod
    def _raise(exc: AzureError, operation: str, vault_name: str) -> Any:
        text = describe(exc, service="Key Vault", operation=f"{operation} of secret {vault_name}")
        # Not chained: the SDK's exception belongs to a request that may have
        # carried the secret's value.
        if is_temporary(exc):
            raise StoreUnavailable(text, retry_after=retry_after(exc, default=5.0)) from None
        error: BrokerError = ProvisioningFailed(
            text, details={"status": http_status(exc), "azureErrorCode": error_code(exc)}
        )
        raise error from None


class _Recoverable(Exception):
    """The name is held by a soft-deleted secret."""


def _order(properties: SecretProperties) -> tuple[datetime, str]:
    created = properties.created_on or datetime.min.replace(tzinfo=UTC)
    return created, str(properties.version)


def _first_created(versions: list[SecretProperties]) -> SecretProperties | None:
    created = [v for v in versions if (v.tags or {}).get(ORIGIN_TAG, _CREATE) == _CREATE]
    return min(created, key=_order) if created else None


def _busy_if_conflict(refused: ProvisioningFailed, vault_name: str) -> None:
    """A 409 while reclaiming a name: another worker is recovering it."""
    if refused.details.get("status") == 409:
        raise StoreUnavailable(
            f"secret {vault_name} is being recovered by another worker", retry_after=2.0
        ) from None


def _inner_code(exc: HttpResponseError) -> str:
    inner = getattr(exc.error, "innererror", None) if exc.error is not None else None
    if isinstance(inner, Mapping):
        return str(inner.get("code", ""))
    return ""


def _value(raw: str | None, vault_name: str) -> dict[str, str]:
    try:
        value = json.loads(raw or "")
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ProvisioningFailed(f"secret {vault_name} does not hold a JSON object of strings")
    return {str(k): v for k, v in value.items()}
