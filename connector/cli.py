"""The ``connector`` command line (product.md, "Command line")."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Sequence

from connector.config import ConfigError, Problem, check_settings, collect_problems, load_settings, parse_settings
from connector.plugins import Plugins, PluginError, load_plugins

DEFAULT_CONFIG = "config.toml"


def build_app(config_path: str):  # a module-level factory, so Sanic's worker processes can rebuild the app
    from connector.app import create_app
    from connector.logs import setup_logging

    plugins = load_plugins()
    settings = load_settings(config_path, plugins=plugins)
    setup_logging(settings.logging["level"], settings.logging["format"])
    return create_app(settings, plugins, name="connector")


def _plugins_or_problem() -> Plugins | Problem:
    """The loaded plugins, or the reason they could not be loaded (a start-up error, printed without a traceback)."""
    try:
        plugins = load_plugins()
        plugins.providers()  # two providers with one name is a start-up error too
    except PluginError as err:
        return Problem("plugins", str(err))
    except Exception as err:  # a built-in plugin's import error, a hook implementation pluggy refuses
        return Problem("plugins", f"provider plugins could not be loaded: {type(err).__name__}: {err}")
    return plugins


def cmd_serve(args: argparse.Namespace) -> int:
    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    plugins = _plugins_or_problem()
    if isinstance(plugins, Problem):
        _print_problems([plugins])
        return 1
    try:
        settings = load_settings(args.config, plugins=plugins)
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
    _, problems = collect_problems(args.config, load_plugins=load_plugins)
    if problems:
        _print_problems(problems)
        return 1
    print(f"{args.config}: no problems found")
    return 0


def cmd_providers(args: argparse.Namespace) -> int:
    from connector.config import read_config

    plugins = _plugins_or_problem()
    if isinstance(plugins, Problem):
        _print_problems([plugins])
        return 1
    providers = plugins.providers()
    settings = None
    try:
        settings, _ = parse_settings(read_config(args.config))
    except ConfigError as err:
        print(f"warning: {'; '.join(str(p) for p in err.problems)}; banks are not shown", file=sys.stderr)
    if not providers:
        print("no provider plugins are loaded")
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


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    import asyncio

    from connector.storage.rekey import RekeyError, rekey

    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        _print_problems(err.problems)
        return 1
    try:
        report = asyncio.run(rekey(settings))
    except RekeyError as err:
        print(f"rotate-keys: {err}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


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
    command("rotate-keys", cmd_rotate_keys,
            "re-encrypt every stored secret under the first of security.encryption_keys")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
