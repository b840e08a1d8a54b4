"""The OpenAPI document, generated from the route table and the models.

``docs/openapi.json`` is this function's output; a test fails when the two
disagree, so the committed contract cannot drift from the code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from kidp.bootstrap import build
from kidp.settings import Settings


def document() -> dict[str, Any]:
    """Build a throwaway broker (in-memory store, no cloud calls) and return its
    OpenAPI document; the description names the default cloud and region."""
    with tempfile.TemporaryDirectory() as state:
        settings = Settings(
            store_url=f"sqlite:///{state}/openapi.db",
            state_dir=Path(state),
            jwt_secret="x" * 32,
            callback_secret="whsec_" + "A" * 44,
            secret_store="local",  # noqa: S106 - the store kind, not a secret
        )
        broker = build(settings)
        try:
            assert broker.app.fastapi is not None
            schema: dict[str, Any] = broker.app.fastapi.openapi()
            return schema
        finally:
            broker.close()
