"""Drift: the desired spec against what the cloud reports.

Which differences count (the README lists them): engine, major/minor version,
size, high availability, storage, backup retention, encryption, replicas,
partitions, versioning, and a resource that is gone. A patch-level version
the cloud applied on its own (desired ``15``, actual ``15.4``) is listed with
"(patch update)" but is informational: it does not page anyone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

#: Wire fields compared one to one, in the order they are reported.
_COMPARED = (
    "engine",
    "size",
    "highAvailability",
    "storageGb",
    "backupRetentionDays",
    "encryptionAtRest",
    "replicas",
    "partitions",
    "replicationFactor",
    "versioning",
    "image",
    "port",
)


@dataclass(frozen=True)
class DriftReport:
    details: list[str]
    significant: bool

    @property
    def detected(self) -> bool:
        return bool(self.details)

    @property
    def fingerprint(self) -> str | None:
        """Stable id of this set of significant differences (None when none)."""
        if not self.significant:
            return None
        return hashlib.sha256("\n".join(self.details).encode()).hexdigest()[:16]


def comparable(desired: dict[str, Any]) -> dict[str, Any]:
    """Flatten a wire spec into the fields drift compares."""
    flat = dict(desired)
    backup = flat.pop("backup", None)
    if isinstance(backup, dict) and backup.get("enabled", True):
        flat["backupRetentionDays"] = int(str(backup.get("retention", "7d")).rstrip("d"))
    encryption = flat.pop("encryption", None)
    if isinstance(encryption, dict):
        flat["encryptionAtRest"] = bool(encryption.get("atRest", True))
    return flat


def is_patch_of(desired: str, actual: str) -> bool:
    """``actual`` is ``desired`` with more version components (15 -> 15.4)."""
    return actual.startswith(f"{desired}.")


def compare(desired: dict[str, Any], actual: dict[str, Any] | None) -> DriftReport:
    """Differences between the desired wire spec and the actual one."""
    if actual is None:
        return DriftReport(["Resource missing: not found in the cloud"], significant=True)
    want = comparable(desired)
    details: list[str] = []
    significant = False
    want_version, have_version = want.get("version"), actual.get("version")
    if want_version is not None and have_version is not None and want_version != have_version:
        if is_patch_of(str(want_version), str(have_version)):
            details.append(
                f"Version mismatch: desired={want_version}, actual={have_version} (patch update)"
            )
        else:
            details.append(f"Version mismatch: desired={want_version}, actual={have_version}")
            significant = True
    for field in _COMPARED:
        if field not in want or field not in actual:
            continue
        if want[field] != actual[field]:
            label = field[0].upper() + field[1:]
            details.append(f"{label} mismatch: desired={want[field]}, actual={actual[field]}")
            significant = True
    return DriftReport(details, significant)
