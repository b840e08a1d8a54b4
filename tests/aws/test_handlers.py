"""The Lambda functions in ``aws/handlers.py``, driven by real event payloads.

Every AWS service is moto in process: API Gateway and Lambda's SQS poller are
played by the test (the payload shapes are the fixtures in ``tests/events``),
the queue and its dead-letter queue are SQS queues with a redrive policy, the
store is a DynamoDB table, credentials go to Secrets Manager and databases are
RDS instances. Callbacks go to a local receiver that checks every signature.
Time inside SQS is moved by hand, so delayed messages and visibility timeouts
are exercised without waiting for them.

The test plays Lambda's event source mapping exactly as documented: receive a
batch, invoke ``worker`` with it, delete the records that are not listed in
``batchItemFailures``, leave the others to come back when their visibility
times out.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from tests.conftest import LambdaContext as Context
from tests.conftest import SqsClock, bearer_token, create_queue_with_dlq

from kidp.errors import ValidationFailed
from kidp.models import Job, JobKind
from kidp.queues.sqs import SqsJobQueue

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "tests" / "events"
REGION = "us-east-1"
JWT_SECRET = "j" * 48
MAX_DELIVERIES = 4


def load_handlers() -> ModuleType:
    """``aws/handlers.py`` by path, as Lambda loads it (the folder is no package)."""
    spec = importlib.util.spec_from_file_location("handlers", ROOT / "aws" / "handlers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / name).read_text()))


@dataclass
class Lambda:
    """The four functions plus what plays API Gateway and the SQS poller."""

    handlers: ModuleType
    sqs: Any
    queue_url: str
    dlq_url: str
    queue_arn: str
    receiver: Any
    clock: SqsClock
    token: str

    # --- API Gateway --------------------------------------------------------

    def http(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: str = "",
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        event = fixture("apigw_http_v2.json")
        event["rawPath"] = path
        event["rawQueryString"] = query
        event["requestContext"]["http"].update(method=method, path=path)
        event["requestContext"]["requestId"] = f"req-{uuid.uuid4().hex[:12]}"
        event["headers"].update(headers or {})
        if auth:
            event["headers"]["authorization"] = f"Bearer {self.token}"
        if body is not None:
            event["body"] = json.dumps(body)
            event["headers"]["content-type"] = "application/json"
            event["headers"]["content-length"] = str(len(event["body"]))
        response = self.handlers.api(event, Context())
        payload = json.loads(response["body"]) if response.get("body") else {}
        return response["statusCode"], payload, response.get("headers", {})

    def provision(self, name: str = "orders-db") -> str:
        status, body, _ = self.http(
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
        status, body, _ = self.http("GET", "/v1/status", query=f"id={deployment_id}")
        assert status == 200, body
        return str(body["phase"])

    # --- Lambda's SQS event source mapping ------------------------------------

    def receive(self) -> list[dict[str, Any]]:
        return list(
            self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=10,
                MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"],
            ).get("Messages", [])
        )

    def sqs_event(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The SQS event Lambda would build from ``messages`` (fixture shape)."""
        template = fixture("sqs_batch.json")["Records"][0]
        records = []
        for message in messages:
            record = copy.deepcopy(template)
            record.update(
                messageId=message["MessageId"],
                receiptHandle=message["ReceiptHandle"],
                body=message["Body"],
                md5OfBody=message["MD5OfBody"],
                eventSourceARN=self.queue_arn,
            )
            record["attributes"] = {**template["attributes"], **message.get("Attributes", {})}
            record["messageAttributes"] = {
                name: {
                    "stringValue": value.get("StringValue"),
                    "stringListValues": [],
                    "binaryListValues": [],
                    "dataType": value["DataType"],
                }
                for name, value in message.get("MessageAttributes", {}).items()
            }
            records.append(record)
        return {"Records": records}

    def deliver(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """Invoke ``worker`` with ``messages``; delete the ones that succeeded."""
        response: dict[str, Any] = self.handlers.worker(self.sqs_event(messages), Context())
        failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
        done = [m for m in messages if m["MessageId"] not in failed]
        if done:
            self.sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(done)
                ],
            )
        return response

    def counts(self, url: str | None = None) -> dict[str, int]:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=url or self.queue_url, AttributeNames=["All"]
        )["Attributes"]
        return {
            "visible": int(attributes["ApproximateNumberOfMessages"]),
            "in_flight": int(attributes["ApproximateNumberOfMessagesNotVisible"]),
            "delayed": int(attributes["ApproximateNumberOfMessagesDelayed"]),
        }

    def drain(self, *, step: float = 20.0, rounds: int = 200) -> list[dict[str, Any]]:
        """Run the poller until the queue is empty, letting time pass whenever
        nothing is due; returns every worker response."""
        responses = []
        for _ in range(rounds):
            messages = self.receive()
            if messages:
                responses.append(self.deliver(messages))
                continue
            if not any(self.counts().values()):
                return responses
            self.clock.advance(step)
        raise AssertionError("the queue never emptied")

    def dead_letter_queue(self) -> list[dict[str, Any]]:
        return list(
            self.sqs.receive_message(
                QueueUrl=self.dlq_url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=0,
                MessageAttributeNames=["All"],
            ).get("Messages", [])
        )

    def phases(self) -> list[str]:
        return [payload["phase"] for _, payload in self.receiver.log]


