"""SqsJobQueue against moto's SQS, through the real boto3 client.

Assertions read the queues the way an operator would: with a separate boto3
client. Time inside moto's SQS is moved by hand (``sqs_clock``) so delays and
visibility timeouts are checked without waiting for them.
"""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from tests.conftest import SqsClock, create_queue_with_dlq

from kidp.errors import InvalidRequest, PermanentError, StoreUnavailable
from kidp.models import Job, JobKind
from kidp.queues.sqs import MAX_DELIVERIES_REASON, SqsDelivery, SqsJobQueue

REGION = "us-east-1"


@pytest.fixture
def sqs(aws: None) -> Any:
    return boto3.client("sqs", region_name=REGION)


@pytest.fixture
def queues(sqs: Any) -> tuple[str, str]:
    """(work queue URL, dead-letter queue URL); the work queue's redrive policy
    names the dead-letter queue."""
    return create_queue_with_dlq(sqs, "kidp-jobs", max_receive_count=5)


@pytest.fixture
def queue(queues: tuple[str, str], sqs_clock: SqsClock) -> SqsJobQueue:
    return SqsJobQueue(queues[0], region=REGION, max_deliveries=3, clock=sqs_clock.now)


def job(kind: JobKind = JobKind.PROVISION, deployment_id: str = "deploy-1") -> Job:
    return Job(kind=kind, deployment_id=deployment_id)


def messages(sqs: Any, url: str) -> list[dict[str, Any]]:
    """Everything visible in ``url`` now (held briefly, then released)."""
    found = sqs.receive_message(
        QueueUrl=url,
        MaxNumberOfMessages=10,
        VisibilityTimeout=0,
        MessageAttributeNames=["All"],
        MessageSystemAttributeNames=["ApproximateReceiveCount"],
    ).get("Messages", [])
    return list(found)


def counts(sqs: Any, url: str) -> dict[str, int]:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return {
        "visible": int(attributes["ApproximateNumberOfMessages"]),
        "in_flight": int(attributes["ApproximateNumberOfMessagesNotVisible"]),
        "delayed": int(attributes["ApproximateNumberOfMessagesDelayed"]),
    }


def test_enqueued_job_is_received_with_its_attempt_and_acknowledged(
    queue: SqsJobQueue, sqs: Any, queues: tuple[str, str]
) -> None:
    sent = job()
    queue.enqueue(sent)

    (delivery,) = queue.receive(max_jobs=5, lease_seconds=30)
    assert delivery.job == sent
    assert delivery.attempt == 1
    assert isinstance(delivery, SqsDelivery) and delivery.message_id
    assert counts(sqs, queues[0]) == {"visible": 0, "in_flight": 1, "delayed": 0}

    queue.ack(delivery)
    assert counts(sqs, queues[0]) == {"visible": 0, "in_flight": 0, "delayed": 0}


def test_message_body_is_the_job_and_attributes_name_it(
    queue: SqsJobQueue, sqs: Any, queues: tuple[str, str]
) -> None:
    sent = job(JobKind.POLL, "deploy-42")
    queue.enqueue(sent)
    (message,) = messages(sqs, queues[0])
    assert Job.from_json(message["Body"]) == sent
    attributes = {k: v["StringValue"] for k, v in message["MessageAttributes"].items()}
    assert attributes == {"kidp-job-kind": "poll", "kidp-deployment-id": "deploy-42"}


def test_delay_holds_the_job_back_until_due(
    queue: SqsJobQueue, sqs_clock: SqsClock, sqs: Any, queues: tuple[str, str]
) -> None:
    queue.enqueue(job(), delay=30)
    assert counts(sqs, queues[0])["delayed"] == 1
    assert queue.receive(max_jobs=1, lease_seconds=30) == []

    sqs_clock.advance(31)
    assert len(queue.receive(max_jobs=1, lease_seconds=30)) == 1


