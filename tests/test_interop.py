"""The app against real, independently written OpenID providers: oidc-provider (npm) and django-oauth-toolkit (PyPI).

Both are configured strictly (tests/interop/): PKCE required, a new refresh token at every refresh, no
reuse grace, a replayed refresh token revokes the grant, 5-second access tokens, revocation and
introspection on. The app runs under gunicorn (3 workers x 4 threads) with OAUTH_PROVIDER=oidc and the
README's settings for "Any OpenID Connect provider", on SQLite and on PostgreSQL (see SETUPS). People sign in through
each provider's own login and consent pages in Chromium. OBSERVED holds what differs between them; it is
what the README's "Providers" table says.
"""

import time
import uuid
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import requests

from browser_server import VIEWPORT
from conftest import fresh_postgres_database
from oidc_op import CLIENT_ID, CLIENT_SECRET, DjangoOAuthToolkit, OidcProvider, stored_tokens
from servers import Gunicorn, burst, free_port, migrate, server_env

pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.browser]

ACCESS_TTL = 5
# A 5-second token counts as expired 2 s early: a refresh is due 3 s after each one is issued, and a
# burst has 3 s to be served with the fresh token before the next refresh is due.
LEEWAY = 2
# The README's settings for "Any OpenID Connect provider".
OIDC_SCOPES = "openid profile email offline_access"
# The app's ports are chosen up front: a provider must know every redirect URI when it starts.
APP_PORTS = [free_port() for _ in range(12)]

# What the providers do differently, as these tests observe it.
OBSERVED = {
    "oidc-provider": {
        "revocation_in_openid_configuration": True,
        "narrowed_refresh_narrows_the_grant": False,
        "previous_access_token_killed_on_rotation": False,
        "prompt_none": "signs in without a page, but drops offline_access: no refresh token",
    },
    "django-oauth-toolkit": {
        "revocation_in_openid_configuration": False,  # only in its RFC 8414 metadata
        "narrowed_refresh_narrows_the_grant": True,
        "previous_access_token_killed_on_rotation": True,
        # With the validator and view of tests/interop/dot_provider.py; without them, a 500 at its authorize endpoint.
        "prompt_none": "signs in without a page when the person holds its session and approved the client before",
    },
}
PROVIDERS = {"oidc-provider": OidcProvider, "django-oauth-toolkit": DjangoOAuthToolkit}


@pytest.fixture(scope="session")
def providers(tmp_path_factory):
    """Start each provider once, when a test first needs it."""
    started = {}

    def get(name: str):
        if name not in started:
            started[name] = PROVIDERS[name](tmp_path_factory.mktemp(name), APP_PORTS, access_ttl=ACCESS_TTL).start()
        return started[name]

    yield get
    for provider in started.values():
        provider.stop()


# oidc-provider on both databases; django-oauth-toolkit on PostgreSQL, to stay within 3 minutes.
SETUPS = [("oidc-provider", "sqlite"), ("oidc-provider", "postgresql"), ("django-oauth-toolkit", "postgresql")]


@pytest.fixture(scope="module", params=SETUPS, ids=["-".join(setup) for setup in SETUPS])
def setup(request):
    return request.param


@pytest.fixture(scope="module")
def op(setup, providers):
    return providers(setup[0])


class App:
    """One app under gunicorn against the provider, on its own database; restartable on the same port."""

    def __init__(self, folder: Path, database_url: str, op, port: int, **settings: str):
        self.op, self.database_url, self.port, self.url = op, database_url, port, f"http://127.0.0.1:{port}"
        defaults = {
            "OAUTH_PROVIDER": "oidc",
            "OAUTH_CLIENT_ID": CLIENT_ID,
            "OAUTH_CLIENT_SECRET": CLIENT_SECRET,
            "OAUTH_SCOPES": OIDC_SCOPES,
            "TOKEN_REFRESH_LEEWAY": str(LEEWAY),
            # The tests count the refreshes a request makes at the leeway: none may run ahead of it.
            "TOKEN_REFRESH_AHEAD": "0",
            "SIGNIN_RATE_LIMIT": "off",
        }
        self.env = server_env(folder, database_url, op.issuer, **(defaults | settings))
        self.log_path = folder / f"gunicorn-{port}.log"
        migrate(self.env)
        self.server = self.start()

    def start(self) -> Gunicorn:
        self.server = Gunicorn(self.env, self.port, self.log_path).start()
        return self.server

    def stop(self) -> None:
        self.server.stop()

    def kill(self) -> None:
        self.server.kill()


# The apps of each provider and database: the README's settings, the viewer scope in the grant, and the viewer by its own authorization.
APP_KINDS = ("plain", "viewer", "viewer-authorize")


