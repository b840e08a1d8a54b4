"""Cold start of each Lambda function in ``aws/handlers.py``.

    .venv/bin/python bench/cold_start.py [--runs 5] [--artifact ZIP]

For each function (api, worker, scan, dlq), every run is a fresh interpreter
that does what Lambda does: with ``_HANDLER=handlers.<name>`` set, import
``aws/handlers.py`` (Lambda's init phase: the modules the function needs, and
the broker built once), then invoke the function with its event from
``tests/events``. Per function, medians over the runs of:

* import ms: ``python -X importtime``'s cumulative time of ``import handlers``
  minus the time its own code ran, i.e. the modules the function imports;
* build ms: that own code, i.e. the broker built in the init phase (clients
  and objects; no network calls);
* init ms: wall time of ``import handlers`` (without ``-X importtime``, which
  slows imports down);
* 1st call ms: wall time from the start of the import to the first response.
  For ``api`` the call is ``GET /health`` through an API Gateway HTTP API
  event, which checks the store, the queue and STS (three AWS calls); the
  worker gets an SQS event with one job, scan ``{"scan": "reconcile"}``, dlq
  ``{"action": "list"}``;
* init cpu, 1st cpu: the same two as CPU time of the process, which other load
  on the machine disturbs less (it leaves out the wait for AWS's answers).

The dependencies come from the Lambda artifact when there is one (``--artifact``,
or the zip ``scripts/check-serverless.sh`` builds), run by the bare interpreter
with ``-S`` so nothing of the virtualenv is on the path, as on Lambda; else
from this virtualenv (which also holds test and CLI extras: slower). The
broker's code is always the work tree's. AWS is moto, started by this process
as a server: the measured processes import nothing of moto and reach DynamoDB,
SQS and STS over loopback. Tracing is off; with active tracing the X-Ray SDK
adds the import time printed at the end. Targets (issue 3): each import
< 300 ms, ``api``'s first response < 500 ms including the import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "tests" / "events"
DEFAULT_ARTIFACT = ROOT / "node_modules" / ".cache" / "kidp-lambda" / "x86_64" / "kidp-broker.zip"
FUNCTIONS = ("api", "worker", "scan", "dlq")
IMPORT_TARGET_MS = 300.0
API_FIRST_RESPONSE_TARGET_MS = 500.0

#: Runs in the child: import the handlers (timed), invoke once (timed), report.
CHILD = r"""
import json, sys, time
started, started_cpu = time.perf_counter(), time.process_time()
sys.path[:0] = {paths!r}
import handlers
imported, imported_cpu = time.perf_counter(), time.process_time()

class Context:
    function_name = "kidp-broker-bench"
    memory_limit_in_mb = 1024
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:kidp-broker-bench"
    aws_request_id = "bench-request"
    def get_remaining_time_in_millis(self):
        return 30000

event = json.loads({event!r})
result = getattr(handlers, {function!r})(event, Context())
answered, answered_cpu = time.perf_counter(), time.process_time()
web = [m for m in ("fastapi", "starlette", "uvicorn", "mangum") if m in sys.modules]
print("BENCH " + json.dumps({{
    "init_ms": (imported - started) * 1000,
    "first_ms": (answered - started) * 1000,
    "init_cpu_ms": (imported_cpu - started_cpu) * 1000,
    "first_cpu_ms": (answered_cpu - started_cpu) * 1000,
    "status": result.get("statusCode") if isinstance(result, dict) else None,
    "web": web,
}}))
"""

_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def event_for(function: str, queue_arn: str) -> dict[str, object]:
    """The function's first event, from the fixtures."""
    if function == "api":
        return dict(json.loads((EVENTS / "apigw_http_v2.json").read_text()))
    if function == "worker":
        batch = json.loads((EVENTS / "sqs_batch.json").read_text())
        # A job for a deployment that does not exist: one store read, then done.
        batch["Records"][0]["eventSourceARN"] = queue_arn
        return dict(batch)
    if function == "scan":
        return {"scan": "reconcile"}
    return {"action": "list"}


def importtime(output: str, module: str = "handlers") -> tuple[float, float]:
    """(cumulative ms, self ms) of ``module`` in ``-X importtime`` output. For
    ``handlers`` the self part is its own code running: the broker's build."""
    for line in output.splitlines():
        match = _IMPORT_LINE.match(line)
        if match and match.group(4) == module:
            return int(match.group(2)) / 1000, int(match.group(1)) / 1000
    raise RuntimeError(f"{module} not found in the -X importtime output")


