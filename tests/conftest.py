"""Shared fixtures: services on this machine, and the rule that CI never skips them.

A test that needs PostgreSQL (or another local service) asks for its fixture.
On a laptop without the service the test is skipped with the reason; with
``CI=true`` a missing service fails the test instead, so CI cannot go green by
skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
POSTGRES_HOST = os.environ.get("KIDP_TEST_POSTGRES_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("KIDP_TEST_POSTGRES_PORT", "5432"))


def require_service(name: str, host: str, port: int) -> None:
    """Skip (laptop) or fail (CI) when nothing listens on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        reason = f"{name} is not reachable on {host}:{port} ({exc})"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    require_service("PostgreSQL", POSTGRES_HOST, POSTGRES_PORT)
    import psycopg

    admin = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"
    name = f"kidp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def nats_url() -> str:
    """The NATS JetStream server on this machine (tests use their own streams)."""
    host, port = os.environ.get("KIDP_TEST_NATS", "127.0.0.1:4222").split(":")
    require_service("NATS JetStream", host, int(port))
    return f"nats://{host}:{port}"


@pytest.fixture
def redis_url() -> str:
    """The Redis server on this machine (tests use their own key prefixes)."""
    host, port = os.environ.get("KIDP_TEST_REDIS", "127.0.0.1:6379").split(":")
    require_service("Redis", host, int(port))
    return f"redis://{host}:{port}/0"


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials so no test can reach a real AWS account."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def aws(aws_credentials: None) -> Iterator[None]:
    """Every AWS call of the test goes to moto, in process."""
    from moto import mock_aws

    with mock_aws():
        yield


@pytest.fixture
def session(aws: None) -> Any:
    """A boto3 session in us-east-1, on moto."""
    import boto3

    return boto3.session.Session(region_name="us-east-1")


@pytest.fixture
def stray_rds_instance(aws_credentials: None) -> Callable[..., None]:
    """Create an RDS instance behind the broker's back (for orphan scans): with
    the managed-by tag and ``deployment_id`` when given, untagged otherwise."""
    import boto3

    def create(name: str, deployment_id: str | None = None) -> None:
        tags = []
        if deployment_id is not None:
            tags = [
                {"Key": "platform.company.com/managed-by", "Value": "kidp"},
                {"Key": "platform.company.com/deployment-id", "Value": deployment_id},
            ]
        boto3.client("rds", region_name="us-east-1").create_db_instance(
            DBInstanceIdentifier=name,
            DBInstanceClass="db.t3.micro",
            Engine="postgres",
            MasterUsername="u",
            MasterUserPassword="p" * 12,
            AllocatedStorage=20,
            Tags=tags,
        )

    return create


# --------------------------------------------------------------------------
# A whole broker in the test process: SQLite store and queue in tmp_path, the
# AWS provider through boto3 against moto in process, callbacks to a local
# receiver that verifies every signature. Jobs run when the test says so.


class BrokerHarness:
    """A wired broker plus the verbs tests use to drive it."""

    def __init__(self, broker: Any, receiver: Any) -> None:
        from kidp.runtime import Worker

        self.broker = broker
        self.service = broker.service
        self.store = broker.service.store
        self.receiver = receiver
        self.worker = Worker(broker)
        self.admin = self.caller(namespaces=["*"])

    @staticmethod
    def caller(
        *,
        scopes: tuple[str, ...] = ("deploy", "read", "delete"),
        namespaces: list[str] | None = None,
        subject: str = "tester",
    ) -> Any:
        from kidp.auth import Caller

        return Caller(
            subject=subject,
            scopes=frozenset(scopes),
            namespaces=frozenset(namespaces or ["team-platform"]),
        )

    def request(self, **changes: Any) -> Any:
        """A valid provision request (seed 001's example), with ``changes``."""
        from kidp.models import ProvisionRequest

        body: dict[str, Any] = {
            "resourceType": "database",
            "resourceName": "postgres-app-db",
            "namespace": "team-platform",
            "team": "platform-team",
            "owner": "user@example.com",
            "callbackUrl": self.receiver.url,
            "spec": {"engine": "postgresql", "version": "15", "size": "medium"},
        }
        body.update(changes)
        return ProvisionRequest.model_validate(body)

    def submit(self, caller: Any = None, **changes: Any) -> Any:
        return self.service.submit_provision(caller or self.admin, self.request(**changes))

    def deprovision(self, deployment_id: str | None = None, *, by_name: str | None = None) -> Any:
        """Deprovision in team-platform by deploymentId, or by database name."""
        from kidp.models import DeprovisionRequest

        if by_name is not None:
            request = DeprovisionRequest(
                namespace="team-platform", resource_type="database", resource_name=by_name
            )
        else:
            request = DeprovisionRequest(deployment_id=deployment_id, namespace="team-platform")
        return self.service.submit_deprovision(self.admin, request)

    def drain(self, *, rounds: int = 200) -> int:
        """Work jobs until none is due; returns how many ran."""
        total = 0
        for _ in range(rounds):
            worked = self.worker.run_once()
            if not worked:
                return total
            total += worked
        raise AssertionError("jobs kept coming: a loop that never settles")

    def phases(self) -> list[str]:
        """The phases of every callback received, in order."""
        return [payload["phase"] for _, payload in self.receiver.log]


@pytest.fixture
def receiver() -> Iterator[Any]:
    from kidp.callbacks import generate_secret
    from kidp.demo import CallbackReceiver

    rec = CallbackReceiver(generate_secret())
    yield rec
    rec.close()


@pytest.fixture
def make_broker(
    tmp_path: Any, aws_credentials: None, receiver: Any
) -> Iterator[Callable[..., BrokerHarness]]:
    """Build brokers on moto (in process): settings overrides as keyword arguments,
    replacement adapters (``provider=``, ``store=``, ``queue=``) in ``adapters``."""
    from moto import mock_aws

    from kidp.bootstrap import build
    from kidp.settings import Settings

    built: list[BrokerHarness] = []
    with mock_aws():

        def factory(adapters: dict[str, Any] | None = None, **overrides: Any) -> BrokerHarness:
            values: dict[str, Any] = {
                "cloud": "aws",
                "region": "us-east-1",
                "store_url": f"sqlite:///{tmp_path}/broker-{len(built)}.db",
                "state_dir": tmp_path / "state",
                "jwt_secret": "s" * 40,
                "callback_secret": receiver.secret,
                "callback_allowlist": ["127.0.0.1"],
                "callback_retry_delays": [0, 0, 0, 0, 0],
                "callback_timeout_seconds": 5,
                "poll_interval_seconds": 0,
                "progress_interval_seconds": 0,
                "namespace_wait_seconds": 0,
            }
            values.update(overrides)
            harness = BrokerHarness(build(Settings(**values), **(adapters or {})), receiver)
            built.append(harness)
            return harness

        yield factory
        for harness in built:
            harness.broker.close()