def test_a_delay_beyond_900_seconds_comes_back_early_and_re_enqueues_itself(
    queue: SqsJobQueue, sqs_clock: SqsClock, sqs: Any, queues: tuple[str, str]
) -> None:
    sent = job()
    queue.enqueue(sent, delay=2000)

    # SQS holds it for its maximum, 900 s; then it is sent again for the rest.
    sqs_clock.advance(901)
    assert queue.receive(max_jobs=1, lease_seconds=30) == []
    assert messages(sqs, queues[0]) == []  # the early copy is gone, the new one is delayed
    assert counts(sqs, queues[0]) == {"visible": 0, "in_flight": 0, "delayed": 1}

    sqs_clock.advance(900)
    assert queue.receive(max_jobs=1, lease_seconds=30) == []  # 1801 s: still early
    sqs_clock.advance(200)
    (delivery,) = queue.receive(max_jobs=1, lease_seconds=30)
    assert delivery.job == sent


def test_retry_makes_the_same_message_come_back_after_the_delay(
    queue: SqsJobQueue, sqs_clock: SqsClock
) -> None:
    queue.enqueue(job())
    (first,) = queue.receive(max_jobs=1, lease_seconds=60)
    queue.retry(first, delay=8)

    sqs_clock.advance(5)
    assert queue.receive(max_jobs=1, lease_seconds=60) == []
    sqs_clock.advance(4)
    (second,) = queue.receive(max_jobs=1, lease_seconds=60)
    assert second.job == first.job
    assert second.attempt == 2


def test_dead_letter_moves_the_job_with_its_reason(
    queue: SqsJobQueue, sqs: Any, queues: tuple[str, str]
) -> None:
    sent = job(deployment_id="deploy-7")
    queue.enqueue(sent)
    (delivery,) = queue.receive(max_jobs=1, lease_seconds=30)
    queue.dead_letter(delivery, reason="KeyError")

    assert counts(sqs, queues[0]) == {"visible": 0, "in_flight": 0, "delayed": 0}
    (dead,) = messages(sqs, queues[1])
    assert Job.from_json(dead["Body"]) == sent
    attributes = {k: v["StringValue"] for k, v in dead["MessageAttributes"].items()}
    assert attributes["kidp-reason"] == "KeyError"
    assert attributes["kidp-attempts"] == "1"
    assert attributes["kidp-source-queue"] == queues[0]
    assert attributes["kidp-deployment-id"] == "deploy-7"


def test_a_message_past_max_deliveries_is_dead_lettered_on_receive(
    queue: SqsJobQueue, sqs_clock: SqsClock
) -> None:
    queue.enqueue(job())
    for _ in range(3):
        assert len(queue.receive(max_jobs=1, lease_seconds=10)) == 1
        sqs_clock.advance(11)  # the worker died: the lease expires
    assert queue.receive(max_jobs=1, lease_seconds=10) == []
    (dead,) = queue.dead_messages()
    assert dead.reason == MAX_DELIVERIES_REASON
    assert dead.attempts == 4


def test_listing_dead_letters_consumes_nothing_and_redrive_gives_fresh_deliveries(
    queue: SqsJobQueue, sqs: Any, queues: tuple[str, str]
) -> None:
    sent = [job(deployment_id=f"deploy-{n}") for n in range(3)]
    for item in sent:
        queue.enqueue(item)
    for delivery in queue.receive(max_jobs=3, lease_seconds=30):
        queue.dead_letter(delivery, reason="boom")

    listed = queue.dead_messages()
    assert sorted(d.job.deployment_id for d in listed if d.job) == [
        "deploy-0",
        "deploy-1",
        "deploy-2",
    ]
    assert queue.dead_messages() and counts(sqs, queues[1])["visible"] == 3
    assert queue.dead_jobs()[0][1] == "boom"

    chosen = next(d for d in listed if d.job and d.job.deployment_id == "deploy-1")
    assert queue.redrive([chosen.message_id]) == [chosen.message_id]
    assert counts(sqs, queues[1])["visible"] == 2
    (back,) = queue.receive(max_jobs=10, lease_seconds=30)
    assert back.job.deployment_id == "deploy-1"
    assert back.attempt == 1  # a fresh message: a full set of deliveries again

    assert len(queue.redrive()) == 2
    assert queue.dead_messages() == []


