"""``/auth``, ``/authrefresh`` and the journey pages against bad input, over real HTTP (spec 2.4-2.7; security.md
P1, P2, P6, P8, U1, U3, S1).

What a person would see is asserted: the status, the page heading, and whether a "Back to Sage" link is offered and
where it goes. What Sage would see is the PATCH count; what is stored is read back through the ORM.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlencode

import aiohttp
import pytest

from connector.journey.consents import secrets_aad
from connector.storage import models
from connector.testing.driver import Page
from connector.testing.fixtures import DEMO_BANK_ID, SageCalls

OTHER_BANK_ID = "5e0c1a55-0b6b-4c0e-9d6e-3b7f3c9e2a11"
TWO_BANKS = (
    {"sage_bank_id": DEMO_BANK_ID, "name": "Demo Bank", "provider": "demobank"},
    {"sage_bank_id": OTHER_BANK_ID, "name": "Other Demo Bank", "provider": "demobank"},
)
SAGE_REDIRECT = "https://money.sage.com/api/v1/indirectredirect/8f14e45f"
MARKUP = ['"><script>alert(1)</script>', "<svg onload=alert(1)>", "javascript:alert(1)", "<img src=x onerror=alert(1)>"]

NOT_ANNOUNCED = "We couldn't check this request"
INCOMPLETE = "This link is incomplete"
REFUSED = "We can't return you to Sage from here"
EXPIRED = "This link has expired"
USED = "This link has already been used"


@pytest.fixture
async def connector(connector_factory):
    """Every test here runs with two configured banks, so a bank mismatch can name a real bank."""
    return await connector_factory(banks=TWO_BANKS)


# --- helpers --------------------------------------------------------------------------------------------------------


async def fetch(http: aiohttp.ClientSession, url: str, method: str = "GET", **kwargs) -> tuple[Page, dict]:
    """One request, redirects not followed: the page as a person sees it, and the raw headers."""
    async with http.request(method, url, allow_redirects=False, **kwargs) as resp:
        return Page(str(resp.url), resp.status, await resp.text()), dict(resp.headers)


def auth_url(sage_calls: SageCalls, params: list[tuple[str, str]], path: str = "/auth") -> str:
    return f"{sage_calls.connector_url}{path}?{urlencode(params)}"


def links(page: Page) -> list[str]:
    """Links that leave the page (the skip link to ``#main`` stays on it)."""
    return [href for _, href, _ in page.links if not href.startswith("#")]


def back_link(page: Page) -> str | None:
    return next((href for text, href, _ in page.links if text == "Back to Sage"), None)


async def stored() -> dict:
    return {
        "authorisations": await models.Authorisation.all().order_by("id").values(),
        "journeys": await models.Journey.all().order_by("handle").values("handle", "status", "updated_at"),
        "consents": await models.Consent.all().order_by("id").values("id", "status", "secrets_sealed"),
        "links": await models.LinkedAccount.all().order_by("id").values(),
    }


async def linked(sage_calls, external_id: str) -> str:
    bank_account_id = await sage_calls.account_created(external_id)
    assert await models.LinkedAccount.exists(bank_account_id=bank_account_id), "the bank account was never linked"
    return bank_account_id


def valid_params(authorisation_id: str, *, state: str = "s-1", redirect_uri: str = SAGE_REDIRECT,
                 bank: str = DEMO_BANK_ID) -> dict[str, str]:
    return {"bank": bank, "authorisation_id": authorisation_id, "redirect_uri": redirect_uri, "state": state}


# --- spec 2.4 "Responses": every row ------------------------------------------------------------------------------


async def test_valid_request_shows_the_first_page(sage_calls, http):
    authorisation_id = await sage_calls.announce()
    page, headers = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id).items())))
    assert (page.status, page.h1) == (200, "Sign in to Demo Bank")
    assert headers["Content-Type"].startswith("text/html")
    assert "Location" not in headers
    assert (await models.Authorisation.get(id=authorisation_id)).used_at is not None


