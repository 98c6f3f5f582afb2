"""The app against a real, independently written OpenID provider: panva's oidc-provider from npm.

The provider is strict (tests/interop/oidc_provider.mjs): PKCE required, a new refresh token at every
refresh, no reuse grace, a replayed refresh token revokes the whole grant, 5-second access tokens,
revocation and introspection on. The app runs under gunicorn (3 workers x 4 threads) with
OAUTH_PROVIDER=oidc, configured as the README says, on SQLite and on PostgreSQL. People sign in
through the provider's own login and consent pages in Chromium. What these tests observe fills the
README's "Providers" table.
"""

import os
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import requests

from browser_server import CHROMIUM, VIEWPORT, launch_chromium, playwright_session
from conftest import fresh_postgres_database
from oidc_op import CLIENT_ID, CLIENT_SECRET, OidcProvider, stored_tokens
from servers import Gunicorn, free_port, migrate, server_env

pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.browser]

ACCESS_TTL = 5
# A 5-second token counts as expired 2 s early: a refresh is due 3 s after each one is issued.
LEEWAY = 2
# The README's settings for "Any OpenID Connect provider", plus the viewer scope so the viewer token is narrowed from the grant.
OIDC_SCOPES = "openid profile email offline_access"
# The app's ports are chosen up front: the provider must know every redirect URI when it starts.
APP_PORTS = [free_port() for _ in range(4)]


@pytest.fixture(scope="session")
def op(tmp_path_factory):
    provider = OidcProvider(tmp_path_factory.mktemp("oidc-provider"), APP_PORTS, access_ttl=ACCESS_TTL).start()
    yield provider
    provider.stop()


@pytest.fixture(scope="session")
def chromium():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing, and CI must run the interop tests")
        pytest.skip(f"{CHROMIUM} is missing")
    with playwright_session() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


class App:
    """One app under gunicorn against the provider, on its own database; restartable on the same port."""

    def __init__(self, folder: Path, database_url: str, issuer: str, port: int, **settings: str):
        self.database_url, self.port, self.url = database_url, port, f"http://127.0.0.1:{port}"
        defaults = {
            "OAUTH_PROVIDER": "oidc",
            "OAUTH_CLIENT_ID": CLIENT_ID,
            "OAUTH_CLIENT_SECRET": CLIENT_SECRET,
            "OAUTH_SCOPES": OIDC_SCOPES,
            "TOKEN_REFRESH_LEEWAY": str(LEEWAY),
            "SIGNIN_RATE_LIMIT": "off",
        }
        self.env = server_env(folder, database_url, issuer, **(defaults | settings))
        self.log_path = folder / f"gunicorn-{port}.log"
        migrate(self.env)
        self.server = self.start()

    def start(self) -> Gunicorn:
        self.server = Gunicorn(self.env, self.port, self.log_path).start()
        return self.server

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('interop-sqlite') / 'app.sqlite'}"
    else:
        with fresh_postgres_database("signin_interop") as url:
            yield url


@pytest.fixture(scope="module")
def app(database, op, tmp_path_factory):
    """The app configured with the viewer scope in its grant, shared by the tests of one database."""
    port = APP_PORTS[0] if database.startswith("sqlite") else APP_PORTS[1]
    app = App(tmp_path_factory.mktemp("interop-app"), database, op.issuer, port, OAUTH_SCOPES=f"{OIDC_SCOPES} viewables:read")
    yield app
    app.stop()


def sign_in(chromium, app: App, login: str | None = None):
    """Sign a new person in through the provider's own login and consent pages; return the page and an HTTP client with their cookie."""
    from playwright.sync_api import expect

    login = login or f"person-{uuid.uuid4().hex[:8]}"
    context = chromium.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(f"{app.url}/auth/login")
    page.locator('input[name="login"]').fill(login)
    page.locator('input[name="password"]').fill("any password")
    page.get_by_role("button", name="Sign-in").click()
    page.get_by_role("button", name="Continue").click()  # consent, asked because of offline_access
    page.wait_for_url(f"{app.url}/")
    expect(page.locator("#person-name")).to_have_text(login)
    client = requests.Session()
    client.cookies.set("session", next(c["value"] for c in context.cookies() if c["name"] == "session"))
    client.login = login
    return page, client


def wait_for_expiry(client: requests.Session, app: App) -> None:
    """Sleep until the person's access token enters the leeway: the next request must refresh."""
    expires = datetime.fromisoformat(client.get(f"{app.url}/api/session", timeout=30).json()["access_token_expires_at"])
    time.sleep(max(0.0, expires.timestamp() - LEEWAY - time.time()) + 0.2)


def burst(client: requests.Session, urls: list[str], count: int) -> list[int | str]:
    """Send count concurrent requests with the person's cookie, spread over urls; return the statuses."""
    cookies = client.cookies.get_dict()
    statuses: list[int | str] = []
    barrier = threading.Barrier(count)

    def call(url: str) -> None:
        barrier.wait()
        try:
            statuses.append(requests.get(url, cookies=cookies, timeout=60).status_code)
        except requests.RequestException as exc:
            statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=call, args=(urls[i % len(urls)],)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_discovery_finds_every_endpoint_the_app_uses(op):
    """oidc-provider lists revocation and introspection in both discovery documents."""
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        doc = requests.get(op.issuer + path, timeout=10).json()
        assert doc["revocation_endpoint"] == f"{op.issuer}/token/revocation"
        assert doc["introspection_endpoint"] == f"{op.issuer}/token/introspection"
        assert doc["code_challenge_methods_supported"] == ["S256"]


