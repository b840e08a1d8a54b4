"""The deployment store on DynamoDB (the AWS Lambda variant, ``dynamodb://<table>``).

Same contract as :class:`kidp.stores.sql.SqlDeploymentStore`, on one table
with the schema in :data:`TABLE_SCHEMA` (key ``pk``/``sk``, two overloaded
global secondary indexes, TTL on ``expiresAt``). Every record is kept whole
as pydantic JSON in ``body``, next to the few attributes the store keys,
filters or orders on; those are derived from the body on every write.

Items (``<created>`` is the UTC creation time as fixed-width ISO-8601, so
string order is time order; ``<order>`` is ``<created>#<id>``)::

    item                pk / sk                              index: partition / sort
    deployment          DEPLOYMENT#<id> / DEPLOYMENT         namespace: NS#<namespace> / <order>
                                                             phase: PHASE#<phase> / <order>
    active-name lock    LOCK#ACTIVE#<ns>#<type>#<name> / LOCK
    request-id lock     LOCK#REQUEST#<ns>#<request id> / LOCK
    provisioning count  COUNTER#<namespace> / PROVISIONING
    callback event      EVENT#<id> / EVENT                   namespace: EVENTS#<deploy id> / <order>
                                                             phase: OUTBOX#PENDING / <order>
                                                             (only while neither delivered nor dead)
    dead letter         DEADLETTER#<id> / DEADLETTER         phase: DEADLETTERS / <order>
    cost snapshot       COST#<day> / <deployment id>

``namespace`` is the ``namespace-index`` GSI (``gsi1pk``/``gsi1sk``),
``phase`` the ``phase-index`` GSI (``gsi2pk``/``gsi2sk``). Both are
overloaded, as single-table designs do: each partition prefix is its own
access path (a namespace's deployments, a phase's deployments, a
deployment's events, the pending outbox, the dead letters), and items
without the index attributes stay out of the index.

What DynamoDB gives instead of the SQL constraints:

* **One active deployment per name, one per request id.** A lock item per
  namespace/type/name (held while the deployment is active) and per
  namespace/request id (held for the deployment's life) is put with
  ``attribute_not_exists`` in the same ``TransactWriteItems`` as the
  deployment, and released in the transaction that makes it inactive. A lost
  race is a cancelled transaction; the store then reads the lock's owner and
  raises ``DuplicateDeployment`` carrying it.
* **Optimistic versioning.** Every change is a ``Put`` conditioned on
  ``version = :expected``, so a stale writer is a ``ConcurrentUpdate`` and its
  outbox events (in the same transaction) are never written.
* **The per-namespace cap.** ``COUNTER#<namespace>`` holds how many of the
  namespace's deployments are Provisioning; every transaction that moves a
  deployment into or out of Provisioning adds to it, and ``try_start``
  increments it only on ``provisioning < :cap``, in the transaction that
  starts the deployment. The count and the change cannot drift apart.

Retention: a Deleted deployment gets ``expiresAt`` = its finish time (its
last update when it has none) plus ``deleted_retention_days`` (default 7), and
so does its request-id lock; a delivered callback event expires the same
number of days (at least one) after delivery. DynamoDB's TTL deletes expired
items lazily (typically within days), so expiry is a backstop:
:meth:`DynamoDbDeploymentStore.purge_finished`, which the reconcile pass runs
with the same retention, deletes them and their delivered events itself. A
lock past its ``expiresAt`` counts as free, as it would after a purge.

Reads of a single record are strongly consistent. Listings go through the
global secondary indexes, which are eventually consistent: a deployment
written a moment ago can be missing from ``list`` for a fraction of a
second. Nothing in the broker needs more; scans and the reconcile pass come
back on the next tick.

Errors: throttling, server faults, connection failures and an unusable
table (missing, access denied) are ``StoreUnavailable`` (temporary); a
transaction cancelled by a concurrent transaction is retried a few times
with a short jittered pause first. boto3 is imported here only; this module
is loaded by the composition root when ``KIDP_STORE_URL`` is ``dynamodb://``.
"""

from __future__ import annotations

import builtins
import copy
import functools
import heapq
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import BaseModel

from kidp.errors import DuplicateDeployment, StoreUnavailable
from kidp.models import (
    ACTIVE_PHASES,
    CallbackEvent,
    CostSnapshot,
    DeadLetter,
    Deployment,
    Phase,
    ResourceType,
    phase_totals,
)
from kidp.providers.aws.clients import new_client
from kidp.providers.aws.errors import THROTTLING_CODES, error_code, is_temporary
from kidp.stores.records import as_utc, stale, started

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import (
        AttributeValueTypeDef,
        TransactWriteItemTypeDef,
        WriteRequestTypeDef,
    )

__all__ = [
    "GSI_NAMESPACE",
    "GSI_PHASE",
    "MAX_TRANSACTION_ITEMS",
    "TABLE_SCHEMA",
    "TTL_ATTRIBUTE",
    "DynamoDbDeploymentStore",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)

Item = dict[str, "AttributeValueTypeDef"]

GSI_NAMESPACE: Final = "namespace-index"
GSI_PHASE: Final = "phase-index"
TTL_ATTRIBUTE: Final = "expiresAt"

