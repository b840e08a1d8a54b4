"""Settings: the environment, read once into a typed model.

Nothing below the composition root reads ``os.environ``; everything takes a
``Settings`` (or the values it needs) as an argument.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kidp.errors import ValidationFailed


def _split(raw: str | None) -> list[str]:
    if not raw:
        return []
    return [part.strip() for part in raw.replace(";", ",").split(",") if part.strip()]


class Settings(BaseModel):
    """Every knob of the broker. Environment variable names are ``KIDP_`` + the
    upper-cased field name (see the README's configuration table)."""

    model_config = ConfigDict(frozen=True)

    cloud: str = "aws"
    region: str = "us-east-1"
    provider: str = ""
    store_url: str = "sqlite:///./.kidp/broker.db"
    queue_url: str | None = None
    state_dir: Path = Path(".kidp")

    jwt_secret: str | None = Field(default=None, repr=False)
    jwt_jwks_url: str | None = None
    jwt_issuer: str = "kidp"
    jwt_audience: str = "kidp-broker"
    jwt_algorithms: list[str] = Field(default_factory=list)
    jwt_leeway_seconds: int = 30

    callback_secret: str | None = Field(default=None, repr=False)
    callback_allowlist: list[str] = Field(default_factory=list)
    callback_timeout_seconds: float = 30.0
    callback_retry_delays: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0])
    dead_letter_retry_seconds: float = 1800.0
    dead_letter_max_age_seconds: float = 86400.0

    aws_endpoint_url: str | None = None
    aws_msk_cluster_arn: str | None = None
    aws_ecs_cluster: str = "kidp"
    aws_subnet_ids: list[str] = Field(default_factory=list)
    aws_security_group_ids: list[str] = Field(default_factory=list)
    aws_db_subnet_group: str | None = None
    aws_cache_subnet_group: str | None = None
    aws_ecs_execution_role_arn: str | None = None
    aws_dead_letter_queue_url: str | None = None
    # GCP provider: the project, one base URL for every admin API (the stand-in
    # in tests and `serve --emulate`), the VPC for private IPs, a CMEK key, the
    # Cloud Run service account, and whether Pub/Sub topics are offered.
    gcp_project: str | None = None
    gcp_api_endpoint: str | None = None
    gcp_network: str | None = None
    gcp_kms_key: str | None = None
    gcp_run_service_account: str | None = None
    gcp_topics: bool = True

    # Azure data plane: the Table Storage store and the Storage Queue reach their
    # account through this connection string when set (Azurite, an account key),
    # else through Entra ID; Key Vault holds the credentials.
    azure_storage_connection_string: str | None = Field(default=None, repr=False)
    azure_key_vault_url: str | None = None

    # Azure (the provider): the subscription and resource group it provisions
    # into (region = the Azure location), the ARM endpoint (a sovereign cloud's
    # or a stand-in's) and the CA bundle to trust for it, how to get tokens
    # ("default": DefaultAzureCredential; "emulator": the stand-in's fixed
    # token, refused for anything but a loopback endpoint), and the Service Bus
    # namespace and Container Apps environment (name or resource id) that
    # topics and services go in.
    azure_subscription_id: str | None = None
    azure_resource_group: str | None = None
    azure_arm_endpoint: str | None = None
    azure_arm_ca_file: str | None = None
    azure_credential: str = "default"
    azure_servicebus_namespace: str | None = None
    azure_containerapps_environment: str | None = None

    # GCP data plane: the Pub/Sub queue's subscriptions,
    # Cloud Tasks for delayed jobs, and API endpoints for the local stand-ins.
    gcp_pubsub_subscription: str | None = None
    gcp_dead_letter_topic: str | None = None
    gcp_dead_letter_subscription: str | None = None
    gcp_tasks_queue: str | None = None
    gcp_tasks_service_account: str | None = None
    gcp_tasks_endpoint: str | None = None
    gcp_secretmanager_endpoint: str | None = None
    gcp_sqladmin_endpoint: str | None = None
    kube_context: str | None = None
    kube_storage_class: str | None = None
    kube_namespace_prefix: str = ""
    kube_kafka_cluster: str | None = None
    redis_url: str | None = Field(default=None, repr=False)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    secret_store: str = ""
    tag_prefix: str = "platform.company.com/"
    managed_by: str = "kidp"

    rate_limit_per_minute: int = 100
    namespace_concurrency: int = 10
    max_body_bytes: int = 1024 * 1024

    poll_interval_seconds: float = 10.0
    progress_interval_seconds: float = 30.0
    sync_delay_seconds: float = 1.0
    provision_timeout_seconds: float = 3600.0
    namespace_wait_seconds: float = 5.0
    quota_cache_seconds: float = Field(default=60.0, ge=0)
    job_lease_seconds: float = 60.0
    job_max_deliveries: int = 10
    worker_threads: int = 4
    api_threads: int = Field(default=8, ge=1)

    drift_interval_seconds: float = 300.0
    orphan_interval_seconds: float = 3600.0
    cost_interval_seconds: float = 86400.0
    rotation_interval_seconds: float = 86400.0
    reconcile_interval_seconds: float = 30.0
    rotation_max_age_days: int = 90
    cost_jump_threshold: float = 0.20
    deleted_retention_days: int = 7

    log_level: str = "INFO"
    version: str = "0.1.0"

    @field_validator("provider", mode="after")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @property
    def provider_name(self) -> str:
        """The provider adapter to load; defaults to the cloud."""
        return self.provider or self.cloud

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``KIDP_*`` variables; ``overrides`` (e.g. from CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        list_fields = {
            name
            for name, info in cls.model_fields.items()
            if info.annotation is not None and "list" in str(info.annotation)
        }
        for name in cls.model_fields:
            raw = env.get(f"KIDP_{name.upper()}")
            if raw is None or raw == "":
                continue
            values[name] = _split(raw) if name in list_fields else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:  # pydantic's message names the variable's field
            raise ValidationFailed(f"invalid configuration: {exc}") from None

    def state_file(self, name: str, *, create: str) -> str:
        """Read ``state_dir/name``, writing ``create`` there (mode 0600) if absent.

        Used for development keys so ``serve`` and ``token`` agree without setup.
        """
        path = self.state_dir / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(create)
        return path.read_text().strip()

    def effective_jwt_secret(self) -> str | None:
        """The HS256 key: configured, or a development key in the state dir
        when neither a secret nor a JWKS URL is configured."""
        if self.jwt_secret:
            return self.jwt_secret
        if self.jwt_jwks_url:
            return None
        return self.state_file("jwt-secret", create=secrets.token_hex(32))

    def effective_callback_secret(self) -> str:
        """The Standard Webhooks signing secret (``whsec_<base64>``)."""
        if self.callback_secret:
            return self.callback_secret
        import base64

        key = base64.b64encode(secrets.token_bytes(32)).decode()
        return self.state_file("callback-secret", create=f"whsec_{key}")