def rds() -> Any:
    return boto3.client("rds", region_name=REGION)


def instances() -> list[dict[str, Any]]:
    return list(rds().describe_db_instances()["DBInstances"])


def short_circuit(status: int, parsed: dict[str, Any]) -> tuple[AWSResponse, dict[str, Any]]:
    """A botocore ``before-call`` answer: the call returns this without HTTP."""
    return AWSResponse("https://injected.invalid/", status, HTTPHeaders(), None), parsed


THROTTLED = {"Error": {"Code": "Throttling", "Message": "Rate exceeded"}}


@pytest.fixture(scope="module")
def handlers() -> ModuleType:
    return load_handlers()


@pytest.fixture
def lam(
    aws: None,
    monkeypatch: pytest.MonkeyPatch,
    sqs_clock: SqsClock,
    receiver: Any,
    handlers: ModuleType,
) -> Iterator[Lambda]:
    """The functions configured as ``serverless.yml`` configures them, on moto."""
    from kidp.edges import aws as edge
    from kidp.stores.dynamodb import DynamoDbDeploymentStore

    sqs = boto3.client("sqs", region_name=REGION)
    queue_url, dlq_url = create_queue_with_dlq(
        sqs, "kidp-jobs", max_receive_count=MAX_DELIVERIES, VisibilityTimeout="60"
    )
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    DynamoDbDeploymentStore("kidp-test", region=REGION).create_table()

    environment = {
        "AWS_REGION": REGION,
        "KIDP_STORE_URL": "dynamodb://kidp-test",
        "KIDP_QUEUE_URL": queue_url,
        "KIDP_JWT_SECRET": JWT_SECRET,
        "KIDP_CALLBACK_SECRET": receiver.secret,
        "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
        "KIDP_CALLBACK_TIMEOUT_SECONDS": "5",
        "KIDP_JOB_MAX_DELIVERIES": str(MAX_DELIVERIES),
        "KIDP_PROGRESS_INTERVAL_SECONDS": "0",
    }
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KIDP_REGION", raising=False)
    edge.reset()
    yield Lambda(
        handlers=handlers,
        sqs=sqs,
        queue_url=queue_url,
        dlq_url=dlq_url,
        queue_arn=queue_arn,
        receiver=receiver,
        clock=sqs_clock,
        token=bearer_token(JWT_SECRET, namespaces=["team-platform"]),
    )
    edge.reset()


