"""SecretManagerStore through the real ``google-cloud-secret-manager`` client
(REST, anonymous credentials) against the Secret Manager stand-in, checked
through the stand-in's own view of what it holds."""

from __future__ import annotations

import json
import time
import traceback
import uuid
from collections.abc import Iterator

import pytest
from google.auth.credentials import AnonymousCredentials

from kidp.emulator import free_port
from kidp.errors import NotFound, ProvisioningFailed, StoreUnavailable, TemporaryError
from kidp.ports import SecretStore
from kidp.secretmanager_emulator import SecretManagerEmulator, start_secretmanager_emulator
from kidp.secrets.gcpsecretmanager import STORE_NAME, SecretManagerStore, secret_id

PREFIX = "platform.company.com/"
NAME = "kidp/team-a/orders-credentials"
VALUE = {"username": "kidpadmin", "password": "Kx7-vQ2_mP9.tR4~wZ8nB3yL6hD"}
TAGS = {"managed-by": "kidp", "deployment-id": "deploy-0123", "team": "Payments"}


@pytest.fixture(scope="module")
def emulator() -> Iterator[SecretManagerEmulator]:
    server = start_secretmanager_emulator()
    yield server
    server.stop()


@pytest.fixture
def project() -> str:
    return f"kidp-test-{uuid.uuid4().hex[:10]}"


def make_store(
    emulator: SecretManagerEmulator, project: str, **options: object
) -> SecretManagerStore:
    return SecretManagerStore(
        project, credentials=AnonymousCredentials(), endpoint=emulator.url, **options
    )


@pytest.fixture
def store(emulator: SecretManagerEmulator, project: str) -> Iterator[SecretManagerStore]:
    store = make_store(emulator, project)
    yield store
    store.close()
    emulator.faults.clear()


def resource(project: str, name: str = NAME) -> str:
    return f"projects/{project}/secrets/{secret_id(name)}"


class Generator:
    """A ``create`` callback that counts how often it is asked for a value."""

    def __init__(self, value: dict[str, str]) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> dict[str, str]:
        self.calls += 1
        return dict(self.value)


def test_is_a_secret_store(store: SecretManagerStore) -> None:
    port: SecretStore = store
    assert port is store
    assert store.name == STORE_NAME == "gcp-secretmanager"


def test_names_become_secret_ids_one_to_one() -> None:
    assert secret_id(NAME) == "kidp_team-a_orders-credentials"
    assert secret_id("kidp/a-b/c") != secret_id("kidp/a/b-c")
    with pytest.raises(ProvisioningFailed, match="cannot be a Secret Manager id"):
        secret_id("kidp/team a/x")


def test_ensure_creates_once_and_then_returns_the_stored_value(
    store: SecretManagerStore, emulator: SecretManagerEmulator, project: str
) -> None:
    create = Generator(VALUE)
    ref, value = store.ensure(NAME, create, TAGS)

    assert (ref.store, ref.name, ref.id, ref.version) == (
        "gcp-secretmanager",
        NAME,
        resource(project),
        "1",
    )
    assert json.loads(emulator.value(resource(project))) == VALUE == value
    assert emulator.secrets[resource(project)].labels == {
        "platform_company_com_managed-by": "kidp",
        "platform_company_com_deployment-id": "deploy-0123",
        "platform_company_com_team": "payments",
    }
    assert emulator.secrets[resource(project)].replication == {"automatic": {}}

    again_ref, again = store.ensure(NAME, Generator({"password": "different"}), TAGS)
    assert (again_ref, again) == (ref, VALUE)
    assert create.calls == 1


def test_other_tags_become_valid_labels(
    store: SecretManagerStore, emulator: SecretManagerEmulator, project: str
) -> None:
    store.ensure(NAME, Generator(VALUE), {"team": "payments", "Cost.Center": "42"})
    assert emulator.secrets[resource(project)].labels == {
        "platform_company_com_team": "payments",
        "cost_center": "42",
    }


def test_a_lost_create_race_returns_the_winners_value(
    store: SecretManagerStore, emulator: SecretManagerEmulator, project: str
) -> None:
    winner = {"username": "kidpadmin", "password": "the-first-workers-value"}
    make_store(emulator, project).ensure(NAME, Generator(winner), TAGS)
    # This worker looked just before the other worker created the secret.
    emulator.faults.append(404)
    create = Generator(VALUE)

    ref, value = store.ensure(NAME, create, TAGS)

    assert value == winner
    assert ref.version == "1"
    assert create.calls == 0
    assert json.loads(emulator.value(resource(project))) == winner
    assert len(emulator.secrets[resource(project)].versions) == 1


