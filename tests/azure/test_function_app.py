"""The functions in ``azure/function_app.py``, end to end, invoked in process
the way the Python worker invokes them: real ``func.HttpRequest``,
``func.QueueMessage`` and timer requests (built from the payloads in
``tests/events`` by the SDK's own converters), through ``get_functions()``.

Everything Azure is real SDKs against stand-ins: the store is a Table Storage
table and the jobs queue a Storage Queue (with its ``-poison`` queue) on
Azurite; credentials go to the Key Vault stand-in, reached with
``DefaultAzureCredential`` through a managed identity endpoint. The broker is
built by the edge from ``KIDP_*`` settings exactly as in a function app.

The test plays the Functions host: it receives messages from the queue,
invokes ``jobs`` with each, deletes a message whose function returned, makes
one whose function raised visible again, and moves it to the poison queue
when its dequeue count reached ``maxDequeueCount``.

The cloud is Azure too: the Azure provider through the real ``azure-mgmt-*``
clients against the ARM stand-in (:mod:`kidp.arm_emulator`), in the fixture
:func:`cloud`, with a switch that breaks its create call.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from azure.storage.queue import QueueClient, QueueMessage
from tests.azuretools import Context, http_request, load_function_app, queue_message, timer_request
from tests.conftest import azure_name, bearer_token

from kidp.arm_emulator import ArmEmulatorCredential, seed_platform, start_arm_emulator
from kidp.edges import azure as edge
from kidp.keyvault_emulator import KeyVaultEmulator, start_keyvault
from kidp.models import Job, JobKind
from kidp.ports import CloudProvider
from kidp.queues.azurequeue import AzureStorageJobQueue
from kidp.secrets.keyvault import KeyVaultSecretStore
from kidp.stores.azuretable import TableDeploymentStore
from kidp.work import OVER_DELIVERED

pytestmark = pytest.mark.azurite

JWT_SECRET = "j" * 48
#: The resource group the broker provisions into.
GROUP = "kidp"
#: maxDequeueCount in these tests: a job runs at most twice.
MAX_DELIVERIES = 3
SECRET_NAME = "kidp--team-platform--orders-db-credentials"


class Killed(BaseException):
    """What a function timeout or an out-of-memory is to the job: nothing the
    function can catch; the host sees the invocation fail."""


@dataclass
class CloudUnderTest:
    """The provider the broker runs, the settings that go with it, and a switch
    that breaks its create call (``None``: works; an exception class: raised)."""

    provider: CloudProvider
    settings: dict[str, str]
    break_creates: Callable[[type[BaseException] | None], None]


class BreakableProvider:
    """The provider under test, with a switch that makes its deploy raise (an
    exception class: raised as the create call starts; ``None``: works)."""

    def __init__(self, inner: CloudProvider) -> None:
        self.inner = inner
        self.breaks_with: type[BaseException] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def deploy(self, deployment: Any, tags: Any, credentials: Any) -> Any:
        if self.breaks_with is not None:
            raise self.breaks_with("injected")
        return self.inner.deploy(deployment, tags, credentials)


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[CloudUnderTest]:
    """The Azure provider on the ARM stand-in (a PostgreSQL flexible server per
    database), through the real azure-mgmt clients."""
    from kidp.providers.azure import AzureProvider

    arm = start_arm_emulator(directory=tmp_path / "arm", resource_groups=(GROUP,))
    seed_platform(arm, GROUP)
    provider = BreakableProvider(
        AzureProvider(
            subscription_id=arm.subscription_id,
            resource_group=GROUP,
            region=arm.location,
            credential=ArmEmulatorCredential(),
            base_url=arm.url,
            connection_verify=str(arm.ca_file),
            retry_backoff=0,
        )
    )

    def break_creates(error: type[BaseException] | None) -> None:
        provider.breaks_with = error

    yield CloudUnderTest(
        provider=provider,  # type: ignore[arg-type]
        settings={"KIDP_CLOUD": "azure", "KIDP_REGION": arm.location},
        break_creates=break_creates,
    )
    arm.stop()


@pytest.fixture(scope="module")
def function_app() -> Iterator[ModuleType]:
    module = load_function_app()
    yield module
    module.app.startup_task_done = False  # no lifespan shutdown on a closed loop


@pytest.fixture(scope="module")
def functions(function_app: ModuleType) -> dict[str, Any]:
    return {f.get_function_name(): f for f in function_app.app.get_functions()}


@pytest.fixture(scope="module")
def keyvault() -> Iterator[KeyVaultEmulator]:
    emulator = start_keyvault()
    yield emulator
    emulator.stop()


@dataclass
class Host:
    """The function app and what plays the Functions host around it."""

    functions: dict[str, Any]
    raw: QueueClient
    poison: QueueClient
    receiver: Any
    token: str
    keyvault: KeyVaultEmulator
    cloud: CloudUnderTest
    invocations: list[float] = field(default_factory=list)

    def call(self, name: str, *args: Any) -> Any:
        import asyncio

        result = self.functions[name].get_user_function()(*args)
        return asyncio.run(result) if asyncio.iscoroutine(result) else result

    # --- HTTP ---------------------------------------------------------------

    def http(
        self, method: str, path: str, *, body: Any = None, query: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        headers = {"authorization": f"Bearer {self.token}"}
        response = self.call(
            "http_app_func",
            http_request(method, path, body=body, query=query, headers=headers),
            Context("http_app_func"),
        )
        raw = response.get_body()
        return response.status_code, json.loads(raw) if raw else None

    def provision(self, name: str = "orders-db") -> str:
        status, body = self.http(
            "POST",
            "/v1/provision",
            body={
                "resourceType": "database",
                "resourceName": name,
                "namespace": "team-platform",
                "team": "platform-team",
                "owner": "alice@example.com",
                "callbackUrl": self.receiver.url,
                "spec": {"engine": "postgresql", "version": "15", "size": "medium"},
            },
        )
        assert status == 202, body
        return str(body["deploymentId"])

    def phase(self, deployment_id: str) -> str:
        status, body = self.http("GET", "/v1/status", query={"id": deployment_id})
        assert status == 200, body
        return str(body["phase"])

    def dlq(self, body: Any = None) -> Any:
        request = (
            http_request("GET", "/dlq") if body is None else http_request("POST", "/dlq", body=body)
        )
        response = self.call("dlq", request, Context("dlq"))
        assert response.status_code == 200, response.get_body()
        return json.loads(response.get_body())

    # --- the queue trigger --------------------------------------------------

    def receive(self, *, visibility: int = 30) -> list[QueueMessage]:
        return list(
            self.raw.receive_messages(
                max_messages=16, messages_per_page=16, visibility_timeout=visibility
            )
        )

    @staticmethod
    def trigger(message: QueueMessage) -> Any:
        """The ``func.QueueMessage`` the host hands the function (body decoded)."""
        return queue_message(
            base64.b64decode(message.content).decode(),
            message_id=message.id,
            dequeue_count=message.dequeue_count,
            pop_receipt=message.pop_receipt,
        )

    def deliver(self, message: QueueMessage) -> bool:
        """Invoke ``jobs``; settle the message as the host does. True on success."""
        started = time.monotonic()
        try:
            self.call("jobs", self.trigger(message))
        except (Exception, Killed):
            if (message.dequeue_count or 0) >= MAX_DELIVERIES:
                self.poison.send_message(message.content)
                self.raw.delete_message(message.id, message.pop_receipt)
            else:  # host.json's visibilityTimeout; no waiting here
                self.raw.update_message(message.id, message.pop_receipt, visibility_timeout=0)
            return False
        finally:
            self.invocations.append(time.monotonic() - started)
        self.raw.delete_message(message.id, message.pop_receipt)
        return True

    def drain(self, *, timeout: float = 30.0) -> None:
        """Deliver until the queue is empty, waiting for delayed messages."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.receive()
            for message in messages:
                self.deliver(message)
            if not messages:
                if not self.raw.get_queue_properties().approximate_message_count:
                    return
                time.sleep(0.2)
        raise AssertionError("the jobs queue never emptied")

    def poisoned(self) -> list[tuple[Job | None, dict[str, Any]]]:
        found = []
        for message in self.poison.peek_messages(max_messages=32):
            data = json.loads(base64.b64decode(message.content))
            found.append((Job.model_validate(data), data.get("kidp", {})))
        return found

    def phases(self) -> list[str]:
        return [payload["phase"] for _, payload in self.receiver.log]

    def resources(self) -> list[Any]:
        return list(self.cloud.provider.list_managed())


