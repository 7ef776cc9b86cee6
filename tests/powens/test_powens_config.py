"""Config and bank checks, registration through the plugin hook."""

from __future__ import annotations

from typing import Any

import pytest
from powens_helpers import bank

from connector.hookspecs import Provider
from connector.outbound import CoreServices
from connector.plugins import load_plugins
from connector.testing.powens import TWO_SOURCE_BANK
from plugins.powens import Powens

VALID: dict[str, Any] = {"domain": "acme-sandbox", "client_id": "1234567", "client_secret": "s"}


def keys(problems: Any) -> set[str]:
    return {key for key, _ in problems}


def test_registered_through_the_hook() -> None:
    entry = load_plugins().providers()["powens"]
    assert entry.cls is Powens
    assert entry.origin == "built-in: plugins.powens"
    assert Powens.title == "Powens" and Powens.template_dir is None
    assert isinstance(Powens(VALID, CoreServices("https://c.example", "powens")), Provider)
    assert callable(Powens.webhook)


def test_valid_config() -> None:
    assert list(Powens.check_config(VALID)) == []
    full = {**VALID, "base_url": "http://127.0.0.1:8000/2.0", "webhook_secret": "x", "requests_per_minute": 60,
            "sync_timeout_seconds": 120, "timeout_seconds": 10.5, "poll_interval_minutes": 60}
    assert list(Powens.check_config(full)) == []


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"domain": "Acme_Sandbox"}, "domain"),
        ({"domain": None}, "domain"),
        ({"client_id": "abc"}, "client_id"),
        ({"client_id": ""}, "client_id"),
        ({"client_secret": ""}, "client_secret"),
        ({"base_url": "http://powens.example.com/2.0"}, "base_url"),
        ({"base_url": "ftp://x"}, "base_url"),
        ({"base_url": "https://x.example/2.0?debug=1"}, "base_url"),
        ({"webhook_secret": ""}, "webhook_secret"),
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"requests_per_minute": 1.5}, "requests_per_minute"),
        ({"sync_timeout_seconds": "180"}, "sync_timeout_seconds"),
        ({"poll_interval_minutes": True}, "poll_interval_minutes"),
        ({"clinet_id": "1"}, "clinet_id"),
    ],
)
def test_config_problems_name_their_key(change: dict[str, Any], key: str) -> None:
    config = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    assert key in keys(Powens.check_config(config))


def test_base_url_replaces_domain() -> None:
    config = {"base_url": "https://acme.biapi.pro/2.0/", "client_id": "1", "client_secret": "s"}
    assert list(Powens.check_config(config)) == []


def test_bank_checks() -> None:
    assert list(Powens.check_bank(bank(TWO_SOURCE_BANK, sources=["directaccess"], account_types=["checking"],
                                       offer_more_sources=False))) == []
    assert list(Powens.check_bank(bank("42"))) == []  # the deprecated numeric id
    assert keys(Powens.check_bank(bank(""))) == {"provider_bank"}
    assert keys(Powens.check_bank(bank("not a uuid"))) == {"provider_bank"}
    problems = Powens.check_bank(bank(TWO_SOURCE_BANK, sources="openapi", account_types=[1],
                                      offer_more_sources="yes", colour="red"))
    assert keys(problems) == {"options.sources", "options.account_types", "options.offer_more_sources",
                              "options.colour"}
