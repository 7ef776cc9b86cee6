"""The emulator's own checks (what ConnectPay refuses), and log hygiene across whole journeys."""

from __future__ import annotations

import base64
import logging
import uuid
from datetime import timedelta
from urllib.parse import urlencode

import aiohttp
import pytest
from cp_support import BAAS_BANK, PUBLIC_URL, ProviderFactory, callback, choose, make_flow, onboard_psd2, submit

from connector.testing.connectpay import ConnectPayEmulator
from connector.types import ChooseAccounts, Done, Form
from plugins.connectpay import ConnectPay

CALLBACK = f"{PUBLIC_URL}/providers/connectpay/callback"


def authorize_params(emulator: ConnectPayEmulator, **changes: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "client_id": emulator.client_id, "flowId": "GetPSD2AuthCode", "nonce": str(uuid.uuid4()),
        "scope": "psd2-ais", "state": "s" * 43, "redirect_url": CALLBACK, "response_type": "code",
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v is not None}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"client_id": "someone-else"}, "unknown client_id"),
        ({"flowId": None}, "flowId"),
        ({"flowid": "GetPSD2AuthCode"}, "sent once"),  # both spellings at once
        ({"nonce": "not-a-guid"}, "GUID v4"),
        ({"nonce": str(uuid.uuid1())}, "GUID v4"),
        ({"scope": "psd2-ais accounts"}, "mixed"),
        ({"scope": "psd2-ais telepathy"}, "mixed"),
        ({"state": None}, "state missing"),
        ({"redirect_url": CALLBACK + "?x=1"}, "query string"),
        ({"redirect_url": "https://evil.example/providers/connectpay/callback"}, "not registered"),
        ({"response_type": "token"}, "response_type"),
    ],
)
async def test_authorize_refuses_bad_requests(
    emulator: ConnectPayEmulator, changes: dict[str, str | None], problem: str
) -> None:
    url = f"{emulator.tls_base_url}/auth/v1/oauth2/authorize?{urlencode(authorize_params(emulator, **changes))}"
    async with aiohttp.ClientSession() as session, session.get(url, allow_redirects=False) as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"] == "invalid_request" and problem in body["error_description"]


async def test_authorize_answers_301_and_nonce_is_single_use(emulator: ConnectPayEmulator) -> None:
    query = urlencode(authorize_params(emulator))
    url = f"{emulator.tls_base_url}/auth/v1/oauth2/authorize?{query}"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, allow_redirects=False) as response:
            assert response.status == 301
            assert response.headers["Location"].startswith(f"{emulator.tls_base_url}/auth/web/sign-in?request=")
        async with session.get(url, allow_redirects=False) as response:
            assert response.status == 400  # the same nonce again


async def test_token_endpoint_requires_request_id_and_basic(emulator: ConnectPayEmulator) -> None:
    url = f"{emulator.mtls_base_url}/auth/v1/oauth2/token"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data={"grant_type": "refresh_token", "refresh_token": "x"}) as response:
            assert response.status == 400 and (await response.json())["error"] == "invalid_request"
        wrong = "Basic " + base64.b64encode(f"{emulator.client_id}:wrong".encode()).decode()
        async with session.post(url, data={"grant_type": "refresh_token"},
                                headers={"X-Request-ID": "1", "Authorization": wrong}) as response:
            assert response.status == 401 and (await response.json())["error"] == "invalid_client"


async def test_code_expires_after_24_hours(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow()
    step = await provider.start(flow)
    values = emulator.approve(step.url)  # type: ignore[union-attr]
    emulator.advance(timedelta(hours=24, seconds=1).total_seconds())
    result = await provider.resume(flow, callback(values))
    assert result.error.code == "connectpay_code_refused"  # type: ignore[union-attr]


async def test_no_secret_reaches_a_log(
    make_provider: ProviderFactory, emulator: ConnectPayEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = make_provider()
    _flow, done = await onboard_psd2(provider, emulator)
    secrets_seen = [done.grant.secrets["access_token"], done.grant.secrets["refresh_token"], emulator.client_secret]
    code_call = emulator.calls("/auth/v1/oauth2/token")[0].body.decode()
    secrets_seen.append(code_call.split("code=")[1])

    baas = make_flow(BAAS_BANK)
    await provider.start(baas)
    password = "correct horse battery"
    assert isinstance(await provider.resume(baas, submit("sign_in", email="anna@example.com", password=password)),
                      Form)
    otp = emulator.last_otp or ""
    wrong = "000000" if otp != "000000" else "111111"
    await provider.resume(baas, submit("verify", otp=wrong))
    assert isinstance(await provider.resume(baas, submit("verify", otp=otp)), ChooseAccounts)
    user_token = baas.state["user"]["access_token"]
    assert isinstance(await provider.resume(baas, choose("BAAS-ACC-1")), Done)
    secrets_seen += [password, otp, wrong, user_token, emulator.baas_client_secret]

    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert caplog.records  # calls are logged...
    for secret in secrets_seen:
        assert secret not in text  # ...without tokens, codes, passwords or OTPs