def install_with(session_hooks: Callable[[boto3.session.Session], None]) -> None:
    """Build the container's broker with an AWS provider whose boto3 session
    carries ``session_hooks`` (how the tests inject throttling and faults)."""
    from kidp.bootstrap import build
    from kidp.edges import aws as edge
    from kidp.providers.aws import AwsProvider

    session = boto3.session.Session(region_name=REGION)
    session_hooks(session)
    settings = edge.settings_from_env()
    edge.install(build(settings, provider=AwsProvider(region=REGION, session=session)))


# ----------------------------------------------------------------------- api


def test_health_through_api_gateway(lam: Lambda) -> None:
    status, body, headers = lam.http("GET", "/health", auth=False)
    assert status == 200
    assert body["status"] in ("healthy", "degraded")
    assert body["checks"]["store"]["status"] == "ok"
    assert body["checks"]["queue"]["status"] == "ok"
    assert headers["x-correlation-id"].startswith("req-")


def test_the_callers_correlation_id_wins_over_the_request_id(lam: Lambda) -> None:
    _, _, headers = lam.http("GET", "/health", auth=False, headers={"x-correlation-id": "abc"})
    assert headers["x-correlation-id"] == "abc"


def test_api_refuses_a_missing_token_in_the_documented_shape(lam: Lambda) -> None:
    status, body, headers = lam.http("GET", "/v1/catalog", auth=False)
    assert status == 401
    assert body["error"] == "unauthorized" and body["code"] == 401
    assert headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("at_init", [False, True], ids=["after-init", "at-init"])
def test_api_without_its_secrets_answers_500_without_detail(
    lam: Lambda, monkeypatch: pytest.MonkeyPatch, at_init: bool
) -> None:
    from kidp.edges import aws as edge

    monkeypatch.delenv("KIDP_CALLBACK_SECRET")
    if at_init:
        # Lambda's init phase must not fail: API Gateway would answer for it.
        edge.reset()
        edge.warm_up("handlers.api")
    status, body, _ = lam.http("GET", "/health", auth=False)
    assert status == 500
    assert body == {
        "error": "internal_error",
        "message": "the broker is misconfigured; its logs say how",
        "code": 500,
    }


def test_a_provision_request_becomes_one_sqs_message(lam: Lambda) -> None:
    deployment_id = lam.provision()
    (message,) = lam.receive()
    job = Job.from_json(message["Body"])
    assert (job.kind, job.deployment_id) == (JobKind.PROVISION, deployment_id)
    assert message["MessageAttributes"]["kidp-deployment-id"]["StringValue"] == deployment_id
    assert lam.phase(deployment_id) == "Pending"


# -------------------------------------------------------------------- flows


def test_end_to_end_from_api_event_to_ready(lam: Lambda) -> None:
    deployment_id = lam.provision()

    (message,) = lam.receive()
    assert lam.deliver([message]) == {"batchItemFailures": []}
    (instance,) = instances()
    tags = {t["Key"]: t["Value"] for t in instance["TagList"]}
    assert tags["platform.company.com/deployment-id"] == deployment_id
    # moto's instance is available at once: Ready from the provision job itself.
    assert lam.phase(deployment_id) == "Ready"

    lam.drain()

    assert lam.phase(deployment_id) == "Ready"
    assert lam.phases() == ["Provisioning", "Ready"]
    ready = lam.receiver.log[-1][1]
    assert ready["deploymentId"] == deployment_id
    assert ready["endpoint"] and ready["port"] == 5432
    assert ready["additionalMetadata"]["secretRef"]["store"] == "aws-secretsmanager"
    status, detail, _ = lam.http("GET", f"/api/v1/deployments/{deployment_id}")
    assert status == 200 and detail["progress"] == 100
    assert lam.counts() == {"visible": 0, "in_flight": 0, "delayed": 0}


def test_duplicate_delivery_makes_one_instance_and_one_ready_callback(lam: Lambda) -> None:
    deployment_id = lam.provision()
    (message,) = lam.receive()
    event = lam.sqs_event([message])
    for _ in range(3):  # SQS handed the same message out three times
        assert lam.handlers.worker(copy.deepcopy(event), Context()) == {"batchItemFailures": []}
    lam.sqs.delete_message(QueueUrl=lam.queue_url, ReceiptHandle=message["ReceiptHandle"])

    lam.drain()

    assert len(instances()) == 1
    assert lam.phases() == ["Provisioning", "Ready"]
    assert lam.phase(deployment_id) == "Ready"


