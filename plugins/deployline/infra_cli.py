"""``python -m deployline infra up|down|status [components...]``: the support infrastructure from a
shell, for the very first bootstrap (before any Airflow runs). Plain boto3 clients, with the
usual credentials; ``--endpoint-url`` (or ``$AWS_ENDPOINT_URL``) points them at moto server."""

from __future__ import annotations

import argparse
import os
import sys

from botocore.exceptions import BotoCoreError, ClientError

from deployline import infrastructure
from deployline.infrastructure import COMPONENTS


def add_parser(commands) -> None:
    """The ``infra`` subcommand, on ``python -m deployline``'s subparsers."""
    infra_cmd = commands.add_parser(
        "infra", help="launch, destroy or show the support infrastructure (stage 0)",
        description="Support infrastructure, one CloudFormation stack per component: "
        f"{', '.join(COMPONENTS)}. Outputs are published as SSM parameters.")
    infra_cmd.add_argument("action", choices=("up", "down", "status"))
    infra_cmd.add_argument("components", nargs="*", default=["all"], metavar="component",
                           help=f"{', '.join(COMPONENTS)} or all (default)")
    infra_cmd.add_argument("--force", action="store_true",
                           help="down: also delete an artifact bucket that holds release records")
    infra_cmd.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                           help="AWS endpoint, e.g. moto server http://127.0.0.1:5055 (default: $AWS_ENDPOINT_URL)")
    infra_cmd.add_argument("--config", default=None,
                           help=f"settings file (default: ${infrastructure.CONFIG_ENV} or include/infrastructure.yaml)")
    infra_cmd.add_argument("--region", default=None, help="overrides the config's region")
    infra_cmd.set_defaults(func=infra)


def infra(args: argparse.Namespace) -> int:
    try:
        config = infrastructure.load_infrastructure_config(args.config)
        if args.region:
            config = config.model_copy(update={"region": args.region})
        components = infrastructure.resolve_components(args.components or ["all"])
        clients = infrastructure.clients_from_boto3(config.region, args.endpoint_url)
        if args.action == "status":
            for found in infrastructure.status(clients, config, components):
                print(found.line(), flush=True)
            return 0
        if args.action == "up":
            results = infrastructure.launch(clients, config, components)
        else:
            results = infrastructure.destroy(clients, config, components, force=args.force)
    except infrastructure.InfrastructureError as exc:
        for result in getattr(exc, "done", []):
            print(result.line(), flush=True)
        print(f"infra {args.action} failed: {exc}", file=sys.stderr)
        return 1
    except (ValueError, ClientError, BotoCoreError) as exc:  # config, unknown component, AWS refusals
        print(f"infra {args.action} failed: {exc}", file=sys.stderr)
        return 1
    for result in results:
        print(result.line(), flush=True)
    return 0
