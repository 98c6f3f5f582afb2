"""A person in a real browser: Debian's Chromium, driven by Playwright, against the app under gunicorn.

The server's access tokens live 65 s and count as expired 60 s early, so a silent refresh is due
5 s after each one is issued: the tests watch refreshes happen instead of faking expiry.
Screenshots of every page land in test-output/browser/.
"""

import os
import re
import time

import pytest

from browser_server import ROOT, VIEWPORT, LiveServer, axe_findings, sign_in

pytestmark = pytest.mark.browser
OUTPUT = ROOT / "test-output" / "browser"
PHONE = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36"
# Generous: the machine may be busy, and a refresh is only due 5 s after the last one.
WAIT_MS = 45_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(tmp_path_factory.mktemp("browser")) as live:
        yield live


@pytest.fixture(scope="module")
def browser(chromium):
    OUTPUT.mkdir(parents=True, exist_ok=True)
    return chromium


def new_page(browser, **options):
    context = browser.new_context(**({"viewport": VIEWPORT} | options))
    context.set_default_timeout(WAIT_MS)
    return context.new_page()


def shot(page, name: str) -> None:
    page.screenshot(path=OUTPUT / f"{name}.png")


def test_person_watches_a_silent_refresh_and_stays_signed_in_across_browser_restarts(server, browser):
    from playwright.sync_api import expect

    page = new_page(browser)
    page.goto(server.url + "/")
    sign_in_link = page.get_by_role("main").get_by_role("link", name="Sign in")
    expect(sign_in_link).to_be_visible()
    page.keyboard.press("Tab")  # keyboard users first meet the skip link
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    shot(page, "home-signed-out")

    # Sign in through the stand-in's page: type a name, click "Sign in".
    sign_in_link.click()
    expect(page.get_by_text("Stand-in provider.")).to_be_visible()
    shot(page, "standin-sign-in")
    page.get_by_label("Your name").fill("Ada Lovelace")
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url(server.url + "/")
    expect(page.locator("#person-name")).to_have_text("Ada Lovelace")
    shot(page, "home-signed-in")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Session", exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("What keeps you signed in")
    # Record every value the refresh countdown shows, to see it run down to zero.
    page.evaluate(
        """() => {
          const el = document.getElementById("refresh-countdown");
          window.seenCountdown = [el.textContent];
          new MutationObserver(() => window.seenCountdown.push(el.textContent)).observe(el, {childList: true, characterData: true, subtree: true});
        }"""
    )
    expect(page.locator("#rotations")).to_have_text(re.compile(r"^\d+$"))
    rotations = int(page.locator("#rotations").inner_text())

    status = page.locator("#live-status")
    expect(status).to_contain_text("Silently refreshed your access token", timeout=WAIT_MS)
    expect(status).to_contain_text("triggered by GET /api/lifecycle")
    assert int(page.locator("#rotations").inner_text()) > rotations
    seen = page.evaluate("window.seenCountdown")
    assert any(text in ("in 0 s", "in 1 s", "due now") for text in seen), seen
    newest = page.locator("#refreshes tr").first
    expect(newest).to_contain_text("refreshed")
    expect(newest).to_contain_text("GET /api/lifecycle")
    # The picture: a bar with its refresh zone and a "now" line, and a dot per refresh.
    expect(page.locator("#track-access rect.zone")).to_have_count(1)
    expect(page.locator("#track-access line.now")).to_have_count(1)
    assert page.locator("#track-events circle.event").count() >= 1
    shot(page, "session")

    # Close the browser, open a new one with the saved cookies: still signed in.
    state = page.context.storage_state()
    page.context.close()
    cookie = next(c for c in state["cookies"] if c["name"] == "session")
    assert cookie["httpOnly"] and cookie["expires"] > time.time() + 14 * 86400  # kept on disk, not a browser-session cookie
    page = new_page(browser, storage_state=state)
    page.goto(server.url + "/session")
    expect(page.get_by_role("heading", level=1)).to_have_text("What keeps you signed in")
    page.goto(server.url + "/")
    expect(page.locator("#person-name")).to_have_text("Ada Lovelace")

    with page.expect_navigation(url=server.url + "/"):
        page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("main").get_by_role("link", name="Sign in")).to_be_visible()
    expect(page.locator("#person-name")).to_have_count(0)
    shot(page, "home-after-sign-out")
    page.context.close()


