"""The Azure Functions edge on its own: settings, the functions it registers
and their bindings (read back through ``get_functions()``, as the Python
worker indexes them), ``host.json``, the lazy ASGI app, logs, and the dlq
function's requests. The flows through Azurite are in
``tests/azure/test_function_app.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import azure.functions as func
import pytest
from tests.azuretools import Context, http_request, load_function_app, queue_message, timer_request

from kidp.edges import azure as edge
from kidp.errors import ValidationFailed
from kidp.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "KIDP_JWT_SECRET": "j" * 48,
    "KIDP_CALLBACK_SECRET": "whsec_" + "A" * 44,
    "KIDP_QUEUE_URL": "azurequeue://kidpstate/kidp-jobs",
    "KIDP_STORE_URL": "azuretable://kidpstate/kidp",
}


@pytest.fixture(scope="module")
def function_app() -> Iterator[ModuleType]:
    module = load_function_app()
    yield module
    # The SDK's app notifies the ASGI lifespan of shutdown when collected, on a
    # loop that no longer runs; nothing here needs that.
    module.app.startup_task_done = False


@pytest.fixture(scope="module")
def functions(function_app: ModuleType) -> dict[str, Any]:
    """The functions as the worker indexes them (``get_functions()`` runs once
    per app: it refuses to index the same names twice)."""
    return {f.get_function_name(): f for f in function_app.app.get_functions()}


@pytest.fixture(autouse=True)
def fresh_edge() -> Iterator[None]:
    edge.reset()
    yield
    edge.reset()


def bindings(function: Any) -> list[dict[str, Any]]:
    """A function's bindings as the worker reports them to the host (JSON)."""
    return list(json.loads(function.get_function_json())["bindings"])


def call(functions: dict[str, Any], name: str, *args: Any) -> Any:
    """Invoke a function's user code as the worker does (awaiting it if async)."""
    result = functions[name].get_user_function()(*args)
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


# ------------------------------------------------------------------ settings


def test_settings_need_the_shared_secrets_and_the_triggers_queue() -> None:
    settings = edge.settings_from_env(SECRETS)
    assert settings.cloud == "azure"
    assert settings.state_dir == Path("/tmp/kidp")
    assert edge.runs_per_job(settings) == settings.job_max_deliveries - 1
    for missing, words in (
        ("KIDP_CALLBACK_SECRET", "KIDP_CALLBACK_SECRET"),
        ("KIDP_JWT_SECRET", "KIDP_JWT_SECRET or KIDP_JWT_JWKS_URL"),
    ):
        env = {k: v for k, v in SECRETS.items() if k != missing}
        with pytest.raises(ValidationFailed, match=words):
            edge.settings_from_env(env)
    with pytest.raises(ValidationFailed, match="at least 2"):
        edge.settings_from_env({**SECRETS, "KIDP_JOB_MAX_DELIVERIES": "1"})
    for url in ("azurequeue://kidpstate/other", "https://sqs.us-east-1.amazonaws.com/1/kidp-jobs"):
        with pytest.raises(ValidationFailed, match=edge.JOBS_QUEUE):
            edge.settings_from_env({**SECRETS, "KIDP_QUEUE_URL": url})


# ------------------------------------------------------------------ functions and bindings


def test_the_function_app_registers_every_function_from_blueprints(
    functions: dict[str, Any],
) -> None:
    assert set(functions) == {
        "http_app_func",
        "jobs",
        "dlq",
        *(f"scan_{s}" for s in edge.SCHEDULES),
    }
    assert "__init__.py" not in {p.name for p in (ROOT / "azure").iterdir()}


def test_the_api_is_every_route_without_a_functions_key(functions: dict[str, Any]) -> None:
    [trigger] = [b for b in bindings(functions["http_app_func"]) if b["type"] == "httpTrigger"]
    assert trigger["route"] == "/{*route}"
    assert trigger["authLevel"] == "ANONYMOUS"
    assert set(trigger["methods"]) >= {"GET", "POST", "DELETE"}


def test_the_jobs_function_listens_to_the_jobs_queue(functions: dict[str, Any]) -> None:
    [trigger] = bindings(functions["jobs"])
    assert trigger["type"] == "queueTrigger"
    assert trigger["queueName"] == edge.JOBS_QUEUE == "kidp-jobs"
    assert trigger["connection"] == edge.STORAGE_CONNECTION == "AzureWebJobsStorage"


def test_timers_match_the_scan_intervals_of_the_settings(functions: dict[str, Any]) -> None:
    defaults = Settings()
    every = {
        "drift": defaults.drift_interval_seconds,
        "orphans": defaults.orphan_interval_seconds,
        "cost": defaults.cost_interval_seconds,
        "rotation": defaults.rotation_interval_seconds,
        "reconcile": 60.0,  # the settings say 30 s; a timer ticks at most once a minute here
    }
    for name, seconds in every.items():
        [trigger] = bindings(functions[f"scan_{name}"])
        assert trigger["type"] == "timerTrigger"
        assert trigger["schedule"] == edge.SCHEDULES[name]
        assert period(trigger["schedule"]) == seconds, name