#: The table in CloudFormation's ``AWS::DynamoDB::Table`` property shape;
#: :meth:`DynamoDbDeploymentStore.create_table` creates exactly this, and
#: ``serverless.yml`` mirrors it.
TABLE_SCHEMA: Final[Mapping[str, Any]] = {
    "BillingMode": "PAY_PER_REQUEST",
    "AttributeDefinitions": [
        {"AttributeName": "pk", "AttributeType": "S"},
        {"AttributeName": "sk", "AttributeType": "S"},
        {"AttributeName": "gsi1pk", "AttributeType": "S"},
        {"AttributeName": "gsi1sk", "AttributeType": "S"},
        {"AttributeName": "gsi2pk", "AttributeType": "S"},
        {"AttributeName": "gsi2sk", "AttributeType": "S"},
    ],
    "KeySchema": [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ],
    "GlobalSecondaryIndexes": [
        {
            "IndexName": GSI_NAMESPACE,
            "KeySchema": [
                {"AttributeName": "gsi1pk", "KeyType": "HASH"},
                {"AttributeName": "gsi1sk", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        },
        {
            "IndexName": GSI_PHASE,
            "KeySchema": [
                {"AttributeName": "gsi2pk", "KeyType": "HASH"},
                {"AttributeName": "gsi2sk", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        },
    ],
    "TimeToLiveSpecification": {"AttributeName": TTL_ATTRIBUTE, "Enabled": True},
}

# Partition and sort key values (see the module docstring).
_DEPLOYMENT = "DEPLOYMENT"
_EVENT = "EVENT"
_DEAD_LETTER = "DEADLETTER"
_LOCK = "LOCK"
_PROVISIONING = "PROVISIONING"
_PENDING_OUTBOX = "OUTBOX#PENDING"
_DEAD_LETTERS = "DEADLETTERS"

#: TransactWriteItems takes at most 100 actions.
MAX_TRANSACTION_ITEMS: Final = 100
#: BatchWriteItem takes at most 25 requests.
_BATCH_SIZE = 25
# A transaction cancelled only because another one touched the same item
# (a busy namespace counter, two writers racing) is tried again this often,
# after a jittered pause that doubles from _BACKOFF_SECONDS; short, because
# a request is waiting and the conflicting transaction takes milliseconds.
_MAX_ATTEMPTS = 6
_BACKOFF_SECONDS = 0.02
# Cancellation reasons worth another attempt (CancellationReasons codes).
_TRANSIENT_REASONS = frozenset(
    {
        "TransactionConflict",
        "ThrottlingError",
        "ProvisionedThroughputExceeded",
        "RequestLimitExceeded",
    }
)
_CONDITION_FAILED = "ConditionalCheckFailed"
# Error codes that mean "try again" beyond the generic throttling and server
# ones: another transaction in flight on the item.
_BUSY_CODES = frozenset({"TransactionConflictException", "TransactionInProgressException"})
# A table or permission that is not (yet) there: an operator fixes it without
# the request being at fault, so it is unavailable, not a failed request.
_MISCONFIGURED_CODES = frozenset(
    {
        "ResourceNotFoundException",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "ExpiredTokenException",
    }
)
_SECONDS_PER_DAY = 86_400


# --------------------------------------------------------------------------- errors


class _Cancelled(Exception):
    """A write whose conditions (or a concurrent transaction) stopped it.

    ``reasons`` has one code per action, in order; ``"None"`` for the actions
    that were not at fault.
    """

    def __init__(self, reasons: Sequence[str], error: ClientError) -> None:
        super().__init__(", ".join(reasons))
        self.reasons = list(reasons)
        self.error = error

    def failed(self, index: int) -> bool:
        """True when action ``index`` failed its condition."""
        return index < len(self.reasons) and self.reasons[index] == _CONDITION_FAILED

    @property
    def conditional(self) -> bool:
        """True when some action failed its condition."""
        return _CONDITION_FAILED in self.reasons

    @property
    def transient(self) -> bool:
        """True when nothing failed but contention or throttling: worth a retry."""
        faults = [r for r in self.reasons if r not in {"None", ""}]
        return bool(faults) and all(r in _TRANSIENT_REASONS for r in faults)


def translate_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn throttling, server faults, connection failures and an unusable table
    into ``StoreUnavailable`` (temporary). AWS's message can quote request
    values, so only the error code is logged and shown."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ClientError as error:
            code = error_code(error)
            if not (is_temporary(error) or code in _BUSY_CODES or code in _MISCONFIGURED_CODES):
                raise
            level = logging.ERROR if code in _MISCONFIGURED_CODES else logging.WARNING
            log.log(level, "DynamoDB unavailable in %s: %s", fn.__qualname__, code)
            retry_after = 2.0 if code in THROTTLING_CODES else 1.0
            raise StoreUnavailable(
                f"the deployment table is unavailable ({code}); try again",
                retry_after=retry_after,
            ) from error
        except (BotoConnectionError, HTTPClientError) as error:
            log.warning("DynamoDB unreachable in %s: %s", fn.__qualname__, type(error).__name__)
            raise StoreUnavailable(
                f"the deployment table is unreachable ({type(error).__name__}); try again"
            ) from error

    return wrapper


# --------------------------------------------------------------------------- attribute helpers


def _s(value: str) -> AttributeValueTypeDef:
    return {"S": value}


def _n(value: int) -> AttributeValueTypeDef:
    return {"N": str(value)}


def _str(item: Mapping[str, Any], name: str) -> str | None:
    value = item.get(name)
    return None if value is None else str(value["S"])


def _ts(value: datetime) -> str:
    """Fixed-width UTC ISO-8601 with microseconds: string order is time order.
    Naive values are taken as UTC, as the SQL store does."""
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _order(created: datetime, ident: str) -> str:
    return f"{_ts(created)}#{ident}"


def _key(pk: str, sk: str) -> Item:
    return {"pk": _s(pk), "sk": _s(sk)}


def _deployment_key(deployment_id: str) -> Item:
    return _key(f"{_DEPLOYMENT}#{deployment_id}", _DEPLOYMENT)


def _event_key(event_id: str) -> Item:
    return _key(f"{_EVENT}#{event_id}", _EVENT)


def _letter_key(letter_id: str) -> Item:
    return _key(f"{_DEAD_LETTER}#{letter_id}", _DEAD_LETTER)


def _counter_key(namespace: str) -> Item:
    return _key(f"COUNTER#{namespace}", _PROVISIONING)


def _active_lock(namespace: str, resource_type: ResourceType, resource_name: str) -> str:
    # Namespaces and names are DNS labels and types are fixed words, so '#'
    # cannot occur inside a part: the key is unambiguous.
    return f"{_LOCK}#ACTIVE#{namespace}#{resource_type.value}#{resource_name}"


def _request_lock(namespace: str, request_id: str) -> str:
    # The request id is the caller's free text; it comes last, after the
    # namespace (a DNS label), so the key still splits one way only.
    return f"{_LOCK}#REQUEST#{namespace}#{request_id}"


def _locks(deployment: Deployment) -> set[str]:
    """The lock items ``deployment`` must hold (their ``pk``)."""
    held = set()
    if deployment.request_id is not None:
        held.add(_request_lock(deployment.namespace, deployment.request_id))
    if deployment.phase in ACTIVE_PHASES:
        held.add(
            _active_lock(deployment.namespace, deployment.resource_type, deployment.resource_name)
        )
    return held


class _Expression:
    """Placeholders for one request's expressions (every attribute name goes
    through ``#name``: several of ours are DynamoDB reserved words)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.values: dict[str, AttributeValueTypeDef] = {}

    def name(self, attribute: str) -> str:
        placeholder = f"#{attribute}"
        self.names[placeholder] = attribute
        return placeholder

    def value(self, value: AttributeValueTypeDef) -> str:
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = value
        return placeholder

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.names:
            params["ExpressionAttributeNames"] = dict(self.names)
        if self.values:
            params["ExpressionAttributeValues"] = dict(self.values)
        return params


# --------------------------------------------------------------------------- store


class DynamoDbDeploymentStore:
    """``DeploymentStore`` on one DynamoDB table (see the module docstring).

    ``client`` injects a boto3 ``dynamodb`` client (tests, a shared client);
    otherwise one is made for ``region``/``endpoint_url`` with standard-mode
    retries and short timeouts. Safe to use from many threads and processes.
    """

    def __init__(
        self,
        table_name: str,
        *,
        region: str,
        endpoint_url: str | None = None,
        client: Any | None = None,
        deleted_retention_days: int = 7,
    ) -> None:
        if not table_name:
            raise ValueError("table_name must not be empty")
        if deleted_retention_days < 0:
            raise ValueError("deleted_retention_days must not be negative")
        self.table_name = table_name
        self.region = region
        self.endpoint_url = endpoint_url
        self.deleted_retention_days = deleted_retention_days
        self._owns_client = client is None
        self._client: DynamoDBClient = client if client is not None else self._new_client()

    def _new_client(self) -> DynamoDBClient:
        client: DynamoDBClient = new_client(
            "dynamodb",
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            config=Config(
                # Standard mode retries throttling and 5xx with jittered
                # backoff (at most ~3 s over three attempts); past that the
                # caller gets a 503 and retries, rather than the API hanging.
                # The timeouts keep a wedged connection from eating the API's
                # latency budget or a Lambda's run time.
                retries={"mode": "standard", "total_max_attempts": 3},
                connect_timeout=2,
                read_timeout=5,
                tcp_keepalive=True,
                max_pool_connections=32,
                user_agent_extra="kidp-broker",
            ),
        )
        return client

    def __repr__(self) -> str:
        return (
            f"DynamoDbDeploymentStore(table_name={self.table_name!r}, region={self.region!r}, "
            f"endpoint_url={self.endpoint_url!r})"
        )

    @property
    def client(self) -> DynamoDBClient:
        """The boto3 ``dynamodb`` client the store uses."""
        return self._client

    def close(self) -> None:
        """Release the HTTP connections if this store created the client."""
        if self._owns_client:
            self._client.close()

    @translate_errors
    def create_table(self) -> None:
        """Create the table as :data:`TABLE_SCHEMA` describes, and turn on TTL, unless
        they already are (tests and embedded use; production tables come from
        ``serverless.yml``). Idempotent, and waits until the table is usable."""
        schema = copy.deepcopy(dict(TABLE_SCHEMA))
        try:
            self._client.create_table(
                TableName=self.table_name,
                BillingMode=schema["BillingMode"],
                AttributeDefinitions=schema["AttributeDefinitions"],
                KeySchema=schema["KeySchema"],
                GlobalSecondaryIndexes=schema["GlobalSecondaryIndexes"],
            )
        except ClientError as error:
            if error_code(error) != "ResourceInUseException":
                raise
        self._client.get_waiter("table_exists").wait(
            TableName=self.table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
        )
        ttl = self._client.describe_time_to_live(TableName=self.table_name)
        status = ttl.get("TimeToLiveDescription", {}).get("TimeToLiveStatus")
        if status in {"ENABLED", "ENABLING"}:
            return
        try:
            self._client.update_time_to_live(
                TableName=self.table_name, TimeToLiveSpecification=schema["TimeToLiveSpecification"]
            )
        except ClientError as error:
            # Another process enabled it between our look and our change.
            if error_code(error) != "ValidationException":
                raise

    # ---------------------------------------------------------------- deployments

    @translate_errors
    def create(self, deployment: Deployment) -> Deployment:
        """As :meth:`kidp.stores.sql.SqlDeploymentStore.create`, in
        one transaction: the item (absent until now), the locks it takes and,
        for a Provisioning record, its namespace's count."""
        actions: list[TransactWriteItemTypeDef] = [
            {
                "Put": {
                    "TableName": self.table_name,
                    "Item": self._deployment_item(deployment),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            }
        ]
        actions += [self._acquire(pk, deployment) for pk in sorted(_locks(deployment))]
        if deployment.phase is Phase.PROVISIONING:
            actions.append(self._count(deployment.namespace, 1))
        for attempt in range(_MAX_ATTEMPTS):
            try:
                self._transact(actions)
                return deployment
            except _Cancelled as cancelled:
                if not (cancelled.conditional or cancelled.transient):
                    raise cancelled.error from None
                # Under contention DynamoDB may report a conflict rather than
                # the failed condition: look for the holder either way.
                holder = self._holder(deployment)
                if holder is not None:
                    raise DuplicateDeployment(holder) from None
                # The holder finished, expired or was purged between our write
                # and the lookup, or a concurrent transaction was in the way.
                self._pause(attempt)
        raise StoreUnavailable("the deployment table stayed contended; try again")

    @translate_errors
    def get(self, deployment_id: str) -> Deployment | None:
        """The deployment with this id, or None (a strongly consistent read)."""
        return self._get(deployment_id)

    @translate_errors
    def find_active(
        self, namespace: str, resource_type: ResourceType, resource_name: str
    ) -> Deployment | None:
        """The active deployment holding namespace/type/name, or None."""
        return self._owner(_active_lock(namespace, resource_type, resource_name))

    @translate_errors
    def find_by_request_id(self, namespace: str, request_id: str) -> Deployment | None:
        """The deployment created for this namespace/request id, or None."""
        return self._owner(_request_lock(namespace, request_id))

    @translate_errors
    def save(
        self,
        deployment: Deployment,
        *,
        expected_version: int,
        events: Sequence[CallbackEvent] = (),
    ) -> Deployment:
        """As :meth:`kidp.stores.sql.SqlDeploymentStore.save`, in
        one transaction: the item (conditioned on ``expected_version``), the
        events, and the lock and Provisioning-count changes that follow it."""
        record = deployment.model_copy(update={"version": expected_version + 1})
        # Last one wins for a repeated event id, as with the SQL upsert; a
        # transaction may touch an item only once.
        outbox = {event.id: event for event in events}
        for attempt in range(_MAX_ATTEMPTS):
            current = self._get(record.id)
            if current is None or current.version != expected_version:
                raise stale(record.id, expected_version)
            actions: list[TransactWriteItemTypeDef] = [
                self._put_versioned(record, expected_version)
            ]
            actions += self._lock_changes(current, record)
            actions += self._count_changes(current, record)
            actions += [
                {"Put": {"TableName": self.table_name, "Item": self._event_item(event)}}
                for event in outbox.values()
            ]
            try:
                self._transact(actions)
                return record
            except _Cancelled as cancelled:
                if cancelled.failed(0):
                    raise stale(record.id, expected_version) from None
                if cancelled.conditional:
                    holder = self._holder(record, exclude_id=record.id)
                    if holder is not None:
                        raise DuplicateDeployment(holder) from None
                elif not cancelled.transient:
                    raise cancelled.error from None
                self._pause(attempt)
        raise StoreUnavailable("the deployment table stayed contended; try again")

    @translate_errors
    def try_start(self, deployment_id: str, *, expected_version: int, cap: int) -> bool:
        """As :meth:`kidp.stores.sql.SqlDeploymentStore.try_start`;
        here the change and the namespace counter's increment (conditioned on
        ``provisioning < cap``) are one transaction, so the cap holds across
        processes."""
        for attempt in range(_MAX_ATTEMPTS):
            current = self._get(deployment_id)
            if current is None:
                return False
            if current.version != expected_version:
                raise stale(deployment_id, expected_version)
            if current.phase is not Phase.PENDING or cap <= 0:
                return False
            start = self._put_versioned(started(current, expected_version), expected_version)
            increment: TransactWriteItemTypeDef = {
                "Update": {
                    "TableName": self.table_name,
                    "Key": _counter_key(current.namespace),
                    "UpdateExpression": "ADD #count :one",
                    "ConditionExpression": "attribute_not_exists(#count) OR #count < :cap",
                    "ExpressionAttributeNames": {"#count": "provisioning"},
                    "ExpressionAttributeValues": {":one": _n(1), ":cap": _n(cap)},
                }
            }
            try:
                self._transact([start, increment])
                return True
            except _Cancelled as cancelled:
                if cancelled.failed(0):
                    after = self._get(deployment_id)
                    if after is not None and after.version != expected_version:
                        raise stale(deployment_id, expected_version) from None
                    return False
                if cancelled.failed(1):
                    return False
                if not cancelled.transient:
                    raise cancelled.error from None
                self._pause(attempt)
        raise StoreUnavailable("the deployment table stayed contended; try again")

    def count_by_phase(self) -> dict[Phase, int]:
        """How many deployments are in each phase (every phase present, zeros included)."""
        return phase_totals(self.count_by_namespace_type_phase())

    @translate_errors
    def count_by_namespace_type_phase(self) -> dict[tuple[str, ResourceType, Phase], int]:
        """How many deployments per (namespace, resource type, phase).

        One query of the phase index per phase, projecting two attributes:
        DynamoDB bills the items read either way, so :meth:`count_by_phase`
        sums this rather than running ``Select=COUNT`` queries of its own.
        """
        counts: Counter[tuple[str, ResourceType, Phase]] = Counter()
        paginator = self._client.get_paginator("query")
        for phase in Phase:
            pages = paginator.paginate(
                TableName=self.table_name,
                IndexName=GSI_PHASE,
                KeyConditionExpression="gsi2pk = :p",
                ExpressionAttributeValues={":p": _s(f"PHASE#{phase.value}")},
                ProjectionExpression="#ns, #type",
                ExpressionAttributeNames={"#ns": "namespace", "#type": "resourceType"},
            )
            for page in pages:
                for item in page.get("Items", []):
                    group = (item["namespace"]["S"], ResourceType(item["resourceType"]["S"]), phase)
                    counts[group] += 1
        return dict(counts)

    @translate_errors
    def purge_finished(self, *, before: datetime) -> int:
        """Forget Deleted deployments that finished before ``before`` (their
        ``updated_at`` when ``finished_at`` was never set), their request-id
        locks and their delivered callback events; returns how many deployments
        were removed. Undelivered events, dead letters and cost history are kept.

        Per deployment, events go first and the deployment last, so a purge
        interrupted half-way is finished by the next one.
        """
        expr = _Expression()
        finished, updated = expr.name("finishedAt"), expr.name("updatedAt")
        cutoff = expr.value(_s(_ts(before)))
        expr.values[":p"] = _s(f"PHASE#{Phase.DELETED.value}")
        purgeable = [
            Deployment.model_validate_json(_body(item))
            for item in self._query(
                IndexName=GSI_PHASE,
                KeyConditionExpression="gsi2pk = :p",
                FilterExpression=(
                    f"({finished} < {cutoff}) OR "
                    f"(attribute_not_exists({finished}) AND {updated} < {cutoff})"
                ),
                **expr.params(),
            )
        ]
        purged = 0
        for deployment in purgeable:
            delivered = self._query(
                IndexName=GSI_NAMESPACE,
                KeyConditionExpression="gsi1pk = :d",
                FilterExpression="attribute_exists(#delivered)",
                ExpressionAttributeNames={"#delivered": "deliveredAt"},
                ExpressionAttributeValues={":d": _s(f"EVENTS#{deployment.id}")},
                ProjectionExpression="pk, sk",
            )
            self._batch_delete({"pk": item["pk"], "sk": item["sk"]} for item in delivered)
            if self._delete_deployment(deployment):
                purged += 1
        return purged

    # ---------------------------------------------------------------- outbox

    @translate_errors
    def get_event(self, event_id: str) -> CallbackEvent | None:
        """The outbox event with this id, or None."""
        return self._read(_event_key(event_id), CallbackEvent)

    @translate_errors
    def save_event(self, event: CallbackEvent) -> None:
        """Insert or replace an outbox event."""
        self._client.put_item(TableName=self.table_name, Item=self._event_item(event))

    @translate_errors
    def pending_events(self, *, created_before: datetime, limit: int = 100) -> list[CallbackEvent]:
        """Events neither delivered nor dead, created before ``created_before``, oldest first."""
        if limit <= 0:
            return []
        # Only pending events carry the outbox index keys, so the index holds
        # exactly them, in creation order; ``<created>#id < <cutoff>`` is
        # ``created < cutoff`` because the timestamps are fixed-width.
        items = self._query(
            IndexName=GSI_PHASE,
            KeyConditionExpression="gsi2pk = :p AND gsi2sk < :cutoff",
            ExpressionAttributeValues={
                ":p": _s(_PENDING_OUTBOX),
                ":cutoff": _s(_ts(created_before)),
            },
        )
        return [
            CallbackEvent.model_validate_json(_body(item))
            for item in itertools.islice(items, limit)
        ]

    # ---------------------------------------------------------------- dead letters

    @translate_errors
    def add_dead_letter(self, letter: DeadLetter) -> None:
        """Record a dead letter. Adding an id that exists keeps the stored one, so a
        redelivered job cannot reopen a letter an operator already resolved."""
        try:
            self._client.put_item(
                TableName=self.table_name,
                Item=self._letter_item(letter),
                ConditionExpression="attribute_not_exists(pk)",
            )
        except ClientError as error:
            if error_code(error) != "ConditionalCheckFailedException":
                raise

    @translate_errors
    def get_dead_letter(self, letter_id: str) -> DeadLetter | None:
        """The dead letter with this id, or None."""
        return self._read(_letter_key(letter_id), DeadLetter)

    @translate_errors
    def save_dead_letter(self, letter: DeadLetter) -> None:
        """Insert or replace a dead letter (replay bookkeeping, resolution)."""
        self._client.put_item(TableName=self.table_name, Item=self._letter_item(letter))

    @translate_errors
    def list_dead_letters(self, *, include_resolved: bool = False) -> list[DeadLetter]:
        """Dead letters oldest first; unresolved ones only unless ``include_resolved``."""
        params: dict[str, Any] = {
            "IndexName": GSI_PHASE,
            "KeyConditionExpression": "gsi2pk = :p",
            "ExpressionAttributeValues": {":p": _s(_DEAD_LETTERS)},
        }
        if not include_resolved:
            params["FilterExpression"] = "attribute_not_exists(#resolved)"
            params["ExpressionAttributeNames"] = {"#resolved": "resolvedAt"}
        return [DeadLetter.model_validate_json(_body(item)) for item in self._query(**params)]

    # ---------------------------------------------------------------- cost history

    @translate_errors
    def put_cost_snapshot(self, snapshot: CostSnapshot) -> None:
        """Insert or replace the snapshot for (deployment, day)."""
        item: Item = {
            **_key(f"COST#{snapshot.day}", snapshot.deployment_id),
            "kind": _s("cost"),
            "namespace": _s(snapshot.namespace),
            "body": _s(snapshot.model_dump_json()),
        }
        self._client.put_item(TableName=self.table_name, Item=item)

    @translate_errors
    def cost_snapshots(self, *, day: str) -> list[CostSnapshot]:
        """Every snapshot taken on ``day`` (``YYYY-MM-DD``), by deployment id."""
        items = self._query(
            KeyConditionExpression="pk = :p",
            ExpressionAttributeValues={":p": _s(f"COST#{day}")},
            ConsistentRead=True,
        )
        return [CostSnapshot.model_validate_json(_body(item)) for item in items]

    @translate_errors
    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless the table answers a read (a missing
        table or a refused permission counts as unavailable)."""
        self._client.get_item(TableName=self.table_name, Key=_key("CHECK", "CHECK"))

    # ---------------------------------------------------------------- items

    def _expires_at(self, moment: datetime) -> int:
        return int(moment.timestamp()) + self.deleted_retention_days * _SECONDS_PER_DAY

    def _deployment_expiry(self, deployment: Deployment) -> int | None:
        if deployment.phase is not Phase.DELETED:
            return None
        return self._expires_at(deployment.finished_at or deployment.updated_at)

    def _deployment_item(self, deployment: Deployment) -> Item:
        order = _order(deployment.created_at, deployment.id)
        item: Item = {
            **_deployment_key(deployment.id),
            "kind": _s("deployment"),
            "id": _s(deployment.id),
            "namespace": _s(deployment.namespace),
            "resourceType": _s(deployment.resource_type.value),
            "resourceName": _s(deployment.resource_name),
            "phase": _s(deployment.phase.value),
            "version": _n(deployment.version),
            "createdAt": _s(_ts(deployment.created_at)),
            "updatedAt": _s(_ts(deployment.updated_at)),
            "gsi1pk": _s(f"NS#{deployment.namespace}"),
            "gsi1sk": _s(order),
            "gsi2pk": _s(f"PHASE#{deployment.phase.value}"),
            "gsi2sk": _s(order),
            "body": _s(deployment.model_dump_json()),
        }
        if deployment.request_id is not None:
            item["requestId"] = _s(deployment.request_id)
        if deployment.finished_at is not None:
            item["finishedAt"] = _s(_ts(deployment.finished_at))
        expires = self._deployment_expiry(deployment)
        if expires is not None:
            item[TTL_ATTRIBUTE] = _n(expires)
        return item

    def _event_item(self, event: CallbackEvent) -> Item:
        order = _order(event.created_at, event.id)
        item: Item = {
            **_event_key(event.id),
            "kind": _s("event"),
            "deploymentId": _s(event.deployment_id),
            "createdAt": _s(_ts(event.created_at)),
            "gsi1pk": _s(f"EVENTS#{event.deployment_id}"),
            "gsi1sk": _s(order),
            "body": _s(event.model_dump_json()),
        }
        if event.delivered_at is not None:
            item["deliveredAt"] = _s(_ts(event.delivered_at))
            # At least a day: a redelivered callback job must still find the
            # event delivered, whatever the deployment retention.
            days = max(self.deleted_retention_days, 1)
            item[TTL_ATTRIBUTE] = _n(int(event.delivered_at.timestamp()) + days * _SECONDS_PER_DAY)
        if event.dead_at is not None:
            item["deadAt"] = _s(_ts(event.dead_at))
        if event.delivered_at is None and event.dead_at is None:
            # Sparse: only pending events are in the outbox partition.
            item["gsi2pk"] = _s(_PENDING_OUTBOX)
            item["gsi2sk"] = _s(order)
        return item

    def _letter_item(self, letter: DeadLetter) -> Item:
        item: Item = {
            **_letter_key(letter.id),
            "kind": _s("deadLetter"),
            "eventId": _s(letter.event_id),
            "deploymentId": _s(letter.deployment_id),
            "createdAt": _s(_ts(letter.created_at)),
            "gsi2pk": _s(_DEAD_LETTERS),
            "gsi2sk": _s(_order(letter.created_at, letter.id)),
            "body": _s(letter.model_dump_json()),
        }
        if letter.resolved_at is not None:
            item["resolvedAt"] = _s(_ts(letter.resolved_at))
        return item

    # ---------------------------------------------------------------- write actions

    def _put_versioned(self, record: Deployment, expected_version: int) -> TransactWriteItemTypeDef:
        return {
            "Put": {
                "TableName": self.table_name,
                "Item": self._deployment_item(record),
                "ConditionExpression": "#version = :expected",
                "ExpressionAttributeNames": {"#version": "version"},
                "ExpressionAttributeValues": {":expected": _n(expected_version)},
            }
        }

    def _lock_item(self, pk: str, deployment: Deployment) -> Item:
        item: Item = {
            **_key(pk, _LOCK),
            "kind": _s("lock"),
            "deploymentId": _s(deployment.id),
        }
        expires = self._deployment_expiry(deployment)
        if expires is not None:
            item[TTL_ATTRIBUTE] = _n(expires)
        return item

    def _acquire(self, pk: str, deployment: Deployment) -> TransactWriteItemTypeDef:
        # Free: absent, already ours, or past its expiry (TTL deletes lazily;
        # an expired lock belongs to a deployment a purge would have removed).
        return {
            "Put": {
                "TableName": self.table_name,
                "Item": self._lock_item(pk, deployment),
                "ConditionExpression": (
                    "attribute_not_exists(pk) OR #owner = :id OR #expires < :now"
                ),
                "ExpressionAttributeNames": {"#owner": "deploymentId", "#expires": TTL_ATTRIBUTE},
                "ExpressionAttributeValues": {
                    ":id": _s(deployment.id),
                    ":now": _n(int(time.time())),
                },
            }
        }

    def _release(self, pk: str, owner: Deployment) -> TransactWriteItemTypeDef:
        # Only while ``owner`` holds it: an expired lock may have been taken
        # by a newer deployment since, and that one's lock is not ours to drop.
        return {
            "Delete": {
                "TableName": self.table_name,
                "Key": _key(pk, _LOCK),
                "ConditionExpression": "#owner = :id",
                "ExpressionAttributeNames": {"#owner": "deploymentId"},
                "ExpressionAttributeValues": {":id": _s(owner.id)},
            }
        }

    def _lock_changes(
        self, current: Deployment, record: Deployment
    ) -> builtins.list[TransactWriteItemTypeDef]:
        """Lock actions taking ``current`` (as stored) to ``record``."""
        before, after = _locks(current), _locks(record)
        actions = [self._release(pk, current) for pk in sorted(before - after)]
        actions += [self._acquire(pk, record) for pk in sorted(after - before)]
        if self._deployment_expiry(current) != self._deployment_expiry(record):
            # A lock kept through the change (the request id) follows the
            # deployment's expiry, so TTL removes both together.
            actions += [self._acquire(pk, record) for pk in sorted(before & after)]
        return actions

    def _count(self, namespace: str, delta: int) -> TransactWriteItemTypeDef:
        return {
            "Update": {
                "TableName": self.table_name,
                "Key": _counter_key(namespace),
                "UpdateExpression": "ADD #count :delta",
                "ExpressionAttributeNames": {"#count": "provisioning"},
                "ExpressionAttributeValues": {":delta": _n(delta)},
            }
        }

    def _count_changes(
        self, current: Deployment, record: Deployment
    ) -> builtins.list[TransactWriteItemTypeDef]:
        """Counter updates keeping each namespace's Provisioning count exact."""
        deltas: Counter[str] = Counter()
        if current.phase is Phase.PROVISIONING:
            deltas[current.namespace] -= 1
        if record.phase is Phase.PROVISIONING:
            deltas[record.namespace] += 1
        return [self._count(ns, delta) for ns, delta in sorted(deltas.items()) if delta]

    def _transact(self, actions: Sequence[TransactWriteItemTypeDef]) -> None:
        """One ``TransactWriteItems``; ``_Cancelled`` with per-action reasons when
        it is cancelled. botocore fills in ``ClientRequestToken``, so its own
        retry of a transaction whose answer was lost is not applied twice."""
        if len(actions) > MAX_TRANSACTION_ITEMS:
            raise ValueError(
                f"a transaction takes at most {MAX_TRANSACTION_ITEMS} items, not {len(actions)}"
            )
        try:
            self._client.transact_write_items(TransactItems=list(actions))
        except ClientError as error:
            if error_code(error) != "TransactionCanceledException":
                raise
            reasons = error.response.get("CancellationReasons") or []
            raise _Cancelled([str(r.get("Code", "None")) for r in reasons], error) from None

    def _delete_deployment(self, deployment: Deployment) -> bool:
        """Delete a Deleted deployment and its request-id lock; False when it
        changed (or went) since it was read."""
        delete: TransactWriteItemTypeDef = {
            "Delete": {
                "TableName": self.table_name,
                "Key": _deployment_key(deployment.id),
                "ConditionExpression": "#version = :v AND #phase = :deleted",
                "ExpressionAttributeNames": {"#version": "version", "#phase": "phase"},
                "ExpressionAttributeValues": {
                    ":v": _n(deployment.version),
                    ":deleted": _s(Phase.DELETED.value),
                },
            }
        }
        release = [self._release(pk, deployment) for pk in sorted(_locks(deployment))]
        for attempt in range(_MAX_ATTEMPTS):
            try:
                self._transact([delete, *release])
                return True
            except _Cancelled as cancelled:
                if cancelled.failed(0):
                    return False
                if cancelled.conditional:
                    # The expired request-id lock was taken by a newer
                    # deployment: it is theirs now, leave it.
                    release = []
                elif not cancelled.transient:
                    raise cancelled.error from None
                self._pause(attempt)
        raise StoreUnavailable("the deployment table stayed contended; try again")

    def _batch_delete(self, keys: Iterable[Item]) -> None:
        """Delete ``keys`` 25 at a time, resending what DynamoDB left unprocessed."""
        pending = iter(keys)
        while batch := builtins.list(itertools.islice(pending, _BATCH_SIZE)):
            requests: builtins.list[WriteRequestTypeDef] = [
                {"DeleteRequest": {"Key": key}} for key in batch
            ]
            for attempt in range(_MAX_ATTEMPTS):
                answer = self._client.batch_write_item(RequestItems={self.table_name: requests})
                left = answer.get("UnprocessedItems", {}).get(self.table_name, [])
                if not left:
                    break
                requests = list(left)  # type: ignore[arg-type]
                self._pause(attempt)
            else:
                raise StoreUnavailable("the deployment table kept refusing deletes; try again")

    @staticmethod
    def _pause(attempt: int) -> None:
        # Full jitter, so the writers that collided do not collide again.
        ceiling_ms = max(1, int(_BACKOFF_SECONDS * 1000 * 2**attempt))
        time.sleep(secrets.randbelow(ceiling_ms) / 1000)

    # ---------------------------------------------------------------- reads

    def _get_item(self, key: Item) -> dict[str, Any] | None:
        answer = self._client.get_item(TableName=self.table_name, Key=key, ConsistentRead=True)
        item: dict[str, Any] | None = answer.get("Item")
        return item

    def _read(self, key: Item, model: type[M]) -> M | None:
        """The record stored whole in item ``key``'s body, or None."""
        item = self._get_item(key)
        return None if item is None else model.model_validate_json(_body(item))

    def _get(self, deployment_id: str) -> Deployment | None:
        return self._read(_deployment_key(deployment_id), Deployment)

    def _lock_owner(self, pk: str) -> str | None:
        """The deployment id holding lock ``pk``, or None when free or expired."""
        item = self._get_item(_key(pk, _LOCK))
        if item is None:
            return None
        expires = item.get(TTL_ATTRIBUTE)
        if expires is not None and int(expires["N"]) < int(time.time()):
            return None
        return _str(item, "deploymentId")

    def _owner(self, pk: str) -> Deployment | None:
        owner = self._lock_owner(pk)
        return None if owner is None else self._get(owner)

    def _holder(
        self, deployment: Deployment, *, exclude_id: str | None = None
    ) -> Deployment | None:
        """The record a lock (or the id) refused ``deployment`` for.

        The same request id wins over the same resource, as in the SQL store:
        a retried request must get back the deployment it created, even if
        another one holds the name.
        """
        candidates: builtins.list[Callable[[], str | None]] = []
        if deployment.request_id is not None:
            request_id = deployment.request_id
            candidates.append(
                lambda: self._lock_owner(_request_lock(deployment.namespace, request_id))
            )
        candidates.append(
            lambda: self._lock_owner(
                _active_lock(
                    deployment.namespace, deployment.resource_type, deployment.resource_name
                )
            )
        )
        if exclude_id is None:
            candidates.append(lambda: deployment.id)
        for candidate in candidates:
            owner = candidate()
            if owner is None or owner == exclude_id:
                continue
            found = self._get(owner)
            if found is not None:
                return found
        return None

    def _query(self, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a Query, page after page, fetched as it is consumed."""
        paginator = self._client.get_paginator("query")
        for page in paginator.paginate(TableName=self.table_name, **params):
            yield from page.get("Items", [])

    def _phase_items(
        self, phase: Phase, expr: _Expression, filters: Sequence[str]
    ) -> Iterator[dict[str, Any]]:
        params = expr.params()
        params.setdefault("ExpressionAttributeValues", {})[":p"] = _s(f"PHASE#{phase.value}")
        if filters:
            params["FilterExpression"] = " AND ".join(filters)
        return self._query(IndexName=GSI_PHASE, KeyConditionExpression="gsi2pk = :p", **params)

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
    ) -> list[Deployment]:
        """Deployments matching every given filter, oldest created first.

        With a namespace: one query of its partition in the namespace index.
        Without: one query per wanted phase in the phase index, merged in
        creation order (no table scan). Either way it stops reading once
        ``limit`` deployments are found.
        """
        wanted = list(Phase) if phases is None else sorted({Phase(p) for p in phases})
        if not wanted or limit <= 0:
            return []
        expr = _Expression()
        filters: list[str] = []
        if resource_type is not None:
            filters.append(f"{expr.name('resourceType')} = {expr.value(_s(resource_type.value))}")
        if resource_name is not None:
            filters.append(f"{expr.name('resourceName')} = {expr.value(_s(resource_name))}")
        if updated_before is not None:
            filters.append(f"{expr.name('updatedAt')} < {expr.value(_s(_ts(updated_before)))}")
        items: Iterator[dict[str, Any]]
        if namespace is not None:
            if phases is not None:
                options = ", ".join(expr.value(_s(p.value)) for p in wanted)
                filters.append(f"{expr.name('phase')} IN ({options})")
            params = expr.params()
            params.setdefault("ExpressionAttributeValues", {})[":ns"] = _s(f"NS#{namespace}")
            if filters:
                params["FilterExpression"] = " AND ".join(filters)
            items = self._query(
                IndexName=GSI_NAMESPACE, KeyConditionExpression="gsi1pk = :ns", **params
            )
        else:
            # Each phase partition is already in creation order; merging the
            # streams lazily reads no further than the limit needs.
            items = heapq.merge(
                *(self._phase_items(phase, expr, filters) for phase in wanted),
                key=lambda item: str(item["gsi2sk"]["S"]),
            )
        return [
            Deployment.model_validate_json(_body(item)) for item in itertools.islice(items, limit)
        ]


def _body(item: Mapping[str, Any]) -> str:
    return str(item["body"]["S"])
