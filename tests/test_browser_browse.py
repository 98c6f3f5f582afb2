"""The hubs browser in a real browser: Debian's Chromium against the app under gunicorn and its stand-in's API.

Access tokens live 65 s and count as expired 60 s early (tests/browser_server.py), so a silent refresh
is due 5 s after each one is issued: the test browses on across one.
"""

import re

import pytest

from browser_server import ROOT, VIEWPORT, LiveServer, sign_in
from standin.store import Store, access_tokens, digest

pytestmark = pytest.mark.browser
OUTPUT = ROOT / "test-output" / "browser"
WAIT_MS = 45_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(tmp_path_factory.mktemp("browse")) as live:
        yield live


@pytest.fixture(scope="module")
def browser(chromium):
    OUTPUT.mkdir(parents=True, exist_ok=True)
    return chromium


def test_person_browses_hubs_by_keyboard_across_a_silent_refresh_and_opens_a_file(server, browser):
    from playwright.sync_api import expect

    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    store = Store(server.env["STANDIN_DATABASE_URL"])
    sub = digest("ada browser")[:24]
    sign_in(page, server.url, "Ada Browser", "/browse")
    tree = page.get_by_role("tree")
    hubs = tree.locator('[role="treeitem"][aria-level="1"]')
    expect(hubs).to_have_count(2)
    expect(hubs.first).to_have_accessible_name("Ada Browser's personal hub")
    expect(page.locator("#browse-status")).to_contain_text("Loaded your hubs: 2 entries.")

    # Keyboard only: Tab reaches the tree's one tab stop, the arrows move and open branches.
    page.get_by_text("Use the arrow keys").click()  # where a person reading the help would be
    page.keyboard.press("Tab")
    expect(hubs.first).to_be_focused()
    page.keyboard.press("ArrowDown")
    company = hubs.nth(1)
    expect(company).to_be_focused()
    page.keyboard.press("ArrowRight")
    expect(company).to_have_attribute("aria-expanded", "true")
    projects = company.locator('[role="treeitem"][aria-level="2"]')
    expect(projects).to_have_count(3)
    page.keyboard.press("ArrowRight")
    expect(projects.first).to_be_focused()
    expect(projects.first).to_have_accessible_name("Harbour Bridge")

    # Let the access token fall due: opening the project now refreshes it silently on the way through.
    refreshes = store.count("refresh", sub)
    page.wait_for_timeout(6000)
    page.keyboard.press("ArrowRight")
    folders = projects.first.locator('[role="treeitem"][aria-level="3"]')
    expect(folders).to_have_count(2)
    assert store.count("refresh", sub) > refreshes, "no silent refresh happened while browsing"

    # The provider revokes the access token early (a sign-out elsewhere): the proxy refreshes once and retries.
    with store.transaction() as conn:
        conn.execute(access_tokens.delete().where(access_tokens.c.sub == sub))
    refreshes = store.count("refresh", sub)
    page.keyboard.press("ArrowRight")
    expect(folders.first).to_be_focused()
    page.keyboard.press("ArrowDown")
    plans = folders.nth(1)
    expect(plans).to_be_focused()
    page.keyboard.press("Enter")
    sheets = plans.locator('[role="treeitem"][aria-level="4"]')
    expect(sheets).to_have_count(12)  # three pages of five, followed by links.next
    expect(sheets.last).to_have_accessible_name("Sheet A-112.dwg")
    assert store.count("refresh", sub) == refreshes + 1

    # A failing API shows an error in place, with a way to try again.
    store.inject("api_5xx")
    page.keyboard.press("ArrowUp")
    project_files = folders.first
    expect(project_files).to_be_focused()
    page.keyboard.press("ArrowRight")
    error = project_files.locator(".tree-error")
    expect(error).to_contain_text("Could not load Project Files")
    expect(page.locator("#browse-status")).to_contain_text("Could not load Project Files")
    error.get_by_role("button", name="Try again").click()
    files = project_files.locator('[role="treeitem"][aria-level="4"]')
    expect(files).to_have_count(3)
    expect(files.first).to_be_focused()
    page.keyboard.press("ArrowLeft")  # "Models" is closed: go up to Project Files
    expect(project_files).to_be_focused()
    page.keyboard.press("ArrowLeft")
    expect(project_files).to_have_attribute("aria-expanded", "false")
    page.keyboard.press("Home")
    expect(hubs.first).to_be_focused()
    page.keyboard.press("End")
    expect(projects.last).to_be_focused()  # the last entry the tree shows: the company's last project
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    expect(sheets.last).to_be_focused()
    page.screenshot(path=OUTPUT / "browse.png")

    # Enter on a file opens it in the viewer page, with its latest version's URN, which names it.
    with page.expect_navigation(url=re.compile(r"/viewer\?urn=[A-Za-z0-9_-]+&project=[A-Za-z0-9._-]+$")):
        page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Viewer token")
    expect(page.locator("#viewer-file")).to_contain_text("Sheet A-112.dwg, version")
    expect(page).to_have_title(re.compile(r"^Sheet A-112\.dwg in the viewer"))

    # Through gunicorn too, encoded slashes and dot segments never reach the API.
    before = store.count("api")
    for path in ("/api/aps/project%2Fv1%2Fhubs", "/api/aps/project/v1/hubs/%2e%2e/projects", "/api/aps/data/v1/projects/a/folders/..%2F..%2Fx/contents"):
        assert page.request.get(server.url + path).status in (400, 404), path
    assert store.count("api") == before
    context.close()


def test_entries_without_links_are_opened_by_the_paths_aps_documents(server, browser):
    """Real APS answers may name no related links: the tree builds the documented paths from the ids instead."""
    import json

    from playwright.sync_api import expect

    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()

    def without_links(route):
        reply = route.fetch()
        body = reply.json()
        for entry in body.get("data", []):
            for relationship in entry.get("relationships", {}).values():
                relationship.pop("links", None)
        route.fulfill(response=reply, body=json.dumps(body))

    page.route("**/api/aps/**", without_links)
    sign_in(page, server.url, "Linda Linkless", "/browse")
    tree = page.get_by_role("tree")
    company = tree.get_by_role("treeitem", name="Stand-in Construction", exact=True)
    company.locator(".tree-label").first.click()
    project = company.get_by_role("treeitem", name="Riverside Clinic", exact=True)
    project.locator(".tree-label").first.click()
    plans = project.get_by_role("treeitem", name="Plans", exact=True)
    plans.locator(".tree-label").first.click()
    expect(plans.locator('[role="treeitem"]')).to_have_count(12)
    context.close()
