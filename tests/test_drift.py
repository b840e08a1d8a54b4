from __future__ import annotations

from kidp.drift import compare

DESIRED = {
    "engine": "postgresql",
    "version": "15",
    "size": "medium",
    "storageGb": 100,
    "highAvailability": False,
    "backup": {"enabled": True, "retention": "7d"},
}


def test_patch_update_is_listed_but_not_significant() -> None:
    report = compare(DESIRED, {"engine": "postgresql", "version": "15.2", "size": "medium"})
    assert report.details == ["Version mismatch: desired=15, actual=15.2 (patch update)"]
    assert report.detected and not report.significant
    assert report.fingerprint is None


def test_size_storage_and_backup_changes_are_significant() -> None:
    report = compare(
        DESIRED,
        {
            "engine": "postgresql",
            "version": "15.4",
            "size": "large",
            "storageGb": 200,
            "backupRetentionDays": 1,
        },
    )
    assert report.significant
    assert "Size mismatch: desired=medium, actual=large" in report.details
    assert "StorageGb mismatch: desired=100, actual=200" in report.details
    assert "BackupRetentionDays mismatch: desired=7, actual=1" in report.details
    assert (
        report.fingerprint
        == compare(
            DESIRED,
            {
                "engine": "postgresql",
                "version": "15.4",
                "size": "large",
                "storageGb": 200,
                "backupRetentionDays": 1,
            },
        ).fingerprint
    )


def test_major_version_change_and_missing_resource() -> None:
    assert compare(DESIRED, {"version": "16.1"}).significant
    missing = compare(DESIRED, None)
    assert missing.significant and missing.details == ["Resource missing: not found in the cloud"]
    assert not compare(DESIRED, {"engine": "postgresql", "version": "15"}).detected
