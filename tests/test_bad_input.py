"""Bad input, one case per test: each gets a clear 4xx (503 for a provider outage), never a 500,
and the signed-in person's session and stored refresh token survive every one of them."""

import re
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from itsdangerous import Signer, TimestampSigner, URLSafeTimedSerializer
from sqlalchemy.exc import IntegrityError

from conftest import callback_params, sign_in, stored_user
from models import User, UserSession, db, utcnow
from redirects import safe_next

SECRET = "test-secret"  # conftest's SECRET_KEY


@dataclass
class Ctx:
    app: object
    ada: object  # the signed-in person's browser
    standin: object
    ada_cookie: str
    ada_sessions: set[str]

    def browser(self):
        return self.app.test_client()


def session_hashes(app) -> set[str]:
    with app.app_context():
        return set(db.session.execute(db.select(UserSession.id_hash)).scalars())


def start_flow(client, name: str = "Mallory") -> tuple[str, dict]:
    """Sign in up to the provider's redirect back; return the callback path and its parameters."""
    login = client.get("/auth/login")
    authorize = urlsplit(login.headers["Location"])
    consent = client.post(authorize.path, query_string=authorize.query, data={"name": name})
    back = consent.headers["Location"]
    return urlsplit(back).path, callback_params(back)


def flow_cookie(state: str, *, age: int = 0, key: str = SECRET) -> str:
    """Make a pre-sign-in cookie as auth.login does, optionally `age` seconds old."""

    class Aged(TimestampSigner):
        def get_timestamp(self) -> int:
            return super().get_timestamp() - age

    serializer = URLSafeTimedSerializer(key, salt="sign-in-flow", signer=Aged)
    return serializer.dumps({"state": state, "verifier": secrets.token_urlsafe(64), "next": "/"})


def session_cookie(key: str = SECRET) -> str:
    return Signer(key, salt="session-id").sign(secrets.token_urlsafe(32)).decode()


def with_session_cookie(ctx: Ctx, value: str):
    client = ctx.browser()
    client.set_cookie("session", value)
    return client.get("/api/session")


def expired_session(ctx: Ctx):
    bob = ctx.browser()
    sign_in(bob, "Bob")
    with ctx.app.app_context():
        own = db.select(UserSession.user_id).where(UserSession.id_hash.not_in(ctx.ada_sessions))
        db.session.execute(db.update(UserSession).where(UserSession.user_id.in_(own)).values(expires_at=utcnow()))
        db.session.commit()
    return bob.get("/api/session")


def callback_with(ctx: Ctx, change: dict | None = None, drop: str | None = None, cookie: str | None = None, client=None):
    """Run a real flow as Mallory in another browser, then call back with the parameters altered."""
    client = client or ctx.browser()
    path, params = start_flow(client)
    params |= change or {}
    if drop:
        params.pop(drop)
    if cookie is not None:
        client.set_cookie("signin", cookie)
    return client.get(path, query_string=params)


def replayed_callback(ctx: Ctx):
    client = ctx.browser()
    path, params = start_flow(client)
    old_cookie = client.get_cookie("signin").value
    assert client.get(path, query_string=params).status_code == 302  # Mallory signed in once
    client.set_cookie("signin", old_cookie)  # the attacker resends the used pre-sign-in cookie
    return client.get(path, query_string=params)


def foreign_code_into_signed_in_browser(ctx: Ctx):
    """Login CSRF: Mallory's callback link opened in Ada's browser must not sign Ada in as Mallory."""
    path, params = start_flow(ctx.browser())
    ctx.ada.get("/auth/login")  # even with a sign-in of her own under way
    reply = ctx.ada.get(path, query_string=params)
    assert ctx.ada.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    return reply


def failed_exchange(kind: str, delay: float = 0.0):
    def case(ctx: Ctx):
        client = ctx.browser()
        path, params = start_flow(client)
        ctx.standin.inject(kind, delay=delay)
        return client.get(path, query_string=params)

    return case


