"""Shared fixtures: services on this machine, and the rule that CI never skips them.

A test that needs PostgreSQL (or another local service) asks for its fixture.
On a laptop without the service the test is skipped with the reason; with
``CI=true`` a missing service fails the test instead, so CI cannot go green by
skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
POSTGRES_HOST = os.environ.get("KIDP_TEST_POSTGRES_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("KIDP_TEST_POSTGRES_PORT", "5432"))


def missing(reason: str) -> None:
    """Skip the test on a laptop; fail it under ``CI=true``, which needs everything."""
    if IN_CI:
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


def require_service(name: str, host: str, port: int) -> None:
    """Skip (laptop) or fail (CI) when nothing listens on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        missing(f"{name} is not reachable on {host}:{port} ({exc})")


def require_program(name: str, *elsewhere: str) -> str:
    """The path of the program ``name`` (on PATH, else the first of ``elsewhere``
    that exists); skips (laptop) or fails (CI) when there is none."""
    found = shutil.which(name) or next((p for p in elsewhere if Path(p).exists()), None)
    if found is None:
        missing(f"{name} is not installed")
    assert found is not None  # missing() raised
    return found


class PrivateServer:
    """A server process of one test's own on a loopback port, so the test can
    kill it with -9 and start it again (same port, same files) without touching
    the shared one. A context manager: started on entry, killed on exit."""

    def __init__(self, command: list[str], *, port: int, url: str) -> None:
        self.command = command
        self.port = port
        self.url = url
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{Path(self.command[0]).name} did not start")

    def kill(self) -> None:
        """kill -9: no shutdown, no flush."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.kill()


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


@pytest.fixture(autouse=True)
def fresh_azure_credential() -> Iterator[None]:
    """Each test gets a new process-wide Azure credential: it reads the managed
    identity endpoint once, and each Key Vault stand-in serves its own."""
    import sys

    yield
    dataplane = sys.modules.get("kidp.providers.azure.dataplane")
    if dataplane is not None:
        dataplane.default_credential.forget()


@pytest.fixture(scope="session")
def pubsub_emulator_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Google Cloud CLI's Pub/Sub emulator, started once for the session;
    tests keep apart by using a project id of their own (:func:`gcp_project`)."""
    from kidp.pubsub_emulator import find_launcher, start_pubsub_emulator

    if find_launcher() is None:
        missing("the Pub/Sub emulator (Cloud CLI component pubsub-emulator) is not installed")
    emulator = start_pubsub_emulator(log_file=tmp_path_factory.mktemp("pubsub") / "emulator.log")
    try:
        yield emulator.host
    finally:
        emulator.stop()


@pytest.fixture
def pubsub(pubsub_emulator_host: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point ``google-cloud-pubsub`` at the emulator for one test; its host."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator_host)
    return pubsub_emulator_host


@pytest.fixture
def gcp_project() -> str:
    """A project id of this test's own (the emulators keep projects apart)."""
    return f"kidp-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Azurite (Azure Storage: blob, queue, table), started once for the
    session; tests keep apart by using tables and queues of their own
    (:func:`azure_name`). Installed by ``npm ci`` (``package.json``)."""
    from kidp.azurite import find_azurite, start_azurite

    if find_azurite() is None:
        missing("Azurite is not installed (run 'npm ci'; it needs Node)")
    emulator = start_azurite(log_file=tmp_path_factory.mktemp("azurite") / "azurite.log")
    try:
        yield emulator
    finally:
        emulator.stop()


def azure_name(prefix: str = "kidp") -> str:
    """A table or queue name of this test's own: lowercase letters and digits."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


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


class SqsClock:
    """Moves moto's SQS clock (delays, visibility timeouts) forward by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import moto.core.utils as utils
        import moto.sqs.models as models

        self.offset = 0.0
        real = utils.unix_time

        def unix_time(dt: Any = None) -> float:
            return real(dt) + (self.offset if dt is None else 0.0)

        monkeypatch.setattr(models, "unix_time", unix_time)
        monkeypatch.setattr(models, "unix_time_millis", lambda dt=None: unix_time(dt) * 1000.0)
        self._real = real

    def now(self) -> float:
        """Epoch seconds as moto's SQS sees them."""
        return self._real() + self.offset

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass inside SQS (and only there)."""
        self.offset += seconds


@dataclass
class LambdaContext:
    """The attributes of Lambda's context object that Powertools reads."""

    function_name: str = "kidp-broker-test"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:kidp-broker-test"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@pytest.fixture
def sqs_clock(monkeypatch: pytest.MonkeyPatch) -> SqsClock:
    """moto's SQS on a clock the test moves by hand."""
    return SqsClock(monkeypatch)


def create_queue_with_dlq(
    sqs: Any, name: str, *, max_receive_count: int, **attributes: str
) -> tuple[str, str]:
    """Create the SQS queue ``name`` whose redrive policy names the dead-letter
    queue ``<name>-dlq``, as ``serverless.yml`` does; (queue URL, DLQ URL)."""
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    policy = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
    url = sqs.create_queue(
        QueueName=name, Attributes={**attributes, "RedrivePolicy": json.dumps(policy)}
    )["QueueUrl"]
    return str(url), str(dlq_url)


def bearer_token(
    secret: str,
    *,
    subject: str = "tester",
    namespaces: Iterable[str] = ("*",),
    scopes: Iterable[str] = ("deploy", "read", "delete"),
) -> str:
    """A token the broker accepts with its default issuer and audience, valid
    for an hour: every scope and every namespace unless narrowed."""
    from kidp.auth import mint_token

    return mint_token(
        secret=secret,
        subject=subject,
        scopes=scopes,
        namespaces=namespaces,
        ttl_seconds=3600,
        issuer="kidp",
        audience="kidp-broker",
    )


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
    from kidp.receiver import CallbackReceiver

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
                "sync_delay_seconds": 0,
            }
            values.update(overrides)
            harness = BrokerHarness(build(Settings(**values), **(adapters or {})), receiver)
            built.append(harness)
            return harness

        yield factory
        for harness in built:
            harness.broker.close()
