"""The container image, as far as this machine can build it without a Docker engine: the Dockerfile's two stages
(build tools in the first only, a non-root user in the last), and what its build stage installs — the wheel of this
project, without the source tree — serving Sage and a person from any directory."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin

import aiohttp

from connector.testing.connector import (
    SageEndpoints,
    connector_config,
    free_port,
    wait_until_ready,
    write_config,
)
from connector.testing.fixtures import DEMO_BANKS, SageCalls

ROOT = Path(__file__).resolve().parent.parent


def stages() -> list[str]:
    """The Dockerfile's stages, each as its instructions (comments and blank lines dropped)."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    found: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            found.append([])
        found[-1].append(line)
    return ["\n".join(stage) for stage in found]


def test_the_final_stage_runs_as_a_user_without_build_tools():
    build, final = stages()
    assert "build-essential" in build
    assert "apt-get" not in final and "build-essential" not in final and "gcc" not in final
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert re.search(r"^COPY --from=build /opt/connector /opt/connector$", final, re.M)
    assert re.search(r'^CMD \["connector", "serve"', final, re.M)
    assert "/health" in final  # HEALTHCHECK


async def test_the_installed_wheel_serves_without_the_source_tree(sage, tmp_path, http: aiohttp.ClientSession):
    wheels, site, run = tmp_path / "wheels", tmp_path / "site", tmp_path / "run"
    run.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True)
    [wheel] = wheels.glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    # The installed copy, not the checkout: PYTHONPATH goes first, and nothing runs from the repository.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import connector, plugins; print(connector.__file__)"],
                           cwd=run, env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(site))

    endpoints = SageEndpoints(sage.base_url, sage.client_id, sage.client_secret, sage.api_key)
    port = free_port()
    config = write_config(run / "config.toml", connector_config(
        endpoints, database_url=f"sqlite://{run}/data/connector.sqlite3", port=port, banks=DEMO_BANKS,
        providers={"demobank": {}}))
    (run / "data").mkdir()
    log = run / "connector.log"
    with open(log, "wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "connector.cli", "serve", "--config", str(config), cwd=run, env=env,
            stdout=out, stderr=asyncio.subprocess.STDOUT)
    try:
        calls = SageCalls(sage, endpoints, f"http://127.0.0.1:{port}", http)
        await wait_until_ready(calls.connector_url, lambda: process.returncode, log)
        # Migrations shipped in the wheel were applied; the built-in plugins and templates came with it.
        authorisation_id = await calls.announce()
        async with http.get(calls.auth_url(authorisation_id)) as resp:
            page = await resp.text()
            assert resp.status == 200, page
        assert "Demo Bank" in page and 'name="username"' in page
        stylesheet = re.search(r'href="([^"]+\.css)"', page)
        assert stylesheet
        async with http.get(urljoin(calls.connector_url, stylesheet.group(1))) as resp:
            assert resp.status == 200 and "text/css" in resp.content_type
    finally:
        process.terminate()
        await process.wait()
