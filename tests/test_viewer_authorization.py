"""The viewer's token from an authorization of its own (OAUTH_VIEWER_TOKEN=authorize), apart from the person's grant.

Against the stand-in acting out a provider that narrows the whole grant at a narrowed refresh and names
no scope (STANDIN_NARROWS_QUIETLY) and keeps a grant per authorization, as OpenID providers do.
"""

import dataclasses
import io
import json
import logging
import time
from urllib.parse import parse_qs, parse_qsl, urlsplit

import jwt
import pytest
import requests
from sqlalchemy import text
from werkzeug.test import run_wsgi_app
from werkzeug.wrappers import Response

import grants
from conftest import expire_access_token, sign_in, standin_over_http, stored_user
from locking import LockTimeout
from models import db
from provider import ProviderUnavailable
from standin.store import refresh_tokens

AUTHORIZE = {"OAUTH_VIEWER_TOKEN": "authorize", "STANDIN_GRANT_PER_AUTHORIZATION": True, "STANDIN_NARROWS_QUIETLY": True}


@pytest.fixture
def app(app_factory):
    return app_factory(**AUTHORIZE)


def count_refresh_calls(app, monkeypatch) -> list:
    provider, calls = app.extensions["provider"], []
    real = provider.refresh
    monkeypatch.setattr(provider, "refresh", lambda *args, **kwargs: calls.append(kwargs.get("scope")) or real(*args, **kwargs))
    return calls


def capture_exchanges(app, monkeypatch, change=lambda reply: reply) -> list:
    """Keep every code exchange's reply as the app gets it, changed as the test wants."""
    provider, replies = app.extensions["provider"], []
    real = provider.exchange_code

    def exchange(*args, **kwargs):
        replies.append(change(real(*args, **kwargs)))
        return replies[-1]

    monkeypatch.setattr(provider, "exchange_code", exchange)
    return replies


def refusals(caplog) -> list[str]:
    """Return the warnings logged about refused viewer authorizations."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "viewer_authorization_refused" in r.getMessage()]


def go_to_provider(client, next_path: str = "/viewer", **args) -> dict:
    """Start the viewer's authorization; return the authorize request's parameters."""
    start = client.get("/auth/viewer", query_string={"next": next_path, **args})
    assert start.status_code == 302, start.get_data(as_text=True)
    return {k: v[0] for k, v in parse_qs(urlsplit(start.headers["Location"]).query).items()} | {"_url": start.headers["Location"]}


def through_provider(client, next_path: str = "/viewer"):
    """Go through the provider (silently, with its own cookie) and back; return the callback's answer."""
    authorize = urlsplit(go_to_provider(client, next_path)["_url"])
    answer = client.get(authorize.path, query_string=authorize.query)
    assert answer.status_code == 302
    back = urlsplit(answer.headers["Location"])
    assert back.path == "/auth/callback"
    return client.get(back.path, query_string=back.query)


def live_grants(standin) -> list[str]:
    with standin.engine.connect() as conn:
        return [row.scope for row in conn.execute(refresh_tokens.select().where(refresh_tokens.c.status == "active"))]


def test_viewer_token_comes_from_a_silent_authorization_and_the_grant_stays_whole(app, client, standin, monkeypatch):
    calls = count_refresh_calls(app, monkeypatch)
    sign_in(client)
    assert calls == []  # no narrowed refresh at sign-in: nothing narrows the grant
    granted = stored_user(app).refresh_token

    needed = client.get("/api/viewer-token")
    assert needed.status_code == 401
    assert needed.get_json()["error"] == "viewer_authorization_needed" and needed.get_json()["authorize_url"] == "/auth/viewer"

    params = go_to_provider(client)
    assert params["prompt"] == "none" and params["scope"] == "viewables:read" and params["code_challenge_method"] == "S256"
    assert len(params["state"]) >= 32 and params["redirect_uri"] == "http://localhost/auth/callback"
    back = through_provider(client)
    assert back.status_code == 302 and back.headers["Location"] == "/viewer"

    viewer = client.get("/api/viewer-token").get_json()
    assert viewer["scope"] == "viewables:read" and viewer["expires_in"] > 0
    stored = stored_user(app)
    assert stored.viewer_token == viewer["access_token"] and stored.refresh_token == granted  # the person's grant untouched
    assert standin.access_token(viewer["access_token"])["scope"] == "viewables:read"
    assert standin.refresh_token(granted)["status"] == "active"
    assert standin.refresh_token(granted)["scope"] == "user-profile:read data:read data:write viewables:read"

    # The person's refreshes keep the full scope: userinfo keeps answering, no sign-in ends.
    for _ in range(2):
        expire_access_token(app)
        assert client.get("/api/profile").get_json()["name"] == "Ada Lovelace"
    assert calls == [None, None]
    assert standin.refresh_token(stored_user(app).refresh_token)["scope"] == "user-profile:read data:read data:write viewables:read"

    # A stale viewer token is not refreshed: the browser goes through the provider again.
    expire_access_token(app, field="viewer_expires_at")
    assert client.get("/api/viewer-token").get_json()["error"] == "viewer_authorization_needed"
    assert through_provider(client).status_code == 302
    renewed = client.get("/api/viewer-token").get_json()
    assert renewed["access_token"] != viewer["access_token"] and renewed["scope"] == "viewables:read"
    assert calls == [None, None] and client.get("/api/session").status_code == 200


