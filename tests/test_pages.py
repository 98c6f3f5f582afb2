"""The pages a person sees: home, the session timeline, devices, the viewer demo, and the strict CSP."""

import base64
import json
import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

import sessions
from conftest import expire_access_token, sign_in, stored_user
from models import User, UserSession, db, utcnow
from pages import describe_agent

FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0"
PHONE = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36"
PAGES = {"/session": "What keeps you signed in", "/devices": "Your devices", "/viewer": "Viewer token"}
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def csrf_from(reply) -> str:
    value = re.search(r'name="csrf_token" value="([0-9a-f]+)"', reply.get_data(as_text=True))
    assert value, "page has no CSRF token"
    return value.group(1)


def device(app, user_agent: str, name: str = "Ada Lovelace"):
    """Sign the person in from a new browser that sends this User-Agent."""
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = user_agent
    assert sign_in(client, name).status_code == 302
    return client


def session_hashes(app) -> dict[str, str]:
    with app.app_context():
        return {s.user_agent: s.id_hash for s in db.session.execute(select(UserSession)).scalars()}


def test_home_signed_out_explains_and_offers_sign_in(client):
    html = client.get("/").get_data(as_text=True)
    assert "Stay signed in for weeks" in html
    assert re.search(r'<a class="button primary big" href="/auth/login">Sign in</a>', html)
    assert "Sign out" not in html


def test_home_signed_in_shows_person_links_and_sign_out_form(client):
    sign_in(client, "Grace Hopper")
    html = client.get("/").get_data(as_text=True)
    assert '<span id="person-name">Grace Hopper</span>' in html
    assert "gracehopper@standin.example" in html
    for path in PAGES:
        assert f'href="{path}"' in html
    form = re.search(r'<form method="post" action="/auth/logout"[^>]*>(.*?)</form>', html, re.S)
    assert form is not None
    assert re.search(r'name="csrf_token" value="[0-9a-f]{64}"', form.group(1))
    assert '<button type="submit">Sign out</button>' in form.group(1)


@pytest.mark.parametrize("path", PAGES)
def test_pages_send_a_signed_out_person_through_sign_in_and_back(client, path):
    reply = client.get(path)
    assert reply.status_code == 302
    location = urlsplit(reply.headers["Location"])
    assert location.path == "/auth/login"
    assert parse_qs(location.query)["next"] == [path]
    assert sign_in(client, next_path=path).headers["Location"] == path
    assert client.get(path).status_code == 200


@pytest.mark.parametrize(("path", "heading"), PAGES.items())
def test_pages_render_for_a_signed_in_person(client, path, heading):
    sign_in(client)
    reply = client.get(path)
    html = reply.get_data(as_text=True)
    assert reply.status_code == 200
    assert f"<h1>{heading}</h1>" in html
    assert '<main id="main"' in html and '<nav aria-label="Main">' in html
    assert re.search(rf'<a href="{path}" aria-current="page">', html)


def test_lifecycle_json_answers_401_when_signed_out(client):
    reply = client.get("/api/lifecycle")
    assert reply.status_code == 401
    assert reply.get_json()["signed_in"] is False


def test_lifecycle_json_shows_a_silent_refresh_and_never_a_token(app, client):
    sign_in(client)
    first = client.get("/api/lifecycle").get_json()
    before = stored_user(app)
    assert first["refresh"]["rotations"] == before.refresh_rotations
    assert first["access"]["expires_in"] > 3000
    assert first["access"]["refresh_in"] == pytest.approx(first["access"]["expires_in"] - 60, abs=1)
    assert first["viewer"]["scope"] == "viewables:read"

    expire_access_token(app)
    second = client.get("/api/lifecycle").get_json()
    after = stored_user(app)
    # This very poll found the access token due and refreshed it: the answer shows that refresh.
    assert second["refresh"]["rotations"] == first["refresh"]["rotations"] + 1
    newest = second["refreshes"][0]
    assert newest["id"] not in {e["id"] for e in first["refreshes"]}
    assert (newest["kind"], newest["outcome"], newest["trigger"]) == ("access", "refreshed", "GET /api/lifecycle")
    assert second["access"]["issued_ago"] < 60 < second["access"]["refresh_in"]
    assert second["refresh"]["age"] < 60

    text = json.dumps([first, second])
    for user in (before, after):
        for token in (user.access_token, user.refresh_token, user.viewer_token):
            assert token and token not in text
    assert after.refresh_token != before.refresh_token