def port_for(op, database_url: str, kind: str) -> int:
    per_provider = 2 * len(APP_KINDS)
    return APP_PORTS[list(PROVIDERS).index(op.name) * per_provider + database_url.startswith("postgresql") * len(APP_KINDS) + APP_KINDS.index(kind)]


@pytest.fixture(scope="module")
def database(setup, tmp_path_factory):
    if setup[1] == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('interop-sqlite') / 'app.sqlite'}"
    else:
        with fresh_postgres_database("signin_interop") as url:
            yield url


@pytest.fixture(scope="module")
def app(op, database, tmp_path_factory):
    """The app exactly as the README says for OIDC (the viewer scope is not in its grant), shared by the tests of one provider and database."""
    app = App(tmp_path_factory.mktemp("interop-app"), database, op, port_for(op, database, "plain"))
    yield app
    app.kill()


@pytest.fixture
def viewer_app(op, database, tmp_path):
    """The app with the viewer scope in its grant, on a database of its own: what it learns about the provider stays there."""
    yield from own_app(op, database, tmp_path, "viewer", OAUTH_SCOPES=f"{OIDC_SCOPES} viewables:read")


@pytest.fixture
def viewer_authorize_app(op, database, tmp_path):
    """The app with the viewer scope in its grant, getting the viewer's token by an authorization of its own, on a database of its own."""
    yield from own_app(op, database, tmp_path, "viewer-authorize", OAUTH_SCOPES=f"{OIDC_SCOPES} viewables:read", OAUTH_VIEWER_TOKEN="authorize")


def own_app(op, database: str, folder: Path, kind: str, **settings: str):
    if database.startswith("sqlite"):
        app = App(folder, f"sqlite:///{folder / f'{kind}.sqlite'}", op, port_for(op, database, kind), **settings)
        yield app
        app.kill()
    else:
        with fresh_postgres_database("signin_interop_viewer") as url:
            app = App(folder, url, op, port_for(op, database, kind), **settings)
            yield app
            app.kill()


def sign_in(chromium, app: App, next_path: str = "/"):
    """Sign a new person in through the provider's own login and consent pages; return the page and an HTTP client with their cookie."""
    from playwright.sync_api import expect

    login = f"person-{uuid.uuid4().hex[:8]}"
    context = chromium.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(f"{app.url}/auth/login?next={next_path}")
    app.op.sign_in(page, login)
    page.wait_for_url(f"{app.url}{next_path}")
    if next_path == "/":
        expect(page.locator("#person-name")).to_have_text(login)
    client = requests.Session()
    client.cookies.set("session", next(c["value"] for c in context.cookies() if c["name"] == "session"))
    client.login = login
    return page, client


def wait_for_expiry(client: requests.Session, app: App) -> None:
    """Sleep until the person's access token enters the leeway: the next request must refresh."""
    expires = datetime.fromisoformat(client.get(f"{app.url}/api/session", timeout=30).json()["access_token_expires_at"])
    time.sleep(max(0.0, expires.timestamp() - LEEWAY - time.time()) + 0.2)


def test_discovery_and_the_endpoints_the_app_uses(op):
    """Revocation is found in the OIDC discovery document, or else in the RFC 8414 metadata."""
    in_openid = "revocation_endpoint" in op.metadata
    assert in_openid is OBSERVED[op.name]["revocation_in_openid_configuration"]
    assert op.metadata_any("revocation_endpoint").startswith(op.issuer)
    assert op.metadata_any("introspection_endpoint").startswith(op.issuer)
    assert "S256" in op.metadata["code_challenge_methods_supported"]


def test_sign_in_userinfo_and_silent_refresh_rotate_at_the_provider(app, chromium):
    op = app.op
    page, client = sign_in(chromium, app)
    page.context.close()
    profile = client.get(f"{app.url}/api/profile", timeout=30).json()
    assert profile["name"] == client.login and profile["email"] == f"{client.login}@example.test"
    before = stored_tokens(app.database_url, client.login)
    refreshes = op.refreshes()

    wait_for_expiry(client, app)
    assert client.get(f"{app.url}/api/profile", timeout=30).json()["name"] == client.login
    after = stored_tokens(app.database_url, client.login)
    assert op.refreshes() == refreshes + 1
    assert after["refresh_token"] != before["refresh_token"]
    assert op.refresh_token_live(before["refresh_token"]) is False  # the used one is dead at the provider
    assert op.refresh_token_live(after["refresh_token"]) is True
    assert op.refresh_token_scope(after["refresh_token"]) >= {"openid", "email", "profile"}


