"""The AWS deployment as CloudFormation: what `serverless package` makes of serverless.yml.

The template comes from ``scripts/check-serverless.sh`` (``.serverless/``) when
it is newer than ``serverless.yml``; otherwise the test packages it itself
with a stand-in code artifact. Either way it needs the framework from
``package.json`` (``npm ci``): without ``node_modules`` the tests skip on a
laptop and fail under ``CI=true``.

The IAM tests read the AWS calls out of the code (the provider, the secret
store, the queue and the table adapters, through botocore's own operation
lists) and hold each function's role to exactly the calls listed for that
function in :data:`CALLS`: a new call fails here until a function is named
for it and its role allows it; a permission no call needs fails too.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from kidp import tags as tagging
from kidp.scans import SCANS
from kidp.settings import Settings
from kidp.stores.dynamodb import TABLE_SCHEMA

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "serverless.yml"
PACKAGED = ROOT / ".serverless"
SERVERLESS = ROOT / "node_modules" / ".bin" / "serverless"
ARTIFACT = ROOT / "node_modules" / ".cache" / "kidp-lambda" / "x86_64" / "kidp-broker.zip"
FUNCTIONS = ("api", "worker", "scan", "dlq")
MANAGED_BY_KEY = tagging.encode_key(tagging.MANAGED_BY, dialect="aws")

Call = tuple[str, str]  # (boto3 service, boto3 operation)


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the packaged templates and serverless-state.json."""
    template = PACKAGED / "cloudformation-template-update-stack.json"
    if template.exists() and template.stat().st_mtime >= CONFIG.stat().st_mtime:
        return PACKAGED
    if not SERVERLESS.exists():
        _unavailable("the Serverless Framework is not installed (npm ci)")
    out = tmp_path_factory.mktemp("serverless")
    stand_in = out / "artifact.zip"
    with zipfile.ZipFile(stand_in, "w") as archive:
        archive.writestr("aws/handlers.py", (ROOT / "aws" / "handlers.py").read_text())
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "SLS_TELEMETRY_DISABLED": "1"}
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    subprocess.run(
        [
            str(SERVERLESS),
            "package",
            "--package",
            str(out),
            "--stage",
            "dev",
            "--region",
            "us-east-1",
            f"--param=artifact={stand_in}",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    return out


@pytest.fixture(scope="module")
def template(packaged: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (packaged / "cloudformation-template-update-stack.json").read_text()
    )
    return loaded


@pytest.fixture(scope="module")
def resources(template: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = template["Resources"]
    return found


def of_type(resources: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in resources.items() if r["Type"] == kind}


def function(resources: dict[str, Any], name: str) -> dict[str, Any]:
    props: dict[str, Any] = resources[f"{name.capitalize()}LambdaFunction"]["Properties"]
    return props


def env(resources: dict[str, Any], name: str) -> dict[str, Any]:
    variables: dict[str, Any] = function(resources, name)["Environment"]["Variables"]
    return variables


# ------------------------------------------------------------------ functions


def test_each_function_runs_a_function_defined_in_aws_handlers(resources: dict[str, Any]) -> None:
    defined = set()
    for node in ast.parse((ROOT / "aws" / "handlers.py").read_text()).body:
        if isinstance(node, ast.FunctionDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
    lambdas = of_type(resources, "AWS::Lambda::Function")
    assert {name.removesuffix("LambdaFunction").lower() for name in lambdas} == set(FUNCTIONS)
    for name in FUNCTIONS:
        props = function(resources, name)
        assert props["Handler"] == f"aws/handlers.{name}"
        assert name in defined, f"aws/handlers.py defines no {name}"
        assert props["Runtime"] == "python3.11"
        assert props["TracingConfig"] == {"Mode": "Active"}
        assert props["KmsKeyArn"] == {"Fn::GetAtt": ["BrokerKey", "Arn"]}
        assert props["ReservedConcurrentExecutions"] >= 1
        assert props["Role"] == {"Fn::GetAtt": [f"{name.capitalize()}Role", "Arn"]}
    # API Gateway gives up on an integration after 30 s.
    assert function(resources, "api")["Timeout"] <= 29


def test_every_function_is_configured_for_aws_by_settings_it_understands(
    resources: dict[str, Any],
) -> None:
    known = {f"KIDP_{field.upper()}" for field in Settings.model_fields}
    for name in FUNCTIONS:
        variables = env(resources, name)
        assert {v for v in variables if v.startswith("KIDP_")} <= known
        assert variables["KIDP_CLOUD"] == "aws"
        assert variables["KIDP_SECRET_STORE"] == "aws"
        assert variables["KIDP_STORE_URL"] == {
            "Fn::Join": ["", ["dynamodb://", {"Ref": "BrokerTable"}]]
        }
        assert variables["KIDP_QUEUE_URL"] == {"Ref": "JobQueue"}
        assert variables["KIDP_AWS_DEAD_LETTER_QUEUE_URL"] == {"Ref": "JobDeadLetterQueue"}
        assert variables["KIDP_TAG_PREFIX"] == tagging.DEFAULT_PREFIX


def test_secrets_are_resolved_at_deploy_time_never_written_in_the_template(
    template: dict[str, Any], resources: dict[str, Any]
) -> None:
    variables = env(resources, "api")
    callback = variables["KIDP_CALLBACK_SECRET"]
    assert re.fullmatch(r"\{\{resolve:secretsmanager:[^}]+:SecretString\}\}", callback)
    # An HS256 key from Secrets Manager, unless a JWKS URL is configured.
    jwt = variables["KIDP_JWT_SECRET"]["Fn::If"]
    assert jwt[0] == "UseJwtSecret"
    assert re.fullmatch(r"\{\{resolve:secretsmanager:[^}]+:SecretString\}\}", jwt[1])
    assert jwt[2] == {"Ref": "AWS::NoValue"}
    assert "whsec_" not in json.dumps(template)


def test_the_artifact_holds_the_handlers_the_kidp_package_and_its_dependencies() -> None:
    if not ARTIFACT.exists():
        _unavailable(f"{ARTIFACT.relative_to(ROOT)} is not built (scripts/check-serverless.sh)")
    names = set(zipfile.ZipFile(ARTIFACT).namelist())
    assert "aws/handlers.py" in names
    assert "aws/__init__.py" not in names  # a deployment root, not a package
    assert {"kidp/__init__.py", "kidp/edges/aws.py", "kidp/stores/dynamodb.py"} <= names
    tops = {name.split("/", 1)[0] for name in names}
    assert {"mangum", "aws_lambda_powertools", "boto3", "pydantic_core", "fastapi"} <= tops
    # Compiled ahead: the deployment package is read-only at run time.
    assert "kidp/edges/__pycache__/aws.cpython-311.pyc" in names


# --------------------------------------------------------------------- queue


def test_jobs_dead_letter_after_as_many_deliveries_as_the_worker_allows(
    resources: dict[str, Any],
) -> None:
    queue = resources["JobQueue"]["Properties"]
    dead = resources["JobDeadLetterQueue"]["Properties"]
    max_deliveries = int(env(resources, "worker")["KIDP_JOB_MAX_DELIVERIES"])
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["JobDeadLetterQueue", "Arn"]},
        "maxReceiveCount": max_deliveries,
    }
    assert dead["MessageRetentionPeriod"] > queue["MessageRetentionPeriod"]
    for props in (queue, dead):
        assert props["KmsMasterKeyId"] == {"Ref": "BrokerKey"}


def test_the_worker_takes_batches_and_reports_failed_records_alone(
    resources: dict[str, Any],
) -> None:
    (mapping,) = of_type(resources, "AWS::Lambda::EventSourceMapping").values()
    props = mapping["Properties"]
    assert props["EventSourceArn"] == {"Fn::GetAtt": ["JobQueue", "Arn"]}
    assert props["FunctionName"] == {"Fn::GetAtt": ["WorkerLambdaFunction", "Arn"]}
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert 1 <= props["BatchSize"] <= 10
    assert "MaximumBatchingWindowInSeconds" in props
    worker = function(resources, "worker")
    # The poller never scales past what the function may run (no throttled batches).
    assert props["ScalingConfig"]["MaximumConcurrency"] <= worker["ReservedConcurrentExecutions"]
    # AWS's guidance for SQS event sources: at least six times the function timeout.
    visibility = resources["JobQueue"]["Properties"]["VisibilityTimeout"]
    assert visibility >= 6 * worker["Timeout"] + props["MaximumBatchingWindowInSeconds"]


# ---------------------------------------------------------------------- scans


def _rate_seconds(expression: str) -> int:
    match = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)", expression)
    assert match, expression
    unit = {"minute": 60, "hour": 3600, "day": 86400}[match.group(2).rstrip("s")]
    return int(match.group(1)) * unit


def test_one_schedule_per_scan_at_the_settings_intervals(resources: dict[str, Any]) -> None:
    rules = of_type(resources, "AWS::Events::Rule").values()
    scheduled: dict[str, int] = {}
    for rule in rules:
        (target,) = rule["Properties"]["Targets"]
        assert target["Arn"] == {"Fn::GetAtt": ["ScanLambdaFunction", "Arn"]}
        scan = json.loads(target["Input"])["scan"]
        scheduled[scan] = _rate_seconds(rule["Properties"]["ScheduleExpression"])
    assert set(scheduled) == set(SCANS)
    defaults = Settings()
    assert scheduled["drift"] == defaults.drift_interval_seconds
    assert scheduled["orphans"] == defaults.orphan_interval_seconds
    assert scheduled["cost"] == defaults.cost_interval_seconds
    assert scheduled["rotation"] == defaults.rotation_interval_seconds
    # EventBridge's shortest rate is a minute; reconcile still runs within the
    # time after which a job counts as lost (two leases and a poll interval).
    stale = 2 * defaults.job_lease_seconds + defaults.poll_interval_seconds
    assert 60 <= scheduled["reconcile"] <= stale
    # A failed scan is not retried (the next tick is the retry); it is reported.
    (invoke,) = of_type(resources, "AWS::Lambda::EventInvokeConfig").values()
    assert invoke["Properties"]["FunctionName"] == {"Ref": "ScanLambdaFunction"}
    assert invoke["Properties"]["MaximumRetryAttempts"] == 0
    assert function(resources, "scan")["DeadLetterConfig"] == {"TargetArn": {"Ref": "AlarmTopic"}}


# ------------------------------------------------------------------- HTTP API


def test_the_http_api_routes_everything_to_api_throttled_and_logged(
    resources: dict[str, Any],
) -> None:
    (route,) = of_type(resources, "AWS::ApiGatewayV2::Route").values()
    assert route["Properties"]["RouteKey"] == "$default"
    (integration,) = of_type(resources, "AWS::ApiGatewayV2::Integration").values()
    assert integration["Properties"]["PayloadFormatVersion"] == "2.0"
    assert "ApiLambdaFunction" in json.dumps(integration["Properties"]["IntegrationUri"])
    (stage,) = of_type(resources, "AWS::ApiGatewayV2::Stage").values()
    settings = stage["Properties"]["DefaultRouteSettings"]
    assert settings["ThrottlingRateLimit"] > 0
    assert settings["ThrottlingBurstLimit"] >= settings["ThrottlingRateLimit"]
    assert stage["Properties"]["AccessLogSettings"]["DestinationArn"] == {
        "Fn::GetAtt": ["HttpApiLogGroup", "Arn"]
    }


def test_every_log_group_is_kept_for_a_set_time_and_encrypted(resources: dict[str, Any]) -> None:
    groups = of_type(resources, "AWS::Logs::LogGroup")
    names = {g["Properties"]["LogGroupName"] for g in groups.values()}
    for name in FUNCTIONS:
        assert f"/aws/lambda/{function(resources, name)['FunctionName']}" in names
    for group in groups.values():
        assert group["Properties"]["RetentionInDays"] >= 1
        assert group["Properties"]["KmsKeyId"] == {"Fn::GetAtt": ["BrokerKey", "Arn"]}


# ---------------------------------------------------------------------- table


def test_the_table_is_the_schema_the_dynamodb_store_uses(resources: dict[str, Any]) -> None:
    table = resources["BrokerTable"]["Properties"]
    for key, value in TABLE_SCHEMA.items():
        assert table[key] == value, key
    assert table["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert [i["IndexName"] for i in table["GlobalSecondaryIndexes"]] == [
        "namespace-index",
        "phase-index",
    ]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expiresAt", "Enabled": True}
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert table["SSESpecification"]["SSEEnabled"] is True
    assert table["SSESpecification"]["KMSMasterKeyId"] == {"Fn::GetAtt": ["BrokerKey", "Arn"]}


def test_the_broker_does_not_tag_its_own_stack_as_a_managed_resource(packaged: Path) -> None:
    # The orphan scan lists everything carrying the managed-by tag.
    state = json.loads((packaged / "serverless-state.json").read_text())
    provider = state["service"]["provider"]
    for tags in (provider.get("stackTags") or {}, provider.get("tags") or {}):
        assert MANAGED_BY_KEY not in tags


# ------------------------------------------------------------------------ IAM
# The calls, read from the code.

PROVIDER = ROOT / "common" / "kidp" / "providers" / "aws"  # a package: one module per kind
SECRETS = ROOT / "common" / "kidp" / "secrets" / "aws.py"
QUEUE = ROOT / "common" / "kidp" / "queues" / "sqs.py"
STORE = ROOT / "common" / "kidp" / "stores" / "dynamodb.py"


@cache
def operations(service: str) -> frozenset[str]:
    """boto3's operation names for ``service``, from botocore's models."""
    import botocore.session
    from botocore import xform_name

    model = botocore.session.get_session().get_service_model(service)
    return frozenset(xform_name(name) for name in model.operation_names)


def _strings(node: ast.AST) -> set[str]:
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            found.add(child.value)
        elif isinstance(child, ast.Attribute):
            found.add(child.attr)
    return found


def provider_calls() -> set[Call]:
    """Every call in the provider: ``call(service, type, operation)`` spelled out,
    and the operations named inside each resource kind of that kind's service."""
    trees = [ast.parse(path.read_text()) for path in sorted(PROVIDER.glob("*.py"))]
    # A kind may subclass a base from another module of the package.
    classes = {
        node.name: node for tree in trees for node in tree.body if isinstance(node, ast.ClassDef)
    }

    def service_of(cls: ast.ClassDef) -> str | None:
        for stmt in cls.body:
            if (
                isinstance(stmt, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "service" for t in stmt.targets)
                and isinstance(stmt.value, ast.Constant)
            ):
                return str(stmt.value.value)
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                inherited = service_of(classes[base.id])
                if inherited:
                    return inherited
        return None

    calls: set[Call] = set()
    for node in (node for tree in trees for node in ast.walk(tree)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            spelled = [
                a.value
                for a in node.args[:3]
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
            if node.func.attr in ("call", "optional_call") and len(spelled) == 3:
                service, _, operation = spelled
                assert operation in operations(service), (service, operation)
                calls.add((service, operation))
    for cls in classes.values():
        service = service_of(cls)
        if service:
            calls |= {(service, op) for op in _strings(cls) & operations(service)}
    return calls


def adapter_calls(path: Path, service: str) -> set[Call]:
    return {(service, op) for op in _strings(ast.parse(path.read_text())) & operations(service)}


def store_calls() -> set[Call]:
    """DynamoDB calls, with the item actions inside ``TransactWriteItems``."""
    calls = adapter_calls(STORE, "dynamodb")
    if ("dynamodb", "transact_write_items") in calls:
        used = _strings(ast.parse(STORE.read_text()))
        calls |= {
            ("dynamodb", f"transact:{kind}")
            for kind in ("Put", "Update", "Delete", "ConditionCheck")
            if kind in used
        }
        calls.discard(("dynamodb", "transact_write_items"))
    return calls


# The calls each function makes. (Who calls what follows from kidp.service,
# kidp.scans and kidp.edges.aws: the API submits, reads status and resources,
# lists orphans and checks quotas and health; the worker provisions, polls and
# deletes; the scans describe, list, rotate and reconcile; dlq reads the
# dead-letter queue and sends jobs and callbacks again.)

STATUS: set[Call] = {
    ("rds", "describe_db_instances"),
    ("rds", "describe_db_clusters"),
    ("elasticache", "describe_replication_groups"),
    ("elasticache", "describe_cache_clusters"),
    ("elasticache", "list_tags_for_resource"),
    ("s3", "head_bucket"),
    ("s3", "get_bucket_tagging"),
    ("s3", "get_bucket_versioning"),
    ("s3", "get_bucket_encryption"),
    ("ecs", "describe_services"),
    ("ecs", "describe_task_definition"),
    ("kafka", "describe_topic"),
    ("kafka", "get_bootstrap_brokers"),
}
ORPHANS: set[Call] = {
    ("resourcegroupstaggingapi", "get_resources"),
    ("s3", "list_buckets"),
    ("ecs", "list_services"),
}
QUOTAS: set[Call] = {("rds", "describe_account_attributes")}
ROTATION: set[Call] = {
    ("rds", "modify_db_instance"),
    ("rds", "modify_db_cluster"),
    ("elasticache", "modify_replication_group"),
}
HEALTH: set[Call] = {("sts", "get_caller_identity")}  # needs no permission
#: Made by adapters, but by no Lambda function.
NOT_ON_LAMBDA: set[Call] = {
    ("secretsmanager", "list_secrets"),  # SecretsManagerStore.check(): no function calls it
    ("dynamodb", "create_table"),  # tests and embedded use; the stack creates the table
    ("dynamodb", "describe_time_to_live"),
    ("dynamodb", "update_time_to_live"),
    ("sqs", "get_queue_url"),  # only without KIDP_AWS_DEAD_LETTER_QUEUE_URL, which is set
}
TABLE_READ_WRITE: set[Call] = {
    ("dynamodb", "get_item"),
    ("dynamodb", "query"),
    ("dynamodb", "put_item"),
    ("dynamodb", "transact:Put"),
    ("dynamodb", "transact:Update"),
}


def _calls() -> dict[str, set[Call]]:
    provider = provider_calls()
    worker_provider = provider - ORPHANS - QUOTAS - ROTATION - HEALTH
    return {
        "api": STATUS
        | ORPHANS
        | QUOTAS
        | HEALTH
        | TABLE_READ_WRITE
        | {("sqs", "send_message"), ("sqs", "get_queue_attributes")},
        "worker": worker_provider
        | TABLE_READ_WRITE
        | {
            ("secretsmanager", "get_secret_value"),
            ("secretsmanager", "create_secret"),
            ("secretsmanager", "delete_secret"),
            ("dynamodb", "transact:Delete"),  # locks released when a deployment stops
            ("sqs", "send_message"),
            ("sqs", "change_message_visibility"),
            ("sqs", "delete_message"),
            ("sqs", "dlq:send_message"),
        },
        "scan": STATUS
        | ORPHANS
        | ROTATION
        | TABLE_READ_WRITE
        | {
            ("secretsmanager", "get_secret_value"),
            ("secretsmanager", "put_secret_value"),
            ("dynamodb", "transact:Delete"),
            ("dynamodb", "batch_write_item"),
            ("sqs", "send_message"),
        },
        "dlq": TABLE_READ_WRITE
        | {
            ("sqs", "dlq:receive_message"),
            ("sqs", "dlq:change_message_visibility_batch"),
            ("sqs", "dlq:delete_message"),
            ("sqs", "send_message"),
        },
    }


CALLS = _calls()

#: boto3 operations whose IAM action is not the operation's own name, and the
#: actions a call needs besides its own (tags and final snapshots at create
#: and delete time, MSK topics through the kafka-cluster actions).
ACTIONS: dict[Call, set[str]] = {
    ("s3", "head_bucket"): {"s3:ListBucket"},
    ("s3", "get_bucket_encryption"): {"s3:GetEncryptionConfiguration"},
    ("s3", "put_bucket_encryption"): {"s3:PutEncryptionConfiguration"},
    ("s3", "put_public_access_block"): {"s3:PutBucketPublicAccessBlock"},
    ("s3", "list_object_versions"): {"s3:ListBucketVersions"},
    ("s3", "delete_objects"): {"s3:DeleteObject", "s3:DeleteObjectVersion"},
    ("s3", "list_buckets"): {"s3:ListAllMyBuckets"},
    ("s3", "create_bucket"): {"s3:CreateBucket", "s3:TagResource"},
    ("rds", "create_db_instance"): {"rds:CreateDBInstance", "rds:AddTagsToResource"},
    ("rds", "create_db_cluster"): {"rds:CreateDBCluster", "rds:AddTagsToResource"},
    ("rds", "delete_db_instance"): {"rds:DeleteDBInstance", "rds:CreateDBSnapshot"},
    ("rds", "delete_db_cluster"): {"rds:DeleteDBCluster", "rds:CreateDBClusterSnapshot"},
    ("elasticache", "create_replication_group"): {
        "elasticache:CreateReplicationGroup",
        "elasticache:AddTagsToResource",
    },
    ("elasticache", "create_cache_cluster"): {
        "elasticache:CreateCacheCluster",
        "elasticache:AddTagsToResource",
    },
    ("elasticache", "delete_replication_group"): {
        "elasticache:DeleteReplicationGroup",
        "elasticache:CreateSnapshot",
    },
    ("ecs", "create_service"): {"ecs:CreateService", "ecs:TagResource"},
    ("ecs", "register_task_definition"): {
        "ecs:RegisterTaskDefinition",
        "ecs:TagResource",
        "iam:PassRole",
    },
    ("kafka", "create_topic"): {"kafka-cluster:Connect", "kafka-cluster:CreateTopic"},
    ("kafka", "describe_topic"): {
        "kafka-cluster:Connect",
        "kafka-cluster:DescribeTopic",
        "kafka-cluster:DescribeTopicDynamicConfiguration",
    },
    ("kafka", "delete_topic"): {
        "kafka-cluster:Connect",
        "kafka-cluster:DescribeTopic",
        "kafka-cluster:DeleteTopic",
    },
    ("resourcegroupstaggingapi", "get_resources"): {"tag:GetResources"},
    ("sts", "get_caller_identity"): set(),
    ("secretsmanager", "create_secret"): {
        "secretsmanager:CreateSecret",
        "secretsmanager:TagResource",
    },
    ("dynamodb", "transact:Put"): {"dynamodb:PutItem"},
    ("dynamodb", "transact:Update"): {"dynamodb:UpdateItem"},
    ("dynamodb", "transact:Delete"): {"dynamodb:DeleteItem"},
    ("dynamodb", "transact:ConditionCheck"): {"dynamodb:ConditionCheckItem"},
    ("sqs", "change_message_visibility_batch"): {"sqs:ChangeMessageVisibility"},
}
#: What every function needs besides its calls: its log stream, the stack key
#: (environment, queue and table encryption); X-Ray comes from the AWS managed
#: policy AWSXRayDaemonWriteAccess.
BASE = {
    "logs:CreateLogStream",
    "logs:PutLogEvents",
    "kms:Decrypt",
    "kms:Encrypt",
    "kms:GenerateDataKey",
    "kms:DescribeKey",
}
PLATFORM = {
    # The SQS event source mapping polls with the worker's role.
    "worker": {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"},
    # Failed scheduled scans are published to the alarm topic (onError).
    "scan": {"sns:Publish"},
}
PREFIXES = {"resourcegroupstaggingapi": "tag"}


def actions_for(call: Call) -> set[str]:
    service, operation = call
    operation = operation.removeprefix("dlq:")
    call = (service, operation)
    if call in ACTIONS:
        return ACTIONS[call]
    import botocore.session

    model = botocore.session.get_session().get_service_model(service)
    (name,) = [n for n in model.operation_names if _snake(n) == operation]
    return {f"{PREFIXES.get(service, service)}:{name}"}


def _snake(name: str) -> str:
    from botocore import xform_name

    return str(xform_name(name))


def statements(role: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The role's statements, with each conditional statement as if its
    condition held (MSK topics, the ECS execution role)."""
    for policy in role["Properties"]["Policies"]:
        for statement in policy["PolicyDocument"]["Statement"]:
            yield statement["Fn::If"][1] if "Fn::If" in statement else statement


def allowed(role: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for statement in statements(role):
        assert statement["Effect"] == "Allow"
        action = statement["Action"]
        found.update([action] if isinstance(action, str) else action)
    return found


def test_every_aws_call_in_the_code_is_assigned_to_a_function() -> None:
    made = (
        provider_calls()
        | adapter_calls(SECRETS, "secretsmanager")
        | adapter_calls(QUEUE, "sqs")
        | store_calls()
    )
    assigned = {
        (service, op.removeprefix("dlq:")) for calls in CALLS.values() for service, op in calls
    } | NOT_ON_LAMBDA
    assert made - assigned == set(), "calls no function is listed for in CALLS"
    assert assigned - made == set(), "calls listed in CALLS that the code no longer makes"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_each_role_allows_exactly_the_calls_of_its_function(
    resources: dict[str, Any], name: str
) -> None:
    role = resources[f"{name.capitalize()}Role"]
    expected = BASE | PLATFORM.get(name, set())
    for call in CALLS[name]:
        expected |= actions_for(call)
    assert not any("*" in action for action in allowed(role))
    assert sorted(allowed(role) - expected) == [], "allowed but not needed"
    assert sorted(expected - allowed(role)) == [], "needed but not allowed"
    assert role["Properties"]["ManagedPolicyArns"] == [
        {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/AWSXRayDaemonWriteAccess"}
    ]


WRITES = re.compile(
    r"^(rds|elasticache|ecs|s3|secretsmanager|kafka-cluster):"
    r"(Create|Delete|Deregister|Modify|Put|Add|Tag|Register)"
)


def _resources(statement: dict[str, Any]) -> list[str]:
    resource = statement["Resource"]
    return [json.dumps(r) for r in (resource if isinstance(resource, list) else [resource])]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_writes_are_held_to_the_managed_by_tag_or_the_brokers_names(
    resources: dict[str, Any], name: str
) -> None:
    variables = env(resources, name)
    # What the broker names: kidp-* resources, kidp/* secrets, deploy-*-final
    # snapshots, its own ECS cluster.
    ours = ("kidp-*", "kidp/*", "deploy-*-final", f":cluster/{variables['KIDP_AWS_ECS_CLUSTER']}")
    for statement in statements(resources[f"{name.capitalize()}Role"]):
        action = statement["Action"]
        writes = [a for a in ([action] if isinstance(action, str) else action) if WRITES.match(a)]
        if not writes:
            continue
        sid = statement["Sid"]
        assert name != "api", f"the API role may not change cloud resources: {sid}"
        tags = {
            key: value
            for test in statement.get("Condition", {}).values()
            for key, value in test.items()
            if key.endswith(f"Tag/{MANAGED_BY_KEY}")
        }
        if tags:
            assert set(tags.values()) == {variables["KIDP_MANAGED_BY"]}, sid
        elif writes == ["ecs:DeregisterTaskDefinition"]:
            # It has no resource-level permissions: held to this region.
            assert statement["Condition"] == {
                "StringEquals": {"aws:RequestedRegion": {"Ref": "AWS::Region"}}
            }
        else:
            named = all(any(n in r for n in ours) for r in _resources(statement))
            assert named, f"{sid} writes outside the broker's names without the tag"


def test_the_roles_are_the_functions_own_and_trust_only_lambda(resources: dict[str, Any]) -> None:
    roles = of_type(resources, "AWS::IAM::Role")
    assert set(roles) == {f"{name.capitalize()}Role" for name in FUNCTIONS}
    for role in roles.values():
        (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        assert trust["Principal"] == {"Service": "lambda.amazonaws.com"}
        assert trust["Action"] == "sts:AssumeRole"