@pytest.mark.parametrize("missing", ["bank", "authorisation_id", "state", "redirect_uri"])
@pytest.mark.parametrize("how", ["absent", "empty", "twice"])
async def test_missing_empty_or_repeated_parameter_gets_400(sage_calls, http, missing, how):
    authorisation_id = await sage_calls.announce()
    params = list(valid_params(authorisation_id).items())
    if how == "absent":
        params = [(k, v) for k, v in params if k != missing]
    elif how == "empty":
        params = [(k, "" if k == missing else v) for k, v in params]
    else:
        params.append((missing, dict(params)[missing]))  # the same value again is still refused
    before = await stored()
    page, headers = await fetch(http, auth_url(sage_calls, params))
    assert page.status == 400
    assert "Location" not in headers
    if missing == "redirect_uri":
        assert page.h1 == REFUSED
        assert links(page) == []
    elif missing == "state":
        assert page.h1 == INCOMPLETE
        assert back_link(page) is None  # without a state Sage could not match the return
    else:
        assert page.h1 == INCOMPLETE
        assert back_link(page) == f"{SAGE_REDIRECT}?state=s-1"
    assert await stored() == before
    # The id is still good afterwards: nothing was consumed.
    page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id).items())))
    assert page.status == 200


async def test_unknown_parameters_are_ignored(sage_calls, http):
    authorisation_id = await sage_calls.announce()
    params = [*valid_params(authorisation_id).items(), ("utm_source", "x"), ("externalId", "y")]
    page, _ = await fetch(http, auth_url(sage_calls, params))
    assert (page.status, page.h1) == (200, "Sign in to Demo Bank")


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "{0}", "urn", "hex", "0" * 36, "x" * 5000, "../../etc/passwd"])
async def test_malformed_authorisation_id_gets_400_with_a_way_back(sage_calls, http, bad_id):
    real = uuid.UUID(await sage_calls.announce())
    value = {"{0}": "{" + str(real) + "}", "urn": real.urn, "hex": real.hex}.get(bad_id, bad_id)
    page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(value).items())))
    assert (page.status, page.h1) == (400, INCOMPLETE)
    assert back_link(page) == f"{SAGE_REDIRECT}?state=s-1"
    assert (await models.Authorisation.get(id=str(real))).used_at is None


async def test_authorisation_id_matches_in_any_case(sage_calls, http):
    authorisation_id = await sage_calls.announce()
    page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id.upper()).items())))
    assert (page.status, page.h1) == (200, "Sign in to Demo Bank")
    assert await models.Journey.filter(authorisation_id=authorisation_id).count() == 1


async def test_unknown_authorisation_id_gets_403_and_changes_nothing(sage_calls, http):
    await sage_calls.announce()
    before = await stored()
    page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(str(uuid.uuid4())).items())))
    assert (page.status, page.h1) == (403, NOT_ANNOUNCED)
    assert back_link(page) == f"{SAGE_REDIRECT}?state=s-1"
    assert await stored() == before


async def test_bank_mismatch_gets_403_and_the_id_stays_usable(sage_calls, http):
    authorisation_id = await sage_calls.announce(DEMO_BANK_ID)
    before = await stored()
    for bank in (OTHER_BANK_ID, str(uuid.uuid4()), DEMO_BANK_ID.upper()):
        page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id, bank=bank).items())))
        assert (page.status, page.h1) == (403, "This request doesn't match your bank"), bank
        assert back_link(page) == f"{SAGE_REDIRECT}?state=s-1"
    assert await stored() == before
    page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id).items())))
    assert page.status == 200


async def test_expired_authorisation_id_gets_410_and_is_not_consumed(sage_calls, http):
    authorisation_id = await sage_calls.announce()
    past = datetime.now(UTC) - timedelta(seconds=1)
    await models.Authorisation.filter(id=authorisation_id).update(expires_at=past)
    before = await stored()
    for path in ("/auth", "/authrefresh"):
        params = [*valid_params(authorisation_id).items(), ("externalId", str(uuid.uuid4()))]
        page, _ = await fetch(http, auth_url(sage_calls, params, path))
        if path == "/auth":
            assert (page.status, page.h1) == (410, EXPIRED)
            assert back_link(page) == f"{SAGE_REDIRECT}?state=s-1"
    assert await stored() == before