def test_sign_in_userinfo_and_silent_refresh_rotate_at_the_provider(app, op, chromium):
    page, client = sign_in(chromium, app)
    profile = client.get(f"{app.url}/api/profile", timeout=30).json()
    assert profile["sub"] == profile["name"] == client.login
    assert profile["email"] == f"{client.login}@example.test"
    before = stored_tokens(app.database_url, client.login)
    refreshes = op.stats()["refresh"]

    wait_for_expiry(client, app)
    assert client.get(f"{app.url}/api/profile", timeout=30).json()["sub"] == client.login
    after = stored_tokens(app.database_url, client.login)
    assert op.stats()["refresh"] == refreshes + 1
    assert after["refresh_token"] != before["refresh_token"]
    assert op.introspect(before["refresh_token"]) == {"active": False}  # the used one is dead at the provider
    rotated = op.introspect(after["refresh_token"])
    assert rotated["active"] is True and rotated["client_id"] == CLIENT_ID
    assert set(rotated["scope"].split()) >= set(OIDC_SCOPES.split())
    page.context.close()


def test_24_concurrent_requests_at_3_expiries_refresh_once_each(app, op, chromium):
    page, client = sign_in(chromium, app)
    page.context.close()
    start = op.stats()
    for _ in range(3):
        wait_for_expiry(client, app)
        before = op.stats()["refresh"]
        statuses = burst(client, [f"{app.url}/api/profile", f"{app.url}/api/session", f"{app.url}/api/lifecycle"], count=24)
        assert statuses == [200] * 24
        assert op.stats()["refresh"] - before == 1
    end = op.stats()
    assert end["grant_revoked"] == start["grant_revoked"]  # reuse protection never fired
    assert end["grant_errors"] == start["grant_errors"]


def test_restart_keeps_the_person_signed_in(app, op, chromium):
    page, client = sign_in(chromium, app)
    page.context.close()
    app.stop()
    app.start()
    assert client.get(f"{app.url}/api/session", timeout=30).json()["user"]["name"] == client.login
    wait_for_expiry(client, app)
    assert client.get(f"{app.url}/api/profile", timeout=30).json()["sub"] == client.login


def test_sign_out_revokes_the_grant_at_the_provider(app, op, chromium):
    from playwright.sync_api import expect

    page, client = sign_in(chromium, app)
    stored = stored_tokens(app.database_url, client.login)
    assert op.introspect(stored["refresh_token"])["active"] is True
    with page.expect_navigation(url=f"{app.url}/"):
        page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("main").get_by_role("link", name="Sign in")).to_be_visible()
    assert op.introspect(stored["refresh_token"]) == {"active": False}
    assert op.introspect(stored["access_token"]) == {"active": False}  # oidc-provider ends the whole grant
    assert client.get(f"{app.url}/api/session", timeout=30).status_code == 401
    page.context.close()


def test_viewer_token_is_narrowed_and_the_grant_keeps_its_scope(app, op, chromium):
    page, client = sign_in(chromium, app)
    page.context.close()
    # Fetched at sign-in by a narrowed refresh, which rotated the refresh token.
    stored = stored_tokens(app.database_url, client.login)
    viewer = client.get(f"{app.url}/api/viewer-token", timeout=30).json()
    assert viewer["scope"] == "viewables:read" and viewer["access_token"] == stored["viewer_token"]
    seen = op.introspect(viewer["access_token"])
    assert seen["active"] is True and seen["scope"] == "viewables:read"
    # The access token issued at sign-in survived that rotation: oidc-provider does not kill it.
    assert op.introspect(stored["access_token"])["active"] is True
    # The rotated refresh token still carries the whole grant (RFC 6749 §6), so full refreshes keep working.
    assert set(op.introspect(stored["refresh_token"])["scope"].split()) >= set(OIDC_SCOPES.split()) | {"viewables:read"}
    wait_for_expiry(client, app)
    assert client.get(f"{app.url}/api/profile", timeout=30).json()["sub"] == client.login


def test_prompt_none_without_consent_drops_offline_access(app, op, chromium):
    """oidc-provider grants no refresh token to prompt=none (offline_access needs prompt=consent): the app says so and signs nobody in."""
    page, client = sign_in(chromium, app)
    # The browser holds the provider's session; ask it to sign the person in again without any page.
    login = page.request.get(f"{app.url}/auth/login", max_redirects=0)
    authorize = urlsplit(login.headers["location"])
    page.goto(urlunsplit(authorize._replace(query=urlencode(dict(parse_qsl(authorize.query)) | {"prompt": "none"}))))
    page.wait_for_url(f"{app.url}/auth/callback*")
    assert "no refresh token" in page.content()
    page.context.close()


@pytest.fixture
def refusing_app(database, op, tmp_path_factory):
    """The app exactly as the README says for OIDC: the viewer scope is not part of the grant."""
    port = APP_PORTS[2] if database.startswith("sqlite") else APP_PORTS[3]
    app = App(tmp_path_factory.mktemp("interop-refusing"), database, op.issuer, port)
    yield app
    app.stop()


def test_refused_viewer_scope_is_a_clear_refusal_and_keeps_the_sign_in(refusing_app, op, chromium):
    app = refusing_app
    page, client = sign_in(chromium, app)
    page.context.close()
    refreshes = op.stats()["refresh"]
    for _ in range(3):
        reply = client.get(f"{app.url}/api/viewer-token", timeout=30)
        assert reply.status_code == 403, reply.text
        assert reply.json()["error"] == "provider_refused" and reply.json()["cause"] == "invalid_scope"
    assert op.stats()["refresh"] == refreshes
    assert op.stats()["grant_errors"].get("invalid_scope: refresh token missing requested scope", 0) >= 1
    assert client.get(f"{app.url}/api/profile", timeout=30).json()["sub"] == client.login