def callback_elsewhere(ctx: Ctx):
    """The callback link opened in a browser that did not start this sign-in."""
    path, params = start_flow(ctx.browser())
    return ctx.browser().get(path, query_string=params)


def expired_flow(ctx: Ctx):
    client = ctx.browser()
    client.set_cookie("signin", flow_cookie("s", age=601))
    return client.get("/auth/callback", query_string={"state": "s", "code": "c"})


def huge_cookie(ctx: Ctx):
    """A cookie of another app on this host grew too big: refused, and fine again once it is gone."""
    for i in range(3):
        ctx.ada.set_cookie(f"junk{i}", "x" * 3500)
    try:
        return ctx.ada.get("/api/session")
    finally:
        for i in range(3):
            ctx.ada.delete_cookie(f"junk{i}")


def tamper(value: str) -> str:
    return value[:-2] + ("AA" if not value.endswith("AA") else "BB")


def oversize_post(ctx: Ctx):
    return ctx.ada.post("/auth/logout", data={"csrf_token": "x", "filler": "a" * 600_000})


CASES = {
    # Session cookies: the person is simply signed out (401 from the API), nothing else happens.
    "tampered session cookie": (lambda c: with_session_cookie(c, tamper(c.ada_cookie)), 401),
    "truncated session cookie": (lambda c: with_session_cookie(c, c.ada_cookie[:-6]), 401),
    "oversized session cookie": (lambda c: with_session_cookie(c, c.ada_cookie + "A" * 400), 401),
    "session cookie signed with another key": (lambda c: with_session_cookie(c, session_cookie("another-key")), 401),
    "unknown session id": (lambda c: with_session_cookie(c, session_cookie()), 401),
    "unsigned session cookie": (lambda c: with_session_cookie(c, secrets.token_urlsafe(32)), 401),
    "expired session": (expired_session, 401),
    "cookie header too large": (huge_cookie, 431),
    # The pre-sign-in state.
    "forged state": (lambda c: callback_with(c, {"state": secrets.token_urlsafe(32)}), 400),
    "missing state": (lambda c: callback_with(c, drop="state"), 400),
    "non-ascii state": (lambda c: callback_with(c, {"state": "é" * 43}), 400),
    "missing pre-sign-in cookie": (lambda c: callback_elsewhere(c), 400),
    "tampered pre-sign-in cookie": (lambda c: callback_with(c, cookie=flow_cookie("x")[:-3] + "abc"), 400),
    "pre-sign-in cookie signed with another key": (lambda c: callback_with(c, cookie=flow_cookie("x", key="another-key")), 400),
    "expired pre-sign-in cookie": (expired_flow, 400),
    "oversized pre-sign-in cookie": (lambda c: callback_with(c, cookie=flow_cookie("x") + "A" * 2000), 400),
    "replayed callback": (replayed_callback, 400),
    "code for another browser's state": (foreign_code_into_signed_in_browser, 400),
    "provider error": (lambda c: callback_with(c, {"error": "access_denied", "error_description": "Call +1 555 0100 now"}, drop="code"), 400),
    "provider error without a sign-in": (lambda c: c.browser().get("/auth/callback?error=server_error"), 400),
    "issuer mix-up": (lambda c: callback_with(c, {"iss": "https://evil.example"}), 400),
    "missing code": (lambda c: callback_with(c, drop="code"), 400),
    "unknown code": (lambda c: callback_with(c, {"code": secrets.token_urlsafe(32)}), 400),
    # The code exchange fails at the provider.
    "exchange invalid_grant": (failed_exchange("invalid_grant"), 400),
    "exchange 5xx": (failed_exchange("5xx"), 503),
    "exchange timeout": (failed_exchange("timeout", delay=3.0), 503),
    "exchange reply lost": (failed_exchange("drop"), 503),
    # Sizes and methods.
    "oversize query string": (lambda c: c.ada.get("/", query_string={"q": "x" * 5000}), 414),
    "oversize callback query string": (lambda c: callback_with(c, {"state": "s" * 5000}), 414),
    "oversize header": (lambda c: c.ada.get("/", headers={"X-Padding": "x" * 9000}), 431),
    "too many header bytes": (lambda c: c.ada.get("/", headers={f"X-Padding-{i}": "x" * 8000 for i in range(5)}), 431),
    "oversize form": (oversize_post, 413),
    "unsupported method": (lambda c: c.ada.put("/api/session"), 405),
    "unknown device session": (lambda c: c.ada.post("/auth/sessions/end", data={"session": "0" * 64, "csrf_token": csrf(c)}), 404),
}


