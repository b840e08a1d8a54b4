"""kidp-broker: run the KIDP deployment broker, or talk to one.

Settings come from KIDP_* environment variables (see the README); each command
reads them once, builds the broker and calls one core function.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kidp.errors import BrokerError, ValidationFailed
from kidp.settings import Settings

log = logging.getLogger("kidp.cli")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {"provider": getattr(args, "provider", None), **extra}
    return Settings.from_env(**overrides)


def settings_environ(overrides: Mapping[str, Any]) -> dict[str, str]:
    """``KIDP_*`` variables that carry ``overrides`` (Settings fields) to a child
    process, which reads its settings from the environment like any other."""
    environ = {}
    for name, value in overrides.items():
        if value is None:
            continue
        text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        environ[f"KIDP_{name.upper()}"] = text
    return environ


def _attach(args: argparse.Namespace) -> dict[str, Any]:
    """With ``--emulate``: the settings of the running ``serve --emulate``, so
    ``scan`` and ``dlq`` reach its emulated cloud and its store."""
    if not getattr(args, "emulate", False):
        return {}
    from kidp.emulator import EmulationRecord, apply_environ

    base = _settings(args)
    record = EmulationRecord.read(base.state_dir, base.provider_name)
    apply_environ(record.environ)
    return dict(record.settings)


def cmd_serve(args: argparse.Namespace) -> int:
    """The API, workers, watcher and timers (or the parts ``--role`` names)."""
    from kidp.observability import configure_logging
    from kidp.runtime import EmbeddedBroker, role_parts
    from kidp.supervisor import Supervisor, supervised

    if args.supervised_by:
        supervised(args.supervised_by, nice=args.nice)
    configure_logging(_settings(args).log_level)
    parts = role_parts(args.role)
    supervisor = Supervisor(env=os.environ)
    try:
        overrides, emulated_environ = _emulate(args, supervisor) if args.emulate else ({}, {})
        settings = _settings(args, **overrides)
        local = parts
        background = parts - {"api"}
        if "api" in parts and background and args.worker_processes > 0:
            # Accepts must not queue behind provisioning: the API keeps this
            # process to itself and the rest runs beside it, at lower priority.
            supervisor.env = {**os.environ, **settings_environ(overrides)}
            provider = ["--provider", settings.provider_name]
            supervisor.start(
                "background",
                ["serve", "--role", ",".join(sorted(background)), "--port", "0", *provider],
            )
            for n in range(1, args.worker_processes):
                supervisor.start(
                    f"worker-{n}", ["serve", "--role", "worker", "--port", "0", *provider]
                )
            local = frozenset({"api"})
        from kidp.bootstrap import build

        runtime = EmbeddedBroker(
            build(settings), host=args.host, port=args.port, role=",".join(sorted(local))
        )
        runtime.start()
        if args.emulate:
            from kidp.emulator import EmulationRecord

            EmulationRecord(
                pid=os.getpid(),
                provider=settings.provider_name,
                url=f"http://{args.host}:{args.port}",
                settings=dict(overrides),
                environ=emulated_environ,
            ).write(settings.state_dir)
        if "api" in parts or args.port:
            log.info(
                "kidp-broker serving",
                extra={
                    "url": f"{'https' if settings.tls_cert_file else 'http'}://"
                    f"{args.host}:{args.port}",
                    "role": args.role,
                    "provider": settings.provider_name,
                    "emulated": args.emulate,
                    "processes": {c.name: c.pid for c in supervisor.children},
                },
            )
        runtime.wait(tick=supervisor.tick)
    finally:
        supervisor.stop()
    return 0


def _emulate(
    args: argparse.Namespace, supervisor: Any
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """Start the provider's emulated cloud in its own process and point this
    broker at it, with a store of its own that starts empty as the cloud does."""
    from kidp.emulator import EmulationClaim, apply_environ, emulated_dir
    from kidp.supervisor import start_emulator_process

    base = _settings(args)
    provider = base.provider_name
    # Before anything starts or the store is emptied: a second one would
    # empty the store the first one is using. Dropped when this process ends.
    supervisor.on_stop.append(EmulationClaim(base.state_dir, provider).release)
    emulator = start_emulator_process(supervisor, provider)
    apply_environ(emulator.environ)
    overrides = dict(emulator.settings)
    if "store_url" in overrides:
        pass  # the emulated cloud brings its own store (Azure: a table on Azurite)
    elif "KIDP_STORE_URL" not in os.environ:
        directory = emulated_dir(base.state_dir, provider)
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("broker.db*"):
            old.unlink()
        overrides["store_url"] = f"sqlite:///{directory / 'broker.db'}"
    else:
        log.warning(
            "KIDP_STORE_URL is set: the emulated cloud starts empty, but that store keeps "
            "the deployments of earlier runs, which will read as missing",
            extra={"provider": provider},
        )
    return overrides, emulator.environ


def cmd_emulate(args: argparse.Namespace) -> int:
    """Run the provider's emulated cloud until stopped; print on one JSON line
    the settings and environment that point a broker at it."""
    import signal
    import threading

    from kidp.emulator import emulated_dir, start_emulated
    from kidp.observability import configure_logging
    from kidp.supervisor import supervised

    if args.supervised_by:
        supervised(args.supervised_by, nice=args.nice)
    settings = _settings(args)
    # The stand-ins log every call they do not model; that is not news here.
    configure_logging("ERROR")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    directory = emulated_dir(settings.state_dir, settings.provider_name)
    directory.mkdir(parents=True, exist_ok=True)
    cloud = start_emulated(settings.provider_name, directory)
    try:
        print(cloud.announcement(), flush=True)
        stopping.wait()
    finally:
        cloud.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main command: one database, end to end, on the emulator."""
    from kidp.demo import run_demo

    return run_demo(timeout=args.timeout)


