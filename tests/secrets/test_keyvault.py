"""KeyVaultSecretStore through the real azure-keyvault-secrets client and
azure-identity's DefaultAzureCredential, against the local Key Vault stand-in
(HTTPS with its own CA, challenge authentication, tokens from an App Service
style managed identity endpoint): :mod:`kidp.keyvault_emulator`."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.identity import DefaultAzureCredential
from azure.keyvault.secrets import SecretClient

from kidp.emulator import free_port
from kidp.errors import NotFound, ProvisioningFailed, StoreUnavailable
from kidp.keyvault_emulator import KeyVaultEmulator, start_keyvault
from kidp.ports import SecretStore
from kidp.secrets.keyvault import ORIGIN_TAG, STORE_NAME, KeyVaultSecretStore, vault_secret_name

NAME = "kidp/team-a/orders-db-credentials"
VAULT_NAME = "kidp--team-a--orders-db-credentials"
VALUE = {"username": "kidpadmin", "password": "Kx7vQ2mP9tR4wZ8nB3yL6hD"}
TAGS = {"managed-by": "kidp", "deployment-id": "deploy-0123", "team": "payments"}


class Generator:
    """A ``create`` callback that counts how often it is asked for a value."""

    def __init__(self, value: dict[str, str]) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> dict[str, str]:
        self.calls += 1
        return dict(self.value)


@pytest.fixture
def keyvault(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyVaultEmulator]:
    """The stand-in, with the managed identity environment azure-identity reads."""
    emulator = start_keyvault()
    for name, value in emulator.environ().items():
        if name != "REQUESTS_CA_BUNDLE":  # the store is given the CA explicitly
            monkeypatch.setenv(name, value)
    for name in (
        "AZURE_CLIENT_SECRET",
        "AZURE_CLIENT_CERTIFICATE_PATH",
        "AZURE_FEDERATED_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    yield emulator
    emulator.stop()


def open_store(keyvault: KeyVaultEmulator, **options: Any) -> KeyVaultSecretStore:
    return KeyVaultSecretStore(
        keyvault.vault_url,
        credential=DefaultAzureCredential(),
        connection_verify=str(keyvault.ca_file),
        **options,
    )


@pytest.fixture
def store(keyvault: KeyVaultEmulator) -> Iterator[KeyVaultSecretStore]:
    opened = open_store(keyvault)
    yield opened
    opened.close()


# ------------------------------------------------------------------ names


def test_broker_names_map_to_readable_vault_names_one_to_one() -> None:
    assert vault_secret_name(NAME) == VAULT_NAME
    # Parts never start, end or double a hyphen, so "--" only ever separates.
    assert vault_secret_name("kidp/a-b/c") != vault_secret_name("kidp/a/b-c")
    odd = [
        "kidp/a--b/c",
        "kidp/a/b--c",
        "kidp/Team/Db",
        "kidp/team/db/",
        "x" * 200,
        "kidp/ünïcode/db",
        "///",
    ]
    mapped = [vault_secret_name(n) for n in odd]
    assert len(set(mapped)) == len(odd)
    for name in [*mapped, VAULT_NAME]:
        assert re.fullmatch(r"[0-9a-zA-Z-]{1,127}", name), name
    for name in mapped:
        assert re.search(r"---[0-9a-f]{16}$", name), name
        assert "---" not in VAULT_NAME


# ------------------------------------------------------------------ ensure


def test_ensure_creates_once_and_then_returns_the_stored_value(
    store: KeyVaultSecretStore, keyvault: KeyVaultEmulator
) -> None:
    port: SecretStore = store
    create = Generator(VALUE)
    ref, value = port.ensure(NAME, create, TAGS)

    [stored] = keyvault.versions(VAULT_NAME)
    assert value == VALUE == json.loads(stored["value"])
    assert (ref.store, ref.name, ref.version) == (STORE_NAME, VAULT_NAME, stored["version"])
    assert ref.id == f"{keyvault.vault_url}secrets/{VAULT_NAME}/{stored['version']}"
    assert stored["content_type"] == "application/json"
    assert stored["tags"] == {
        "platform.company.com_managed-by": "kidp",
        "platform.company.com_deployment-id": "deploy-0123",
        "platform.company.com_team": "payments",
        ORIGIN_TAG: "create",
    }
    again_ref, again = store.ensure(NAME, Generator({"password": "different"}), TAGS)
    assert (again_ref, again) == (ref, VALUE)
    assert create.calls == 1
    assert len(keyvault.versions(VAULT_NAME)) == 1


def test_the_client_is_challenged_and_uses_a_managed_identity_token(
    store: KeyVaultSecretStore, keyvault: KeyVaultEmulator
) -> None:
    store.ensure(NAME, Generator(VALUE), TAGS)
    first, *rest = keyvault.requests
    assert first[2] is False  # the challenge round trip
    assert rest and all(authorized for _, _, authorized in rest)


def test_racing_creators_all_get_the_first_value(keyvault: KeyVaultEmulator) -> None:
    stores = [open_store(keyvault) for _ in range(3)]
    barrier = threading.Barrier(len(stores))
    results: list[Any] = [None] * len(stores)

    def provision(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].ensure(NAME, Generator({**VALUE, "password": f"p{i}"}), TAGS)

    threads = [threading.Thread(target=provision, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    values = {json.dumps(value) for _, value in results}
    refs = {ref for ref, _ in results}
    assert len(values) == 1 and len(refs) == 1, results
    [(ref, value)] = {(r, json.dumps(v)) for r, v in results}
    versions = keyvault.versions(VAULT_NAME)
    winner = next(v for v in versions if v["version"] == ref.version)
    assert json.loads(winner["value"]) == json.loads(value)
    # The losers' versions are out of use, and the newest version holds the
    # winner's value, so the unversioned secret is right too.
    assert all(v["enabled"] is False for v in versions if v["value"] != winner["value"])
    assert versions[-1]["value"] == winner["value"] and versions[-1]["enabled"]
    # Later readers agree.
    assert stores[0].ensure(NAME, Generator(VALUE), TAGS)[1] == json.loads(value)
    for opened in stores:
        opened.close()


# ------------------------------------------------------------------ rotation and delete


def test_put_version_rotates_and_keeps_the_tags(
    store: KeyVaultSecretStore, keyvault: KeyVaultEmulator
) -> None:
    first, _ = store.ensure(NAME, Generator(VALUE), TAGS)
    rotated = {"username": "kidpadmin", "password": "R0tatedValue9876543210"}
    ref = store.put_version(NAME, rotated)
    assert ref.version != first.version and ref.name == VAULT_NAME
    latest = keyvault.versions(VAULT_NAME)[-1]
    assert latest["tags"]["platform.company.com_team"] == "payments"
    assert latest["tags"][ORIGIN_TAG] == "rotate"
    # A retried provision now reads the rotated value.
    assert store.ensure(NAME, Generator(VALUE), TAGS) == (ref, rotated)
    with pytest.raises(NotFound):
        store.put_version("kidp/team-a/never-credentials", rotated)


def test_delete_is_idempotent_and_a_new_deployment_of_the_name_gets_its_own_value(
    store: KeyVaultSecretStore, keyvault: KeyVaultEmulator
) -> None:
    store.delete(NAME)  # absent: fine
    store.ensure(NAME, Generator(VALUE), TAGS)
    store.delete(NAME)
    assert keyvault.deleted(VAULT_NAME)  # purge protection: soft-deleted until retention ends
    store.delete(NAME)
    # Provisioning the same name again (a new deployment) recovers the name,
    # which purge protection leaves no other way to reuse, but never hands the
    # finished deployment's password to the new one.
    fresh = {"username": "kidpadmin", "password": "FreshPassword0123456789"}
    create = Generator(fresh)
    ref, value = store.ensure(NAME, create, TAGS)
    assert value == fresh and create.calls == 1
    assert not keyvault.deleted(VAULT_NAME)
    old, new = keyvault.versions(VAULT_NAME)
    assert json.loads(old["value"]) == VALUE and old["enabled"] is False
    assert json.loads(new["value"]) == fresh and new["enabled"] is True
    assert new["tags"][ORIGIN_TAG] == "create"
    assert ref.version == new["version"]
    # The new value is live now: a retried provision reuses it.
    retry = Generator({"username": "kidpadmin", "password": "NeverUsed"})
    assert store.ensure(NAME, retry, TAGS) == (ref, fresh)
    assert retry.calls == 0
    assert len(keyvault.versions(VAULT_NAME)) == 2


def raw_client(keyvault: KeyVaultEmulator) -> SecretClient:
    """A client of the stand-in outside the store (another tool, a crashed worker)."""
    return SecretClient(
        keyvault.vault_url,
        DefaultAzureCredential(),
        connection_verify=str(keyvault.ca_file),
        verify_challenge_resource=False,
    )


def test_a_retried_ensure_after_a_recovery_never_gets_the_old_value(
    store: KeyVaultSecretStore, keyvault: KeyVaultEmulator
) -> None:
    store.ensure(NAME, Generator(VALUE), TAGS)
    store.delete(NAME)
    # A worker recovered the name and died before writing its value.
    client = raw_client(keyvault)
    client.begin_recover_deleted_secret(VAULT_NAME, _polling_interval=0).wait()
    assert not keyvault.deleted(VAULT_NAME)
    fresh = {"username": "kidpadmin", "password": "AfterTheCrash0123456789"}
    ref, value = store.ensure(NAME, Generator(fresh), TAGS)
    assert value == fresh
    assert store.ensure(NAME, Generator(VALUE), TAGS) == (ref, fresh)
    assert [v["enabled"] for v in keyvault.versions(VAULT_NAME)] == [False, True]
    client.close()


def test_a_secret_deleted_with_versions_in_use_is_recovered_without_them(
    store: KeyVaultSecretStore, keyvault: KeyVaultEmulator
) -> None:
    store.ensure(NAME, Generator(VALUE), TAGS)
    store.put_version(NAME, {"username": "kidpadmin", "password": "RotatedBeforeDelete1"})
    # Deleted without the store (by hand, or by an older broker): versions enabled.
    client = raw_client(keyvault)
    client.begin_delete_secret(VAULT_NAME, _polling_interval=0).wait()
    client.close()
    fresh = {"username": "kidpadmin", "password": "NotTheOldOne0123456789"}
    ref, value = store.ensure(NAME, Generator(fresh), TAGS)
    assert value == fresh
    versions = keyvault.versions(VAULT_NAME)
    assert [v["enabled"] for v in versions] == [False, False, True]
    assert ref.version == versions[-1]["version"]
    assert store.ensure(NAME, Generator(VALUE), TAGS) == (ref, fresh)


def test_racing_creators_of_a_soft_deleted_name_all_get_one_new_value(
    store: KeyVaultSecretStore, keyvault: KeyVaultEmulator
) -> None:
    store.ensure(NAME, Generator(VALUE), TAGS)
    store.delete(NAME)
    stores = [open_store(keyvault) for _ in range(3)]
    barrier = threading.Barrier(len(stores))
    results: list[Any] = [None] * len(stores)

    def provision(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].ensure(NAME, Generator({**VALUE, "password": f"p{i}"}), TAGS)

    threads = [threading.Thread(target=provision, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({(ref, json.dumps(value)) for ref, value in results}) == 1, results
    ref, value = results[0]
    assert value != VALUE and value["password"] in {"p0", "p1", "p2"}
    assert store.ensure(NAME, Generator(VALUE), TAGS) == (ref, value)
    for opened in stores:
        opened.close()


class _BeingRecovered:
    """A reply as Key Vault gives it while a recovery is still finishing."""

    status_code = 409
    reason = "Conflict"
    headers: dict[str, str] = {}

    def text(self) -> str:
        return json.dumps(
            {
                "error": {
                    "code": "Conflict",
                    "message": "Secret is currently being recovered; retry later.",
                    "innererror": {"code": "ObjectIsBeingRecovered"},
                }
            }
        )


def test_a_name_still_being_recovered_is_retried_later(
    store: KeyVaultSecretStore, keyvault: KeyVaultEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def being_recovered(*args: Any, **kwargs: Any) -> Any:
        raise HttpResponseError(response=_BeingRecovered())  # type: ignore[arg-type]

    monkeypatch.setattr(store._client, "set_secret", being_recovered)
    with pytest.raises(StoreUnavailable) as raised:
        store.ensure(NAME, Generator(VALUE), TAGS)
    assert "ObjectIsBeingRecovered" in raised.value.message
    assert keyvault.versions(VAULT_NAME) == []


def test_without_purge_protection_a_deleted_secret_is_purged() -> None:
    emulator = start_keyvault(purge_protection=False)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in emulator.environ().items():
                patch.setenv(name, value)
            store = open_store(emulator)
            store.ensure(NAME, Generator(VALUE), TAGS)
            store.delete(NAME)
            assert not emulator.deleted(VAULT_NAME)
            assert emulator.versions(VAULT_NAME) == []
            fresh = {"username": "kidpadmin", "password": "fresh"}
            assert store.ensure(NAME, Generator(fresh), TAGS)[1] == fresh
            store.close()
    finally:
        emulator.stop()


# ------------------------------------------------------------------ errors


def impatient_store(keyvault: KeyVaultEmulator, url: str | None = None) -> KeyVaultSecretStore:
    """A store whose client does not retry (the store's own client would wait
    out its backoff first)."""
    client = SecretClient(
        url or keyvault.vault_url,
        DefaultAzureCredential(),
        connection_verify=str(keyvault.ca_file),
        verify_challenge_resource=False,
        retry_total=0,
    )
    return KeyVaultSecretStore(client=client)


def test_throttling_is_temporary_with_the_vaults_wait(keyvault: KeyVaultEmulator) -> None:
    store = impatient_store(keyvault)
    store.check()
    keyvault.fail_next(429, "Throttled", retry_after="7")
    with pytest.raises(StoreUnavailable) as raised:
        store.ensure(NAME, Generator(VALUE), TAGS)
    assert "HTTP 429 Throttled" in raised.value.message
    assert raised.value.retry_after == 7.0


def test_a_refusal_is_permanent_and_never_shows_the_value(
    store: KeyVaultSecretStore, keyvault: KeyVaultEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keyvault.fail_next(403, "Forbidden")
    with pytest.raises(ProvisioningFailed) as raised:
        store.ensure(NAME, Generator(VALUE), TAGS)
    assert raised.value.message.startswith("Key Vault ")
    assert "403 Forbidden" in raised.value.message
    # The health check calls a refused vault unavailable.
    keyvault.fail_next(403, "Forbidden")
    with pytest.raises(StoreUnavailable):
        store.check()
    store.ensure(NAME, Generator(VALUE), TAGS)
    store.put_version(NAME, {"username": "u", "password": "RotatedSecretValue1"})
    for text in (caplog.text, str(raised.value), repr(raised.value.details)):
        assert VALUE["password"] not in text
        assert "RotatedSecretValue1" not in text


def test_an_unreachable_vault_is_unavailable(keyvault: KeyVaultEmulator) -> None:
    store = impatient_store(keyvault, f"https://127.0.0.1:{free_port()}/")
    with pytest.raises(StoreUnavailable):
        store.check()
    with pytest.raises(StoreUnavailable):
        store.ensure(NAME, Generator(VALUE), TAGS)


def test_without_a_token_the_vault_is_unavailable(
    keyvault: KeyVaultEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-header")
    store = open_store(keyvault)
    with pytest.raises(StoreUnavailable):
        store.check()
    assert keyvault.versions(VAULT_NAME) == []