def csrf(ctx: Ctx) -> str:
    return re.search(r'name="csrf_token" value="([0-9a-f]{64})"', ctx.ada.get("/").get_data(as_text=True)).group(1)


@pytest.fixture
def ctx(app, client, standin):
    sign_in(client)
    return Ctx(app, client, standin, client.get_cookie("session").value, session_hashes(app))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_clear_answer_and_loses_nothing(ctx, case):
    attempt, expected = CASES[case]
    before = stored_user(ctx.app)
    reply = attempt(ctx)
    assert reply.status_code == expected, (reply.status_code, reply.get_data(as_text=True)[:500])
    body = reply.get_data(as_text=True)
    if reply.is_json:
        assert reply.get_json()["error"]
    else:
        assert "<h1" in body and "Traceback" not in body
    assert "555 0100" not in body  # the provider's free text is not echoed
    # Nothing was lost: the person is still signed in, with the same refresh token and sessions.
    assert ctx.ada.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    after = stored_user(ctx.app)
    assert after.refresh_token == before.refresh_token
    assert ctx.ada_sessions <= session_hashes(ctx.app)


def test_foreign_callback_leaves_this_browsers_own_sign_in_usable(app):
    victim, attacker = app.test_client(), app.test_client()
    path, params = start_flow(attacker)
    login = victim.get("/auth/login")
    assert victim.get(path, query_string=params).status_code == 400
    authorize = urlsplit(login.headers["Location"])
    consent = victim.post(authorize.path, query_string=authorize.query, data={"name": "Grace Hopper"})
    back = urlsplit(consent.headers["Location"])
    assert victim.get(back.path, query_string=back.query).status_code == 302
    assert victim.get("/api/session").get_json()["user"]["name"] == "Grace Hopper"


def test_head_and_options_on_every_route(app, client):
    sign_in(client)
    before = stored_user(app)
    stranger = app.test_client()
    rules = [rule for rule in app.url_map.iter_rules()]
    assert len(rules) >= 8
    for rule in rules:
        path = rule.rule.replace("<path:filename>", "style.css").replace("<path:path>", "project/v1/hubs")
        assert "<" not in path, f"no sample value for {rule.rule}"
        for browser in (client, stranger):
            options = browser.options(path)
            assert options.status_code == 200, (path, options.status_code)
            assert "OPTIONS" in options.headers["Allow"]
            head = browser.head(path)
            # A path may have a rule per method (GET /auth/logout shows the form that POSTs to it).
            expected_head = any("GET" in other.methods for other in rules if other.rule == rule.rule)
            assert head.status_code < 500, (path, head.status_code)
            assert (head.status_code != 405) == expected_head, (path, head.status_code)
            assert head.data == b""
            head.close()
    assert client.get("/api/session").status_code == 200
    assert stored_user(app).refresh_token == before.refresh_token