def cmd_token(args: argparse.Namespace) -> int:
    """Mint a development token signed with the configured HS256 key."""
    from kidp.auth import mint_token, parse_ttl

    settings = Settings.from_env()
    secret = settings.effective_jwt_secret()
    if secret is None:
        raise BrokerError(
            "tokens can only be minted with an HS256 key (KIDP_JWT_SECRET); "
            "this broker verifies through KIDP_JWT_JWKS_URL"
        )
    scopes = [s for part in args.scope for s in part.split(",") if s]
    namespaces = [n for part in args.namespace for n in part.split(",") if n]
    if not scopes or not namespaces:
        raise ValidationFailed("give at least one --scope and one --namespace")
    print(
        mint_token(
            secret=secret,
            subject=args.subject,
            scopes=scopes,
            namespaces=namespaces,
            ttl_seconds=parse_ttl(args.ttl),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    )
    return 0


def cmd_receiver(args: argparse.Namespace) -> int:
    """Receive callbacks locally, check each signature, print each as JSON."""
    import queue

    from kidp.receiver import CallbackReceiver

    settings = Settings.from_env()
    receiver = CallbackReceiver(
        settings.effective_callback_secret(), host=args.host, port=args.port
    )
    print(
        json.dumps(
            {
                "message": "receiving callbacks; only correctly signed ones are printed",
                "callbackUrl": receiver.url,
                "brokerNeeds": f"KIDP_CALLBACK_ALLOWLIST={args.host}",
            }
        ),
        file=sys.stderr,
        flush=True,
    )
    try:
        while True:
            try:
                payload = receiver.received.get(timeout=0.5)
            except queue.Empty:
                continue
            print(json.dumps(payload), flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        receiver.close()


def _broker(args: argparse.Namespace) -> Any:
    from kidp.bootstrap import build
    from kidp.observability import configure_logging

    settings = _settings(args, **_attach(args))
    configure_logging("WARNING")
    return build(settings)


def cmd_dlq(args: argparse.Namespace) -> int:
    """List or send again dead-lettered jobs and callbacks."""
    from kidp import deadletters

    broker = _broker(args)
    try:
        if args.action == "list":
            listed = deadletters.list_dead(broker.service, include_resolved=args.all)
            for job in listed["jobs"]:
                print(json.dumps({"type": "job", **job}))
            for letter in listed["callbacks"]:
                state = (
                    "resolved"
                    if letter["resolvedAt"]
                    else "dead"
                    if letter["givenUpAt"]
                    else "retrying"
                )
                print(json.dumps({"type": "callback", "state": state, **letter}))
            if not listed["jobs"] and not listed["callbacks"]:
                print("no dead letters", file=sys.stderr)
            return 0
        result = deadletters.redrive(broker.service, ids=[args.id], limit=1)
        print(json.dumps(result))
        if result["jobs"]["redriven"] or result["callbacks"]["resolved"]:
            return 0
        if not result["callbacks"]["failed"]:
            print(f"kidp-broker: no dead job or callback has the id {args.id}", file=sys.stderr)
        return 1
    finally:
        broker.close()


def cmd_scan(args: argparse.Namespace) -> int:
    """Run one scan now and print its result."""
    from kidp.scans import run_scan

    broker = _broker(args)
    try:
        print(json.dumps(run_scan(broker.scanner, args.name), indent=2, default=str))
        return 0
    finally:
        broker.close()


def cmd_openapi(args: argparse.Namespace) -> int:
    """Print the OpenAPI document (the committed docs/openapi.json is this output)."""
    from kidp.openapi import document

    print(json.dumps(document(), indent=2, sort_keys=True))
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, descriptions kept as written."""


def _emulate_flag(command: argparse.ArgumentParser, help_text: str) -> None:
    command.add_argument("--emulate", action="store_true", help=help_text)


def _supervision_flags(command: argparse.ArgumentParser) -> None:
    # Set by `serve` on the processes it starts; not for people.
    command.add_argument("--supervised-by", type=int, default=None, help=argparse.SUPPRESS)
    command.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    from kidp.runtime import PARTS

    root = argparse.ArgumentParser(prog="kidp-broker", description=__doc__, formatter_class=_Help)
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help)

    serve = command("serve", "run the broker: API, workers, watcher and timers")
    serve.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    serve.add_argument("--port", type=int, default=8082, help="port of the API (or the probes)")
    serve.add_argument(
        "--provider",
        default=None,
        help="aws, azure, gcp or onprem (default: KIDP_PROVIDER, else KIDP_CLOUD)",
    )
    _emulate_flag(
        serve,
        "run the provider's cloud as a local stand-in (its own process) with a store of "
        "its own under KIDP_STATE_DIR/emulated/; both start empty on every run",
    )
    serve.add_argument(
        "--role",
        default="all",
        help=f"what this process runs: all, or one or more of {','.join(PARTS)} "
        "separated by commas",
    )
    serve.add_argument(
        "--worker-processes",
        type=int,
        default=1,
        help="with --role all: processes running workers beside the API process "
        "(the first also runs the watcher and the timers); 0 runs everything in this process",
    )
    _supervision_flags(serve)
    serve.set_defaults(func=cmd_serve)

    emulate = command("emulate", "run a provider's emulated cloud alone until stopped")
    emulate.add_argument(
        "--provider", default=None, help="aws, azure, gcp or onprem (default: KIDP_CLOUD)"
    )
    _supervision_flags(emulate)
    emulate.set_defaults(func=cmd_emulate)

    demo = command("demo", "provision and delete a sample database end to end, then exit")
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each phase")
    demo.set_defaults(func=cmd_demo)

    token = command("token", "mint a token signed with the configured HS256 key")
    token.add_argument(
        "--scope", action="append", default=[], help="comma-separated: deploy,read,delete"
    )
    token.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="namespace the token may act on ('*' for all); repeat or comma-separate",
    )
    token.add_argument(
        "--ttl",
        default="1h",
        help="lifetime: 90s, 30m, 1h, 7d; verifiers allow KIDP_JWT_LEEWAY_SECONDS (30) of "
        "clock skew past it",
    )
    token.add_argument("--subject", default="kidp-cli", help="the token's sub claim")
    token.set_defaults(func=cmd_token)

    receiver = command(
        "receiver", "receive callbacks locally, check each signature and print each as JSON"
    )
    receiver.add_argument("--host", default="127.0.0.1", help="address to listen on")
    receiver.add_argument("--port", type=int, default=9000, help="port to listen on")
    receiver.set_defaults(func=cmd_receiver)

    dlq = command("dlq", "dead-lettered jobs and callbacks")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlq_list = dlq_sub.add_parser(
        "list", help="one JSON line per dead job or callback", formatter_class=_Help
    )
    dlq_list.add_argument("--all", action="store_true", help="include resolved callbacks")
    dlq_replay = dlq_sub.add_parser(
        "replay",
        help="send one dead job or callback again (same webhook-id)",
        formatter_class=_Help,
    )
    dlq_replay.add_argument("id", help="a job id or a callback's dl_... id, from dlq list")
    for action in (dlq_list, dlq_replay):
        action.add_argument("--provider", default=None, help=argparse.SUPPRESS)
        _emulate_flag(action, "use the running `serve --emulate`'s cloud and store")
    dlq.set_defaults(func=cmd_dlq)

    scan = command("scan", "run one scan now and print its result as JSON")
    scan.add_argument("name", choices=["drift", "orphans", "cost", "rotation", "reconcile"])
    scan.add_argument(
        "--provider", default=None, help="aws, azure, gcp or onprem (default: KIDP_CLOUD)"
    )
    _emulate_flag(scan, "use the running `serve --emulate`'s cloud and store")
    scan.set_defaults(func=cmd_scan)

    openapi = command("openapi", "print the OpenAPI document")
    openapi.set_defaults(func=cmd_openapi)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kidp-broker`` console script."""
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except BrokerError as exc:
        print(f"kidp-broker: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
