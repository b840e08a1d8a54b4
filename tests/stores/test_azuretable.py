"""What only the Table Storage store has: its URL, its partitions and
indexes, crashes between an index entry and its transaction, large records,
keys from free text and error mapping. The behaviour every store shares is in
``test_contract.py`` (it runs there on Azurite too)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from azure.data.tables import TableClient, TableServiceClient, TableTransactionError
from tests.azuretools import FaultyTransport, batches_after, is_batch
from tests.conftest import azure_name

from kidp.emulator import free_port
from kidp.errors import (
    ConcurrentUpdate,
    DuplicateDeployment,
    NotFound,
    StoreUnavailable,
    ValidationFailed,
)
from kidp.models import CallbackEvent, Deployment, Phase, ResourceType, utcnow
from kidp.providers.azure.dataplane import parse_storage_url
from kidp.stores.azuretable import TableDeploymentStore

pytestmark = pytest.mark.azurite

Make = Callable[..., Deployment]


@pytest.fixture
def table_name(azurite: Any) -> str:
    name = azure_name("t")
    TableServiceClient.from_connection_string(azurite.connection_string).create_table(name)
    return name


@pytest.fixture
def faulty(azurite: Any, table_name: str) -> tuple[TableDeploymentStore, FaultyTransport]:
    """A store whose transport refuses what the test says, without retries."""
    transport = FaultyTransport()
    client = TableClient.from_connection_string(
        azurite.connection_string, table_name, transport=transport, retry_total=0
    )
    return TableDeploymentStore(client, owns_client=True), transport


def entities(azurite: Any, table: str, partition: str) -> dict[str, dict[str, Any]]:
    """What a partition holds, read with a client of the test's own."""
    client = TableClient.from_connection_string(azurite.connection_string, table)
    found = client.query_entities("PartitionKey eq @pk", parameters={"pk": partition})
    return {str(e["RowKey"]): dict(e) for e in found}


def event_for(deployment: Deployment, **changes: Any) -> CallbackEvent:
    return CallbackEvent(
        id=f"msg_{deployment.id[7:]}{len(changes)}",
        deployment_id=deployment.id,
        url="https://ci.example.com/hook",
        payload={"phase": deployment.phase.value},
        **changes,
    )


# ------------------------------------------------------------------ URLs


def test_urls_name_an_account_and_a_table() -> None:
    location = parse_storage_url("azuretable://kidpstate/deployments", service="table")
    assert (location.account, location.name, location.endpoint) == (
        "kidpstate",
        "deployments",
        "https://kidpstate.table.core.windows.net",
    )
    sovereign = parse_storage_url(
        "azuretable://kidpstate.table.core.chinacloudapi.cn/kidp", service="table"
    )
    assert sovereign.endpoint == "https://kidpstate.table.core.chinacloudapi.cn"
    for bad in (
        "azuretable://kidpstate",
        "azuretable://kidpstate/a/b",
        "azuretable://Kidp_State/deployments",
        "azuretable://kidpstate/1table",
        "azuretable://user:key@kidpstate/deployments",
        "azurequeue://kidpstate/deployments",
    ):
        with pytest.raises(ValidationFailed):
            parse_storage_url(bad, service="table")


def test_a_connection_string_for_another_account_is_refused() -> None:
    string = "DefaultEndpointsProtocol=https;AccountName=other;AccountKey=c2VjcmV0;"
    with pytest.raises(ValidationFailed) as raised:
        TableDeploymentStore.from_url("azuretable://kidpstate/kidp", connection_string=string)
    assert "other" in raised.value.message
    assert "c2VjcmV0" not in raised.value.message
    store = TableDeploymentStore.from_url(
        "azuretable://devstoreaccount1/kidp", connection_string="UseDevelopmentStorage=true"
    )
    assert store.table_name == "kidp"
    store.close()


# ------------------------------------------------------------------ partitions


def test_a_deployment_and_its_events_share_the_namespace_partition(
    azure_table_store: TableDeploymentStore, azurite: Any, make: Make
) -> None:
    d = azure_table_store.create(make(request_id="req-1"))
    started = d.evolve(phase=Phase.PROVISIONING)
    event = event_for(started)
    azure_table_store.save(started, expected_version=0, events=[event])
    rows = entities(azurite, azure_table_store.table_name, "ns|team-a")
    assert set(rows) == {
        f"dep|{d.id}",
        f"evt|{d.id}|{event.id}",
        "slot|database|orders-db",
        next(k for k in rows if k.startswith("req|")),
        "counter",
    }
    assert rows["counter"]["provisioning"] == 1
    assert rows["slot|database|orders-db"]["deploymentId"] == d.id
    # The request id is a caller's text: hashed in the key, kept as a property.
    claim = next(v for k, v in rows.items() if k.startswith("req|"))
    assert claim["requestId"] == "req-1"
    index = entities(azurite, azure_table_store.table_name, f"deployment|{d.id}")
    assert index["index"]["namespace"] == "team-a"