NEXT_VARIANTS = [
    "//evil.example",
    "///evil.example",
    "/\\evil.example",
    "\\/evil.example",
    "\\\\evil.example",
    "https://evil.example",
    "http:/evil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "data:text/html,hi",
    "%2F%2Fevil.example",
    "/%2Fevil.example",
    "/%5Cevil.example",
    "%5C%5Cevil.example",
    "%252F%252Fevil.example",
    "/%252Fevil.example",
    "/%25252F%25252Fevil.example",
    "/\tevil",
    "/%09/evil.example",
    "/\r\nSet-Cookie: x=1",
    "/%0d%0aSet-Cookie:%20x=1",
    "/\x00evil",
    "/\x7f",
    "evil.example",
    "",
    "/" + "a" * 600,
    " //evil.example",
]


@pytest.mark.parametrize("value", NEXT_VARIANTS)
def test_open_redirect_variants_go_home(value):
    assert safe_next(value) == "/"


@pytest.mark.parametrize("value", ["/", "/api/session", "/devices?tab=2#top", "/a/b%20c", "/search?q=//x"])
def test_local_paths_are_kept(value):
    assert safe_next(value) == value


def test_sign_in_with_evil_next_lands_home(client):
    assert sign_in(client, next_path="//evil.example/steal").headers["Location"] == "/"


def test_sign_in_with_local_next_lands_there(client):
    assert sign_in(client, next_path="/api/session?x=1").headers["Location"] == "/api/session?x=1"


APS = "https://aps.example"  # an APS-like provider reached over real HTTP, answered by `responses`
TOKEN_URL = f"{APS}/authentication/v2/token"
GRANT = {"access_token": "at-1", "token_type": "Bearer", "expires_in": 3599, "refresh_token": "rt-1", "scope": "data:read"}


@pytest.fixture
def http_provider(app_factory):
    """An app talking HTTP to an APS-like provider, with Ada signed in through it."""
    app = app_factory(OAUTH_PROVIDER="autodesk", OAUTH_ISSUER=APS, OAUTH_REDIRECT_URI="http://localhost/auth/callback")
    ada = app.test_client()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as provider:
        provider.post(TOKEN_URL, json=GRANT)
        provider.post(TOKEN_URL, json=GRANT | {"access_token": "viewer-1", "refresh_token": "rt-2"})
        provider.get(f"{APS}/userinfo", json={"sub": "ada", "name": "Ada Lovelace", "email": "ada@example.com"})
        assert http_callback(ada, "good-code").status_code == 302
    return app, ada


def http_callback(client, code: str):
    location = urlsplit(client.get("/auth/login").headers["Location"])
    assert location.netloc == "aps.example"
    return client.get("/auth/callback", query_string={"code": code, "state": callback_params(location.geturl())["state"]})


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ({"body": "<html>Bad gateway</html>", "status": 200, "content_type": "text/html"}, 503),
        ({"body": "<html>Bad request</html>", "status": 400, "content_type": "text/html"}, 503),
        ({"json": ["not", "an", "object"]}, 503),
        ({"json": {"token_type": "Bearer", "expires_in": 3599}}, 503),  # no access_token at all
        ({"json": {k: v for k, v in GRANT.items() if k != "refresh_token"}}, 400),
        ({"json": {"error": "invalid_client"}, "status": 401}, 400),
        ({"json": {"error": "slow_down"}, "status": 429}, 503),
    ],
    ids=["html 200", "html 400", "json array", "no access_token", "no refresh_token", "invalid_client", "429"],
)
def test_unusable_code_exchange_reply_gets_a_clear_answer(http_provider, reply, expected):
    app, ada = http_provider
    before = stored_user(app)
    with responses.RequestsMock() as provider:
        provider.post(TOKEN_URL, **reply)
        failed = http_callback(app.test_client(), "some-code")
    assert failed.status_code == expected
    assert "<h1" in failed.get_data(as_text=True)
    assert ada.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    assert stored_user(app).refresh_token == before.refresh_token == "rt-2"


REVOKE_URL = f"{APS}/authentication/v2/revoke"
FRESH_GRANT = GRANT | {"access_token": "at-bad", "refresh_token": "rt-bad"}


