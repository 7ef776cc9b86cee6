from harness import Person, axe_violations, describe_violations

async def test_probe(person: Person, sage_calls, site, sage, connector_factory):
    person.page.on("response", lambda r: print("RESP", r.status, r.url) if r.status >= 400 else None)
    auth_id = await sage_calls.announce()
    redirect_uri = site.redirect_uri()
    url = sage_calls.auth_url(auth_id, redirect_uri=redirect_uri, state="s-123")
    frame = await person.open(url)
    # inject inline script to see CSP console in OOPIF
    await frame.evaluate("() => { const s = document.createElement('script'); s.textContent = 'window.x=1'; document.body.appendChild(s); }")
    await person.page.wait_for_timeout(300)
    print("CONSOLE", person.console)
    v = await axe_violations(frame)
    print("AXE", describe_violations(v))
    print("CONSOLE2", person.console)
    # blocked framing
    other = await connector_factory(extra={"security": {"frame_ancestors": ["http://example.invalid"]}})
    await person.page.goto(site.frame_url(other.url + "/auth?x=1"))
    await person.page.wait_for_timeout(500)
    f = person.page.frames
    print("FRAMES", [x.url for x in f])
    print("CONSOLE3", person.console)
