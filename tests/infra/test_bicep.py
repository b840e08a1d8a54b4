"""``infra/azure/main.bicep`` read by checkov's own Bicep parser (pycep, in
``.venv-tools``), checked against what the broker reads: every ``KIDP_*`` app
setting is a :class:`~kidp.settings.Settings` field, the required ones are
there, the queue and table the settings name are the ones the template makes,
secrets are Key Vault references, the identity holds exactly the roles the
adapters need, never over the broker's own resource group, and the broker's own
resources are not orphans to its scans. ``scripts/check-azure.sh`` runs
checkov on the same files."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import missing

from kidp import tags as tagging
from kidp.arm_emulator import ArmEmulatorCredential, start_arm_emulator
from kidp.edges.azure import JOBS_QUEUE, STORAGE_CONNECTION
from kidp.providers.azure import AzureProvider
from kidp.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra" / "azure"
TOOLS_PYTHON = ROOT / ".venv-tools" / "bin" / "python"

#: Built-in role ids -> what the broker needs them for.
ROLES = {
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": "Key Vault Secrets Officer",
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher",
    "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
}
REQUIRED = {
    "KIDP_CLOUD",
    "KIDP_REGION",
    "KIDP_STORE_URL",
    "KIDP_QUEUE_URL",
    "KIDP_SECRET_STORE",
    "KIDP_AZURE_KEY_VAULT_URL",
    "KIDP_CALLBACK_SECRET",
    "KIDP_JOB_MAX_DELIVERIES",
    # The provider's own: without them it cannot be built.
    "KIDP_AZURE_SUBSCRIPTION_ID",
    "KIDP_AZURE_RESOURCE_GROUP",
}


def parse(path: Path) -> dict[str, Any]:
    """The template as pycep (checkov's Bicep parser) reads it."""
    if not TOOLS_PYTHON.exists():
        missing(".venv-tools is missing (run scripts/setup-tools.sh: checkov brings pycep)")
    script = (
        "import json, sys; from pycep import BicepParser; "
        "print(json.dumps(BicepParser().parse(text=open(sys.argv[1]).read()), default=str))"
    )
    done = subprocess.run(
        [str(TOOLS_PYTHON), "-c", script, str(path)], capture_output=True, text=True, check=True
    )
    tree: dict[str, Any] = json.loads(done.stdout)
    return tree


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return parse(INFRA / "main.bicep")


def text(value: Any) -> str:
    """A literal as written, or a readable form of an expression."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def settings(template: dict[str, Any]) -> dict[str, Any]:
    """Every app setting the template can set, name -> value."""
    variables = template["variables"]
    found: dict[str, Any] = {}
    for entry in variables["baseSettings"]["value"]:
        found[entry["name"]] = entry["value"]
    for name in (
        "jwtSecretSetting",
        "jwksSetting",
        "allowlistSetting",
        "servicebusSetting",
        "containerAppsSetting",
    ):
        entry = variables[name]["value"]
        found[entry["name"]] = entry["value"]
    return found


def resources_of(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["resources"].items() if v["type"] == kind}


def evaluate(template: dict[str, Any], node: Any, scope: dict[str, str]) -> Any:
    """The value of a pycep expression, for the few forms the checks below
    need: literals, parameters and variables (``scope`` holds the parameters'
    values and ``resourceGroup().name``), interpolation, ``toLower``, ``==``,
    ``!=`` and the ternary operator."""
    variables = template["variables"]
    if isinstance(node, str):
        if node in scope:
            return scope[node]
        if node in variables:
            return evaluate(template, variables[node]["value"], scope)
        return re.sub(r"\$\{(\w+)\}", lambda m: str(evaluate(template, m.group(1), scope)), node)
    if isinstance(node, dict) and "operator" in node:
        kind, operands = node["operator"]["type"], node["operator"]["operands"]
        if kind == "conditional":
            chosen = (
                "true_value" if evaluate(template, operands["condition"], scope) else "false_value"
            )
            return evaluate(template, operands[chosen], scope)
        left = evaluate(template, operands["operand_1"], scope)
        right = evaluate(template, operands["operand_2"], scope)
        if kind in ("equals", "not_equals"):
            return (left == right) == (kind == "equals")
    if isinstance(node, dict) and "function" in node:
        function = node["function"]
        if function["type"] == "to_lower":
            return str(
                evaluate(template, function["parameters"]["string_to_change"], scope)
            ).lower()
        if (
            function["type"] == "resource_group"
            and function["parameters"]["resource_group_name"] is None
            and function.get("property_name") == "name"
        ):
            return scope["resourceGroup().name"]
    if isinstance(node, dict) and not ({"operator", "function"} & set(node)):
        return {
            evaluate(template, key.strip("'"), scope): evaluate(template, value, scope)
            for key, value in node.items()
        }
    raise AssertionError(f"not evaluated here: {node!r}")


# ------------------------------------------------------------------ app settings


def test_every_kidp_app_setting_is_a_settings_field(template: dict[str, Any]) -> None:
    names = {n for n in settings(template) if n.startswith("KIDP_")}
    unknown = {n for n in names if n.removeprefix("KIDP_").lower() not in Settings.model_fields}
    assert not unknown, unknown
    assert names >= REQUIRED
    assert "KIDP_JWT_SECRET" in names and "KIDP_JWT_JWKS_URL" in names  # one or the other
    # In Azure the storage is reached with the managed identity, never a key.
    assert "KIDP_AZURE_STORAGE_CONNECTION_STRING" not in names


def test_settings_point_at_what_the_template_makes(template: dict[str, Any]) -> None:
    values = settings(template)
    variables = {k: v["value"] for k, v in template["variables"].items()}
    assert values["KIDP_CLOUD"] == "azure"
    assert values["KIDP_SECRET_STORE"] == "keyvault"
    assert values["KIDP_STORE_URL"] == "azuretable://${storage.name}/${table.name}"
    assert values["KIDP_QUEUE_URL"] == "azurequeue://${storage.name}/${jobsQueue.name}"
    assert variables["jobsQueueName"] == JOBS_QUEUE
    queues = resources_of(template, "Microsoft.Storage/storageAccounts/queueServices/queues")
    assert text(queues["jobsQueue"]["config"]["name"]) == "jobsQueueName"
    assert text(queues["poisonQueue"]["config"]["name"]) == "${jobsQueueName}-poison"
    [table] = resources_of(template, "Microsoft.Storage/storageAccounts/tableServices/tables")
    assert table == "table"
    assert "vault" in text(values["KIDP_AZURE_KEY_VAULT_URL"])
    # Secrets are Key Vault references resolved by the platform, never literals.
    for name in ("KIDP_CALLBACK_SECRET", "KIDP_JWT_SECRET"):
        assert re.fullmatch(
            r"@Microsoft\.KeyVault\(SecretUri=\$\{\w+\.properties\.secretUri\}\)", values[name]
        )
    # The trigger's connection is the host's storage, by identity.
    assert values[f"{STORAGE_CONNECTION}__credential"] == "managedidentity"
    assert "AZURE_CLIENT_ID" in values
    # host.json's maxDequeueCount follows KIDP_JOB_MAX_DELIVERIES.
    assert (
        values["AzureFunctionsJobHost__extensions__queues__maxDequeueCount"]
        == values["KIDP_JOB_MAX_DELIVERIES"]
    )


# ------------------------------------------------------------------ resources


def test_the_function_app_runs_python_311_on_flex_consumption(template: dict[str, Any]) -> None:
    [plan] = resources_of(template, "Microsoft.Web/serverfarms").values()
    assert plan["config"]["sku"] == {"tier": "FlexConsumption", "name": "FC1"}
    [site] = resources_of(template, "Microsoft.Web/sites").values()
    config = site["config"]
    assert config["kind"] == "functionapp,linux"
    assert config["properties"]["functionAppConfig"]["runtime"] == {
        "name": "python",
        "version": "3.11",
    }
    assert config["properties"]["httpsOnly"] is True
    assert config["identity"]["type"] == "UserAssigned"


def test_storage_and_vault_are_entra_id_only(template: dict[str, Any]) -> None:
    [storage] = resources_of(template, "Microsoft.Storage/storageAccounts").values()
    assert storage["config"]["properties"]["allowSharedKeyAccess"] is False
    [vault] = resources_of(template, "Microsoft.KeyVault/vaults").values()
    properties = vault["config"]["properties"]
    assert properties["enableRbacAuthorization"] is True
    assert properties["enablePurgeProtection"] is True


def test_the_identity_holds_only_the_roles_the_adapters_need(template: dict[str, Any]) -> None:
    roles = template["variables"]["roles"]["value"]
    assert {ROLES[v] for v in roles.values()} == {
        "Storage Queue Data Contributor",
        "Storage Table Data Contributor",
        "Storage Blob Data Owner",  # the host's leases and the deployment package
        "Key Vault Secrets Officer",
        "Monitoring Metrics Publisher",
    }
    assignments = resources_of(template, "Microsoft.Authorization/roleAssignments")
    # A loop's resource body sits one level down.
    bodies = {name: a["config"].get("config", a["config"]) for name, a in assignments.items()}
    scopes = {name: text(body["scope"]) for name, body in bodies.items()}
    assert scopes == {"storageRoles": "storage", "vaultRole": "vault", "insightsRole": "insights"}
    on_storage = {
        ROLES[roles[ref["operator"]["operands"]["operand_2"]]]
        for ref in template["variables"]["storageRoleIds"]["value"]
    }
    assert on_storage == {
        "Storage Queue Data Contributor",
        "Storage Table Data Contributor",
        "Storage Blob Data Owner",
    }
    module = parse(INFRA / "modules" / "managed-access.bicep")
    assert ROLES[module["variables"]["contributor"]["value"]] == "Contributor"
    assert template["modules"]["managedAccess"]["config"]["scope"] is not None


def test_the_parameter_file_sets_declared_parameters_and_no_secret(
    template: dict[str, Any],
) -> None:
    lines = (INFRA / "main.bicepparam").read_text().splitlines()
    assert "using './main.bicep'" in lines
    params = dict(re.findall(r"^param (\w+) = (.+)$", "\n".join(lines), flags=re.M))
    assert set(params) <= set(template["parameters"])
    assert params["callbackSecret"].startswith("readEnvironmentVariable(")
    assert params["jwtSecret"].startswith("readEnvironmentVariable(")


# ------------------------------------------------------------------ the managed group


def test_the_managed_group_is_required_and_never_the_brokers_own(
    template: dict[str, Any],
) -> None:
    param = template["parameters"]["managedResourceGroupName"]
    assert param["default"] is None  # no default: the broker's own group was it
    scope = template["modules"]["managedAccess"]["config"]["scope"]["function"]
    assert scope["type"] == "resource_group"
    group = scope["parameters"]["resource_group_name"]
    # The app setting names the same group the Contributor assignment is on.
    assert settings(template)["KIDP_AZURE_RESOURCE_GROUP"] == group

    def managed(name: str, own: str) -> str:
        values = {"managedResourceGroupName": name, "resourceGroup().name": own}
        return str(evaluate(template, group, values))

    assert managed("kidp-managed", "kidp") == "kidp-managed"
    # Naming the broker's own group (in any case) points the module at a group
    # that cannot exist: ARM refuses the deployment (ResourceGroupNotFound,
    # naming the rule) before anything is made.
    for name in ("kidp", "KIDP", "Kidp"):
        refused = managed(name, "kidp")
        assert refused.lower() != "kidp"
        assert "managedResourceGroupName" in refused
        assert re.fullmatch(r"[-\w.()]{1,89}[-\w()]", refused)  # a valid group name
    params = dict(
        re.findall(r"^param (\w+) = (.+)$", (INFRA / "main.bicepparam").read_text(), flags=re.M)
    )
    assert params["managedResourceGroupName"] == "'kidp-managed'"


# ------------------------------------------------------------------ the broker's own tags


def broker_tags(template: dict[str, Any], managed_by: str = "kidp") -> dict[str, str]:
    """The tags the template puts on the broker's own resources."""
    values = {"managedBy": managed_by}
    return dict(evaluate(template, template["variables"]["tags"]["value"], values))


def test_the_brokers_own_resources_carry_its_managed_by_key_with_their_own_value(
    template: dict[str, Any],
) -> None:
    key = tagging.encode_key(
        tagging.MANAGED_BY, dialect="azure", prefix=Settings.model_fields["tag_prefix"].default
    )
    assert broker_tags(template) == {key: "kidp-broker-infra", "application": "kidp-broker"}
    assert broker_tags(template, "other")[key] == "other-broker-infra"
    # The key is the broker's only while the app leaves KIDP_TAG_PREFIX at its default.
    assert "KIDP_TAG_PREFIX" not in settings(template)
    tagged = {
        name
        for name, resource in template["resources"].items()
        if text(resource["config"].get("tags")) == "tags"
    }
    assert tagged == {
        "identity",
        "storage",
        "vault",
        "workspace",
        "insights",
        "plan",
        "functionApp",
    }


def test_the_orphan_scan_leaves_the_brokers_own_storage_account_alone(
    template: dict[str, Any], tmp_path: Path
) -> None:
    """The broker's storage account is named like a bucket it makes (``kidp``
    and letters): with the template's tags, the scan's listing leaves it out,
    as someone else's; without them it would be an untagged look-alike."""
    storage_name = evaluate(
        template, "storageName", {"name": "kidp", "resourceGroup().id": "", "suffix": "abc123"}
    )
    assert storage_name == "kidpstabc123"
    arm = start_arm_emulator(directory=tmp_path / "arm", resource_groups=("kidp",))
    try:
        provider = AzureProvider(
            subscription_id=arm.subscription_id,
            resource_group="kidp",
            region=arm.location,
            credential=ArmEmulatorCredential(),
            base_url=arm.url,
            connection_verify=str(arm.ca_file),
            retry_backoff=0,
        )
        account = arm.resource_id("kidp", "Microsoft.Storage", "storageAccounts", storage_name)
        arm.seed(account, {"location": arm.location, "tags": {"application": "kidp-broker"}})
        assert [m.name for m in provider.list_managed() if not m.tagged] == [storage_name]
        arm.seed(account, {"location": arm.location, "tags": broker_tags(template)})
        assert provider.list_managed() == []
    finally:
        arm.stop()