def test_24_concurrent_requests_at_3_expiries_refresh_once_each(app, chromium):
    op = app.op
    page, client = sign_in(chromium, app)
    page.context.close()
    revoked = op.grants_revoked_on_reuse()
    for _ in range(3):
        wait_for_expiry(client, app)
        before = op.refreshes()
        statuses = burst(client, [f"{app.url}/api/profile", f"{app.url}/api/session", f"{app.url}/api/lifecycle"], count=24)
        assert statuses == [200] * 24
        assert op.refreshes() - before == 1
    assert op.grants_revoked_on_reuse() == revoked  # reuse protection never fired
    assert op.refresh_token_live(stored_tokens(app.database_url, client.login)["refresh_token"]) is True


def test_restart_keeps_the_person_signed_in(app, chromium):
    page, client = sign_in(chromium, app)
    page.context.close()
    app.stop()
    app.start()
    assert client.get(f"{app.url}/api/session", timeout=30).json()["user"]["name"] == client.login
    wait_for_expiry(client, app)
    assert client.get(f"{app.url}/api/profile", timeout=30).json()["name"] == client.login


def test_sign_out_revokes_the_refresh_token_at_the_provider(app, chromium):
    from playwright.sync_api import expect

    page, client = sign_in(chromium, app)
    stored = stored_tokens(app.database_url, client.login)
    assert app.op.refresh_token_live(stored["refresh_token"]) is True
    with page.expect_navigation(url=f"{app.url}/"):
        page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("main").get_by_role("link", name="Sign in")).to_be_visible()
    assert app.op.refresh_token_live(stored["refresh_token"]) is False
    assert client.get(f"{app.url}/api/session", timeout=30).status_code == 401
    page.context.close()


def test_viewer_scope_outside_the_grant_is_refused_cleanly_and_the_sign_in_kept(app, chromium):
    """With the README's OIDC scopes the grant has no viewables:read: the provider answers invalid_scope, once."""
    page, client = sign_in(chromium, app)
    page.context.close()
    refreshes = app.op.refreshes()
    for _ in range(3):
        reply = client.get(f"{app.url}/api/viewer-token", timeout=30)
        assert reply.status_code == 403, reply.text
        assert reply.json()["error"] == "provider_refused" and reply.json()["cause"] == "invalid_scope"
    assert app.op.refreshes() == refreshes
    assert client.get(f"{app.url}/api/profile", timeout=30).json()["name"] == client.login


def test_prompt_none(app, chromium):
    """What prompt=none does for a person who holds a session at the provider."""
    from playwright.sync_api import expect

    page, client = sign_in(chromium, app)
    login = page.request.get(f"{app.url}/auth/login", max_redirects=0)
    authorize = urlsplit(login.headers["location"])
    reply = page.goto(urlunsplit(authorize._replace(query=urlencode(dict(parse_qsl(authorize.query)) | {"prompt": "none"}))))
    if app.op.name == "oidc-provider":
        page.wait_for_url(f"{app.url}/auth/callback*")
        assert "error" not in page.url and "no refresh token" in page.content()
    else:
        # Its toolkit issues a refresh token whatever the scope: the person is signed in again, without a page.
        assert reply.ok
        page.wait_for_url(f"{app.url}/")
        expect(page.locator("#person-name")).to_have_text(client.login)
    page.context.close()