def test_receiver_down_retries_as_delayed_messages_then_dead_letters_and_redrives(
    lam: Lambda,
) -> None:
    from kidp.edges import aws as edge

    lam.receiver.fail_with = 503
    deployment_id = lam.provision()
    delays: list[int] = []

    def spy(params: dict[str, Any], **_: Any) -> None:
        job = Job.from_json(params["MessageBody"])
        if job.kind is JobKind.CALLBACK and job.seq:
            delays.append(params.get("DelaySeconds", 0))

    queue = edge.broker().service.queue
    assert isinstance(queue, SqsJobQueue)
    queue.client.meta.events.register("before-parameter-build.sqs.SendMessage", spy)
    lam.drain()

    assert lam.phase(deployment_id) == "Ready"
    # Two callbacks (Provisioning, Ready), each retried after 1, 2, 4, 8, 16 s.
    assert sorted(delays) == sorted([1, 2, 4, 8, 16] * 2)
    assert lam.receiver.log == []

    listed = lam.handlers.dlq({"action": "list"}, Context())
    assert {c["phase"] for c in listed["callbacks"]} == {"Provisioning", "Ready"}
    assert all(
        c["attempts"] == 6 and c["deploymentId"] == deployment_id for c in listed["callbacks"]
    )
    assert listed["jobs"] == []  # the jobs themselves succeeded: nothing in the SQS DLQ

    lam.receiver.fail_with = None
    redriven = lam.handlers.dlq({"action": "redrive"}, Context())
    assert sorted(redriven["callbacks"]["resolved"]) == sorted(c["id"] for c in listed["callbacks"])
    assert redriven["callbacks"]["failed"] == []
    assert sorted(lam.phases()) == ["Provisioning", "Ready"]
    assert lam.handlers.dlq({"action": "list"}, Context())["callbacks"] == []


def test_poison_job_lands_in_the_dlq_fails_the_deployment_and_can_be_redriven(
    lam: Lambda,
) -> None:
    def explode(**_: Any) -> None:
        raise RuntimeError("a bug in the provider")

    install_with(lambda s: s.events.register("before-call.rds.CreateDBInstance", explode))
    deployment_id = lam.provision()

    responses = lam.drain()

    # Run MAX_DELIVERIES - 1 times (the last receive is kept for a function
    # that died on every run): retried once (a failure), then given up.
    failures = [r for r in responses if r["batchItemFailures"]]
    assert len(failures) == MAX_DELIVERIES - 2
    assert lam.phase(deployment_id) == "Failed"
    assert lam.phases() == ["Failed"]
    assert "job failed repeatedly: RuntimeError" in lam.receiver.log[-1][1]["message"]
    assert instances() == []

    (dead,) = lam.dead_letter_queue()
    assert Job.from_json(dead["Body"]).deployment_id == deployment_id
    attributes = {k: v["StringValue"] for k, v in dead["MessageAttributes"].items()}
    assert attributes["kidp-reason"] == "RuntimeError"
    assert attributes["kidp-attempts"] == str(MAX_DELIVERIES - 1)

    (listed,) = lam.handlers.dlq({"action": "list"}, Context())["jobs"]
    assert listed["deploymentId"] == deployment_id
    assert listed["kind"] == "provision"
    assert listed["reason"] == "RuntimeError"

    redriven = lam.handlers.dlq({"action": "redrive", "ids": [listed["jobId"]]}, Context())
    assert redriven["jobs"] == {"redriven": [listed["jobId"]]}
    assert lam.dead_letter_queue() == []
    lam.drain()  # the job comes back and finds its deployment already Failed
    assert lam.phase(deployment_id) == "Failed"
    assert lam.phases() == ["Failed"]