@pytest.fixture
def host(
    azurite: Any,
    keyvault: KeyVaultEmulator,
    cloud: CloudUnderTest,
    receiver: Any,
    functions: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Host]:
    """The function app configured as the Bicep configures it, on the stand-ins."""
    from kidp.bootstrap import build

    environment = {
        **cloud.settings,
        "KIDP_STORE_URL": f"azuretable://devstoreaccount1/{azure_name('t')}",
        "KIDP_QUEUE_URL": f"azurequeue://devstoreaccount1/{edge.JOBS_QUEUE}",
        "KIDP_AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string,
        "KIDP_SECRET_STORE": "keyvault",
        "KIDP_AZURE_KEY_VAULT_URL": keyvault.vault_url,
        "KIDP_JWT_SECRET": JWT_SECRET,
        "KIDP_CALLBACK_SECRET": receiver.secret,
        "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
        "KIDP_CALLBACK_TIMEOUT_SECONDS": "5",
        "KIDP_CALLBACK_RETRY_DELAYS": "0,0,0,0,0",
        "KIDP_POLL_INTERVAL_SECONDS": "0",
        "KIDP_PROGRESS_INTERVAL_SECONDS": "0",
        "KIDP_NAMESPACE_WAIT_SECONDS": "0",
        "KIDP_JOB_MAX_DELIVERIES": str(MAX_DELIVERIES),
        **keyvault.environ(),
    }
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    edge.reset()
    broker = build(edge.settings_from_env(), provider=cloud.provider)
    edge.install(broker)
    store, queue = broker.service.store, broker.service.queue
    assert isinstance(store, TableDeploymentStore)
    assert isinstance(queue, AzureStorageJobQueue)
    assert isinstance(broker.service.secrets, KeyVaultSecretStore)
    store.create_table()
    queue.create_queues()
    raw = QueueClient.from_connection_string(azurite.connection_string, edge.JOBS_QUEUE)
    poison = QueueClient.from_connection_string(azurite.connection_string, queue.poison_name)
    # One jobs queue (the trigger's name is fixed); each test starts it empty.
    raw.clear_messages()
    poison.clear_messages()
    yield Host(
        functions=functions,
        raw=raw,
        poison=poison,
        receiver=receiver,
        token=bearer_token(JWT_SECRET, namespaces=["team-platform"]),
        keyvault=keyvault,
        cloud=cloud,
    )
    edge.reset()