async def test_used_authorisation_id_gets_410_on_auth_and_authrefresh(sage, sage_calls, http, browser):
    external_id, _ = (await sage_calls.onboard(browser)).external_ids
    authorisation_id = await sage_calls.announce()
    params = list(valid_params(authorisation_id).items())
    page, _ = await fetch(http, auth_url(sage_calls, params))
    assert page.status == 200
    journeys = await models.Journey.all().count()
    for path, extra in (("/auth", []), ("/authrefresh", [("externalId", external_id)])):
        page, _ = await fetch(http, auth_url(sage_calls, params + extra, path))
        assert (page.status, page.h1) == (410, USED), path
        assert back_link(page) == f"{SAGE_REDIRECT}?state=s-1"
    assert await models.Journey.all().count() == journeys


async def test_two_concurrent_requests_with_one_id_one_wins(sage_calls, http):
    authorisation_id = await sage_calls.announce()
    url = auth_url(sage_calls, list(valid_params(authorisation_id).items()))
    results = await asyncio.gather(*(fetch(http, url) for _ in range(2)))
    assert sorted(page.status for page, _ in results) == [200, 410]
    assert await models.Journey.filter(authorisation_id=authorisation_id).count() == 1
    results = await asyncio.gather(*(fetch(http, url) for _ in range(5)))
    assert [page.status for page, _ in results] == [410] * 5


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/auth", "/authrefresh"])
async def test_other_methods_get_a_405_page(sage_calls, http, method, path):
    authorisation_id = await sage_calls.announce()
    page, headers = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id).items()), path),
                                method=method)
    assert (page.status, page.h1) == (405, "This page can't be used like that")
    assert headers["Content-Type"].startswith("text/html")
    assert (await models.Authorisation.get(id=authorisation_id)).used_at is None


# --- /authrefresh ----------------------------------------------------------------------------------------------


async def test_authrefresh_mismatches_get_403_and_consume_nothing(sage, sage_calls, http, browser):
    external_id, _ = (await sage_calls.onboard(browser)).external_ids
    bank_account_id = await linked(sage_calls, external_id)
    authorisation_id = await sage_calls.announce(DEMO_BANK_ID)
    other_bank_authorisation = await sage_calls.announce(OTHER_BANK_ID)
    base = valid_params(authorisation_id)
    before = await stored()
    cases = [
        ("unknown externalId", base, [("externalId", str(uuid.uuid4()))], "This request doesn't match your account"),
        ("overlong externalId", base, [("externalId", "x" * 100)], "This request doesn't match your account"),
        ("bankaccount of another account", base,
         [("externalId", external_id), ("bankaccount", str(uuid.uuid4()))], "This request doesn't match your account"),
        ("consent of another bank", valid_params(other_bank_authorisation, bank=OTHER_BANK_ID),
         [("externalId", external_id)], "This request doesn't match your bank"),
    ]
    for name, params, extra, heading in cases:
        page, _ = await fetch(http, auth_url(sage_calls, [*params.items(), *extra], "/authrefresh"))
        assert (page.status, page.h1) == (403, heading), name
        assert back_link(page) == f"{SAGE_REDIRECT}?state=s-1", name
    for name, extra in (("externalId missing", []), ("externalId twice",
                                                     [("externalId", external_id), ("externalId", external_id)])):
        page, _ = await fetch(http, auth_url(sage_calls, [*base.items(), *extra], "/authrefresh"))
        assert (page.status, page.h1) == (400, INCOMPLETE), name
    assert await stored() == before
    # The right values still work: bankaccount matching the link, or left out (Sage may not send it).
    for extra in ([("bankaccount", bank_account_id)], []):
        authorisation_id = await sage_calls.announce()
        params = [*valid_params(authorisation_id).items(), ("externalId", external_id), *extra]
        page, _ = await fetch(http, auth_url(sage_calls, params, "/authrefresh"))
        assert (page.status, page.h1) == (200, "Sign in to Demo Bank")


