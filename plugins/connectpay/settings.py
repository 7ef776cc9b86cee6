"""The ``[providers.connectpay]`` table: defaults, presets per environment, and every check (connectpay.md §10).

Unknown keys are problems (product rule: a typo must not silently disable a check). :func:`parse` returns typed
settings plus ``(key, problem)`` pairs with keys relative to the table (``"psd2.page_size"``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger("plugins.connectpay.settings")

PRESETS: dict[str, dict[str, str]] = {
    "stage": {"mtls_base_url": "https://api-stage.connectpay.com", "tls_base_url": "https://api2-stage.connectpay.com"},
    "production": {"mtls_base_url": "https://api.connectpay.com", "tls_base_url": "https://api2.connectpay.com"},
}
MODES = ("psd2", "baas")
BANK_MODES = ("psd2", "baas", "any")
AUTHORIZE_PATH = "/auth/v1/oauth2/authorize"
CERT_WARNING_DAYS = 30

Problems = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class _Key:
    kind: type | tuple[type, ...]
    default: Any
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    placeholders: frozenset[str] | None = None  # for path templates: the only {names} allowed


TOP: dict[str, _Key] = {
    "environment": _Key(str, "stage", choices=("stage", "production")),
    "modes": _Key(list, None),
    "client_id": _Key(str, ""),
    "client_secret": _Key(str, ""),
    "mtls_base_url": _Key(str, ""),
    "tls_base_url": _Key(str, ""),
    "mtls_cert_file": _Key(str, ""),
    "mtls_key_file": _Key(str, ""),
    "mtls_key_password": _Key(str, ""),
    "ca_file": _Key(str, ""),
    "requests_per_second": _Key((int, float), 5, minimum=0.01),
    "max_concurrency": _Key(int, 4, minimum=1),
    "timeout_seconds": _Key((int, float), 30, minimum=0.01),
}
PSD2: dict[str, _Key] = {
    "authorize_url": _Key(str, ""),
    "flow_id_param": _Key(str, "flowId", choices=("flowId", "flowid")),
    "scope": _Key(str, "psd2-ais"),
    "token_path": _Key(str, "/auth/v1/oauth2/token", placeholders=frozenset()),
    "revoke_path": _Key(str, "/auth/v1/oauth2/revoke", placeholders=frozenset()),
    "accounts_path": _Key(str, "/ob/accounts", placeholders=frozenset()),
    "balances_path": _Key(str, "", placeholders=frozenset({"accountId"})),
    "transactions_path": _Key(str, "/ob/accounts/{accountId}/transactions", placeholders=frozenset({"accountId"})),
    "page_size": _Key(int, 500, minimum=1),
    "overlap_days": _Key(int, 3, minimum=0),
    "feed_interval_seconds": _Key(int, 21600, minimum=1),
    "max_unattended_reads_per_day": _Key(int, 4, minimum=0),
}
BAAS: dict[str, _Key] = {
    "client_key": _Key(str, ""),
    "client_secret": _Key(str, ""),
    "api_key_prefix": _Key(str, "", choices=("", "Basic ")),
    "ip_header": _Key(str, "PSU-IP-Address"),
    "password_public_key_file": _Key(str, ""),
    "password_padding": _Key(str, "pkcs1v15", choices=("pkcs1v15", "oaep-sha1", "oaep-sha256")),
    "login_path": _Key(str, "/baas-sca/user-management/partner/users/login", placeholders=frozenset()),
    "sca_initiate_path": _Key(str, "/baas-sca/user-management/partner/sca/authorise/{authorisationEventId}",
                              placeholders=frozenset({"authorisationEventId"})),
    "sca_verify_path": _Key(str, "/baas-sca/user-management/partner/sca/verify", placeholders=frozenset()),
    "token_refresh_path": _Key(str, "/baas-sca/user-management/client/users/token/refresh",
                               placeholders=frozenset()),
    "logout_path": _Key(str, "/baas-sca/user-management/client/users/logout", placeholders=frozenset()),
    "user_accounts_path": _Key(str, "/baas-sca/accounts/client/accounts", placeholders=frozenset()),
    "client_accounts_path": _Key(str, "/baas-sca/accounts/partner/clients/{clientId}/accounts",
                                 placeholders=frozenset({"clientId"})),
    "payment_entries_path": _Key(
        str, "/baas-sca/accounts/partner/clients/{clientId}/accounts/{accountId}/payment-entries",
        placeholders=frozenset({"clientId", "accountId"})),
    "user_status_path": _Key(str, "/baas-sca/user-management/partner/users/{userId}",
                             placeholders=frozenset({"userId"})),
    "page_size": _Key(int, 500, minimum=1),
    "overlap_days": _Key(int, 3, minimum=0),
    "feed_interval_seconds": _Key(int, 3600, minimum=1),
    "max_ownership_age_days": _Key(int, 0, minimum=0),
    "max_credential_attempts": _Key(int, 5, minimum=1),
    "max_otp_attempts": _Key(int, 3, minimum=1),
    "max_code_resends": _Key(int, 3, minimum=0),
}
WEBHOOK: dict[str, _Key] = {
    "enabled": _Key(bool, False),
    "token": _Key(str, ""),
    "token_header": _Key(str, "x-connectpay-webhook-token"),
    "allowed_ips": _Key(list, None),
}


@dataclass(frozen=True, slots=True)
class Psd2Settings:
    authorize_url: str
    flow_id_param: str
    scope: str
    token_path: str
    revoke_path: str
    accounts_path: str
    balances_path: str
    transactions_path: str
    page_size: int
    overlap_days: int
    feed_interval_seconds: int
    max_unattended_reads_per_day: int


@dataclass(frozen=True, slots=True)
class BaasSettings:
    client_key: str
    client_secret: str
    api_key_prefix: str
    ip_header: str
    password_public_key_file: str
    password_padding: str
    login_path: str
    sca_initiate_path: str
    sca_verify_path: str
    token_refresh_path: str
    logout_path: str
    user_accounts_path: str
    client_accounts_path: str
    payment_entries_path: str
    user_status_path: str
    page_size: int
    overlap_days: int
    feed_interval_seconds: int
    max_ownership_age_days: int
    max_credential_attempts: int
    max_otp_attempts: int
    max_code_resends: int

    def __repr__(self) -> str:  # the partner secret never reaches a log through repr()
        return f"BaasSettings(client_key=…, api_key_prefix={self.api_key_prefix!r})"


@dataclass(frozen=True, slots=True)
class Settings:
    environment: str
    modes: tuple[str, ...]
    client_id: str
    client_secret: str
    mtls_base_url: str
    tls_base_url: str
    mtls_cert_file: str
    mtls_key_file: str
    mtls_key_password: str
    ca_file: str
    requests_per_second: float
    max_concurrency: int
    timeout_seconds: float
    psd2: Psd2Settings
    baas: BaasSettings

    def __repr__(self) -> str:
        return f"Settings(environment={self.environment!r}, modes={self.modes!r}, mtls={self.mtls_base_url!r})"


def is_loopback_http(url: str) -> bool:
    """Plain http is allowed only toward a loopback host (the emulator)."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _table(raw: Any, keys: Mapping[str, _Key], prefix: str, problems: Problems) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append((prefix.rstrip("."), "must be a table"))
        raw = {}
    out: dict[str, Any] = {}
    for name in raw:
        if name not in keys and not (prefix == "" and name in ("psd2", "baas", "webhook")):
            problems.append((f"{prefix}{name}", "unknown key"))
    for name, key in keys.items():
        value = raw.get(name, key.default)
        where = f"{prefix}{name}"
        kinds = key.kind if isinstance(key.kind, tuple) else (key.kind,)
        if value is None:
            out[name] = None
            continue
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            problems.append((where, f"must be {' or '.join(k.__name__ for k in kinds)}"))
            value = key.default
        elif key.choices and value not in key.choices:
            problems.append((where, f"must be one of {', '.join(repr(c) for c in key.choices)}"))
            value = key.default
        elif key.minimum is not None and isinstance(value, (int, float)) and value < key.minimum:
            problems.append((where, f"must be at least {key.minimum:g}"))
            value = key.default
        elif key.placeholders is not None and isinstance(value, str) and value:
            bad = _placeholder_problem(value, key.placeholders)
            if bad:
                problems.append((where, bad))
        out[name] = value
    return out