def test_the_viewer_page_says_where_its_token_comes_from(client):
    sign_in(client)
    assert "authorization of its own" in client.get("/viewer").get_data(as_text=True)


def test_a_provider_that_must_see_the_person_keeps_the_sign_in(client):
    """login_required (the provider forgot this browser): a page with a way through the provider's own pages; the sign-in stands."""
    sign_in(client)
    client.delete_cookie("standin_session", path="/standin")
    back = through_provider(client)
    assert back.status_code == 200
    text = back.get_data(as_text=True)
    assert "You are still signed in here" in text and "/auth/viewer?next=/viewer&amp;interactive=1" in text
    assert client.get("/api/session").status_code == 200
    # The way through the provider's pages: its sign-in form, no prompt=none.
    assert "prompt" not in go_to_provider(client, interactive="1")


@pytest.mark.parametrize("error", ["login_required", "consent_required", "interaction_required", "access_denied", "server_error"])
def test_an_error_reply_is_a_clear_answer_and_the_sign_in_stands(client, error):
    sign_in(client)
    state = go_to_provider(client)["state"]
    reply = client.get("/auth/callback", query_string={"state": state, "error": error, "error_description": "<script>x</script>"})
    assert reply.status_code == (200 if error.endswith("_required") else 400)
    assert "<script>x" not in reply.get_data(as_text=True)
    assert client.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    assert stored_user(client.application).refresh_token is not None


def test_a_reply_for_another_person_is_refused_and_stores_nothing(app, client, standin, monkeypatch, caplog):
    """The browser is signed in at the provider as someone else: their token is refused (and revoked), the person's sign-in stands."""
    sign_in(client)
    granted = stored_user(client.application).refresh_token
    # Bob signs in at the provider in this browser (its cookie now names him), and never comes back here.
    login = urlsplit(client.get("/auth/login").headers["Location"])
    assert client.post(login.path, query_string=login.query, data={"name": "Bob"}).status_code == 302
    replies = capture_exchanges(app, monkeypatch)
    answer = through_provider(client)
    assert standin.access_token(replies[0].access_token) is None  # Bob's viewer access token, revoked
    assert standin.refresh_token(replies[0].refresh_token)["status"] == "revoked"
    assert f'"user_id": {stored_user(app).id}' in refusals(caplog)[0] and replies[0].access_token not in caplog.text
    assert answer.status_code == 403 and "someone else" in answer.get_data(as_text=True)
    me = client.get("/api/session").get_json()
    assert me["user"]["name"] == "Ada Lovelace"
    ada = stored_user(client.application)
    assert ada.refresh_token == granted and ada.viewer_token is None
    assert client.get("/api/viewer-token").status_code == 401
    assert live_grants(standin) == ["user-profile:read data:read data:write viewables:read"]  # Bob's viewer token was revoked too


def test_a_replayed_or_forged_state_changes_nothing(client):
    sign_in(client)
    params = go_to_provider(client)
    forged = client.get("/auth/callback", query_string={"state": "forged", "code": "anything"})
    assert forged.status_code == 400
    authorize = urlsplit(params["_url"])
    callback = urlsplit(client.get(authorize.path, query_string=authorize.query).headers["Location"])
    assert client.get(callback.path, query_string=callback.query).status_code == 302
    token = stored_user(client.application).viewer_token
    replayed = client.get(callback.path, query_string=callback.query)
    assert replayed.status_code == 302 and replayed.headers["Location"] == "/viewer"  # a reloaded callback goes where it led
    assert stored_user(client.application).viewer_token == token
    assert client.get("/api/session").status_code == 200