def test_viewer_page_shows_the_narrow_token_and_renews_it(server, browser):
    from playwright.sync_api import expect

    page = new_page(browser)
    sign_in(page, server.url, "Katherine Johnson", next_path="/viewer")
    expect(page.locator("#viewer-scope")).to_have_text("viewables:read")
    first = page.locator("#viewer-token").inner_text()
    assert re.fullmatch(r".{8}…", first)
    expect(page.locator("#viewer-countdown")).to_have_text(re.compile(r"^\d+ s$|^1 min \d+ s$"))
    expect(page.locator("#viewer-renewals")).to_have_text("1", timeout=WAIT_MS)
    assert page.locator("#viewer-token").inner_text() != first
    expect(page.locator("#viewer-log tr")).to_have_count(2)
    expect(page.locator("#viewer-status")).to_contain_text("Renewed the viewer token")
    # The page shows the token only truncated.
    current = page.request.get(server.url + "/api/viewer-token").json()
    assert current["scope"] == "viewables:read"
    assert current["access_token"] not in page.content()
    shot(page, "viewer")

    # A failed sign-in (here: the person cancelled at the provider) gets a friendly page with a way back to where it led.
    page.goto(server.url + "/auth/login?next=/viewer")
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("The provider did not sign you in.")
    expect(page.get_by_role("link", name="Try again")).to_have_attribute("href", "/auth/login?next=/viewer")
    shot(page, "error-callback")
    page.context.close()


def test_two_devices_keep_working_after_expiry_and_one_ends_the_other(server, browser):
    from playwright.sync_api import expect

    laptop = new_page(browser)
    phone = new_page(browser, user_agent=PHONE)
    sign_in(laptop, server.url, "Grace Hopper", next_path="/session")
    # The second sign-in replaces the person's one refresh token at the provider (strict mode):
    # the laptop must keep working on the shared, stored one.
    sign_in(phone, server.url, "Grace Hopper", next_path="/session")
    for page in (laptop, phone):
        status = page.locator("#live-status")
        expect(status).to_contain_text("Silently refreshed", timeout=WAIT_MS)
    laptop.goto(server.url + "/")
    expect(laptop.locator("#person-name")).to_have_text("Grace Hopper")

    phone.goto(server.url + "/session")  # keeps polling while the laptop signs it out
    laptop.goto(server.url + "/devices")
    devices = laptop.locator("li.device")
    expect(devices).to_have_count(2)
    expect(laptop.locator("li.this-device")).to_contain_text("on Linux")
    other = laptop.locator("li.device", has_text="Chrome 131 on Android")
    expect(other.locator(".badge")).to_have_count(0)
    shot(laptop, "devices")
    with laptop.expect_navigation(url=server.url + "/devices"):
        other.get_by_role("button", name="Sign out this device").focus()
        laptop.keyboard.press("Enter")  # by keyboard, as a person without a mouse would
    expect(devices).to_have_count(1)
    expect(laptop.locator("li.this-device")).to_have_count(1)

    # The phone's open page notices at its next poll, and the phone is signed out.
    expect(phone.locator("#live-status")).to_contain_text("You are signed out here", timeout=WAIT_MS)
    # The header agrees with the banner: no name, no Sign out, a way to sign in again.
    header = phone.get_by_role("banner")
    expect(header.get_by_role("button", name="Sign out")).to_have_count(0)
    expect(header.locator(".who")).to_have_count(0)
    expect(header.get_by_role("link", name="Sign in")).to_have_attribute("href", "/auth/login?next=%2Fsession")
    shot(phone, "session-signed-out")
    phone.goto(server.url + "/")
    expect(phone.get_by_role("main").get_by_role("link", name="Sign in")).to_be_visible()
    # The laptop is not: it still refreshes on the person's shared grant.
    laptop.goto(server.url + "/session")
    expect(laptop.locator("#live-status")).to_contain_text("Silently refreshed", timeout=WAIT_MS)
    laptop.context.close()
    phone.context.close()


def _app_db(server, sql: str, *params) -> None:
    """Change the app's own SQLite database under the running server, as time passing would."""
    import sqlite3

    with sqlite3.connect(server.folder / "app.sqlite") as conn:
        if "cookie_expires_at" in sql and "cookie_expires_at" not in {row[1] for row in conn.execute("PRAGMA table_info(user_sessions)")}:
            return  # a schema without the sliding cookie: nothing to rewrite
        conn.execute(sql, params)


