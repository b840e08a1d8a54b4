"""Kubernetes Secrets as the broker's :class:`kidp.ports.SecretStore`.

Names map to Secrets by their last two parts: the broker names a
deployment's credentials ``kidp/<namespace>/<resource>-credentials``
(:func:`kidp.service.secret_name`), which is the Secret
``<resource>-credentials`` in the Kubernetes namespace
``<namespace_prefix><namespace>``. That is exactly the Secret the on-prem
provider's pods read and the ``connectionSecret`` of the Ready callback, so
on-prem credentials live in one place: the workload's own namespace, where an
ExternalSecrets operator (seed 000) or the application can pick them up.

Values are Secret ``data`` keys (``username``, ``password``, ...). ``ensure``
never regenerates: an existing Secret's value is returned as it is, and when
two workers race to create one, the loser reads the winner's. ``put_version``
sets the keys it is given and keeps the others (the provider's ``host`` and
``port``); a changed ``password`` leaves the old one as ``previous-password``,
which the engines' start hooks use to switch over. A reference's ``version``
is the Secret's ``resourceVersion``. Messages name the Secret, never a value.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from kidp import tags as tagging
from kidp.errors import (
    NotFound,
    ProvisioningFailed,
    StoreUnavailable,
    ValidationFailed,
)
from kidp.models import SecretRef
from kidp.providers.onprem.api import (
    SECRET,
    AlreadyExists,
    KubeApi,
    decode_secret,
    labels_of,
    load_api_client,
)
from kidp.providers.onprem.manifests import SECRET_DATA_PASSWORD, SECRET_DATA_PREVIOUS
from kidp.secrets.base import check_reachable, ensure_once

logger = logging.getLogger(__name__)

STORE_NAME: Final = "kubernetes-secret"
#: Keys whose values are no secret (kept readable in error messages).
_PLAIN_KEYS = frozenset({"username", "engine", "host", "port"})
_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class KubernetesSecretStore:
    """:class:`kidp.ports.SecretStore` on Kubernetes Secrets.

    ``api_client`` injects a ``kubernetes.client.ApiClient`` (tests); otherwise
    the cluster comes from ``kubeconfig``/``context`` or the in-cluster service
    account, as for :class:`kidp.providers.onprem.KubernetesProvider`, whose
    ``namespace_prefix`` this store must share. A namespace that does not exist
    yet is created (labelled managed-by), as the provider would.
    """

    name: Final = STORE_NAME

    def __init__(
        self,
        *,
        api_client: Any | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        namespace_prefix: str = "",
        tag_prefix: str = tagging.DEFAULT_PREFIX,
        request_timeout: float = 30.0,
    ) -> None:
        if api_client is None:
            api_client, _ = load_api_client(kubeconfig=kubeconfig, context=context)
        self.namespace_prefix = namespace_prefix
        self.tag_prefix = tag_prefix
        self.api = KubeApi(api_client, temporary=StoreUnavailable, request_timeout=request_timeout)

    def __repr__(self) -> str:
        return f"KubernetesSecretStore(namespace_prefix={self.namespace_prefix!r})"

    def locate(self, name: str) -> tuple[str, str]:
        """(Kubernetes namespace, Secret name) of the store name ``name``."""
        parts = name.strip("/").split("/")
        if len(parts) < 2:
            raise ValidationFailed(
                f"secret name '{name}' names no namespace; expected "
                "[kidp/]<namespace>/<secret-name>"
            )
        namespace, secret = f"{self.namespace_prefix}{parts[-2]}", parts[-1]
        if len(namespace) > 63 or not _DNS_1123_LABEL.match(namespace):
            raise ValidationFailed(f"'{namespace}' is not a valid Kubernetes namespace name")
        if len(secret) > 253 or not _DNS_1123_SUBDOMAIN.match(secret):
            raise ValidationFailed(f"'{secret}' is not a valid Kubernetes Secret name")
        return namespace, secret

    def _labels(self, tags: Mapping[str, str]) -> dict[str, str]:
        labels: dict[str, str] = {}
        for key, value in tags.items():
            if key in tagging.TAG_NAMES:
                labels[tagging.encode_key(key, dialect="kubernetes", prefix=self.tag_prefix)] = (
                    value
                )
            elif "/" in key:
                labels[key] = value
        return labels

    def _managed_key(self) -> str:
        return tagging.encode_key(tagging.MANAGED_BY, dialect="kubernetes", prefix=self.tag_prefix)

    def _ref(self, name: str, obj: Mapping[str, Any]) -> SecretRef:
        meta = obj.get("metadata") or {}
        return SecretRef(
            store=STORE_NAME,
            name=name,
            id=f"{meta.get('namespace')}/{meta.get('name')}",
            version=str(meta.get("resourceVersion") or "") or None,
        )

    def _read(self, name: str) -> tuple[SecretRef, dict[str, str]] | None:
        namespace, secret = self.locate(name)
        found = self.api.get(SECRET, namespace, secret)
        if found is None:
            return None
        managed_key = self._managed_key()
        if managed_key not in labels_of(found):
            # Never hand out (or later overwrite) a Secret someone else made.
            raise ProvisioningFailed(
                f"Secret {namespace}/{secret} exists and was not created by the broker "
                f"(no {managed_key} label); delete or rename it, or choose another resourceName"
            )
        return self._ref(name, found), decode_secret(found)

    def ensure(
        self,
        name: str,
        create: Callable[[], dict[str, str]],
        tags: dict[str, str],
    ) -> tuple[SecretRef, dict[str, str]]:
        """The Secret of ``name`` and its decoded data, made from ``create()``
        (labelled with ``tags``, in a namespace made if missing) only when no
        Secret of that name exists. A Secret the broker did not make is refused."""
        namespace, secret = self.locate(name)
        return ensure_once(
            lambda: self._read(name),
            lambda: self._create(name, namespace, secret, create, tags),
            lost_race=AlreadyExists,
            what=f"Secret {namespace}/{secret}",
        )

    def _create(
        self,
        name: str,
        namespace: str,
        secret: str,
        create: Callable[[], dict[str, str]],
        tags: Mapping[str, str],
    ) -> tuple[SecretRef, dict[str, str]]:
        labels = self._labels(tags)
        managed_key = self._managed_key()
        labels.setdefault(managed_key, tagging.MANAGED_BY_VALUE)
        self.api.ensure_namespace(namespace, {managed_key: labels[managed_key]})
        value = dict(create())
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": secret,
                "namespace": namespace,
                "labels": labels,
                "annotations": {f"{self.tag_prefix}description": "Credentials managed by KIDP"},
            },
            "type": "Opaque",
            "stringData": value,
        }
        created = self.api.create(SECRET, namespace, body, secrets=_secret_values(value))
        logger.info("created secret %s/%s", namespace, secret)
        return self._ref(name, created), value

    def put_version(self, name: str, value: dict[str, str]) -> SecretRef:
        """Set ``value``'s keys on the existing Secret ``name`` (rotation); other
        keys are kept and a replaced password stays as ``previous-password``.
        Raises ``NotFound`` if the Secret does not exist."""
        current = self._read(name)
        if current is None:
            raise NotFound(f"secret {name} does not exist")
        _, old = current
        update = dict(value)
        previous = old.get(SECRET_DATA_PASSWORD)
        if (
            SECRET_DATA_PASSWORD in update
            and previous
            and previous != update[SECRET_DATA_PASSWORD]
            and SECRET_DATA_PREVIOUS not in update
        ):
            update[SECRET_DATA_PREVIOUS] = previous
        namespace, secret = self.locate(name)
        try:
            patched = self.api.patch(
                SECRET,
                namespace,
                secret,
                {"stringData": update},
                secrets=_secret_values({**old, **update}) + _secret_values(old),
            )
        except ProvisioningFailed as exc:
            if exc.details.get("httpStatus") == 404:
                raise NotFound(f"secret {name} does not exist") from None
            raise
        return self._ref(name, patched)

    def delete(self, name: str) -> None:
        """Delete the Secret; an absent one is fine."""
        namespace, secret = self.locate(name)
        self.api.delete(SECRET, namespace, secret)

    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless the API server answers."""
        check_reachable(self.api.check)


def _secret_values(value: Mapping[str, str]) -> tuple[str, ...]:
    """The values to mask out of messages: all but the plainly public ones."""
    return tuple(v for k, v in value.items() if k not in _PLAIN_KEYS and v)