def test_a_state_from_another_browser_is_refused(app, client):
    """State binds the reply to the browser that started the authorization."""
    sign_in(client)
    authorize = urlsplit(go_to_provider(client)["_url"])
    callback = urlsplit(client.get(authorize.path, query_string=authorize.query).headers["Location"])
    other = app.test_client()
    sign_in(other, name="Eve")
    stolen = other.get(callback.path, query_string=callback.query)
    assert stolen.status_code == 409 and "/auth/viewer" in stolen.get_data(as_text=True)  # none of its own: nothing is exchanged
    assert stored_user(app, "Eve").viewer_token is None and stored_user(app).viewer_token is None


def provider_answer(client, params: dict):
    """Go through the provider (silently) for an authorization already started; return the callback's URL."""
    authorize = urlsplit(params["_url"])
    return urlsplit(client.get(authorize.path, query_string=authorize.query).headers["Location"])


@pytest.mark.parametrize("winner_first", [False, True], ids=["winner open", "winner done"])
def test_a_tab_whose_viewer_authorization_lost_the_race_is_offered_the_viewer_again(app, client, winner_first):
    """Two tabs' viewer tokens run out together: both start an authorization, and the second's cookie overwrites the first's flow."""
    sign_in(client)
    before = client.get_cookie("signin")
    first = go_to_provider(client)
    # The other tab's request left before this one's answer set the cookie.
    if before is None:
        client.delete_cookie("signin")
    else:
        client.set_cookie("signin", before.value)
    second = go_to_provider(client)
    first_back, second_back = provider_answer(client, first), provider_answer(client, second)
    if winner_first:
        assert client.get(second_back.path, query_string=second_back.query).headers["Location"] == "/viewer"
    lost = client.get(first_back.path, query_string=first_back.query)
    text = lost.get_data(as_text=True)
    assert lost.status_code == 409 and "Another tab" in text and 'href="/auth/viewer"' in text and "/auth/login" not in text
    assert client.get("/api/session").status_code == 200


@pytest.mark.parametrize("next_path", ["https://evil.example/", "//evil.example/", "/\\evil.example", "/%5Cevil.example"])
def test_next_off_site_goes_home(client, next_path):
    sign_in(client)
    assert through_provider(client, next_path).headers["Location"] == "/"


def test_a_signed_out_browser_signs_in_first(client):
    start = client.get("/auth/viewer", query_string={"next": "/viewer"})
    assert start.status_code == 302 and start.headers["Location"] == "/auth/login?next=/viewer"


def test_a_reply_after_the_person_signed_out_stores_nothing_and_is_revoked(app, client, standin, monkeypatch):
    """The person signs out everywhere (on another device) while the provider answers this browser: nothing is kept of that answer."""
    sign_in(client)
    other = app.test_client()
    sign_in(other)  # the same person on another device
    csrf = other.get("/api/session").get_json()["csrf_token"]

    def signed_out_meanwhile(reply):
        assert other.post("/auth/logout-everywhere", data={"csrf_token": csrf}).status_code == 302
        return reply

    replies = capture_exchanges(app, monkeypatch, signed_out_meanwhile)
    answer = through_provider(client)
    assert answer.status_code == 302 and answer.headers["Location"] == "/viewer"  # a page that says the person is signed out
    ada = stored_user(app)
    assert ada.refresh_token is None and ada.viewer_token is None
    assert standin.access_token(replies[0].access_token) is None
    assert standin.refresh_token(replies[0].refresh_token)["status"] == "revoked"
    assert client.get("/api/viewer-token").status_code == 401