def test_request_ids_and_names_with_characters_keys_refuse(
    azure_table_store: TableDeploymentStore, make: Make
) -> None:
    request_id = "ci/run#42?attempt=1\\x"
    d = azure_table_store.create(make(request_id=request_id))
    assert azure_table_store.find_by_request_id("team-a", request_id) == d
    event = event_for(d).model_copy(update={"id": "evt/with#odd?chars"})
    azure_table_store.save(d.evolve(message="x"), expected_version=0, events=[event])
    assert azure_table_store.get_event(event.id) == event


def test_a_record_larger_than_a_string_property_round_trips(
    azure_table_store: TableDeploymentStore, make: Make
) -> None:
    d = azure_table_store.create(make(message="m" * 100_000))
    assert azure_table_store.get(d.id) == d
    assert azure_table_store.list(namespace="team-a") == [d]


def test_list_without_a_namespace_reads_every_namespace(
    azure_table_store: TableDeploymentStore, make: Make
) -> None:
    a = azure_table_store.create(make(namespace="team-a"))
    b = azure_table_store.create(make(namespace="team-b"))
    c = azure_table_store.create(make(namespace="team-c", phase=Phase.READY))
    assert azure_table_store.list() == [a, b, c]
    assert azure_table_store.list(phases=[Phase.READY, Phase.FAILED]) == [c]
    assert azure_table_store.count_by_phase()[Phase.PENDING] == 2


def index_rows(azurite: Any, table: str) -> list[str]:
    """The partitions of every ``deployment|<id>`` index entry."""
    client = TableClient.from_connection_string(azurite.connection_string, table)
    found = client.query_entities(
        "PartitionKey ge @lo and PartitionKey lt @hi",
        parameters={"lo": "deployment|", "hi": "deployment}"},
        select=["PartitionKey"],
    )
    return sorted(str(e["PartitionKey"]) for e in found)


def test_a_refused_duplicate_create_leaves_no_index_entry(
    azure_table_store: TableDeploymentStore, azurite: Any, make: Make
) -> None:
    table = azure_table_store.table_name
    first = azure_table_store.create(make(request_id="req-1"))
    assert index_rows(azurite, table) == [f"deployment|{first.id}"]
    for duplicate in (make(), make("other-name", request_id="req-1")):  # the name, the request
        with pytest.raises(DuplicateDeployment) as caught:
            azure_table_store.create(duplicate)
        assert caught.value.existing.id == first.id
        assert azure_table_store.get(duplicate.id) is None
    assert index_rows(azurite, table) == [f"deployment|{first.id}"]
    # The same id again is the deployment itself: its entry stays.
    with pytest.raises(DuplicateDeployment):
        azure_table_store.create(first)
    assert index_rows(azurite, table) == [f"deployment|{first.id}"]
    assert azure_table_store.get(first.id) == first


