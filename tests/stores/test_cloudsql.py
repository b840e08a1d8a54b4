"""What only the Cloud SQL store has: its URL, the connector's way in (SQL
Admin API, ephemeral certificate, IAM login, mTLS to the instance's proxy) and
how its failures surface. The behaviour every store shares runs through the
same connector in ``test_contract.py`` (backend ``cloudsql``).

Everything goes through the real ``cloud-sql-python-connector`` and pg8000
against the stand-in of :mod:`kidp.cloudsql_emulator`, in front of this
machine's PostgreSQL.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from tests.stores.cloudsql_backend import CloudSqlDatabase, cloudsql_database, cloudsql_emulator

from kidp.cloudsql_emulator import SERVER_PROXY_PORT, CloudSqlEmulator, start_cloudsql_emulator
from kidp.errors import StoreUnavailable, ValidationFailed
from kidp.stores.cloudsql import CloudSqlDeploymentStore, CloudSqlTarget, parse_cloudsql_url

__all__ = ["cloudsql_database", "cloudsql_emulator"]  # fixtures, imported for pytest

INSTANCE = "my-proj:europe-west1:kidp"


# ----------------------------------------------------------------------- URL


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+cloudsql://kidp-broker%40my-proj.iam.gserviceaccount.com@/kidp?instance={INSTANCE}",
        f"postgresql+cloudsql://kidp-broker@my-proj.iam.gserviceaccount.com@/kidp?instance={INSTANCE}",
    ],
    ids=["escaped", "raw"],
)
def test_the_url_names_the_iam_user_the_database_and_the_instance(url: str) -> None:
    assert parse_cloudsql_url(url) == CloudSqlTarget(
        user="kidp-broker@my-proj.iam.gserviceaccount.com",
        database="kidp",
        instance=INSTANCE,
        ip_type="PUBLIC",
    )
    private = parse_cloudsql_url(url + "&ip_type=private")
    assert private.ip_type == "PRIVATE"
    assert private.max_connections is None
    assert parse_cloudsql_url(url + "&max_connections=3").max_connections == 3


@pytest.mark.parametrize(
    ("url", "needs"),
    [
        (f"postgresql+cloudsql:///kidp?instance={INSTANCE}", "the IAM user"),
        (f"postgresql+cloudsql://u:secret@/kidp?instance={INSTANCE}", "the IAM user"),
        (f"postgresql+cloudsql://u@db.example.com/kidp?instance={INSTANCE}", "no host"),
        (f"postgresql+cloudsql://u@/?instance={INSTANCE}", "the database"),
        ("postgresql+cloudsql://u@/kidp?instance=my-proj:kidp", "?instance="),
        (f"postgresql+cloudsql://u@/kidp?instance={INSTANCE}&ip_type=vpn", "ip_type"),
        (f"postgresql+cloudsql://u@/kidp?instance={INSTANCE}&max_connections=0", "max_conn"),
        (f"postgresql+cloudsql://u@/kidp?instance={INSTANCE}&max_connections=a", "max_conn"),
    ],
)
def test_a_url_that_lacks_something_says_what(url: str, needs: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_cloudsql_url(url)
    assert needs in caught.value.message
    assert "secret" not in caught.value.message


# ---------------------------------------------------------------- the way in


pytestmark = pytest.mark.postgres


def test_connects_as_the_iam_user_with_an_ephemeral_certificate(
    cloudsql_database: CloudSqlDatabase, cloudsql_emulator: CloudSqlEmulator
) -> None:
    store = CloudSqlDeploymentStore(
        cloudsql_database.url, admin_endpoint=cloudsql_database.admin_endpoint
    )
    try:
        store.check()
        with store.engine.connect() as conn:
            user = conn.exec_driver_sql("SELECT current_user").scalar()
        assert user == cloudsql_database.database_user
    finally:
        store.close()
    # IAM login: the certificate request carried an OAuth token, no password was sent.
    assert (cloudsql_database.instance, True) in cloudsql_emulator.admin.ephemeral_certs
    assert cloudsql_emulator.proxy.connections >= 1


def test_max_connections_caps_the_pool_with_no_overflow(
    cloudsql_database: CloudSqlDatabase,
) -> None:
    """What infra/gcp counts against the instance's max_connections: a
    process with the URL's cap never opens more than that."""
    store = CloudSqlDeploymentStore(
        cloudsql_database.url + "&max_connections=3",
        admin_endpoint=cloudsql_database.admin_endpoint,
    )
    default = CloudSqlDeploymentStore(
        cloudsql_database.url, admin_endpoint=cloudsql_database.admin_endpoint
    )
    try:
        pool = store.engine.pool
        assert isinstance(pool, sa.pool.QueuePool)
        assert (pool.size(), pool._max_overflow) == (3, 0)
        held = [store.engine.connect() for _ in range(3)]
        assert pool.checkedout() == 3 and pool.overflow() == 0
        for conn in held:
            conn.close()
        fallback = default.engine.pool
        assert isinstance(fallback, sa.pool.QueuePool)
        assert (fallback.size(), fallback._max_overflow) == (2, 2)
    finally:
        store.close()
        default.close()