def _placeholder_problem(template: str, allowed: frozenset[str]) -> str | None:
    if not template.startswith("/"):
        return "must be a path starting with /"
    try:
        names = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError:
        return "has unbalanced braces"
    extra = names - allowed
    if extra:
        allowed_text = ", ".join(f"{{{n}}}" for n in sorted(allowed)) or "none"
        return f"uses unknown placeholder(s) {', '.join(sorted(extra))} (allowed: {allowed_text})"
    missing = allowed - names
    if missing:
        return f"must contain {', '.join(f'{{{n}}}' for n in sorted(missing))}"
    return None


def _readable(path: str) -> str | None:
    if not path:
        return "is required"
    if not os.path.isfile(path):
        return f"file {path} does not exist"
    if not os.access(path, os.R_OK):
        return f"file {path} is not readable"
    return None


def _check_certificate(top: Mapping[str, Any], problems: Problems, now: datetime) -> None:
    """Files readable, the key matches the leaf, the leaf is not expired (connectpay.md §2.2)."""
    cert_problem = _readable(top["mtls_cert_file"])
    key_problem = _readable(top["mtls_key_file"])
    if cert_problem:
        problems.append(("mtls_cert_file", cert_problem + " (the client certificate chain, PEM)"))
    if key_problem:
        problems.append(("mtls_key_file", key_problem + " (the client certificate's private key, PEM)"))
    if cert_problem or key_problem:
        return
    try:
        with open(top["mtls_cert_file"], "rb") as fh:
            chain = x509.load_pem_x509_certificates(fh.read())
    except ValueError:
        problems.append(("mtls_cert_file", "is not a PEM certificate chain"))
        return
    password = top["mtls_key_password"].encode() if top["mtls_key_password"] else None
    try:
        with open(top["mtls_key_file"], "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=password)
    except (ValueError, TypeError):
        problems.append(("mtls_key_file", "cannot be read as a PEM private key (wrong format or mtls_key_password)"))
        return
    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, spki) != leaf.public_key().public_bytes(
        serialization.Encoding.PEM, spki
    ):
        problems.append(("mtls_key_file", "does not match the first (leaf) certificate of mtls_cert_file"))
    expires = leaf.not_valid_after_utc
    if expires <= now:
        problems.append(("mtls_cert_file", f"the client certificate expired on {expires:%Y-%m-%d}"))
    elif expires - now < timedelta(days=CERT_WARNING_DAYS):
        # (key, problem) pairs are errors, so a coming expiry is only a log warning.
        log.warning("ConnectPay client certificate expires soon", extra={"expires": expires.date().isoformat()})


