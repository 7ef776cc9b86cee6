"""Shared set-up of our own tests.

The fixtures come from the provider author's kit, ``connector.testing.fixtures``: a pytest plugin that the
``pytest11`` entry point loads once, exactly as it does for third-party provider packages. It is not listed in
``pytest_plugins`` here (pluggy would refuse the second registration); it is registered below only when plugin
autoloading is off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``) or the entry point is not installed.

Installed third-party provider plugins must not change our results (datasette's ``sys._called_from_test``): their
entry points are disabled for this run, in this process and in the CLI subprocesses the tests start. A test that
needs one (``tests/test_scaffold.py``) says so.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

import pytest

import connector.testing.fixtures as kit
from connector.hookspecs import ENTRY_POINT_GROUP
from connector.plugins import DEFAULT_PLUGINS, DISABLE_ENV

OUR_DISTRIBUTION = "sage-banking-connector"


def third_party_provider_plugins() -> list[str]:
    """Entry-point names of installed provider plugins that are not ours (nor named like a built-in)."""
    built_in = {dotted.rsplit(".", 1)[-1] for dotted in DEFAULT_PLUGINS}
    return sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
                   if (ep.dist is None or ep.dist.name != OUR_DISTRIBUTION) and ep.name not in built_in})


def pytest_configure(config: pytest.Config) -> None:
    sys._called_from_test = True  # type: ignore[attr-defined]
    if not config.pluginmanager.is_registered(kit):
        config.pluginmanager.register(kit, kit.__name__)
    foreign = third_party_provider_plugins()
    if foreign:
        already = [name for name in os.environ.get(DISABLE_ENV, "").split(",") if name]
        os.environ[DISABLE_ENV] = ",".join(dict.fromkeys([*already, *foreign]))


def pytest_unconfigure(config: pytest.Config) -> None:
    if hasattr(sys, "_called_from_test"):
        del sys._called_from_test
