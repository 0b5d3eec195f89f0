"""The console (/console, issue 13) in headless Chromium against a real `letta-bus up` (tests/browser/conftest.py).

What a person with a portal link does: open the link (signed in, the token gone from the address bar), see only
their organization's endpoints and deliveries, open a failed delivery, retry it with the keyboard and watch the new
attempt arrive live (server-sent events) without a reload; an expired or revoked link shows the page saying so.
Every page also passes: each control has an accessible name, and nothing is logged as a console error (the ``page``
fixture). The DOM hooks are the console's stable contract: ``#endpoints tr[data-endpoint-id]``,
``#deliveries tr[data-delivery-id]``, ``button#retry``, ``ol#attempts li[data-attempt-number]``, ``#session-error``.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the fixtures skip (or fail under CI=true) with the reason
    expect = None

pytestmark = pytest.mark.browser

STEP = {"step_id": "step-browser-1", "status": "success", "run_id": "run-browser-1"}
#: Seconds a delivery may take to fail for good (3 attempts 0.2 s apart) or to reach its endpoint.
SETTLE_S = 20
#: The controls that must each have an accessible name.
CONTROLS = "button, input:not([type=hidden]), select, textarea"


def _wait_for_deliveries(stack, endpoint_id: str, status: str, timeout_s: float = SETTLE_S) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    rows: list[dict] = []
    with stack.client() as c:
        while time.monotonic() < deadline:
            r = c.get(f"/v1/webhooks/{endpoint_id}/deliveries")
            assert r.status_code == 200, r.text
            rows = r.json()["data"]
            if rows and all(d["status"] == status for d in rows):
                return rows
            time.sleep(0.2)
    pytest.fail(f"deliveries of {endpoint_id} did not all become {status} in {timeout_s} s: {rows}\n"
                f"letta-bus up said:\n{stack.output()}", pytrace=False)


@pytest.fixture(scope="module")
def world(stack, receiver):
    """Two organizations' endpoints on the receiver, and one delivery each that failed for good (the receiver
    answered 503 to all 3 attempts). The receiver answers 200 again afterwards."""
    ids = {}
    with stack.client() as c:
        for org in ("org-a", "org-b"):
            r = c.post("/v1/webhooks", json={"scope": "organization", "organization_id": org,
                                             "url": receiver.url(f"/{org}"), "events": []})
            assert r.status_code == 201, f"POST /v1/webhooks ({org}): HTTP {r.status_code} {r.text}"
            ids[org] = r.json()["id"]
    time.sleep(0.5)  # the dispatcher loads new endpoints within endpoint_refresh_s (0.2 s)
    receiver.status = 503
    try:
        stack.publish("agent.step.completed", "agent-a1", "org-a", STEP)
        stack.publish("agent.step.completed", "agent-b1", "org-b", STEP)
        failed = {org: _wait_for_deliveries(stack, ids[org], "failed") for org in ids}
    finally:
        receiver.status = 200
    assert receiver.count("/org-a") >= 3, receiver.received
    return {"endpoints": ids, "deliveries": {org: [d["id"] for d in rows] for org, rows in failed.items()}}


def sign_in(page, stack, org: str = "org-a") -> dict:
    """Open a fresh portal link of ``org`` and wait for the endpoints page."""
    session = stack.portal_session(org)
    page.goto(session["url"])
    page.wait_for_url(re.compile(r"/console/endpoints(\?|$)"))
    return session


def unnamed_controls(page) -> list[str]:
    """The controls on the page (closed ``<details>`` opened first) without an accessible name, as HTML."""
    page.evaluate("document.querySelectorAll('details').forEach(d => { d.open = true; })")
    missing = []
    controls = page.locator(CONTROLS)
    assert controls.count() > 0, f"no controls at all on {page.url}"
    for i in range(controls.count()):
        control = controls.nth(i)
        try:
            expect(control).to_have_accessible_name(re.compile(r"\S"), timeout=500)
        except AssertionError:
            missing.append(control.evaluate("e => e.outerHTML.slice(0, 200)"))
    return missing


def test_chromium_opens_the_api(page, stack, console_errors, shot):
    """The tier's own plumbing: Playwright drives the system Chromium against `letta-bus up`."""
    console_errors.allow(r"/favicon\.ico")  # a JSON document has no icon link, so Chromium asks for one (404)
    response = page.goto("/healthz")
    assert response is not None and response.status == 200
    expect(page.locator("body")).to_contain_text('"status":"ok"')
    shot(page, "healthz")


def test_a_portal_link_signs_in_and_shows_only_its_organization(page, stack, world, console_errors, shot):
    sign_in(page, stack, "org-a")
    assert "token" not in page.url, f"the token stayed in the address bar: {page.url}"
    shot(page, "endpoints-org-a")
    own, other = world["endpoints"]["org-a"], world["endpoints"]["org-b"]
    expect(page.locator(f'#endpoints tr[data-endpoint-id="{own}"]')).to_have_count(1)
    expect(page.locator(f'#endpoints tr[data-endpoint-id="{other}"]')).to_have_count(0)
    assert other not in page.content(), f"org-b's endpoint {other} appears on org-a's page"

    page.goto("/console/deliveries")
    expect(page.locator("#deliveries")).to_be_visible()
    shot(page, "deliveries-org-a")
    for delivery_id in world["deliveries"]["org-a"]:
        expect(page.locator(f'#deliveries tr[data-delivery-id="{delivery_id}"]')).to_have_count(1)
    for delivery_id in world["deliveries"]["org-b"]:
        expect(page.locator(f'#deliveries tr[data-delivery-id="{delivery_id}"]')).to_have_count(0)
    # another organization's delivery is not found, not shown
    other_delivery = world["deliveries"]["org-b"][0]
    console_errors.allow(r"status of 404")  # Chromium logs the 404 document as a console error
    response = page.goto(f"/console/deliveries/{other_delivery}")
    assert response is not None and response.status == 404, (response and response.status, page.url)
    expect(page.locator("ol#attempts")).to_have_count(0)
    shot(page, "org-b-delivery-not-found")