def test_session_page_shows_the_refresh_its_own_load_caused(app, client):
    sign_in(client)
    expire_access_token(app)
    html = client.get("/session").get_data(as_text=True)
    assert '<code class="breakable"><span>GET</span> <span>/</span><wbr><span>session</span></code>' in html
    assert 'data-url="/api/lifecycle"' in html
    assert '<script src="/static/lifecycle.js" defer></script>' in html
    # This page's refresh; the viewer token's refresh at sign-in was part of the sign-in.
    assert re.search(r'<span id="rotations">1</span> <span id="rotations-word">refresh</span>', html)


def test_devices_lists_each_browser_and_marks_this_one(app):
    device(app, PHONE)
    laptop = device(app, FIREFOX)
    html = laptop.get("/devices").get_data(as_text=True)
    items = re.findall(r'<li class="device[^"]*">(.*?)</li>', html, re.S)
    assert len(items) == 2
    this = [item for item in items if '<span class="badge">This device</span>' in item]
    assert len(this) == 1 and "Firefox 133 on Windows" in this[0]
    assert any("Chrome 131 on Android" in item for item in items)
    assert html.count(">Sign out this device</button>") == 2
    assert f'name="session" value="{session_hashes(app)[PHONE]}"' in html
    assert 'action="/auth/logout-everywhere"' in html


def test_sign_out_this_device_ends_only_that_session(app):
    phone = device(app, PHONE)
    laptop = device(app, FIREFOX)
    tablet = device(app, "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) Version/17.0 Mobile/15E148 Safari/604.1")
    hashes = session_hashes(app)
    csrf = csrf_from(laptop.get("/devices"))
    reply = laptop.post("/auth/sessions/end", data={"session": hashes[PHONE], "next": "/devices", "csrf_token": csrf})
    assert reply.status_code == 302 and reply.headers["Location"] == "/devices"
    assert phone.get("/api/session").status_code == 401
    assert laptop.get("/api/session").status_code == 200
    assert tablet.get("/api/session").status_code == 200
    assert PHONE not in session_hashes(app)
    assert "Chrome 131 on Android" not in laptop.get("/devices").get_data(as_text=True)
    # The shared grant was not touched: the remaining devices still refresh.
    expire_access_token(app)
    assert tablet.get("/api/profile").status_code == 200
    assert laptop.get("/api/profile").status_code == 200


