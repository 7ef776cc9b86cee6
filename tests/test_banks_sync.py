"""``connector banks sync [--dry-run]``: POST /v1/banks per spec 3.7 and 7.29–7.30, against the Sage emulator."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

from connector.testing.connector import SageEndpoints, connector_config, write_config

ROOT = Path(__file__).resolve().parent.parent
AGGREGATOR = "0b9f6d2e-4c1a-4e57-9a3b-6d8c2f1e0a74"
PUBLIC = "https://connector.example.com"


def config_file(sage, tmp_path: Path, banks: list[dict], aggregator: str | None = AGGREGATOR) -> Path:
    endpoints = SageEndpoints(sage.base_url, sage.client_id, sage.client_secret, sage.api_key)
    extra = {"logging": {"level": "WARNING"}, "server": {"public_url": PUBLIC}}
    if aggregator:
        extra["sage"] = {"aggregator_id": aggregator}
    config = connector_config(endpoints, database_url=f"sqlite://{tmp_path}/db.sqlite3", port=8080, banks=banks,
                              providers={"demobank": {}}, extra=extra)
    return write_config(tmp_path / "config.toml", config)


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connector.cli", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


CALLBACKS = {"notification": f"{PUBLIC}/notification", "availableAccounts": f"{PUBLIC}/availableaccounts",
             "auth": f"{PUBLIC}/auth", "reAuth": f"{PUBLIC}/authrefresh"}


def registered(sage) -> str:
    principal = str(uuid.uuid4())
    sage.banks[principal] = {"principalId": principal, "externalRef": AGGREGATOR, "name": "Old name",
                             "countryCode": "GB", "url": "https://old.example.com", "callbackURLs": {}}
    return principal


async def test_dry_run_prints_the_body_and_sends_nothing(sage, tmp_path):
    principal = registered(sage)
    path = config_file(sage, tmp_path, [
        {"sage_bank_id": principal, "name": "Demo Bank", "provider": "demobank", "country_code": "GB",
         "url": "https://demo.example.com"},
        {"name": "New Bank", "provider": "demobank", "country_code": "IE", "url": "https://new.example.com"},
    ])
    code, out, err = await cli("banks", "sync", "--dry-run", "--config", str(path))
    assert code == 0, err
    assert json.loads(out) == {"data": {
        "toCreate": [{"externalRef": AGGREGATOR, "name": "New Bank", "countryCode": "IE",
                      "url": "https://new.example.com", "supportiframe": True, "callbackURLs": CALLBACKS}],
        "toUpdate": [{"principalId": principal, "externalRef": AGGREGATOR, "name": "Demo Bank", "countryCode": "GB",
                      "url": "https://demo.example.com", "supportiframe": True, "callbackURLs": CALLBACKS}],
    }}
    assert sage.requests_to("/v1/banks") == [] and sage.banks[principal]["name"] == "Old name"


async def test_sync_creates_and_updates_and_prints_the_principal_id(sage, tmp_path):
    principal = registered(sage)
    path = config_file(sage, tmp_path, [
        {"sage_bank_id": principal, "name": "Demo Bank", "provider": "demobank"},
        {"name": "New Bank", "provider": "demobank", "url": "https://new.example.com"},
    ])
    code, out, err = await cli("banks", "sync", "--config", str(path))
    assert code == 0, err
    [request] = sage.requests_to("/v1/banks", "POST")
    assert isinstance(request.json["data"], dict)  # an object, not the one-element array of the docs page (7.29)
    assert "toRemove" not in request.json["data"]
    [created] = [b for b in sage.banks.values() if b["name"] == "New Bank"]
    assert created["externalRef"] == AGGREGATOR and created["supportiframe"] is True
    assert created["callbackURLs"] == CALLBACKS
    assert f"created: New Bank  principalId {created['principalId']}" in out
    assert f'set sage_bank_id = "{created["principalId"]}"' in out
    assert f"updated: Demo Bank  principalId {principal}" in out
    assert sage.banks[principal]["name"] == "Demo Bank" and sage.banks[principal]["callbackURLs"] == CALLBACKS


async def test_sync_needs_an_aggregator_id_and_reports_refusals(sage, tmp_path):
    (tmp_path / "first").mkdir()
    path = config_file(sage, tmp_path / "first", [{"name": "New Bank", "provider": "demobank"}], aggregator=None)
    code, _, err = await cli("banks", "sync", "--config", str(path))
    assert code == 2 and "sage.aggregator_id is not set" in err
    assert sage.requests_to("/v1/banks") == []

    unknown = str(uuid.uuid4())  # a sage_bank_id Sage does not know under our externalRef
    path = config_file(sage, tmp_path, [{"sage_bank_id": unknown, "name": "Demo Bank", "provider": "demobank"}])
    code, _, err = await cli("banks", "sync", "--config", str(path))
    assert code == 1 and "Sage refused the bank sync" in err and "unknown_bank" in err
