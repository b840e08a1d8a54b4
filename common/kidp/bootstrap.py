"""The composition root: settings -> adapters -> service.

Production, the embedded service, the CLI and the tests all build the broker
here; tests hand in their own adapters (pointed at emulators) through the same
door. Adapter modules are imported lazily so a broker that serves AWS never
imports another cloud's SDK.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from kidp.callbacks import CallbackSender
from kidp.errors import ValidationFailed
from kidp.limits import InMemoryRateLimiter
from kidp.observability import Metrics
from kidp.ports import CloudProvider, DeploymentStore, JobQueue, RateLimiter, SecretStore
from kidp.scans import Scanner
from kidp.service import BrokerService
from kidp.settings import Settings
from kidp.ssrf import Allowlist

if TYPE_CHECKING:
    from kidp.api import Gatekeeper
    from kidp.auth import TokenVerifier

PROVIDERS = ("aws", "onprem", "azure", "gcp")

log = logging.getLogger("kidp.bootstrap")


@dataclass
class Broker:
    """Everything one broker process needs, wired."""

    settings: Settings
    service: BrokerService
    scanner: Scanner
    limiter: RateLimiter
    closers: list[Any] = field(default_factory=list)

    @cached_property
    def verifier(self) -> TokenVerifier:
        """Bearer-token verification, built with the API: only it verifies
        tokens, and the JWT library is no part of a worker's cold start."""
        return build_verifier(self.settings)

    @cached_property
    def app(self) -> Gatekeeper:
        """The HTTP API, built on first use: a worker or a scan function never
        imports the web framework (it is most of a Lambda's cold start)."""
        from kidp.api import create_app

        return create_app(
            self.service, verifier=self.verifier, limiter=self.limiter, scanner=self.scanner
        )

    def close(self) -> None:
        """Release clients and connections (in reverse order of creation)."""
        for closer in reversed(self.closers):
            closer()
        self.closers.clear()


def build_provider(settings: Settings, metrics: Metrics) -> CloudProvider:
    """The cloud provider named by ``KIDP_PROVIDER`` (default: ``KIDP_CLOUD``)."""
    name = settings.provider_name

    def on_call(resource_type: str, operation: str) -> None:
        metrics.cloud_api_calls.labels(name, resource_type, operation).inc()

    if name == "aws":
        from kidp.providers.aws import AwsProvider

        return AwsProvider(
            region=settings.region,
            endpoint_url=settings.aws_endpoint_url,
            tag_prefix=settings.tag_prefix,
            managed_by=settings.managed_by,
            msk_cluster_arn=settings.aws_msk_cluster_arn,
            ecs_cluster=settings.aws_ecs_cluster,
            subnet_ids=settings.aws_subnet_ids,
            security_group_ids=settings.aws_security_group_ids,
            db_subnet_group=settings.aws_db_subnet_group,
            cache_subnet_group=settings.aws_cache_subnet_group,
            ecs_execution_role_arn=settings.aws_ecs_execution_role_arn,
            quota_ttl=settings.quota_cache_seconds,
            on_call=on_call,
        )
    if name == "onprem":
        from kidp.providers.onprem import KubernetesProvider

        # The cluster comes from the standard KUBECONFIG (or the in-cluster
        # service account), as kubectl finds it.
        return KubernetesProvider(
            context=settings.kube_context,
            tag_prefix=settings.tag_prefix,
            managed_by=settings.managed_by,
            storage_class=settings.kube_storage_class,
            namespace_prefix=settings.kube_namespace_prefix,
            kafka_cluster=settings.kube_kafka_cluster,
            quota_ttl=settings.quota_cache_seconds,
            on_call=on_call,
        )
    if name == "gcp":
        from kidp.providers.gcp import GcpProvider

        # Credentials are Application Default Credentials, found on first use.
        return GcpProvider(
            project=settings.gcp_project,
            region=settings.region,
            api_endpoint=settings.gcp_api_endpoint,
            tag_prefix=settings.tag_prefix,
            managed_by=settings.managed_by,
            network=settings.gcp_network,
            kms_key=settings.gcp_kms_key,
            run_service_account=settings.gcp_run_service_account,
            topics=settings.gcp_topics,
            on_call=on_call,
        )
    if name == "azure":
        from kidp.providers.azure import AzureProvider, credential_for

        if not settings.azure_subscription_id or not settings.azure_resource_group:
            raise ValidationFailed(
                "the Azure provider needs KIDP_AZURE_SUBSCRIPTION_ID and KIDP_AZURE_RESOURCE_GROUP"
            )
        # Location = KIDP_REGION; tokens from DefaultAzureCredential unless a stand-in's.
        return AzureProvider(
            subscription_id=settings.azure_subscription_id,
            resource_group=settings.azure_resource_group,
            region=settings.region,
            credential=credential_for(settings.azure_credential, settings.azure_arm_endpoint),
            base_url=settings.azure_arm_endpoint,
            connection_verify=settings.azure_arm_ca_file or True,
            tag_prefix=settings.tag_prefix,
            managed_by=settings.managed_by,
            servicebus_namespace=settings.azure_servicebus_namespace,
            containerapps_environment=settings.azure_containerapps_environment,
            on_call=on_call,
        )
    raise ValidationFailed(
        f"provider '{name}' is not available in this release; available: {', '.join(PROVIDERS)}"
    )


def build_store(settings: Settings) -> DeploymentStore:
    """The deployment store named by ``KIDP_STORE_URL``."""
    if urlparse(settings.store_url).scheme == "postgresql+cloudsql":
        from kidp.stores.cloudsql import CloudSqlDeploymentStore

        return CloudSqlDeploymentStore(
            settings.store_url, admin_endpoint=settings.gcp_sqladmin_endpoint
        )
    scheme = urlparse(settings.store_url).scheme.split("+")[0]
    if scheme in ("sqlite", "postgresql", "postgres"):
        from kidp.stores.sql import SqlDeploymentStore

        return SqlDeploymentStore(settings.store_url)
    if scheme == "dynamodb":
        from kidp.stores.dynamodb import DynamoDbDeploymentStore

        table = urlparse(settings.store_url).netloc
        if not table:
            raise ValidationFailed("KIDP_STORE_URL must name the table: dynamodb://<table>")
        return DynamoDbDeploymentStore(
            table,
            region=settings.region,
            endpoint_url=settings.aws_endpoint_url,
            deleted_retention_days=settings.deleted_retention_days,
        )
    if scheme == "azuretable":
        from kidp.stores.azuretable import TableDeploymentStore

        return TableDeploymentStore.from_url(
            settings.store_url, connection_string=settings.azure_storage_connection_string
        )
    raise ValidationFailed(
        f"KIDP_STORE_URL scheme '{scheme}' is not supported; "
        "use sqlite:///, postgresql://, postgresql+cloudsql://, dynamodb:// or azuretable://"
    )


def build_queue(settings: Settings, store: DeploymentStore) -> JobQueue:
    """The job queue named by ``KIDP_QUEUE_URL``; unset means a durable table in
    the store's own database."""
    if settings.queue_url is None:
        from kidp.queues.sql import SqlJobQueue
        from kidp.stores.sql import SqlDeploymentStore

        if not isinstance(store, SqlDeploymentStore):
            raise ValidationFailed("KIDP_QUEUE_URL is required with this KIDP_STORE_URL")
        return SqlJobQueue(store.engine, max_deliveries=settings.job_max_deliveries)
    url = urlparse(settings.queue_url)
    if url.scheme == "nats":
        from kidp.queues.nats import NatsJobQueue

        return NatsJobQueue(
            settings.queue_url,
            max_deliveries=settings.job_max_deliveries,
            ack_wait_seconds=settings.job_lease_seconds,
        )
    if url.scheme in ("https", "http") and is_sqs_url(settings.queue_url, settings):
        from kidp.queues.sqs import SqsJobQueue

        return SqsJobQueue(
            settings.queue_url,
            region=settings.region,
            endpoint_url=settings.aws_endpoint_url,
            max_deliveries=settings.job_max_deliveries,
            dead_letter_queue_url=settings.aws_dead_letter_queue_url,
        )
    if url.scheme == "azurequeue":
        from kidp.queues.azurequeue import AzureStorageJobQueue

        return AzureStorageJobQueue.from_url(
            settings.queue_url,
            connection_string=settings.azure_storage_connection_string,
            max_deliveries=settings.job_max_deliveries,
        )
    if url.scheme == "pubsub":
        return build_pubsub_queue(settings)
    raise ValidationFailed(
        f"KIDP_QUEUE_URL '{url.scheme}://{url.hostname or ''}' is not supported; use an SQS "
        "queue URL, nats://host:4222/<stream>, azurequeue://<account>/<queue> or "
        "pubsub://<project>/<topic>, or leave it "
        "unset for the store's own table"
    )


def build_pubsub_queue(settings: Settings) -> JobQueue:
    """The Pub/Sub job queue, with Cloud Tasks for its delays (GCP)."""
    from kidp.queues.cloudtasks import CloudTasksDelays
    from kidp.queues.pubsub import PubSubJobQueue

    if not settings.gcp_tasks_queue:
        raise ValidationFailed(
            "a Pub/Sub queue needs KIDP_GCP_TASKS_QUEUE (projects/<p>/locations/<l>/queues/<q>): "
            "Pub/Sub has no per-message delay, so Cloud Tasks publishes delayed jobs"
        )
    assert settings.queue_url is not None
    return PubSubJobQueue(
        settings.queue_url,
        subscription=settings.gcp_pubsub_subscription,
        dead_letter_topic=settings.gcp_dead_letter_topic,
        dead_letter_subscription=settings.gcp_dead_letter_subscription,
        delays=CloudTasksDelays(
            settings.gcp_tasks_queue,
            service_account_email=settings.gcp_tasks_service_account,
            endpoint=settings.gcp_tasks_endpoint,
        ),
        max_deliveries=settings.job_max_deliveries,
    )


def is_sqs_url(queue_url: str, settings: Settings) -> bool:
    """An SQS queue URL: ``https://sqs.<region>.amazonaws.com/<account>/<name>``, or
    any URL on the configured AWS endpoint (the emulator in tests)."""
    host = urlparse(queue_url).netloc
    endpoint = urlparse(settings.aws_endpoint_url or "").netloc
    return host.startswith("sqs.") or (bool(endpoint) and host == endpoint)


def build_secrets(settings: Settings) -> SecretStore:
    """The secret store: the provider's own cloud store, or the local encrypted file."""
    default = {"aws": "aws", "onprem": "kubernetes", "azure": "keyvault", "gcp": "gcp"}.get(
        settings.provider_name, "local"
    )
    kind = settings.secret_store or default
    if kind == "kubernetes":
        from kidp.secrets.kubernetes import KubernetesSecretStore

        return KubernetesSecretStore(
            context=settings.kube_context,
            namespace_prefix=settings.kube_namespace_prefix,
            tag_prefix=settings.tag_prefix,
        )
    if kind == "aws":
        from kidp.secrets.aws import SecretsManagerStore

        return SecretsManagerStore(region=settings.region, endpoint_url=settings.aws_endpoint_url)
    if kind == "keyvault":
        from kidp.secrets.keyvault import KeyVaultSecretStore

        if not settings.azure_key_vault_url:
            raise ValidationFailed(
                "KIDP_AZURE_KEY_VAULT_URL is required with KIDP_SECRET_STORE=keyvault: "
                "https://<vault>.vault.azure.net/"
            )
        return KeyVaultSecretStore(settings.azure_key_vault_url, tag_prefix=settings.tag_prefix)
    if kind == "gcp":
        from kidp.secrets.gcpsecretmanager import SecretManagerStore

        if not settings.gcp_project:
            raise ValidationFailed("KIDP_SECRET_STORE=gcp needs KIDP_GCP_PROJECT")
        return SecretManagerStore(
            settings.gcp_project,
            endpoint=settings.gcp_secretmanager_endpoint,
            tag_prefix=settings.tag_prefix,
        )
    if kind == "local":
        from kidp.secrets.local import LocalSecretStore, load_or_create_key

        key = load_or_create_key(settings.state_dir / "secrets.key")
        return LocalSecretStore(settings.state_dir / "secrets.enc", key=key)
    raise ValidationFailed(
        f"KIDP_SECRET_STORE '{kind}' is not supported; use aws, gcp, keyvault, kubernetes or local"
    )


