"""A ConnectPay stand-in for tests and ``connector demo`` (connectpay.md §11): two real aiohttp servers on 127.0.0.1.

* the **"mTLS" host** (``mtls_base_url``): token, refresh, revoke, ``/ob/accounts`` reads. Started with
  ``tls=True`` it is HTTPS and *requires* a client certificate issued by the emulator's own test CA;
* the **"1-way" host** (``tls_base_url``): the browser authorize endpoint and sign-in page, and the whole BaaS-with-SCA
  set (partner login, SMS challenge, user token, logout, partner-level client reads).

Everything secret is made at run time: client secret, BaaS partner secret, the RSA key pair the password is
encrypted with, and (with ``tls=True``) a CA, a server certificate and a client certificate written to a temporary
folder (``ca_file``, ``client_cert_file``, ``client_key_file``).

Test hooks: a clock to fast-forward (:meth:`advance`), the last SMS code (:attr:`last_otp`), programmatic consent
(:meth:`approve` / :meth:`deny`), fault injection (:meth:`fail_next`, :meth:`malformed_next`, :meth:`delay_next`,
:meth:`drift_next`), and a log of every request (:attr:`requests`, :meth:`calls`).

Shapes follow connectpay.md §5 (Berlin Group modelled); errors are RFC 6749 bodies on ``/auth/v1/oauth2/*`` and
Berlin Group ``tppMessages`` elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import html
import ipaddress
import json
import secrets
import ssl
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = dt.UTC
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FLOW_ID = "GetPSD2AuthCode"
PSD2_SCOPES = frozenset({"psd2-ais", "psd2-pis"})
PROPRIETARY_SCOPES = frozenset({"ob-as", "accounts", "payments", "offline_access"})
DEFAULT_REDIRECT = "https://connector.example.com/providers/connectpay/callback"
ACCESS_TTL = 3600
REFRESH_TTL = 30 * 24 * 3600
CODE_TTL = 24 * 3600
USER_TOKEN_TTL = 300
USER_REFRESH_TTL = 3600
OTP_TTL = 300
MAX_WRONG_OTPS = 3
MAX_PAGE_SIZE = 3000


class EmulatorClock:
    """Real time plus an offset tests move forward; hand ``clock.now`` to the provider so both agree."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def now(self) -> dt.datetime:
        return dt.datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += dt.timedelta(seconds=seconds)


# --- data -------------------------------------------------------------------------------------------------------


@dataclass
class EmuAccount:
    resource_id: str
    iban: str
    currency: str  # "XXX" for a multi-currency account
    name: str
    balances: list[dict[str, Any]]
    booked: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    status: str = "enabled"
    account_level: str = "aggregation"
    client_id: str | None = None
    cash_account_type: str = "CACC"

    def to_json(self, *, with_balance: bool, baas: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "resourceId": self.resource_id, "iban": self.iban, "currency": self.currency, "name": self.name,
            "status": self.status, "cashAccountType": self.cash_account_type,
        }
        if baas:
            data["accountLevel"] = self.account_level
            data["clientId"] = self.client_id
        if with_balance:
            data["balances"] = self.balances
        return data


@dataclass
class Psu:
    customer_name: str
    account_ids: list[str]


@dataclass
class BaasUser:
    email: str
    password: str
    user_id: str
    client_ids: list[str]
    status: str = "active"


@dataclass
class _AuthRequest:
    state: str
    redirect_url: str
    flow_param: str
    scope: str


@dataclass
class _Code:
    psu: str
    scope: str
    issued: dt.datetime
    used: bool = False
    grant: _Grant | None = None


@dataclass
class _Grant:
    psu: str
    scope: str
    access_token: str
    access_expires: dt.datetime
    refresh_token: str
    refresh_expires: dt.datetime
    revoked: bool = False


@dataclass
class _ScaEvent:
    user: BaasUser
    otp: str | None = None
    sent_at: dt.datetime | None = None
    sends: int = 0
    wrong: int = 0
    dead: bool = False
    finalised: bool = False


@dataclass
class _UserSession:
    user: BaasUser
    access_token: str
    access_expires: dt.datetime
    refresh_token: str
    refresh_expires: dt.datetime
    logged_out: bool = False


@dataclass
class _Fault:
    kind: str  # "status" | "malformed" | "delay" | "drift"
    path: str | None
    status: int = 500
    code: str | None = None
    retry_after: str | None = None
    seconds: float = 0.0
    field_name: str = ""


@dataclass(frozen=True)
class Recorded:
    host: str  # "mtls" | "tls"
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes


def entry(
    tx_id: str | None, booking: dt.date, amount: str, currency: str = "EUR", text: str = "Payment",
    counterparty: str | None = None, **extra: Any,
) -> dict[str, Any]:
    """One Berlin Group transaction entry (connectpay.md §5.4)."""
    data: dict[str, Any] = {
        "bookingDate": booking.isoformat(), "valueDate": booking.isoformat(),
        "transactionAmount": {"amount": amount, "currency": currency},
        "remittanceInformationUnstructured": text,
    }
    if tx_id is not None:
        data["transactionId"] = tx_id
    if counterparty:
        data["creditorName" if amount.startswith("-") else "debtorName"] = counterparty
    data.update(extra)
    return data


