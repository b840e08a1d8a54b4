"""AWS clients for the broker's AWS adapters (provider, DynamoDB store, SQS
queue, Secrets Manager store), made with botocore directly.

boto3 adds resources and S3 transfers on top of botocore's clients; the broker
uses neither, and importing boto3 (s3transfer, multiprocessing) costs about
70 ms of every Lambda cold start. The clients are the same objects boto3's
``Session.client`` returns. Every adapter of a process makes its clients
with :data:`new_client`, from one session: a session loads the endpoint and
service models once, and a Lambda should pay for that once, not per adapter.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from botocore.config import Config
    from botocore.session import Session


class ClientFactory:
    """Creates clients from one private botocore session, created on first use.

    Sessions are not thread-safe and clients are, so creation is serialised
    and the clients may then be shared between threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._session: Session | None = None

    def __call__(
        self,
        service: str,
        *,
        region_name: str | None,
        endpoint_url: str | None,
        config: Config,
    ) -> Any:
        """A new client for ``service``; ``endpoint_url`` points it at a stand-in."""
        with self._lock:
            if self._session is None:
                import botocore.session

                self._session = botocore.session.get_session()
            return self._session.create_client(
                service, region_name=region_name, endpoint_url=endpoint_url, config=config
            )


#: The process's client factory, shared by every AWS adapter.
new_client = ClientFactory()