async def test_authrefresh_for_an_offboarded_consent_gets_403(sage, sage_calls, http, browser):
    first, second = (await sage_calls.onboard(browser)).external_ids
    for external_id in (first, second):
        bank_account_id = await linked(sage_calls, external_id)
        await sage_calls.account_deleted(bank_account_id, external_id)
    assert (await models.Consent.get(accounts__external_id=first)).status == "revoked"
    authorisation_id = await sage_calls.announce()
    params = [*valid_params(authorisation_id).items(), ("externalId", first)]
    page, _ = await fetch(http, auth_url(sage_calls, params, "/authrefresh"))
    assert (page.status, page.h1) == (403, "This request doesn't match your account")


# --- P1: redirect_uri probes ----------------------------------------------------------------------------------------

LOOKALIKE = "m\u043eney.sage.com"  # Cyrillic "о"
PROBES = [
    "https://money.sage.com.evil.example/r",
    "https://money.sage.com@evil.example/r",
    "https://evil.example\\@money.sage.com/r",
    "https://evil.example\\money.sage.com/r",
    "//evil.example/r",
    "//money.sage.com/r",
    "javascript:alert(document.domain)//money.sage.com",
    "javascript://money.sage.com/%0aalert(1)",
    "data:text/html,<script>alert(1)</script>",
    "http://money.sage.com/r",
    "ftp://money.sage.com/r",
    "https://evil.example/?r=money.sage.com",
    "https://evil.example/money.sage.com",
    "https://evil.example#money.sage.com",
    f"https://{LOOKALIKE}/r",
    f"https://{LOOKALIKE.encode('idna').decode()}/r",
    "https://money.sage.com./r",
    "https://sage.com.evil.example/r",
    "https://evilsage.com/r",
    "https://money.sage.com:443@evil.example/r",
    "https://money.sage.com%2eevil.example/r",
    "https://money.sage.com%00.evil.example/r",
    "https:money.sage.com/r",
    "https:///money.sage.com/r",
    "https://money.sage.com:99999/r",
    "https://money.sage.com/r\r\nLocation: https://evil.example",
    "https://money.sage.com/r\x00",
    "https://money.sage.com/r\x1b[0m",
    " https://money.sage.com/r",
    "/api/v1/indirectredirect/x",
    "money.sage.com/r",
]


async def test_refused_redirect_uri_gets_an_error_page_with_no_way_to_it(sage_calls, http):
    authorisation_id = await sage_calls.announce()
    before = await stored()
    for probe in PROBES:
        page, headers = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id,
                                                                                 redirect_uri=probe).items())))
        assert (page.status, page.h1) == (400, REFUSED), probe
        assert "Location" not in headers and "Refresh" not in headers, probe
        assert links(page) == [], probe
        assert back_link(page) is None
        assert "evil.example" not in page.html and "money.sage.com" not in page.html, probe
        assert not any(f.action for f in page.forms), probe
    assert await stored() == before
    page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id).items())))
    assert page.status == 200  # the id was never consumed


async def test_loopback_http_redirect_is_refused_unless_allowed(sage, connector_factory, http):
    strict = await connector_factory(extra={"security": {"allow_loopback_redirects": False}})
    calls = SageCalls.for_connector(sage, strict, http)
    authorisation_id = await calls.announce()
    for probe in (calls.redirect_uri(), "http://localhost/r", "http://[::1]/r", "https://127.0.0.1/r"):
        page, headers = await fetch(http, auth_url(calls, list(valid_params(authorisation_id,
                                                                            redirect_uri=probe).items())))
        assert (page.status, page.h1) == (400, REFUSED), probe
        assert links(page) == [] and "Location" not in headers
    page, _ = await fetch(http, auth_url(calls, list(valid_params(authorisation_id).items())))
    assert (page.status, page.h1) == (200, "Sign in to Demo Bank")