def _check_url(name: str, url: str, problems: Problems) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        problems.append((name, "must be an absolute URL"))
    elif parts.scheme == "http" and not is_loopback_http(url):
        problems.append((name, "must use https (plain http only toward a loopback emulator)"))
    elif parts.query or parts.fragment:
        problems.append((name, "must not contain a query string or fragment"))


def parse(config: Mapping[str, Any], *, now: datetime | None = None) -> tuple[Settings, Problems]:
    problems: Problems = []
    top = _table(config, TOP, "", problems)
    psd2 = _table(config.get("psd2"), PSD2, "psd2.", problems)
    baas = _table(config.get("baas"), BAAS, "baas.", problems)
    webhook = _table(config.get("webhook"), WEBHOOK, "webhook.", problems)

    preset = PRESETS.get(top["environment"], PRESETS["stage"])
    for name in ("mtls_base_url", "tls_base_url"):
        top[name] = (top[name] or preset[name]).rstrip("/")
        _check_url(name, top[name], problems)
    psd2["authorize_url"] = psd2["authorize_url"] or top["tls_base_url"] + AUTHORIZE_PATH
    _check_url("psd2.authorize_url", psd2["authorize_url"], problems)

    # Default: psd2, plus baas when a [baas] table is present (a psd2-only deployment needs no BaaS secrets).
    modes = top["modes"] if top["modes"] is not None else ["psd2", *(["baas"] if "baas" in config else [])]
    if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
        problems.append(("modes", "must be a non-empty list of \"psd2\" and/or \"baas\""))
        modes = ["psd2"]
    modes = list(dict.fromkeys(modes))

    if "psd2" in modes:
        for name in ("client_id", "client_secret"):
            if not top[name].strip():
                problems.append((name, "is required for psd2 mode (the DevApp's credentials)"))
        scopes = psd2["scope"].split()
        if not scopes or any(not s.startswith("psd2-") for s in scopes):
            problems.append(("psd2.scope", "must list PSD2 scopes only (psd2-ais); ConnectPay refuses mixed scopes"))
        elif "psd2-ais" not in scopes:
            problems.append(("psd2.scope", "must include psd2-ais"))
        if not is_loopback_http(top["mtls_base_url"]):
            _check_certificate(top, problems, now or datetime.now(UTC))
    if top["ca_file"] and (bad := _readable(top["ca_file"])):
        problems.append(("ca_file", bad))

    if "baas" in modes:
        baas["client_key"] = baas["client_key"] or top["client_id"]
        if not baas["client_key"].strip():
            problems.append(("baas.client_key", "is required for baas mode (defaults to client_id)"))
        if not baas["client_secret"].strip():
            problems.append(("baas.client_secret", "is required for baas mode"))
        for name in ("ip_header",):
            if not baas[name].strip():
                problems.append((f"baas.{name}", "must not be empty"))
        key_problem = _readable(baas["password_public_key_file"])
        if key_problem:
            problems.append(("baas.password_public_key_file", key_problem + " (ConnectPay's RSA public key, PEM)"))
        elif load_public_key(baas["password_public_key_file"]) is None:
            problems.append(("baas.password_public_key_file", "is not an RSA public key in PEM"))

    if webhook["enabled"]:
        problems.append(("webhook.enabled", "ConnectPay webhooks are not supported by this plugin version yet"))

    settings = Settings(
        environment=top["environment"],
        modes=tuple(modes),
        client_id=top["client_id"],
        client_secret=top["client_secret"],
        mtls_base_url=top["mtls_base_url"],
        tls_base_url=top["tls_base_url"],
        mtls_cert_file=top["mtls_cert_file"],
        mtls_key_file=top["mtls_key_file"],
        mtls_key_password=top["mtls_key_password"],
        ca_file=top["ca_file"],
        requests_per_second=float(top["requests_per_second"]),
        max_concurrency=int(top["max_concurrency"]),
        timeout_seconds=float(top["timeout_seconds"]),
        psd2=Psd2Settings(**psd2),
        baas=BaasSettings(**baas),
    )
    return settings, problems


