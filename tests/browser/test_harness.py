"""The checks themselves can fail: a page broken on purpose is caught by axe-core, by the reflow check and by the
visible-focus check (otherwise a green suite would prove nothing)."""

from __future__ import annotations

import pytest
from harness import Person, SageSite, announce_and_link

from connector.demo import DEMO_BANK_ID


async def broken(person: Person, sage_calls, site: SageSite, script: str):
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    frame = await person.open(visit.url)
    await frame.evaluate(script)
    return frame


async def test_axe_catches_an_unlabelled_field_and_poor_contrast(person: Person, sage_calls, site: SageSite) -> None:
    await broken(person, sage_calls, site, """() => {
        const i = document.createElement('input'); document.querySelector('form').appendChild(i);
        const p = document.createElement('p'); p.textContent = 'faint'; p.style.color = '#ccc';
        document.querySelector('main').appendChild(p);
    }""")
    with pytest.raises(AssertionError, match="label") as caught:
        await person.check("broken on purpose", reflow=False)
    assert "color-contrast" in str(caught.value)


async def test_reflow_check_catches_a_wide_element(person: Person, sage_calls, site: SageSite) -> None:
    await broken(person, sage_calls, site, """() => {
        const d = document.createElement('div'); d.style.width = '400px'; d.textContent = 'wide';
        document.querySelector('main').appendChild(d);
    }""")
    assert await person.overflow_at(320) is not None
    assert await person.overflow_at(640) is None


async def test_focus_check_catches_an_invisible_focus(person: Person, sage_calls, site: SageSite) -> None:
    await broken(person, sage_calls, site, """() => {
        for (const el of document.querySelectorAll('a, input, button')) {
            el.style.setProperty('outline', 'none', 'important');
            el.style.setProperty('box-shadow', 'none', 'important');
        }
    }""")
    with pytest.raises(AssertionError, match="no visible focus"):
        await person.tab_to("User name")
