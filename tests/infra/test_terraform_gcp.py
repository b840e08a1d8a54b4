"""``infra/gcp`` read as Terraform reads it (python-hcl2), checked against the
code it deploys: every ``KIDP_*`` variable it sets is a setting the broker
reads, the required ones are set, the functions are the entry points of
``gcp/main.py``, the subscription's dead-letter policy is the broker's
``KIDP_JOB_MAX_DELIVERIES``, Cloud Scheduler runs every scan, and the IAM
grants stay on the resources they concern.

``terraform validate`` needs the Google provider plugin, which cannot be
downloaded here; ``scripts/check-gcp.sh`` runs ``terraform fmt`` and checkov.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import textwrap
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hcl2
import httpx
import pytest

from kidp import tags as tagging
from kidp.gcp_emulator import start_gcp_emulator
from kidp.providers.gcp.base import NAME_PREFIX
from kidp.scans import SCANS
from kidp.settings import Settings
from kidp.stores.cloudsql import parse_cloudsql_url

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra" / "gcp"
#: What a function cannot start without (kidp.edges.gcp.settings_from_env and
#: the composition root), and what must not be left to a default that is wrong on GCP.
REQUIRED = {
    "KIDP_CLOUD",
    "KIDP_PROVIDER",
    "KIDP_REGION",
    "KIDP_GCP_PROJECT",
    "KIDP_STORE_URL",
    "KIDP_QUEUE_URL",
    "KIDP_GCP_DEAD_LETTER_TOPIC",
    "KIDP_GCP_DEAD_LETTER_SUBSCRIPTION",
    "KIDP_GCP_TASKS_QUEUE",
    "KIDP_GCP_TASKS_SERVICE_ACCOUNT",
    "KIDP_GCP_RUN_SERVICE_ACCOUNT",
    "KIDP_JOB_MAX_DELIVERIES",
    "KIDP_SECRET_STORE",
    "KIDP_JWT_SECRET",
    "KIDP_CALLBACK_SECRET",
}


def _clean(value: Any) -> Any:
    """python-hcl2's output without its quotes and bookkeeping keys."""
    if isinstance(value, dict):
        return {
            _clean(k): _clean(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__")
        }
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@cache
def terraform() -> dict[str, Any]:
    """Every .tf file merged: resources by type and name, locals, variables."""
    merged: dict[str, Any] = {"resource": {}, "locals": {}, "variable": {}, "data": {}}
    for path in sorted(INFRA.glob("*.tf")):
        with path.open() as handle:
            parsed = _clean(hcl2.load(handle))
        for block in parsed.get("resource", []):
            for kind, named in block.items():
                merged["resource"].setdefault(kind, {}).update(named)
        for block in parsed.get("locals", []):
            merged["locals"].update(block)
        for block in parsed.get("variable", []):
            merged["variable"].update(block)
    return merged


def resource(kind: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = terraform()["resource"][kind][name]
    return found


def resources(kind: str) -> dict[str, Any]:
    found: dict[str, Any] = terraform()["resource"].get(kind, {})
    return found


def function_environment() -> dict[str, str]:
    """What each function's environment holds: the shared settings, the store
    URL of its own, and the two keys from Secret Manager."""
    function = resource("google_cloudfunctions2_function", "function")
    (service,) = function["service_config"]
    merged = service["environment_variables"]
    assert merged.startswith("${merge(local.environment,")
    environment = dict(terraform()["locals"]["environment"])
    environment.update(dict(re.findall(r"(KIDP_[A-Z_]+)\s*=\s*([^\s,}]+)", merged)))
    for secret in service["secret_environment_variables"]:
        environment[secret["key"]] = secret["secret"]
    return environment


# --------------------------------------------------------------- settings


def test_every_kidp_variable_in_the_terraform_is_a_setting() -> None:
    names = {
        match
        for path in INFRA.glob("*.tf")
        for match in re.findall(r"\bKIDP_[A-Z0-9_]+\b", path.read_text())
    }
    fields = {f"KIDP_{field.upper()}" for field in Settings.model_fields}
    assert names, "no KIDP_ variable found: the test reads the wrong files"
    assert sorted(names - fields) == []


def test_the_functions_get_every_required_setting() -> None:
    environment = function_environment()
    assert set(environment) >= REQUIRED
    fields = {f"KIDP_{field.upper()}" for field in Settings.model_fields}
    assert set(environment) <= fields
    assert environment["KIDP_CLOUD"] == "gcp"
    assert environment["KIDP_SECRET_STORE"] == "gcp"
    assert environment["KIDP_JWT_SECRET"].startswith("${google_secret_manager_secret.key[")
    assert environment["KIDP_QUEUE_URL"].startswith("pubsub://${var.project_id}/")


def test_the_store_url_is_the_cloud_sql_form_with_each_functions_own_user() -> None:
    store_urls = terraform()["locals"]["store_urls"]
    assert "urlencode(google_service_account.function[name].email)" in store_urls
    assert store_urls.endswith(", function.store_connections)}}")
    template = re.search(r'format\(\s*"([^"]+)"', store_urls)
    assert template is not None
    rendered = template.group(1) % (
        "kidp-jobs%40proj.iam.gserviceaccount.com",
        "kidp",
        "proj:europe-west1:kidp-store",
        3,
    )
    target = parse_cloudsql_url(rendered)
    assert target.user == "kidp-jobs@proj.iam.gserviceaccount.com"
    assert (target.database, target.instance) == ("kidp", "proj:europe-west1:kidp-store")
    assert target.max_connections == 3
    assert resource("google_sql_database", "store")["name"] == "kidp"


def test_every_function_at_full_scale_out_fits_the_stores_connections() -> None:
    """Each instance opens at most its store_connections (max_connections in
    its store URL); all instances of all functions at once, plus what is kept
    free, fit the max_connections the store is given, which the default tier's
    memory allows (Cloud SQL's own default: 100 for 3.75 GB, 200 for 7.5 GB)."""
    functions = terraform()["locals"]["functions"]
    assert terraform()["locals"]["store_connections"] == (
        "${sum([for f in values(local.functions) : f.max_instances * f.store_connections])}"
    )
    # At least 2: a store call that nests a second connection cannot wait on itself.
    assert all(int(f["store_connections"]) >= 2 for f in functions.values())
    needed = sum(int(f["max_instances"]) * int(f["store_connections"]) for f in functions.values())
    reserved = int(terraform()["locals"]["store_reserved_connections"])
    granted = int(terraform()["variable"]["database_max_connections"]["default"])
    assert needed + reserved <= granted
    instance = resource("google_sql_database_instance", "store")
    (settings,) = instance["settings"]
    flags = {f["name"]: f["value"] for f in settings["database_flags"]}
    assert flags["max_connections"] == "${tostring(var.database_max_connections)}"
    ((precondition,),) = [block["precondition"] for block in instance["lifecycle"]]
    assert precondition["condition"] == (
        "${local.store_connections + local.store_reserved_connections"
        " <= var.database_max_connections}"
    )
    tier = terraform()["variable"]["database_tier"]["default"]
    custom = re.fullmatch(r"db-custom-\d+-(\d+)", tier)
    assert custom is not None
    memory_mb = int(custom.group(1))
    documented = 200 if memory_mb >= 7680 else 100 if memory_mb >= 3840 else 50
    assert granted <= documented


def test_the_jobs_function_runs_jobs_side_by_side_and_outlasts_throttled_pushes() -> None:
    """A push Cloud Run answers 429 (every instance busy) is a delivery to
    Pub/Sub: the jobs function takes 8 jobs an instance, on more instances,
    and a job is given up only after 20 deliveries."""
    jobs = terraform()["locals"]["functions"]["jobs"]
    assert int(jobs["concurrency"]) >= 8
    assert int(jobs["max_instances"]) >= 30
    assert float(jobs["cpu"]) >= 2
    assert jobs["memory"].endswith("Gi") and int(jobs["memory"][:-2]) >= 2
    (service,) = resource("google_cloudfunctions2_function", "function")["service_config"]
    assert "THREADS = tostring(each.value.concurrency)" in service["environment_variables"]
    assert service["max_instance_request_concurrency"] == "${each.value.concurrency}"
    assert service["max_instance_count"] == "${each.value.max_instances}"
    assert 20 <= int(terraform()["variable"]["job_max_deliveries"]["default"]) <= 100


def test_the_delivery_limit_is_one_variable_for_pubsub_and_the_broker() -> None:
    environment = terraform()["locals"]["environment"]
    assert environment["KIDP_JOB_MAX_DELIVERIES"] == "${tostring(var.job_max_deliveries)}"
    (policy,) = resource("google_pubsub_subscription", "jobs")["dead_letter_policy"]
    assert policy["max_delivery_attempts"] == "${var.job_max_deliveries}"
    assert policy["dead_letter_topic"] == "${google_pubsub_topic.dead.id}"
    (validation,) = terraform()["variable"]["job_max_deliveries"]["validation"]
    assert ">= 5" in validation["condition"] and "<= 100" in validation["condition"]


# -------------------------------------------------------------- functions


def main_functions() -> set[str]:
    """The functions gcp/main.py declares (decorated with the edge's declarations)."""
    tree = ast.parse((ROOT / "gcp" / "main.py").read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(d).startswith("edge.") for d in node.decorator_list)
    }


def test_the_functions_are_the_entry_points_of_main_py() -> None:
    functions = terraform()["locals"]["functions"]
    assert set(functions) == main_functions() == {"api", "jobs", "scan", "dlq"}
    function = resource("google_cloudfunctions2_function", "function")
    (build,) = function["build_config"]
    assert build["entry_point"] == "${each.key}"
    assert re.fullmatch(r"python3(1[1-9])", build["runtime"])
    (service,) = function["service_config"]
    assert service["service_account_email"] == (
        "${google_service_account.function[each.key].email}"
    )
    assert functions["jobs"]["ingress"] == functions["scan"]["ingress"] == "ALLOW_INTERNAL_ONLY"
    # A push is acknowledged by the answer: the ack deadline covers the whole run.
    assert resource("google_pubsub_subscription", "jobs")["ack_deadline_seconds"] == (
        "${local.functions.jobs.timeout}"
    )
    assert int(functions["jobs"]["timeout"]) <= 600


def test_jobs_are_pushed_to_the_jobs_function_with_an_identity_token() -> None:
    subscription = resource("google_pubsub_subscription", "jobs")
    (push,) = subscription["push_config"]
    assert 'function["jobs"]' in push["push_endpoint"]
    (token,) = push["oidc_token"]
    assert token["service_account_email"] == "${google_service_account.push.email}"
    invoker = resource("google_cloud_run_v2_service_iam_member", "jobs")
    assert invoker["member"] == "${google_service_account.push.member}"
    dead = resource("google_pubsub_subscription", "dead")
    assert dead["topic"] == "${google_pubsub_topic.dead.id}"
    environment = terraform()["locals"]["environment"]
    assert (
        environment["KIDP_GCP_DEAD_LETTER_SUBSCRIPTION"] == "${google_pubsub_subscription.dead.id}"
    )


def test_dead_jobs_are_kept_31_days_the_longest_pubsub_keeps_them() -> None:
    dead = resource("google_pubsub_subscription", "dead")
    assert dead["message_retention_duration"] == f"{31 * 24 * 3600}s"
    assert dead["retain_acked_messages"] is False  # a redriven job leaves
    (expiration,) = dead["expiration_policy"]
    assert expiration["ttl"] == ""  # the subscription itself never expires


def test_delays_run_on_a_cloud_tasks_queue_that_publishes_as_its_own_account() -> None:
    environment = terraform()["locals"]["environment"]
    assert environment["KIDP_GCP_TASKS_QUEUE"] == "${google_cloud_tasks_queue.delays.id}"
    assert environment["KIDP_GCP_TASKS_SERVICE_ACCOUNT"] == "${google_service_account.tasks.email}"
    publisher = resource("google_pubsub_topic_iam_member", "tasks_publisher")
    assert publisher["role"] == "roles/pubsub.publisher"
    assert publisher["member"] == "${google_service_account.tasks.member}"


def test_cloud_scheduler_runs_every_scan_with_its_name_in_the_body() -> None:
    assert set(terraform()["locals"]["scans"]) == set(SCANS)
    job = resource("google_cloud_scheduler_job", "scan")
    assert job["for_each"] == "${local.scans}"
    (target,) = job["http_target"]
    assert target["body"] == "${base64encode(jsonencode({scan = each.key}))}"
    assert 'function["scan"]' in target["uri"]
    (token,) = target["oidc_token"]
    assert token["service_account_email"] == "${google_service_account.scheduler.email}"


# -------------------------------------------------------------------- IAM


def test_no_account_may_act_as_any_other_and_no_basic_role_is_granted() -> None:
    for name, grant in resources("google_project_iam_member").items():
        role = grant["role"]
        assert role not in {"roles/owner", "roles/editor", "roles/viewer"}, name
        assert role not in {
            "roles/iam.serviceAccountUser",
            "roles/iam.serviceAccountTokenCreator",
        }, name
    # Exactly these: every function may act as the tasks account (a delayed
    # job's task carries its token), Google's agents mint the tokens of the
    # accounts they call as, and the jobs function may act as the provisioned
    # services' account (deploying a Cloud Run service needs actAs on what it
    # runs as); nobody may act as a function's own account.
    grants = {
        (grant["service_account_id"], grant["role"], grant["member"])
        for grant in resources("google_service_account_iam_member").values()
    }
    assert grants == {
        (
            "${google_service_account.tasks.name}",
            "roles/iam.serviceAccountUser",
            "${google_service_account.function[each.key].member}",
        ),
        (
            "${google_service_account.tasks.name}",
            "roles/iam.serviceAccountTokenCreator",
            "${local.tasks_agent}",
        ),
        (
            "${google_service_account.push.name}",
            "roles/iam.serviceAccountTokenCreator",
            "${local.pubsub_agent}",
        ),
        (
            "${google_service_account.services.name}",
            "roles/iam.serviceAccountUser",
            '${google_service_account.function["jobs"].member}',
        ),
    }


def test_provisioned_services_run_as_their_own_account_the_jobs_function_may_act_as() -> None:
    environment = terraform()["locals"]["environment"]
    assert environment["KIDP_GCP_RUN_SERVICE_ACCOUNT"] == "${google_service_account.services.email}"
    act_as = resource("google_service_account_iam_member", "jobs_act_as_services")
    assert act_as["service_account_id"] == "${google_service_account.services.name}"
    assert act_as["role"] == "roles/iam.serviceAccountUser"
    assert act_as["member"] == '${google_service_account.function["jobs"].member}'
    # The services' account holds no role of its own.
    members = [
        grant["member"]
        for kind, grants in terraform()["resource"].items()
        if kind.endswith("_iam_member")
        for grant in grants.values()
    ]
    assert "${google_service_account.services.member}" not in members


def test_pubsubs_agent_may_move_messages_to_the_dead_letter_topic() -> None:
    publisher = resource("google_pubsub_topic_iam_member", "agent_dead_publisher")
    assert (publisher["topic"], publisher["member"]) == (
        "${google_pubsub_topic.dead.id}",
        "${local.pubsub_agent}",
    )
    subscriber = resource("google_pubsub_subscription_iam_member", "agent_jobs_subscriber")
    assert subscriber["subscription"] == "${google_pubsub_subscription.jobs.id}"
    assert "gcp-sa-pubsub" in terraform()["locals"]["pubsub_agent"]


def test_credentials_secrets_are_reachable_only_by_their_prefix() -> None:
    for name in ("credentials_admin", "credentials_rotation"):
        (condition,) = resource("google_project_iam_member", name)["condition"]
        assert "/secrets/kidp_" in condition["expression"]


@pytest.mark.parametrize("flag", ["cloudsql.iam_authentication"])
def test_the_store_logs_in_with_iam_only(flag: str) -> None:
    instance = resource("google_sql_database_instance", "store")
    (settings,) = instance["settings"]
    flags = {f["name"]: f["value"] for f in settings["database_flags"]}
    assert flags[flag] == "on"
    (network,) = settings["ip_configuration"]
    assert "authorized_networks" not in network
    assert network["ssl_mode"] == "TRUSTED_CLIENT_CERTIFICATE_REQUIRED"
    user = resource("google_sql_user", "function")
    assert user["type"] == "CLOUD_IAM_SERVICE_ACCOUNT"
    assert user["for_each"] == "${local.functions}"
    assert not resources("google_sql_user").keys() - {"function"}


def test_the_store_is_an_enterprise_instance_the_stand_in_accepts_with_its_tier() -> None:
    """POSTGRES_16 and later default to Enterprise Plus, which refuses the
    db-custom-* tiers: the instance names Enterprise, and the SQL Admin
    stand-in (which refuses it as Cloud SQL does) takes the HCL's settings."""
    instance = resource("google_sql_database_instance", "store")
    (settings,) = instance["settings"]
    assert settings["edition"] == "ENTERPRISE"
    assert settings["tier"] == "${var.database_tier}"
    tier = terraform()["variable"]["database_tier"]["default"]
    assert tier.startswith("db-custom-")
    emulator = start_gcp_emulator(operation_polls=0)
    try:
        body = {
            "name": "kidp-store",
            "databaseVersion": instance["database_version"],
            "settings": {"tier": tier, "edition": settings["edition"]},
        }
        answer = httpx.post(f"{emulator.url}v1/projects/p/instances", json=body)
        assert answer.status_code == 200, answer.text
        body["name"] = "kidp-store-2"
        del body["settings"]["edition"]
        refused = httpx.post(f"{emulator.url}v1/projects/p/instances", json=body)
        assert refused.status_code == 400  # what Cloud SQL answers without it
    finally:
        emulator.stop()


# ------------------------------------------------- the provider's roles


def provider_roles() -> dict[str, list[str]]:
    roles: dict[str, list[str]] = terraform()["variable"]["provider_roles"]["default"]
    return roles


def test_api_and_scan_read_buckets_with_buckets_get_and_list() -> None:
    """Drift reads a bucket (buckets.get: a 403 would read as somebody else's
    bucket and report it missing) and the orphan scan lists them
    (buckets.list); roles/storage.objectViewer has neither."""
    assert all("roles/storage.objectViewer" not in roles for roles in provider_roles().values())
    reader = resource("google_project_iam_custom_role", "bucket_reader")
    assert set(reader["permissions"]) == {"storage.buckets.get", "storage.buckets.list"}
    grant = resource("google_project_iam_member", "bucket_reader")
    assert grant["role"] == "${google_project_iam_custom_role.bucket_reader.name}"
    assert grant["for_each"] == '${toset(["api", "scan"])}'
    assert grant["member"] == "${google_service_account.function[each.key].member}"


def test_the_scan_may_set_passwords_on_the_instances_the_broker_provisions() -> None:
    """roles/cloudsql.editor cannot change users: rotation needs users.update."""
    assert "roles/cloudsql.editor" not in provider_roles()["scan"]
    rotation = resource("google_project_iam_custom_role", "sql_rotation")
    assert set(rotation["permissions"]) == {
        "cloudsql.instances.get",
        "cloudsql.users.list",
        "cloudsql.users.update",
    }
    grant = resource("google_project_iam_member", "sql_rotation")
    assert grant["role"] == "${google_project_iam_custom_role.sql_rotation.name}"
    assert grant["member"] == '${google_service_account.function["scan"].member}'
    (condition,) = grant["condition"]
    assert condition["expression"] == "${local.sql_condition}"
    for role in ("roles/cloudsql.admin", "roles/cloudsql.editor"):
        assert all(role not in roles for name, roles in provider_roles().items() if name != "jobs")


def _rendered(text: str, variables: dict[str, str]) -> str:
    """``text`` with ``${var.*}`` and ``${local.*}`` filled in (heredocs unwrapped)."""
    if text.startswith("<<-EOT"):
        text = textwrap.dedent(text.split("\n", 1)[1].rsplit("\n", 1)[0])
    for _ in range(10):
        text = re.sub(r"\$\{var\.(\w+)\}", lambda m: variables[m.group(1)], text)
        text = re.sub(r"\$\{local\.(\w+)\}", lambda m: terraform()["locals"][m.group(1)], text)
    assert "${" not in text, text
    return text


def allows(condition: str, name: str, variables: dict[str, str]) -> bool:
    """Whether IAM would let ``condition`` (a ``local`` holding CEL with
    ``startsWith``, ``==``/``!=``, ``!``, ``&&``, ``||``) through for a
    resource named ``name``: the CEL written as the Python it means."""
    cel = _rendered(terraform()["locals"][condition], variables)
    python = (
        cel.replace("!=", "\0")
        .replace("!", " not ")
        .replace("\0", "!=")
        .replace("&&", " and ")
        .replace("||", " or ")
        .replace(".startsWith(", ".startswith(")
    )
    subject = SimpleNamespace(name=name)
    allowed = eval(f"({python})", {"__builtins__": {}}, {"resource": subject})
    assert isinstance(allowed, bool)
    return allowed


def test_the_admin_roles_reach_kidp_instances_and_buckets_not_the_brokers_own() -> None:
    conditions = terraform()["locals"]["provider_conditions"]
    assert {role: c["expression"] for role, c in conditions.items()} == {
        "roles/cloudsql.admin": "${local.sql_condition}",
        "roles/storage.admin": "${local.storage_condition}",
    }
    assert set(conditions) <= set(provider_roles()["jobs"])
    (dynamic,) = resource("google_project_iam_member", "provider")["dynamic"]
    assert "local.provider_conditions[each.value.role]" in dynamic["condition"]["for_each"]
    (content,) = dynamic["condition"]["content"]
    assert content["expression"] == "${condition.value.expression}"

    # A project whose id starts with kidp- too: its source bucket is kidp-*.
    names = {"project_id": "kidp-prod", "name": "kidp"}
    ours = f"{NAME_PREFIX}team-a-orders-1a2b3c4d"
    instances = "projects/kidp-prod/instances/"
    assert allows("sql_condition", instances + ours, names)
    assert allows("sql_condition", f"{instances}{NAME_PREFIX}store-orders-1a2b3c4d", names)
    assert allows("sql_condition", "projects/kidp-prod", names)  # create, list
    assert not allows("sql_condition", instances + "kidp-store", names)
    assert not allows("sql_condition", instances + "kidp-store/users/postgres", names)
    assert not allows("sql_condition", instances + "billing-db", names)

    buckets = "projects/_/buckets/"
    assert allows("storage_condition", buckets + ours, names)
    assert allows("storage_condition", f"{buckets}{ours}/objects/a.txt", names)
    assert allows("storage_condition", "projects/kidp-prod", names)
    for own in ("kidp-prod-kidp-function-source", "kidp-prod-kidp-access-logs"):
        assert not allows("storage_condition", buckets + own, names)
        assert not allows("storage_condition", f"{buckets}{own}/objects/kidp-broker.zip", names)
    assert not allows("storage_condition", buckets + "someone-elses", names)
    assert terraform()["locals"]["source_bucket"] == "${var.project_id}-${var.name}-function-source"
    assert resource("google_storage_bucket", "source")["name"] == "${local.source_bucket}"
    assert resource("google_storage_bucket", "access_logs")["name"] == "${local.logs_bucket}"
    assert resource("google_sql_database_instance", "store")["name"] == "${local.store_name}"


# ----------------------------------------------------------------- labels


def test_the_brokers_own_resources_carry_the_infra_label() -> None:
    """What the orphan scan lists (instances, topics, buckets) and the rest
    that takes labels: labelled as the broker's infrastructure."""
    labelled = {
        ("google_pubsub_topic", "jobs"),
        ("google_pubsub_topic", "dead"),
        ("google_pubsub_subscription", "jobs"),
        ("google_pubsub_subscription", "dead"),
        ("google_storage_bucket", "source"),
        ("google_storage_bucket", "access_logs"),
        ("google_cloudfunctions2_function", "function"),
        ("google_secret_manager_secret", "key"),
        ("google_kms_crypto_key", "broker"),
    }
    for kind, name in labelled:
        assert resource(kind, name)["labels"] == "${local.infra_labels}", (kind, name)
    (settings,) = resource("google_sql_database_instance", "store")["settings"]
    assert settings["user_labels"] == "${local.infra_labels}"


@pytest.mark.skipif(shutil.which("terraform") is None, reason="needs the terraform CLI")
@pytest.mark.parametrize(
    ("prefix", "managed_by"),
    [
        (tagging.DEFAULT_PREFIX, tagging.MANAGED_BY_VALUE),
        ("Example.ORG/", "Platform Broker"),
        ("9team/", "kidp"),
        ("x" * 70 + "/", "y" * 70),
    ],
)
def test_the_infra_label_is_the_brokers_managed_by_key_with_a_value_of_its_own(
    tmp_path: Path, prefix: str, managed_by: str
) -> None:
    """labels.tf evaluated by Terraform itself (no provider needed) gives the
    key kidp.tags gives managed-by under the same prefix, and a value that is
    neither the broker's managed-by value nor its retained one."""
    shutil.copy(INFRA / "labels.tf", tmp_path)
    shutil.copy(INFRA / "variables.tf", tmp_path)
    variables = ["-var", f"tag_prefix={prefix}", "-var", f"managed_by={managed_by}"]
    answer = subprocess.run(
        [str(shutil.which("terraform")), "console", *variables],
        input="jsonencode(local.infra_labels)\n",
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"TF_CLI_CONFIG_FILE": "/dev/null", "HOME": str(tmp_path)},
        check=True,
    )
    labels = json.loads(json.loads(answer.stdout.strip()))
    key = tagging.encode_key(tagging.MANAGED_BY, dialect="gcp", prefix=prefix)
    assert list(labels) == [key]
    value = labels[key]
    assert value.endswith("-broker-infra") and len(value) <= 63
    if len(managed_by) <= 50:
        assert value == tagging.encode_value(f"{managed_by}-broker-infra", dialect="gcp")
    assert value not in {
        tagging.encode_value(managed_by, dialect="gcp"),
        tagging.encode_value(f"{managed_by}-retained", dialect="gcp"),
    }
