"""The Cloud Functions in ``gcp/main.py``, served by functions-framework.

Each function is the app ``functions_framework.create_app(target, "gcp/main.py")``
builds, as Cloud Functions builds it: ``api`` in the framework's ASGI mode,
served over real HTTP by uvicorn on loopback; ``jobs``, ``scan`` and ``dlq``
through the framework's test client with the payloads of ``tests/events/gcp_*``.
Behind them everything is real or the most faithful stand-in: the Cloud CLI's
Pub/Sub emulator (topic, a subscription with a dead-letter policy, the
dead-letter topic), the Cloud Tasks stand-in (delayed jobs and retries), the
Secret Manager stand-in (credentials), a SQLite store, and a callback receiver
that checks every signature.

The test plays Eventarc as documented: it pulls each message from the jobs
subscription, posts it to ``jobs`` as a CloudEvent carrying Pub/Sub's
``deliveryAttempt``, acknowledges it when the function answers 2xx and
negatively acknowledges it otherwise, so Pub/Sub delivers it again.

The cloud is GCP too: the GCP provider through Google's clients on the admin
API stand-in (:mod:`kidp.gcp_emulator`), in the fixture :func:`cloud`.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import bearer_token
from tests.pubsub_support import TASKS_SERVICE_ACCOUNT, Topology, create_topology

from kidp.cloudtasks_emulator import CloudTasksEmulator, start_cloudtasks_emulator
from kidp.emulator import free_port
from kidp.errors import CloudUnavailable
from kidp.models import Job, JobKind
from kidp.secretmanager_emulator import SecretManagerEmulator, start_secretmanager_emulator

pytestmark = pytest.mark.pubsub

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "gcp" / "main.py"
EVENTS = ROOT / "tests" / "events"
#: Where the broker and its resources live.
REGION = "us-central1"
JWT_SECRET = "j" * 48
MAX_DELIVERIES = 5
TARGETS = ("api", "jobs", "scan", "dlq")


def fixture(name: str) -> dict[str, Any]:
    event = dict(json.loads((EVENTS / name).read_text()))
    event.pop("_comment", None)
    return event


# ------------------------------------------------------------- the cloud


class Killed(BaseException):
    """What a function timeout or out-of-memory is to the job: no exception
    the function can catch, no answer, the message simply comes back."""


class FaultyProvider:
    """The provider under test, with faults a test can switch on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        #: Raised by the next ``deploy`` calls while set.
        self.on_deploy: BaseException | None = None
        #: How many ``deploy`` calls raise it (None: all).
        self.times: int | None = None
        #: Raised once right after the cloud accepted a ``deploy``: the
        #: resource exists, and the function dies before it records it.
        self.after_deploy: BaseException | None = None

    def deploy(self, *args: Any, **kwargs: Any) -> Any:
        if self.on_deploy is not None and (self.times is None or self.times > 0):
            if self.times is not None:
                self.times -= 1
            raise self.on_deploy
        resource = self.inner.deploy(*args, **kwargs)
        if self.after_deploy is not None:
            crash, self.after_deploy = self.after_deploy, None
            raise crash
        return resource

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Cloud:
    """The provider the functions drive, the settings it needs, and how a test
    sees what it made (the names of the resources that exist)."""

    provider: FaultyProvider
    environ: dict[str, str]
    resources: Callable[[], list[str]]


@pytest.fixture
def cloud(gcp_project: str) -> Iterator[Cloud]:
    """The GCP provider through Google's clients on the admin API stand-in (a
    Cloud SQL instance per database), in the same project as the queue."""
    from google.auth.credentials import AnonymousCredentials

    from kidp.gcp_emulator import start_gcp_emulator
    from kidp.models import ResourceType
    from kidp.providers.gcp import GcpProvider

    admin = start_gcp_emulator()
    provider = GcpProvider(
        region=REGION,
        project=gcp_project,
        credentials=AnonymousCredentials(),
        api_endpoint=admin.url,
        topics=False,
        retry_seconds=0,
    )

    def databases() -> list[str]:
        return sorted(
            r.name for r in provider.list_managed() if r.resource_type is ResourceType.DATABASE
        )

    yield Cloud(
        provider=FaultyProvider(provider),
        environ={"KIDP_PROVIDER": "gcp", "KIDP_REGION": REGION},
        resources=databases,
    )
    admin.stop()


# ------------------------------------------------------------ the functions


