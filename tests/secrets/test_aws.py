"""SecretsManagerStore against moto, checked through a separate boto3 client."""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from kidp.errors import NotFound, ProvisioningFailed, StoreUnavailable, TemporaryError
from kidp.ports import SecretStore
from kidp.secrets.aws import STORE_NAME, SecretsManagerStore

REGION = "us-east-1"
PREFIX = "platform.company.com/"
NAME = "kidp/team-a/orders"
VALUE = {"username": "kidpadmin", "password": "Kx7-vQ2_mP9.tR4~wZ8nB3yL6hD"}
TAGS = {"managed-by": "kidp", "deployment-id": "deploy-0123", "team": "payments"}


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


@pytest.fixture
def store(aws: None) -> SecretsManagerStore:
    return SecretsManagerStore(region=REGION)


def secretsmanager() -> Any:
    return boto3.client("secretsmanager", region_name=REGION)


class Generator:
    """A ``create`` callback that counts how often it is asked for a value."""

    def __init__(self, value: dict[str, str]) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> dict[str, str]:
        self.calls += 1
        return dict(self.value)


def test_is_a_secret_store(store: SecretsManagerStore) -> None:
    store_port: SecretStore = store
    assert store_port is store
    assert store.name == STORE_NAME == "aws-secretsmanager"


def test_ensure_creates_once_and_then_returns_the_stored_value(store: SecretsManagerStore) -> None:
    create = Generator(VALUE)
    ref, value = store.ensure(NAME, create, TAGS)

    described = secretsmanager().describe_secret(SecretId=NAME)
    assert ref.store == "aws-secretsmanager"
    assert ref.name == NAME
    assert ref.id == described["ARN"]
    current = secretsmanager().get_secret_value(SecretId=NAME)
    assert ref.version == current["VersionId"]
    assert json.loads(current["SecretString"]) == VALUE == value
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {
        f"{PREFIX}managed-by": "kidp",
        f"{PREFIX}deployment-id": "deploy-0123",
        f"{PREFIX}team": "payments",
    }

    again_ref, again = store.ensure(NAME, Generator({"password": "different"}), TAGS)
    assert (again_ref, again) == (ref, VALUE)
    assert create.calls == 1


def test_tags_already_in_aws_form_are_kept(store: SecretsManagerStore) -> None:
    store.ensure(NAME, Generator(VALUE), {f"{PREFIX}team": "payments", "cost-center": "42"})
    tags = secretsmanager().describe_secret(SecretId=NAME)["Tags"]
    assert {t["Key"]: t["Value"] for t in tags} == {
        f"{PREFIX}team": "payments",
        "cost-center": "42",
    }


def test_a_lost_create_race_returns_the_winners_value(session: boto3.session.Session) -> None:
    winner = {"username": "kidpadmin", "password": "the-first-workers-value"}
    secretsmanager().create_secret(Name=NAME, SecretString=json.dumps(winner))
    looked: list[str] = []

    def first_look_misses(**_: Any) -> Any:
        # This worker looked just before the other worker created the secret.
        if looked:
            return None
        looked.append("miss")
        parsed = {
            "Error": {"Code": "ResourceNotFoundException", "Message": "not found"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }
        return AWSResponse("https://injected.invalid/", 400, {}, _Body(b"")), parsed

    session.events.register("before-call.secretsmanager.GetSecretValue", first_look_misses)
    store = SecretsManagerStore(region=REGION, client=session.client("secretsmanager"))

    ref, value = store.ensure(NAME, Generator(VALUE), TAGS)

    assert looked == ["miss"]
    assert value == winner
    assert ref.id == secretsmanager().describe_secret(SecretId=NAME)["ARN"]


def test_put_version_makes_a_new_current_version(store: SecretsManagerStore) -> None:
    first, _ = store.ensure(NAME, Generator(VALUE), TAGS)
    rotated = {"username": "kidpadmin", "password": "R0tated-value_9876543210"}

    ref = store.put_version(NAME, rotated)

    assert ref.id == first.id
    assert ref.version and ref.version != first.version
    current = secretsmanager().get_secret_value(SecretId=NAME)
    assert current["VersionId"] == ref.version
    assert json.loads(current["SecretString"]) == rotated
    assert store.ensure(NAME, Generator(VALUE), TAGS) == (ref, rotated)


def test_put_version_of_a_missing_secret_is_not_found_and_shows_no_value(
    store: SecretsManagerStore,
) -> None:
    with pytest.raises(NotFound) as caught:
        store.put_version(NAME, VALUE)
    assert NAME in caught.value.message
    assert VALUE["password"] not in "".join(traceback.format_exception(caught.value))


def test_delete_is_immediate_and_repeatable(store: SecretsManagerStore) -> None:
    store.ensure(NAME, Generator(VALUE), TAGS)

    store.delete(NAME)
    store.delete(NAME)

    assert secretsmanager().list_secrets()["SecretList"] == []
    fresh = {"username": "kidpadmin", "password": "a-brand-new-value-123"}
    assert store.ensure(NAME, Generator(fresh), TAGS)[1] == fresh


def test_a_secret_that_is_not_a_json_object_of_strings_is_refused(
    store: SecretsManagerStore,
) -> None:
    secretsmanager().create_secret(Name=NAME, SecretString="plain text")
    with pytest.raises(ProvisioningFailed, match="JSON object of strings"):
        store.ensure(NAME, Generator(VALUE), TAGS)


def test_refusals_are_permanent_and_never_show_the_value(session: boto3.session.Session) -> None:
    def denied(request: Any, **_: Any) -> AWSResponse:
        body = json.dumps(
            {"__type": "AccessDeniedException", "message": f"not allowed: {VALUE['password']}"}
        )
        return AWSResponse(request.url, 400, {}, _Body(body.encode()))

    session.events.register("before-send.secretsmanager.CreateSecret", denied)
    store = SecretsManagerStore(region=REGION, client=session.client("secretsmanager"))

    with pytest.raises(ProvisioningFailed) as caught:
        store.ensure(NAME, Generator(VALUE), TAGS)
    assert "AccessDeniedException" in caught.value.message
    rendered = "".join(traceback.format_exception(caught.value))
    for text in (caught.value.message, repr(caught.value), rendered):
        assert VALUE["password"] not in text
    assert caught.value.__cause__ is None


def test_throttling_is_temporary(session: boto3.session.Session) -> None:
    def throttled(request: Any, **_: Any) -> AWSResponse:
        body = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"})
        return AWSResponse(request.url, 400, {}, _Body(body.encode()))

    session.events.register("before-send.secretsmanager", throttled)
    client = session.client(
        "secretsmanager", config=Config(retries={"mode": "standard", "max_attempts": 1})
    )
    store = SecretsManagerStore(region=REGION, client=client)
    with pytest.raises(StoreUnavailable) as caught:
        store.ensure(NAME, Generator(VALUE), TAGS)
    assert isinstance(caught.value, TemporaryError)


def test_check(store: SecretsManagerStore) -> None:
    store.check()


def test_check_raises_when_secrets_manager_is_unreachable(aws_credentials: None) -> None:
    endpoint = "http://127.0.0.1:9"
    client = boto3.client(
        "secretsmanager",
        region_name=REGION,
        endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    store = SecretsManagerStore(region=REGION, endpoint_url=endpoint, client=client)
    with pytest.raises(StoreUnavailable, match="cannot reach Secrets Manager"):
        store.check()
