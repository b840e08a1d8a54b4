"""Buckets: a storage account (global name) with one private blob container
named after the resource, versioned when asked; reached with Microsoft Entra
ID only (shared keys and anonymous access are off).
"""

from __future__ import annotations

import re
from typing import Any

from kidp.errors import QuotaExceeded
from kidp.models import CloudResource, Deployment, Phase, ResourceType
from kidp.ports import Credentials, QuotaReport
from kidp.providers.azure.base import (
    Json,
    State,
    _Found,
    _Kind,
    _Request,
    arm_state,
    body_bytes,
    deployment_piece,
    encryption_of,
)

NAMESPACE = "Microsoft.Storage"
_PREFIX = "kidp"


class _StorageAccount(_Kind):
    key = "storage"
    label = "storage account"
    service = "storage"
    resource_type = ResourceType.BUCKET
    arm_types = {"Microsoft.Storage/storageAccounts": 1}

    def name(self, deployment: Deployment) -> str:
        # 3-24 lowercase letters and digits, global: no room for separators, so
        # the deployment id piece is what keeps names apart.
        compact = re.sub(r"[^a-z0-9]", "", f"{deployment.namespace}{deployment.resource_name}")
        return f"{_PREFIX}{compact[:12]}{deployment_piece(deployment)}"

    def looks_like_ours(self, name: str) -> bool:
        return name.startswith(_PREFIX)

    def container_name(self, deployment: Deployment) -> str:
        # Container names need 3-63 characters and no '--'; resource names are DNS labels.
        name = re.sub(r"-{2,}", "-", deployment.resource_name)
        return name if len(name) >= 3 else f"{name}-data"

    def account_body(self, deployment: Deployment, tags: dict[str, str]) -> Json:
        return {
            "location": self.p.region,
            "tags": tags,
            "sku": {"name": "Standard_LRS"},
            "kind": "StorageV2",
            "properties": {
                "accessTier": "Hot",
                "supportsHttpsTrafficOnly": encryption_of(deployment).in_transit,
                "minimumTlsVersion": "TLS1_2",
                "allowBlobPublicAccess": False,
                "allowSharedKeyAccess": False,
                # Storage encrypts at rest whatever is asked; this makes it explicit.
                "encryption": {
                    "keySource": "Microsoft.Storage",
                    "services": {"blob": {"enabled": True, "keyType": "Account"}},
                },
            },
        }

    def blob_service_body(self, deployment: Deployment) -> Json:
        return {"properties": {"isVersioningEnabled": bool(deployment.spec.versioning)}}

    def container_body(self) -> Json:
        return {"properties": {"publicAccess": "None"}}

    def requests(self, deployment: Deployment, tags: dict[str, str]) -> list[_Request]:
        account = self.arm_path(NAMESPACE, "storageAccounts", self.name(deployment))
        return [
            _Request("PUT", account, self.api_version, self.account_body(deployment, tags)),
            _Request(
                "PUT",
                f"{account}/blobServices/default",
                self.api_version,
                self.blob_service_body(deployment),
            ),
            _Request(
                "PUT",
                f"{account}/blobServices/default/containers/{self.container_name(deployment)}",
                self.api_version,
                self.container_body(),
            ),
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "the blob settings and the container are made once the account is ready "
            "(from a later status poll)",
            "Snapshot keeps the account and its blobs like Retain",
        ]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        self.begin(
            "storage_accounts.begin_create",
            self.name(deployment),
            body=self.account_body(deployment, tags),
        )

    def find(self, deployment: Deployment, name: str | None = None) -> _Found | None:
        account_name = name or self.name(deployment)
        found = self.found("storage_accounts.get_properties", account_name)
        if found is None:
            return None
        if arm_state(found) == "available":
            found.children["blob"] = self.get(
                "blob_services.get_service_properties", self.p.resource_group, account_name
            )
            found.children["container"] = self.get(
                "blob_containers.get",
                self.p.resource_group,
                account_name,
                self.container_name(deployment),
            )
        return found

    def advance(self, deployment: Deployment, found: _Found, tags: dict[str, str]) -> bool:
        if arm_state(found) != "available":
            return False
        sent = False
        blob = found.children.get("blob") or {}
        wanted = bool(deployment.spec.versioning)
        if bool((blob.get("properties") or {}).get("isVersioningEnabled")) != wanted:
            self.call(
                "blob_services.set_service_properties",
                self.p.resource_group,
                found.name,
                body_bytes(self.blob_service_body(deployment)),
            )
            sent = True
        if found.children.get("container") is None:
            self.call(
                "blob_containers.create",
                self.p.resource_group,
                found.name,
                self.container_name(deployment),
                body_bytes(self.container_body()),
            )
            sent = True
        return sent

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        props = found.properties
        state: State = arm_state(found)
        container = found.children.get("container")
        message = f"storage account provisioningState {found.provisioning_state}"
        if state == "available" and container is None:
            provisioning = deployment.phase in (Phase.PENDING, Phase.PROVISIONING)
            state = "creating" if provisioning else "missing"
            message += ", container " + ("not created yet" if provisioning else "gone")
        blob = found.children.get("blob")
        encryption = ((props.get("encryption") or {}).get("services") or {}).get("blob") or {}
        actual: dict[str, Any] = {"encryptionAtRest": bool(encryption.get("enabled", True))}
        if blob is not None:
            actual["versioning"] = bool((blob.get("properties") or {}).get("isVersioningEnabled"))
        endpoint = (props.get("primaryEndpoints") or {}).get("blob")
        return CloudResource(
            cloud_resource_id=found.id,
            state=state,
            message=message,
            endpoint=f"{endpoint}{self.container_name(deployment)}" if endpoint else None,
            port=443,
            actual_spec=actual,
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        # Deleting an account is synchronous and takes its containers with it.
        self.call("storage_accounts.delete", self.p.resource_group, found.name)
        return True

    def quota(self, deployment: Deployment) -> QuotaReport:
        usages = self.call("usages.list_by_location", self.p.region, paged=True)
        for usage in usages:
            if (usage.get("name") or {}).get("value") != "StorageAccounts":
                continue
            used, limit = int(usage.get("currentValue") or 0), int(usage.get("limit") or 0)
            if used + 1 > limit:
                raise QuotaExceeded(
                    f"Azure storage account quota in {self.p.region} would be exceeded: "
                    f"{used} used of {limit}",
                    details={"quota": "StorageAccounts", "used": used, "max": limit},
                )
            return QuotaReport(
                checked=True,
                details={
                    "source": "Microsoft.Storage/locations/usages",
                    "quotas": {"StorageAccounts": {"used": used, "max": limit, "requested": 1}},
                },
            )
        return QuotaReport(
            checked=False, details={"reason": "Azure lists no StorageAccounts usage here"}
        )
