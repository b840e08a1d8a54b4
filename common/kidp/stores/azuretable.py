"""The deployment store on Azure Table Storage (the Azure Functions variant,
``azuretable://<account>/<table>``).

Same contract as :class:`kidp.stores.sql.SqlDeploymentStore`, on one table.
Every record is kept whole as pydantic JSON (``body0``, ``body1``... : a
string property holds at most 64 KiB), next to the few properties the store
filters on; those are derived from the body on every write.

Table Storage commits several writes atomically only inside one partition (an
entity group transaction: at most 100 operations, one PartitionKey). So the
partition is the **namespace**: a deployment, its callback events, the slot
that keeps its resource name to one active deployment, the claim on its
request id and the namespace's count of Provisioning deployments all live in
``ns|<namespace>``, and every change the broker must make atomically is one
transaction there, conditioned on the entities' ETags
(``MatchConditions.IfNotModified``)::

    partition            row                                what
    ns|<namespace>       dep|<deployment id>                the deployment
                         evt|<deployment id>|<event id>     a callback event (the outbox)
                         slot|<type>|<name>                 held while a deployment of that
                                                            resource is active: its id
                         req|<sha256 of the request id>     the deployment made for it
                         counter                            Provisioning deployments
    deployment|<id>      index                              the deployment's namespace
    outbox               id|<event id>                      the event's namespace and deployment
                         pending|<created>|<event id>       an event that may still be pending
    namespaces           <namespace>                        every namespace seen
    deadletters          <letter id>                        a dead-lettered callback
    cost|<day>           <deployment id>                    a cost snapshot

What the SQL constraints and DynamoDB's transactions give elsewhere:

* **One active deployment per name, one per request id.** ``create`` is one
  transaction that inserts the deployment, its slot and its request claim;
  either already there is a 409 and the whole transaction is refused. A save
  that makes a deployment inactive deletes its slot in the same transaction.
* **Optimistic versioning.** Every change replaces the deployment only while
  its ETag is the one read with ``expected_version``: a stale writer gets 412
  and nothing of its transaction (its outbox events included) is written.
* **The per-namespace cap.** ``counter`` holds how many of the namespace's
  deployments are Provisioning; every transaction that moves a deployment
  into or out of Provisioning changes it (conditioned on its ETag), and
  ``try_start`` raises it only below the cap.

The entities outside a namespace's partition are indexes, written *before*
the transaction they point into and never relied on alone: an index entry
left by a transaction that then failed (or a process that died) points at a
row that is not there, which reads as "none"; a create refused as a duplicate
of another deployment removes its own entry. ``get`` finds a deployment's
partition through ``deployment|<id>`` (cached: a deployment never changes
namespace), ``get_event`` an event's through ``outbox``/``id|<event id>``,
``pending_events`` reads ``outbox``/``pending|...`` in creation order and
checks each event itself (removing entries of events delivered or dead, with
their ETag, so an entry a replay has just written again survives), and
``list`` without a namespace queries the partition of each namespace in
``namespaces`` rather than scanning the table.

Table Storage has no time-to-live: Deleted deployments go when the reconcile
pass calls :meth:`TableDeploymentStore.purge_finished` after
``KIDP_DELETED_RETENTION_DAYS``, with their delivered events.

Keys: Table Storage refuses ``/ \\ # ?`` and control characters in keys.
Namespaces and names are DNS labels and ids are the broker's own; any key part
outside a safe alphabet (a caller's request id, always) is replaced by its
SHA-256, and the original is kept as a property.

Errors: throttling, server faults, connection failures, a missing table and a
refused authorization are ``StoreUnavailable`` (temporary); messages name the
operation, status and code, never Azure's text (which can echo the request).
``azure-data-tables`` is imported here only; the composition root loads this
module when ``KIDP_STORE_URL`` is ``azuretable://``.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import logging
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableClient, TableTransactionError, UpdateMode
from pydantic import BaseModel

from kidp.errors import DuplicateDeployment, NotFound, StoreUnavailable
from kidp.models import (
    ACTIVE_PHASES,
    CallbackEvent,
    CostSnapshot,
    DeadLetter,
    Deployment,
    Phase,
    ResourceType,
    phase_totals,
    utcnow,
)
from kidp.providers.azure.dataplane import (
    check_same_account,
    default_credential,
    parse_storage_url,
)
from kidp.providers.azure.errors import describe, error_code, http_status, is_temporary, retry_after
from kidp.stores.records import as_utc, stale, started

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

__all__ = ["MAX_TRANSACTION_OPERATIONS", "TableDeploymentStore"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)

Entity = dict[str, Any]
Operation = tuple[Any, ...]

#: An entity group transaction takes at most 100 operations.
MAX_TRANSACTION_OPERATIONS: Final = 100
# A string property holds at most 64 KiB (32 K UTF-16 code units).
_CHUNK_CHARS = 30_000
# Transactions refused only because another writer changed an entity they
# depend on (a busy namespace counter, racing writers) are tried again,
# after a jittered pause that doubles from _BACKOFF_SECONDS up to
# _BACKOFF_CAP_SECONDS. Many tries: under contention each round lets one
# writer through, and a cap of N needs N rounds.
_MAX_ATTEMPTS = 60
_BACKOFF_SECONDS = 0.01
_BACKOFF_CAP_SECONDS = 0.2
# An outbox entry whose event is not there may belong to a save still in
# flight (the entry is written first); only this much older is it a leftover.
_ORPHAN_ENTRY_AGE = timedelta(minutes=10)
_NAMESPACE_CACHE_SIZE = 10_000
# A table or permission that is not (yet) there: an operator fixes it without
# the request being at fault, so it is unavailable, not a failed request.
_MISCONFIGURED_CODES = frozenset(
    {
        "TableNotFound",
        "AuthorizationFailure",
        "AuthorizationPermissionMismatch",
        "AuthenticationFailed",
        "InvalidAuthenticationInfo",
        "AccountIsDisabled",
    }
)
_SAFE_KEY = re.compile(r"^[A-Za-z0-9._:@=+-]{1,200}$")

_OUTBOX = "outbox"
_NAMESPACES = "namespaces"
_DEAD_LETTERS = "deadletters"
_COUNTER = "counter"
_INDEX = "index"
_DEP = "dep|"
_EVT = "evt|"
_PENDING = "pending|"
# The character after "|": "<prefix>}" bounds a range query over "<prefix>|...".
_AFTER_BAR = "}"


# --------------------------------------------------------------------------- keys


def _key(text: str) -> str:
    """``text`` as a key part: itself when it is made of safe characters, else
    ``~`` and its SHA-256 (``~`` is not a safe character, so the two kinds
    cannot meet)."""
    if _SAFE_KEY.match(text):
        return text
    return "~" + hashlib.sha256(text.encode()).hexdigest()


def _ns_pk(namespace: str) -> str:
    return f"ns|{_key(namespace)}"


def _dep_rk(deployment_id: str) -> str:
    return f"{_DEP}{_key(deployment_id)}"


def _evt_rk(deployment_id: str, event_id: str) -> str:
    return f"{_EVT}{_key(deployment_id)}|{_key(event_id)}"


def _slot_rk(resource_type: ResourceType, resource_name: str) -> str:
    return f"slot|{resource_type.value}|{_key(resource_name)}"


def _req_rk(request_id: str) -> str:
    # Always hashed: a caller's free text, and a key must not carry it.
    return "req|" + hashlib.sha256(request_id.encode()).hexdigest()


def _dep_index_pk(deployment_id: str) -> str:
    return f"deployment|{_key(deployment_id)}"


def _ts(value: datetime) -> str:
    """Fixed-width UTC ISO-8601 with microseconds: string order is time order."""
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pending_rk(event: CallbackEvent) -> str:
    return f"{_PENDING}{_ts(event.created_at)}|{_key(event.id)}"


def _is_pending(event: CallbackEvent) -> bool:
    return event.delivered_at is None and event.dead_at is None


# --------------------------------------------------------------------------- bodies


def _with_body(entity: Entity, record: BaseModel) -> Entity:
    """``entity`` plus ``record``'s JSON, cut into properties a string fits in."""
    body = record.model_dump_json()
    chunks = [body[i : i + _CHUNK_CHARS] for i in range(0, len(body), _CHUNK_CHARS)] or [""]
    entity["bodyParts"] = len(chunks)
    for n, chunk in enumerate(chunks):
        entity[f"body{n}"] = chunk
    return entity


