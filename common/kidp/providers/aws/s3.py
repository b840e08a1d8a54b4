"""S3 buckets: globally named, configured after create (versioning,
encryption, public access block, lifecycle).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from kidp.errors import ProvisioningFailed
from kidp.models import (
    CloudResource,
    Deployment,
    ResourceType,
)
from kidp.ports import Credentials
from kidp.providers.aws.base import (
    NAME_PREFIX,
    _AlreadyExists,
    _Call,
    _deployment_piece,
    _Found,
    _Kind,
    _tag_dict,
    _tag_list,
)
from kidp.providers.aws.errors import Refused as _Refused


class _S3Bucket(_Kind):
    key = "s3"
    label = "S3 bucket"
    service = "s3"
    resource_type = ResourceType.BUCKET
    #: Pages of 1,000 object versions removed per delete() call: large buckets
    #: are emptied over several polls instead of in one long call.
    delete_pages_per_call = 5

    def name(self, deployment: Deployment) -> str:
        # Bucket names are global across all AWS accounts: the deployment id
        # piece keeps ours unique, and it differs per deployment.
        piece = _deployment_piece(deployment)
        base = re.sub(
            r"-{2,}", "-", f"{NAME_PREFIX}{deployment.namespace}-{deployment.resource_name}"
        )
        return f"{base[: 63 - len(piece) - 1].rstrip('-')}-{piece}"

    def arn(self, name: str) -> str:
        return f"arn:{self.p.partition}:s3:::{name}"

    def create_params(self, deployment: Deployment, tags: dict[str, str]) -> dict[str, Any]:
        configuration: dict[str, Any] = {"Tags": _tag_list(tags)}
        if self.p.region != "us-east-1":
            configuration["LocationConstraint"] = self.p.region
        return {"Bucket": self.name(deployment), "CreateBucketConfiguration": configuration}

    def config_calls(
        self, deployment: Deployment, tags: Mapping[str, str], existing: Mapping[str, str]
    ) -> list[_Call]:
        name = self.name(deployment)
        # put_bucket_tagging replaces the whole set: keep tags others added.
        merged = {**existing, **tags}
        calls = [
            _Call(
                "s3",
                "put_bucket_tagging",
                {"Bucket": name, "Tagging": {"TagSet": _tag_list(merged)}},
            ),
            _Call(
                "s3",
                "put_public_access_block",
                {
                    "Bucket": name,
                    "PublicAccessBlockConfiguration": {
                        "BlockPublicAcls": True,
                        "IgnorePublicAcls": True,
                        "BlockPublicPolicy": True,
                        "RestrictPublicBuckets": True,
                    },
                },
            ),
            # S3 encrypts every object at rest (SSE-S3) whatever is asked; this
            # makes it explicit and turns on bucket keys.
            _Call(
                "s3",
                "put_bucket_encryption",
                {
                    "Bucket": name,
                    "ServerSideEncryptionConfiguration": {
                        "Rules": [
                            {
                                "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                                "BucketKeyEnabled": True,
                            }
                        ]
                    },
                },
            ),
        ]
        if deployment.spec.versioning:
            calls.append(
                _Call(
                    "s3",
                    "put_bucket_versioning",
                    {"Bucket": name, "VersioningConfiguration": {"Status": "Enabled"}},
                )
            )
        return calls

    def plan(self, deployment: Deployment, tags: dict[str, str]) -> list[_Call]:
        return [
            _Call("s3", "create_bucket", self.create_params(deployment, tags)),
            *self.config_calls(deployment, tags, {}),
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return ["S3 has no snapshots: the Snapshot deletion policy deletes like Delete"]

    def create(
        self, deployment: Deployment, tags: dict[str, str], credentials: Credentials | None
    ) -> None:
        try:
            self.call(
                "create_bucket",
                expect=("BucketAlreadyOwnedByYou", "BucketAlreadyExists"),
                **self.create_params(deployment, tags),
            )
        except _Refused as refused:
            if refused.code == "BucketAlreadyExists":
                raise ProvisioningFailed(
                    f"S3 bucket name '{self.name(deployment)}' is taken by another AWS account"
                ) from None
            raise _AlreadyExists from None

    def converge(
        self,
        deployment: Deployment,
        found: _Found,
        tags: dict[str, str],
        credentials: Credentials | None,
    ) -> bool:
        # Each call is idempotent; re-running them finishes a bucket whose
        # first deploy stopped after create_bucket.
        for call in self.config_calls(deployment, tags, found.tags):
            self.call(call.operation, **call.parameters)
        return True

    def find(self, deployment: Deployment) -> _Found | None:
        name = self.name(deployment)
        try:
            self.call(
                "head_bucket", expect=("404", "NoSuchBucket", "403", "AccessDenied"), Bucket=name
            )
        except _Refused as refused:
            if refused.code in ("404", "NoSuchBucket"):
                return None
            # Exists, but in another account: not ours, and not readable.
            return _Found(name=name, arn=self.arn(name), status="foreign", tags={})
        try:
            response = self.call("get_bucket_tagging", expect=("NoSuchTagSet",), Bucket=name)
            tags = _tag_dict(response.get("TagSet"))
        except _Refused:
            tags = {}
        return _Found(name=name, arn=self.arn(name), status="available", tags=tags)

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        versioning = self.call("get_bucket_versioning", Bucket=found.name)
        try:
            encryption = self.call(
                "get_bucket_encryption",
                expect=("ServerSideEncryptionConfigurationNotFoundError",),
                Bucket=found.name,
            )
            encrypted = bool(encryption.get("ServerSideEncryptionConfiguration", {}).get("Rules"))
        except _Refused:
            encrypted = False
        return CloudResource(
            cloud_resource_id=found.arn,
            state="available",
            message="S3 bucket exists",
            endpoint=f"{found.name}.s3.{self.p.region}.amazonaws.com",
            port=443,
            actual_spec={
                "versioning": versioning.get("Status") == "Enabled",
                "encryptionAtRest": encrypted,
            },
            tags=found.tags,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        for _ in range(self.delete_pages_per_call):
            try:
                page = self.call(
                    "list_object_versions",
                    expect=("NoSuchBucket",),
                    Bucket=found.name,
                    MaxKeys=1000,
                )
            except _Refused:
                return True
            objects = [
                {"Key": item["Key"], "VersionId": item["VersionId"]}
                for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
            ]
            if not objects:
                break
            self.call(
                "delete_objects", Bucket=found.name, Delete={"Objects": objects, "Quiet": True}
            )
        else:
            # Budget used up with objects possibly left: continue next poll.
            return False
        try:
            self.call("delete_bucket", expect=("NoSuchBucket", "BucketNotEmpty"), Bucket=found.name)
        except _Refused as refused:
            # BucketNotEmpty: something wrote to it meanwhile; empty it again next time.
            return refused.code == "NoSuchBucket"
        return True

    def retain(self, deployment: Deployment, found: _Found) -> None:
        merged = {**found.tags, **self.retained_tags()}
        self.call("put_bucket_tagging", Bucket=found.name, Tagging={"TagSet": _tag_list(merged)})

    def untagged_candidates(self) -> Iterator[tuple[str, str, ResourceType]]:
        token = ""
        while True:
            params: dict[str, Any] = {"Prefix": NAME_PREFIX, "BucketRegion": self.p.region}
            if token:
                params["ContinuationToken"] = token
            page = self.call("list_buckets", **params)
            for bucket in page.get("Buckets", []):
                name = bucket["Name"]
                if name.startswith(NAME_PREFIX):
                    yield self.arn(name), name, self.resource_type
            token = page.get("ContinuationToken") or ""
            if not token:
                return