def test_dead_letter_queue_comes_from_the_redrive_policy_or_configuration(
    queues: tuple[str, str], sqs: Any
) -> None:
    assert SqsJobQueue(queues[0], region=REGION).dead_letter_queue_url() == queues[1]
    other = sqs.create_queue(QueueName="elsewhere")["QueueUrl"]
    configured = SqsJobQueue(queues[0], region=REGION, dead_letter_queue_url=other)
    assert configured.dead_letter_queue_url() == other

    lonely = sqs.create_queue(QueueName="no-dlq")["QueueUrl"]
    with pytest.raises(PermanentError, match="KIDP_AWS_DEAD_LETTER_QUEUE_URL"):
        SqsJobQueue(lonely, region=REGION).dead_letter_queue_url()


def test_a_lambda_record_becomes_a_delivery(queue: SqsJobQueue) -> None:
    sent = job(JobKind.CALLBACK, "deploy-9")
    record = {
        "messageId": "m-1",
        "receiptHandle": "r-1",
        "body": sent.to_json(),
        "attributes": {"ApproximateReceiveCount": "4"},
        "messageAttributes": {"kidp-not-before": {"stringValue": "1234.5", "dataType": "Number"}},
    }
    delivery = queue.delivery_from_record(record)
    assert (delivery.job, delivery.receipt, delivery.attempt) == (sent, "r-1", 4)
    assert delivery.not_before == 1234.5

    with pytest.raises(InvalidRequest, match="m-2"):
        queue.delivery_from_record({**record, "messageId": "m-2", "body": "not json"})


def test_settling_a_stale_receipt_is_ignored(queue: SqsJobQueue) -> None:
    queue.enqueue(job())
    (delivery,) = queue.receive(max_jobs=1, lease_seconds=30)
    queue.ack(delivery)
    queue.ack(delivery)  # deleted already: fine
    stale = SqsDelivery(job=delivery.job, receipt="not-a-receipt", attempt=1)
    queue.retry(stale, delay=5)


def test_throttled_sqs_is_temporary_and_a_missing_queue_permanent(
    queues: tuple[str, str], aws: None
) -> None:
    session = boto3.session.Session(region_name=REGION)

    def throttle(**_: Any) -> Any:  # a before-call answer (stubs say None)
        parsed = {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}
        return AWSResponse("https://injected.invalid/", 400, HTTPHeaders(), None), parsed

    session.events.register("before-call.sqs.SendMessage", throttle)
    throttled = SqsJobQueue(queues[0], region=REGION, client=session.client("sqs"))
    with pytest.raises(StoreUnavailable, match="ThrottlingException"):
        throttled.enqueue(job())

    missing = SqsJobQueue("https://sqs.us-east-1.amazonaws.com/123456789012/missing", region=REGION)
    with pytest.raises(PermanentError) as caught:
        missing.check()
    assert not isinstance(caught.value, StoreUnavailable)
    assert "missing" in caught.value.message


def test_check_passes_for_a_reachable_queue(queue: SqsJobQueue) -> None:
    queue.check()


def test_check_is_temporary_when_sqs_cannot_be_reached(aws_credentials: None) -> None:
    from kidp.emulator import free_port

    port = free_port()
    unreachable = SqsJobQueue(
        f"http://127.0.0.1:{port}/123456789012/kidp-jobs",
        region=REGION,
        endpoint_url=f"http://127.0.0.1:{port}",
    )
    with pytest.raises(StoreUnavailable, match="cannot reach SQS"):
        unreachable.check()