async def test_only_configured_hosts_are_accepted(sage, connector_factory, http):
    strict = await connector_factory(extra={"security": {"allow_loopback_redirects": False,
                                                         "redirect_hosts": ["money.sage.com", "*.sagebankdrive.com"]}})
    calls = SageCalls.for_connector(sage, strict, http)
    unknown = str(uuid.uuid4())  # an unannounced id: the 403 page shows where "Back to Sage" would go
    accepted = {
        "https://money.sage.com/p?a=1": "https://money.sage.com/p?a=1&state=s-1",
        "https://snd01eu.sagebankdrive.com/api/v1/indirectredirect/x":
            "https://snd01eu.sagebankdrive.com/api/v1/indirectredirect/x?state=s-1",
        "https://a.b.sagebankdrive.com/p#done": "https://a.b.sagebankdrive.com/p?state=s-1#done",
        "https://money.sage.com/p?": "https://money.sage.com/p?state=s-1",
        "https://MONEY.sage.com/P?x=%41&y": "https://MONEY.sage.com/P?x=%41&y&state=s-1",
    }
    for uri, back in accepted.items():
        page, _ = await fetch(http, auth_url(calls, list(valid_params(unknown, redirect_uri=uri).items())))
        assert (page.status, page.h1) == (403, NOT_ANNOUNCED), uri
        assert back_link(page) == back, uri
    for uri in ("https://sagebankdrive.com/x", "https://www.sage.com/x", "https://sagebankdrive.com.evil.example/"):
        page, _ = await fetch(http, auth_url(calls, list(valid_params(unknown, redirect_uri=uri).items())))
        assert (page.status, page.h1) == (400, REFUSED), uri
        assert links(page) == []


# --- P6: markup in echoed values ------------------------------------------------------------------------------------


async def test_markup_in_state_gets_400_and_is_never_echoed(sage_calls, http):
    authorisation_id = await sage_calls.announce()
    for state in [*MARKUP, "a b", "é", "x" * 513, "a&b=c", "a#b", "%3Cscript%3E"]:
        page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id, state=state).items())))
        assert (page.status, page.h1) == (400, INCOMPLETE), state
        assert back_link(page) is None, state
        assert "<script" not in page.html and "onload" not in page.html and "onerror" not in page.html
    page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id, state="a" * 512).items())))
    assert page.status == 200  # the longest allowed state, and the id was not consumed before


async def test_markup_in_bank_or_authorisation_id_is_never_echoed(sage_calls, http):
    authorisation_id = await sage_calls.announce()
    for markup in MARKUP:
        for params in (valid_params(authorisation_id, bank=markup), valid_params(markup)):
            page, _ = await fetch(http, auth_url(sage_calls, list(params.items())))
            assert page.status in (400, 403)
            assert "<script" not in page.html and "<svg" not in page.html and "<img" not in page.html
            assert "alert(1)" not in page.html
            assert back_link(page) == f"{SAGE_REDIRECT}?state=s-1"


async def test_markup_in_an_accepted_redirect_uri_is_escaped_in_the_link(sage_calls, http):
    uri = 'https://money.sage.com/x"><script>alert(1)</script>?q=<b>'
    page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(str(uuid.uuid4()), redirect_uri=uri).items())))
    assert page.status == 403
    assert "<script>" not in page.html and "<b>" not in page.html
    assert back_link(page) == f"{uri}&state=s-1"  # the href, once the HTML parser has unescaped it, is exact


async def test_markup_typed_into_a_form_comes_back_escaped(sage_calls, browser):
    authorisation_id = await sage_calls.announce()
    page = await browser.get(sage_calls.auth_url(authorisation_id))
    typed = '"><script>alert(1)</script>'
    page = await browser.submit(page, {"User name": typed, "Password": ""}, button="Sign in")
    assert page.h1 == "Sign in to Demo Bank"
    assert "<script>alert(1)" not in page.html
    [username] = [c for f in page.forms for c in f.controls if c.name == "username"]
    assert username.value == typed


async def test_markup_in_a_provider_callback_is_not_echoed(sage_calls, http):
    for markup in MARKUP:
        url = f"{sage_calls.connector_url}/providers/demobank/callback?state={quote(markup)}&error={quote(markup)}"
        page, _ = await fetch(http, url)
        assert (page.status, page.h1) == (404, "We can't find this page")
        assert "alert(1)" not in page.html


# --- U3: guessing is throttled per client IP ------------------------------------------------------------------------


