"""check_config / check_bank, registration through pluggy, and picking a mode."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pluggy
import pytest
from cp_support import ANY_BANK, PSD2_BANK, ProviderFactory, make_flow, submit
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import plugins.connectpay
from connector import hookspecs
from connector.hookspecs import BankInfo
from connector.testing.connectpay import ConnectPayEmulator, EmulatorPki
from connector.types import Failed, Form, Redirect
from plugins.connectpay import ConnectPay
from plugins.connectpay.settings import parse


def problems(config: dict[str, Any]) -> dict[str, str]:
    return dict(ConnectPay.check_config(config))


def test_registered_through_pluggy() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(plugins.connectpay)
    found: list[type] = []
    pm.hook.connector_register_providers(register=found.append)
    assert found == [ConnectPay]
    assert (ConnectPay.name, ConnectPay.title, ConnectPay.template_dir) == ("connectpay", "ConnectPay", None)


def test_emulator_config_is_valid(emulator: ConnectPayEmulator, public_key_file: Path) -> None:
    assert problems(emulator.provider_config(public_key_file)) == {}


def test_presets_and_overrides() -> None:
    stage, _ = parse({})
    assert (stage.mtls_base_url, stage.tls_base_url) == ("https://api-stage.connectpay.com",
                                                         "https://api2-stage.connectpay.com")
    assert stage.psd2.authorize_url == "https://api2-stage.connectpay.com/auth/v1/oauth2/authorize"
    prod, _ = parse({"environment": "production", "psd2": {"authorize_url": "https://auth.example/authorize"}})
    assert (prod.mtls_base_url, prod.tls_base_url) == ("https://api.connectpay.com", "https://api2.connectpay.com")
    assert prod.psd2.authorize_url == "https://auth.example/authorize"
    assert prod.modes == ("psd2",)  # baas only with a [baas] table or an explicit modes list


def test_problems_name_their_key() -> None:
    found = problems({
        "environment": "dev", "client_id": "", "typo": 1, "mtls_base_url": "http://api.example.com",
        "requests_per_second": 0, "modes": ["psd2", "fax"],
        "psd2": {"transactions_path": "/ob/{id}/tx", "scope": "psd2-ais accounts", "page_size": "big"},
        "baas": {"api_key_prefix": "Bearer ", "client_secret": ""},
        "webhook": {"enabled": True},
    })
    assert set(found) >= {
        "environment", "client_id", "client_secret", "typo", "mtls_base_url", "requests_per_second", "modes",
        "psd2.transactions_path", "psd2.scope", "psd2.page_size", "baas.api_key_prefix", "webhook.enabled",
    }
    assert found["typo"] == "unknown key"
    assert "https" in found["mtls_base_url"]
    assert "{accountId}" in found["psd2.transactions_path"]


def test_baas_keys_checked_when_baas_is_on(tmp_path: Path) -> None:
    not_rsa = tmp_path / "ec.pem"
    not_rsa.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    base = {"client_id": "id", "client_secret": "s", "mtls_base_url": "http://127.0.0.1:9",
            "tls_base_url": "http://127.0.0.1:9", "modes": ["baas"]}
    assert set(problems({**base, "baas": {}})) == {"baas.client_secret", "baas.password_public_key_file"}
    found = problems({**base, "baas": {"client_secret": "x", "password_public_key_file": str(not_rsa)}})
    assert found == {"baas.password_public_key_file": "is not an RSA public key in PEM"}


def _pki_config(pki: EmulatorPki, **overrides: Any) -> dict[str, Any]:
    return {"client_id": "id", "client_secret": "s", "mtls_cert_file": str(pki.client_cert_file),
            "mtls_key_file": str(pki.client_key_file), **overrides}


def test_certificate_checks(tmp_path: Path) -> None:
    pki = EmulatorPki.create(tmp_path)
    assert problems(_pki_config(pki)) == {}
    mismatch = problems(_pki_config(pki, mtls_key_file=str(pki.rogue_key_file)))
    assert mismatch == {"mtls_key_file": "does not match the first (leaf) certificate of mtls_cert_file"}
    missing = problems(_pki_config(pki, mtls_cert_file=str(tmp_path / "nope.pem")))
    assert "does not exist" in missing["mtls_cert_file"]
    not_pem = tmp_path / "garbage.pem"
    not_pem.write_text("hello")
    assert problems(_pki_config(pki, mtls_cert_file=str(not_pem))) == {
        "mtls_cert_file": "is not a PEM certificate chain"}

    # An expired leaf.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = dt.datetime.now(dt.UTC)
    old = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(1).not_valid_before(now - dt.timedelta(days=400))
           .not_valid_after(now - dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "old.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "old.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    expired = problems(_pki_config(pki, mtls_cert_file=str(tmp_path / "old.pem"),
                                   mtls_key_file=str(tmp_path / "old.key")))
    assert expired["mtls_cert_file"].startswith("the client certificate expired on")


def test_certificate_not_needed_for_a_loopback_emulator() -> None:
    assert problems({"client_id": "id", "client_secret": "s", "mtls_base_url": "http://127.0.0.1:8001",
                     "tls_base_url": "http://localhost:8002"}) == {}


@pytest.mark.parametrize(
    ("provider_bank", "options", "expected"),
    [
        ("psd2", {}, set()),
        ("", {"mode": "baas"}, set()),
        ("any", {}, set()),
        ("", {}, set()),
        ("", {"mode": "sepa"}, {"options.mode"}),
        ("", {"colour": "red"}, {"options.colour"}),
        ("LT-bank", {}, {"provider_bank"}),
        ("psd2", {"mode": "baas"}, {"options.mode"}),
    ],
)
def test_check_bank(provider_bank: str, options: dict[str, Any], expected: set[str]) -> None:
    bank = BankInfo("b", "Bank", provider_bank, options)
    assert set(dict(ConnectPay.check_bank(bank))) == expected


async def test_both_modes_ask_the_person_first(make_provider: ProviderFactory) -> None:
    provider = make_provider()
    flow = make_flow(ANY_BANK)
    form = await provider.start(flow)
    assert isinstance(form, Form) and form.action == "choose_mode"
    assert [c.value for c in form.fields[0].choices] == ["psd2", "baas"]
    again = await provider.resume(flow, submit("choose_mode", mode="fax"))
    assert isinstance(again, Form) and again.error
    redirect = await provider.resume(flow, submit("choose_mode", mode="psd2"))
    assert isinstance(redirect, Redirect)

    baas_flow = make_flow(ANY_BANK)
    await provider.start(baas_flow)
    sign_in = await provider.resume(baas_flow, submit("choose_mode", mode="baas"))
    assert isinstance(sign_in, Form) and sign_in.action == "sign_in"


async def test_mode_switched_off(make_provider: ProviderFactory) -> None:
    provider = make_provider(modes=["psd2"])
    assert isinstance(await provider.start(make_flow(ANY_BANK)), Redirect)  # only psd2 left: no question
    result = await provider.start(make_flow(BankInfo("b", "Bank", "baas")))
    assert isinstance(result, Failed) and result.error.code == "connectpay_mode_unavailable"
    assert isinstance(await provider.start(make_flow(PSD2_BANK)), Redirect)
