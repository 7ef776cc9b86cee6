"""Reading ``config.toml``: TOML, ``${ENV}`` interpolation, presets, and every problem reported with its key."""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connector.config.schema import BANKS, PROVIDER, SAGE_PRESETS, SECTIONS, Key, Section
from connector.hookspecs import BankInfo

if TYPE_CHECKING:
    from connector.plugins import Plugins

__all__ = ["ConfigError", "Problem", "Settings", "check_settings", "collect_problems", "load_settings",
           "parse_settings", "read_config"]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Bank:
    sage_bank_id: str
    name: str
    provider: str
    provider_bank: str
    country_code: str
    url: str
    options: Mapping[str, Any]

    def info(self) -> BankInfo:
        return BankInfo(self.sage_bank_id, self.name, self.provider_bank, self.options)


@dataclass(frozen=True, slots=True)
class Settings:
    """The checked configuration. Sections are plain dicts of resolved values, keyed as in the schema."""

    server: Mapping[str, Any]
    database: Mapping[str, Any]
    security: Mapping[str, Any]
    sage: Mapping[str, Any]
    feed: Mapping[str, Any]
    logging: Mapping[str, Any]
    providers: Mapping[str, Mapping[str, Any]]
    banks: tuple[Bank, ...]
    path: Path | None = None
    encryption_keys: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def public_url(self) -> str:
        return str(self.server["public_url"]).rstrip("/")

    def bank(self, sage_bank_id: str) -> Bank | None:
        return next((b for b in self.banks if b.sage_bank_id and b.sage_bank_id == sage_bank_id), None)

    def enabled_providers(self) -> dict[str, Mapping[str, Any]]:
        return {name: table for name, table in self.providers.items() if table.get("enabled", True)}


def _interpolate(value: Any, key: str, env: Mapping[str, str], problems: list[Problem]) -> Any:
    if isinstance(value, str):
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                problems.append(Problem(key, f"environment variable {name} is not set"))
                return ""
            return env[name]

        return _ENV.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, f"{key}[{i}]", env, problems) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{key}.{k}", env, problems) for k, v in value.items()}
    return value


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list[str]": (list,),
    "table": (dict,),
}

_TYPE_NAMES = {
    "str": "a string",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "table": "a table",
}

_TOML_TYPE_NAMES = {
    "str": "a string",
    "int": "a whole number",
    "float": "a decimal number",
    "bool": "a boolean",
    "list": "an array",
    "dict": "a table",
}


def _check_key(spec: Key, value: Any, key: str, problems: list[Problem]) -> Any:
    expected = _TYPES[spec.kind]
    if not isinstance(value, expected) or (spec.kind in ("int", "float") and isinstance(value, bool)):
        got = _TOML_TYPE_NAMES.get(type(value).__name__, type(value).__name__)
        problems.append(Problem(key, f"must be {_TYPE_NAMES[spec.kind]}, got {got}"))
        return spec.default
    if spec.kind == "list[str]" and not all(isinstance(v, str) for v in value):
        problems.append(Problem(key, "must be a list of strings"))
        return spec.default
    if spec.kind == "float" and not math.isfinite(value):
        problems.append(Problem(key, "must be a finite number"))
        return spec.default
    if spec.choices and value not in spec.choices:
        problems.append(Problem(key, f"must be one of {', '.join(spec.choices)}; got {value!r}"))
        return spec.default
    if spec.minimum is not None and value < spec.minimum:
        problems.append(Problem(key, f"must be at least {spec.minimum:g}"))
    if spec.maximum is not None and value > spec.maximum:
        problems.append(Problem(key, f"must be at most {spec.maximum:g}"))
    if spec.check and not (spec.kind == "str" and value == "" and not spec.required):
        found = spec.check(value)
        if isinstance(found, tuple):
            problems.append(Problem(f"{key}.{found[0]}", found[1]))
        elif found:
            problems.append(Problem(key, found))
    if spec.required and spec.kind == "str" and not value:
        problems.append(Problem(key, "is required and must not be empty"))
    return value