def test_a_job_that_kills_the_function_every_time_still_fails_its_deployment(
    lam: Lambda,
) -> None:
    class Killed(BaseException):
        """What a Lambda timeout or out-of-memory is to the job: no exception
        the worker can catch, no response, the message simply comes back."""

    def die(**_: Any) -> None:
        raise Killed

    install_with(lambda s: s.events.register("before-call.rds.CreateDBInstance", die))
    deployment_id = lam.provision()
    deaths = 0
    for _ in range(MAX_DELIVERIES + 2):
        messages = lam.receive()
        if messages:
            try:
                lam.deliver(messages)
            except Killed:
                deaths += 1
        lam.clock.advance(120)  # past the visibility timeout

    assert deaths == MAX_DELIVERIES - 1
    assert lam.phase(deployment_id) == "Failed"
    assert lam.phases() == ["Failed"]
    assert "stopped during each of its deliveries" in lam.receiver.log[-1][1]["message"]
    (dead,) = lam.dead_letter_queue()
    assert Job.from_json(dead["Body"]).deployment_id == deployment_id
    assert not any(lam.counts().values())


def test_throttled_cloud_api_is_retried_via_visibility_without_a_duplicate(
    lam: Lambda,
) -> None:
    throttled: list[str] = []
    budget = {"throttles": 0}

    def throttle(**_: Any) -> Any:  # a before-call answer (stubs say None)
        if len(throttled) >= budget["throttles"]:
            return None
        throttled.append("DescribeDBInstances")
        return short_circuit(400, THROTTLED)

    install_with(lambda s: s.events.register("before-call.rds.DescribeDBInstances", throttle))
    deployment_id = lam.provision()
    budget["throttles"] = 2  # the worker's first two looks are throttled

    (message,) = lam.receive()
    response = lam.deliver([message])
    assert response == {"batchItemFailures": [{"itemIdentifier": message["MessageId"]}]}
    # Not redelivered at once: its visibility holds the throttle's retry-after (5 s).
    assert lam.counts() == {"visible": 0, "in_flight": 1, "delayed": 0}
    lam.clock.advance(4)
    assert lam.receive() == []
    lam.clock.advance(2)
    (again,) = lam.receive()
    assert again["MessageId"] == message["MessageId"]
    assert again["Attributes"]["ApproximateReceiveCount"] == "2"
    assert lam.deliver([again])["batchItemFailures"]  # throttled once more

    lam.drain()

    assert throttled == ["DescribeDBInstances"] * 2
    assert lam.phase(deployment_id) == "Ready"
    assert len(instances()) == 1
    assert lam.phases() == ["Provisioning", "Ready"]


def test_one_bad_record_fails_alone(lam: Lambda) -> None:
    throttling = {"on": True}

    def throttle_one(params: dict[str, Any], **_: Any) -> Any:
        # ``params`` is the serialized query request: its body names the instance.
        wanted = str(params.get("body", {}).get("DBInstanceIdentifier", ""))
        return short_circuit(400, THROTTLED) if throttling["on"] and "slow-db" in wanted else None

    install_with(lambda s: s.events.register("before-call.rds.DescribeDBInstances", throttle_one))
    good = lam.provision("orders-db")
    slow = lam.provision("slow-db")
    lam.sqs.send_message(QueueUrl=lam.queue_url, MessageBody="{not a job")
    messages = lam.receive()
    assert len(messages) == 3
    by_body = {m["Body"]: m for m in messages}
    junk = by_body.pop("{not a job")
    by_deployment = {Job.from_json(body).deployment_id: m for body, m in by_body.items()}

    response = lam.deliver([by_deployment[good], by_deployment[slow], junk])

    assert response == {"batchItemFailures": [{"itemIdentifier": by_deployment[slow]["MessageId"]}]}
    assert ["orders-db" in i["DBInstanceIdentifier"] for i in instances()] == [True]
    (dead,) = lam.dead_letter_queue()  # the junk: no retry can make it a job
    assert dead["Body"] == "{not a job"
    assert "not a broker job" in dead["MessageAttributes"]["kidp-reason"]["StringValue"]

    throttling["on"] = False
    lam.drain()
    assert (lam.phase(good), lam.phase(slow)) == ("Ready", "Ready")
    assert len(instances()) == 2


