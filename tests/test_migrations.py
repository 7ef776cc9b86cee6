"""Migrations: the checked-in migrations describe exactly the models, and `connector migrate` applies them."""

from __future__ import annotations

import os
import subprocess
import sys

from tortoise.context import TortoiseContext
from tortoise.migrations.autodetector import MigrationAutodetector

from connector.storage import tortoise_config
from connector.testing.connector import SageEndpoints, connector_config, free_port, write_config


async def test_migrations_match_the_models():
    config = tortoise_config("sqlite://:memory:")
    async with TortoiseContext() as ctx:
        await ctx.init(config=config)
        writers = await MigrationAutodetector(ctx.apps, config["apps"]).changes()
    assert writers == [], ("the models changed without a migration: run "
                           "`python -m tortoise -c connector.storage.TORTOISE_ORM makemigrations -n <what>`")


async def test_connector_migrate_brings_a_fresh_database_to_head(tmp_path, database_url):
    endpoints = SageEndpoints("http://127.0.0.1:9", "id", "secret-secret", "key")
    config = connector_config(endpoints, database_url=database_url, port=free_port(), banks=[],
                              providers={"demobank": {}})
    path = write_config(tmp_path / "config.toml", config)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "connector.cli", "migrate", "--config", str(path)],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ))

    first = run()
    assert first.returncode == 0, first.stderr
    assert "models.0001_initial" in first.stdout
    again = run()
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout

