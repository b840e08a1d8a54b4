"""AWS Secrets Manager as the broker's :class:`kidp.ports.SecretStore`.

A secret's value is a JSON object of strings (``{"username": ..., "password":
...}``); references carry the secret's ARN and the ``VersionId`` that is
current. ``ensure`` never regenerates: a retried provision reads the value the
first attempt stored, and when two workers race to create the same secret the
loser reads the winner's. Error messages name the secret and AWS's error code,
never a value.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from kidp import tags as tagging
from kidp.errors import NotFound, ProvisioningFailed, StoreUnavailable
from kidp.models import SecretRef
from kidp.providers.aws.clients import new_client
from kidp.providers.aws.errors import Refused, error_code, is_temporary, redact
from kidp.secrets.base import check_reachable, ensure_once

logger = logging.getLogger(__name__)

STORE_NAME: Final = "aws-secretsmanager"


class _SecretExists(Exception):
    """Secrets Manager already holds a secret of the name: another worker won."""


class SecretsManagerStore:
    """:class:`kidp.ports.SecretStore` on AWS Secrets Manager.

    ``client`` injects a boto3 ``secretsmanager`` client (tests); otherwise one
    is made for ``region``/``endpoint_url`` with standard-mode retries.
    ``kms_key_id`` encrypts new secrets with a customer key instead of the
    account's ``aws/secretsmanager`` key. Logical tag names (``team``...) are
    written under ``tag_prefix``; keys that already carry a prefix are kept.
    """

    name: Final = STORE_NAME

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        client: Any = None,
        kms_key_id: str | None = None,
        tag_prefix: str = tagging.DEFAULT_PREFIX,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.kms_key_id = kms_key_id
        self.tag_prefix = tag_prefix
        self._client = client

    def __repr__(self) -> str:
        return f"SecretsManagerStore(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def client(self) -> Any:
        """The Secrets Manager client, created on first use."""
        if self._client is None:
            self._client = new_client(
                "secretsmanager",
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                config=Config(
                    retries={"mode": "standard", "max_attempts": 5},
                    connect_timeout=5,
                    read_timeout=30,
                ),
            )
        return self._client

    def _call(
        self,
        operation: str,
        name: str,
        /,
        *,
        expect: tuple[str, ...] = (),
        secrets: Collection[str] = (),
        **params: Any,
    ) -> Any:
        try:
            return getattr(self.client, operation)(**params)
        except ClientError as exc:
            code = error_code(exc)
            message = redact(str(exc.response.get("Error", {}).get("Message", "")), secrets)
            if code in expect:
                raise Refused(code, message) from None
            text = f"Secrets Manager {operation} failed for secret {name} ({code}): {message}"
            # Not chained: the botocore exception belongs to a call that may
            # have carried the secret value.
            if is_temporary(exc):
                raise StoreUnavailable(text, retry_after=5.0) from None
            raise ProvisioningFailed(text, details={"awsErrorCode": code}) from None
        except ParamValidationError:
            raise ProvisioningFailed(
                f"Secrets Manager {operation} for secret {name} had invalid parameters"
            ) from None
        except (BotoConnectionError, HTTPClientError, NoCredentialsError) as exc:
            raise StoreUnavailable(
                f"cannot reach Secrets Manager for {operation} ({type(exc).__name__})",
                retry_after=30.0,
            ) from None

    def _tags(self, tags: Mapping[str, str]) -> list[dict[str, str]]:
        return [
            {
                "Key": tagging.encode_key(key, dialect="aws", prefix=self.tag_prefix)
                if key in tagging.TAG_NAMES
                else key,
                "Value": value,
            }
            for key, value in tags.items()
        ]

    @staticmethod
    def _value(raw: Any, name: str) -> dict[str, str]:
        try:
            value = json.loads(raw)
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ProvisioningFailed(f"secret {name} does not hold a JSON object of strings")
        return {str(k): v for k, v in value.items()}

    def _ref(self, name: str, response: Mapping[str, Any]) -> SecretRef:
        return SecretRef(
            store=STORE_NAME, name=name, id=response["ARN"], version=response.get("VersionId")
        )

    def _read(self, name: str) -> tuple[SecretRef, dict[str, str]] | None:
        try:
            current = self._call(
                "get_secret_value", name, expect=("ResourceNotFoundException",), SecretId=name
            )
        except Refused:
            return None
        return self._ref(name, current), self._value(current.get("SecretString"), name)

    def ensure(
        self,
        name: str,
        create: Callable[[], dict[str, str]],
        tags: dict[str, str],
    ) -> tuple[SecretRef, dict[str, str]]:
        """The current version of ``name``, stored from ``create()`` (tagged with
        ``tags``, encrypted with ``kms_key_id`` when set) only when Secrets
        Manager has no secret of that name."""
        return ensure_once(
            lambda: self._read(name),
            lambda: self._create(name, create, tags),
            lost_race=_SecretExists,
            what=f"secret {name}",
        )

    def _create(
        self, name: str, create: Callable[[], dict[str, str]], tags: Mapping[str, str]
    ) -> tuple[SecretRef, dict[str, str]]:
        """Raises ``_SecretExists`` when the secret exists already (a lost race)."""
        value = dict(create())
        params: dict[str, Any] = {
            "Name": name,
            "SecretString": json.dumps(value),
            "Tags": self._tags(tags),
            "Description": "Credentials managed by the KIDP broker",
        }
        if self.kms_key_id:
            params["KmsKeyId"] = self.kms_key_id
        try:
            created = self._call(
                "create_secret",
                name,
                expect=("ResourceExistsException", "InvalidRequestException"),
                secrets=tuple(value.values()),
                **params,
            )
        except Refused as refused:
            if refused.code == "ResourceExistsException":
                raise _SecretExists(name) from None
            if "deletion" in refused.message.lower():
                # Secrets Manager finishes a forced deletion asynchronously;
                # until then the name cannot be reused.
                raise StoreUnavailable(
                    f"secret {name} cannot be created yet: {refused.message}",
                    retry_after=10.0,
                ) from None
            raise ProvisioningFailed(
                f"Secrets Manager refused to create secret {name}: {refused.message}"
            ) from None
        logger.info("created secret %s", name)
        return self._ref(name, created), value

    def put_version(self, name: str, value: dict[str, str]) -> SecretRef:
        """Store ``value`` as the new current version of ``name`` (rotation);
        raises ``NotFound`` if the secret does not exist."""
        try:
            response = self._call(
                "put_secret_value",
                name,
                expect=("ResourceNotFoundException",),
                secrets=tuple(value.values()),
                SecretId=name,
                SecretString=json.dumps(dict(value)),
            )
        except Refused:
            raise NotFound(f"secret {name} does not exist") from None
        return self._ref(name, response)

    def delete(self, name: str) -> None:
        """Delete ``name`` at once, without a recovery window; an absent secret is fine."""
        try:
            self._call(
                "delete_secret",
                name,
                expect=("ResourceNotFoundException",),
                SecretId=name,
                ForceDeleteWithoutRecovery=True,
            )
        except Refused:
            return

    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless Secrets Manager answers a listing."""
        check_reachable(lambda: self._call("list_secrets", "*", MaxResults=1))