def period(ncrontab: str) -> float:
    """The period of the six-field schedules used here (seconds)."""
    second, minute, hour, day, month, weekday = ncrontab.split()
    assert (day, month, weekday) == ("*", "*", "*") and second.isdigit()
    if hour != "*":
        return 86400.0
    if minute == "*":
        return 60.0
    if minute.startswith("*/"):
        return 60.0 * int(minute[2:])
    return 3600.0


def test_the_dlq_function_needs_the_master_key(functions: dict[str, Any]) -> None:
    [trigger, _] = bindings(functions["dlq"])
    assert (trigger["route"], trigger["authLevel"]) == ("dlq", "ADMIN")
    assert set(trigger["methods"]) == {"GET", "POST"}


def test_host_json_matches_the_edge_and_the_settings() -> None:
    host = json.loads((ROOT / "azure" / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensions"]["http"]["routePrefix"] == ""
    queues = host["extensions"]["queues"]
    # The host's poison threshold is the broker's maximum deliveries.
    assert queues["maxDequeueCount"] == Settings().job_max_deliveries
    assert queues["messageEncoding"] == "base64"
    assert host["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"


# ------------------------------------------------------------------ the API


def test_an_unbuildable_broker_answers_500_without_detail(
    functions: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KIDP_CALLBACK_SECRET")
    response = call(functions, "http_app_func", http_request("GET", "/health"), Context())
    assert response.status_code == 500
    assert json.loads(response.get_body()) == {
        "error": "internal_error",
        "message": "the broker is misconfigured; its logs say how",
        "code": 500,
    }


def test_the_lifespan_is_answered_without_building_the_broker() -> None:
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(dict(message))

    asyncio.run(edge.asgi({"type": "lifespan"}, receive, send))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert edge._worker.broker is None


# ------------------------------------------------------------------ timers, logs, dlq


def test_a_scan_logs_json_lines_with_the_invocation_id(
    functions: dict[str, Any], make_broker: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    edge.install(make_broker().broker)
    context = Context("scan_reconcile")
    call(functions, "scan_reconcile", timer_request(past_due=True), context)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert any(
        line["message"] == "scan is past due" and line["correlationId"] == context.invocation_id
        for line in lines
    ), lines
    [finished] = [line for line in lines if line["message"] == "scan finished"]
    assert finished["scan"] == "reconcile"
    assert finished["correlationId"] == context.invocation_id


def test_dlq_requests(functions: dict[str, Any], make_broker: Callable[..., Any]) -> None:
    edge.install(make_broker().broker)
    listed = call(functions, "dlq", http_request("GET", "/dlq"), Context())
    assert listed.status_code == 200
    assert json.loads(listed.get_body()) == {"jobs": [], "callbacks": []}
    redriven = call(
        functions, "dlq", http_request("POST", "/dlq", body={"action": "redrive"}), Context()
    )
    assert json.loads(redriven.get_body())["callbacks"] == {
        "resolved": [],
        "failed": [],
        "remaining": 0,
    }
    for body, status, error in (
        ({"action": "explode"}, 400, "validation_failed"),
        ([1, 2], 400, "invalid_request"),
    ):
        answer = call(functions, "dlq", http_request("POST", "/dlq", body=body), Context())
        assert answer.status_code == status
        assert json.loads(answer.get_body())["error"] == error
    not_json = func.HttpRequest(method="POST", url="https://x/dlq", body=b"{nope", headers={})
    assert call(functions, "dlq", not_json, Context()).status_code == 400


def test_dlq_reads_include_resolved_and_limit_strictly(
    functions: dict[str, Any], dlq_broker: Any
) -> None:
    harness = dlq_broker
    edge.install(harness.broker)

    def post(body: Any) -> tuple[int, Any]:
        answer = call(functions, "dlq", http_request("POST", "/dlq", body=body), Context())
        return answer.status_code, json.loads(answer.get_body())

    for flag, listed in (
        ("false", ["dl-open"]),
        (False, ["dl-open"]),
        ("true", ["dl-open", "dl-resolved"]),
        (True, ["dl-open", "dl-resolved"]),
    ):
        status, body = post({"action": "list", "includeResolved": flag})
        assert status == 200
        assert sorted(c["id"] for c in body["callbacks"]) == listed, flag
    for bad in (
        {"includeResolved": "no"},
        {"includeResolved": 1},
        {"includeResolved": None},
        {"action": "redrive", "limit": "ten"},
        {"action": "redrive", "limit": -1},
        {"action": "redrive", "limit": True},
        {"action": "redrive", "ids": "dl-open"},
    ):
        status, body = post(bad)
        assert status == 400, bad
        assert body["error"] == "validation_failed" and body["message"], bad
    # Refused before anything was done.
    assert harness.store.get_dead_letter("dl-open").resolved_at is None


def test_the_jobs_function_refuses_a_broker_on_another_queue(
    functions: dict[str, Any], make_broker: Callable[..., Any]
) -> None:
    edge.install(make_broker().broker)  # its queue is the SQLite table
    with pytest.raises(ValidationFailed, match="Storage Queue"):
        call(functions, "jobs", queue_message())