def run_child(
    function: str, env: dict[str, str], runtime: Runtime, *, importtime_on: bool
) -> dict[str, Any]:
    """One fresh interpreter: import the handlers as Lambda's init does, invoke
    the function once. With ``importtime_on`` the import is measured by
    ``-X importtime`` (which slows it down, so wall times come from runs
    without it)."""
    event = event_for(function, env["BENCH_QUEUE_ARN"])
    code = CHILD.format(paths=runtime.paths, event=json.dumps(event), function=function)
    flags = ["-X", "importtime"] if importtime_on else []
    done = subprocess.run(
        [*runtime.python, *flags, "-c", code],
        env={**env, "_HANDLER": f"handlers.{function}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{function} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = dict(json.loads(lines[-1].removeprefix("BENCH ")))
    if function != "api" and result["web"]:
        raise RuntimeError(f"{function} imported the web framework: {result['web']}")
    if importtime_on:
        total, build = importtime(done.stderr)
        result.update(import_ms=total - build, build_ms=build)
    return result


@dataclass
class Row:
    """One function's medians."""

    function: str
    import_ms: float
    build_ms: float
    init_ms: float
    first_ms: float
    init_cpu_ms: float
    first_cpu_ms: float
    status: int | None


@dataclass
class Runtime:
    """Which interpreter runs the functions, and where their code comes from."""

    python: list[str]
    paths: list[str]
    label: str


def runtime_for(artifact: Path | None, scratch: Path) -> Runtime:
    """The Lambda artifact's dependencies under the bare interpreter (``-S``: no
    site-packages, as on Lambda), or this virtualenv when there is no artifact.
    The broker's code always comes from the work tree."""
    code = [str(ROOT / "aws"), str(ROOT / "common")]
    if artifact is None:
        return Runtime([sys.executable], code, f"the virtualenv ({sys.prefix})")
    site = scratch / "artifact"
    with zipfile.ZipFile(artifact) as archive:
        archive.extractall(site)
    base = getattr(sys, "_base_executable", sys.executable)
    return Runtime([base, "-S", "-E"], [*code, str(site)], f"the Lambda artifact {artifact}")


def xray_import_ms(runtime: Runtime, runs: int) -> float:
    """What importing the X-Ray SDK adds once the broker is loaded (tracing on)."""
    code = (
        f"import sys; sys.path[:0] = {runtime.paths!r}; "
        "import kidp.bootstrap; import aws_xray_sdk.core"
    )
    samples = []
    for _ in range(runs):
        done = subprocess.run(
            [*runtime.python, "-X", "importtime", "-c", code],
            capture_output=True,
            text=True,
            check=True,
        )
        samples.append(importtime(done.stderr, "aws_xray_sdk.core")[0])
    return statistics.median(samples)


def prepare(endpoint: str, state: str) -> dict[str, str]:
    """Queues, table and environment as ``serverless.yml`` sets them up."""
    import boto3

    from kidp.stores.dynamodb import DynamoDbDeploymentStore

    sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=endpoint)
    dlq = sqs.create_queue(QueueName="kidp-bench-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    queue = sqs.create_queue(
        QueueName="kidp-bench",
        Attributes={
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "10"})
        },
    )["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    DynamoDbDeploymentStore("kidp-bench", region="us-east-1", endpoint_url=endpoint).create_table()
    from kidp.callbacks import generate_secret

    return {
        **os.environ,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "KIDP_STORE_URL": "dynamodb://kidp-bench",
        "KIDP_QUEUE_URL": queue,
        "KIDP_AWS_ENDPOINT_URL": endpoint,
        "KIDP_JWT_SECRET": "bench-secret-" + "x" * 32,
        "KIDP_CALLBACK_SECRET": generate_secret(),
        "KIDP_LOG_LEVEL": "WARNING",
        "KIDP_STATE_DIR": state,
        "BENCH_QUEUE_ARN": queue_arn,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="the Lambda zip whose dependencies to run on (default: the one "
        "scripts/check-serverless.sh builds, if present; else this virtualenv)",
    )
    args = parser.parse_args()

    from kidp.emulator import start_aws_emulator

    artifact = args.artifact
    if artifact is None and DEFAULT_ARTIFACT.exists():
        artifact = DEFAULT_ARTIFACT
    emulator = start_aws_emulator()
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="kidp-cold-") as scratch:
            runtime = runtime_for(artifact, Path(scratch))
            env = prepare(emulator.endpoint_url, scratch)
            for function in FUNCTIONS:
                timed = [
                    run_child(function, env, runtime, importtime_on=True) for _ in range(args.runs)
                ]
                plain = [
                    run_child(function, env, runtime, importtime_on=False) for _ in range(args.runs)
                ]
                rows.append(
                    Row(
                        function=function,
                        import_ms=statistics.median(r["import_ms"] for r in timed),
                        build_ms=statistics.median(r["build_ms"] for r in timed),
                        init_ms=statistics.median(r["init_ms"] for r in plain),
                        first_ms=statistics.median(r["first_ms"] for r in plain),
                        init_cpu_ms=statistics.median(r["init_cpu_ms"] for r in plain),
                        first_cpu_ms=statistics.median(r["first_cpu_ms"] for r in plain),
                        status=plain[-1]["status"],
                    )
                )
            xray = xray_import_ms(runtime, args.runs)
    finally:
        emulator.stop()

    print(
        f"cold start, median of {args.runs} fresh interpreters, dependencies from {runtime.label}"
    )
    print(
        f"{'function':<8} {'import ms':>10} {'build ms':>9} {'init ms':>8} "
        f"{'1st call ms':>11} {'init cpu':>9} {'1st cpu':>8}  target"
    )
    for row in rows:
        ok_import = row.import_ms < IMPORT_TARGET_MS
        target = f"import<{IMPORT_TARGET_MS:.0f} {'ok' if ok_import else 'MISSED'}"
        if row.function == "api":
            ok_first = row.first_ms < API_FIRST_RESPONSE_TARGET_MS
            target += f", 1st<{API_FIRST_RESPONSE_TARGET_MS:.0f} {'ok' if ok_first else 'MISSED'}"
            target += f" (HTTP {row.status})"
        print(
            f"{row.function:<8} {row.import_ms:>10.0f} {row.build_ms:>9.0f} "
            f"{row.init_ms:>8.0f} {row.first_ms:>11.0f} {row.init_cpu_ms:>9.0f} "
            f"{row.first_cpu_ms:>8.0f}  {target}"
        )
    print(f"with active tracing, the X-Ray SDK adds ~{xray:.0f} ms of imports")
    print(
        "import: -X importtime total of `import handlers` minus the build; build: the broker "
        "built in the init phase; init: wall time of the import; 1st call: init + first "
        "response; cpu: the same two as the process's CPU time (less sensitive to other "
        "load on the machine; excludes waiting for AWS)"
    )


if __name__ == "__main__":
    main()