def _body(entity: Mapping[str, Any], model: type[M]) -> M:
    parts = int(entity.get("bodyParts", 1))
    return model.model_validate_json("".join(str(entity[f"body{n}"]) for n in range(parts)))


def _etag(entity: Any) -> str:
    return str(entity.metadata["etag"])


def _if_match(etag: str) -> dict[str, Any]:
    return {"etag": etag, "match_condition": MatchConditions.IfNotModified}


# --------------------------------------------------------------------------- errors


class _Refused(Exception):
    """A transaction refused by a condition (409 exists, 412 changed, 404 gone)
    or by contention; ``index`` is the operation at fault, or 0 when the answer
    named none (the SDK's default), so 0 alone proves nothing."""

    def __init__(self, error: TableTransactionError) -> None:
        super().__init__(error_code(error))
        self.index = int(getattr(error, "index", 0) or 0)
        self.status = http_status(error)
        self.error = error


def translate_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn throttling, server faults, connection failures, a missing table and
    a refused authorization into ``StoreUnavailable`` (temporary)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except AzureError as error:
            code = error_code(error)
            status = http_status(error)
            misconfigured = code in _MISCONFIGURED_CODES or status in (401, 403)
            if not (is_temporary(error) or misconfigured):
                raise
            text = describe(error, service="Table Storage", operation=fn.__name__)
            level = logging.ERROR if misconfigured else logging.WARNING
            log.log(level, "deployment table unavailable: %s", text)
            raise StoreUnavailable(
                f"the deployment table is unavailable ({text}); try again",
                retry_after=retry_after(error, default=2.0),
            ) from None

    return wrapper