# ------------------------------------------------------------------ flows


def test_provision_to_ready_and_deprovision_to_deleted(host: Host) -> None:
    deployment_id = host.provision()
    [message] = host.raw.peek_messages()
    assert Job.from_json(base64.b64decode(message.content)).deployment_id == deployment_id
    assert host.phase(deployment_id) == "Pending"

    host.drain()

    assert host.phase(deployment_id) == "Ready"
    assert host.phases() == ["Provisioning", "Ready"]
    ready = host.receiver.log[-1][1]
    secret = ready["additionalMetadata"]["secretRef"]
    assert (secret["store"], secret["name"]) == ("azure-keyvault", SECRET_NAME)
    [version] = host.keyvault.versions(SECRET_NAME)
    assert secret["version"] == version["version"]
    assert json.loads(version["value"])["username"]
    assert len(host.resources()) == 1

    status, body = host.http(
        "POST",
        "/v1/deprovision",
        body={"deploymentId": deployment_id, "namespace": "team-platform"},
    )
    assert status == 202, body
    host.drain()

    assert host.phase(deployment_id) == "Deleted"
    assert host.phases() == ["Provisioning", "Ready", "Deleting", "Deleted"]
    assert host.keyvault.deleted(SECRET_NAME)  # soft-deleted: the vault has purge protection
    status, document = host.http("GET", "/openapi.json")
    assert status == 200 and "/v1/provision" in document["paths"]


def test_the_same_message_three_times_makes_one_resource_and_one_ready(host: Host) -> None:
    deployment_id = host.provision()
    [message] = host.receive()
    trigger = host.trigger(message)
    for _ in range(3):  # the host handed the same message out three times
        host.call("jobs", trigger)
    host.raw.delete_message(message.id, message.pop_receipt)

    host.drain()

    assert host.phase(deployment_id) == "Ready"
    assert host.phases() == ["Provisioning", "Ready"]
    assert len(host.resources()) == 1
    # One secret value in use (the module's vault may keep an earlier test's
    # deployment of this name as a disabled version).
    enabled = [v["enabled"] for v in host.keyvault.versions(SECRET_NAME)]
    assert enabled.count(True) == 1