def test_viewer_token_at_a_provider_that_keeps_or_narrows_the_grant(viewer_app, chromium):
    """The viewer token is narrowed by a refresh at sign-in; a provider that narrows the whole grant costs one sign-in, then no more viewer tokens."""
    from playwright.sync_api import expect

    app, op = viewer_app, viewer_app.op
    observed = OBSERVED[op.name]
    # Landing where the hook does nothing: the first full refresh is the one this test waits for, however slow the sign-in.
    page, client = sign_in(chromium, app, next_path="/healthz")
    stored = stored_tokens(app.database_url, client.login)
    assert stored["viewer_scope"] == "viewables:read"
    assert op.access_token_live(stored["viewer_token"]) is True
    live = op.access_token_live(stored["access_token"])
    if stored["access_expires_at"].timestamp() > time.time():  # on a slow machine it may simply have expired
        assert live is not observed["previous_access_token_killed_on_rotation"]
    else:
        assert live is False
    narrowed = op.refresh_token_scope(stored["refresh_token"]) == {"viewables:read"}
    assert narrowed is observed["narrowed_refresh_narrows_the_grant"]

    if not narrowed:
        viewer = client.get(f"{app.url}/api/viewer-token", timeout=30).json()
        assert viewer["scope"] == "viewables:read" and viewer["access_token"] == stored["viewer_token"]
        wait_for_expiry(client, app)
        assert client.get(f"{app.url}/api/profile", timeout=30).json()["name"] == client.login
        page.context.close()
        return

    # The next full refresh comes back narrowed: one page says what happened and leads through one sign-in.
    wait_for_expiry(client, app)
    page.goto(f"{app.url}/session")
    expect(page.get_by_role("heading", level=1)).to_have_text("Please sign in again")
    expect(page.get_by_role("main")).to_contain_text("narrowed your whole sign-in")
    narrowed_refreshes = sum(n for outcome, n in op.stats().items() if "narrowed" in outcome)
    page.get_by_role("link", name="Try again").click()
    page.get_by_role("button", name="Authorize").click()  # the provider still knows the person; it asks consent again
    page.wait_for_url(f"{app.url}/session")
    expect(page.get_by_role("heading", level=1)).to_have_text("What keeps you signed in")
    client.cookies.set("session", next(c["value"] for c in page.context.cookies() if c["name"] == "session"))
    wait_for_expiry(client, app)
    assert client.get(f"{app.url}/api/profile", timeout=30).json()["name"] == client.login
    assert op.refresh_token_scope(stored_tokens(app.database_url, client.login)["refresh_token"]) >= {"openid", "profile"}
    assert client.get(f"{app.url}/api/viewer-token", timeout=30).json()["error"] == "viewer_token_off"
    assert sum(n for outcome, n in op.stats().items() if "narrowed" in outcome) == narrowed_refreshes
    page.context.close()


def narrowed_refreshes(op) -> int:
    return sum(n for outcome, n in op.stats().items() if "narrowed" in outcome and isinstance(n, int))


def test_viewer_token_by_its_own_silent_authorization_leaves_the_grant_whole(viewer_authorize_app, chromium):
    """OAUTH_VIEWER_TOKEN=authorize: the viewer page goes through the provider silently for its token; the person's grant keeps its full scope."""
    from playwright.sync_api import expect

    app, op = viewer_authorize_app, viewer_authorize_app.op
    page, client = sign_in(chromium, app)
    full = op.refresh_token_scope(stored_tokens(app.database_url, client.login)["refresh_token"])
    assert full >= {"openid", "profile", "email", "offline_access", "viewables:read"}
    narrowed = narrowed_refreshes(op)

    page.goto(f"{app.url}/viewer")  # no viewer token yet: the page goes through the provider, without a page of its own, and back
    expect(page.locator("#viewer-scope")).to_contain_text("viewables:read")
    assert urlsplit(page.url).path == "/viewer"
    stored = stored_tokens(app.database_url, client.login)
    # openid comes along: OpenID providers honour prompt=none only in an OpenID request, and its ID token names the person.
    assert set(stored["viewer_scope"].split()) == {"openid", "viewables:read"}
    assert set(op.introspect(stored["viewer_token"])["scope"].split()) == {"openid", "viewables:read"}
    first_viewer, first_viewer_refresh = stored["viewer_token"], stored["viewer_refresh_token"]
    # The toolkit issues a refresh token with it anyway (kept, to be revoked when replaced); oidc-provider none without offline_access.
    assert (first_viewer_refresh is not None) == (op.name == "django-oauth-toolkit")
    page.goto(f"{app.url}/")  # leave the viewer page, which would renew its token every few seconds

    for _ in range(2):  # the person's own refreshes keep the whole grant
        wait_for_expiry(client, app)
        assert client.get(f"{app.url}/api/profile", timeout=30).json()["name"] == client.login
        assert op.refresh_token_scope(stored_tokens(app.database_url, client.login)["refresh_token"]) == full

    page.goto(f"{app.url}/viewer")  # the viewer's token has run out by now: through the provider again, for a new one
    expect(page.locator("#viewer-scope")).to_contain_text("viewables:read")
    renewed = stored_tokens(app.database_url, client.login)
    assert renewed["viewer_token"] != first_viewer and op.access_token_live(renewed["viewer_token"]) is True
    if first_viewer_refresh:  # revoked when replaced; the new viewer token, issued with another, lives on
        assert op.refresh_token_live(first_viewer_refresh) is False and op.refresh_token_live(renewed["viewer_refresh_token"]) is True
    assert op.refresh_token_live(renewed["refresh_token"]) is True and op.refresh_token_scope(renewed["refresh_token"]) == full
    assert narrowed_refreshes(op) == narrowed  # no narrowed refresh was ever asked for
    assert client.get(f"{app.url}/api/session", timeout=30).json()["user"]["name"] == client.login
    page.context.close()