# ---------------------------------------------------------------------- scan


def test_drift_scan_from_the_schedule_reports_a_resized_instance(lam: Lambda) -> None:
    deployment_id = lam.provision()
    lam.drain()
    rds().modify_db_instance(
        DBInstanceIdentifier=instances()[0]["DBInstanceIdentifier"],
        DBInstanceClass="db.m5.large",
        ApplyImmediately=True,
    )

    result = lam.handlers.scan(fixture("eventbridge_scan_input.json"), Context())
    assert result == {"scan": "drift", "result": {"checked": 1, "changed": 1}}
    lam.drain()
    drift = lam.receiver.log[-1][1]
    assert drift["deploymentId"] == deployment_id
    assert drift["driftDetected"] is True


def test_scan_named_in_an_eventbridge_events_detail(
    lam: Lambda, stray_rds_instance: Callable[..., None]
) -> None:
    stray_rds_instance("kidp-stray", deployment_id="deploy-gone")
    event = fixture("eventbridge_scheduled.json")
    event["detail"] = {"scan": "orphans"}
    result = lam.handlers.scan(event, Context())
    assert result["scan"] == "orphans"
    (orphan,) = result["result"]["orphans"]
    assert orphan["deploymentId"] == "deploy-gone"


def test_a_schedule_without_a_scan_name_says_what_to_configure(lam: Lambda) -> None:
    with pytest.raises(ValidationFailed, match='"scan"'):
        lam.handlers.scan(fixture("eventbridge_scheduled.json"), Context())


def test_reconcile_scan_runs_on_lambda(lam: Lambda) -> None:
    result = lam.handlers.scan({"scan": "reconcile"}, Context())
    assert result == {
        "scan": "reconcile",
        "result": {"jobs": 0, "callbacks": 0, "deadLetters": 0, "purged": 0},
    }


# ------------------------------------------------------------ observability