def test_sign_out_form_posted_the_way_browsers_send_it_works(client):
    """Under Referrer-Policy: no-referrer, Chromium posts same-origin forms with "Origin: null"."""
    sign_in(client)
    csrf = csrf_from(client.get("/"))
    reply = client.post("/auth/logout", data={"csrf_token": csrf}, headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert reply.status_code == 302 and reply.headers["Location"] == "/"
    assert client.get("/api/session").status_code == 401


def test_device_sign_out_needs_the_pages_csrf_token(app):
    phone = device(app, PHONE)
    laptop = device(app, FIREFOX)
    reply = laptop.post("/auth/sessions/end", data={"session": session_hashes(app)[PHONE], "next": "/devices", "csrf_token": "0" * 64})
    assert reply.status_code == 403
    assert phone.get("/api/session").status_code == 200


def test_sign_out_everywhere_from_the_devices_page(app):
    phone = device(app, PHONE)
    laptop = device(app, FIREFOX)
    csrf = csrf_from(laptop.get("/devices"))
    reply = laptop.post("/auth/logout-everywhere", data={"csrf_token": csrf})
    assert reply.status_code == 302 and reply.headers["Location"] == "/"
    assert phone.get("/api/session").status_code == 401
    assert laptop.get("/api/session").status_code == 401
    assert "Stay signed in for weeks" in laptop.get("/").get_data(as_text=True)
    assert stored_user(app).refresh_token is None


def test_viewer_page_with_the_standin_uses_its_own_script_only(client):
    sign_in(client)
    reply = client.get("/viewer")
    html = reply.get_data(as_text=True)
    assert 'data-url="/api/viewer-token"' in html and 'data-leeway="60"' in html
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/format.js" defer>', '<script src="/static/viewer.js" defer>']
    assert "autodesk.com" not in reply.headers["Content-Security-Policy"]


def test_viewer_page_relaxes_the_csp_only_there_for_the_aps_viewer(app_factory):
    app = app_factory(OAUTH_PROVIDER="autodesk", OAUTH_ISSUER="https://developer.api.autodesk.com", OAUTH_CLIENT_ID="aps-id", OAUTH_CLIENT_SECRET="aps-secret")
    client = app.test_client()
    with app.test_request_context():
        # A person already signed in with a fresh token: no call to Autodesk is needed to show the page.
        now = utcnow()
        user = User(subject="aps-sub", name="Ada", email="ada@example.com", access_token="a", access_expires_at=now + timedelta(hours=1), signed_in_at=now)
        user.refresh_token, user.refresh_expires_at = "r", now + timedelta(days=15)
        db.session.add(user)
        db.session.flush()
        cookie = sessions.start(user)
        db.session.commit()
    client.set_cookie("session", cookie)
    viewer = client.get("/viewer")
    csp = viewer.headers["Content-Security-Policy"]
    assert viewer.status_code == 200
    assert "script-src 'self' https://developer.api.autodesk.com;" in csp
    assert "'unsafe-eval'" not in csp and "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
    assert '<script src="https://developer.api.autodesk.com/modelderivative/v2/viewers/7.*/viewer3D.min.js">' in viewer.get_data(as_text=True)
    for path in ("/", "/session", "/devices"):
        assert "autodesk" not in client.get(path).headers["Content-Security-Policy"]


@pytest.mark.parametrize("path", ["/", "/session", "/devices", "/viewer", "/no-such-page"])
def test_every_page_is_served_under_the_strict_csp(client, path):
    sign_in(client)
    reply = client.get(path)
    csp = reply.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "object-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe" not in csp and "script-src" not in csp and "style-src" not in csp
    html = reply.get_data(as_text=True)
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert re.fullmatch(r'<script src="/static/[a-z]+\.js" defer>', tag)


def test_templates_have_no_inline_script_style_or_handlers():
    templates = list(TEMPLATES.rglob("*.html"))
    assert len(templates) >= 6
    for path in templates:
        html = path.read_text()
        for tag in re.findall(r"<script\b[^>]*>", html):
            assert "src=" in tag, f"inline script in {path.name}"
        assert "<style" not in html, path.name
        assert not re.search(r"\sstyle=", html), path.name
        assert not re.search(r"\son[a-z]+=", html, re.I), path.name
        assert "javascript:" not in html, path.name


def test_callback_error_page_is_friendly_and_offers_try_again(client):
    reply = client.get("/auth/callback", query_string={"error": "access_denied"})
    html = reply.get_data(as_text=True)
    assert reply.status_code == 400
    assert '<a class="button primary" href="/auth/login">Try again</a>' in html
    assert '<main id="main"' in html and "Back to the home page" in html


def test_provider_down_page_keeps_session_and_offers_try_again(app, client, standin):
    sign_in(client)
    standin.inject("5xx")
    expire_access_token(app)
    reply = client.get("/devices?tab=2")
    assert reply.status_code == 503
    assert '<a class="button primary" href="/devices?tab=2">Try again</a>' in reply.get_data(as_text=True)
    assert client.get("/devices?tab=2").status_code == 200


@pytest.mark.parametrize(
    ("agent", "described"),
    [
        (FIREFOX, "Firefox 133 on Windows"),
        (PHONE, "Chrome 131 on Android"),
        ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15", "Safari 17 on macOS"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0", "Edge 131 on Windows"),
        ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/140.0.0.0 Safari/537.36", "Headless Chrome 140 on Linux"),
        ("curl/8.5.0", "curl 8"),
        ("", "Unknown browser"),
    ],
)
def test_describe_agent_names_browser_and_system(agent, described):
    assert describe_agent(agent) == described


