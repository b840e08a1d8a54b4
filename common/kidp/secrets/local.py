"""The embedded default secret store: one Fernet-encrypted file.

The whole store (every secret, every version) is a single encrypted JSON
document, so there is no plaintext on disk and no partially written secret:
each change rewrites the file to a temporary file and renames it over the old
one. Changes are serialized across threads and processes with ``flock`` on a
separate lock file (the data file itself is replaced, so it cannot carry the
lock). POSIX only, like the embedded broker it serves.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypedDict, cast

from cryptography.fernet import Fernet, InvalidToken

from kidp.errors import NotFound, TemporaryError
from kidp.models import SecretRef

STORE_NAME: Final = "local-file"
_FORMAT = 1


class _Version(TypedDict):
    version: int
    value: dict[str, str]
    created_at: str


class _Secret(TypedDict):
    tags: dict[str, str]
    versions: list[_Version]


class _Document(TypedDict):
    format: int
    secrets: dict[str, _Secret]


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable, not only the file's contents.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new 0600 temporary file next to ``path`` and return it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def load_or_create_key(path: Path) -> bytes:
    """Read the Fernet key at ``path``, creating it (mode 0600) if it does not exist.

    Safe when several processes start at once: the key is published with a
    hard link, which never overwrites, so every process ends up with the key
    that was linked first.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = _write_private(path, Fernet.generate_key() + b"\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        _fsync_dir(path.parent)
    key = path.read_bytes().strip()
    try:
        Fernet(key)
    except ValueError as exc:
        raise ValueError(f"{path} does not hold a Fernet key") from exc
    return key


class LocalSecretStore:
    """:class:`kidp.ports.SecretStore` backed by one encrypted file.

    References look like ``SecretRef(store="local-file", name=name,
    id="local://<name>", version="<n>")``; versions count from 1.
    """

    name: Final = STORE_NAME

    def __init__(self, path: Path, *, key: bytes) -> None:
        self._path = Path(path)
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        self._fernet = Fernet(key)
        # flock already excludes other threads (each call opens its own file
        # description); the mutex just avoids waking them all in the kernel.
        self._mutex = threading.Lock()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise TemporaryError(f"local secret store is not writable: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                # Closing the descriptor releases the lock.
                os.close(fd)

    def _load(self) -> _Document:
        try:
            token = self._path.read_bytes()
        except FileNotFoundError:
            return {"format": _FORMAT, "secrets": {}}
        except OSError as exc:
            raise TemporaryError(f"local secret store cannot be read: {exc}") from exc
        try:
            plain = self._fernet.decrypt(token)
        except InvalidToken:
            # Temporary on purpose: after the operator restores the right key,
            # redelivered jobs go through instead of failing deployments.
            raise TemporaryError(
                f"local secret store {self._path} cannot be decrypted with the configured key"
            ) from None
        document = cast(_Document, json.loads(plain))
        if document.get("format") != _FORMAT:
            raise TemporaryError(f"local secret store {self._path} has an unknown format")
        return document

    def _save(self, document: _Document) -> None:
        token = self._fernet.encrypt(json.dumps(document, separators=(",", ":")).encode())
        try:
            tmp = _write_private(self._path, token)
            try:
                os.replace(tmp, self._path)
            except BaseException:
                os.unlink(tmp)
                raise
            _fsync_dir(self._path.parent)
        except OSError as exc:
            raise TemporaryError(f"local secret store cannot be written: {exc}") from exc

    def _ref(self, name: str, version: int) -> SecretRef:
        return SecretRef(store=STORE_NAME, name=name, id=f"local://{name}", version=str(version))

    def ensure(
        self,
        name: str,
        create: Callable[[], dict[str, str]],
        tags: dict[str, str],
    ) -> tuple[SecretRef, dict[str, str]]:
        """Return the current version of ``name``, creating version 1 from ``create()``
        if it does not exist. An existing value is never regenerated."""
        with self._locked():
            document = self._load()
            secret = document["secrets"].get(name)
            if secret is None:
                value = dict(create())
                secret = {
                    "tags": dict(tags),
                    "versions": [{"version": 1, "value": value, "created_at": _now()}],
                }
                document["secrets"][name] = secret
                self._save(document)
            current = secret["versions"][-1]
            return self._ref(name, current["version"]), dict(current["value"])

    def put_version(self, name: str, value: dict[str, str]) -> SecretRef:
        """Add ``value`` as the new current version of ``name``; raises ``NotFound``
        if the secret does not exist (rotation only replaces what ``ensure`` made)."""
        with self._locked():
            document = self._load()
            secret = document["secrets"].get(name)
            if secret is None:
                raise NotFound(f"secret {name} does not exist")
            version = secret["versions"][-1]["version"] + 1
            secret["versions"].append(
                {"version": version, "value": dict(value), "created_at": _now()}
            )
            self._save(document)
            return self._ref(name, version)

    def delete(self, name: str) -> None:
        """Delete ``name`` and all its versions; deleting an absent secret succeeds."""
        with self._locked():
            document = self._load()
            if document["secrets"].pop(name, None) is not None:
                self._save(document)

    def check(self) -> None:
        """Raise ``TemporaryError`` if the file cannot be read, decrypted or written."""
        self._load()
        directory = self._path.parent
        if directory.exists() and not os.access(directory, os.W_OK):
            raise TemporaryError(f"local secret store directory {directory} is not writable")
