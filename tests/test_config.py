"""The configuration contract (product.md "Configuration", security.md S5 and O9) and the commands that read it.

Schema checks run in-process on :func:`parse_settings` (fast); ``connector check-config`` and ``connector providers``
run as real subprocesses with a controlled environment, as an admin would run them.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from connector.config import ConfigError, Problem, check_settings, load_settings, parse_settings
from connector.config.schema import SAGE_PRESETS
from connector.hookspecs import hookimpl
from connector.plugins import PluginError, Plugins, load_plugins
from connector.testing.connector import to_toml

REPO = Path(__file__).resolve().parents[1]
DEMO_BANK_ID = "10aaeee6-4691-4443-8198-df39aaa8007c"
OTHER_BANK_ID = "3f1c6a0e-6a55-4f7e-9f59-2d4b3c1e0a11"


def b64key(fill: int) -> str:
    return base64.urlsafe_b64encode(bytes([fill]) * 32).decode().rstrip("=")


ENV = {
    "KEY_A": b64key(1),
    "KEY_B": b64key(2),
    "SAGE_CLIENT_ID": "client-id",
    "SAGE_CLIENT_SECRET": "client-secret-value",
    "SAGE_API_KEY": "api-key-value",
    "SAGE_NOTIFICATION_KEY": "n" * 43,
}

BASE: dict[str, Any] = {
    "server": {"public_url": "https://connector.example.com", "host": "127.0.0.1", "port": 8080},
    "database": {"url": "sqlite://data/connector.sqlite3"},
    "security": {"encryption_keys": ["${KEY_A}"]},
    "sage": {
        "environment": "sandbox",
        "client_id": "${SAGE_CLIENT_ID}",
        "client_secret": "${SAGE_CLIENT_SECRET}",
        "api_key": "${SAGE_API_KEY}",
        "notification_header": {"name": "X-Connector-Key", "value": "${SAGE_NOTIFICATION_KEY}"},
    },
    "providers": {"demobank": {"enabled": True}},
    "banks": [{"sage_bank_id": DEMO_BANK_ID, "name": "Demo Bank", "provider": "demobank"}],
}


def config(**changes: Any) -> dict[str, Any]:
    """BASE with ``section__key=value`` changes; a value of ``DROP`` removes the key."""
    cfg = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = cfg
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if value is DROP:
            node.pop(last, None)
        else:
            node[last] = value
    return cfg


DROP = object()


def problems(cfg: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    """Problems of the parsed config, keyed by their config key (a key may carry one problem in these tests)."""
    _, found = parse_settings(cfg, env=ENV if env is None else env)
    return {p.key: p.message for p in found}


def all_problems(cfg: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    """Schema problems plus those that need the loaded plugins."""
    settings, found = parse_settings(cfg, env=ENV if env is None else env)
    found += check_settings(settings, load_plugins())
    return {p.key: p.message for p in found}


def settings_of(cfg: dict[str, Any], env: dict[str, str] | None = None):
    settings, found = parse_settings(cfg, env=ENV if env is None else env)
    assert found == [], found
    return settings


# --- TOML writing, for the files the subprocess tests read -------------------------------------------------------


def test_toml_writer_round_trips() -> None:
    import tomllib

    assert tomllib.loads(to_toml(BASE)) == BASE
    awkward = {"server": {"public_url": 'a "quoted" \\ back\nslash\ttab\x7f\x01 é 😀'}}
    assert tomllib.loads(to_toml(awkward)) == awkward


# --- A valid file, and TOML syntax -----------------------------------------------------------------------------------


def test_valid_config_has_no_problems_and_fills_defaults() -> None:
    settings = settings_of(BASE)
    assert settings.public_url == "https://connector.example.com"
    assert settings.encryption_keys == (bytes([1]) * 32,)
    assert settings.sage["client_secret"] == "client-secret-value"
    assert settings.sage["notification_header"] == {"name": "X-Connector-Key", "value": "n" * 43}
    assert settings.server["workers"] == 1
    assert settings.feed == {"enabled": True, "interval_seconds": 300, "parallel_accounts": 8, "lease_seconds": 60}
    assert settings.security["authorisation_ttl_seconds"] == 1200
    assert [b.sage_bank_id for b in settings.banks] == [DEMO_BANK_ID]
    assert all_problems(BASE) == {}


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[server]\npublic_url = "https://x.example.com"\nport = = 8080\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, env=ENV)
    [problem] = err.value.problems
    assert problem.key == str(path)
    assert "not valid TOML" in problem.message and "line 3" in problem.message


def test_missing_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(tmp_path / "nope.toml", env=ENV)
    assert err.value.problems == [Problem(str(tmp_path / "nope.toml"), "config file not found")]


def test_load_settings_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(to_toml(BASE))
    settings = load_settings(path, env=ENV, plugins=load_plugins())
    assert settings.path == path and settings.sage["api_key"] == "api-key-value"


# --- ${ENV} interpolation --------------------------------------------------------------------------------------------


def test_whole_string_and_embedded_variables() -> None:
    env = {**ENV, "HOST": "bank.example.com", "PREFIX": "conn", "PORT_TEXT": "8443"}
    settings = settings_of(config(server__public_url="https://${PREFIX}.${HOST}:${PORT_TEXT}/sage",
                                  banks__0__name="${PREFIX} bank"), env)
    assert settings.public_url == "https://conn.bank.example.com:8443/sage"
    assert settings.banks[0].name == "conn bank"
    assert settings.sage["client_id"] == "client-id"


def test_a_value_from_the_environment_is_not_expanded_again() -> None:
    settings = settings_of(config(), {**ENV, "SAGE_CLIENT_SECRET": "${KEY_A}"})
    assert settings.sage["client_secret"] == "${KEY_A}"


@pytest.mark.parametrize(("drop", "key"), [
    ("SAGE_CLIENT_SECRET", "sage.client_secret"),
    ("KEY_A", "security.encryption_keys[0]"),
    ("SAGE_NOTIFICATION_KEY", "sage.notification_header.value"),
])
def test_missing_variable_names_the_key_and_the_variable_once(drop: str, key: str) -> None:
    env = {k: v for k, v in ENV.items() if k != drop}
    found = parse_settings(BASE, env=env)[1]
    assert found == [Problem(key, f"environment variable {drop} is not set")]


def test_missing_variable_embedded_in_a_string() -> None:
    found = problems(config(server__public_url="https://${CONNECTOR_HOST}/x"))
    assert found == {"server.public_url": "environment variable CONNECTOR_HOST is not set"}


def test_every_missing_variable_is_reported() -> None:
    found = problems(BASE, env={})
    assert set(found) == {"security.encryption_keys[0]", "sage.client_id", "sage.client_secret", "sage.api_key",
                          "sage.notification_header.value"}
    assert all("environment variable" in m and "is not set" in m for m in found.values())


def test_dollar_without_braces_is_kept() -> None:
    assert settings_of(config(banks__0__name="Bank $ and ${")).banks[0].name == "Bank $ and ${"


# --- Sage presets ----------------------------------------------------------------------------------------------------

SAGE_URLS = ("issuer", "audience", "jwks_url", "token_url", "token_audience")


@pytest.mark.parametrize("environment", ["sandbox", "production"])
@pytest.mark.parametrize("region", ["eu", "us"])
def test_environment_and_region_presets(environment: str, region: str) -> None:
    sage = settings_of(config(sage__environment=environment, sage__region=region)).sage
    preset = SAGE_PRESETS[environment]
    for name in SAGE_URLS:
        assert sage[name] == preset[name], name
    assert sage["provider_api_url"] == preset[f"provider_api_url.{region}"]


def test_presets_default_to_sandbox_eu() -> None:
    sage = settings_of(config(sage__environment=DROP)).sage
    assert sage["issuer"] == "https://id-shadow.sage.com/"
    assert sage["provider_api_url"] == "https://papi-snd01-eu-west-1.sagebanking-sandbox.cloud"


def test_production_urls_differ_from_sandbox() -> None:
    sandbox, production = SAGE_PRESETS["sandbox"], SAGE_PRESETS["production"]
    assert all(sandbox[k] != production[k] for k in sandbox)
    assert all(v.startswith("https://") for p in (sandbox, production) for k, v in p.items() if "url" in k)


OVERRIDES = {
    "issuer": "https://id.local.example/",
    "audience": "my-audience",
    "jwks_url": "https://id.local.example/keys",
    "token_url": "http://127.0.0.1:9999/oauth/token",
    "token_audience": "other-audience",
    "provider_api_url": "https://papi.local.example/base",
}


@pytest.mark.parametrize("environment", ["sandbox", "production"])
@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_each_sage_url_is_overridable_alone(environment: str, name: str) -> None:
    sage = settings_of(config(sage__environment=environment, **{f"sage__{name}": OVERRIDES[name]})).sage
    assert sage[name] == OVERRIDES[name]
    preset = SAGE_PRESETS[environment]
    for other in SAGE_URLS:
        if other != name:
            assert sage[other] == preset[other]
    if name != "provider_api_url":
        assert sage["provider_api_url"] == preset["provider_api_url.eu"]


def test_provider_api_url_loses_its_trailing_slash() -> None:
    sage = settings_of(config(sage__provider_api_url="http://127.0.0.1:9000/")).sage
    assert sage["provider_api_url"] == "http://127.0.0.1:9000"


# --- Unknown keys, types, ranges and choices --------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "key"), [
    ({"server__prot": 8080}, "server.prot"),
    ({"sage__clientid": "x"}, "sage.clientid"),
    ({"security__encryption_key": ["x"]}, "security.encryption_key"),
    ({"feed__enable": False}, "feed.enable"),
    ({"banks__0__provder": "demobank"}, "banks[0].provder"),
])
def test_unknown_keys_are_refused_with_their_key(changes: dict[str, Any], key: str) -> None:
    assert problems(config(**changes)) == {key: "unknown key"}


def test_unknown_sections_are_refused() -> None:
    cfg = config()
    cfg["sever"] = {"port": 1}
    cfg["bank"] = [{"name": "x"}]
    assert problems(cfg) == {"sever": "unknown section", "bank": "unknown section"}


def test_unknown_key_inside_the_notification_header_table() -> None:
    header = {"name": "X-Connector-Key", "value": "v" * 32, "valu": "typo"}
    assert list(problems(config(sage__notification_header=header))) == ["sage.notification_header"]


@pytest.mark.parametrize(("changes", "key", "words"), [
    ({"server__port": "8080"}, "server.port", "must be a whole number, got a string"),
    ({"server__port": True}, "server.port", "must be a whole number, got a boolean"),
    ({"server__port": 80.5}, "server.port", "must be a whole number"),
    ({"feed__enabled": "yes"}, "feed.enabled", "must be true or false"),
    ({"sage__requests_per_second": "10"}, "sage.requests_per_second", "must be a number"),
    ({"security__redirect_hosts": "*.sage.com"}, "security.redirect_hosts", "must be a list of strings"),
    ({"security__redirect_hosts": ["*.sage.com", 3]}, "security.redirect_hosts", "must be a list of strings"),
    ({"security__encryption_keys": "${KEY_A}"}, "security.encryption_keys", "must be a list of strings"),
    ({"sage__notification_header": "X-Key: value"}, "sage.notification_header", "must be a table"),
    ({"banks__0__options": "fast"}, "banks[0].options", "must be a table"),
    ({"providers__demobank__enabled": "true"}, "providers.demobank.enabled", "must be true or false"),
])
def test_wrong_types(changes: dict[str, Any], key: str, words: str) -> None:
    found = problems(config(**changes))
    assert list(found) == [key]
    assert words in found[key]


def test_wrong_shape_of_sections() -> None:
    cfg = config()
    cfg["server"] = "https://x"
    cfg["banks"] = {"name": "x"}
    cfg["providers"] = ["demobank"]
    assert set(problems(cfg)) == {"server", "banks", "providers"}


@pytest.mark.parametrize(("changes", "key", "words"), [
    ({"server__port": 0}, "server.port", "at least 1"),
    ({"server__port": 65536}, "server.port", "at most 65535"),
    ({"server__workers": 0}, "server.workers", "at least 1"),
    ({"security__authorisation_ttl_seconds": 30}, "security.authorisation_ttl_seconds", "at least 60"),
    ({"sage__statement_batch_size": 1001}, "sage.statement_batch_size", "at most 1000"),
    ({"sage__requests_per_second": 0}, "sage.requests_per_second", "at least 0.1"),
    ({"sage__requests_per_second": float("nan")}, "sage.requests_per_second", "finite"),
    ({"sage__requests_per_second": float("inf")}, "sage.requests_per_second", "finite"),
    ({"sage__clock_leeway_seconds": -1}, "sage.clock_leeway_seconds", "at least 0"),
    ({"feed__parallel_accounts": 257}, "feed.parallel_accounts", "at most 256"),
])
def test_out_of_range(changes: dict[str, Any], key: str, words: str) -> None:
    found = problems(config(**changes))
    assert list(found) == [key]
    assert words in found[key]


@pytest.mark.parametrize(("changes", "key"), [
    ({"sage__environment": "staging"}, "sage.environment"),
    ({"sage__region": "ap"}, "sage.region"),
    ({"logging": {"level": "verbose"}}, "logging.level"),
    ({"logging": {"format": "xml"}}, "logging.format"),
])
def test_bad_choices_list_the_good_ones(changes: dict[str, Any], key: str) -> None:
    found = problems(config(**changes))
    assert list(found) == [key]
    assert "must be one of" in found[key]


@pytest.mark.parametrize(("changes", "key"), [
    ({"sage__client_id": DROP}, "sage.client_id"),
    ({"sage__client_id": ""}, "sage.client_id"),
    ({"sage__notification_header": DROP}, "sage.notification_header"),
    ({"security__encryption_keys": DROP}, "security.encryption_keys"),
    ({"banks__0__name": DROP}, "banks[0].name"),
    ({"banks__0__provider": DROP}, "banks[0].provider"),
])
def test_required_keys(changes: dict[str, Any], key: str) -> None:
    found = problems(config(**changes))
    assert list(found) == [key] and "required" in found[key]


@pytest.mark.parametrize(("changes", "key"), [
    ({"database__url": "data/connector.sqlite3"}, "database.url"),
    ({"database__url": "redis://localhost"}, "database.url"),
    ({"banks__0__country_code": "gbr"}, "banks[0].country_code"),
    ({"banks__0__sage_bank_id": "bank-1"}, "banks[0].sage_bank_id"),
    ({"sage__aggregator_id": "not-a-uuid"}, "sage.aggregator_id"),
])
def test_other_value_checks(changes: dict[str, Any], key: str) -> None:
    assert list(problems(config(**changes))) == [key]


# --- URLs (O9 for public_url) ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "url", "words"), [
    ("server__public_url", "http://connector.example.com", "https"),
    ("server__public_url", "http://10.0.0.5:8080", "https"),
    ("server__public_url", "http://localhost.evil.example", "https"),
    ("server__public_url", "https://connector.example.com/?debug=1", "query"),
    ("server__public_url", "https://connector.example.com/#top", "fragment"),
    ("server__public_url", "https://connector.example.com?", "query"),
    ("server__public_url", "ftp://connector.example.com", "absolute http(s) URL"),
    ("server__public_url", "connector.example.com", "absolute http(s) URL"),
    ("server__public_url", "https://admin:pw@connector.example.com", "user name"),
    ("server__public_url", "https://connector.example.com:99999", "absolute http(s) URL"),
    ("sage__jwks_url", "http://id.sage.com/.well-known/jwks.json", "https"),
    ("sage__token_url", "https://id.sage.com/oauth/token?audience=x", "query"),
    ("sage__provider_api_url", "http://papi.example.com", "https"),
    ("sage__issuer", "http://id.sage.com/", "https"),
    ("banks__0__url", "http://bank.example.com", "https"),
])
def test_bad_urls(key: str, url: str, words: str) -> None:
    found = problems(config(**{key: url}))
    dotted = key.replace("__0__", "[0].").replace("__", ".")
    assert list(found) == [dotted]
    assert words in found[dotted]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:9000/sage", "http://[::1]:8080",
                                 "http://127.0.0.2", "https://connector.example.com/prefix"])
def test_loopback_http_and_https_urls_are_accepted(url: str) -> None:
    assert problems(config(server__public_url=url)) == {}


# --- Encryption keys (S5) --------------------------------------------------------------------------------------------


def test_keys_decode_in_order_standard_or_urlsafe_base64() -> None:
    standard = base64.b64encode(bytes([0xFB]) * 32).decode()  # with "+", "/" and padding
    urlsafe = base64.urlsafe_b64encode(bytes([0xFB]) * 31 + b"\x00").decode().rstrip("=")
    settings = settings_of(config(security__encryption_keys=["${KEY_B}", "${KEY_A}", standard, urlsafe]))
    assert settings.encryption_keys == (bytes([2]) * 32, bytes([1]) * 32, bytes([0xFB]) * 32,
                                        bytes([0xFB]) * 31 + b"\x00")


@pytest.mark.parametrize(("keys", "key", "words"), [
    (["${KEY_A}", "not base64 at all!"], "security.encryption_keys[1]", "not valid base64"),
    (["${KEY_A}", "abcde"], "security.encryption_keys[1]", "not valid base64"),
    ([base64.b64encode(b"k" * 16).decode()], "security.encryption_keys[0]", "32 bytes"),
    ([base64.b64encode(b"k" * 33).decode()], "security.encryption_keys[0]", "32 bytes"),
    (["${KEY_A}", "${KEY_B}", "${KEY_A}"], "security.encryption_keys[2]", "repeats security.encryption_keys[0]"),
    ([], "security.encryption_keys", "at least one key"),
])
def test_bad_encryption_keys_name_their_index(keys: list[str], key: str, words: str) -> None:
    found = problems(config(security__encryption_keys=keys))
    assert list(found) == [key]
    assert words in found[key]


def test_same_key_in_two_spellings_is_a_duplicate() -> None:
    raw = bytes(range(32))
    found = problems(config(security__encryption_keys=[base64.b64encode(raw).decode(),
                                                        base64.urlsafe_b64encode(raw).decode().rstrip("=")]))
    assert list(found) == ["security.encryption_keys[1]"]


# --- Notification header ---------------------------------------------------------------------------------------------


def test_notification_header_value_of_31_characters_is_refused() -> None:
    found = problems(BASE, env={**ENV, "SAGE_NOTIFICATION_KEY": "v" * 31})
    assert list(found) == ["sage.notification_header.value"]
    assert "at least 32 characters" in found["sage.notification_header.value"]
    assert problems(BASE, env={**ENV, "SAGE_NOTIFICATION_KEY": "v" * 32}) == {}


def test_notification_header_name_must_be_a_header_name() -> None:
    found = problems(config(sage__notification_header={"name": "X Connector: Key", "value": "v" * 40}))
    assert list(found) == ["sage.notification_header.name"]


# --- Banks and providers (need the loaded plugins) --------------------------------------------------------------------


def test_bank_mapped_to_a_provider_that_is_not_loaded() -> None:
    found = all_problems(config(banks__0__provider="nosuchbank"))
    assert list(found) == ["banks[0].provider"]
    assert "'nosuchbank' is not loaded" in found["banks[0].provider"] and "demobank" in found["banks[0].provider"]


def test_bank_mapped_to_a_disabled_provider() -> None:
    found = all_problems(config(providers__demobank__enabled=False))
    assert list(found) == ["banks[0].provider"]
    assert "no enabled [providers.demobank]" in found["banks[0].provider"]


def test_bank_mapped_to_a_provider_without_a_table() -> None:
    assert list(all_problems(config(providers={}))) == ["banks[0].provider"]


def test_provider_table_for_a_provider_that_is_not_loaded() -> None:
    assert list(all_problems(config(providers__nosuchbank={"enabled": True}))) == ["providers.nosuchbank"]


def test_the_plugin_checks_its_own_table() -> None:
    found = all_problems(config(providers__demobank={"enabled": True, "colour": "blue", "history_days": 0}))
    assert set(found) == {"providers.demobank.colour", "providers.demobank.history_days"}
    assert "unknown key" in found["providers.demobank.colour"]


def test_a_disabled_provider_table_is_not_checked_by_its_plugin() -> None:
    cfg = config(providers__demobank={"enabled": False, "colour": "blue"}, banks=[])
    assert all_problems(cfg) == {}


def test_the_plugin_checks_its_banks() -> None:
    found = all_problems(config(banks__0__options={"mode": "fast"}))
    assert list(found) == ["banks[0].options"]


def test_duplicate_sage_bank_id() -> None:
    banks = [dict(BASE["banks"][0]), {"sage_bank_id": DEMO_BANK_ID.upper(), "name": "Copy", "provider": "demobank"},
             {"sage_bank_id": OTHER_BANK_ID, "name": "Other", "provider": "demobank"},
             {"name": "Not registered yet", "provider": "demobank"}, {"name": "Nor this", "provider": "demobank"}]
    found = problems(config(banks=banks))
    assert found == {"banks[1].sage_bank_id": "is also the sage_bank_id of banks[0]"}


class _Named:
    """A throwaway plugin registering one provider class."""

    def __init__(self, name: str, *, broken_check: bool = False) -> None:
        class Provider:
            title = name.title()
            template_dir = None

            @classmethod
            def check_config(cls, config):
                if broken_check:
                    raise RuntimeError("plugin bug")
                return []

            @classmethod
            def check_bank(cls, bank):
                return []

        Provider.name = name
        self.provider = Provider
        self.__name__ = f"throwaway_{name}"

    @hookimpl
    def connector_register_providers(self, register):
        register(self.provider)


def test_two_providers_with_the_same_name_is_a_start_up_error() -> None:
    plugins = Plugins().load(extra=(_Named("demobank"),))
    with pytest.raises(PluginError, match="provider 'demobank' is registered twice: by built-in: plugins.demobank "
                                          "and by test: throwaway_demobank"):
        plugins.providers()


def test_a_crashing_plugin_check_is_a_problem_not_a_crash() -> None:
    plugins = Plugins().load(extra=(_Named("flaky", broken_check=True),))
    settings = settings_of(config(providers__flaky={"enabled": True}))
    [problem] = check_settings(settings, plugins)
    assert problem.key == "providers.flaky"
    assert "RuntimeError: plugin bug" in problem.message


# --- The command line, as subprocesses -------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None, pythonpath: tuple[Path, ...] = (),
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m connector.cli ...`` with only the environment given (plus what Python needs to start)."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
            "PYTHONPATH": os.pathsep.join([*(str(p) for p in pythonpath), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "connector.cli", *args], check=False, env={**base, **(env or {})},
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=60)


def write_config(tmp_path: Path, cfg: dict[str, Any] | str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else to_toml(cfg))
    return path


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


def test_check_config_passes_a_valid_file(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(write_config(tmp_path, BASE)), env=ENV)
    assert result.returncode == 0, result.stderr
    assert "no problems found" in result.stdout


def test_check_config_prints_every_problem_with_its_key(tmp_path: Path) -> None:
    cfg = config(
        server__port=70000,
        server__public_url="http://connector.example.com",
        security__encryption_keys=["${KEY_A}", "short", "${KEY_A}"],
        sage__notification_header={"name": "X-Connector-Key", "value": "too-short"},
        sage__environment="staging",
        sage__client_secret="${MISSING_SECRET}",
        feed={"enabled": "yes"},
        providers__demobank={"enabled": True, "colour": "blue"},
        banks=[{"sage_bank_id": DEMO_BANK_ID, "name": "A", "provider": "nosuchbank"},
               {"sage_bank_id": DEMO_BANK_ID, "name": "B", "provider": "demobank", "colour": "red"}],
    )
    cfg["extras"] = {"x": 1}
    result = run_cli("check-config", "--config", str(write_config(tmp_path, cfg)), env=ENV)
    assert result.returncode == 1
    assert_clean(result)
    expected = {
        "server.port": "at most 65535",
        "server.public_url": "https",
        "security.encryption_keys[1]": "not valid base64",
        "security.encryption_keys[2]": "repeats security.encryption_keys[0]",
        "sage.notification_header.value": "at least 32 characters",
        "sage.environment": "must be one of",
        "sage.client_secret": "environment variable MISSING_SECRET is not set",
        "feed.enabled": "true or false",
        "extras": "unknown section",
        "providers.demobank.colour": "unknown key",
        "banks[0].provider": "'nosuchbank' is not loaded",
        "banks[1].sage_bank_id": "banks[0]",
        "banks[1].colour": "unknown key",
    }
    lines = [line.strip() for line in result.stderr.splitlines()]
    assert lines[0] == f"{len(lines) - 1} problems in the configuration:"
    for key, words in expected.items():
        assert any(line.startswith(f"{key}: ") and words in line for line in lines), (key, result.stderr)
    assert len(lines) - 1 == len(expected), result.stderr
    assert "too-short" not in result.stderr  # the header value is a secret; only its key is named


def test_check_config_reports_a_toml_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[server]\npublic_url = https://x.example.com\n")
    result = run_cli("check-config", "--config", str(path), env=ENV)
    assert result.returncode == 1
    assert_clean(result)
    assert f"{path}: not valid TOML" in result.stderr and "line 2" in result.stderr


def test_check_config_on_a_missing_file(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "absent.toml"), env=ENV)
    assert result.returncode == 1
    assert_clean(result)
    assert "config file not found" in result.stderr


def test_check_config_defaults_to_config_toml_in_the_working_directory(tmp_path: Path) -> None:
    write_config(tmp_path, BASE)
    result = run_cli("check-config", env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def serve_script_env(tmp_path: Path) -> dict[str, str]:
    """The development variables ``scripts/serve`` writes to data/dev.env, made by its own generator."""
    script = (REPO / "scripts" / "serve").read_text()
    generator = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.DOTALL)
    assert generator, "scripts/serve no longer generates data/dev.env with an inline Python program"
    out = subprocess.run([sys.executable, "-c", generator.group(1)], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if line.strip())
    assert {"CONNECTOR_KEY", "SAGE_NOTIFICATION_KEY"} <= set(env)
    return env


def test_the_repository_config_passes_with_the_serve_script_variables(tmp_path: Path) -> None:
    env = serve_script_env(tmp_path)
    result = run_cli("check-config", "--config", str(REPO / "config.toml"), env=env)
    assert result.returncode == 0, result.stderr
    # ...and without them, each variable is named with its key.
    result = run_cli("check-config", "--config", str(REPO / "config.toml"))
    assert result.returncode == 1
    for name in env:
        assert f"environment variable {name} is not set" in result.stderr


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def provider_blocks(stdout: str) -> dict[str, list[str]]:
    """``connector providers`` output: the lines under each provider's first line, by provider name."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in stdout.splitlines():
        if line and not line.startswith(" "):
            current = blocks.setdefault(line.split()[0], [line])
        elif line.strip():
            current.append(line.strip())
    return blocks