async def test_many_unknown_ids_from_one_ip_get_429(sage, connector_factory, http):
    limited = await connector_factory(extra={"security": {"max_failed_lookups": 5}})
    calls = SageCalls.for_connector(sage, limited, http)
    real = await calls.announce()
    statuses = []
    for _ in range(8):
        page, _ = await fetch(http, auth_url(calls, list(valid_params(str(uuid.uuid4())).items())))
        statuses.append(page.status)
    assert statuses == [403] * 5 + [429] * 3
    page, _ = await fetch(http, auth_url(calls, list(valid_params(real).items())))
    assert (page.status, page.h1) == (429, "Too many attempts")
    assert back_link(page) == f"{SAGE_REDIRECT}?state=s-1"
    assert (await models.Authorisation.get(id=real)).used_at is None
    # Another client IP is not held back by this one's guesses.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
        page, _ = await fetch(other, auth_url(calls, list(valid_params(real).items())))
    assert (page.status, page.h1) == (200, "Sign in to Demo Bank")


async def test_forwarded_for_does_not_change_the_throttle_bucket(sage, connector_factory, http):
    limited = await connector_factory(extra={"security": {"max_failed_lookups": 2}})
    calls = SageCalls.for_connector(sage, limited, http)
    statuses = []
    for i in range(4):
        page, _ = await fetch(http, auth_url(calls, list(valid_params(str(uuid.uuid4())).items())),
                              headers={"X-Forwarded-For": f"203.0.113.{i}", "X-Real-IP": f"203.0.113.{i}"})
        statuses.append(page.status)
    assert statuses == [403, 403, 429, 429]


# --- the journey's own pages (P2, P8) ------------------------------------------------------------------------------


async def start(sage_calls, http) -> tuple[str, Page]:
    authorisation_id = await sage_calls.announce()
    url = auth_url(sage_calls, list(valid_params(authorisation_id).items()))
    page, _ = await fetch(http, url)
    assert page.status == 200
    return page.forms[0].action, page


async def test_get_routes_of_a_journey_change_nothing(sage_calls, http):
    url, _ = await start(sage_calls, http)
    before = await stored()
    for target in (url, url, url + "/poll"):  # /poll on a page that isn't waiting only shows the page again
        page, _ = await fetch(http, target)
        assert page.status in (200, 303)
    assert await stored() == before


async def test_post_without_a_valid_handle_gets_a_404_page(sage_calls, http):
    own, _ = await start(sage_calls, http)
    before = await stored()
    base = sage_calls.connector_url
    for url in (f"{base}/journey/", f"{base}/journey/nope", f"{base}/journey/{'a' * 65}",
                f"{base}/journey/{'a' * 43}", own + "x", own[:-1]):
        page, headers = await fetch(http, url, "POST", data={"action": "sign_in", "username": "u", "password": "p"})
        assert (page.status, page.h1) == (404, "We can't find this page"), url
        assert "Location" not in headers
    assert await stored() == before


