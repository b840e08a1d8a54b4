"""What the Azure data-plane adapters share: the credential, and where a
Storage table or queue is.

The Table Storage store (:mod:`kidp.stores.azuretable`), the Storage Queue
(:mod:`kidp.queues.azurequeue`) and the Key Vault store
(:mod:`kidp.secrets.keyvault`) authenticate the same way:

* **Microsoft Entra ID** (the default): ``DefaultAzureCredential``, one per
  process, made on first use. In Azure that is the function app's managed
  identity (a user-assigned one is picked by ``AZURE_CLIENT_ID``, which the
  Bicep sets); on a laptop the environment or the Azure CLI's login.
* **A storage connection string** (``KIDP_AZURE_STORAGE_CONNECTION_STRING``):
  an account key or a SAS, for Azurite (its well-known development account)
  or an account without Entra ID. It is a secret: it is read from settings,
  never from a URL, and never logged.

Where the data lives is a URL, as for every other store and queue:
``azuretable://<account>/<table>`` and ``azurequeue://<account>/<queue>``. The
account is a name (``https://<account>.table.core.windows.net``) or a full
host name for another cloud (``azuretable://<account>.table.core.chinacloudapi.cn/kidp``).
With a connection string, the string says how to reach the account and the URL
must name the same account, so a stray string cannot send the broker's state
to another account.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import urlsplit

from kidp.errors import ValidationFailed

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

__all__ = [
    "DEVELOPMENT_ACCOUNT",
    "StorageLocation",
    "connection_string_account",
    "default_credential",
    "parse_storage_url",
]

#: The account ``UseDevelopmentStorage=true`` (and Azurite) stands for.
DEVELOPMENT_ACCOUNT: Final = "devstoreaccount1"

_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_TABLE = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,62}$")
# 3-63 lowercase letters, digits and single hyphens, starting and ending with
# a letter or digit; 56 at most here, so that "<queue>-poison" is a name too.
_QUEUE = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,54}[a-z0-9]$")

Service = Literal["table", "queue"]


class _CredentialHolder:
    """One ``DefaultAzureCredential`` per process: it caches tokens, and every
    adapter should share them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._credential: TokenCredential | None = None

    def __call__(self) -> TokenCredential:
        with self._lock:
            if self._credential is None:
                from azure.identity import DefaultAzureCredential

                # No browser prompts: a broker runs unattended.
                self._credential = DefaultAzureCredential(
                    exclude_interactive_browser_credential=True
                )
            return self._credential

    def forget(self) -> None:
        """Make the next use build a new credential: it reads the managed
        identity endpoint from the environment once, when it is built (tests
        start a new identity endpoint per stand-in)."""
        with self._lock:
            self._credential = None


#: The process's credential, made on first use (no token is asked for until a
#: client needs one).
default_credential = _CredentialHolder()


@dataclass(frozen=True)
class StorageLocation:
    """A Storage table or queue: its account, its name and the service endpoint."""

    account: str
    name: str
    endpoint: str


def parse_storage_url(url: str, *, service: Service) -> StorageLocation:
    """``azuretable://<account>/<table>`` or ``azurequeue://<account>/<queue>``
    (see the module docstring); ``ValidationFailed`` names what is wrong."""
    scheme = f"azure{service}"
    setting = "KIDP_STORE_URL" if service == "table" else "KIDP_QUEUE_URL"
    what = "table" if service == "table" else "queue"
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    name = parts.path.strip("/")
    if parts.scheme != scheme or not host or not name or "/" in name:
        raise ValidationFailed(f"{setting} must be {scheme}://<account>/<{what}>")
    if parts.username or parts.password or parts.query or parts.port:
        raise ValidationFailed(
            f"{setting} names an account and a {what} only; credentials come from "
            "Entra ID or KIDP_AZURE_STORAGE_CONNECTION_STRING"
        )
    account = host.split(".", 1)[0]
    if not _ACCOUNT.match(account):
        raise ValidationFailed(
            f"{setting}: '{account}' is not a storage account name (3-24 lowercase letters "
            "and digits)"
        )
    pattern = _TABLE if service == "table" else _QUEUE
    if not pattern.match(name):
        rule = (
            "3-63 letters and digits, starting with a letter"
            if service == "table"
            else "3-56 lowercase letters, digits and single hyphens"
        )
        raise ValidationFailed(f"{setting}: '{name}' is not a {what} name ({rule})")
    endpoint = f"https://{host}" if "." in host else f"https://{host}.{service}.core.windows.net"
    return StorageLocation(account=account, name=name, endpoint=endpoint)


def connection_string_account(connection_string: str) -> str:
    """The account a storage connection string is for. Only the account name
    is read: the string's other parts (a key, a SAS) never leave it."""
    fields: dict[str, str] = {}
    for part in connection_string.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        return DEVELOPMENT_ACCOUNT
    account = fields.get("accountname", "")
    if not account:
        raise ValidationFailed(
            "KIDP_AZURE_STORAGE_CONNECTION_STRING has no AccountName (nor "
            "UseDevelopmentStorage=true)"
        )
    return account.lower()


def check_same_account(location: StorageLocation, connection_string: str, *, setting: str) -> None:
    """Refuse a connection string for another account than ``location``'s."""
    account = connection_string_account(connection_string)
    if account != location.account:
        raise ValidationFailed(
            f"{setting} names account '{location.account}' but "
            f"KIDP_AZURE_STORAGE_CONNECTION_STRING is for account '{account}'"
        )
