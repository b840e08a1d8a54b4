"""``kidp-broker``: serve, demo, token, dlq, scan, openapi.

Each command reads the settings once, builds the broker through
:mod:`kidp.bootstrap` and calls one core function.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from kidp.errors import BrokerError
from kidp.settings import Settings


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {"provider": getattr(args, "provider", None), **extra}
    return Settings.from_env(**overrides)


def _start_emulator(provider: str, extra: dict[str, Any]) -> Any:
    """A local stand-in for the provider's cloud, for trying the broker out."""
    if provider == "onprem":
        import os

        from kidp.kube_emulator import start_kubernetes_emulator

        kube = start_kubernetes_emulator()
        # The provider finds the cluster the standard way, through KUBECONFIG.
        os.environ["KUBECONFIG"] = str(
            kube.write_kubeconfig(Settings.from_env().state_dir / "kubeconfig")
        )
        return kube
    from kidp.emulator import start_aws_emulator

    aws = start_aws_emulator()
    extra["aws_endpoint_url"] = aws.endpoint_url
    return aws


def cmd_serve(args: argparse.Namespace) -> int:
    """API, worker and timers in one process (or one role of them)."""
    from kidp.bootstrap import build
    from kidp.observability import configure_logging
    from kidp.runtime import EmbeddedBroker

    extra: dict[str, Any] = {}
    emulator: Any = None
    if args.emulate:
        emulator = _start_emulator(_settings(args).provider_name, extra)
    settings = _settings(args, **extra)
    configure_logging(settings.log_level)
    broker = build(settings)
    runtime = EmbeddedBroker(broker, host=args.host, port=args.port, role=args.role)
    runtime.start()
    print(
        json.dumps(
            {
                "message": "kidp-broker serving",
                "url": f"{'https' if settings.tls_cert_file else 'http'}://{args.host}:{args.port}",
                "role": args.role,
                "provider": settings.provider_name,
                "emulated": bool(emulator),
            }
        ),
        file=sys.stderr,
        flush=True,
    )
    try:
        runtime.wait()
    finally:
        if emulator is not None:
            emulator.stop()
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


def _broker(args: argparse.Namespace) -> Any:
    from kidp.bootstrap import build

    return build(_settings(args))


def cmd_dlq(args: argparse.Namespace) -> int:
    """List or replay dead-lettered callbacks."""
    broker = _broker(args)
    try:
        if args.action == "list":
            letters = broker.service.dead_letters(include_resolved=args.all)
            for letter in letters:
                state = (
                    "resolved"
                    if letter.resolved_at
                    else "dead"
                    if letter.given_up_at
                    else "retrying"
                )
                print(
                    f"{letter.id}  {letter.deployment_id}  "
                    f"phase={letter.payload.get('phase')}  attempts={letter.attempts}  "
                    f"{state}  {letter.created_at.isoformat()}  {letter.reason}"
                )
            if not letters:
                print("no dead letters", file=sys.stderr)
            return 0
        letter = broker.service.replay_dead_letter(args.id)
        if letter.resolved_at:
            print(f"{letter.id} delivered to {letter.url}")
            return 0
        print(f"{letter.id} still failing: {letter.reason}", file=sys.stderr)
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


def parser() -> argparse.ArgumentParser:
    """The command line."""
    root = argparse.ArgumentParser(prog="kidp-broker", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the broker (API, workers, timers)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8082)
    serve.add_argument("--provider", default=None, help="cloud provider (default: KIDP_CLOUD)")
    serve.add_argument(
        "--emulate", action="store_true", help="start an in-process AWS emulator and use it"
    )
    serve.add_argument(
        "--role", default="all", choices=["all", "api", "worker", "watcher", "scanner"]
    )
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="provision and delete a sample database end to end")
    demo.add_argument("--timeout", type=float, default=120.0)
    demo.set_defaults(func=cmd_demo)

    token = sub.add_parser("token", help="mint a development token")
    token.add_argument(
        "--scope", action="append", default=[], help="comma-separated: deploy,read,delete"
    )
    token.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="namespace the token may act on ('*' for all)",
    )
    token.add_argument("--ttl", default="1h")
    token.add_argument("--subject", default="kidp-cli")
    token.set_defaults(func=cmd_token)

    dlq = sub.add_parser("dlq", help="dead-lettered callbacks")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    dlq_list = dlq_sub.add_parser("list")
    dlq_list.add_argument("--all", action="store_true", help="include resolved ones")
    dlq_replay = dlq_sub.add_parser("replay")
    dlq_replay.add_argument("id")
    dlq.set_defaults(func=cmd_dlq)

    scan = sub.add_parser("scan", help="run a scan now")
    scan.add_argument("name", choices=["drift", "orphans", "cost", "rotation", "reconcile"])
    scan.set_defaults(func=cmd_scan)

    openapi = sub.add_parser("openapi", help="print the OpenAPI document")
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