def load_public_key(path: str) -> rsa.RSAPublicKey | None:
    try:
        with open(path, "rb") as fh:
            key = serialization.load_pem_public_key(fh.read())
    except (OSError, ValueError):
        return None
    return key if isinstance(key, rsa.RSAPublicKey) else None


def bank_mode(provider_bank: str, options: Mapping[str, Any]) -> str:
    """The modes a Sage bank offers: ``options.mode``, else ``provider_bank``, else ``any`` (connectpay.md §1)."""
    mode = options.get("mode") or provider_bank or "any"
    return str(mode)


def check_bank(provider_bank: str, options: Mapping[str, Any]) -> Problems:
    problems: Problems = []
    for name in options:
        if name != "mode":
            problems.append((f"options.{name}", "unknown option (ConnectPay banks take only options.mode)"))
    mode = options.get("mode")
    if mode is not None and mode not in BANK_MODES:
        problems.append(("options.mode", "must be \"psd2\", \"baas\" or \"any\""))
    if provider_bank and provider_bank not in BANK_MODES:
        problems.append(("provider_bank", "must be empty, \"psd2\", \"baas\" or \"any\" (the modes offered)"))
    if mode is not None and provider_bank and provider_bank != mode:
        problems.append(("options.mode", f"contradicts provider_bank {provider_bank!r}; set only one of them"))
    return problems