def _stamp(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")  # how SQLAlchemy keeps a UTC datetime in SQLite


def test_dead_grant_resumes_silently_on_the_same_page(server, browser):
    """The refresh token is killed at the provider: the next page load lands on the same page, signed in, no form."""
    from playwright.sync_api import expect

    from standin.store import Store, digest, refresh_tokens

    page = new_page(browser)
    sign_in(page, server.url, "Silent Sam", "/devices")
    store = Store(server.env["STANDIN_DATABASE_URL"])
    with store.transaction() as conn:
        conn.execute(refresh_tokens.update().where(refresh_tokens.c.sub == digest("silent sam")[:24]).values(status="revoked"))
    _app_db(server, "UPDATE users SET access_expires_at = '2000-01-01 00:00:00.000000' WHERE name = ?", "Silent Sam")
    authorize = []
    page.on("response", lambda r: authorize.append(r.status) if "/authentication/v2/authorize" in r.url else None)

    page.goto(server.url + "/session?from=bookmark")
    page.wait_for_url(server.url + "/session?from=bookmark")
    expect(page.get_by_role("heading", level=1)).to_have_text("What keeps you signed in")
    assert page.request.get(server.url + "/api/session").json()["user"]["name"] == "Silent Sam"
    assert authorize == [302]  # through the provider once, which answered without showing its form
    expect(page.get_by_label("Your name")).to_have_count(0)
    shot(page, "silent-re-sign-in")


def test_cookie_expiry_follows_the_rotations(server, browser):
    """A cookie set 14 days ago is re-issued when a rotation moves the session on: no sign-out on day 15."""
    from datetime import UTC, datetime, timedelta

    from playwright.sync_api import expect

    page = new_page(browser)
    sign_in(page, server.url, "Daily Dora", "/")
    # Fourteen days later: the session, the grant and the cookie all end tomorrow.
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "session"]
    page.context.add_cookies([cookie | {"expires": (tomorrow + timedelta(days=30)).timestamp()}])
    _app_db(server, "UPDATE users SET refresh_expires_at = ?, access_expires_at = '2000-01-01 00:00:00.000000' WHERE name = ?", _stamp(tomorrow), "Daily Dora")
    _app_db(server, "UPDATE user_sessions SET expires_at = ? WHERE user_id = (SELECT id FROM users WHERE name = ?)", _stamp(tomorrow), "Daily Dora")
    _app_db(
        server, "UPDATE user_sessions SET cookie_expires_at = expires_at WHERE 'cookie_expires_at' IN (SELECT name FROM pragma_table_info('user_sessions'))"
    )

    page.goto(server.url + "/session")  # the access token is due: this load rotates the refresh token
    expect(page.get_by_role("heading", level=1)).to_have_text("What keeps you signed in")
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "session"]
    days_left = (cookie["expires"] - datetime.now(UTC).timestamp()) / 86400
    assert days_left > 44, f"the cookie still ends in {days_left:.1f} days"  # 15 days of grant + 30 of resume grace


def test_every_page_has_no_serious_or_critical_accessibility_findings(server, browser):
    """axe-core on every page, signed out and signed in, light and on a phone: nothing serious or critical."""
    from browser_server import AXE

    if not AXE.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{AXE} is missing: run npm ci in tests/a11y (.ci/run does)")
        pytest.skip(f"{AXE} is missing: run npm ci in tests/a11y")
    findings = []
    for options in ({}, {"viewport": {"width": 390, "height": 844}, "user_agent": PHONE, "is_mobile": True}):
        page = new_page(browser, bypass_csp=True, **options)
        for path in ("/", "/auth/callback?error=access_denied", "/auth/callback?state=x&code=y", "/no-such-page", "/auth/logout", "/auth/login?next=/session"):
            page.goto(server.url + path)  # the last one is the stand-in's sign-in page
            page.wait_for_load_state("networkidle")
            findings.extend(axe_findings(page))
        page.get_by_label("Your name").fill("Alice Access")
        page.get_by_role("button", name="Sign in", exact=True).click()
        page.wait_for_url(server.url + "/session")
        for path in ("/session", "/devices", "/viewer", "/browse", "/", "/auth/logout", "/no-such-page"):
            page.goto(server.url + path)
            page.wait_for_load_state("networkidle")
            findings.extend(axe_findings(page))
        # Signed out on purpose: the home page and every page after say so.
        page.goto(server.url + "/devices")
        page.get_by_role("button", name="Sign out everywhere").click()
        page.wait_for_url(server.url + "/")
        findings.extend(axe_findings(page))
        page.goto(server.url + "/session")
        findings.extend(axe_findings(page))
        page.context.close()
    assert not findings, "\n".join(findings)


def test_times_are_the_browsers_own_with_the_zone_named(server, browser):
    from playwright.sync_api import expect

    page = new_page(browser, timezone_id="Asia/Kolkata", locale="en-GB")
    sign_in(page, server.url, "Zoned Zara", "/devices")
    expect(page.locator("li.this-device time").first).to_contain_text("GMT+5:30")
    page.goto(server.url + "/session")
    expect(page.locator("#access-expires")).to_contain_text("GMT+5:30")
    expect(page.locator("#refreshes time, #refreshes td").first).to_contain_text("GMT+5:30")
    expect(page.locator("#last-checked")).to_contain_text("GMT+5:30")
    page.context.close()


