"""Command line entry point: ``python -m sample_service --host 127.0.0.1 --port 8000``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .app import App, Config, ItemStore, make_server


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sample_service",
        description="Deployline sample HTTP service.",
        epilog="Environment: SAMPLE_SERVICE_HOST, SAMPLE_SERVICE_PORT, SAMPLE_SERVICE_VERSION, "
        "SAMPLE_SERVICE_COMMIT, SAMPLE_SERVICE_FAIL_HEALTH_AFTER (seconds), DEPLOYLINE_STAGE. "
        "The packaged sample_service/SETTINGS.json (from settings.json at build time) can "
        "also turn on the fail-health switch.",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("SAMPLE_SERVICE_HOST", "127.0.0.1"),
        help="address to bind (env SAMPLE_SERVICE_HOST, default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        # a string default goes through type=_port, so a bad env value is reported cleanly
        default=os.environ.get("SAMPLE_SERVICE_PORT", "8000"),
        help="port to bind, 0 = any free port (env SAMPLE_SERVICE_PORT, default 8000)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    parser.add_argument("--version", action="version", version=f"sample-service {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = Config.from_env()
    except ValueError as exc:
        parser.error(str(exc))

    app = App(config, store=ItemStore.with_catalogue())
    server = make_server(args.host, args.port, app, access_log=not args.quiet)
    host, port = server.server_address[:2]
    note = ""
    if config.fail_health_after is not None:
        note = (
            f"; /health will fail after {config.fail_health_after:g}s"
            f" ({config.fail_health_source or 'configured'})"
        )
    print(
        f"sample-service {config.version} (commit {config.commit}) "
        f"listening on http://{host}:{port}{note}",
        file=sys.stderr,
        flush=True,
    )

    def _terminate(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print("sample-service stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