def emitted(output: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(EMF documents, log records) printed to stdout."""
    documents: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        (documents if "_aws" in entry else records).append(entry)
    return documents, records


def metric_values(documents: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in documents if name in d]


def test_metrics_are_emitted_as_emf_under_the_seed_names(
    lam: Lambda, capsys: pytest.CaptureFixture[str]
) -> None:
    lam.provision()
    documents, _ = emitted(capsys.readouterr().out)
    (accepted,) = metric_values(documents, "broker_provision_requests_total")
    assert accepted["broker_provision_requests_total"] == [1.0]
    assert accepted["status"] == "accepted" and accepted["resource_type"] == "database"
    assert accepted["function"] == "api" and accepted["service"] == "kidp-broker"
    (definition,) = accepted["_aws"]["CloudWatchMetrics"]
    assert definition["Namespace"] == "KIDP/Broker"
    assert {"function", "status", "resource_type"} <= set(definition["Dimensions"][0])
    requests = metric_values(documents, "kidp_broker_requests_total")
    assert [d["status"] for d in requests] == ["202"]
    (duration,) = metric_values(documents, "kidp_broker_request_duration_seconds")
    (seconds,) = duration["kidp_broker_request_duration_seconds"]
    assert 0 < seconds < 5
    assert duration["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"] == "Seconds"

    lam.drain()
    documents, _ = emitted(capsys.readouterr().out)
    worker_docs = [d for d in documents if d["function"] == "worker"]
    attempts = [d for d in worker_docs if "kidp_broker_callback_attempts_total" in d]
    assert sum(sum(d["kidp_broker_callback_attempts_total"]) for d in attempts) == 2
    assert {d["status"] for d in attempts} == {"success"}
    (ready,) = metric_values(worker_docs, "broker_provision_duration_seconds")
    assert ready["resource_type"] == "database"


def test_logs_are_json_with_the_deployment_as_correlation_id_and_no_secrets(
    lam: Lambda, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment_id = lam.provision()
    lam.drain()
    output = capsys.readouterr().out
    _, records = emitted(output)
    ready = [r for r in records if r["message"] == "deployment ready"]
    assert ready and ready[0]["correlation_id"] == deployment_id
    assert ready[0]["function_name"] == "kidp-broker-test"
    assert ready[0]["level"] == "INFO"
    audit = [r for r in records if r["message"] == "provision accepted"]
    assert audit and audit[0]["correlation_id"].startswith("req-")

    secret = boto3.client("secretsmanager", region_name=REGION).list_secrets()["SecretList"][0]
    value = boto3.client("secretsmanager", region_name=REGION).get_secret_value(
        SecretId=secret["ARN"]
    )
    password = json.loads(value["SecretString"])["password"]
    assert password not in output
    assert JWT_SECRET not in output and lam.token not in output
    assert lam.receiver.secret not in output


def test_deprovision_through_the_api_deletes_the_instance_and_its_secret(lam: Lambda) -> None:
    deployment_id = lam.provision()
    lam.drain()
    status, body, _ = lam.http(
        "DELETE", "/api/v1/resources/database/orders-db", query="namespace=team-platform"
    )
    assert status == 202, body
    lam.drain()

    assert lam.phase(deployment_id) == "Deleted"
    assert instances() == []
    secrets = boto3.client("secretsmanager", region_name=REGION).list_secrets()["SecretList"]
    assert secrets == []
    assert lam.phases() == ["Provisioning", "Ready", "Deleting", "Deleted"]


def test_the_reconcile_schedule_counts_deployments_for_cloudwatch(
    lam: Lambda, capsys: pytest.CaptureFixture[str]
) -> None:
    lam.provision()
    capsys.readouterr()
    lam.handlers.scan({"scan": "reconcile"}, Context())
    emitted = [
        json.loads(line)
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("{") and "broker_resources_total" in line
    ]
    assert [
        (e["namespace"], e["type"], e["phase"], e["broker_resources_total"]) for e in emitted
    ] == [("team-platform", "database", "Pending", [1.0])]


def test_dlq_refuses_an_unknown_action(lam: Lambda) -> None:
    with pytest.raises(ValidationFailed, match="list or redrive"):
        lam.handlers.dlq({"action": "purge"}, Context())


# --------------------------------------------------------------- cold start


COLD_START_PROBE = """
import json, sys
sys.path.insert(0, {aws!r})
import handlers  # _HANDLER names the worker: Lambda's init phase for it
from kidp.edges import aws as edge
edge.warm_up("handlers.scan")
edge.warm_up("handlers.dlq")
# The JWT library, the HTTP client and boto3 are no part of these functions.
before = sorted(
    m
    for m in ("fastapi", "starlette", "uvicorn", "mangum", "jwt", "httpx", "boto3")
    if m in sys.modules
)
edge.warm_up("handlers.api")
after = sorted(m for m in ("fastapi", "starlette", "mangum") if m in sys.modules)
print(json.dumps({{"before": before, "after": after}}))
"""


def test_only_the_api_function_imports_the_web_framework(receiver: Any) -> None:
    import os
    import subprocess
    import sys

    environment = {
        **os.environ,
        "_HANDLER": "aws/handlers.worker",  # as serverless.yml names it
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        # Building the broker makes no AWS call: nothing listens here.
        "KIDP_AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "KIDP_STORE_URL": "dynamodb://kidp-test",
        "KIDP_QUEUE_URL": "http://127.0.0.1:9/123456789012/kidp-jobs",
        "KIDP_JWT_SECRET": JWT_SECRET,
        "KIDP_CALLBACK_SECRET": receiver.secret,
    }
    done = subprocess.run(
        [sys.executable, "-c", COLD_START_PROBE.format(aws=str(ROOT / "aws"))],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"before": [], "after": ["fastapi", "mangum", "starlette"]}