def balance(kind: str, amount: str, currency: str, ref: dt.date) -> dict[str, Any]:
    return {"balanceType": kind, "balanceAmount": {"amount": amount, "currency": currency},
            "referenceDate": ref.isoformat()}


def _mask(name: str) -> str:
    return f"{name[:2]}…{name[-2:]}" if len(name) > 4 else name


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _bg_error(status: int, code: str, text: str) -> web.Response:
    return web.json_response({"tppMessages": [{"category": "ERROR", "code": code, "text": text}]}, status=status)


def _strip_field(data: Any, name: str) -> Any:
    if isinstance(data, dict):
        return {k: _strip_field(v, name) for k, v in data.items() if k != name}
    if isinstance(data, list):
        return [_strip_field(v, name) for v in data]
    return data


# --- certificates (tls=True) ------------------------------------------------------------------------------------


@dataclass
class EmulatorPki:
    """A throw-away CA with a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    folder: Path
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    client_cert_file: Path  # leaf + CA (a full chain, as ConnectPay asks)
    client_key_file: Path
    rogue_cert_file: Path  # a client certificate from another CA (must be refused)
    rogue_key_file: Path

    @classmethod
    def create(cls, folder: Path) -> EmulatorPki:
        now = dt.datetime.now(UTC)

        def key() -> rsa.RSAPrivateKey:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def cert(subject: str, pub: rsa.RSAPrivateKey, issuer: str, signer: rsa.RSAPrivateKey, *, ca: bool,
                 server: bool = False) -> x509.Certificate:
            builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                       .public_key(pub.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
                       .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            if ca:
                builder = builder.add_extension(
                    x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                  data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                  encipher_only=False, decipher_only=False), critical=True)
                builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(pub.public_key()),
                                                critical=False)
            else:
                builder = builder.add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
                usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
                builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            if server:
                builder = builder.add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
            return builder.sign(signer, hashes.SHA256())

        def pem(c: x509.Certificate) -> bytes:
            return c.public_bytes(serialization.Encoding.PEM)

        def key_pem(k: rsa.RSAPrivateKey) -> bytes:
            return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())

        ca_key, server_key, client_key, rogue_ca_key, rogue_key = key(), key(), key(), key(), key()
        ca = cert("ConnectPay emulator test CA", ca_key, "ConnectPay emulator test CA", ca_key, ca=True)
        server = cert("127.0.0.1", server_key, "ConnectPay emulator test CA", ca_key, ca=False, server=True)
        client = cert("connector test client", client_key, "ConnectPay emulator test CA", ca_key, ca=False)
        rogue = cert("rogue client", rogue_key, "Rogue CA", rogue_ca_key, ca=False)
        files = {
            "ca_file": pem(ca), "server_cert_file": pem(server) + pem(ca), "server_key_file": key_pem(server_key),
            "client_cert_file": pem(client) + pem(ca), "client_key_file": key_pem(client_key),
            "rogue_cert_file": pem(rogue), "rogue_key_file": key_pem(rogue_key),
        }
        paths = {}
        for attr, data in files.items():
            path = folder / f"{attr.removesuffix('_file')}.pem"
            path.write_bytes(data)
            path.chmod(0o600)
            paths[attr] = path
        return cls(folder=folder, **paths)


# --- the emulator -----------------------------------------------------------------------------------------------


class ConnectPayEmulator:
    """``async with ConnectPayEmulator() as cp:`` then ``cp.mtls_base_url``, ``cp.tls_base_url`` and
    ``cp.provider_config(...)`` (a ``[providers.connectpay]`` table pointing here)."""

    def __init__(
        self,
        *,
        tls: bool = False,
        redirect_urls: Sequence[str] = (DEFAULT_REDIRECT,),
        api_key_prefix: str = "",
        password_padding: str = "pkcs1v15",
        ip_header: str = "PSU-IP-Address",
        otp: str | None = None,
        links_next: bool = True,
    ) -> None:
        self.tls = tls
        self.clock = EmulatorClock()
        self.client_id = str(uuid.uuid4())
        self.client_secret = secrets.token_urlsafe(24)
        self.baas_client_key = "partner-" + secrets.token_hex(4)
        self.baas_client_secret = secrets.token_urlsafe(24)
        self.redirect_urls = list(redirect_urls)
        self.api_key_prefix = api_key_prefix
        self.password_padding = password_padding
        self.ip_header = ip_header
        self.fixed_otp = otp
        self.links_next = links_next  # False: no _links.next, the client must page by page number
        self.login_without_challenge = False
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        self.accounts: dict[str, EmuAccount] = {}
        self.psus: dict[str, Psu] = {}
        self.users: dict[str, BaasUser] = {}
        self.clients: dict[str, str] = {}  # clientId → status
        self.last_otp: str | None = None
        self.requests: list[Recorded] = []

        self._auth_requests: dict[str, _AuthRequest] = {}
        self._nonces: set[str] = set()
        self._codes: dict[str, _Code] = {}
        self._grants: list[_Grant] = []
        self._events: dict[str, _ScaEvent] = {}
        self._sessions: list[_UserSession] = []
        self._faults: list[_Fault] = []
        self._runners: list[web.AppRunner] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.pki: EmulatorPki | None = None
        self.mtls_base_url = ""
        self.tls_base_url = ""
        self._seed()

    # --- fixtures ---------------------------------------------------------------------------------------------

    def _seed(self) -> None:
        today = self.clock.now().date()

        def d(days_ago: int) -> dt.date:
            return today - dt.timedelta(days=days_ago)

        self.accounts["LT-ACC-0001"] = EmuAccount(
            "LT-ACC-0001", "LT601010012345678901", "EUR", "Main account",
            [balance("interimBooked", "1520.44", "EUR", d(0))],
            booked=[
                entry("tx-0001", d(9), "2500.00", text="Invoice 1001", counterparty="Globex Ltd"),
                entry("tx-0002", d(8), "-12.30", text="Coffee beans", counterparty="Bean Shop"),
                entry("tx-0003", d(6), "-450.00", text="Office rent", counterparty="Landlord Ltd",
                      endToEndId="E2E-RENT-1"),
                entry("tx-0004", d(4), "-3.20", text="Card fee", counterparty=None, endToEndId="NOTPROVIDED"),
                entry("tx-0005", d(2), "125.00", text="Invoice 1002", counterparty="Initech"),
            ],
            pending=[entry("tx-pend-1", d(0), "-99.99", text="Pending card payment")],
        )
        self.accounts["LT-ACC-0002-XXX"] = EmuAccount(
            "LT-ACC-0002-XXX", "LT601010012345678902", "XXX", "Currency account",
            [balance("interimBooked", "300.00", "EUR", d(0)), balance("interimBooked", "125.50", "USD", d(0))],
            booked=[
                entry("fx-0001", d(5), "200.00", "EUR", text="EUR in", counterparty="Euro Client"),
                entry("fx-0002", d(4), "100.00", "USD", text="USD in", counterparty="US Client"),
                entry("fx-0003", d(3), "-20.00", "EUR", text="EUR out", counterparty="Supplier"),
            ],
        )
        self.accounts["LT-ACC-0003"] = EmuAccount(
            "LT-ACC-0003", "LT601010012345678903", "EUR", "Old account",
            [balance("interimBooked", "0.00", "EUR", d(0))], status="blocked",
        )
        self.accounts["LT-ACC-0009"] = EmuAccount(
            "LT-ACC-0009", "LT601010012345678909", "EUR", "Other company account",
            [balance("closingBooked", "10.00", "EUR", d(1))],
        )
        self.psus["default"] = Psu("Acme Trading Ltd", ["LT-ACC-0001", "LT-ACC-0002-XXX", "LT-ACC-0003"])
        self.psus["other"] = Psu("Other Company UAB", ["LT-ACC-0009"])

        # BaaS: one user, one client with an EUR account whose payment entries hold booked and pending.
        self.clients["client-1"] = "active"
        self.accounts["BAAS-ACC-1"] = EmuAccount(
            "BAAS-ACC-1", "LT601010012345670001", "EUR", "BaaS wallet",
            [balance("closingBooked", "1000.00", "EUR", d(3))],
            booked=[
                entry("pe-0001", d(5), "-100.00", text="Supplier payment", counterparty="Supplier UAB"),
                entry("pe-0002", d(2), "250.00", text="Customer payment", counterparty="Customer UAB"),
                entry("pe-0003", d(1), "-50.00", text="Card payment", counterparty="Shop"),
            ],
            pending=[entry("pe-pend-1", d(0), "-75.00", text="Pending transfer", status="pending")],
            client_id="client-1",
        )
        self.accounts["BAAS-ACC-2"] = EmuAccount(
            "BAAS-ACC-2", "LT601010012345670002", "EUR", "BaaS closed",
            [balance("interimBooked", "0.00", "EUR", d(0))], status="closed", client_id="client-1",
        )
        self.users["anna@example.com"] = BaasUser("anna@example.com", "correct horse battery", "user-1",
                                                  ["client-1"])

    def add_booked(self, resource_id: str, count: int, *, start: dt.date | None = None, currency: str = "EUR",
                   prefix: str = "bulk") -> list[dict[str, Any]]:
        """Append ``count`` booked entries, one a day from ``start`` (for paging tests)."""
        first = start or self.clock.now().date() - dt.timedelta(days=count)
        made = [entry(f"{prefix}-{i:05d}", first + dt.timedelta(days=i % 365), f"-{i % 97 + 1}.{i % 100:02d}",
                      currency, text=f"Bulk {i}") for i in range(count)]
        self.accounts[resource_id].booked.extend(made)
        return made

    # --- life cycle -------------------------------------------------------------------------------------------

    async def start(self) -> ConnectPayEmulator:
        mtls_ssl = tls_ssl = None
        if self.tls:
            self._tmp = tempfile.TemporaryDirectory(prefix="connectpay-pki-")
            self.pki = EmulatorPki.create(Path(self._tmp.name))
            tls_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_ssl.load_cert_chain(self.pki.server_cert_file, self.pki.server_key_file)
            mtls_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.pki.ca_file))
            mtls_ssl.load_cert_chain(self.pki.server_cert_file, self.pki.server_key_file)
            mtls_ssl.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no client certificate, no handshake
        self.mtls_base_url = await self._serve(self._mtls_app(), mtls_ssl)
        self.tls_base_url = await self._serve(self._tls_app(), tls_ssl)
        return self

    async def _serve(self, app: web.Application, context: ssl.SSLContext | None) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self._runners.append(runner)
        port = runner.addresses[0][1]
        return f"{'https' if context else 'http'}://127.0.0.1:{port}"

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> ConnectPayEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def public_key_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    def provider_config(self, public_key_file: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
        """A ``[providers.connectpay]`` table pointing at this emulator (``public_key_file``: where the caller wrote
        :meth:`public_key_pem`, enabling baas mode)."""
        config: dict[str, Any] = {
            "environment": "stage",
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "mtls_base_url": self.mtls_base_url,
            "tls_base_url": self.tls_base_url,
            "requests_per_second": 1000,
            "max_concurrency": 8,
            "timeout_seconds": 5,
            "psd2": {"max_unattended_reads_per_day": 0},
        }
        if self.pki is not None:
            config.update(mtls_cert_file=str(self.pki.client_cert_file), mtls_key_file=str(self.pki.client_key_file),
                          ca_file=str(self.pki.ca_file))
        if public_key_file is not None:
            config["modes"] = ["psd2", "baas"]
            config["baas"] = {
                "client_key": self.baas_client_key, "client_secret": self.baas_client_secret,
                "api_key_prefix": self.api_key_prefix, "ip_header": self.ip_header,
                "password_public_key_file": str(public_key_file), "password_padding": self.password_padding,
            }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return config

    # --- test hooks -------------------------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def fail_next(self, status: int, *, path: str | None = None, code: str | None = None,
                  retry_after: str | None = None, times: int = 1) -> None:
        """The next request(s) whose path starts with ``path`` get ``status`` (an OAuth or BG error body)."""
        for _ in range(times):
            self._faults.append(_Fault("status", path, status=status, code=code, retry_after=retry_after))

    def malformed_next(self, path: str | None = None) -> None:
        self._faults.append(_Fault("malformed", path))

    def delay_next(self, seconds: float, path: str | None = None) -> None:
        self._faults.append(_Fault("delay", path, seconds=seconds))

    def drift_next(self, field_name: str, path: str | None = None) -> None:
        """Schema drift: the next answer loses every key named ``field_name``."""
        self._faults.append(_Fault("drift", path, field_name=field_name))

    def calls(self, path_prefix: str, method: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith(path_prefix) and (method is None or r.method == method)]

    def revoke_all(self) -> None:
        """As if the person withdrew every consent in ConnectPay."""
        for grant in self._grants:
            grant.revoked = True

    def expire_grants(self) -> None:
        """As if every consent lapsed at ConnectPay: access and refresh tokens expire now (by the emulator's clock),
        so data reads answer 401 and a refresh ``invalid_grant``. A new authorisation issues fresh ones."""
        now = self.clock.now()
        for grant in self._grants:
            grant.access_expires = min(grant.access_expires, now)
            grant.refresh_expires = min(grant.refresh_expires, now)

    def book(self, resource_id: str, tx_id: str, amount: str, *, booking: dt.date | None = None,
             currency: str | None = None, text: str = "Payment", counterparty: str | None = None) -> dict[str, Any]:
        """A new booked entry on an account (today by default), and its balances moved with it: an interim balance
        takes the amount; a ``closingBooked`` one only when the entry is not after its reference date."""
        account = self.accounts[resource_id]
        booking = booking or self.clock.now().date()
        currency = currency or (account.balances[0]["balanceAmount"]["currency"] if account.currency == "XXX"
                                else account.currency)
        made = entry(tx_id, booking, amount, currency, text=text, counterparty=counterparty)
        account.booked.append(made)
        for bal in account.balances:
            money = bal["balanceAmount"]
            if money["currency"] != currency:
                continue
            if bal["balanceType"] == "closingBooked" and booking.isoformat() > bal["referenceDate"]:
                continue
            money["amount"] = str(Decimal(money["amount"]) + Decimal(amount))
        return made

    def active_grants(self) -> list[_Grant]:
        now = self.clock.now()
        return [g for g in self._grants if not g.revoked and g.refresh_expires > now]

    def active_user_sessions(self) -> list[_UserSession]:
        now = self.clock.now()
        return [s for s in self._sessions if not s.logged_out and s.access_expires > now]

    def _decide(self, request_id: str, *, allow: bool, psu: str, error: str) -> str:
        auth = self._auth_requests.pop(request_id)  # single use
        if allow:
            code = secrets.token_urlsafe(24)
            self._codes[code] = _Code(psu, auth.scope, self.clock.now())
            query = [("code", code), ("state", auth.state), (auth.flow_param, FLOW_ID)]
        else:
            query = [("state", auth.state), (auth.flow_param, FLOW_ID), ("error", error)]
        return f"{auth.redirect_url}?{urlencode(query)}"

    def _open(self, authorize_url: str) -> str:
        checked = self._check_authorize(dict(parse_qsl(urlsplit(authorize_url).query)))
        if isinstance(checked, list):
            raise ValueError("; ".join(checked))
        return checked

    def approve(self, authorize_url: str, psu: str = "default") -> dict[str, list[str]]:
        """What the browser brings back after opening ``authorize_url`` and pressing "Allow", without a browser:
        the callback's query parameters as lists (a :class:`~connector.types.FlowEvent`'s ``values``). The URL is
        validated exactly as the authorize endpoint does (``ValueError`` lists the problems)."""
        location = self._decide(self._open(authorize_url), allow=True, psu=psu, error="")
        return parse_qs(urlsplit(location).query)

    def deny(self, authorize_url: str, error: str = "access_denied") -> dict[str, list[str]]:
        location = self._decide(self._open(authorize_url), allow=False, psu="default", error=error)
        return parse_qs(urlsplit(location).query)

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _middleware(self, host: str) -> Any:
        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            body = await request.read()
            self.requests.append(Recorded(host, request.method, request.path, dict(request.query),
                                          dict(request.headers), body))
            fault = next((f for f in self._faults if f.path is None or request.path.startswith(f.path)), None)
            if fault is not None:
                self._faults.remove(fault)
                if fault.kind == "delay":
                    await asyncio.sleep(fault.seconds)
                elif fault.kind == "status":
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                    if request.path.startswith("/auth/v1/oauth2/"):
                        failure = _oauth_error(fault.status, fault.code or "server_error", "injected fault")
                    else:
                        failure = _bg_error(fault.status, fault.code or "INTERNAL_SERVER_ERROR", "injected fault")
                    failure.headers.update(headers)
                    return failure
                elif fault.kind == "malformed":
                    return web.Response(status=200, text='{"accounts": [ {"resourceId": ',
                                        content_type="application/json")
            response = await handler(request)
            if fault is not None and fault.kind == "drift" and isinstance(response, web.Response) and response.body:
                data = json.loads(bytes(response.body))  # type: ignore[arg-type]  # body is bytes here
                return web.json_response(_strip_field(data, fault.field_name), status=response.status)
            return response

        return middleware

    def _mtls_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware("mtls")])
        app.router.add_post("/auth/v1/oauth2/token", self._token)
        app.router.add_post("/auth/v1/oauth2/revoke", self._revoke)
        app.router.add_get("/ob/accounts", self._ob_accounts)
        app.router.add_get("/ob/accounts/{accountId}/balances", self._ob_balances)
        app.router.add_get("/ob/accounts/{accountId}/transactions", self._ob_transactions)
        return app

    def _tls_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware("tls")])
        app.router.add_get("/auth/v1/oauth2/authorize", self._authorize)
        app.router.add_get("/auth/web/sign-in", self._sign_in_page)
        app.router.add_post("/auth/web/decide", self._web_decide)
        base = "/baas-sca/user-management"
        app.router.add_post(f"{base}/partner/users/login", self._baas_login)
        app.router.add_post(f"{base}/partner/sca/authorise/{{eventId}}", self._baas_send_otp)
        app.router.add_post(f"{base}/partner/sca/verify", self._baas_verify)
        app.router.add_get(f"{base}/partner/users/{{userId}}", self._baas_user_status)
        app.router.add_post(f"{base}/client/users/token/refresh", self._baas_refresh)
        app.router.add_post(f"{base}/client/users/logout", self._baas_logout)
        app.router.add_get("/baas-sca/accounts/client/accounts", self._baas_user_accounts)
        app.router.add_get("/baas-sca/accounts/partner/clients/{clientId}/accounts", self._baas_client_accounts)
        app.router.add_get("/baas-sca/accounts/partner/clients/{clientId}/accounts/{accountId}/payment-entries",
                           self._baas_entries)
        return app

    # --- psd2: authorize (browser) ----------------------------------------------------------------------------

    def _check_authorize(self, q: Mapping[str, str]) -> str | list[str]:
        """Validate an authorize query like ConnectPay (§3.3, O1/O5); a pending request id, or the problems."""
        problems = []
        if q.get("client_id") != self.client_id:
            problems.append("unknown client_id")
        flow_params = [name for name in ("flowId", "flowid") if name in q]
        if len(flow_params) != 1 or q[flow_params[0]] != FLOW_ID:
            problems.append("flowId must be GetPSD2AuthCode (sent once)")
        nonce = q.get("nonce", "")
        try:
            parsed = uuid.UUID(nonce)
            if parsed.version != 4 or str(parsed) != nonce.lower():
                problems.append("nonce must be a GUID v4")
        except ValueError:
            problems.append("nonce must be a GUID v4")
        if nonce in self._nonces:
            problems.append("nonce already used")
        scopes = set(q.get("scope", "").split())
        if not scopes:
            problems.append("scope missing")
        elif scopes & PSD2_SCOPES and scopes - PSD2_SCOPES:
            problems.append("PSD2 and proprietary scopes cannot be mixed")
        elif scopes - PSD2_SCOPES - PROPRIETARY_SCOPES:
            problems.append("unknown scope")
        if not q.get("state"):
            problems.append("state missing")
        redirect_url = q.get("redirect_url", "")
        parts = urlsplit(redirect_url)
        if parts.query or parts.fragment:
            problems.append("redirect_url must not carry a query string")
        elif redirect_url not in self.redirect_urls:
            problems.append("redirect_url is not registered")
        if q.get("response_type") != "code":
            problems.append("response_type must be code")
        if problems:
            return problems
        self._nonces.add(nonce)
        request_id = secrets.token_urlsafe(16)
        self._auth_requests[request_id] = _AuthRequest(q["state"], redirect_url, flow_params[0],
                                                       " ".join(sorted(scopes)))
        return request_id

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        checked = self._check_authorize(request.query)
        if isinstance(checked, list):
            return _oauth_error(400, "invalid_request", "; ".join(checked))
        raise web.HTTPMovedPermanently(f"{self.tls_base_url}/auth/web/sign-in?request={checked}")

    async def _sign_in_page(self, request: web.Request) -> web.Response:
        request_id = request.query.get("request", "")
        if request_id not in self._auth_requests:
            return web.Response(status=400, text="This sign-in link is no longer valid.")
        options = "".join(f'<option value="{html.escape(k)}">{html.escape(p.customer_name)}</option>'
                          for k, p in self.psus.items())
        page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ConnectPay (emulator): sign in</title></head>
<body><main>
<h1>ConnectPay (emulator)</h1>
<p>You are signed in as a test person. Choose the customer whose accounts you want to share.</p>
<form method="post" action="/auth/web/decide">
<input type="hidden" name="request" value="{html.escape(request_id)}">
<label for="psu">Customer</label> <select id="psu" name="psu">{options}</select>
<button type="submit" name="decision" value="allow">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button>
</form></main></body></html>"""
        return web.Response(text=page, content_type="text/html")

    async def _web_decide(self, request: web.Request) -> web.Response:
        form = await request.post()
        request_id = str(form.get("request", ""))
        if request_id not in self._auth_requests:
            return web.Response(status=400, text="This sign-in link is no longer valid.")
        psu = str(form.get("psu", "default"))
        allow = form.get("decision") == "allow" and psu in self.psus
        raise web.HTTPFound(self._decide(request_id, allow=allow, psu=psu, error="access_denied"))

    # --- psd2: tokens -----------------------------------------------------------------------------------------

    def _client_auth(self, request: web.Request) -> web.Response | None:
        if not request.headers.get("X-Request-ID"):
            return _oauth_error(400, "invalid_request", "X-Request-ID header is required")
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if not secrets.compare_digest(request.headers.get("Authorization", ""), expected):
            return _oauth_error(401, "invalid_client", "client authentication failed")
        return None

    def _issue(self, psu: str, scope: str) -> _Grant:
        now = self.clock.now()
        grant = _Grant(psu, scope, secrets.token_urlsafe(32), now + dt.timedelta(seconds=ACCESS_TTL),
                       secrets.token_urlsafe(32), now + dt.timedelta(seconds=REFRESH_TTL))
        self._grants.append(grant)
        return grant

    def _token_body(self, grant: _Grant) -> dict[str, Any]:
        return {"token_type": "Bearer", "access_token": grant.access_token, "refresh_token": grant.refresh_token,
                "expires_in": ACCESS_TTL, "refresh_token_expires_in": str(REFRESH_TTL), "scope": grant.scope,
                "client_customer_name": _mask(self.psus[grant.psu].customer_name)}

    async def _token(self, request: web.Request) -> web.Response:
        refused = self._client_auth(request)
        if refused is not None:
            return refused
        form = await request.post()
        now = self.clock.now()
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            code = self._codes.get(str(form.get("code", "")))
            if code is None:
                return _oauth_error(400, "invalid_grant", "unknown authorization code")
            if code.used:
                if code.grant is not None:
                    code.grant.revoked = True  # RFC 6749 §4.1.2: a replayed code revokes what it minted
                return _oauth_error(400, "invalid_grant", "authorization code already used")
            if now - code.issued > dt.timedelta(seconds=CODE_TTL):
                return _oauth_error(400, "invalid_grant", "authorization code expired")
            code.used = True
            code.grant = self._issue(code.psu, code.scope)
            return web.json_response(self._token_body(code.grant))
        if grant_type == "refresh_token":
            token = str(form.get("refresh_token", ""))
            grant = next((g for g in self._grants if g.refresh_token == token), None)
            if grant is None or grant.revoked or grant.refresh_expires <= now:
                return _oauth_error(400, "invalid_grant", "refresh token expired, revoked or already used")
            # Rotation: a new pair; the old refresh token is dead from now on.
            grant.access_token = secrets.token_urlsafe(32)
            grant.access_expires = now + dt.timedelta(seconds=ACCESS_TTL)
            grant.refresh_token = secrets.token_urlsafe(32)
            grant.refresh_expires = now + dt.timedelta(seconds=REFRESH_TTL)
            return web.json_response(self._token_body(grant))
        return _oauth_error(400, "unsupported_grant_type", "grant_type must be authorization_code or refresh_token")

    async def _revoke(self, request: web.Request) -> web.Response:
        refused = self._client_auth(request)
        if refused is not None:
            return refused
        form = await request.post()
        token = str(form.get("token", ""))
        for grant in self._grants:
            if token in (grant.refresh_token, grant.access_token):
                grant.revoked = True
        return web.Response(status=200)  # RFC 7009: unknown tokens are "revoked" too

    # --- psd2: data -------------------------------------------------------------------------------------------

    def _bearer_grant(self, request: web.Request) -> _Grant | web.Response:
        if not request.headers.get("X-Request-ID"):
            return _bg_error(400, "FORMAT_ERROR", "X-Request-ID header is required")
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        grant = next((g for g in self._grants if token and g.access_token == token), None)
        if grant is None or grant.revoked:
            return _bg_error(401, "TOKEN_INVALID", "access token unknown or revoked")
        if grant.access_expires <= self.clock.now():
            return _bg_error(401, "TOKEN_EXPIRED", "access token expired")
        if "psd2-ais" not in grant.scope.split():
            return _bg_error(403, "SCOPE_INVALID", "token lacks psd2-ais")
        return grant

    async def _ob_accounts(self, request: web.Request) -> web.Response:
        grant = self._bearer_grant(request)
        if isinstance(grant, web.Response):
            return grant
        with_balance = request.query.get("withBalance") == "true"
        accounts = [self.accounts[a].to_json(with_balance=with_balance, baas=False)
                    for a in self.psus[grant.psu].account_ids if a in self.accounts]
        return web.json_response({"accounts": accounts})

    def _psd2_account(self, request: web.Request) -> EmuAccount | web.Response:
        grant = self._bearer_grant(request)
        if isinstance(grant, web.Response):
            return grant
        account_id = request.match_info["accountId"]
        if account_id not in self.psus[grant.psu].account_ids or account_id not in self.accounts:
            return _bg_error(404, "RESOURCE_UNKNOWN", "account not found")
        return self.accounts[account_id]

    async def _ob_balances(self, request: web.Request) -> web.Response:
        account = self._psd2_account(request)
        if isinstance(account, web.Response):
            return account
        return web.json_response({"account": {"iban": account.iban}, "balances": account.balances})

    def _report(self, request: web.Request, account: EmuAccount, path: str, *, with_pending: bool) -> web.Response:
        q = request.query
        try:
            page_no = int(q.get("pageNo", "1"))
            page_size = int(q.get("pageSize", "100"))
            date_from = dt.date.fromisoformat(q["dateFrom"]) if "dateFrom" in q else None
        except ValueError:
            return _bg_error(400, "FORMAT_ERROR", "bad paging or date parameter")
        if page_no < 1 or not 1 <= page_size <= MAX_PAGE_SIZE:
            return _bg_error(400, "FORMAT_ERROR", "pageNo ≥ 1 and 1 ≤ pageSize ≤ 3000")
        entries = [e for e in account.booked
                   if date_from is None or dt.date.fromisoformat(e["bookingDate"]) >= date_from]
        entries.sort(key=lambda e: e["bookingDate"], reverse=q.get("sortOrder") == "desc")
        page = entries[(page_no - 1) * page_size: page_no * page_size]
        report: dict[str, Any] = {"booked": page, "_links": {"account": {"href": path.rsplit("/", 1)[0]}}}
        if with_pending:
            report["pending"] = account.pending if page_no == 1 else []
        if page_no * page_size < len(entries) and self.links_next:
            params = {k: v for k, v in q.items() if k not in ("pageNo", "pageSize")}
            params.update(pageNo=str(page_no + 1), pageSize=str(page_size))
            report["_links"]["next"] = {"href": f"{path}?{urlencode(params)}"}
        return web.json_response({"account": {"iban": account.iban}, "transactions": report})

    async def _ob_transactions(self, request: web.Request) -> web.Response:
        account = self._psd2_account(request)
        if isinstance(account, web.Response):
            return account
        return self._report(request, account, request.path, with_pending=False)  # booked only (A8)

    # --- baas -------------------------------------------------------------------------------------------------

    def _partner_ok(self, request: web.Request) -> web.Response | None:
        raw = base64.b64encode(f"{self.baas_client_key}:{self.baas_client_secret}".encode()).decode()
        if not secrets.compare_digest(request.headers.get("x-connectpay-api-key", ""), self.api_key_prefix + raw):
            return _bg_error(401, "UNAUTHORIZED", "partner key missing or wrong")
        return None

    def _user_session(self, request: web.Request) -> _UserSession | web.Response:
        refused = self._partner_ok(request)
        if refused is not None:
            return refused
        if not request.headers.get(self.ip_header):
            return _bg_error(400, "FORMAT_ERROR", f"{self.ip_header} header is required")
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        session = next((s for s in self._sessions if token and s.access_token == token), None)
        if session is None or session.logged_out or session.access_expires <= self.clock.now():
            return _bg_error(401, "TOKEN_INVALID", "user token unknown, expired or logged out")
        return session

    def _decrypt(self, ciphertext: str) -> str | None:
        if self.password_padding == "pkcs1v15":
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
        else:
            algorithm = hashes.SHA1() if self.password_padding == "oaep-sha1" else hashes.SHA256()
            pad = padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=None)
        try:
            return self.rsa_key.decrypt(base64.b64decode(ciphertext, validate=True), pad).decode("utf-8")
        except (ValueError, TypeError):
            return None

    async def _json_body(self, request: web.Request) -> dict[str, Any] | None:
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def _new_session(self, user: BaasUser) -> _UserSession:
        now = self.clock.now()
        session = _UserSession(user, secrets.token_urlsafe(32), now + dt.timedelta(seconds=USER_TOKEN_TTL),
                               secrets.token_urlsafe(32), now + dt.timedelta(seconds=USER_REFRESH_TTL))
        self._sessions.append(session)
        return session

    async def _baas_login(self, request: web.Request) -> web.Response:
        refused = self._partner_ok(request)
        if refused is not None:
            return refused
        body = await self._json_body(request) or {}
        user = self.users.get(str(body.get("email", "")).lower())
        password = self._decrypt(str(body.get("password", "")))
        if user is None or password is None or not secrets.compare_digest(password, user.password):
            return _bg_error(400, "INVALID_CREDENTIALS", "email or password is wrong")
        if user.status != "active":
            return _bg_error(403, "USER_BLOCKED", "user is blocked")
        if self.login_without_challenge:
            session = self._new_session(user)
            return web.json_response({"access_token": session.access_token, "expires_in": USER_TOKEN_TTL})
        event_id = str(uuid.uuid4())
        self._events[event_id] = _ScaEvent(user)
        return web.json_response({"challengeStatus": "Required", "authorisationEventId": event_id})

    async def _baas_send_otp(self, request: web.Request) -> web.Response:
        refused = self._partner_ok(request)
        if refused is not None:
            return refused
        event = self._events.get(request.match_info["eventId"])
        if event is None or event.dead or event.finalised:
            return _bg_error(400, "AUTHORISATION_EVENT_INVALID", "unknown or finished authorisation event")
        event.otp = self.fixed_otp or f"{secrets.randbelow(10 ** 6):06d}"
        event.sent_at = self.clock.now()
        event.sends += 1
        self.last_otp = event.otp
        return web.json_response({"scaStatus": "received"})

    async def _baas_verify(self, request: web.Request) -> web.Response:
        refused = self._partner_ok(request)
        if refused is not None:
            return refused
        body = await self._json_body(request) or {}
        event = self._events.get(str(body.get("authorisationEventId", "")))
        if event is None or event.dead or event.finalised:
            return _bg_error(400, "AUTHORISATION_EVENT_INVALID", "unknown or finished authorisation event")
        if event.otp is None or event.sent_at is None:
            return _bg_error(400, "OTP_INVALID", "no code was sent")
        if self.clock.now() - event.sent_at > dt.timedelta(seconds=OTP_TTL):
            return _bg_error(400, "OTP_EXPIRED", "the code has expired")
        if not secrets.compare_digest(str(body.get("otp", "")), event.otp):
            event.wrong += 1
            if event.wrong >= MAX_WRONG_OTPS:
                event.dead = True
            return _bg_error(400, "OTP_INVALID", "wrong code")
        event.finalised = True
        session = self._new_session(event.user)
        return web.json_response({"scaStatus": "finalised", "token_type": "Bearer",
                                  "access_token": session.access_token, "expires_in": USER_TOKEN_TTL,
                                  "refresh_token": session.refresh_token, "scope": "baas-user-sca",
                                  "userId": event.user.user_id})

    async def _baas_refresh(self, request: web.Request) -> web.Response:
        session = self._user_session(request)
        if isinstance(session, web.Response):
            return session
        body = await self._json_body(request) or {}
        if not secrets.compare_digest(str(body.get("refresh_token", "")), session.refresh_token):
            return _bg_error(401, "TOKEN_INVALID", "refresh token does not match")
        now = self.clock.now()
        session.access_token = secrets.token_urlsafe(32)
        session.access_expires = now + dt.timedelta(seconds=USER_TOKEN_TTL)
        session.refresh_token = secrets.token_urlsafe(32)
        return web.json_response({"access_token": session.access_token, "refresh_token": session.refresh_token,
                                  "expires_in": USER_TOKEN_TTL, "token_type": "Bearer"})

    async def _baas_logout(self, request: web.Request) -> web.Response:
        session = self._user_session(request)
        if isinstance(session, web.Response):
            return session
        session.logged_out = True
        return web.Response(status=204)

    def _client_accounts_json(self, client_ids: Sequence[str]) -> list[dict[str, Any]]:
        return [a.to_json(with_balance=True, baas=True) for a in self.accounts.values() if a.client_id in client_ids]

    async def _baas_user_accounts(self, request: web.Request) -> web.Response:
        session = self._user_session(request)
        if isinstance(session, web.Response):
            return session
        return web.json_response({"accounts": self._client_accounts_json(session.user.client_ids)})

    def _partner_client(self, request: web.Request) -> str | web.Response:
        refused = self._partner_ok(request)
        if refused is not None:
            return refused
        client_id = request.match_info["clientId"]
        status = self.clients.get(client_id)
        if status is None:
            return _bg_error(404, "RESOURCE_UNKNOWN", "client not found")
        if status != "active":
            return _bg_error(403, "CONSENT_INVALID", "client is not reachable for this partner")
        return client_id

    async def _baas_client_accounts(self, request: web.Request) -> web.Response:
        client_id = self._partner_client(request)
        if isinstance(client_id, web.Response):
            return client_id
        return web.json_response({"accounts": self._client_accounts_json([client_id])})

    async def _baas_entries(self, request: web.Request) -> web.Response:
        client_id = self._partner_client(request)
        if isinstance(client_id, web.Response):
            return client_id
        account = self.accounts.get(request.match_info["accountId"])
        if account is None or account.client_id != client_id:
            return _bg_error(404, "RESOURCE_UNKNOWN", "account not found")
        # Pending entries come back whatever bookingStatus says, to prove the plugin's own filter (§11).
        return self._report(request, account, request.path, with_pending=True)

    async def _baas_user_status(self, request: web.Request) -> web.Response:
        refused = self._partner_ok(request)
        if refused is not None:
            return refused
        user = next((u for u in self.users.values() if u.user_id == request.match_info["userId"]), None)
        if user is None:
            return _bg_error(404, "RESOURCE_UNKNOWN", "user not found")
        return web.json_response({"userId": user.user_id, "status": user.status})


def total(entries: Sequence[Mapping[str, Any]]) -> Decimal:
    """Sum of entries' amounts (for test assertions)."""
    return sum((Decimal(e["transactionAmount"]["amount"]) for e in entries), Decimal(0))
