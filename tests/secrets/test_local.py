"""The embedded secret store: one encrypted file, safe across threads and processes."""

from __future__ import annotations

import multiprocessing
import secrets
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from kidp.errors import NotFound, TemporaryError
from kidp.models import SecretRef
from kidp.ports import SecretStore
from kidp.secrets.local import LocalSecretStore, load_or_create_key

NAMES = [f"db-{i}-credentials" for i in range(8)]


def random_credentials() -> dict[str, str]:
    return {"username": "kidpadmin", "password": secrets.token_urlsafe(24)}


@pytest.fixture
def key() -> bytes:
    return Fernet.generate_key()


@pytest.fixture
def store(tmp_path: Path, key: bytes) -> LocalSecretStore:
    return LocalSecretStore(tmp_path / "state" / "secrets.enc", key=key)


def test_implements_the_port(store: LocalSecretStore) -> None:
    port: SecretStore = store  # checked by mypy: the adapter matches the Protocol
    assert port is store


def test_ensure_creates_once_and_never_regenerates(store: LocalSecretStore) -> None:
    ref, value = store.ensure("pg-credentials", random_credentials, {"team": "platform"})
    assert ref == SecretRef(
        store="local-file", name="pg-credentials", id="local://pg-credentials", version="1"
    )

    def must_not_run() -> dict[str, str]:
        raise AssertionError("create() called for an existing secret")

    again_ref, again = store.ensure("pg-credentials", must_not_run, {})
    assert (again_ref, again) == (ref, value)


def test_put_version_adds_a_current_version(store: LocalSecretStore) -> None:
    store.ensure("pg", random_credentials, {})
    rotated = {"username": "kidpadmin", "password": "new-password-value"}

    ref = store.put_version("pg", rotated)

    assert ref.version == "2"
    assert ref.id == "local://pg"
    assert store.ensure("pg", random_credentials, {}) == (ref, rotated)
    assert store.put_version("pg", random_credentials()).version == "3"


def test_put_version_of_missing_secret_is_not_found(store: LocalSecretStore) -> None:
    with pytest.raises(NotFound):
        store.put_version("missing", {"password": "x"})


def test_delete_is_idempotent(store: LocalSecretStore) -> None:
    _, first = store.ensure("pg", random_credentials, {})
    store.delete("pg")
    store.delete("pg")
    store.delete("never-existed")
    ref, second = store.ensure("pg", random_credentials, {})
    assert ref.version == "1"
    assert second != first


def test_file_is_encrypted_and_private(store: LocalSecretStore, tmp_path: Path) -> None:
    store.ensure("pg", lambda: {"password": "PLAINTEXT-SENTINEL-42"}, {"team": "TEAM-SENTINEL"})
    path = tmp_path / "state" / "secrets.enc"
    raw = path.read_bytes()
    assert b"PLAINTEXT-SENTINEL-42" not in raw
    assert b"TEAM-SENTINEL" not in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_survives_reopening_with_the_same_key(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "secrets.enc"
    _, value = LocalSecretStore(path, key=key).ensure("pg", random_credentials, {})
    assert LocalSecretStore(path, key=key).ensure("pg", random_credentials, {})[1] == value


def test_wrong_key_is_a_temporary_error(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "secrets.enc"
    LocalSecretStore(path, key=key).ensure("pg", random_credentials, {})
    other = LocalSecretStore(path, key=Fernet.generate_key())
    with pytest.raises(TemporaryError, match="cannot be decrypted"):
        other.check()
    with pytest.raises(TemporaryError):
        other.ensure("pg", random_credentials, {})


def test_check_passes_on_a_fresh_store(store: LocalSecretStore) -> None:
    store.check()
    store.ensure("pg", random_credentials, {})
    store.check()


def test_failing_create_writes_nothing(store: LocalSecretStore, tmp_path: Path) -> None:
    def broken() -> dict[str, str]:
        raise RuntimeError("no entropy")

    with pytest.raises(RuntimeError):
        store.ensure("pg", broken, {})
    assert not (tmp_path / "state" / "secrets.enc").exists()


def test_threads_share_one_value(store: LocalSecretStore) -> None:
    barrier = threading.Barrier(8)
    seen: list[dict[str, str]] = []

    def worker() -> None:
        barrier.wait()
        seen.append(store.ensure("shared", random_credentials, {})[1])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8
    assert all(value == seen[0] for value in seen)


def _ensure_all(path: str, key: bytes, barrier: Any, results: Any) -> None:
    store = LocalSecretStore(Path(path), key=key)
    barrier.wait()
    results.put({name: store.ensure(name, random_credentials, {})[1] for name in NAMES})


def test_processes_racing_on_ensure_get_the_same_values(tmp_path: Path, key: bytes) -> None:
    # fork: the child runs a function of this test module, which --import-mode=importlib
    # does not make importable by name for a spawned interpreter.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    path = str(tmp_path / "secrets.enc")
    procs = [ctx.Process(target=_ensure_all, args=(path, key, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(timeout=20)
        assert p.exitcode == 0
    assert all(outcome == outcomes[0] for outcome in outcomes)
    stored = LocalSecretStore(Path(path), key=key)
    for name in NAMES:
        ref, value = stored.ensure(name, random_credentials, {})
        assert ref.version == "1"
        assert value == outcomes[0][name]


def test_load_or_create_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "secrets.key"
    key = load_or_create_key(path)
    Fernet(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key


def test_load_or_create_key_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "secrets.key"
    path.write_bytes(b"not a key\n")
    with pytest.raises(ValueError, match="does not hold a Fernet key"):
        load_or_create_key(path)


def test_load_or_create_key_races_to_one_key(tmp_path: Path) -> None:
    path = tmp_path / "secrets.key"
    barrier = threading.Barrier(6)
    keys: list[bytes] = []

    def worker() -> None:
        barrier.wait()
        keys.append(load_or_create_key(path))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["secrets.key"]
