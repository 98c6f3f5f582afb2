"""Back-channel logout end to end: the person signs out at panva's oidc-provider, which POSTs its logout token to the app.

The provider (tests/interop/oidc_provider.mjs) registers the client for back-channel logout with
sid required; the app runs under gunicorn on SQLite and on PostgreSQL; the person signs in and out
through the provider's own pages in Chromium. Nothing here signs a token: oidc-provider does.
"""

import sqlite3
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import requests

from browser_server import VIEWPORT
from conftest import fresh_postgres_database
from oidc_op import CLIENT_ID, CLIENT_SECRET, OidcProvider, stored_tokens
from servers import Gunicorn, free_port, migrate, server_env

pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.browser]


@contextmanager
def database(kind: str, folder: Path):
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'app.sqlite'}"
    else:
        with fresh_postgres_database("signin_backchannel") as url:
            yield url


def query(database_url: str, sql: str) -> list[tuple]:
    """Read the app's database as it stands, under the running server."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            return list(conn.execute(sql))
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return list(conn.execute(sql))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_signing_out_at_the_provider_ends_the_session_here(kind, chromium, tmp_path):
    port = free_port()
    op = OidcProvider(tmp_path, [port], access_ttl=60)
    op.env["BACKCHANNEL_LOGOUT_URI"] = f"http://127.0.0.1:{port}/auth/backchannel-logout"
    op.start()
    try:
        with database(kind, tmp_path) as url:
            settings = {"OAUTH_PROVIDER": "oidc", "OAUTH_CLIENT_ID": CLIENT_ID, "OAUTH_CLIENT_SECRET": CLIENT_SECRET}
            settings |= {"OAUTH_SCOPES": "openid profile email offline_access", "SIGNIN_RATE_LIMIT": "off"}
            env = server_env(tmp_path, url, op.issuer, **settings)
            migrate(env)
            server = Gunicorn(env, port, tmp_path / "gunicorn.log", workers=2).start()
            try:
                sign_in_and_out_at_the_provider(op, server.url, url, chromium)
            finally:
                server.kill()
    finally:
        op.stop()


def sign_in_and_out_at_the_provider(op, app_url: str, database_url: str, chromium) -> None:
    from playwright.sync_api import expect

    context = chromium.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(f"{app_url}/auth/login")
    op.sign_in(page, "logout-person")
    page.wait_for_url(f"{app_url}/")
    expect(page.locator("#person-name")).to_have_text("logout-person")
    browser = requests.Session()
    browser.cookies.set("session", next(c["value"] for c in context.cookies() if c["name"] == "session"))
    assert browser.get(f"{app_url}/api/session", timeout=30).status_code == 200
    ((sid,),) = query(database_url, "SELECT provider_sid FROM user_sessions")
    assert sid, "the ID token's sid was not kept with the session"
    held = stored_tokens(database_url, "logout-person")["refresh_token"]

    # The person signs out at the provider, on its own page; it tells the app server to server.
    page.goto(op.metadata["end_session_endpoint"])
    page.get_by_role("button", name="Yes, sign me out").click()
    page.wait_for_load_state()
    stats = op.stats()
    assert stats.get("backchannel_logouts") == 1, (stats, op.log_path.read_text()[-2000:])
    assert not stats.get("backchannel_errors")

    assert browser.get(f"{app_url}/api/session", timeout=30).status_code == 401
    assert query(database_url, "SELECT refresh_token, access_token FROM users") == [(None, None)]  # the grant is forgotten
    assert query(database_url, "SELECT count(*) FROM user_sessions") == [(0,)]
    assert op.refresh_token_live(held) is False
    page.goto(f"{app_url}/")
    expect(page.get_by_role("main").get_by_role("link", name="Sign in")).to_be_visible()
    context.close()
