"""Migrations: the checked-in migrations describe exactly the models, and `connector migrate` applies them."""

from __future__ import annotations

import os
import subprocess
import sys

from tortoise.context import TortoiseContext
from tortoise.migrations.autodetector import MigrationAutodetector

from connector.storage import tortoise_config
from connector.testing.connector import SageEndpoints, connector_config, free_port


async def test_migrations_match_the_models():
    config = tortoise_config("sqlite://:memory:")
    async with TortoiseContext() as ctx:
        await ctx.init(config=config)
        writers = await MigrationAutodetector(ctx.apps, config["apps"]).changes()
    assert writers == [], ("the models changed without a migration: run "
                           "`python -m tortoise -c connector.storage.TORTOISE_ORM makemigrations -n <what>`")


async def test_connector_migrate_brings_a_fresh_database_to_head(tmp_path, database_url):
    import tomllib  # noqa: F401  (the config is written as TOML below)

    endpoints = SageEndpoints("http://127.0.0.1:9", "id", "secret-secret", "key")
    config = connector_config(endpoints, database_url=database_url, port=free_port(), banks=[],
                              providers={"demobank": {}})
    path = tmp_path / "config.toml"
    path.write_text(_toml(config))
    run = lambda: subprocess.run([sys.executable, "-m", "connector.cli", "migrate", "--config", str(path)],
                                 capture_output=True, text=True, timeout=120, env=dict(os.environ))
    first = run()
    assert first.returncode == 0, first.stderr
    assert "models.0001_initial" in first.stdout
    again = run()
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout


def _toml(data: dict, prefix: str = "") -> str:
    """Just enough TOML for the test config (tables, arrays of tables, strings, numbers, lists, inline tables)."""
    import json

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    out, tables = [], []
    for key, v in data.items():
        if isinstance(v, dict) and prefix.count(".") < 1 and key != "notification_header":
            tables.append((key, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            tables.append((key, v))
        else:
            out.append(f"{key} = {value(v)}")
    for key, v in tables:
        name = f"{prefix}{key}"
        if isinstance(v, list):
            for item in v:
                out.append(f"\n[[{name}]]")
                out.extend(f"{k} = {value(x)}" for k, x in item.items())
        else:
            out.append(f"\n[{name}]")
            out.append(_toml(v, name + "."))
    return "\n".join(out)
