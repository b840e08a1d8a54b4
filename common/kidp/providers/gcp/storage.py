"""Cloud Storage buckets, through ``google-cloud-storage`` (the JSON API v1).

Bucket names are global across every Google Cloud project, so the name
carries a piece of the deployment id. Buckets are made private (uniform
bucket-level access, public access prevention enforced), versioned on
request, labelled and placed in the broker's region. Cloud Storage encrypts
every object at rest; a configured KMS key becomes the default key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kidp.models import CloudResource, Deployment, ResourceType
from kidp.ports import Credentials
from kidp.providers.gcp.base import (
    _Found,
    _Kind,
    _Refused,
    _Request,
    piece_name,
)


class _Bucket(_Kind):
    key = "storage"
    label = "Cloud Storage bucket"
    api = "storage"
    resource_type = ResourceType.BUCKET
    #: Object versions removed per delete() call: a large bucket is emptied
    #: over several polls instead of in one long call.
    delete_objects_per_call = 500

    def name(self, deployment: Deployment) -> str:
        return piece_name(deployment, 63)

    @staticmethod
    def resource_id(name: str) -> str:
        return f"projects/_/buckets/{name}"

    def body(self, deployment: Deployment, labels: dict[str, str]) -> dict[str, Any]:
        """The bucket resource ``buckets.insert`` sends."""
        body: dict[str, Any] = {
            "name": self.name(deployment),
            "location": self.p.region,
            "labels": labels,
            "versioning": {"enabled": bool(deployment.spec.versioning)},
            "iamConfiguration": {
                "uniformBucketLevelAccess": {"enabled": True},
                "publicAccessPrevention": "enforced",
            },
        }
        if self.p.kms_key:
            body["encryption"] = {"defaultKmsKeyName": self.p.kms_key}
        return body

    def plan(self, deployment: Deployment, labels: dict[str, str]) -> list[_Request]:
        return [
            _Request(
                "POST",
                f"{self.endpoint}/storage/v1/b?project={self.p.project}",
                self.body(deployment, labels),
            )
        ]

    def notes(self, deployment: Deployment) -> list[str]:
        return [
            "Cloud Storage has no bucket snapshots: the Snapshot deletion policy keeps "
            "the bucket as Retain does",
        ]

    def create(
        self, deployment: Deployment, labels: dict[str, str], credentials: Credentials | None
    ) -> None:
        body = self.body(deployment, labels)
        bucket = self.client.bucket(body["name"])
        bucket.labels = body["labels"]
        bucket.versioning_enabled = body["versioning"]["enabled"]
        bucket.iam_configuration.uniform_bucket_level_access_enabled = True
        bucket.iam_configuration.public_access_prevention = "enforced"
        if self.p.kms_key:
            bucket.default_kms_key_name = self.p.kms_key
        # Taken: ours from a lost answer, or another project's (find() tells).
        self.start_create(
            "buckets.insert",
            lambda: self.client.create_bucket(
                bucket, location=self.p.region, **self.p.call_options
            ),
        )

    def _found(self, bucket: Any) -> _Found:
        return _Found(
            name=bucket.name,
            resource_id=self.resource_id(bucket.name),
            state="available",
            labels=dict(bucket.labels or {}),
            raw=bucket,
        )

    def find(self, deployment: Deployment) -> _Found | None:
        name = self.name(deployment)
        try:
            bucket = self.call(
                "buckets.get",
                lambda: self.client.get_bucket(name, **self.p.call_options),
                expect=(404, 403),
            )
        except _Refused as refused:
            if refused.status == 404:
                return None
            # It exists in a project we cannot read: not ours.
            return _Found(name=name, resource_id=self.resource_id(name), state="foreign", labels={})
        return self._found(bucket)

    def status(self, deployment: Deployment, found: _Found) -> CloudResource:
        bucket = found.raw
        return CloudResource(
            cloud_resource_id=found.resource_id,
            state="available",
            message=f"Cloud Storage bucket in {bucket.location}",
            endpoint=f"{found.name}.storage.googleapis.com",
            port=443,
            actual_spec={
                "versioning": bool(bucket.versioning_enabled),
                # Cloud Storage has no unencrypted objects.
                "encryptionAtRest": True,
            },
            resource_usage={"location": bucket.location},
            tags=found.labels,
        )

    def delete(self, deployment: Deployment, found: _Found) -> bool:
        blobs = self.call(
            "objects.list",
            lambda: list(
                self.client.list_blobs(
                    found.name,
                    versions=True,
                    max_results=self.delete_objects_per_call,
                    **self.p.call_options,
                )
            ),
            expect=(404,),
        )
        for blob in blobs:
            try:
                self.call(
                    "objects.delete",
                    lambda blob=blob: (
                        self.client.bucket(found.name)
                        .blob(blob.name, generation=blob.generation)
                        .delete(**self.p.call_options)
                    ),
                    expect=(404,),
                )
            except _Refused:
                continue  # deleted meanwhile
        if len(blobs) >= self.delete_objects_per_call:
            return False  # more may be left: continue next poll
        try:
            self.call(
                "buckets.delete",
                lambda: self.client.bucket(found.name).delete(**self.p.call_options),
                expect=(404, 409),
            )
        except _Refused as refused:
            # 409: something wrote to it meanwhile; empty it again next poll.
            return refused.status == 404
        return True

    def relabel(self, found: _Found, labels: dict[str, str]) -> None:
        bucket = self.client.bucket(found.name)
        bucket.labels = labels
        self.call("buckets.patch", lambda: bucket.patch(**self.p.call_options))

    def list_all(self) -> Iterator[tuple[str, str, dict[str, str]]]:
        buckets = self.call(
            "buckets.list",
            lambda: list(self.client.list_buckets(project=self.p.project, **self.p.call_options)),
        )
        for bucket in buckets:
            found = self._found(bucket)
            yield found.resource_id, found.name, found.labels