def test_a_failing_job_is_requeued_with_its_delay_never_slept(host: Host) -> None:
    host.cloud.break_creates(RuntimeError)
    deployment_id = host.provision()
    [message] = host.receive()
    assert host.deliver(message)  # the function returned: the host deletes the original
    assert host.invocations[-1] < 0.9  # the 1 s backoff was not slept
    assert host.raw.peek_messages() == []  # the copy is invisible for its delay
    host.cloud.break_creates(None)
    deadline = time.monotonic() + 5
    while not (due := host.receive()) and time.monotonic() < deadline:
        time.sleep(0.1)
    [copy] = due
    body = json.loads(base64.b64decode(copy.content))
    assert body["kidp"] == {"runs": 1}  # its next delivery is the job's second
    assert host.deliver(copy)
    host.drain()
    assert host.phase(deployment_id) == "Ready"


def test_a_job_that_fails_every_time_fails_its_deployment_and_is_poisoned(host: Host) -> None:
    host.cloud.break_creates(RuntimeError)
    deployment_id = host.provision()
    host.drain()

    assert host.phase(deployment_id) == "Failed"
    assert host.phases() == ["Failed"]
    assert "job failed repeatedly: RuntimeError" in host.receiver.log[-1][1]["message"]
    assert host.resources() == []
    [(job, meta)] = host.poisoned()
    assert job is not None and job.deployment_id == deployment_id
    assert (meta["reason"], meta["attempts"]) == ("RuntimeError", MAX_DELIVERIES - 1)


def test_a_job_that_kills_the_function_every_time_still_fails_its_deployment(host: Host) -> None:
    host.cloud.break_creates(Killed)
    deployment_id = host.provision()
    outcomes = []
    for _ in range(MAX_DELIVERIES):
        [message] = host.receive()
        outcomes.append(host.deliver(message))

    # Killed on each of the first deliveries; the last one fails the deployment unrun.
    assert outcomes == [False] * (MAX_DELIVERIES - 1) + [True]
    host.drain()  # the Failed callback's own job
    assert host.phase(deployment_id) == "Failed"
    assert host.phases() == ["Failed"]
    assert "stopped during each of its deliveries" in host.receiver.log[-1][1]["message"]
    [(job, meta)] = host.poisoned()
    assert job is not None and job.kind is JobKind.PROVISION
    assert meta["reason"] == OVER_DELIVERED
    assert not host.raw.get_queue_properties().approximate_message_count

    [listed] = host.dlq()["jobs"]
    assert (listed["deploymentId"], listed["reason"]) == (deployment_id, OVER_DELIVERED)
    redriven = host.dlq({"action": "redrive", "ids": [listed["jobId"]]})
    assert redriven["jobs"] == {"redriven": [listed["jobId"]]}
    assert host.poisoned() == []
    host.cloud.break_creates(None)
    host.drain()  # the job comes back and finds its deployment already Failed
    assert host.phase(deployment_id) == "Failed"


def test_receiver_down_dead_letters_the_callbacks_and_the_dlq_function_replays_them(
    host: Host,
) -> None:
    host.receiver.fail_with = 503
    deployment_id = host.provision()
    host.drain()

    assert host.phase(deployment_id) == "Ready"
    assert host.receiver.log == []
    listed = host.dlq()
    assert listed["jobs"] == []  # the jobs themselves succeeded
    assert {c["phase"] for c in listed["callbacks"]} == {"Provisioning", "Ready"}
    assert all(c["attempts"] == 6 for c in listed["callbacks"])

    host.receiver.fail_with = None
    redriven = host.dlq({"action": "redrive"})
    assert sorted(redriven["callbacks"]["resolved"]) == sorted(c["id"] for c in listed["callbacks"])
    assert sorted(host.phases()) == ["Provisioning", "Ready"]
    assert host.dlq()["callbacks"] == []


def test_a_timer_runs_its_scan_on_the_azure_broker(host: Host) -> None:
    deployment_id = host.provision()
    host.drain()
    host.call("scan_drift", timer_request(), Context("scan_drift"))
    host.call("scan_reconcile", timer_request(), Context("scan_reconcile"))
    assert host.phase(deployment_id) == "Ready"
    assert host.phases() == ["Provisioning", "Ready"]  # no drift, nothing re-sent