def test_an_unknown_person_keeps_the_sign_in_and_revokes_only_the_viewer_access_token(app, client, standin, monkeypatch, caplog):
    """Introspection does not say whose the tokens are: the refresh token may belong to the person's own grant, so it is left alone."""
    sign_in(client)
    granted = stored_user(app).refresh_token
    provider = app.extensions["provider"]
    monkeypatch.setattr(provider, "introspect", lambda token: {"active": True, "sub": True})  # a bool is no subject
    replies = capture_exchanges(app, monkeypatch)
    answer = through_provider(client)
    assert answer.status_code == 403 and "did not say" in answer.get_data(as_text=True)
    assert "/auth/viewer?next=/viewer" in answer.get_data(as_text=True)
    assert standin.access_token(replies[0].access_token) is None
    assert standin.refresh_token(replies[0].refresh_token)["status"] == "active"  # never revoked on an unknown subject
    assert stored_user(app).refresh_token == granted and stored_user(app).viewer_token is None
    assert client.get("/api/session").status_code == 200
    assert len(refusals(caplog)) == 1 and replies[0].access_token not in caplog.text


def test_introspection_that_fails_is_a_503_and_the_sign_in_stands(app, client, standin, monkeypatch, caplog):
    sign_in(client)
    granted = stored_user(app).refresh_token

    def unavailable(token):
        raise ProviderUnavailable("provider answered 502")

    monkeypatch.setattr(app.extensions["provider"], "introspect", unavailable)
    replies = capture_exchanges(app, monkeypatch)
    answer = through_provider(client)
    assert answer.status_code == 503 and "/auth/viewer?next=/viewer" in answer.get_data(as_text=True)
    assert standin.access_token(replies[0].access_token) is None
    assert standin.refresh_token(replies[0].refresh_token)["status"] == "active"
    assert stored_user(app).refresh_token == granted and stored_user(app).viewer_token is None
    assert client.get("/api/session").status_code == 200
    assert len(refusals(caplog)) == 1


@pytest.mark.parametrize("granted", ["viewables:read data:write", "data:read", "openid viewables:read"])
def test_a_token_wider_than_the_viewer_scope_never_reaches_the_browser(app, client, standin, monkeypatch, caplog, granted):
    sign_in(client)
    replies = capture_exchanges(app, monkeypatch, lambda reply: dataclasses.replace(reply, scope=granted))
    answer = through_provider(client)
    assert answer.status_code == 502 and "more than the viewer" in answer.get_data(as_text=True)
    assert standin.access_token(replies[0].access_token) is None
    assert stored_user(app).viewer_token is None and client.get("/api/viewer-token").status_code == 401
    assert client.get("/api/session").status_code == 200
    assert len(refusals(caplog)) == 1


@pytest.mark.parametrize("granted", [None, "viewables:read", " viewables:read "])
def test_a_reply_naming_the_viewer_scope_or_none_is_stored(app, client, monkeypatch, granted):
    sign_in(client)
    capture_exchanges(app, monkeypatch, lambda reply: dataclasses.replace(reply, scope=granted))
    assert through_provider(client).status_code == 302
    assert client.get("/api/viewer-token").get_json()["scope"] == "viewables:read"


def test_a_busy_lock_after_the_exchange_is_a_503_back_to_the_viewer_authorization(app, client, standin, monkeypatch):
    """The person's row lock is held too long: the tokens just got are revoked, and Try again starts a new authorization."""
    sign_in(client)

    def busy(user_id):
        raise LockTimeout()

    replies = capture_exchanges(app, monkeypatch, lambda reply: monkeypatch.setattr(grants, "lock", busy) or reply)
    answer = through_provider(client, "/viewer?urn=abc")
    monkeypatch.undo()
    assert answer.status_code == 503
    assert "/auth/viewer?next=/viewer?urn%3Dabc" in answer.get_data(as_text=True)
    assert standin.access_token(replies[0].access_token) is None
    assert stored_user(app).viewer_token is None and stored_user(app).refresh_token is not None
    assert client.get("/api/session").status_code == 200


