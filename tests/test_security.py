"""Cookies, headers, session fixation and lifetime, token leaks and sign-in rate limits."""

import html
import logging
import os
import re
from datetime import timedelta
from email.utils import parsedate_to_datetime
from types import SimpleNamespace
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest

import auth
import config
import limits
from app import create_app
from conftest import expire_access_token, make_config, migrate_fresh, sign_in, stored_user
from models import UserSession, db, utcnow
from sessions import RESUME_GRACE


def set_cookies(response) -> dict[str, dict]:
    """Parse every Set-Cookie header into {name: {attribute: value}} (flags map to True)."""
    found = {}
    for header in response.headers.getlist("Set-Cookie"):
        name, _, rest = header.partition("=")
        value, *attributes = rest.split(";")
        found[name] = {"value": value} | {k.strip().lower(): (v.strip() if v else True) for k, _, v in (a.partition("=") for a in attributes if a.strip())}
    return found


def get_routes(app) -> list[str]:
    return sorted(rule.rule for rule in app.url_map.iter_rules() if "GET" in rule.methods and not rule.arguments)


@pytest.fixture
def secure_app(app_factory):
    return app_factory(SESSION_COOKIE_SECURE=True)


@pytest.fixture
def https_client(secure_app):
    client = secure_app.test_client()
    client.environ_base["wsgi.url_scheme"] = "https"
    return client


def test_secure_cookies_use_host_prefix_without_domain(secure_app, https_client):
    login = https_client.get("/auth/login")
    flow = set_cookies(login)["__Host-signin"]
    flow_state = parse_qs(urlsplit(login.headers["Location"]).query)["state"][0]
    assert flow["secure"] and flow["httponly"] and flow["path"] == "/" and flow["samesite"] == "Lax"
    assert "domain" not in flow and int(flow["max-age"]) <= 600

    done = sign_in(https_client)
    cookies = set_cookies(done)
    session = cookies["__Host-session"]
    assert session["secure"] and session["httponly"] and session["path"] == "/" and session["samesite"] == "Lax"
    assert "domain" not in session
    # The pre-sign-in state is used up at the callback: the cookie keeps only where it led (for a reload), no verifier.
    with secure_app.test_request_context():
        kept = auth._flow_serializer().loads(cookies["__Host-signin"]["value"])
    (done,) = kept["done"]
    assert set(done) == {"state", "next", "at"}
    assert [f["state"] for f in kept["open"]] == [flow_state]  # only the sign-in started first, never finished
    assert "session" not in cookies and "signin" not in cookies
    assert https_client.get("/api/session").status_code == 200


def test_insecure_mode_for_local_http_drops_prefix_and_secure(client):
    cookies = set_cookies(sign_in(client))
    assert "secure" not in cookies["session"] and cookies["session"]["httponly"]


def test_session_cookie_and_row_expire_no_later_than_the_refresh_token(app, client):
    done = sign_in(client)
    user = stored_user(app)
    expires = parsedate_to_datetime(set_cookies(done)["session"]["expires"])
    # The cookie outlives its session by the resume grace, only to let an ended session resume silently.
    assert abs(expires - (user.refresh_expires_at + RESUME_GRACE)) < timedelta(seconds=5)
    with app.app_context():
        rows = db.session.execute(db.select(UserSession)).scalars().all()
        assert rows and all(row.expires_at <= user.refresh_expires_at for row in rows)