# --------------------------------------------------------------------------- store


class TableDeploymentStore:
    """``DeploymentStore`` on one Azure Table Storage table (see the module docstring).

    ``table_client`` injects an ``azure.data.tables.TableClient`` (tests);
    otherwise :meth:`from_url` makes one. Safe to use from many threads and
    processes.
    """

    def __init__(self, table_client: TableClient, *, owns_client: bool = False) -> None:
        self._table = table_client
        self._owns_client = owns_client
        self._lock = threading.Lock()
        self._namespaces: dict[str, str] = {}
        self._registered: set[str] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        connection_string: str | None = None,
        credential: TokenCredential | None = None,
    ) -> TableDeploymentStore:
        """The store for ``azuretable://<account>/<table>``: through
        ``connection_string`` when given (Azurite, an account key), else Entra
        ID with ``credential`` (default: the process's ``DefaultAzureCredential``)."""
        location = parse_storage_url(url, service="table")
        if connection_string:
            check_same_account(location, connection_string, setting="KIDP_STORE_URL")
            client = TableClient.from_connection_string(connection_string, location.name)
        else:
            client = TableClient(
                location.endpoint, location.name, credential=credential or default_credential()
            )
        return cls(client, owns_client=True)

    def __repr__(self) -> str:
        return f"TableDeploymentStore(table={self._table.table_name!r}, url={self._table.url!r})"

    @property
    def table_name(self) -> str:
        """The table's name."""
        return self._table.table_name

    def close(self) -> None:
        """Release the HTTP connections if this store created the client."""
        if self._owns_client:
            self._table.close()

    @translate_errors
    def create_table(self) -> None:
        """Create the table unless it exists (tests and the emulated broker;
        in Azure the Bicep creates it)."""
        try:
            self._table.create_table()
        except ResourceExistsError:
            return

    # ---------------------------------------------------------------- deployments

    @translate_errors
    def create(self, deployment: Deployment) -> Deployment:
        """As :meth:`kidp.stores.sql.SqlDeploymentStore.create`, in one
        transaction in the namespace's partition: the deployment (absent until
        now), its slot while active, its request claim and, for a Provisioning
        record, its namespace's count."""
        self._register(deployment)
        pk = _ns_pk(deployment.namespace)
        for attempt in range(_MAX_ATTEMPTS):
            ops: list[Operation] = [("create", self._deployment_entity(deployment))]
            if deployment.phase in ACTIVE_PHASES:
                ops.append(("create", self._slot_entity(deployment)))
            if deployment.request_id is not None:
                ops.append(("create", self._claim_entity(deployment, deployment.request_id)))
            if deployment.phase is Phase.PROVISIONING:
                ops.append(self._count(pk, 1))
            try:
                self._transact(ops)
                return deployment
            except _Refused:
                holder = self._holder(deployment)
                if holder is not None:
                    if holder.id != deployment.id:
                        self._unregister(deployment)
                    raise DuplicateDeployment(holder) from None
                # The holder finished or was purged between our write and the
                # look, or the counter moved: the way may be free now.
                self._pause(attempt)
        raise StoreUnavailable("the deployment table stayed contended; try again")

    @translate_errors
    def get(self, deployment_id: str) -> Deployment | None:
        """The deployment with this id, or None."""
        found = self._read_deployment(deployment_id)
        return None if found is None else found[0]

    @translate_errors
    def find_active(
        self, namespace: str, resource_type: ResourceType, resource_name: str
    ) -> Deployment | None:
        """The active deployment holding namespace/type/name, or None."""
        owner = self._owner_id(_ns_pk(namespace), _slot_rk(resource_type, resource_name))
        return None if owner is None else self.get(owner)

    @translate_errors
    def find_by_request_id(self, namespace: str, request_id: str) -> Deployment | None:
        """The deployment created for this namespace/request id, or None."""
        owner = self._owner_id(_ns_pk(namespace), _req_rk(request_id))
        return None if owner is None else self.get(owner)

    @translate_errors
    def save(
        self,
        deployment: Deployment,
        *,
        expected_version: int,
        events: Sequence[CallbackEvent] = (),
    ) -> Deployment:
        """As :meth:`kidp.stores.sql.SqlDeploymentStore.save`, in one transaction
        in the namespace's partition: the deployment (conditioned on the ETag
        read at ``expected_version``), the events, and the slot and counter
        changes that follow it."""
        record = deployment.model_copy(update={"version": expected_version + 1})
        # Last one wins for a repeated event id, as with the SQL upsert; a
        # transaction may touch an entity only once.
        outbox = {event.id: event for event in events}
        namespace = self._namespace_of(record.id)
        if namespace is None:
            raise stale(record.id, expected_version)
        pk = _ns_pk(namespace)
        if outbox:
            self._index_events(namespace, outbox.values())
        for attempt in range(_MAX_ATTEMPTS):
            found = self._read_deployment(record.id)
            if found is None or found[0].version != expected_version:
                raise stale(record.id, expected_version)
            current, etag = found
            ops: list[Operation] = [
                (
                    "update",
                    self._deployment_entity(record),
                    {"mode": UpdateMode.REPLACE, **_if_match(etag)},
                )
            ]
            ops += self._slot_changes(pk, current, record)
            ops += self._count_changes(pk, current, record)
            ops += [
                ("upsert", self._event_entity(namespace, event), {"mode": UpdateMode.REPLACE})
                for event in outbox.values()
            ]
            try:
                self._transact(ops)
                return record
            except _Refused as refused:
                # Index 0 is the deployment's own update, or an answer that
                # named no operation (the SDK then says 0 too): stale only if
                # the deployment really changed; else a slot or the counter
                # refused it, as for any other index.
                if refused.index == 0 and self._changed(record.id, expected_version):
                    raise stale(record.id, expected_version) from None
                if refused.status == 409:
                    holder = self._holder(record, exclude_id=record.id)
                    if holder is not None:
                        raise DuplicateDeployment(holder) from None
                self._pause(attempt)
        raise StoreUnavailable("the deployment table stayed contended; try again")

    @translate_errors
    def try_start(self, deployment_id: str, *, expected_version: int, cap: int) -> bool:
        """As :meth:`kidp.stores.sql.SqlDeploymentStore.try_start`; the change and
        the namespace counter's increment (only below ``cap``, conditioned on
        the counter's ETag) are one transaction, so the cap holds across
        processes."""
        for attempt in range(_MAX_ATTEMPTS):
            found = self._read_deployment(deployment_id)
            if found is None:
                return False
            current, etag = found
            if current.version != expected_version:
                raise stale(deployment_id, expected_version)
            if current.phase is not Phase.PENDING or cap <= 0:
                return False
            pk = _ns_pk(current.namespace)
            counter = self._read(pk, _COUNTER)
            count = int(counter["provisioning"]) if counter is not None else 0
            if count >= cap:
                return False
            start = self._deployment_entity(started(current, expected_version))
            ops: list[Operation] = [
                ("update", start, {"mode": UpdateMode.REPLACE, **_if_match(etag)}),
                self._counter_op(pk, counter, count + 1),
            ]
            try:
                self._transact(ops)
                return True
            except _Refused:
                # Either the deployment or the counter changed since the read:
                # the next round reads both again and decides.
                self._pause(attempt)
        raise StoreUnavailable("the namespace counter stayed contended; try again")

    def count_by_phase(self) -> dict[Phase, int]:
        """How many deployments are in each phase (every phase present, zeros included)."""
        return phase_totals(self.count_by_namespace_type_phase())

    @translate_errors
    def count_by_namespace_type_phase(self) -> dict[tuple[str, ResourceType, Phase], int]:
        """How many deployments per (namespace, resource type, phase): one query
        of each namespace's partition, reading two properties."""
        counts: Counter[tuple[str, ResourceType, Phase]] = Counter()
        for namespace in self._all_namespaces():
            for entity in self._deployment_entities(
                namespace, select=["namespace", "resourceType", "phase"]
            ):
                group = (
                    str(entity["namespace"]),
                    ResourceType(entity["resourceType"]),
                    Phase(entity["phase"]),
                )
                counts[group] += 1
        return dict(counts)

    @translate_errors
    def purge_finished(self, *, before: datetime) -> int:
        """Forget Deleted deployments that finished before ``before`` (their
        ``updated_at`` when ``finished_at`` was never set), their request
        claims and their delivered callback events; returns how many
        deployments were removed. Undelivered events, dead letters and cost
        history are kept.

        Per deployment the delivered events' index entries go first, then the
        events, and the deployment (with its claim, in one transaction) last,
        so a purge interrupted half-way is finished by the next one."""
        purged = 0
        for namespace in self._all_namespaces():
            pk = _ns_pk(namespace)
            candidates = self._deployment_entities(
                namespace,
                extra="phase eq @deleted and retireAt lt @cutoff",
                parameters={"deleted": Phase.DELETED.value, "cutoff": _ts(before)},
            )
            for entity in candidates:
                deployment = _body(entity, Deployment)
                prefix = f"{_EVT}{_key(deployment.id)}|"
                delivered = list(
                    self._query(
                        "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi "
                        "and delivered eq true",
                        {"pk": pk, "lo": prefix, "hi": prefix[:-1] + _AFTER_BAR},
                        select=["RowKey", "id"],
                    )
                )
                self._delete_all(_OUTBOX, [f"id|{_key(str(e['id']))}" for e in delivered])
                self._delete_all(pk, [str(e["RowKey"]) for e in delivered])
                ops: list[Operation] = [
                    (
                        "delete",
                        {"PartitionKey": pk, "RowKey": _dep_rk(deployment.id)},
                        _if_match(_etag(entity)),
                    )
                ]
                if deployment.request_id is not None:
                    claim_rk = _req_rk(deployment.request_id)
                    claim = self._read(pk, claim_rk)
                    if claim is not None and claim.get("deploymentId") == deployment.id:
                        ops.append(
                            (
                                "delete",
                                {"PartitionKey": pk, "RowKey": claim_rk},
                                _if_match(_etag(claim)),
                            )
                        )
                try:
                    self._transact(ops)
                except _Refused:
                    continue  # changed since it was read: not purgeable any more
                self._table.delete_entity(_dep_index_pk(deployment.id), _INDEX)
                purged += 1
        return purged

    # ---------------------------------------------------------------- outbox

    @translate_errors
    def get_event(self, event_id: str) -> CallbackEvent | None:
        """The outbox event with this id, or None."""
        return self._read_event(event_id)

    @translate_errors
    def save_event(self, event: CallbackEvent) -> None:
        """Insert or replace an outbox event (its deployment must be known)."""
        index = self._read(_OUTBOX, f"id|{_key(event.id)}")
        namespace = (
            str(index["namespace"])
            if index is not None
            else self._namespace_of(event.deployment_id)
        )
        if namespace is None:
            raise NotFound(f"event {event.id} belongs to no known deployment")
        self._index_events(namespace, [event])
        self._table.upsert_entity(self._event_entity(namespace, event), mode=UpdateMode.REPLACE)

    @translate_errors
    def pending_events(self, *, created_before: datetime, limit: int = 100) -> list[CallbackEvent]:
        """Events neither delivered nor dead, created before ``created_before``,
        oldest first. Outbox entries of events that are no longer pending are
        removed on the way (see the module docstring)."""
        if limit <= 0:
            return []
        found: list[CallbackEvent] = []
        orphan_before = _ts(utcnow() - _ORPHAN_ENTRY_AGE)
        entries = self._query(
            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
            {"pk": _OUTBOX, "lo": _PENDING, "hi": f"{_PENDING}{_ts(created_before)}"},
        )
        for entry in entries:
            row = self._read(
                _ns_pk(str(entry["namespace"])),
                _evt_rk(str(entry["deploymentId"]), str(entry["eventId"])),
            )
            event = None if row is None else _body(row, CallbackEvent)
            if event is not None and _is_pending(event):
                found.append(event)
                if len(found) >= limit:
                    break
                continue
            if event is None and str(entry["RowKey"]) >= f"{_PENDING}{orphan_before}":
                continue  # perhaps a save still in flight
            self._forget_entry(entry)
        return found

    # ---------------------------------------------------------------- dead letters

    @translate_errors
    def add_dead_letter(self, letter: DeadLetter) -> None:
        """Record a dead letter. Adding an id that exists keeps the stored one, so a
        redelivered job cannot reopen a letter an operator already resolved."""
        try:
            self._table.create_entity(self._letter_entity(letter))
        except ResourceExistsError:
            return

    @translate_errors
    def get_dead_letter(self, letter_id: str) -> DeadLetter | None:
        """The dead letter with this id, or None."""
        entity = self._read(_DEAD_LETTERS, _key(letter_id))
        return None if entity is None else _body(entity, DeadLetter)

    @translate_errors
    def save_dead_letter(self, letter: DeadLetter) -> None:
        """Insert or replace a dead letter (replay bookkeeping, resolution)."""
        self._table.upsert_entity(self._letter_entity(letter), mode=UpdateMode.REPLACE)

    @translate_errors
    def list_dead_letters(self, *, include_resolved: bool = False) -> list[DeadLetter]:
        """Dead letters oldest first; unresolved ones only unless ``include_resolved``."""
        query = "PartitionKey eq @pk" + ("" if include_resolved else " and resolved eq false")
        letters = [_body(e, DeadLetter) for e in self._query(query, {"pk": _DEAD_LETTERS})]
        return sorted(letters, key=lambda x: (as_utc(x.created_at), x.id))

    # ---------------------------------------------------------------- cost history

    @translate_errors
    def put_cost_snapshot(self, snapshot: CostSnapshot) -> None:
        """Insert or replace the snapshot for (deployment, day)."""
        entity = _with_body(
            {
                "PartitionKey": f"cost|{_key(snapshot.day)}",
                "RowKey": _key(snapshot.deployment_id),
                "kind": "cost",
                "namespace": snapshot.namespace,
            },
            snapshot,
        )
        self._table.upsert_entity(entity, mode=UpdateMode.REPLACE)

    @translate_errors
    def cost_snapshots(self, *, day: str) -> list[CostSnapshot]:
        """Every snapshot taken on ``day`` (``YYYY-MM-DD``), by deployment id."""
        found = [
            _body(e, CostSnapshot)
            for e in self._query("PartitionKey eq @pk", {"pk": f"cost|{_key(day)}"})
        ]
        return sorted(found, key=lambda s: s.deployment_id)

    @translate_errors
    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless the table answers a read (a missing
        table or a refused authorization counts as unavailable)."""
        self._read("check", "check")

    # ---------------------------------------------------------------- entities

    def _deployment_entity(self, deployment: Deployment) -> Entity:
        entity: Entity = {
            "PartitionKey": _ns_pk(deployment.namespace),
            "RowKey": _dep_rk(deployment.id),
            "kind": "deployment",
            "id": deployment.id,
            "namespace": deployment.namespace,
            "resourceType": deployment.resource_type.value,
            "resourceName": deployment.resource_name,
            "phase": deployment.phase.value,
            "version": deployment.version,
            "createdAt": _ts(deployment.created_at),
            "updatedAt": _ts(deployment.updated_at),
            # When a Deleted deployment may be purged from: its finish, or its
            # last change when it never finished.
            "retireAt": _ts(deployment.finished_at or deployment.updated_at),
        }
        if deployment.request_id is not None:
            entity["requestId"] = deployment.request_id
        return _with_body(entity, deployment)

    @staticmethod
    def _slot_entity(deployment: Deployment) -> Entity:
        return {
            "PartitionKey": _ns_pk(deployment.namespace),
            "RowKey": _slot_rk(deployment.resource_type, deployment.resource_name),
            "kind": "slot",
            "deploymentId": deployment.id,
        }

    @staticmethod
    def _claim_entity(deployment: Deployment, request_id: str) -> Entity:
        return {
            "PartitionKey": _ns_pk(deployment.namespace),
            "RowKey": _req_rk(request_id),
            "kind": "requestClaim",
            "deploymentId": deployment.id,
            "requestId": request_id,
        }

    @staticmethod
    def _event_entity(namespace: str, event: CallbackEvent) -> Entity:
        return _with_body(
            {
                "PartitionKey": _ns_pk(namespace),
                "RowKey": _evt_rk(event.deployment_id, event.id),
                "kind": "event",
                "id": event.id,
                "deploymentId": event.deployment_id,
                "createdAt": _ts(event.created_at),
                "delivered": event.delivered_at is not None,
                "dead": event.dead_at is not None,
            },
            event,
        )

    @staticmethod
    def _letter_entity(letter: DeadLetter) -> Entity:
        return _with_body(
            {
                "PartitionKey": _DEAD_LETTERS,
                "RowKey": _key(letter.id),
                "kind": "deadLetter",
                "eventId": letter.event_id,
                "deploymentId": letter.deployment_id,
                "createdAt": _ts(letter.created_at),
                "resolved": letter.resolved_at is not None,
            },
            letter,
        )

    # ---------------------------------------------------------------- indexes

    def _register(self, deployment: Deployment) -> None:
        """Write the deployment's index entry and its namespace's registration
        (before the transaction that creates it: see the module docstring)."""
        if deployment.namespace not in self._registered:
            self._table.upsert_entity(
                {
                    "PartitionKey": _NAMESPACES,
                    "RowKey": _key(deployment.namespace),
                    "namespace": deployment.namespace,
                },
                mode=UpdateMode.REPLACE,
            )
            with self._lock:
                self._registered.add(deployment.namespace)
        # Exists: an earlier attempt of this create (ids are never reused).
        with contextlib.suppress(ResourceExistsError):
            self._table.create_entity(
                {
                    "PartitionKey": _dep_index_pk(deployment.id),
                    "RowKey": _INDEX,
                    "namespace": deployment.namespace,
                }
            )
        self._remember(deployment.id, deployment.namespace)

    def _unregister(self, deployment: Deployment) -> None:
        """Remove the index entry ``_register`` wrote for a create that was
        refused as a duplicate of another deployment, unless a deployment with
        this id is stored after all (an earlier attempt of the same create).
        Best effort: a leftover entry reads as "none"."""
        try:
            if self._read(_ns_pk(deployment.namespace), _dep_rk(deployment.id)) is not None:
                return
            with self._lock:
                self._namespaces.pop(deployment.id, None)
            self._table.delete_entity(_dep_index_pk(deployment.id), _INDEX)
        except AzureError as error:
            log.warning(
                "index entry of refused deployment %s not removed: %s",
                deployment.id,
                describe(error, service="Table Storage", operation="delete_entity"),
            )

    def _index_events(self, namespace: str, events: Iterable[CallbackEvent]) -> None:
        """The outbox entries of ``events`` (where each lives; pending ones in
        creation order), in transactions of the ``outbox`` partition."""
        ops: list[Operation] = []
        for event in events:
            where = {
                "namespace": namespace,
                "deploymentId": event.deployment_id,
                "eventId": event.id,
            }
            ops.append(
                (
                    "upsert",
                    {"PartitionKey": _OUTBOX, "RowKey": f"id|{_key(event.id)}", **where},
                    {"mode": UpdateMode.REPLACE},
                )
            )
            if _is_pending(event):
                ops.append(
                    (
                        "upsert",
                        {"PartitionKey": _OUTBOX, "RowKey": _pending_rk(event), **where},
                        {"mode": UpdateMode.REPLACE},
                    )
                )
        for start in range(0, len(ops), MAX_TRANSACTION_OPERATIONS):
            self._table.submit_transaction(ops[start : start + MAX_TRANSACTION_OPERATIONS])

    def _forget_entry(self, entry: Any) -> None:
        """Remove an outbox entry unless it changed since it was read (a replay
        wrote it again)."""
        try:
            self._table.delete_entity(_OUTBOX, str(entry["RowKey"]), **_if_match(_etag(entry)))
        except AzureError as error:
            if http_status(error) != 412:
                raise

    def _remember(self, deployment_id: str, namespace: str) -> None:
        with self._lock:
            if len(self._namespaces) >= _NAMESPACE_CACHE_SIZE:
                self._namespaces.clear()
            self._namespaces[deployment_id] = namespace

    def _namespace_of(self, deployment_id: str) -> str | None:
        """The namespace of a deployment (from the cache, else its index entry)."""
        with self._lock:
            cached = self._namespaces.get(deployment_id)
        if cached is not None:
            return cached
        entity = self._read(_dep_index_pk(deployment_id), _INDEX)
        if entity is None:
            return None
        namespace = str(entity["namespace"])
        self._remember(deployment_id, namespace)
        return namespace

    def _all_namespaces(self) -> list[str]:
        return sorted(
            str(e["namespace"])
            for e in self._query("PartitionKey eq @pk", {"pk": _NAMESPACES}, select=["namespace"])
        )

    # ---------------------------------------------------------------- changes

    def _slot_changes(self, pk: str, current: Deployment, record: Deployment) -> list[Operation]:
        """The slot operation taking ``current`` (as stored) to ``record``."""
        before, after = current.phase in ACTIVE_PHASES, record.phase in ACTIVE_PHASES
        if after and not before:
            return [("create", self._slot_entity(record))]
        if before and not after:
            rk = _slot_rk(current.resource_type, current.resource_name)
            slot = self._read(pk, rk)
            if slot is not None and slot.get("deploymentId") == current.id:
                return [("delete", {"PartitionKey": pk, "RowKey": rk}, _if_match(_etag(slot)))]
        return []

    def _count_changes(self, pk: str, current: Deployment, record: Deployment) -> list[Operation]:
        """The counter operation keeping the namespace's Provisioning count exact."""
        delta = int(record.phase is Phase.PROVISIONING) - int(current.phase is Phase.PROVISIONING)
        return [self._count(pk, delta)] if delta else []

    def _count(self, pk: str, delta: int) -> Operation:
        counter = self._read(pk, _COUNTER)
        count = int(counter["provisioning"]) if counter is not None else 0
        return self._counter_op(pk, counter, max(0, count + delta))

    @staticmethod
    def _counter_op(pk: str, counter: Any, value: int) -> Operation:
        entity = {"PartitionKey": pk, "RowKey": _COUNTER, "kind": "counter", "provisioning": value}
        if counter is None:
            return ("create", entity)
        return ("update", entity, {"mode": UpdateMode.REPLACE, **_if_match(_etag(counter))})

    def _transact(self, ops: Sequence[Operation]) -> None:
        """One entity group transaction; ``_Refused`` when a condition or a
        concurrent writer refused it."""
        if len(ops) > MAX_TRANSACTION_OPERATIONS:
            raise ValueError(
                f"a transaction takes at most {MAX_TRANSACTION_OPERATIONS} operations, "
                f"not {len(ops)}"
            )
        try:
            self._table.submit_transaction(list(ops))
        except TableTransactionError as error:
            if http_status(error) in (404, 409, 412):
                raise _Refused(error) from None
            raise

    def _delete_all(self, pk: str, row_keys: Sequence[str]) -> None:
        """Delete ``row_keys`` of partition ``pk``, 100 to a transaction."""
        for start in range(0, len(row_keys), MAX_TRANSACTION_OPERATIONS):
            chunk = row_keys[start : start + MAX_TRANSACTION_OPERATIONS]
            try:
                self._table.submit_transaction(
                    [("delete", {"PartitionKey": pk, "RowKey": rk}) for rk in chunk]
                )
            except TableTransactionError as error:
                if http_status(error) != 404:
                    raise
                # One was gone already (an interrupted purge): one at a time.
                for rk in chunk:
                    self._table.delete_entity(pk, rk)

    @staticmethod
    def _pause(attempt: int) -> None:
        # Full jitter, so the writers that collided do not collide again.
        ceiling = min(_BACKOFF_CAP_SECONDS, _BACKOFF_SECONDS * 2**attempt)
        time.sleep(secrets.randbelow(max(1, int(ceiling * 1000))) / 1000)

    # ---------------------------------------------------------------- reads

    def _read(self, pk: str, rk: str) -> Any:
        """The entity, or None (a missing table is an error, not "none")."""
        try:
            return self._table.get_entity(pk, rk)
        except ResourceNotFoundError as error:
            if error_code(error) == "TableNotFound":
                raise
            return None

    def _read_deployment(self, deployment_id: str) -> tuple[Deployment, str] | None:
        namespace = self._namespace_of(deployment_id)
        if namespace is None:
            return None
        entity = self._read(_ns_pk(namespace), _dep_rk(deployment_id))
        return None if entity is None else (_body(entity, Deployment), _etag(entity))

    def _read_event(self, event_id: str) -> CallbackEvent | None:
        index = self._read(_OUTBOX, f"id|{_key(event_id)}")
        if index is None:
            return None
        row = self._read(
            _ns_pk(str(index["namespace"])), _evt_rk(str(index["deploymentId"]), event_id)
        )
        return None if row is None else _body(row, CallbackEvent)

    def _changed(self, deployment_id: str, expected_version: int) -> bool:
        """Whether the stored deployment is gone or past ``expected_version``."""
        found = self._read_deployment(deployment_id)
        return found is None or found[0].version != expected_version

    def _owner_id(self, pk: str, rk: str) -> str | None:
        entity = self._read(pk, rk)
        return None if entity is None else str(entity["deploymentId"])

    def _holder(
        self, deployment: Deployment, *, exclude_id: str | None = None
    ) -> Deployment | None:
        """The record a slot, a claim (or the id) refused ``deployment`` for.

        The same request id wins over the same resource, as in the SQL store:
        a retried request must get back the deployment it created, even if
        another one holds the name.
        """
        pk = _ns_pk(deployment.namespace)
        candidates: list[Callable[[], str | None]] = []
        if deployment.request_id is not None:
            request_id = deployment.request_id
            candidates.append(lambda: self._owner_id(pk, _req_rk(request_id)))
        candidates.append(
            lambda: self._owner_id(pk, _slot_rk(deployment.resource_type, deployment.resource_name))
        )
        if exclude_id is None:
            candidates.append(lambda: deployment.id)
        for candidate in candidates:
            owner = candidate()
            if owner is None or owner == exclude_id:
                continue
            found = self._read_deployment(owner)
            if found is not None:
                return found[0]
        return None

    def _query(
        self, query: str, parameters: Mapping[str, Any], *, select: list[str] | None = None
    ) -> Iterator[Any]:
        """Every entity a filter finds, page after page, fetched as consumed."""
        return iter(self._table.query_entities(query, parameters=dict(parameters), select=select))

    def _deployment_entities(
        self,
        namespace: str,
        *,
        extra: str = "",
        parameters: Mapping[str, Any] | None = None,
        select: list[str] | None = None,
    ) -> Iterator[Any]:
        """The deployments of ``namespace``'s partition matching ``extra``."""
        query = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        if extra:
            query += f" and {extra}"
        params = {"pk": _ns_pk(namespace), "lo": _DEP, "hi": _DEP[:-1] + _AFTER_BAR}
        return self._query(query, {**params, **(parameters or {})}, select=select)

    # ``list`` comes last: below it, the name would shadow the builtin in
    # annotations of this class.
    @translate_errors
    def list(
        self,
        *,
        namespace: str | None = None,
        phases: Iterable[Phase] | None = None,
        resource_type: ResourceType | None = None,
        resource_name: str | None = None,
        updated_before: datetime | None = None,
        limit: int = 1000,
    ) -> builtins.list[Deployment]:
        """Deployments matching every given filter, oldest created first: one
        query of each namespace's partition (the one given, or every one
        known), filtered by Table Storage, merged in creation order."""
        wanted = None if phases is None else sorted({Phase(p) for p in phases})
        if wanted == [] or limit <= 0:
            return []
        conditions: builtins.list[str] = []
        params: dict[str, Any] = {}
        if wanted is not None:
            options = []
            for n, phase in enumerate(wanted):
                params[f"p{n}"] = phase.value
                options.append(f"phase eq @p{n}")
            # Spaces around every word: the SDK substitutes "@name" words only.
            conditions.append(f"( {' or '.join(options)} )")
        if resource_type is not None:
            conditions.append("resourceType eq @type")
            params["type"] = resource_type.value
        if resource_name is not None:
            conditions.append("resourceName eq @name")
            params["name"] = resource_name
        if updated_before is not None:
            conditions.append("updatedAt lt @before")
            params["before"] = _ts(updated_before)
        namespaces = [namespace] if namespace is not None else self._all_namespaces()
        found = [
            (str(entity["createdAt"]), str(entity["id"]), _body(entity, Deployment))
            for ns in namespaces
            for entity in self._deployment_entities(
                ns, extra=" and ".join(conditions), parameters=params
            )
        ]
        found.sort(key=lambda row: (row[0], row[1]))
        return [deployment for _, _, deployment in found[:limit]]