def test_the_refresh_token_a_viewer_authorization_brings_is_revoked_when_replaced_and_at_sign_out(app, client, standin, monkeypatch):
    """A provider may issue a refresh token with the viewer's token (django-oauth-toolkit, the stand-in): none outlives its use here."""
    sign_in(client)
    granted = stored_user(app).refresh_token
    replies = capture_exchanges(app, monkeypatch)
    assert through_provider(client).status_code == 302
    first = replies[0].refresh_token
    assert first and stored_user(app).viewer_refresh_token == first
    with app.app_context():
        raw = db.session.execute(text("SELECT viewer_refresh_token FROM users")).scalar_one()
    assert first not in raw  # encrypted like the person's own
    assert standin.refresh_token(first)["status"] == "active"  # kept: revoking it may kill the viewer's token (the toolkit)

    expire_access_token(app, field="viewer_expires_at")
    assert through_provider(client).status_code == 302
    second = replies[1].refresh_token
    assert standin.refresh_token(first)["status"] == "revoked" and standin.refresh_token(second)["status"] == "active"
    assert stored_user(app).viewer_refresh_token == second
    assert standin.refresh_token(granted)["status"] == "active" and client.get("/api/viewer-token").status_code == 200

    csrf = client.get("/api/session").get_json()["csrf_token"]
    assert client.post("/auth/logout", data={"csrf_token": csrf}).status_code == 302
    assert standin.refresh_token(second)["status"] == "revoked" and standin.refresh_token(granted)["status"] == "revoked"
    assert stored_user(app).viewer_refresh_token is None


def test_a_refresh_token_that_is_the_persons_own_is_neither_kept_as_the_viewers_nor_revoked(app, client, standin, monkeypatch):
    """A provider that hands the person's own refresh token back: it stays the person's, never revoked as the viewer's."""
    sign_in(client)
    granted = stored_user(app).refresh_token
    capture_exchanges(app, monkeypatch, lambda reply: dataclasses.replace(reply, refresh_token=granted))
    for _ in range(2):
        expire_access_token(app, field="viewer_expires_at")
        assert through_provider(client).status_code == 302
    assert stored_user(app).viewer_refresh_token is None and stored_user(app).refresh_token == granted
    assert standin.refresh_token(granted)["status"] == "active"
    assert client.get("/api/profile").status_code == 200


def test_the_viewer_authorization_exists_only_when_chosen(app_factory):
    client = app_factory().test_client()
    sign_in(client)
    assert client.get("/auth/viewer").status_code == 404
    assert client.get("/api/viewer-token").status_code == 200  # a narrowed refresh, as before


def test_an_empty_viewer_scope_still_turns_the_viewer_off(app_factory):
    client = app_factory(**AUTHORIZE, OAUTH_VIEWER_SCOPE="").test_client()
    sign_in(client)
    assert client.get("/api/viewer-token").get_json()["error"] == "viewer_token_off"
    assert client.get("/auth/viewer").status_code == 404


ABSENT = object()  # a claim left out of the ID token
ID_TOKEN_KEY = "an-id-token-key-of-32-bytes-or-more"


class WithIdTokens:
    """Serve the stand-in as an OpenID provider: every code exchange's reply carries an ID token, with the claims the test changes.

    It keeps a grant per authorization, as OpenID providers do. The nonce a right ID token carries is
    the one the test read from the authorize request (the stand-in keeps none).
    """

    def __init__(self, inner):
        self.inner, self.store = inner, inner.extensions["standin_store"]
        self.issuer = inner.config["STANDIN"]["issuer"]
        inner.config["STANDIN"]["grant_per_authorization"] = True
        self.nonce, self.change = None, {}

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] != "/authentication/v2/token":
            return self.inner(environ, start_response)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        app_iter, status, headers = run_wsgi_app(self.inner, environ)
        reply = Response(b"".join(app_iter), status, headers)
        if dict(parse_qsl(body.decode())).get("grant_type") != "authorization_code" or reply.status_code != 200:
            return reply(environ, start_response)
        issued = reply.get_json()
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": "oidc-client", "sub": self.store.access_token(issued["access_token"])["sub"], "iat": now, "exp": now + 300}
        claims = {name: value for name, value in (claims | {"nonce": self.nonce} | self.change).items() if value is not ABSENT}
        # Signed over the JSON as it is: jwt.encode refuses some of the wrong claims a test needs.
        issued["id_token"] = jwt.api_jws.encode(json.dumps(claims).encode(), ID_TOKEN_KEY, algorithm="HS256")
        return Response(json.dumps(issued), 200, mimetype="application/json")(environ, start_response)