def test_expired_session_row_is_not_honoured(app, client):
    sign_in(client)
    with app.app_context():
        db.session.execute(db.update(UserSession).values(expires_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
    reply = client.get("/api/session")
    assert reply.status_code == 401
    assert reply.get_json()["signed_in"] is False
    # A page does not show the person either: it sends them through the provider again, silently.
    page = client.get("/devices")
    assert page.status_code == 302
    assert urlsplit(page.headers["Location"]).path == "/auth/login"
    # The ended session's cookie stays until the sign-in: it is what lets that sign-in be silent.
    assert "session" not in set_cookies(page)
    login = client.get(page.headers["Location"])
    assert parse_qs(urlsplit(login.headers["Location"]).query)["prompt"] == ["none"]


def test_session_id_is_new_at_every_sign_in(app, client):
    """A browser holding someone else's session (fixation) gets a fresh one of its own at sign-in."""
    sign_in(client, "Mallory")
    planted = client.get_cookie("session").value
    sign_in(client, "Ada Lovelace")
    fresh = client.get_cookie("session").value
    assert fresh != planted
    assert client.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    replay = app.test_client()
    replay.set_cookie("session", planted)
    assert replay.get("/api/session").status_code == 401  # the planted session ended


def test_security_headers_on_every_route(secure_app, https_client):
    sign_in(https_client)
    paths = [*get_routes(secure_app), "/no-such-page", "/static/style.css"]
    for path in paths:
        reply = https_client.get(path)
        assert reply.status_code < 500, path
        headers = reply.headers
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, path
        assert "object-src 'none'" in csp and "base-uri 'none'" in csp, path
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Cross-Origin-Resource-Policy"] == headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Strict-Transport-Security"].startswith("max-age=")
        if not path.startswith("/static/"):
            assert headers["Cache-Control"] == "no-store", path
        reply.close()  # static files are streamed from an open file


def test_no_hsts_over_plain_http(client):
    assert "Strict-Transport-Security" not in client.get("/").headers


def test_viewer_token_and_personal_pages_are_never_cached(app, client):
    sign_in(client)
    for path in ("/api/viewer-token", "/api/session", "/api/profile", "/"):
        assert client.get(path).headers["Cache-Control"] == "no-store", path


def test_tokens_never_reach_logs_urls_pages_or_the_browser(app, client, standin, caplog):
    """Only /api/viewer-token's body may carry a token, and only the viewer one."""
    caplog.set_level(logging.DEBUG)
    seen_tokens: set[str] = set()
    replies = []

    def remember_tokens():
        user = stored_user(app)
        if user is not None:
            seen_tokens.update(t for t in (user.refresh_token, user.access_token) if t)

    def visit(method, path, **kwargs):
        reply = client.open(path, method=method, **kwargs)
        replies.append((path, reply))
        remember_tokens()
        return reply

    login = visit("GET", "/auth/login")
    authorize = urlsplit(login.headers["Location"])
    client.get(authorize.path, query_string=authorize.query)
    consent = client.post(authorize.path, query_string=authorize.query, data={"name": "Ada Lovelace"})
    back = urlsplit(consent.headers["Location"])
    visit("GET", back.path, query_string=back.query)
    for path in get_routes(app):
        visit("GET", path)
    expire_access_token(app)
    visit("GET", "/api/profile")  # a refresh, logged
    standin.inject("5xx")
    expire_access_token(app)
    assert visit("GET", "/").status_code == 503  # an error page during an outage
    visit("GET", "/auth/callback", query_string={"error": "access_denied"})
    visit("GET", "/no-such-page")
    assert len(seen_tokens) >= 4

    viewer = stored_user(app).viewer_token
    for path, reply in replies:
        text = reply.get_data(as_text=True) + str(reply.headers)
        for token in seen_tokens:
            assert token not in text, path
        if path != "/api/viewer-token":
            assert viewer not in text, path
    logs = "\n".join(record.getMessage() for record in caplog.records)
    assert "token_refresh" in logs  # the logs were captured
    for token in [*seen_tokens, viewer]:
        assert token not in logs


def test_rate_limit_per_client_address(app_factory):
    app = app_factory(SIGNIN_RATE_LIMIT="3/minute")
    client = app.test_client()
    assert [client.get("/auth/login").status_code for _ in range(3)] == [302] * 3
    refused = client.get("/auth/login")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "Too many sign-in attempts" in refused.get_data(as_text=True)
    # The callback counts apart, and another address has its own allowance.
    assert client.get("/auth/callback").status_code == 400
    neighbour = app.test_client()
    neighbour.environ_base["REMOTE_ADDR"] = "192.0.2.7"
    assert neighbour.get("/auth/login").status_code == 302
    # Pages other than sign-in are not limited.
    assert all(client.get("/").status_code == 200 for _ in range(5))


def test_rate_limit_on_the_callback(app_factory):
    app = app_factory(SIGNIN_RATE_LIMIT="2/minute")
    client = app.test_client()
    assert [client.get("/auth/callback", query_string={"state": "x", "code": "y"}).status_code for _ in range(3)] == [400, 400, 429]


def test_rate_limit_can_be_switched_off(app_factory):
    client = app_factory(SIGNIN_RATE_LIMIT="off").test_client()
    assert {client.get("/auth/login").status_code for _ in range(40)} == {302}


def test_rate_limit_window_slides(monkeypatch):
    clock = [1000.0]  # the limiter's monotonic clock, moved by the test instead of waited for
    monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    limiter = limits.RateLimiter(2, 0.25)  # sums of quarters and eighths are exact in binary
    assert [limiter.hit("a"), limiter.hit("a")] == [0, 0]
    assert limiter.hit("a") == 0.25
    assert limiter.hit("b") == 0
    clock[0] += 0.125
    assert limiter.hit("a") == 0.125
    clock[0] += 0.125
    assert limiter.hit("a") == 0


@pytest.mark.parametrize(("text", "rate"), [("20/minute", (20, 60)), ("5 / second", (5, 1)), ("100/hour", (100, 3600)), ("off", None), ("", None)])
def test_rate_limit_setting_is_read(text, rate):
    assert limits.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["20", "twenty/minute", "0/minute", "5/fortnight", "-1/second"])