def test_retrying_a_failed_delivery_by_keyboard_shows_the_new_attempt_live(page, stack, world, receiver, shot):
    delivery_id = world["deliveries"]["org-a"][0]
    sign_in(page, stack, "org-a")
    page.goto("/console/deliveries")
    link = page.locator(f'#deliveries tr[data-delivery-id="{delivery_id}"] a[href="/console/deliveries/{delivery_id}"]')
    expect(link).to_have_count(1)
    shot(page, "deliveries")
    link.click()
    page.wait_for_url(f"**/console/deliveries/{delivery_id}")
    attempts = page.locator("ol#attempts li[data-attempt-number]")
    expect(attempts).to_have_count(3)  # 3 attempts, every one answered 503
    before = set(attempts.evaluate_all("els => els.map(e => e.dataset.attemptNumber)"))
    retry = page.locator("button#retry")
    expect(retry).to_have_accessible_name("Retry this delivery")
    # the live stream is open before the retry (an attempt written before it opened is only shown on reload)
    page.wait_for_function("() => { const s = document.getElementById('live-status');"
                           " return !s || /live/i.test(s.textContent); }")
    shot(page, "failed-delivery")

    page.evaluate("window.__marker = 'before-retry'")
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
    receiver.status = 200
    sent_before = receiver.count("/org-a")
    # reach the button with Tab as a keyboard user would, then press Enter
    page.locator("body").focus()
    for _ in range(80):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == "retry":
            break
    else:
        pytest.fail("button#retry cannot be reached with the Tab key", pytrace=False)
    shot(page, "retry-focused")
    page.keyboard.press("Enter")

    expect(attempts).to_have_count(len(before) + 1, timeout=15_000)
    numbers = attempts.evaluate_all("els => els.map(e => e.dataset.attemptNumber)")
    new = [n for n in numbers if n not in before]
    assert len(new) == 1, numbers
    item = page.locator(f'ol#attempts li[data-attempt-number="{new[0]}"]')
    expect(item.locator('[data-field="status_code"]')).to_have_text("200")
    expect(page.locator("#delivery-status")).to_have_text("succeeded")
    assert page.evaluate("window.__marker") == "before-retry", "the page was reloaded"
    assert navigations == [], f"the page navigated: {navigations}"
    assert receiver.count("/org-a") > sent_before
    shot(page, "retried-live")


@pytest.mark.parametrize("how", ["expired", "revoked"])
def test_an_expired_or_revoked_link_says_so(page, stack, console_errors, shot, how):
    console_errors.allow(r"status of 401")  # the refused POST /console/session, as Chromium logs every 4xx fetch
    if how == "expired":
        session = stack.portal_session("org-a", ttl=1)
        expires = datetime.fromisoformat(session["expires_at"]).timestamp()
        time.sleep(max(0.0, expires - time.time()) + 1.1)
    else:
        session = stack.portal_session("org-a")
        with stack.client() as c:
            assert c.delete(f"/v1/portal-sessions/{session['id']}").status_code == 204
    page.goto(session["url"])
    error = page.locator("#session-error")
    expect(error).to_be_visible()
    expect(error).to_have_attribute("role", "alert")
    expect(error).to_contain_text(re.compile(r"expired", re.IGNORECASE))
    expect(page.locator("#endpoints")).to_have_count(0)
    assert "token" not in page.url, page.url
    shot(page, f"{how}-link")
    # and the console's pages stay closed to this browser
    page.goto("/console/endpoints")
    expect(page.locator("#endpoints tr[data-endpoint-id]")).to_have_count(0)
    shot(page, f"{how}-then-endpoints")


def test_an_invalid_link_shows_the_session_error(page, stack, console_errors, shot):
    console_errors.allow(r"status of 401")
    page.goto(f"{stack.api}/console/#token=lbp_not-a-real-token")
    error = page.locator("#session-error")
    expect(error).to_be_visible()
    expect(error).to_have_attribute("role", "alert")
    expect(error).to_contain_text(re.compile(r"not valid|expired", re.IGNORECASE))
    shot(page, "invalid-link")


def test_every_control_has_an_accessible_name(page, stack, world, shot):
    sign_in(page, stack, "org-a")
    pages = ["/console/endpoints", "/console/deliveries", f"/console/deliveries/{world['deliveries']['org-a'][0]}",
             f"/console/deliveries?endpoint_id={world['endpoints']['org-a']}"]
    problems = {}
    for path in pages:
        page.goto(path)
        expect(page.locator("main")).to_be_visible()
        missing = unnamed_controls(page)
        shot(page, "a11y-" + path.strip("/").replace("/", "-"))
        if missing:
            problems[path] = missing
    assert not problems, f"controls without an accessible name: {problems}"
