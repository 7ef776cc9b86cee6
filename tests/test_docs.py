"""The documentation stays true to the code (datasette's ``test_docs.py``, for our contract and references).

* every hook and every method of the provider contract has a section in ``docs/plugins.md`` whose documented
  arguments are the specification's, with when it is called, what it returns and an example;
* the generated reference pages (config, error codes) are up to date, and every error code is in them;
* every command of the CLI is in the admin guide;
* the site builds with ``mkdocs build --strict``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pluggy
import pytest

from connector import hookspecs
from connector.config import schema
from connector.errors import API_ERRORS, PAGES
from connector.hookspecs import (
    ConsentSession,
    Provider,
    ProviderServices,
    WebhookProvider,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "plugins.md"
#: A documented signature: a level 2-4 heading holding only ``name(args)`` in backticks.
HEADING = re.compile(r"^#{2,4} `(?P<name>[A-Za-z_][\w.]*)\((?P<args>[^)]*)\)`\s*$", re.MULTILINE)
CONTRACT = (Provider, WebhookProvider, ProviderServices, ConsentSession)


def load_gen_docs() -> Any:
    """``scripts/gen_docs.py``, imported once."""
    if "gen_docs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["gen_docs"] = module  # dataclasses look their module up while the module runs
        spec.loader.exec_module(module)
    return sys.modules["gen_docs"]


def documented() -> dict[str, tuple[list[str], str]]:
    """Each documented signature: its argument names, and the text of its section."""
    text = REFERENCE.read_text(encoding="utf-8")
    found: dict[str, tuple[list[str], str]] = {}
    matches = list(HEADING.finditer(text))
    for match, following in zip(matches, [*matches[1:], None]):
        end = following.start() if following else len(text)
        section = text[match.end():end]
        section = section[:m.start()] if (m := re.search(r"^#{1,2} ", section, re.MULTILINE)) else section
        args = [a.split("=")[0].split(":")[0].strip().lstrip("*") for a in match["args"].split(",")]
        assert match["name"] not in found, f"{match['name']} is documented twice"
        found[match["name"]] = ([a for a in args if a], section)
    return found


def hook_specs() -> dict[str, list[str]]:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return {name: list(caller.spec.argnames) for name, caller in vars(pm.hook).items()
            if isinstance(caller, pluggy.HookCaller) and caller.spec is not None}


def contract_methods() -> dict[str, list[str]]:
    """``Class.method`` → its argument names (without ``self``/``cls``), for every method a plugin implements or is
    handed."""
    out = {}
    for cls in CONTRACT:
        for name, value in cls.__dict__.items():
            function = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
            if not inspect.isfunction(function) or function.__qualname__ != f"{cls.__name__}.{name}":
                continue  # properties, and the __init__ typing.Protocol adds
            if name.startswith("_") and name != "__init__":
                continue
            params = list(inspect.signature(function).parameters)
            out[f"{cls.__name__}.{name}"] = params[1:]
    return out


def test_every_hook_is_documented_with_the_specifications_arguments():
    specs = hook_specs()
    docs = documented()
    assert specs, "no hook specification found"
    for name, argnames in specs.items():
        assert name in docs, f"hook {name} is not documented in {REFERENCE.relative_to(ROOT)}"
        assert docs[name][0] == argnames, f"{name}: documented {docs[name][0]}, specified {argnames}"


def test_every_method_of_the_contract_is_documented_with_its_arguments():
    methods = contract_methods()
    docs = documented()
    assert {"Provider.start", "Provider.read_account", "WebhookProvider.webhook"} <= set(methods)
    for name, argnames in methods.items():
        assert name in docs, f"{name} is not documented in {REFERENCE.relative_to(ROOT)}"
        assert docs[name][0] == argnames, f"{name}: documented {docs[name][0]}, specified {argnames}"


def test_nothing_is_documented_that_the_contract_does_not_have():
    known = set(hook_specs()) | set(contract_methods())
    assert set(documented()) <= known, set(documented()) - known


@pytest.mark.parametrize("name", sorted(set(hook_specs()) | set(contract_methods())))
def test_each_section_says_when_it_is_called_what_it_returns_with_an_example(name):
    _, section = documented()[name]
    assert "**When it is called:**" in section, name
    assert "**Returns:**" in section, name
    assert "**Example:**" in section and "```python" in section.split("**Example:**", 1)[1], name


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_each_hook_specification_documents_its_parameters(name):
    function = getattr(hookspecs, name)
    doc = inspect.getdoc(function) or ""
    assert doc, f"{name} has no docstring"
    for arg in hook_specs()[name]:
        assert f":param {arg}:" in doc, f"{name}: no ':param {arg}:' in its docstring"
    assert ":return" in doc, name


# --- Generated references ------------------------------------------------------------------------------------


def test_the_generated_reference_pages_are_up_to_date():
    gen = load_gen_docs()
    assert gen.problems() == []
    for path, text in gen.generate().items():
        assert path.exists(), f"{path.relative_to(ROOT)} is missing: run python scripts/gen_docs.py"
        assert path.read_text(encoding="utf-8") == text, \
            f"{path.relative_to(ROOT)} is out of date: run python scripts/gen_docs.py"


def all_error_codes() -> set[str]:
    codes = set(PAGES) | set(API_ERRORS)
    for name, path in load_gen_docs().plugin_dirs():
        # Independently of the generator's parser: every quoted "<provider>_..." string in the plugin's source.
        for source in path.rglob("*.py"):
            codes |= set(re.findall(rf"[\"']({name}_[a-z0-9_]+)[\"']", source.read_text(encoding="utf-8")))
    return codes


def test_every_error_code_is_listed_in_the_error_reference():
    text = (DOCS / "reference" / "errors.md").read_text(encoding="utf-8")
    codes = all_error_codes()
    assert len(codes) > 60
    missing = sorted(code for code in codes if f"| `{code}` |" not in text)
    assert not missing, f"error codes missing from docs/reference/errors.md: {missing}"


def test_the_error_reference_says_what_each_provider_code_is():
    gen = load_gen_docs()
    for codes in gen.all_provider_codes().values():
        for code in codes.values():
            assert code.message, f"{code.code}: no message found for the person"


def test_every_config_key_is_in_the_config_reference():
    text = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    for section in (*schema.SECTIONS, schema.PROVIDER):
        heading = f"[[{section.name}]]" if section.array else f"[{section.name.replace('.*', '.<name>')}]"
        part = text.split(f"## `{heading}`", 1)
        assert len(part) == 2, f"section {heading} is not in the config reference"
        body = part[1].split("\n## ", 1)[0]
        for key in section.keys:
            assert f"| `{key.name}` |" in body, f"{section.name}.{key.name} is not in the config reference"


def test_every_command_is_in_the_admin_guide():
    import argparse

    from connector.cli import parser

    text = (DOCS / "admin" / "index.md").read_text(encoding="utf-8")

    def commands(p: argparse.ArgumentParser, prefix: str) -> list[str]:
        out = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    nested = commands(sub, f"{prefix} {name}")
                    out += nested or [f"{prefix} {name}"]
        return out

    found = commands(parser(), "connector")
    assert "connector new-provider" in found and "connector feed status" in found
    for command in found:
        assert f"`{command}" in text, f"{command} is not in docs/admin/index.md"


def test_the_readme_links_to_the_documentation():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/index.md)" in readme


def test_architecture_notes_are_kept_in_the_site():
    assert (DOCS / "ARCHITECTURE.md").exists()
    assert "ARCHITECTURE.md" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


# --- The site ------------------------------------------------------------------------------------------------


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "plugins" / "index.html").exists()
    assert (tmp_path / "site" / "reference" / "errors" / "index.html").exists()