PHONE_VIEW = {"viewport": {"width": 390, "height": 844}, "user_agent": PHONE, "is_mobile": True}
# The header's height, the page's width against the viewport's, and any word of a <code> that the browser split across lines.
LAYOUT = """() => {
  const header = document.querySelector("header.site");
  const split = [];
  for (const code of document.querySelectorAll("code")) {
    const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const found of node.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, found.index);
        range.setEnd(node, found.index + found[0].length);
        if (range.getClientRects().length > 1) split.push(found[0]);
      }
    }
  }
  return {header: header ? header.getBoundingClientRect().height : 0, width: document.documentElement.scrollWidth, viewport: window.innerWidth, split};
}"""


def assert_fits(page, desktop_header: float) -> None:
    layout = page.evaluate(LAYOUT)
    assert layout["width"] <= layout["viewport"], (page.url, layout)
    assert layout["header"] <= 2 * desktop_header, (page.url, layout, desktop_header)
    assert not layout["split"], (page.url, layout["split"])


def test_on_a_phone_pages_fit_the_header_keeps_to_two_rows_and_tokens_stay_whole(server, browser):
    from playwright.sync_api import expect

    name = "Philippa Phone-Fitting"  # long enough to crowd the header
    desktop = new_page(browser)
    sign_in(desktop, server.url, name, "/session")
    desktop_header = desktop.evaluate(LAYOUT)["header"]
    expect(desktop.locator(".scroll-cue").first).to_be_hidden()  # the table fits: no cue
    phone = new_page(browser, **PHONE_VIEW)
    phone.goto(server.url + "/")
    assert_fits(phone, desktop_header)
    sign_in(phone, server.url, name, "/session")
    for path in ("/", "/session", "/devices", "/viewer", "/browse", "/auth/logout", "/no-such-page", "/auth/login?next=/session"):
        phone.goto(server.url + path)  # the last one is the stand-in's sign-in page: signed in, it goes straight back
        phone.wait_for_load_state("networkidle")
        assert_fits(phone, desktop_header)
    # The session table is wider than the phone: it scrolls, and the line above it names the columns out of sight.
    phone.goto(server.url + "/session")
    cue = phone.locator(".scroll-cue").first
    expect(cue).to_be_visible()
    expect(cue).to_contain_text("Waited, Took")
    shot(phone, "session-phone-table")
    phone.locator(".table-wrap").first.evaluate("wrap => wrap.scrollTo(wrap.scrollWidth, 0)")
    expect(cue).not_to_contain_text("Took")
    desktop.context.close()
    phone.context.close()


def test_signed_out_everywhere_is_told_so_and_back_never_reaches_the_provider(server, browser):
    from playwright.sync_api import expect

    from signout import REASONS

    laptop = new_page(browser)
    phone = new_page(browser, **PHONE_VIEW)
    sign_in(laptop, server.url, "Sam Signout", "/devices")
    sign_in(phone, server.url, "Sam Signout", "/devices")
    laptop.reload()
    laptop.get_by_role("button", name="Sign out everywhere").click()
    laptop.wait_for_url(server.url + "/")
    expect(laptop.locator("#signed-out-reason")).to_have_text(REASONS["everywhere"])
    expect(laptop.get_by_role("main").get_by_role("link", name="Sign in again")).to_be_visible()
    # Back goes to the page the person left, which now says they are signed out: not the provider's form.
    laptop.go_back()
    expect(laptop).to_have_url(server.url + "/devices")
    expect(laptop.get_by_role("heading", level=1)).to_have_text("You are signed out")
    expect(laptop.locator("#signed-out-reason")).to_have_text(REASONS["everywhere"])
    shot(laptop, "signed-out-everywhere")

    # The other device, reloading its page, is told on the app's own page too, and signs in only when it asks to.
    phone.reload()
    expect(phone).to_have_url(server.url + "/devices")
    expect(phone.locator("#signed-out-reason")).to_have_text(REASONS["elsewhere"])
    assert_fits(phone, laptop.evaluate(LAYOUT)["header"])
    shot(phone, "signed-out-elsewhere-phone")
    phone.get_by_role("link", name="Sign in again").click()
    phone.get_by_label("Your name").fill("Sam Signout")
    phone.get_by_role("button", name="Sign in", exact=True).click()
    phone.wait_for_url(server.url + "/devices")
    expect(phone.get_by_role("heading", level=1)).to_have_text("Your devices")
    laptop.context.close()
    phone.context.close()