def test_a_winner_still_adding_its_version_makes_the_loser_wait(
    store: SecretManagerStore, emulator: SecretManagerEmulator, project: str
) -> None:
    from google.cloud import secretmanager

    # The other worker created the secret and has not added its version yet.
    secretmanager.SecretManagerServiceClient(
        credentials=AnonymousCredentials(),
        transport="rest",
        client_options={"api_endpoint": emulator.url},
    ).create_secret(
        parent=f"projects/{project}",
        secret_id=secret_id(NAME),
        secret={"replication": {"automatic": {}}},
    )
    create = Generator(VALUE)
    with pytest.raises(StoreUnavailable, match="exists but cannot be read yet") as caught:
        store.ensure(NAME, create, TAGS)
    assert isinstance(caught.value, TemporaryError)
    assert create.calls == 0

    # Still without a version a minute later: its creator died; adopt it.
    later = make_store(emulator, project, clock=lambda: time.time() + 61)
    ref, value = later.ensure(NAME, create, TAGS)
    assert (ref.version, value, create.calls) == ("1", VALUE, 1)


def test_put_version_makes_a_new_latest_version(
    store: SecretManagerStore, emulator: SecretManagerEmulator, project: str
) -> None:
    first, _ = store.ensure(NAME, Generator(VALUE), TAGS)
    rotated = {"username": "kidpadmin", "password": "R0tated-value_9876543210"}

    ref = store.put_version(NAME, rotated)

    assert (ref.id, ref.version) == (first.id, "2")
    assert json.loads(emulator.value(resource(project))) == rotated
    assert store.ensure(NAME, Generator(VALUE), TAGS) == (ref, rotated)


def test_put_version_of_a_missing_secret_is_not_found_and_shows_no_value(
    store: SecretManagerStore,
) -> None:
    with pytest.raises(NotFound) as caught:
        store.put_version(NAME, VALUE)
    assert NAME in caught.value.message
    assert VALUE["password"] not in "".join(traceback.format_exception(caught.value))


def test_delete_removes_every_version_and_is_repeatable(
    store: SecretManagerStore, emulator: SecretManagerEmulator, project: str
) -> None:
    store.ensure(NAME, Generator(VALUE), TAGS)
    store.put_version(NAME, {"password": "second"})

    store.delete(NAME)
    store.delete(NAME)

    assert resource(project) not in emulator.secrets
    fresh = {"username": "kidpadmin", "password": "a-brand-new-value-123"}
    assert store.ensure(NAME, Generator(fresh), TAGS)[1] == fresh


def test_a_secret_that_is_not_a_json_object_of_strings_is_refused(
    store: SecretManagerStore, emulator: SecretManagerEmulator, project: str
) -> None:
    store.ensure(NAME, Generator(VALUE), TAGS)
    with emulator.lock:
        emulator.secrets[resource(project)].versions.append(("now", b"plain text"))
    with pytest.raises(ProvisioningFailed, match="JSON object of strings"):
        store.ensure(NAME, Generator(VALUE), TAGS)


@pytest.mark.parametrize("status", [400, 403])
def test_refusals_are_permanent_and_never_show_the_value(
    store: SecretManagerStore, emulator: SecretManagerEmulator, status: int
) -> None:
    emulator.faults.extend([404, status])  # the read misses, the create is refused
    with pytest.raises(ProvisioningFailed) as caught:
        store.ensure(NAME, Generator(VALUE), TAGS)
    assert caught.value.message.startswith(f"Secret Manager create_secret: HTTP {status}")
    rendered = "".join(traceback.format_exception(caught.value))
    for text in (caught.value.message, repr(caught.value), rendered):
        assert VALUE["password"] not in text
    assert caught.value.__cause__ is None


@pytest.mark.parametrize("status", [429, 503])
def test_throttling_and_outages_are_temporary(
    store: SecretManagerStore, emulator: SecretManagerEmulator, status: int
) -> None:
    emulator.faults.extend([status] * 10)  # more than the client retries
    with pytest.raises(StoreUnavailable) as caught:
        store.put_version(NAME, VALUE)
    assert f"HTTP {status}" in caught.value.message
    assert VALUE["password"] not in caught.value.message


def test_check(store: SecretManagerStore, emulator: SecretManagerEmulator) -> None:
    store.check()
    emulator.faults.append(403)
    with pytest.raises(StoreUnavailable, match="list_secrets: HTTP 403"):
        store.check()


def test_check_raises_when_secret_manager_is_unreachable(project: str) -> None:
    store = SecretManagerStore(
        project, credentials=AnonymousCredentials(), endpoint=f"http://127.0.0.1:{free_port()}"
    )
    with pytest.raises(StoreUnavailable, match="no answer"):
        store.check()