async def test_a_post_acts_only_on_its_own_journey(sage, sage_calls, http, browser):
    mine_url, _ = await start(sage_calls, http)
    theirs_url, theirs = await start(sage_calls, http)
    theirs_handle = theirs_url.rsplit("/", 1)[1]
    theirs_before = await models.Journey.get(handle=theirs_handle).values("page_sealed", "updated_at", "status")
    async with http.post(mine_url, data={"action": "sign_in", "username": "alice", "password": "pw"},
                         allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == mine_url
    assert await models.Journey.get(handle=theirs_handle).values("page_sealed", "updated_at", "status") == \
        theirs_before
    # Their journey reaches the accounts page as bob; an account offered to alice is refused there.
    page = await browser.submit(theirs, {"User name": "bob", "Password": "pw"}, button="Sign in")
    assert page.h1 == "Choose the accounts to share with Sage"
    async with http.post(theirs_url, data={"account": "alice-current"}, allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == theirs_url
    assert sage.patches == []
    mine = await browser.get(mine_url)
    assert mine.h1 == "Choose the accounts to share with Sage"
    assert "Business Current" in mine.text


async def test_every_post_answers_303(sage, sage_calls, http):
    url, _ = await start(sage_calls, http)
    posts = [
        {"action": "sign_in"},  # required fields missing
        {"action": "nonsense", "username": "u", "password": "p"},
        {"action": "sign_in", "username": ["a", "b"], "password": "p"},
        {"action": "sign_in", "username": "otp", "password": "wrong"},
        {"action": "sign_in", "username": "otp", "password": "pw"},
        {"action": "verify", "code": "000000"},
        {"action": "resend"},
        {"action": "verify", "code": "123456"},
        {"account": "someone-else"},
        {},
    ]
    for data in posts:
        form = [(k, v) for k, vs in data.items() for v in (vs if isinstance(vs, list) else [vs])]
        async with http.post(url, data=form, allow_redirects=False) as resp:
            assert resp.status == 303, data
            assert resp.headers["Location"] == url, data
    async with http.post(url, data={"account": "otp-current"}, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == f"{SAGE_REDIRECT}?state=s-1"
    assert len(sage.patches) == 1
    # Cancelling another journey: 303 to its error page, never 307 or 308.
    url, _ = await start(sage_calls, http)
    async with http.post(url, data={"cancel": ""}, allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, url)
    async with http.post(url, data={"action": "sign_in", "username": "u", "password": "p"},
                         allow_redirects=False) as resp:
        assert resp.status == 303  # a post on a finished journey changes nothing
    page, _ = await fetch(http, url)
    assert page.h1 == "You cancelled connecting your bank"


async def test_finished_journey_cannot_be_replayed(sage, sage_calls, http):
    url, _ = await start(sage_calls, http)
    async with http.post(url, data={"action": "sign_in", "username": "zoe", "password": "pw"},
                         allow_redirects=False) as resp:
        assert resp.status == 303
    async with http.post(url, data={"account": "zoe-current"}, allow_redirects=False) as resp:
        assert resp.status == 303
    for method in ("GET", "POST"):
        page, _ = await fetch(http, url, method, data={"account": "zoe-current"})
        assert (page.status, page.h1) == (410, USED)
    assert len(sage.patches) == 1


@pytest.mark.parametrize("limit", ["idle", "absolute"])
async def test_expired_journey_gets_a_410_page(sage, sage_calls, http, limit):
    url, _ = await start(sage_calls, http)
    handle = url.rsplit("/", 1)[1]
    past = datetime.now(UTC) - timedelta(seconds=1)
    if limit == "idle":
        await models.Journey.filter(handle=handle).update(updated_at=past - timedelta(hours=1))
    else:
        await models.Journey.filter(handle=handle).update(expires_at=past)
    before = await stored()
    for method, target in (("GET", url), ("POST", url), ("GET", url + "/poll")):
        page, headers = await fetch(http, target, method, data={"action": "sign_in", "username": "u", "password": "p"})
        assert (page.status, page.h1) == (410, "Your session has expired"), (method, target)
        assert back_link(page) == f"{SAGE_REDIRECT}?state=s-1"
        assert "Location" not in headers
    assert await stored() == before
    assert sage.patches == []


# --- S1: no secret of the journey in the database file -------------------------------------------------------------


async def test_no_journey_secret_is_stored_in_clear(sage, sage_calls, browser, connector, tmp_path):
    password = f"pw-{uuid.uuid4().hex}"
    code_user = "otp"
    authorisation_id = await sage_calls.announce()
    page = await browser.get(sage_calls.auth_url(authorisation_id))
    page = await browser.submit(page, {"User name": code_user, "Password": password}, button="Sign in")
    page = await browser.submit(page, {"Security code": "123456"}, button="Confirm")
    done = await browser.submit(page, button="Share with Sage")
    assert done.left_to
    consent = await models.Consent.get(provider_consent_id=code_user)
    token = connector.app.ctx.box.open_json(consent.secrets_sealed, secrets_aad(consent.id))["token"]
    account_numbers = [a["accountIdentifier"] for a in sage.patches[0].body["data"]["bankAccounts"]]
    bearer = sage.identity.notification_token()
    await sage_calls.notify({"type": "resourceCreated", "resource": {"id": str(uuid.uuid4()), "type": "x"}},
                            headers=sage_calls.headers(bearer))
    data = await stored_bytes(connector.settings.database["url"])
    assert data
    for secret in (password, token, bearer, connector.endpoints.notification_header_value,
                   *account_numbers):
        assert secret.encode() not in data, secret[:6]


async def stored_bytes(url: str) -> bytes:
    """Everything the database holds: on SQLite the files themselves (WAL included), on PostgreSQL every value of
    every table, as text (bytea as its raw bytes)."""
    if url.startswith("sqlite://"):
        db = Path(url.removeprefix("sqlite://"))
        return b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
    from tortoise import Tortoise

    conn = Tortoise.get_connection("default")
    tables = await conn.execute_query_dict(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
    parts: list[bytes] = []
    for table in tables:
        for row in await conn.execute_query_dict(f'SELECT * FROM "{table["table_name"]}"'):
            parts += [bytes(v) if isinstance(v, bytes | bytearray | memoryview) else str(v).encode()
                      for v in row.values() if v is not None]
    return b"\n".join(parts)


async def test_unknown_journey_handles_and_callback_states_are_throttled_too(sage, connector_factory, http):
    limited = await connector_factory(extra={"security": {"max_failed_lookups": 3}})
    calls = SageCalls.for_connector(sage, limited, http)
    own, _ = await start(calls, http)
    guesses = [("GET", f"{limited.url}/journey/{'a' * 43}"), ("POST", f"{limited.url}/journey/{'b' * 43}"),
               ("GET", f"{limited.url}/providers/demobank/callback?state={'c' * 43}"),
               ("GET", f"{limited.url}/journey/{'d' * 43}/poll")]
    statuses = [(await fetch(http, url, method))[0].status for method, url in guesses]
    assert statuses == [404, 404, 404, 429]
    page, _ = await fetch(http, f"{limited.url}/journey/{'e' * 43}")
    assert (page.status, page.h1) == (429, "Too many attempts")
    # The person's own journey is never held back by the guesses.
    page, _ = await fetch(http, own)
    assert (page.status, page.h1) == (200, "Sign in to Demo Bank")


@pytest.mark.parametrize("path", ["/auth", "/authrefresh"])
async def test_head_gets_405_and_consumes_nothing(sage_calls, http, path):
    authorisation_id = await sage_calls.announce()
    params = [*valid_params(authorisation_id).items(), ("externalId", str(uuid.uuid4()))]
    async with http.head(auth_url(sage_calls, params, path), allow_redirects=False) as resp:
        assert resp.status == 405
    assert (await models.Authorisation.get(id=authorisation_id)).used_at is None
    assert await models.Journey.all().count() == 0


async def test_head_on_a_provider_callback_consumes_nothing(sage_calls, http, browser):
    authorisation_id = await sage_calls.announce()
    page = await browser.get(sage_calls.auth_url(authorisation_id))
    page = await browser.submit(page, {"User name": "redirect", "Password": "pw"}, button="Sign in")
    url, _ = page.link("Continue to your bank")
    async with http.head(url, allow_redirects=False) as resp:
        assert resp.status == 405
    page = await browser.get(url)
    assert page.h1 == "Choose the accounts to share with Sage"


async def test_storage_unavailable_gets_a_503_page_and_nothing_changes(sage_calls, http):
    from tortoise import Tortoise

    authorisation_id = await sage_calls.announce()
    db = Tortoise.get_connection("default")
    await db.execute_script("ALTER TABLE journey RENAME TO journey_away")
    try:
        page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id).items())))
        assert (page.status, page.h1) == (503, "Please try again in a moment")
        assert "Traceback" not in page.html
    finally:
        await db.execute_script("ALTER TABLE journey_away RENAME TO journey")
    assert (await models.Authorisation.get(id=authorisation_id)).used_at is None
    page, _ = await fetch(http, auth_url(sage_calls, list(valid_params(authorisation_id).items())))
    assert (page.status, page.h1) == (200, "Sign in to Demo Bank")  # the person can simply try again