def test_bootstrap_builds_it_from_the_store_url(
    cloudsql_database: CloudSqlDatabase,
) -> None:
    from kidp.bootstrap import build_store
    from kidp.settings import Settings

    store = build_store(
        Settings(
            store_url=cloudsql_database.url, gcp_sqladmin_endpoint=cloudsql_database.admin_endpoint
        )
    )
    try:
        assert isinstance(store, CloudSqlDeploymentStore)
        store.check()
    finally:
        store.close()


def test_an_unknown_instance_is_a_store_outage_that_names_it(
    cloudsql_database: CloudSqlDatabase,
) -> None:
    url = cloudsql_database.url.replace(cloudsql_database.instance, "kidp-test:us-central1:gone")
    with pytest.raises(StoreUnavailable) as caught:
        CloudSqlDeploymentStore(url, admin_endpoint=cloudsql_database.admin_endpoint)
    assert caught.value.message == "the database is unavailable (OperationalError); try again"
    cause = str(caught.value.__cause__)
    assert "HTTP 404" in cause and "kidp-test:us-central1:gone" in cause


def test_an_admin_api_refusal_is_temporary_and_the_store_recovers(
    cloudsql_database: CloudSqlDatabase, cloudsql_emulator: CloudSqlEmulator
) -> None:
    store = CloudSqlDeploymentStore(
        cloudsql_database.url, admin_endpoint=cloudsql_database.admin_endpoint
    )
    try:
        store.engine.dispose()  # the next call needs a new connection, hence the Admin API
        store._connector.close()
        store._connector = _fresh_connector(cloudsql_database.admin_endpoint)
        cloudsql_emulator.admin.outage = (
            429  # a 5xx would be retried by the connector for seconds first
        )
        with pytest.raises(StoreUnavailable) as caught:
            store.check()
        assert "HTTP 429" in str(caught.value.__cause__)
        cloudsql_emulator.admin.outage = None
        store.check()
    finally:
        cloudsql_emulator.admin.outage = None
        store.close()


def _fresh_connector(endpoint: str) -> object:
    from google.cloud.sql.connector import Connector, RefreshStrategy

    from kidp.providers.gcp.endpoints import StandInCredentials

    return Connector(
        enable_iam_auth=True,
        credentials=StandInCredentials(),
        sqladmin_api_endpoint=endpoint,
        refresh_strategy=RefreshStrategy.LAZY,
    )


# ------------------------------------------------------------ the stand-in


def test_the_instance_proxy_refuses_a_client_without_an_ephemeral_certificate(
    cloudsql_emulator: CloudSqlEmulator,
) -> None:
    refused = cloudsql_emulator.proxy.refused
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    address = (cloudsql_emulator.address, SERVER_PROXY_PORT)
    # TLS 1.3 reports the missing client certificate after the handshake: the
    # first read fails or finds the connection closed, never a byte of PostgreSQL.
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        socket.create_connection(address, timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
        assert tls.recv(1) == b""
        raise ConnectionError("closed without a byte")
    assert cloudsql_emulator.proxy.refused == refused + 1


def test_a_second_stand_in_takes_port_3307_on_another_loopback_address(
    cloudsql_database: CloudSqlDatabase, cloudsql_emulator: CloudSqlEmulator
) -> None:
    second = start_cloudsql_emulator(instances=(cloudsql_database.instance,))
    try:
        assert second.address != cloudsql_emulator.address
        assert second.address.startswith("127.")
        store = CloudSqlDeploymentStore(cloudsql_database.url, admin_endpoint=second.url)
        try:
            store.check()
        finally:
            store.close()
        assert second.proxy.connections >= 1
    finally:
        second.stop()


def test_certificates_stay_in_memory_and_a_temporary_folder() -> None:
    # The stand-in writes its server key only below the system's temporary folder.
    emulator = start_cloudsql_emulator()
    try:
        folder = Path(emulator.proxy._directory.name)
        assert folder.is_relative_to(Path(tempfile.gettempdir()))
    finally:
        emulator.stop()
    assert not folder.exists()