def naming_no_operation(store: TableDeploymentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every refused transaction of ``store`` name no operation: the SDK
    then reports index 0, whichever operation was refused."""
    submit = store._table.submit_transaction

    def without_index(*args: Any, **kwargs: Any) -> Any:
        try:
            return submit(*args, **kwargs)
        except TableTransactionError as error:
            error.index = 0
            raise

    monkeypatch.setattr(store._table, "submit_transaction", without_index)


def test_a_refused_slot_with_no_operation_index_is_a_duplicate_not_a_stale_version(
    azure_table_store: TableDeploymentStore, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = azure_table_store.create(make(phase=Phase.FAILED))
    holder = azure_table_store.create(make())
    naming_no_operation(azure_table_store, monkeypatch)
    with pytest.raises(DuplicateDeployment) as caught:
        azure_table_store.save(old.evolve(phase=Phase.PENDING), expected_version=old.version)
    assert caught.value.existing.id == holder.id
    # A deployment that did change is still stale.
    azure_table_store.save(old.evolve(message="moved on"), expected_version=old.version)
    with pytest.raises(ConcurrentUpdate):
        azure_table_store.save(old.evolve(message="late"), expected_version=old.version)


def test_a_busy_counter_with_no_operation_index_is_tried_again_not_a_stale_version(
    azure_table_store: TableDeploymentStore,
    azurite: Any,
    make: Make,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = azure_table_store.create(make())
    other = TableClient.from_connection_string(
        azurite.connection_string, azure_table_store.table_name
    )
    # Another writer moves the namespace counter between our read and our
    # transaction, once; the service's refusal names no operation.
    submit = azure_table_store._table.submit_transaction
    moved: list[bool] = []

    def counter_moves_first(*args: Any, **kwargs: Any) -> Any:
        if not moved:
            moved.append(True)
            other.upsert_entity(
                {"PartitionKey": "ns|team-a", "RowKey": "counter", "provisioning": 0}
            )
        return submit(*args, **kwargs)

    monkeypatch.setattr(azure_table_store._table, "submit_transaction", counter_moves_first)
    naming_no_operation(azure_table_store, monkeypatch)
    saved = azure_table_store.save(d.evolve(phase=Phase.PROVISIONING), expected_version=0)
    assert moved and saved.version == 1
    assert (
        entities(azurite, azure_table_store.table_name, "ns|team-a")["counter"]["provisioning"] == 1
    )


# ------------------------------------------------------------------ crashes


def test_a_create_whose_transaction_never_ran_leaves_nothing_that_counts(
    faulty: tuple[TableDeploymentStore, FaultyTransport], make: Make
) -> None:
    store, transport = faulty
    d = make(request_id="req-9")
    transport.fails = is_batch
    with pytest.raises(StoreUnavailable):
        store.create(d)
    assert transport.failed  # the index entry was written, the transaction was not
    transport.fails = lambda _: False
    assert store.get(d.id) is None
    assert store.find_active("team-a", ResourceType.DATABASE, "orders-db") is None
    assert store.find_by_request_id("team-a", "req-9") is None
    assert store.list() == []
    # The caller's retry creates it, once.
    assert store.create(d) == d
    assert store.get(d.id) == d


def test_a_save_whose_transaction_never_ran_writes_no_event(
    faulty: tuple[TableDeploymentStore, FaultyTransport], make: Make
) -> None:
    store, transport = faulty
    d = store.create(make())
    long_ago = utcnow() - timedelta(hours=1)
    lost = event_for(d, created_at=long_ago)
    # The first transaction writes the outbox entry; the second would save.
    transport.fails = batches_after(1)
    with pytest.raises(StoreUnavailable):
        store.save(d.evolve(phase=Phase.PROVISIONING), expected_version=0, events=[lost])
    transport.fails = lambda _: False
    got = store.get(d.id)
    assert got is not None
    assert (got.version, got.phase) == (0, Phase.PENDING)
    assert store.get_event(lost.id) is None
    # The outbox entry written before the transaction points at nothing: the
    # outbox shows nothing for it, and drops the entry once it is old.
    assert store.pending_events(created_before=utcnow()) == []
    kept = event_for(d, created_at=long_ago, attempts=1)
    store.save(d.evolve(message="again"), expected_version=0, events=[kept])
    assert store.pending_events(created_before=utcnow()) == [kept]


def test_outbox_entries_of_delivered_events_are_dropped_and_a_replay_brings_them_back(
    azure_table_store: TableDeploymentStore, azurite: Any, make: Make
) -> None:
    d = azure_table_store.create(make())
    earlier = utcnow() - timedelta(minutes=5)
    event = event_for(d, created_at=earlier)
    azure_table_store.save(d.evolve(message="x"), expected_version=0, events=[event])
    azure_table_store.save_event(event.model_copy(update={"delivered_at": utcnow()}))
    assert azure_table_store.pending_events(created_before=utcnow()) == []
    outbox = entities(azurite, azure_table_store.table_name, "outbox")
    assert [k for k in outbox if k.startswith("pending|")] == []
    again = event.model_copy(update={"delivered_at": None, "dead_at": None})
    azure_table_store.save_event(again)
    assert azure_table_store.pending_events(created_before=utcnow()) == [again]


def test_an_event_of_no_known_deployment_is_refused(
    azure_table_store: TableDeploymentStore,
) -> None:
    stray = CallbackEvent(
        id="msg_stray", deployment_id="deploy-" + "0" * 32, url="https://x.example", payload={}
    )
    with pytest.raises(NotFound):
        azure_table_store.save_event(stray)


# ------------------------------------------------------------------ errors


def test_a_missing_table_is_unavailable(azurite: Any) -> None:
    store = TableDeploymentStore.from_url(
        f"azuretable://devstoreaccount1/{azure_name('missing')}",
        connection_string=azurite.connection_string,
    )
    with pytest.raises(StoreUnavailable) as raised:
        store.check()
    assert "TableNotFound" in raised.value.message
    with pytest.raises(StoreUnavailable):
        store.get("deploy-" + "1" * 32)


def test_an_unreachable_account_is_unavailable_and_the_key_is_never_shown(azurite: Any) -> None:
    string = azurite.connection_string.replace(
        azurite.table_endpoint, f"http://127.0.0.1:{free_port()}/devstoreaccount1"
    )
    client = TableClient.from_connection_string(string, "kidp", retry_total=0)
    store = TableDeploymentStore(client, owns_client=True)
    with pytest.raises(StoreUnavailable) as raised:
        store.check()
    assert raised.value.message.startswith("the deployment table is unavailable (Table Storage")
    assert azurite.account_key not in str(raised.value)
    assert raised.value.__cause__ is None
    assert azurite.account_key not in repr(store)
