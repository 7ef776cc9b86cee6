"""The ``connector`` command line (product.md, "Command line")."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial

from connector.config import (
    ConfigError,
    Problem,
    Settings,
    check_settings,
    collect_problems,
    load_settings,
    parse_settings,
)
from connector.plugins import Plugins, load_failure, load_plugins

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
    except Exception as err:
        return Problem("plugins", load_failure(err))
    return plugins


def _settings_or_problems(config: str) -> tuple[Settings, Plugins] | tuple[None, None]:
    """The plugins and the checked settings, or (None, None) once every problem is printed."""
    plugins = _plugins_or_problem()
    if isinstance(plugins, Problem):
        _print_problems([plugins])
        return None, None
    try:
        return load_settings(config, plugins=plugins), plugins
    except ConfigError as err:
        _print_problems(err.problems)
    return None, None


def cmd_serve(args: argparse.Namespace) -> int:
    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    settings, _ = _settings_or_problems(args.config)
    if settings is None:
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


def cmd_new_provider(args: argparse.Namespace) -> int:
    from pathlib import Path

    from connector.scaffold import ScaffoldError, scaffold

    try:
        root, written = scaffold(args.name, Path(args.dir) if args.dir else None, title=args.title)
    except ScaffoldError as err:
        print(f"new-provider: {err}", file=sys.stderr)
        return 1
    print(f"created {root} with provider {args.name!r}:")
    for path in written:
        print(f"    {path}")
    print("next:")
    print(f"    cd {root}")
    print("    pip install -e '.[test]'   # registers the connector.providers entry point")
    print("    python -m pytest           # the journey and the feed, through a real connector")
    print(f"    connector providers        # lists {args.name} from its entry point")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from connector.demo import run

    return run(port=args.port, connector_port=args.connector_port)


# -- the statement feed and bank sync (connector/feed, connector/banks.py) ------------------------------------------

EXIT_NOT_DELIVERED = 1  # feed run: at least one account could not deliver (consent lost, refused, provider down)
EXIT_CONFIG = 2  # the configuration has problems
EXIT_BUSY = 3  # feed run: another process holds the feed lease


def cmd_feed_run(args: argparse.Namespace) -> int:
    import asyncio

    from connector.logs import setup_logging

    settings, plugins = _settings_or_problems(args.config)
    if settings is None:
        return EXIT_CONFIG
    setup_logging(settings.logging["level"], settings.logging["format"])
    return asyncio.run(_feed_run(settings, plugins, once=args.once))


async def _feed_run(settings, plugins, *, once: bool) -> int:
    import asyncio
    import signal

    from connector.feed import LeaseHeld
    from connector.feed.runtime import feed_runtime

    async with feed_runtime(settings, plugins) as feed:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, feed.stop)
            except (NotImplementedError, RuntimeError):
                pass
        if not once:
            print("feed running; stop with Ctrl-C or SIGTERM", file=sys.stderr)
            await feed.run_forever()
            return 0
        try:
            report = await feed.run_once()
        except LeaseHeld as err:
            print(f"not run: {err}", file=sys.stderr)
            return EXIT_BUSY
        if not report.outcomes:
            print("no linked accounts")
        for line in report.lines():
            print(line)
        return 0 if report.ok else EXIT_NOT_DELIVERED


def cmd_feed_status(args: argparse.Namespace) -> int:
    import asyncio

    settings, _ = _settings_or_problems(args.config)
    if settings is None:
        return EXIT_CONFIG
    return asyncio.run(_feed_status(settings, include_deleted=args.all))


async def _feed_status(settings, *, include_deleted: bool) -> int:
    from connector.feed import status
    from connector.storage import close_database, open_database

    await open_database(settings.database["url"])
    try:
        rows = await status.collect(settings, include_deleted=include_deleted)
        print(await status.feed_holder())
        print(status.render(rows))
    finally:
        await close_database()
    return 1 if any(r.needs_attention for r in rows) else 0


def cmd_feed_retry(args: argparse.Namespace) -> int:
    import asyncio

    settings, _ = _settings_or_problems(args.config)
    if settings is None:
        return EXIT_CONFIG
    return asyncio.run(_feed_retry(settings, args.bank_account_id, rebuild=args.rebuild))


async def _feed_retry(settings, bank_account_id: str, *, rebuild: bool) -> int:
    from connector.feed import admin
    from connector.storage import close_database, open_database

    await open_database(settings.database["url"])
    try:
        result = await admin.retry(bank_account_id, rebuild=rebuild)
    finally:
        await close_database()
    print(result.message, file=sys.stdout if result.released else sys.stderr)
    return 0 if result.released else 1


def cmd_banks_sync(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from connector.banks import BankSyncError, sync_body

    settings, _ = _settings_or_problems(args.config)
    if settings is None:
        return EXIT_CONFIG
    try:
        body = sync_body(settings)
    except BankSyncError as err:
        _print_problems([Problem("banks sync", str(err))])
        return EXIT_CONFIG
    if args.dry_run:
        print(json.dumps(body, indent=2))
        return 0
    return asyncio.run(_banks_sync(settings, body))


async def _banks_sync(settings, body) -> int:
    from connector.banks import read_answer
    from connector.feed.runtime import sage_client
    from connector.sage.client import SageError

    async with sage_client(settings) as client:
        try:
            answer = await client.post_banks(body)
        except SageError as err:
            print(f"Sage refused the bank sync: {err}", file=sys.stderr)
            return 1
    for bank in read_answer(body, answer):
        if bank.created:
            print(f"created: {bank.name}  principalId {bank.principal_id or '(not in the answer)'}")
            print(f"    set sage_bank_id = \"{bank.principal_id}\" in this bank's [[banks]] entry")
        else:
            print(f"updated: {bank.name}  principalId {bank.principal_id}")
    return 0


def _command(where: argparse._SubParsersAction, name: str, func, help_: str) -> argparse.ArgumentParser:
    """A command that reads the config (``--config``) and runs ``func(args)``."""
    p = where.add_parser(name, help=help_)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="path to config.toml (default: ./config.toml)")
    p.set_defaults(func=func)
    return p


def _feed_and_banks_commands(sub: argparse._SubParsersAction) -> None:
    def nested(group: str, help_: str) -> argparse._SubParsersAction:
        return sub.add_parser(group, help=help_).add_subparsers(dest=f"{group}_command", required=True)


    feed = nested("feed", "the statement feed")
    run = _command(feed, "run", cmd_feed_run, "run the statement feed (exit 1 if an account could not deliver)")
    run.add_argument("--once", action="store_true", help="one run over every account, then exit")
    status = _command(feed, "status", cmd_feed_status,
                  "show each linked account's feed state (exit 1 if an account needs attention)")
    status.add_argument("--all", action="store_true", help="also show accounts deleted in Sage")
    retry = _command(feed, "retry", cmd_feed_retry, "release an account held by a statement Sage refused")
    retry.add_argument("bank_account_id", help="the Sage bankAccountId shown by `feed status`")
    retry.add_argument("--rebuild", action="store_true",
                       help="cut the held transactions into new statements instead of resending the same bytes")
    banks = nested("banks", "bank registration with Sage")
    sync = _command(banks, "sync", cmd_banks_sync, "register or update the configured banks with Sage (POST /v1/banks)")
    sync.add_argument("--dry-run", action="store_true", help="print the body and send nothing")


def cmd_migrate(args: argparse.Namespace) -> int:
    import asyncio

    from connector.storage import apply_migrations, close_database, open_database

    settings, _ = _settings_or_problems(args.config)
    if settings is None:
        return 1

    async def run() -> list[str]:
        url = settings.database["url"]
        await open_database(url, migrate=False)
        try:
            return await apply_migrations(url)
        finally:
            await close_database()

    applied = asyncio.run(run())
    print("\n".join(f"applied {name}" for name in applied) if applied else "database is up to date")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="connector", description="Sage Banking Service connector")
    sub = top.add_subparsers(dest="command", required=True)

    serve = _command(sub, "serve", cmd_serve, "run the connector")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    _command(sub, "check-config", cmd_check_config, "check the config and print every problem with its key")
    _command(sub, "migrate", cmd_migrate, "apply pending database migrations (serve also does this at start)")
    _command(sub, "providers", cmd_providers, "list loaded provider plugins and the banks mapped to each")
    demo = sub.add_parser("demo", help="run the connector with local stand-ins of Sage and the providers, "
                                       "and print the URL of a demo Sage product page")
    demo.add_argument("--port", type=int, default=8400, help="port of the demo product page (default 8400; 0: any)")
    demo.add_argument("--connector-port", type=int, default=0, help="port of the connector (default: any free port)")
    demo.set_defaults(func=cmd_demo)
    new = sub.add_parser("new-provider", help="scaffold a provider plugin package (a fake bank with its tests) in a "
                                              "new folder")
    new.add_argument("name", help="the provider name, e.g. acmebank (lower case letters and digits)")
    new.add_argument("--dir", help="the folder to create (default: ./<name>-connector)")
    new.add_argument("--title", help="the provider's name as shown to people (default: from NAME)")
    new.set_defaults(func=cmd_new_provider)
    _command(sub, "rotate-keys", cmd_rotate_keys,
            "re-encrypt every stored secret under the first of security.encryption_keys")
    _feed_and_banks_commands(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
