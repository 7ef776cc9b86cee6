"""The ``connector`` command line (product.md, "Command line")."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Sequence

from connector.config import ConfigError, Problem, check_settings, load_settings, parse_settings
from connector.plugins import PluginError, load_plugins

DEFAULT_CONFIG = "config.toml"


def build_app(config_path: str):  # a module-level factory, so Sanic's worker processes can rebuild the app
    from connector.app import create_app
    from connector.logs import setup_logging

    plugins = load_plugins()
    settings = load_settings(config_path, plugins=plugins)
    setup_logging(settings.logging["level"], settings.logging["format"])
    return create_app(settings, plugins, name="connector")


def cmd_serve(args: argparse.Namespace) -> int:
    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    try:
        settings = load_settings(args.config, plugins=load_plugins())
    except ConfigError as err:
        _print_problems(err.problems)
        return 1
    loader = AppLoader(factory=partial(build_app, args.config))
    app = loader.load()
    server = settings.server
    workers = args.workers or server["workers"]
    app.prepare(host=args.host or server["host"], port=args.port or server["port"], workers=workers,
                single_process=workers == 1, access_log=False, motd=False)
    print(f"connector serving on {settings.public_url}", file=sys.stderr)
    Sanic.serve(primary=app, app_loader=loader) if workers > 1 else Sanic.serve_single(primary=app)
    return 0


def _print_problems(problems: Sequence[Problem]) -> None:
    print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in the configuration:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        plugins = load_plugins()
        load_settings(args.config, plugins=plugins)
    except PluginError as err:
        _print_problems([Problem("plugins", str(err))])
        return 1
    except ConfigError as err:
        _print_problems(err.problems)
        return 1
    print(f"{args.config}: no problems found")
    return 0


def cmd_providers(args: argparse.Namespace) -> int:
    import tomllib

    plugins = load_plugins()
    providers = plugins.providers()
    settings = None
    try:
        with open(args.config, "rb") as fh:
            settings, _ = parse_settings(tomllib.load(fh))
    except (OSError, tomllib.TOMLDecodeError):
        pass
    for name, entry in sorted(providers.items()):
        enabled = settings is not None and name in settings.enabled_providers()
        print(f"{name}  ({getattr(entry.cls, 'title', name)})  {'enabled' if enabled else 'not enabled'}")
        print(f"    from: {entry.origin}")
        if settings is not None:
            print(f"    callback: {settings.public_url}/providers/{name}/callback")
            for bank in settings.banks:
                if bank.provider == name:
                    print(f"    bank: {bank.name} (sage_bank_id {bank.sage_bank_id or 'not registered yet'})")
    if settings is not None:
        for problem in check_settings(settings, plugins):
            if problem.key.startswith("banks") or problem.key.startswith("providers"):
                print(f"warning: {problem}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="connector", description="Sage Banking Service connector")
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", default=DEFAULT_CONFIG, help="path to config.toml (default: ./config.toml)")
        p.set_defaults(func=func)
        return p

    serve = command("serve", cmd_serve, "run the connector")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    command("check-config", cmd_check_config, "check the config and print every problem with its key")
    command("providers", cmd_providers, "list loaded provider plugins and the banks mapped to each")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