@pytest.fixture
def oidc(app_factory, tmp_path):
    """An app signed in (as Oda) at a separate OpenID provider over HTTP, getting the viewer's token by an authorization of its own."""
    with standin_over_http(tmp_path, WithIdTokens) as (issuer, store, served):
        app = app_factory(
            OAUTH_PROVIDER="oidc",
            OAUTH_ISSUER=issuer,
            OAUTH_CLIENT_ID="oidc-client",
            OAUTH_CLIENT_SECRET="oidc-secret",
            OAUTH_SCOPES="openid profile viewables:read",
            OAUTH_VIEWER_TOKEN="authorize",
        )
        client = app.test_client()
        consent = requests.post(client.get("/auth/login").headers["Location"], data={"name": "Oda"}, allow_redirects=False, timeout=10)
        back = urlsplit(consent.headers["Location"])
        assert client.get(back.path, query_string=back.query).status_code == 302
        yield app, client, store, served


def oidc_viewer_authorization(client, served):
    """Authorize the viewer at the separate provider (through its form: no cookie of its own here); return the callback's answer."""
    params = go_to_provider(client, interactive="1")
    assert params["scope"] == "openid viewables:read" and params["nonce"]
    served.nonce = params["nonce"]
    consent = requests.post(params["_url"], data={"name": "Oda"}, allow_redirects=False, timeout=10)
    back = urlsplit(consent.headers["Location"])
    return client.get(back.path, query_string=back.query)


def test_the_id_token_names_the_person_and_the_viewer_gets_its_token(oidc, monkeypatch):
    app, client, store, served = oidc
    replies = capture_exchanges(app, monkeypatch)
    answer = oidc_viewer_authorization(client, served)
    assert answer.status_code == 302 and answer.headers["Location"] == "/viewer"
    viewer = client.get("/api/viewer-token").get_json()
    assert viewer["access_token"] == replies[0].access_token and set(viewer["scope"].split()) <= {"openid", "viewables:read"}


@pytest.mark.parametrize(
    "change",
    [
        {"nonce": "not-the-one-asked"},
        {"nonce": ABSENT},
        {"aud": "another-client"},
        {"aud": ABSENT},
        {"iss": "https://evil.example"},
        {"iss": 7},
        {"exp": int(time.time()) - 86400},
        {"sub": ABSENT},
        {"sub": 42},
        {"sub": True},
        {"sub": ""},
    ],
    ids=["wrong nonce", "no nonce", "wrong aud", "no aud", "wrong iss", "iss not a string", "expired", "no sub", "sub a number", "sub a bool", "empty sub"],
)
def test_an_id_token_that_does_not_hold_is_refused_and_the_sign_in_stands(oidc, monkeypatch, caplog, change):
    """Whose the tokens are is unknown: the viewer's access token is revoked, its refresh token left alone (it might be the person's grant)."""
    app, client, store, served = oidc
    granted = stored_user(app, "Oda").refresh_token
    served.change = change
    replies = capture_exchanges(app, monkeypatch)
    answer = oidc_viewer_authorization(client, served)
    assert answer.status_code == 403 and "did not say" in answer.get_data(as_text=True)
    assert store.access_token(replies[0].access_token) is None
    assert store.refresh_token(replies[0].refresh_token)["status"] == "active"
    oda = stored_user(app, "Oda")
    assert oda.refresh_token == granted and oda.viewer_token is None and oda.viewer_refresh_token is None
    assert store.refresh_token(granted)["status"] == "active"
    assert client.get("/api/session").get_json()["user"]["name"] == "Oda" and client.get("/api/profile").status_code == 200
    assert len(refusals(caplog)) == 1


def test_an_id_token_for_someone_else_is_refused_and_both_its_tokens_revoked(oidc, monkeypatch):
    app, client, store, served = oidc
    served.change = {"sub": "someone-else"}
    replies = capture_exchanges(app, monkeypatch)
    answer = oidc_viewer_authorization(client, served)
    assert answer.status_code == 403 and "someone else" in answer.get_data(as_text=True)
    assert store.access_token(replies[0].access_token) is None
    assert store.refresh_token(replies[0].refresh_token)["status"] == "revoked"
    assert store.refresh_token(stored_user(app, "Oda").refresh_token)["status"] == "active"


def test_a_garbled_id_token_is_refused_never_a_500(oidc, monkeypatch):
    app, client, store, served = oidc
    capture_exchanges(app, monkeypatch, lambda reply: dataclasses.replace(reply, id_token="not.a-jwt"))
    assert oidc_viewer_authorization(client, served).status_code == 403
    assert client.get("/api/session").status_code == 200
