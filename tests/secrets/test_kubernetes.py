"""The Kubernetes Secret store through the real ``kubernetes`` client against
the Kubernetes API stand-in: the SecretStore port's semantics, name mapping,
races, and no value ever in a message."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tests.providers.onprem.support import kube_client

from kidp.errors import NotFound, ProvisioningFailed, StoreUnavailable, ValidationFailed
from kidp.kube_emulator import KubeEmulator
from kidp.providers.onprem import decode_secret
from kidp.secrets.kubernetes import KubernetesSecretStore

NAME = "kidp/team-platform/app-db-credentials"
TAGS = {
    "managed-by": "kidp",
    "deployment-id": "deploy-" + "ab" * 16,
    "resource-uid": "550e8400-e29b-41d4-a716-446655440000",
    "team": "platform-team",
    "application": "app-db",
}


@pytest.fixture
def store(kubeconfig: Path) -> KubernetesSecretStore:
    return KubernetesSecretStore(api_client=kube_client(kubeconfig))


def value(password: str = "first-password-0123456789") -> dict[str, str]:
    return {"username": "kidpadmin", "password": password, "engine": "postgresql"}


def test_ensure_creates_the_secret_in_the_deployments_namespace(
    emulator: KubeEmulator, store: KubernetesSecretStore
) -> None:
    ref, got = store.ensure(NAME, value, TAGS)
    assert got == value()
    assert ref.store == "kubernetes-secret"
    assert ref.name == NAME
    assert ref.id == "team-platform/app-db-credentials"
    assert ref.version
    secret = emulator.get_object("v1", "secrets", "app-db-credentials", "team-platform")
    assert secret is not None
    assert decode_secret(secret) == value()
    labels = secret["metadata"]["labels"]
    assert labels["platform.company.com/deployment-id"] == TAGS["deployment-id"]
    assert labels["platform.company.com/managed-by"] == "kidp"
    namespace = emulator.get_object("v1", "namespaces", "team-platform")
    assert namespace is not None
    assert namespace["metadata"]["labels"]["platform.company.com/managed-by"] == "kidp"


def test_ensure_never_regenerates_an_existing_value(store: KubernetesSecretStore) -> None:
    store.ensure(NAME, value, TAGS)

    def must_not_run() -> dict[str, str]:
        raise AssertionError("create() called for an existing secret")

    _ref, got = store.ensure(NAME, must_not_run, TAGS)
    assert got == value()


def test_a_racing_creator_wins_and_the_loser_reads_its_value(
    emulator: KubeEmulator, store: KubernetesSecretStore
) -> None:
    emulator.create_namespace("team-platform")

    def lose_the_race() -> dict[str, str]:
        # Another worker creates the Secret after our look, before our create.
        emulator.create_object(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "app-db-credentials",
                    "namespace": "team-platform",
                    "labels": {"platform.company.com/managed-by": "kidp"},
                },
                "stringData": value("the-winners-password-42"),
            }
        )
        return value("the-losers-password-17")

    _, got = store.ensure(NAME, lose_the_race, TAGS)
    assert got["password"] == "the-winners-password-42"


def test_put_version_sets_keys_keeps_others_and_remembers_the_previous_password(
    emulator: KubeEmulator, store: KubernetesSecretStore
) -> None:
    first, _ = store.ensure(NAME, value, TAGS)
    # The provider adds connection details to the same Secret.
    emulator.create_object(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "unrelated", "namespace": "team-platform"},
        }
    )
    store.put_version(NAME, {"host": "app-db.team-platform.svc.cluster.local"})
    ref = store.put_version(NAME, value("second-password-9876543210"))
    assert ref.version != first.version
    _, got = store.ensure(NAME, value, {})
    assert got == {
        **value("second-password-9876543210"),
        "host": "app-db.team-platform.svc.cluster.local",
        "previous-password": "first-password-0123456789",
    }


def test_put_version_of_an_absent_secret_is_not_found(store: KubernetesSecretStore) -> None:
    with pytest.raises(NotFound):
        store.put_version(NAME, value())


def test_delete_removes_and_deleting_an_absent_secret_succeeds(
    emulator: KubeEmulator, store: KubernetesSecretStore
) -> None:
    store.ensure(NAME, value, TAGS)
    store.delete(NAME)
    assert emulator.get_object("v1", "secrets", "app-db-credentials", "team-platform") is None
    store.delete(NAME)
    store.delete("kidp/no-such-namespace/anything")


def test_a_secret_the_broker_did_not_make_is_never_handed_out(
    emulator: KubeEmulator, store: KubernetesSecretStore
) -> None:
    emulator.create_namespace("team-platform")
    emulator.create_object(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "app-db-credentials", "namespace": "team-platform"},
            "stringData": {"password": "someone-elses-password"},
        }
    )
    with pytest.raises(ProvisioningFailed, match="was not created by the broker") as refused:
        store.ensure(NAME, value, TAGS)
    assert "someone-elses-password" not in refused.value.message


def test_names_map_to_namespace_and_secret_with_the_shared_prefix(kubeconfig: Path) -> None:
    store = KubernetesSecretStore(kubeconfig=str(kubeconfig), namespace_prefix="kidp-")
    assert store.locate(NAME) == ("kidp-team-platform", "app-db-credentials")
    assert store.locate("team-web/api-token") == ("kidp-team-web", "api-token")
    for bad in ("just-a-name", "kidp/Team_Platform/x", "kidp/team/UPPER"):
        with pytest.raises(ValidationFailed):
            store.locate(bad)


def test_check_reports_an_unavailable_api(
    emulator: KubeEmulator, store: KubernetesSecretStore, kubeconfig: Path
) -> None:
    store.check()
    emulator.stop()
    with pytest.raises(StoreUnavailable, match="cannot reach the Kubernetes API"):
        KubernetesSecretStore(kubeconfig=str(kubeconfig), request_timeout=2).check()


def test_a_failing_api_is_temporary_and_no_value_reaches_logs_or_errors(
    emulator: KubeEmulator, store: KubernetesSecretStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.fail_next(1, 503, methods=["POST"], resource="secrets")
    secret_value = value("never-in-a-message-31415")
    with pytest.raises(StoreUnavailable) as unavailable:
        store.ensure(NAME, lambda: secret_value, TAGS)
    assert unavailable.value.retry_after > 0
    # An object the API refuses (422: a label value it does not accept) is
    # reported with the API's message and without the values.
    with pytest.raises(ProvisioningFailed) as refused:
        store.ensure(NAME, lambda: secret_value, {**TAGS, "team": "not a label value!"})
    assert "422" in refused.value.message
    seen = unavailable.value.message + refused.value.message + caplog.text
    assert "never-in-a-message-31415" not in seen
    _, got = store.ensure(NAME, lambda: secret_value, TAGS)
    assert got == secret_value


def test_the_store_and_the_provider_share_one_secret(
    emulator: KubeEmulator, store: KubernetesSecretStore, kubeconfig: Path
) -> None:
    from kidp.ports import Credentials
    from kidp.providers.onprem import KubernetesProvider

    _, got = store.ensure(NAME, value, TAGS)
    provider = KubernetesProvider(api_client=store.api.api_client)
    from kidp.models import DeletionPolicy, Deployment, ResourceSpec, ResourceType

    dep = Deployment(
        id=TAGS["deployment-id"],
        namespace="team-platform",
        resource_type=ResourceType.DATABASE,
        resource_name="app-db",
        team="platform-team",
        owner="owner@example.com",
        application="app-db",
        resource_uid=TAGS["resource-uid"],
        callback_url=None,
        spec=ResourceSpec(engine="postgresql", version="15", size="small", storage_gb=20),
        spec_fingerprint="x",
        deletion_policy=DeletionPolicy.DELETE,
        provider="onprem",
        region="test",
    )
    provider.deploy(dep, TAGS, Credentials(username=got["username"], password=got["password"]))
    (secret,) = emulator.objects("v1", "secrets", "team-platform")
    assert secret["metadata"]["name"] == "app-db-credentials"
    _, again = store.ensure(NAME, value, {})
    assert again["password"] == got["password"]
    assert again["host"] == "app-db.team-platform.svc.cluster.local"