def test_browse_page_needs_a_sign_in_and_runs_no_inline_script(client):
    assert client.get("/browse").headers["Location"].startswith("/auth/login?next=/browse")
    sign_in(client)
    page = client.get("/browse")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert 'role="tree"' in html and 'data-api="/api/aps/"' in html and 'data-upstream="http://localhost/standin"' in html
    assert "<script>" not in html and "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'self' only
    assert 'href="/browse" aria-current="page"' in html


def test_favicon_is_served_and_linked(client):
    with client.get("/favicon.ico") as icon:  # a file sent from disk: closed when read
        assert icon.status_code == 200
        assert icon.mimetype in ("image/vnd.microsoft.icon", "image/x-icon")
        assert icon.data[:4] == b"\x00\x00\x01\x00"  # an ICO file
        assert "no-store" not in icon.headers.get("Cache-Control", "")
    assert '<link rel="icon" href="/favicon.ico"' in client.get("/").get_data(as_text=True)


def test_timeline_legend_names_the_viewer_token_bars(client):
    sign_in(client)
    html = client.get("/session").get_data(as_text=True)
    assert '<span class="key key-viewer">viewer token valid</span>' in html


def test_viewer_refreshes_name_their_method_like_access_refreshes(app, client):
    sign_in(client)
    expire_access_token(app, field="viewer_expires_at")
    assert client.get("/api/viewer-token").status_code == 200
    viewer = [e["trigger"] for e in client.get("/api/lifecycle").get_json()["refreshes"] if e["kind"] == "viewer"]
    assert viewer == ["GET /api/viewer-token", "GET /auth/callback (sign-in)"]


def test_the_rotation_right_after_sign_in_is_named_as_the_viewer_tokens(app, client):
    sign_in(client)
    life = client.get("/api/lifecycle").get_json()
    assert life["refresh"]["rotations"] == 1
    assert life["refresh"]["refreshes_here"] == 0
    assert '<span id="rotations">0</span> <span id="rotations-word">refreshes</span>' in client.get("/session").get_data(as_text=True)
    assert life["refresh"]["last_rotation"] == "Last: the viewer token's refresh at sign-in."
    assert '<p class="small" id="last-rotation">Last: the viewer token&#39;s refresh at sign-in.</p>' in client.get("/session").get_data(as_text=True)
    expire_access_token(app)
    assert client.get("/api/lifecycle").get_json()["refresh"]["last_rotation"] == "Last: the access token's refresh, by GET /api/lifecycle."


def test_the_silent_refresh_count_never_drops_when_another_device_signs_in(app):
    """The card counts what it says, silent refreshes since this device signed in: another device's sign-in adds none, takes none away."""
    laptop = device(app, FIREFOX)
    assert laptop.get("/api/lifecycle").get_json()["refresh"]["refreshes_here"] == 0  # the viewer token's refresh was part of the sign-in
    for count in (1, 2):
        expire_access_token(app)
        assert laptop.get("/api/lifecycle").get_json()["refresh"]["refreshes_here"] == count
    device(app, PHONE)  # a new refresh token for the person, and a viewer refresh at that sign-in
    assert laptop.get("/api/lifecycle").get_json()["refresh"]["refreshes_here"] == 2
    assert re.search(r'<span id="rotations">2</span> <span id="rotations-word">refreshes</span>', laptop.get("/session").get_data(as_text=True))


def test_a_sign_in_on_another_device_is_said_to_be_there(app):
    laptop = device(app, FIREFOX)
    with app.app_context():
        db.session.execute(db.update(UserSession).values(created_at=utcnow() - timedelta(minutes=5)))
        db.session.commit()
    phone = device(app, PHONE)
    seen = laptop.get("/api/lifecycle").get_json()
    assert seen["signed_in_elsewhere"] is True
    assert seen["signed_in_ago"] < 60 and seen["here_signed_in_ago"] >= 300
    assert ", on another device; this one signed in 5 min" in laptop.get("/session").get_data(as_text=True)
    assert phone.get("/api/lifecycle").get_json()["signed_in_elsewhere"] is False