def _section(section: Section, raw: Any, prefix: str, problems: list[Problem]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        problems.append(Problem(prefix, "must be a table"))
        raw = {}
    out: dict[str, Any] = {}
    for name, value in raw.items():
        spec = section.key(name)
        if spec is None:
            if section.open_keys:
                out[name] = value
                continue
            problems.append(Problem(f"{prefix}.{name}", "unknown key"))
            continue
        out[name] = _check_key(spec, value, f"{prefix}.{name}", problems)
    for spec in section.keys:
        if spec.name not in out:
            if spec.required:
                problems.append(Problem(f"{prefix}.{spec.name}", "is required"))
            out[spec.name] = spec.default
    return out


def _decode_keys(values: list[str] | None, problems: list[Problem]) -> tuple[bytes, ...]:
    if values is None:  # missing or of the wrong type: already reported by the schema check
        return ()
    keys: list[bytes] = []
    for i, text in enumerate(values):
        key = f"security.encryption_keys[{i}]"
        try:
            raw = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            problems.append(Problem(key, "is not valid base64"))
            continue
        if len(raw) != 32:
            problems.append(Problem(key, f"must decode to 32 bytes (AES-256), got {len(raw)}"))
            continue
        if raw in keys:
            problems.append(Problem(key, f"repeats security.encryption_keys[{keys.index(raw)}]; every key must be "
                                         "distinct"))
            continue
        keys.append(raw)
    if not values:
        problems.append(Problem("security.encryption_keys", "needs at least one key"))
    return tuple(keys)


def _resolve_sage(sage: dict[str, Any]) -> None:
    preset = SAGE_PRESETS[sage["environment"]]
    for name in ("issuer", "audience", "jwks_url", "token_url", "token_audience"):
        if not sage[name]:
            sage[name] = preset[name]
    if not sage["provider_api_url"]:
        sage["provider_api_url"] = preset[f"provider_api_url.{sage['region']}"]
    sage["provider_api_url"] = sage["provider_api_url"].rstrip("/")


def parse_settings(
    raw: Mapping[str, Any], env: Mapping[str, str] | None = None, path: Path | None = None
) -> tuple[Settings, list[Problem]]:
    """Check ``raw`` (parsed TOML) against the schema; return settings and every problem found."""
    problems: list[Problem] = []
    data = _interpolate(dict(raw), "", os.environ if env is None else env, problems)
    problems = [Problem(p.key.lstrip("."), p.message) for p in problems]
    unset = list(problems)  # a variable that is not set is reported once, not again as an empty or invalid value
    known = {s.name for s in SECTIONS} | {"providers"}
    for name in data:
        if name not in known:
            problems.append(Problem(name, "unknown section"))
    sections = {s.name: _section(s, data.get(s.name, {}), s.name, problems) for s in SECTIONS if not s.array}
    _resolve_sage(sections["sage"])
    providers: dict[str, dict[str, Any]] = {}
    raw_providers = data.get("providers", {})
    if not isinstance(raw_providers, dict):
        problems.append(Problem("providers", "must be a table of provider tables"))
        raw_providers = {}
    for name, table in raw_providers.items():
        providers[name] = _section(PROVIDER, table, f"providers.{name}", problems)
    banks: list[Bank] = []
    raw_banks = data.get("banks", [])
    if not isinstance(raw_banks, list):
        problems.append(Problem("banks", "must be an array of tables ([[banks]])"))
        raw_banks = []
    seen_ids: dict[str, int] = {}
    for i, table in enumerate(raw_banks):
        entry = _section(BANKS, table, f"banks[{i}]", problems)
        bank_id = entry["sage_bank_id"]
        if isinstance(bank_id, str) and bank_id:
            if bank_id.lower() in seen_ids:
                problems.append(Problem(f"banks[{i}].sage_bank_id",
                                        f"is also the sage_bank_id of banks[{seen_ids[bank_id.lower()]}]"))
            else:
                seen_ids[bank_id.lower()] = i
        banks.append(Bank(**{k: entry[k] for k in (
            "sage_bank_id", "name", "provider", "provider_bank", "country_code", "url", "options")}))
    keys = _decode_keys(sections["security"]["encryption_keys"], problems)
    settings = Settings(
        server=sections["server"],
        database=sections["database"],
        security=sections["security"],
        sage=sections["sage"],
        feed=sections["feed"],
        logging=sections["logging"],
        providers=providers,
        banks=tuple(banks),
        path=path,
        encryption_keys=keys,
    )
    return settings, _without_echoes(problems, unset)


def _without_echoes(problems: list[Problem], unset: list[Problem]) -> list[Problem]:
    """Drop problems that only repeat an unset variable (an empty value failing its checks) at or above its key."""
    missing = {p.key for p in unset}

    def echoes(problem: Problem) -> bool:
        return any(m == problem.key or m.startswith((problem.key + ".", problem.key + "[")) for m in missing)

    return [p for p in problems if p in unset or not echoes(p)]


def check_settings(settings: Settings, plugins: Plugins) -> list[Problem]:
    """Problems that need the loaded plugins: providers unknown or disabled, and each provider's own checks."""
    problems: list[Problem] = []
    available = plugins.providers()
    enabled = settings.enabled_providers()
    for name, table in settings.providers.items():
        if name not in available:
            loaded = ", ".join(sorted(available)) or "none"
            problems.append(Problem(f"providers.{name}",
                                    f"no provider plugin named {name!r} is loaded (loaded: {loaded})"))
        elif name in enabled:
            options = {k: v for k, v in table.items() if k != "enabled"}
            problems += _plugin_problems(f"providers.{name}", available[name].origin,
                                         available[name].cls.check_config, options)
    for i, bank in enumerate(settings.banks):
        if bank.provider not in available:
            loaded = ", ".join(sorted(available)) or "none"
            problems.append(Problem(f"banks[{i}].provider",
                                    f"provider {bank.provider!r} is not loaded (loaded: {loaded})"))
            continue
        if bank.provider not in enabled:
            problems.append(Problem(f"banks[{i}].provider",
                                    f"provider {bank.provider!r} has no enabled [providers.{bank.provider}] table"))
            continue
        entry = available[bank.provider]
        problems += _plugin_problems(f"banks[{i}]", entry.origin, entry.cls.check_bank, bank.info())
    return problems


def _plugin_problems(prefix: str, origin: str, check: Callable[[Any], Iterable[tuple[str, str]]],
                     argument: Any) -> list[Problem]:
    """A plugin's own ``(key, message)`` pairs under ``prefix``; a plugin that crashes is a problem, not a crash."""
    try:
        return [Problem(f"{prefix}.{key}" if key else prefix, str(message)) for key, message in check(argument)]
    except Exception as exc:  # noqa: BLE001 - any bug in a plugin's check is reported, with the plugin named
        return [Problem(prefix, f"the provider's own check failed ({origin}): {type(exc).__name__}: {exc}")]


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed TOML of ``path``, or :class:`ConfigError` (file missing or unreadable, TOML syntax error)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(str(file), "config file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(str(file), f"config file cannot be read: {exc}")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(file), f"not valid TOML: {exc}")]) from None


def collect_problems(path: str | os.PathLike[str], env: Mapping[str, str] | None = None,
                     load_plugins: Any = None) -> tuple[Settings | None, list[Problem]]:
    """Every problem of the file at ``path``, for ``check-config``.

    ``load_plugins`` (a callable returning :class:`~connector.plugins.Plugins`) is called even when the file has
    problems; a plugin that fails to load is reported under the key ``plugins`` next to the file's own problems,
    and only the checks that need plugins are skipped.
    """
    try:
        raw = read_config(path)
    except ConfigError as err:
        return None, list(err.problems)
    settings, problems = parse_settings(raw, env, Path(path))
    if load_plugins is not None:
        try:
            problems += check_settings(settings, load_plugins())
        except Exception as exc:  # PluginError, a plugin's import error, a pluggy validation error
            from connector.plugins import load_failure

            problems.append(Problem("plugins", load_failure(exc)))
    return settings, problems


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None,
                  plugins: Plugins | None = None) -> Settings:
    """Read, check and return the settings, or raise :class:`ConfigError` listing every problem."""
    file = Path(path)
    raw = read_config(file)
    settings, problems = parse_settings(raw, env, file)
    if plugins is not None:
        problems += check_settings(settings, plugins)
    if problems:
        raise ConfigError(problems)
    return settings
