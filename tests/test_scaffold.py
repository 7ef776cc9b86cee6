"""``connector new-provider``: the generated package passes its own tests with the kit, installs without network,
and the connector finds it through its entry point and walks its flow.

The package is installed into this environment for this module only (``pip install --no-deps --no-build-isolation
--no-index``, hatchling being a test dependency) and uninstalled afterwards, so it never leaks into other tests.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from connector import scaffold
from connector.hookspecs import ENTRY_POINT_GROUP
from connector.plugins import DISABLE_ENV
from connector.testing.connector import SageEndpoints, connector_config, write_config

NAME = "scaffoldcheck"
TITLE = "Scaffold Check Bank"
PACKAGE = f"{NAME}_connector"
DIST = f"{NAME}-connector"
BANK_ID = "5d0c8a9e-3f7b-4c51-8e2a-6b1d9f0a7c42"
BANKS = ({"sage_bank_id": BANK_ID, "name": TITLE, "provider": NAME},)
REPO = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (DISABLE_ENV, "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "pip", "--disable-pip-version-check", *args)


def forget_package() -> None:
    for module in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[module]
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The generated package, installed (not editable) into this environment for this module's tests."""
    root = tmp_path_factory.mktemp("scaffold") / DIST
    result = run(sys.executable, "-m", "connector.cli", "new-provider", NAME, "--dir", str(root), "--title", TITLE)
    assert result.returncode == 0, result.stderr
    assert f"created {root}" in result.stdout
    pip("uninstall", "-y", DIST)  # the leftover of an interrupted run, if any
    installed = pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(root))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    disabled = os.environ.get(DISABLE_ENV)
    if disabled is not None:  # tests/conftest.py disables installed third-party plugins; this module needs this one
        os.environ[DISABLE_ENV] = ",".join(n for n in disabled.split(",") if n != NAME)
    forget_package()
    try:
        yield root
    finally:
        if disabled is not None:
            os.environ[DISABLE_ENV] = disabled
        removed = pip("uninstall", "-y", DIST)
        forget_package()
        assert removed.returncode == 0, removed.stderr
        assert NAME not in {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def test_the_kit_is_one_pytest_plugin_loaded_through_its_entry_point(pytestconfig: pytest.Config) -> None:
    import connector.testing.fixtures as kit

    [entry] = [ep for ep in metadata.entry_points(group="pytest11") if ep.value == kit.__name__]
    assert entry.name == "connector" and entry.dist is not None and entry.dist.name == "sage-banking-connector"
    names = [name for name, plugin in pytestconfig.pluginmanager.list_name_plugin() if plugin is kit]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        assert len(names) == 1  # registered once, by tests/conftest.py
    else:
        assert names == ["connector"]  # by the entry point, exactly as for a third-party package


def test_installed_third_party_plugins_do_not_reach_our_tests(pytestconfig: pytest.Config, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/conftest.py disables every installed provider plugin that is not ours (datasette's guard)."""
    from connector.plugins import load_plugins

    conftest = next(p for p in pytestconfig.pluginmanager.get_plugins()
                    if Path(getattr(p, "__file__", "") or "") == REPO / "tests" / "conftest.py")
    (tmp_path / "intruder_bank.py").write_text("raise RuntimeError('an installed plugin was loaded by our tests')\n")
    info = tmp_path / "intruder_bank-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: intruder-bank\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nintruder = intruder_bank\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    assert "intruder" in conftest.third_party_provider_plugins()
    assert "demobank" not in conftest.third_party_provider_plugins()
    conftest.pytest_configure(pytestconfig)  # what happens at the start of a run
    assert "intruder" in os.environ[DISABLE_ENV].split(",")
    assert "intruder" not in load_plugins().providers()  # and its module was never imported


def test_the_generated_files(tmp_path: Path) -> None:
    root, written = scaffold.scaffold("acme_bank", tmp_path / "acme")
    assert {str(p) for p in written} == {
        ".gitignore", "README.md", "pyproject.toml", "tests/test_acme_bank.py",
        *(f"acme_bank_connector/{f}.py" for f in ("__init__", "client", "errors", "mapping", "plugin", "provider")),
    }
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points."connector.providers"]\nacme_bank = "acme_bank_connector.plugin"' in pyproject
    assert 'name = "acme-bank-connector"' in pyproject
    assert "class AcmeBank:" in (root / "acme_bank_connector/provider.py").read_text()
    assert 'title: ClassVar[str] = "Acme Bank"' in (root / "acme_bank_connector/provider.py").read_text()
    for path in root.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), path
            if path.suffix == ".py":
                compile(path.read_text(), str(path), "exec")


@pytest.mark.parametrize(("args", "message"), [
    (("Acme Bank",), "can't be a provider name"),
    (("1bank",), "can't be a provider name"),
    (("class",), "is a Python keyword"),
    (("demobank",), "a built-in provider is already called 'demobank'"),
])
def test_new_provider_refuses_a_bad_name(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = run(sys.executable, "-m", "connector.cli", "new-provider", *args, "--dir", str(tmp_path / "x"))
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "x").exists()


def test_new_provider_never_writes_into_a_folder_that_has_files(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(scaffold.ScaffoldError, match="not an empty folder"):
        scaffold.scaffold("acme", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_the_generated_package_passes_its_own_tests(generated: Path) -> None:
    result = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=generated)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "5 passed" in result.stdout


def test_connector_providers_lists_it_from_its_entry_point(generated: Path, tmp_path: Path) -> None:
    sage = SageEndpoints("http://127.0.0.1:9", "client", "secret", "api-key")
    config = connector_config(sage, database_url=f"sqlite://{tmp_path}/db.sqlite3", port=8080, banks=BANKS,
                              providers={NAME: {"history_days": 30}})
    path = write_config(tmp_path / "config.toml", config)
    connector = str(Path(sys.executable).with_name("connector"))
    result = run(connector, "providers", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    block = lines[lines.index(f"{NAME}  ({TITLE})  enabled"):]
    assert f"    from: entry point: {NAME} = {PACKAGE}.plugin ({DIST})" in block
    assert f"    bank: {TITLE} (sage_bank_id {BANK_ID})" in block
    checked = run(connector, "check-config", "--config", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    bad = write_config(tmp_path / "bad.toml", {**config, "providers": {NAME: {"colour": "blue"}}})
    checked = run(connector, "check-config", "--config", str(bad), cwd=tmp_path)
    assert checked.returncode == 1
    assert f"providers.{NAME}.colour: unknown key" in checked.stderr


@pytest.fixture
async def connector(generated, connector_factory):
    return await connector_factory(banks=BANKS, providers={NAME: {}})


async def test_the_connector_walks_its_flow(generated, plugins, sage, sage_calls, browser) -> None:
    entry = plugins.providers()[NAME]  # loaded here from the installed entry point, not registered by the test
    assert entry.origin == f"entry point: {NAME} = {PACKAGE}.plugin ({DIST})"
    authorisation_id = await sage_calls.announce(BANK_ID)
    page = await browser.get(sage_calls.auth_url(authorisation_id, bank_id=BANK_ID))
    assert page.h1 == f"Sign in to {TITLE}"
    page = await browser.submit(page, {"User name": "bob", "Password": "secret"}, button="Sign in")
    assert page.h1 == "Choose the accounts to share with Sage"
    done = await browser.submit(page, button="Share with Sage")
    assert done.left_to is not None
    [patch] = sage.patches
    assert patch.authorisation_id == authorisation_id
    assert len(patch.body["data"]["bankAccounts"]) == 2