def build_limiter(settings: Settings) -> RateLimiter:
    """Per-caller rate limit counters: in Redis when ``KIDP_REDIS_URL`` is set, so
    the limit holds across replicas; in process memory otherwise."""
    if settings.redis_url:
        from kidp.limiters.redis import RedisRateLimiter

        return RedisRateLimiter(settings.redis_url)
    return InMemoryRateLimiter()


def build_verifier(settings: Settings) -> TokenVerifier:
    """Bearer token verification fixed by configuration (HS256 or a JWKS URL)."""
    from kidp.auth import TokenVerifier

    if not settings.jwt_secret and not settings.jwt_jwks_url:
        log.warning(
            "KIDP_JWT_SECRET and KIDP_JWT_JWKS_URL are unset: using the development "
            "key in the state directory; set one for anything shared",
            extra={"stateDir": str(settings.state_dir)},
        )
    return TokenVerifier(
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        hs_secret=settings.effective_jwt_secret(),
        jwks_url=settings.jwt_jwks_url,
        algorithms=settings.jwt_algorithms,
        leeway_seconds=settings.jwt_leeway_seconds,
    )


def _close_with_broker(adapter: object, closers: list[Any]) -> None:
    # Only adapters built here are closed here: one handed in belongs to its caller.
    close = getattr(adapter, "close", None)
    if callable(close):
        closers.append(close)


def build(
    settings: Settings,
    *,
    provider: CloudProvider | None = None,
    store: DeploymentStore | None = None,
    queue: JobQueue | None = None,
    secrets: SecretStore | None = None,
    sender: CallbackSender | None = None,
    limiter: RateLimiter | None = None,
    metrics: Metrics | None = None,
) -> Broker:
    """Wire a broker from ``settings``; any adapter given replaces the configured one."""
    metrics = metrics or Metrics()
    closers: list[Any] = []
    if store is None:
        store = build_store(settings)
        _close_with_broker(store, closers)
    if queue is None:
        queue = build_queue(settings, store)
        _close_with_broker(queue, closers)
    provider = provider or build_provider(settings, metrics)
    secrets = secrets or build_secrets(settings)
    if sender is None:
        if not settings.callback_secret:
            log.warning(
                "KIDP_CALLBACK_SECRET is unset: signing callbacks with the development "
                "key in the state directory",
                extra={"stateDir": str(settings.state_dir)},
            )
        sender = CallbackSender(
            secret=settings.effective_callback_secret(),
            allowlist=Allowlist.parse(settings.callback_allowlist),
            timeout_seconds=settings.callback_timeout_seconds,
        )
        closers.append(sender.close)
    service = BrokerService(
        settings=settings,
        provider=provider,
        store=store,
        queue=queue,
        secrets=secrets,
        sender=sender,
        metrics=metrics,
    )
    scanner = Scanner(service)
    if limiter is None:
        limiter = build_limiter(settings)
        _close_with_broker(limiter, closers)
    return Broker(
        settings=settings,
        service=service,
        scanner=scanner,
        limiter=limiter,
        closers=closers,
    )
