"""The config schema: every key the admin may write, its type, default and meaning.

The schema is data, so ``check-config``, the typed settings and the documentation's config reference all come from
this one place. Unknown keys are errors: a typo must never silently disable a check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: A value check: ``None`` when valid, a message, or ``(sub_key, message)`` for a problem inside a table value.
Check = Callable[[Any], "str | tuple[str, str] | None"]


@dataclass(frozen=True, slots=True)
class Key:
    """One config key. ``kind`` is ``str``, ``int``, ``bool``, ``list[str]``, ``table`` or ``float``."""

    name: str
    kind: str
    doc: str
    default: Any = None
    required: bool = False
    secret: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    check: Check | None = None


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    doc: str
    keys: tuple[Key, ...]
    array: bool = False  # [[banks]]
    open_keys: bool = False  # provider tables: checked by their plugin
    children: tuple[Section, ...] = field(default_factory=tuple)

    def key(self, name: str) -> Key | None:
        return next((k for k in self.keys if k.name == name), None)


def is_loopback(host: str | None) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    import ipaddress

    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(value: Any) -> str | None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        hostname, _ = parts.hostname, parts.port  # .port raises on a port that is not a number or out of range
    except ValueError:
        return "must be an absolute http(s) URL"
    if parts.scheme not in ("http", "https") or not hostname:
        return "must be an absolute http(s) URL"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user name or password"
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        return "must not carry a query or fragment"
    if parts.scheme == "http" and not is_loopback(hostname):
        return "must use https (plain http is allowed only for loopback hosts)"
    return None


def _header_table(value: Any) -> str | tuple[str, str] | None:
    if not isinstance(value, Mapping) or set(value) != {"name", "value"}:
        return 'must be a table with exactly "name" and "value"'
    name, secret = value["name"], value["value"]
    if not isinstance(name, str) or not name.isascii() or not name.replace("-", "").isalnum():
        return "name", "must be an HTTP header name (letters, digits and dashes)"
    if not isinstance(secret, str) or len(secret) < 32:
        return "value", "must be at least 32 characters (use 32 random bytes, base64url)"
    return None


DATABASE_SCHEMES = ("sqlite", "postgres", "postgresql", "asyncpg", "psycopg", "mysql")


def _database_url(value: Any) -> str | None:
    scheme, sep, rest = str(value).partition("://")
    if not sep or scheme not in DATABASE_SCHEMES or not rest:
        return f"must be a database URL such as sqlite://data/connector.sqlite3 or postgres://user@host/db " \
               f"(schemes: {', '.join(DATABASE_SCHEMES)})"
    return None


def _country(value: Any) -> str | None:
    if not (isinstance(value, str) and len(value) == 2 and value.isascii() and value.isalpha() and value.isupper()):
        return "must be an ISO 3166 alpha-2 country code in capitals, such as GB"
    return None


SERVER = Section(
    "server",
    "How the connector is reached and served.",
    (
        Key("public_url", "str", "How browsers and Sage reach us; every callback URL is built from it.",
            default="http://127.0.0.1:8080", check=_url),
        Key("host", "str", "Address to listen on.", default="127.0.0.1"),
        Key("port", "int", "Port to listen on.", default=8080, minimum=1, maximum=65535),
        Key("workers", "int", "Worker processes for `connector serve`.", default=1, minimum=1, maximum=64),
        Key("proxies_count", "int",
            "Number of trusted reverse proxies in front of us; forwarded client IPs are honoured only when > 0.",
            default=0, minimum=0, maximum=10),
        Key("real_ip_header", "str",
            "Header set by the trusted proxy with the client IP (e.g. X-Real-IP), used instead of X-Forwarded-For.",
            default=""),
    ),
)

DATABASE = Section(
    "database",
    "Where sessions, consents, accounts and notifications are stored.",
    (
        Key("url", "str", "Tortoise database URL: sqlite://path (the default) or postgres://user@host/db.",
            default="sqlite://data/connector.sqlite3", check=_database_url),
    ),
)

SECURITY = Section(
    "security",
    "Encryption at rest, redirects back to Sage and framing.",
    (
        Key("encryption_keys", "list[str]",
            "AES-256-GCM keys, base64 of 32 bytes each. The first encrypts; all decrypt (rotation).",
            required=True, secret=True),
        Key("redirect_hosts", "list[str]", "Allowed redirect_uri hosts (glob on the host).",
            default=["*.sagebankdrive.com", "money.sage.com", "*.sage.com"]),
        Key("allow_loopback_redirects", "bool",
            "Also accept http redirect_uri on loopback hosts (tests and `connector demo` only).", default=False),
        Key("frame_ancestors", "list[str]", "Origins allowed to frame our pages (CSP frame-ancestors).",
            default=["https://*.sagebankdrive.com", "https://*.sage.com", "https://*.intacct.com",
                     "https://*.sageone.com"]),
        Key("authorisation_ttl_seconds", "int",
            "Lifetime of an authorisation id, from its notification; also a journey's absolute lifetime.",
            default=1200, minimum=60, maximum=86400),
        Key("journey_idle_seconds", "int", "A journey left idle this long expires.", default=900,
            minimum=60, maximum=86400),
        Key("max_failed_lookups", "int",
            "Unknown authorisation ids or journey handles one client IP may try per minute before getting 429.",
            default=30, minimum=1, maximum=100000),
    ),
)


def _pos_uuid(value: Any) -> str | None:
    import uuid

    try:
        uuid.UUID(str(value))
    except ValueError:
        return "must be a UUID"
    return None


SAGE = Section(
    "sage",
    "The Sage Banking Service: Sage ID token checks and the Provider API.",
    (
        Key("environment", "str", "Preset for every Sage URL below.", default="sandbox",
            choices=("sandbox", "production")),
        Key("region", "str", "Provider API region preset.", default="eu", choices=("eu", "us")),
        Key("issuer", "str", "Expected `iss` of Sage ID tokens (overrides the preset).", default="", check=_url),
        Key("audience", "str", "Expected `aud` of Sage ID tokens sent to us (overrides the preset).", default=""),
        Key("jwks_url", "str", "Sage ID key set (overrides the preset).", default="", check=_url),
        Key("token_url", "str", "Sage ID token endpoint for our client-credentials token (overrides the preset).",
            default="", check=_url),
        Key("token_audience", "str", "Audience we request for our own token (overrides the preset).", default=""),
        Key("provider_api_url", "str", "Provider API base, without /v1 (overrides the preset).", default="",
            check=_url),
        Key("client_id", "str", "Our Sage ID client id.", required=True, secret=True),
        Key("client_secret", "str", "Our Sage ID client secret.", required=True, secret=True),
        Key("api_key", "str", "The x-api-key Sage issued to us.", required=True, secret=True),
        Key("notification_header", "table",
            "The custom header Sage adds to every notification: { name, value }.", required=True, secret=True,
            check=_header_table),
        Key("allowed_token_clients", "list[str]",
            "If set, `azp` (else `sub`) of Sage ID tokens must be one of these.", default=[]),
        Key("clock_leeway_seconds", "int", "Leeway on exp/nbf/iat.", default=30, minimum=0, maximum=300),
        Key("requests_per_second", "float", "Provider API rate limit, shared by every call.", default=10,
            minimum=0.1, maximum=1000),
        Key("statement_batch_size", "int", "Transactions per statement.", default=100, minimum=1, maximum=1000),
        Key("statement_timeout_seconds", "int", "How long a statement may stay processing before it is flagged.",
            default=900, minimum=10, maximum=86400),
        Key("aggregator_id", "str", "Our externalRef for `banks sync` (a UUID generated once).", default="",
            check=_pos_uuid),
    ),
)

FEED = Section(
    "feed",
    "The statement feed.",
    (
        Key("enabled", "bool", "Run the feed inside `connector serve`.", default=True),
        Key("interval_seconds", "int", "Time between two feed runs.", default=300, minimum=1, maximum=86400),
        Key("parallel_accounts", "int", "Accounts fed at once.", default=8, minimum=1, maximum=256),
        Key("lease_seconds", "int",
            "Lifetime of the feed lease (one process feeds at a time); its holder renews it every third of this. "
            "If the holder dies, another instance takes over within this time.",
            default=60, minimum=2, maximum=3600),
    ),
)

LOGGING = Section(
    "logging",
    "Log output.",
    (
        Key("level", "str", "Log level.", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
        Key("format", "str", "json lines or text.", default="json", choices=("json", "text")),
    ),
)

PROVIDER = Section(
    "providers.*",
    "One table per provider plugin; `enabled` here, every other key is checked by the plugin.",
    (Key("enabled", "bool", "Load this provider.", default=True),),
    open_keys=True,
)

BANKS = Section(
    "banks",
    "Each Sage bank, mapped to a provider and the provider's own bank id.",
    (
        Key("sage_bank_id", "str", "Sage's bank id (principalId); empty until `banks sync` registers the bank.",
            default="", check=_pos_uuid),
        Key("name", "str", "The bank's name as shown to people.", required=True),
        Key("provider", "str", "Name of the provider plugin serving this bank.", required=True),
        Key("provider_bank", "str", "The provider's own id for this bank.", default=""),
        Key("country_code", "str", "Country sent to Sage by `banks sync` (ISO 3166 alpha-2).", default="GB",
            check=_country),
        Key("url", "str", "The bank's public website, sent to Sage by `banks sync`.", default="https://example.com",
            check=_url),
        Key("options", "table", "Provider-specific options for this bank, checked by the provider.", default={}),
    ),
    array=True,
)

SECTIONS: tuple[Section, ...] = (SERVER, DATABASE, SECURITY, SAGE, FEED, LOGGING, BANKS)

SAGE_PRESETS: dict[str, dict[str, str]] = {
    "sandbox": {
        "issuer": "https://id-shadow.sage.com/",
        "audience": "sfdsbanking/sfdsBankingProvider-Pre",
        "jwks_url": "https://id-shadow.sage.com/.well-known/jwks.json",
        "token_url": "https://id-shadow.sage.com/oauth/token",
        "token_audience": "sfdsbanking/sfdsBankingProvider-Pre",
        "provider_api_url.eu": "https://papi-snd01-eu-west-1.sagebanking-sandbox.cloud",
        "provider_api_url.us": "https://papi-snd01-us-east-1.sagebanking-sandbox.cloud",
    },
    "production": {
        "issuer": "https://id.sage.com/",
        "audience": "sfdsbanking/sfdsBankingProvider",
        "jwks_url": "https://id.sage.com/.well-known/jwks.json",
        "token_url": "https://id.sage.com/oauth/token",
        "token_audience": "sfdsbanking/sfdsBankingProvider",
        "provider_api_url.eu": "https://eu-banking.fabric.sage.com/provider",
        "provider_api_url.us": "https://us-banking.fabric.sage.com/provider",
    },
}