def callback_with_userinfo(app, body: str):
    """Sign a new browser in through the APS-like provider, whose userinfo answers body (raw JSON text)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as provider:
        provider.post(TOKEN_URL, json=FRESH_GRANT)
        provider.post(TOKEN_URL, json=FRESH_GRANT | {"access_token": "viewer-bad", "refresh_token": "rt-bad-2"})
        provider.get(f"{APS}/userinfo", body=body, content_type="application/json")
        provider.post(REVOKE_URL, body="")
        reply = http_callback(app.test_client(), "another-code")
        revoked = {parse_qs(call.request.body)["token"][0] for call in provider.calls if call.request.url == REVOKE_URL}
    return reply, revoked


@pytest.mark.parametrize(
    "body",
    [
        r'{"sub": "mallory\u0000", "name": "Mallory", "email": "m@example.com"}',
        r'{"sub": "mallory\ud800", "name": "Mallory", "email": "m@example.com"}',
        r'{"sub": "mallory\nadmin", "name": "Mallory", "email": "m@example.com"}',
        '{"sub": "' + "m" * 256 + '", "name": "Mallory", "email": "m@example.com"}',
        '{"sub": "", "name": "Mallory", "email": "m@example.com"}',
        '{"name": "Mallory", "email": "m@example.com"}',
    ],
    ids=["NUL", "lone surrogate", "newline", "256 characters", "empty", "missing"],
)
def test_unstorable_subject_is_refused_and_its_grant_revoked(http_provider, caplog, body):
    """The subject is the person's identity: altering it could merge two people, so such a sign-in is refused."""
    app, ada = http_provider
    reply, revoked = callback_with_userinfo(app, body)
    assert reply.status_code == 400
    assert "<h1" in reply.get_data(as_text=True)
    assert revoked == {"rt-bad", "at-bad"}  # nothing of the grant we do not keep stays alive
    with app.app_context():
        assert db.session.execute(db.select(db.func.count()).select_from(User)).scalar_one() == 1
    assert ada.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("body", "name", "email"),
    [
        (r'{"sub": "grace", "name": "Grace\u0000 Hopper", "email": "grace\u0000@example.com"}', "Grace Hopper", "grace@example.com"),
        (r'{"sub": "grace", "name": "Grace \ud800Hopper\u001b[2J", "email": "grace@example.com\udfff"}', "Grace Hopper[2J", "grace@example.com"),
        ('{"sub": "grace", "name": "' + "G" * 300 + '", "email": null}', "G" * 255, ""),
        ('{"sub": 1234, "name": ["Grace"], "email": {"x": 1}}', "", ""),
    ],
    ids=["NUL", "lone surrogates and escape", "300 characters", "not text"],
)
def test_unstorable_name_and_email_are_cleaned(http_provider, caplog, body, name, email):
    """Name and email are only shown: the person signs in, with what the database can hold."""
    app, _ada = http_provider
    reply, revoked = callback_with_userinfo(app, body)
    assert reply.status_code == 302, reply.get_data(as_text=True)
    assert revoked == set()
    with app.app_context():
        grace = db.session.execute(db.select(User).where(User.subject.in_(["grace", "1234"]))).scalar_one()
        assert (grace.name, grace.email) == (name, email)
    assert "Traceback" not in caplog.text


def test_database_errors_never_write_bound_values_to_the_log(app):
    """A failed statement's message names no parameter: they hold token ciphertext and email addresses."""
    with app.app_context():
        db.session.add(User(subject="twice", email="first@example.com", refresh_token="refresh-token-value"))
        db.session.commit()
        db.session.add(User(subject="twice", email="second-secret@example.com", refresh_token="another-refresh-token"))
        with pytest.raises(IntegrityError) as failed:
            db.session.commit()
        db.session.rollback()
    message = str(failed.value)
    assert "second-secret" not in message
    assert "gAAAA" not in message  # Fernet ciphertext of the refresh token