@pytest.fixture(scope="module")
def apps() -> Iterator[dict[str, Any]]:
    """The four functions as functions-framework builds them from gcp/main.py."""
    import functions_framework

    from kidp.edges import gcp as edge

    saved = {k: os.environ.get(k) for k in ("FUNCTION_TARGET", "FUNCTION_SIGNATURE_TYPE")}
    try:
        built = {target: functions_framework.create_app(target, str(MAIN)) for target in TARGETS}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield built
    edge.reset()


@pytest.fixture(scope="module")
def api_url(apps: dict[str, Any]) -> Iterator[str]:
    """The ``api`` function served over HTTP by uvicorn, as functions-framework
    serves an ASGI function."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            apps["api"], host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def secretmanager() -> Iterator[SecretManagerEmulator]:
    server = start_secretmanager_emulator()
    yield server
    server.stop()


@pytest.fixture
def tasks(pubsub: str) -> Iterator[CloudTasksEmulator]:
    """A Cloud Tasks stand-in of this test's own: its clock is moved by hand."""
    emulator = start_cloudtasks_emulator(
        routes={"pubsub.googleapis.com": f"http://{pubsub}"}, retry_seconds=0.2
    )
    yield emulator
    emulator.stop()


@dataclass
class Functions:
    """The deployed functions plus what plays Eventarc, Cloud Scheduler and the operator."""

    apps: dict[str, Any]
    api_url: str
    topology: Topology
    tasks: CloudTasksEmulator
    secretmanager: SecretManagerEmulator
    receiver: Any
    cloud: Cloud
    token: str
    #: Statuses the jobs function answered, in order.
    answers: list[int] = field(default_factory=list)

    # --- HTTP -------------------------------------------------------------

    def http(self, method: str, path: str, **options: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", **options.pop("headers", {})}
        return httpx.request(method, self.api_url + path, headers=headers, timeout=30, **options)

    def provision(self, name: str = "orders-db") -> str:
        response = self.http(
            "POST",
            "/v1/provision",
            json={
                "resourceType": "database",
                "resourceName": name,
                "namespace": "team-platform",
                "team": "platform-team",
                "owner": "alice@example.com",
                "callbackUrl": self.receiver.url,
                "spec": {"engine": "postgresql", "version": "15", "size": "medium"},
            },
        )
        assert response.status_code == 202, response.text
        return str(response.json()["deploymentId"])

    def phase(self, deployment_id: str) -> str:
        response = self.http("GET", "/v1/status", params={"id": deployment_id})
        assert response.status_code == 200, response.text
        return str(response.json()["phase"])

    def phases(self) -> list[str]:
        return [payload["phase"] for _, payload in self.receiver.log]

    # --- Eventarc ---------------------------------------------------------

    def pull(self) -> list[Any]:
        from google.cloud import pubsub_v1

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            response = pubsub_v1.SubscriberClient().pull(
                subscription=self.topology.subscription, max_messages=10, return_immediately=True
            )
        return list(response.received_messages)

    def event(self, received: Any, mode: str = "binary") -> tuple[dict[str, str], bytes]:
        """The request Eventarc (or a raw push) makes for ``received``."""
        message = received.message
        published = message.publish_time.isoformat().replace("+00:00", "Z")
        envelope = {
            "message": {
                "attributes": dict(message.attributes),
                "data": base64.b64encode(message.data).decode(),
                "messageId": message.message_id,
                "message_id": message.message_id,
                "publishTime": published,
                "publish_time": published,
            },
            "subscription": self.topology.subscription,
            "deliveryAttempt": received.delivery_attempt,
        }
        if mode == "binary":
            headers = dict(fixture("gcp_pubsub_binary.json")["headers"])
            headers["ce-id"] = message.message_id
            headers["ce-source"] = f"//pubsub.googleapis.com/{self.topology.topic}"
            return headers, json.dumps(envelope).encode()
        if mode == "structured":
            event = fixture("gcp_pubsub_structured.json")
            event.update(id=message.message_id, data=envelope)
            return {"content-type": "application/cloudevents+json"}, json.dumps(event).encode()
        return {"content-type": "application/json"}, json.dumps(envelope).encode()

    def deliver(self, received: Any, *, mode: str = "binary", settle: bool = True) -> int:
        """Post ``received`` to the jobs function; acknowledge on 2xx, else
        nack it. A function that dies (``Killed``) answers nothing: nack."""
        from google.cloud import pubsub_v1

        headers, body = self.event(received, mode)
        try:
            status = (
                self.apps["jobs"].test_client().post("/", data=body, headers=headers).status_code
            )
        except Killed:
            status = 0
        self.answers.append(status)
        if settle:
            subscriber = pubsub_v1.SubscriberClient()
            if 200 <= status < 300:
                subscriber.acknowledge(
                    subscription=self.topology.subscription, ack_ids=[received.ack_id]
                )
            else:
                subscriber.modify_ack_deadline(
                    subscription=self.topology.subscription,
                    ack_ids=[received.ack_id],
                    ack_deadline_seconds=0,
                )
        return status

    def drain(self, *, rounds: int = 400) -> None:
        """Deliver until nothing is published or scheduled; when only Cloud
        Tasks holds jobs, let its clock run to the next one."""
        quiet_since: float | None = None
        for _ in range(rounds):
            received = self.pull()
            if received:
                quiet_since = None
                for message in received:
                    self.deliver(message)
                continue
            pending = self.tasks.pending()
            if pending:
                quiet_since = None
                soonest = min(_epoch(t["scheduleTime"]) for t in pending)
                self.tasks.advance(max(0.0, soonest - self.tasks.now()) + 0.01)
                time.sleep(0.05)
                continue
            if quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.4:
                return
            time.sleep(0.05)
        raise AssertionError("jobs kept coming: a loop that never settles")

    # --- operators and schedulers -----------------------------------------

    def dlq(self, body: Any = None, *, token: str | None = None, method: str = "POST") -> Any:
        client = self.apps["dlq"].test_client()
        headers = {"Authorization": f"Bearer {token or self.token}"}
        if method == "GET":
            return client.get("/", headers=headers)
        return client.post("/", json=body or {"action": "list"}, headers=headers)

    def scan(self, body: Any) -> Any:
        headers = fixture("gcp_scheduler_scan.json")["headers"]
        return self.apps["scan"].test_client().post("/", json=body, headers=headers)

    def dead_topic(self) -> list[Any]:
        """What the dead-letter subscription holds (read, not consumed)."""
        from kidp.edges import gcp as edge
        from kidp.queues.pubsub import PubSubJobQueue

        queue = edge.broker().service.queue
        assert isinstance(queue, PubSubJobQueue)
        return queue.dead_messages()


def _epoch(stamp: str) -> float:
    from kidp.gcp_standin import parse_timestamp

    return parse_timestamp(stamp).timestamp()


@pytest.fixture
def gcf(
    apps: dict[str, Any],
    api_url: str,
    pubsub: str,
    gcp_project: str,
    tasks: CloudTasksEmulator,
    secretmanager: SecretManagerEmulator,
    receiver: Any,
    cloud: Cloud,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Functions]:
    """The functions configured as ``infra/gcp`` configures them."""
    from kidp.bootstrap import build
    from kidp.edges import gcp as edge

    topology = create_topology(gcp_project, tasks, dead_letter_after=MAX_DELIVERIES)
    environment = {
        "KIDP_CLOUD": "gcp",
        "KIDP_GCP_PROJECT": gcp_project,
        "KIDP_STORE_URL": f"sqlite:///{tmp_path}/broker.db",
        "KIDP_QUEUE_URL": topology.queue_url,
        "KIDP_GCP_DEAD_LETTER_TOPIC": topology.dead_letter_topic,
        "KIDP_GCP_DEAD_LETTER_SUBSCRIPTION": topology.dead_letter_subscription,
        "KIDP_GCP_TASKS_QUEUE": topology.tasks_queue,
        "KIDP_GCP_TASKS_SERVICE_ACCOUNT": TASKS_SERVICE_ACCOUNT,
        "KIDP_GCP_TASKS_ENDPOINT": tasks.url,
        "KIDP_SECRET_STORE": "gcp",
        "KIDP_GCP_SECRETMANAGER_ENDPOINT": secretmanager.url,
        "KIDP_JWT_SECRET": JWT_SECRET,
        "KIDP_CALLBACK_SECRET": receiver.secret,
        "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
        "KIDP_CALLBACK_TIMEOUT_SECONDS": "5",
        "KIDP_CALLBACK_RETRY_DELAYS": "1,2,4,8,16",
        "KIDP_JOB_MAX_DELIVERIES": str(MAX_DELIVERIES),
        "KIDP_POLL_INTERVAL_SECONDS": "0",
        "KIDP_PROGRESS_INTERVAL_SECONDS": "0",
        "KIDP_NAMESPACE_WAIT_SECONDS": "0",
        **cloud.environ,
    }
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    edge.reset()
    edge.install(build(edge.settings_from_env(), provider=cloud.provider))  # type: ignore[arg-type]
    yield Functions(
        apps=apps,
        api_url=api_url,
        topology=topology,
        tasks=tasks,
        secretmanager=secretmanager,
        receiver=receiver,
        cloud=cloud,
        token=bearer_token(JWT_SECRET, namespaces=["team-platform"]),
    )
    edge.reset()


def admin(*scopes: str) -> str:
    return bearer_token(JWT_SECRET, namespaces=["*"], scopes=scopes or ("read", "deploy"))


# ----------------------------------------------------------------------- api


def test_the_api_is_served_over_http_with_the_trace_as_correlation_id(gcf: Functions) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = gcf.http("GET", "/health", headers={"X-Cloud-Trace-Context": f"{trace}/1;o=1"})
    assert response.status_code == 200
    assert response.json()["checks"]["queue"]["status"] == "ok"
    assert response.headers["x-correlation-id"] == trace
    own = gcf.http("GET", "/health", headers={"X-Correlation-ID": "mine"})
    assert own.headers["x-correlation-id"] == "mine"


def test_every_route_is_the_brokers_own(gcf: Functions) -> None:
    assert gcf.http("GET", "/openapi.json").json()["info"]["title"] == "KIDP Deployment Broker"
    refused = httpx.get(gcf.api_url + "/v1/catalog")
    assert refused.status_code == 401
    assert refused.json() == {
        "error": "unauthorized",
        "message": "missing bearer token",
        "code": 401,
    }
    assert gcf.http("GET", "/v1/catalog").status_code == 200


def test_the_api_without_its_secrets_answers_500_without_detail(
    gcf: Functions, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kidp.edges import gcp as edge

    edge.reset()
    monkeypatch.delenv("KIDP_CALLBACK_SECRET")
    response = httpx.get(gcf.api_url + "/health")
    assert response.status_code == 500
    assert response.json() == {
        "error": "internal_error",
        "message": "the broker is misconfigured; its logs say how",
        "code": 500,
    }


def test_a_provision_request_becomes_one_pubsub_message(gcf: Functions) -> None:
    deployment_id = gcf.provision()
    (received,) = gcf.pull()
    job = Job.from_json(received.message.data)
    assert (job.kind, job.deployment_id) == (JobKind.PROVISION, deployment_id)
    assert received.message.attributes["kidp-deployment-id"] == deployment_id
    assert received.delivery_attempt == 1
    assert gcf.phase(deployment_id) == "Pending"


# --------------------------------------------------------------------- flows


@pytest.mark.parametrize("mode", ["binary", "structured", "push"])
def test_end_to_end_from_http_to_ready_and_deleted(gcf: Functions, mode: str) -> None:
    deployment_id = gcf.provision()
    (received,) = gcf.pull()
    assert gcf.deliver(received, mode=mode) == 200
    assert gcf.phase(deployment_id) == "Provisioning"

    gcf.drain()

    assert gcf.phase(deployment_id) == "Ready"
    assert gcf.phases() == ["Provisioning", "Ready"]
    (resource,) = gcf.cloud.resources()
    ready = gcf.receiver.log[-1][1]
    ref = ready["additionalMetadata"]["secretRef"]
    assert ref["store"] == "gcp-secretmanager"
    assert ref["id"] in gcf.secretmanager.secrets
    credentials = json.loads(gcf.secretmanager.value(ref["id"]))
    assert credentials["password"]

    response = gcf.http(
        "DELETE", "/api/v1/resources/database/orders-db", params={"namespace": "team-platform"}
    )
    assert response.status_code == 202, response.text
    gcf.drain()

    assert gcf.phase(deployment_id) == "Deleted"
    assert gcf.cloud.resources() == []
    assert ref["id"] not in gcf.secretmanager.secrets
    assert gcf.phases() == ["Provisioning", "Ready", "Deleting", "Deleted"]
    assert resource not in gcf.cloud.resources()
    assert set(gcf.answers) == {200}


def test_the_same_message_delivered_three_times_makes_one_resource_and_one_ready(
    gcf: Functions,
) -> None:
    deployment_id = gcf.provision()
    (received,) = gcf.pull()
    for _ in range(2):  # Pub/Sub delivered it again before the first answer counted
        assert gcf.deliver(received, settle=False) == 200
    assert gcf.deliver(received) == 200

    gcf.drain()

    assert len(gcf.cloud.resources()) == 1
    assert gcf.phases() == ["Provisioning", "Ready"]
    assert gcf.phase(deployment_id) == "Ready"


def test_a_function_killed_after_the_cloud_created_the_resource_adopts_it_on_redelivery(
    gcf: Functions,
) -> None:
    gcf.cloud.provider.after_deploy = Killed()
    deployment_id = gcf.provision()
    (received,) = gcf.pull()
    assert gcf.deliver(received) == 0  # died mid-provision: nothing recorded, no answer
    assert len(gcf.cloud.resources()) == 1
    assert gcf.receiver.log == []

    gcf.drain()  # Pub/Sub delivers it again (attempt 2)

    assert gcf.answers[1] == 200
    assert len(gcf.cloud.resources()) == 1  # adopted by its tags, not made twice
    assert gcf.phase(deployment_id) == "Ready"
    assert gcf.phases() == ["Provisioning", "Ready"]


def test_a_poison_job_fails_its_deployment_lands_in_the_dead_letter_topic_and_redrives(
    gcf: Functions,
) -> None:
    gcf.cloud.provider.on_deploy = RuntimeError("a bug in the provider")
    deployment_id = gcf.provision()

    gcf.drain()

    # Run MAX_DELIVERIES - 1 times, each retry a Cloud Tasks copy after 1, 2, 4 s.
    retries = [delay for _, delay in gcf.tasks.created]
    assert [round(d) for d in retries] == [1, 2, 4]
    assert gcf.phase(deployment_id) == "Failed"
    assert gcf.phases() == ["Failed"]
    assert "job failed repeatedly: RuntimeError" in gcf.receiver.log[-1][1]["message"]
    assert gcf.cloud.resources() == []

    listed = gcf.dlq({"action": "list"}, token=admin("read")).get_json()
    (dead,) = listed["jobs"]
    assert (dead["deploymentId"], dead["kind"], dead["reason"]) == (
        deployment_id,
        "provision",
        "RuntimeError",
    )

    redriven = gcf.dlq({"action": "redrive", "ids": [dead["jobId"]]}, token=admin()).get_json()
    assert redriven["jobs"] == {"redriven": [dead["jobId"]]}
    assert gcf.dlq({"action": "list"}, token=admin()).get_json()["jobs"] == []
    gcf.drain()  # the job comes back and finds its deployment already Failed
    assert gcf.phase(deployment_id) == "Failed"
    assert gcf.phases() == ["Failed"]


def test_a_job_that_kills_the_function_every_time_still_fails_its_deployment(
    gcf: Functions,
) -> None:
    gcf.cloud.provider.on_deploy = Killed()
    deployment_id = gcf.provision()

    gcf.drain()

    # Pub/Sub counted the deliveries nobody answered; the last one is kept.
    assert gcf.answers[:MAX_DELIVERIES] == [0] * (MAX_DELIVERIES - 1) + [200]
    assert set(gcf.answers[MAX_DELIVERIES:]) == {200}  # the Failed callback
    assert gcf.phase(deployment_id) == "Failed"
    assert gcf.phases() == ["Failed"]
    assert "stopped during each of its deliveries" in gcf.receiver.log[-1][1]["message"]
    (dead,) = gcf.dead_topic()
    assert dead.job is not None and dead.job.deployment_id == deployment_id
    assert dead.attempts == MAX_DELIVERIES


def test_receiver_down_retries_through_cloud_tasks_then_dead_letters_and_replays(
    gcf: Functions,
) -> None:
    gcf.receiver.fail_with = 503
    deployment_id = gcf.provision()

    gcf.drain()

    assert gcf.phase(deployment_id) == "Ready"
    # Two callbacks (Provisioning, Ready), each retried after 1, 2, 4, 8, 16 s,
    # each retry a Cloud Tasks task due after its delay.
    delays = sorted(round(delay) for _, delay in gcf.tasks.created)
    assert delays == sorted([1, 2, 4, 8, 16] * 2)
    assert gcf.receiver.log == []

    listed = gcf.dlq(method="GET", token=admin("read")).get_json()
    assert {c["phase"] for c in listed["callbacks"]} == {"Provisioning", "Ready"}
    assert all(c["attempts"] == 6 for c in listed["callbacks"])
    assert listed["jobs"] == []  # the jobs themselves succeeded

    gcf.receiver.fail_with = None
    redriven = gcf.dlq({"action": "redrive"}, token=admin()).get_json()
    assert sorted(redriven["callbacks"]["resolved"]) == sorted(c["id"] for c in listed["callbacks"])
    assert sorted(gcf.phases()) == ["Provisioning", "Ready"]
    assert gcf.dlq(token=admin("read")).get_json()["callbacks"] == []


def test_a_throttled_cloud_is_retried_and_cloud_tasks_down_falls_back_to_redelivery(
    gcf: Functions,
) -> None:
    gcf.cloud.provider.on_deploy = CloudUnavailable("throttled", retry_after=5.0)
    gcf.cloud.provider.times = 2
    deployment_id = gcf.provision()
    gcf.tasks.faults.append(503)  # the first retry cannot be scheduled

    (received,) = gcf.pull()
    assert gcf.deliver(received) == 500  # Pub/Sub will deliver it again
    (again,) = gcf.pull()
    assert again.delivery_attempt == 2
    assert gcf.deliver(again) == 200  # throttled again: a copy due in 5 s
    assert [round(delay) for _, delay in gcf.tasks.created] == [5]

    gcf.drain()

    assert gcf.phase(deployment_id) == "Ready"
    assert len(gcf.cloud.resources()) == 1
    assert gcf.phases() == ["Provisioning", "Ready"]


def test_a_message_that_is_not_a_job_is_dead_lettered_at_once(gcf: Functions) -> None:
    from google.cloud import pubsub_v1

    pubsub_v1.PublisherClient().publish(gcf.topology.topic, b"{not a job").result()
    (received,) = gcf.pull()
    assert gcf.deliver(received) == 200
    (dead,) = gcf.dead_topic()
    assert (dead.job, dead.data) == (None, b"{not a job")
    assert "is not a broker job" in dead.reason


def test_logs_are_cloud_logging_json_with_the_deployment_and_no_secrets(
    gcf: Functions, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment_id = gcf.provision()
    gcf.drain()
    output = capsys.readouterr().out
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    ready = [r for r in records if r["message"] == "deployment ready"]
    assert ready and ready[0]["correlationId"] == deployment_id
    assert ready[0]["severity"] == "INFO"
    assert ready[0]["logging.googleapis.com/labels"] == {"correlation_id": deployment_id}

    ref = gcf.receiver.log[-1][1]["additionalMetadata"]["secretRef"]["id"]
    password = json.loads(gcf.secretmanager.value(ref))["password"]
    for secret in (password, JWT_SECRET, gcf.token, gcf.receiver.secret):
        assert secret not in output


# --------------------------------------------------------------------- scans


def test_the_scheduler_runs_a_scan(gcf: Functions) -> None:
    response = gcf.scan({"scan": "reconcile"})
    assert response.status_code == 200
    assert response.get_json() == {
        "scan": "reconcile",
        "result": {"jobs": 0, "callbacks": 0, "deadLetters": 0, "purged": 0},
    }
    orphans = gcf.scan({"scan": "orphans"}).get_json()
    assert orphans["scan"] == "orphans" and orphans["result"]["orphans"] == []


def test_a_scheduler_job_without_a_scan_says_what_to_configure(gcf: Functions) -> None:
    response = gcf.scan({"scan": "everything"})
    assert response.status_code == 400
    assert '"scan"' in response.get_json()["message"]


# ----------------------------------------------------------------- dead letters


def test_dead_letters_need_a_token_for_every_namespace_with_the_scope(gcf: Functions) -> None:
    missing = gcf.apps["dlq"].test_client().post("/", json={"action": "list"})
    assert missing.status_code == 401
    assert gcf.dlq(token=gcf.token).status_code == 403  # team-platform only
    assert gcf.dlq(token=admin("read")).status_code == 200
    redrive = gcf.dlq({"action": "redrive"}, token=admin("read"))
    assert redrive.status_code == 403
    assert "deploy" in redrive.get_json()["message"]
    assert gcf.dlq({"action": "purge"}, token=admin()).status_code == 400


def test_the_functions_are_declared_for_their_triggers(apps: dict[str, Any]) -> None:
    from functions_framework import _function_registry as registry

    assert registry.REGISTRY_MAP["api"] == "http"
    assert "api" in registry.ASGI_FUNCTIONS
    assert registry.REGISTRY_MAP["jobs"] == "cloudevent"
    assert registry.REGISTRY_MAP["scan"] == registry.REGISTRY_MAP["dlq"] == "http"
    assert not {"jobs", "scan", "dlq"} & registry.ASGI_FUNCTIONS