def test_providers_lists_built_ins_with_origin_and_banks(tmp_path: Path) -> None:
    cfg = config(banks=[*BASE["banks"], {"name": "Unregistered Demo", "provider": "demobank"}])
    result = run_cli("providers", "--config", str(write_config(tmp_path, cfg)), env=ENV)
    assert result.returncode == 0, result.stderr
    assert_clean(result)
    blocks = provider_blocks(result.stdout)
    expected = {"demobank"} | {name for name in ("connectpay", "powens") if importable(f"plugins.{name}")}
    assert set(blocks) == expected
    demo = blocks["demobank"]
    assert "enabled" in demo[0] and "Demo Bank" in demo[0]
    assert "from: built-in: plugins.demobank" in demo
    assert f"bank: Demo Bank (sage_bank_id {DEMO_BANK_ID})" in demo
    assert "bank: Unregistered Demo (sage_bank_id not registered yet)" in demo
    assert "callback: https://connector.example.com/providers/demobank/callback" in demo
    for name in expected - {"demobank"}:
        assert f"from: built-in: plugins.{name}" in blocks[name]
        assert "not enabled" in blocks[name][0]
        assert not any(line.startswith("bank:") for line in blocks[name])


def test_providers_without_a_config_file_still_lists_plugins(tmp_path: Path) -> None:
    result = run_cli("providers", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 0, result.stderr
    assert "from: built-in: plugins.demobank" in result.stdout
    assert "config file not found" in result.stderr


def test_disabling_a_built_in_plugin(tmp_path: Path) -> None:
    result = run_cli("providers", "--config", str(write_config(tmp_path, BASE)),
                     env={**ENV, "CONNECTOR_DISABLE_PLUGINS": "demobank"})
    assert result.returncode == 0
    assert "demobank" not in provider_blocks(result.stdout)
    assert "banks[0].provider" in result.stderr  # the Demo Bank mapping now points at nothing


# --- A third-party provider, installed as a distribution with an entry point ----------------------------------------

THIRD_PARTY_MODULE = '''
from connector.hookspecs import hookimpl


class AcmeBank:
    name = {name!r}
    title = "Acme Bank"
    template_dir = None

    @classmethod
    def check_config(cls, config):
        for key in config:
            if key != "api_url":
                yield key, "unknown key (Acme Bank takes only api_url)"

    @classmethod
    def check_bank(cls, bank):
        if not bank.provider_bank:
            yield "provider_bank", "Acme Bank needs its branch code here"


@hookimpl
def connector_register_providers(register):
    register(AcmeBank)
'''


def install_distribution(root: Path, *, dist: str = "acme-bank-connector", module: str = "acme_bank_connector",
                         ep_name: str = "acme", provider_name: str = "acme", source: str | None = None) -> Path:
    """A tiny installed distribution: its module and a ``*.dist-info`` declaring a ``connector.providers`` entry."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source if source is not None
                                       else THIRD_PARTY_MODULE.format(name=provider_name))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[connector.providers]\n{ep_name} = {module}\n")
    (info / "RECORD").write_text("")
    return root


ACME = {"sage_bank_id": OTHER_BANK_ID, "name": "Acme Business", "provider": "acme", "provider_bank": "ACME-01"}


def test_third_party_provider_found_through_its_entry_point(tmp_path: Path) -> None:
    site = install_distribution(tmp_path / "site")
    cfg = config(providers__acme={"enabled": True, "api_url": "https://api.acme.example"},
                 banks=[*BASE["banks"], ACME])
    path = write_config(tmp_path, cfg)
    result = run_cli("providers", "--config", str(path), env=ENV, pythonpath=(site,))
    assert result.returncode == 0, result.stderr
    assert_clean(result)
    blocks = provider_blocks(result.stdout)
    assert "from: built-in: plugins.demobank" in blocks["demobank"]
    acme = blocks["acme"]
    assert "Acme Bank" in acme[0] and "enabled" in acme[0]
    assert "from: entry point: acme = acme_bank_connector (acme-bank-connector)" in acme
    assert f"bank: Acme Business (sage_bank_id {OTHER_BANK_ID})" in acme
    assert result.stderr == ""

    # The same file passes check-config with the plugin installed, and its own checks run.
    assert run_cli("check-config", "--config", str(path), env=ENV, pythonpath=(site,)).returncode == 0
    bad = config(providers__acme={"enabled": True, "colour": "x"},
                 banks=[*BASE["banks"], {**ACME, "provider_bank": ""}])
    result = run_cli("check-config", "--config", str(write_config(tmp_path, bad, "bad.toml")), env=ENV,
                     pythonpath=(site,))
    assert result.returncode == 1
    assert "providers.acme.colour: unknown key (Acme Bank takes only api_url)" in result.stderr
    assert "banks[1].provider_bank: Acme Bank needs its branch code here" in result.stderr

    # Without the distribution, the mapping is a problem naming the key.
    result = run_cli("check-config", "--config", str(path), env=ENV)
    assert result.returncode == 1
    assert "providers.acme: no provider plugin named 'acme' is loaded" in result.stderr
    assert "banks[1].provider: provider 'acme' is not loaded" in result.stderr


def test_two_providers_with_one_name_stop_the_commands_with_a_clear_error(tmp_path: Path) -> None:
    site = install_distribution(tmp_path / "site", dist="evil-demo", module="evil_demo", ep_name="evil",
                                provider_name="demobank")
    path = write_config(tmp_path, config(server__port=0))
    for command in ("providers", "check-config"):
        result = run_cli(command, "--config", str(path), env=ENV, pythonpath=(site,))
        assert result.returncode == 1, command
        assert_clean(result)
        assert ("provider 'demobank' is registered twice: by built-in: plugins.demobank and by entry point: "
                "evil = evil_demo (evil-demo)") in result.stderr
    assert "server.port: must be at least 1" in result.stderr  # check-config still shows the file's own problems


def test_a_plugin_that_fails_to_import_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    site = install_distribution(tmp_path / "site", dist="broken-bank", module="broken_bank", ep_name="broken",
                                source="import not_a_real_dependency_xyz\n")
    path = write_config(tmp_path, config(server__port="http", sage__region="mars"))
    result = run_cli("check-config", "--config", str(path), env=ENV, pythonpath=(site,))
    assert result.returncode == 1
    assert_clean(result)
    lines = [line.strip() for line in result.stderr.splitlines()]
    assert lines[0] == "3 problems in the configuration:"
    assert any(line.startswith("plugins: entry point 'broken' (broken_bank) failed to load")
               and "not_a_real_dependency_xyz" in line for line in lines)
    assert any(line.startswith("server.port: ") for line in lines)
    assert any(line.startswith("sage.region: ") for line in lines)

    result = run_cli("providers", "--config", str(path), env=ENV, pythonpath=(site,))
    assert result.returncode == 1
    assert_clean(result)
    assert "entry point 'broken' (broken_bank) failed to load" in result.stderr


def test_serve_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(write_config(tmp_path, config(server__port=0))), env=ENV)
    assert result.returncode == 1
    assert_clean(result)
    assert "server.port: must be at least 1" in result.stderr


def test_a_built_in_plugin_that_crashes_on_import_is_reported_cleanly(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    (shadow / "plugins" / "demobank").mkdir(parents=True)
    (shadow / "plugins" / "__init__.py").write_text("")
    (shadow / "plugins" / "demobank" / "__init__.py").write_text("raise RuntimeError('demo bank is broken')\n")
    path = write_config(tmp_path, BASE)
    result = run_cli("check-config", "--config", str(path), env=ENV, pythonpath=(shadow,))
    assert result.returncode == 1
    assert_clean(result)
    assert "plugins: provider plugins could not be loaded: RuntimeError: demo bank is broken" in result.stderr
    result = run_cli("providers", "--config", str(path), env=ENV, pythonpath=(shadow,))
    assert result.returncode == 1
    assert_clean(result)
    assert "RuntimeError: demo bank is broken" in result.stderr


def test_a_hook_implementation_with_a_wrong_signature_is_reported_cleanly(tmp_path: Path) -> None:
    source = ("from connector.hookspecs import hookimpl\n\n"
              "@hookimpl\ndef connector_register_providers(register, settings):\n    pass\n")
    site = install_distribution(tmp_path / "site", dist="odd-bank", module="odd_bank", ep_name="odd", source=source)
    result = run_cli("check-config", "--config", str(write_config(tmp_path, BASE)), env=ENV, pythonpath=(site,))
    assert result.returncode == 1
    assert_clean(result)
    assert "plugins: provider plugins could not be loaded: PluginValidationError" in result.stderr
    assert "odd_bank" in result.stderr