def test_signed_out_everywhere_is_told_so_at_home_and_on_every_page_after(app):
    """The home page says what happened; Back to a page shows the app's own notice, never the provider's form."""
    phone = device(app, PHONE)
    laptop = device(app, FIREFOX)
    csrf = csrf_from(laptop.get("/devices"))
    assert laptop.post("/auth/logout-everywhere", data={"csrf_token": csrf}).headers["Location"] == "/"
    home = laptop.get("/").get_data(as_text=True)
    assert "You signed out everywhere" in home and ">Sign in again</a>" in home
    back = laptop.get("/session")
    assert back.status_code == 401 and "Location" not in back.headers
    html = back.get_data(as_text=True)
    assert "You signed out everywhere" in html
    assert '<a class="button primary" href="/auth/login?next=/session">Sign in again</a>' in html
    # The other device, reloading a page, learns why too, on this app's page; later pages keep saying so.
    for attempt in range(2):
        reply = phone.get("/devices")
        assert reply.status_code == 401 and "Location" not in reply.headers, attempt
        assert "signed out from another of your devices" in reply.get_data(as_text=True)
    assert "signed out from another of your devices" in phone.get("/").get_data(as_text=True)


def test_signed_out_here_is_told_so_and_sign_in_again_clears_the_notice(client):
    sign_in(client)
    csrf = csrf_from(client.get("/"))
    client.post("/auth/logout", data={"csrf_token": csrf})
    assert "You signed out on this browser" in client.get("/viewer").get_data(as_text=True)
    assert sign_in(client, next_path="/viewer").status_code == 302
    assert client.get("/viewer").status_code == 200
    client.post("/auth/logout", data={"csrf_token": csrf_from(client.get("/"))})
    login = client.get("/auth/login?next=/session")  # the person chose to sign in again: the notice is gone
    assert login.status_code == 302
    assert client.get("/session").status_code == 302


def test_a_cookie_this_app_never_issued_is_simply_signed_out(client):
    client.set_cookie("session", "forged.value")
    reply = client.get("/session")
    assert reply.status_code == 302 and reply.headers["Location"].startswith("/auth/login")
    assert "You are signed out" not in client.get("/").get_data(as_text=True)


def viewer_link(subject: str, name: str, project_title: str, filename: str) -> tuple[str, str, int]:
    """Return the urn and project id the hubs browser links a file's latest version with, and that version's number."""
    from standin.data import tree

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    projects = [p for hub in tree(subject, name) for p in hub.children if p.name == project_title]
    item = next(n for n in walk(projects[0].children) if n.name == filename)
    version_id = item.id.replace("dm.lineage:", "fs.file:vf.") + f"?version={item.versions}"
    return base64.urlsafe_b64encode(version_id.encode()).rstrip(b"=").decode(), projects[0].id, item.versions


def test_viewer_opened_from_the_hubs_names_the_file_and_its_version(app, client):
    sign_in(client, "Ada Lovelace")
    urn, project, version = viewer_link(stored_user(app).subject, "Ada Lovelace", "Harbour Bridge", "Harbour Bridge Structure.rvt")
    reply = client.get(f"/viewer?urn={urn}&project={project}")
    html = reply.get_data(as_text=True)
    assert reply.status_code == 200
    assert re.search(rf"<strong>Harbour Bridge Structure.rvt</strong>, version {version}\b", html)
    assert "<title>Harbour Bridge Structure.rvt in the viewer" in html
    # Without the project the version is still named from the URN itself.
    assert f"a file this app could not name, version {version}" in client.get(f"/viewer?urn={urn}").get_data(as_text=True)
    assert 'id="viewer-file"' not in client.get("/viewer").get_data(as_text=True)


@pytest.mark.parametrize(
    "query",
    [
        "urn=",
        "urn=not%20base64",
        "urn=" + base64.urlsafe_b64encode(b"<script>alert(1)</script>").decode().rstrip("="),
        "urn=" + base64.urlsafe_b64encode(b"\xff\xfe").decode().rstrip("="),
        "urn=QQ",  # "A"
        "urn=" + "A" * 801,
        "urn=" + base64.urlsafe_b64encode(b"urn:adsk.wipprod:fs.file:vf.x?version=1").decode().rstrip("=") + "&project=../../x",
    ],
)
def test_viewer_link_with_a_malformed_urn_or_project_is_a_clear_400(client, query):
    sign_in(client)
    reply = client.get(f"/viewer?{query}")
    assert reply.status_code == 400
    assert "open the file again from Your hubs" in reply.get_data(as_text=True)