def test_bad_rate_limit_setting_stops_start_up(app_factory, text):
    with pytest.raises(SystemExit, match="SIGNIN_RATE_LIMIT"):
        app_factory(SIGNIN_RATE_LIMIT=text)


def test_pages_need_no_inline_script(app, client):
    """The CSP forbids inline script; make sure no page relies on one (it would silently not run)."""
    sign_in(client)
    for path in get_routes(app):
        reply = client.get(path)
        if reply.mimetype != "text/html":
            continue
        page = reply.get_data(as_text=True)
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page), path
        assert not re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE), path
        assert "javascript:" not in page.lower(), path


def try_again_link(page: str) -> str:
    match = re.search(r'<a class="button primary" href="([^"]*)">Try again</a>', page)
    assert match, page
    return html.unescape(match.group(1))


@pytest.mark.parametrize("path", ["/%5Cevil.example/", "/%09/evil.example", "/%5C%5Cevil.example", "/%0d%0a/evil.example", "/\\evil.example"])
def test_try_again_on_the_503_page_never_leaves_the_site(app, client, standin, path):
    """The link is built from the request's path; browsers read a backslash or a tab-led path as another host."""
    sign_in(client)
    standin.inject("5xx")
    expire_access_token(app)
    reply = client.get(path)
    assert reply.status_code == 503
    link = try_again_link(reply.get_data(as_text=True))
    as_browsers_read_it = re.sub(r"[\t\n\r]", "", link).replace("\\", "/")
    assert as_browsers_read_it.startswith("/") and not as_browsers_read_it.startswith("//"), link
    assert urlsplit(urljoin("http://localhost/", as_browsers_read_it)).netloc == "localhost", link


def test_try_again_on_the_503_page_returns_to_the_same_local_page(app, client, standin):
    sign_in(client)
    standin.inject("5xx")
    expire_access_token(app)
    reply = client.get("/devices?tab=all")
    assert reply.status_code == 503
    assert try_again_link(reply.get_data(as_text=True)) == "/devices?tab=all"


@pytest.fixture
def umask_022():
    """The usual umask, under which new files are readable by everyone unless created otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_development_sqlite_files_are_private(tmp_path, umask_022):
    """The databases hold encrypted tokens and everyone's sessions; SQLite gives -wal and -shm the database's mode."""
    app = create_app(make_config(tmp_path, f"sqlite:///{tmp_path / 'app.sqlite'}"))
    migrate_fresh(app)
    client = app.test_client()
    sign_in(client)
    assert client.get("/api/session").status_code == 200
    files = [path for path in tmp_path.iterdir() if path.name.startswith(("app.sqlite", "standin.sqlite"))]
    assert {path.name for path in files} >= {"app.sqlite", "standin.sqlite"}
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, path.name
    with app.app_context():
        db.engine.dispose()


def test_kept_development_secrets_are_private(tmp_path, umask_022):
    """Secrets kept in the instance folder are the owner's alone, also when an older run left them readable."""
    config.load({}, str(tmp_path / "instance"))
    kept = [tmp_path / "instance" / "secret_key", tmp_path / "instance" / "token_keys"]
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in kept)
    for path in kept:
        path.chmod(0o644)
    again = config.load({}, str(tmp_path / "instance"))
    assert again["SECRET_KEY"] == kept[0].read_text().strip()
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in kept)
