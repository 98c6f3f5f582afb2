"""What real providers do differently from APS, each found by tests/test_interop.py or seen elsewhere.

These run in-process against the stand-in, with `responses` only where a provider quirk must be faked.
"""

import io
import json
import logging
import threading
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
from sqlalchemy import delete, select, update
from werkzeug.test import Client, run_wsgi_app
from werkzeug.wrappers import Response

from conftest import expire_access_token, sign_in, standin_over_http, stored_user
from models import User, db
from standin.store import access_tokens, digest, refresh_tokens


def count_refresh_calls(app, monkeypatch) -> list:
    """Count the app's refresh requests to the provider, whatever the provider answers."""
    provider, calls = app.extensions["provider"], []
    real = provider.refresh
    monkeypatch.setattr(provider, "refresh", lambda *args, **kwargs: calls.append(kwargs.get("scope")) or real(*args, **kwargs))
    return calls


def test_refused_refresh_is_a_clear_4xx_that_keeps_the_sign_in_and_is_not_retried(app_factory, monkeypatch):
    """A provider's invalid_scope is an answer, not an outage: 403 naming it, no retry on the next request."""
    # The viewer scope is not part of the grant (as with the README's OIDC settings): the provider refuses it.
    app = app_factory(OAUTH_VIEWER_SCOPE="data:create")
    client = app.test_client()
    sign_in(client)
    calls = count_refresh_calls(app, monkeypatch)

    for _ in range(3):
        reply = client.get("/api/viewer-token")
        assert reply.status_code == 403
        body = reply.get_json()
        assert body["error"] == "provider_refused" and body["cause"] == "invalid_scope"
        assert "invalid_scope" in body["message"] and "still signed in" in body["message"]
    assert calls == ["data:create"]  # the refusal was remembered, and the provider not asked again
    assert client.get("/api/profile").status_code == 200
    page = client.get("/viewer-token-does-not-exist")
    assert page.status_code == 404  # the session cookie survived: an ordinary 404, not a sign-in redirect
    assert client.get_cookie("session") is not None


class Quirks:
    """Serve the stand-in with the habits of other real providers, each switched on by name.

    hide_revocation: the openid-configuration names no revocation endpoint; rfc8414: the RFC 8414 metadata does.
    narrow_grant: a refresh that asks for a narrower scope narrows the new refresh token too.
    kill_previous_access: every refresh deletes the person's earlier access tokens.
    userinfo_needs_openid: userinfo answers 403 insufficient_scope to a token without openid;
    userinfo_refuses: to every token.
    """

    def __init__(self, inner, **quirks: bool):
        self.inner, self.quirks = inner, quirks
        self.store = inner.extensions["standin_store"]

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
            return self.discovery(path)(environ, start_response)
        if path == "/userinfo" and (self.quirks.get("userinfo_needs_openid") or self.quirks.get("userinfo_refuses")):
            header = environ.get("HTTP_AUTHORIZATION", "")
            row = self.store.access_token(header[7:])
            if row is not None and ("openid" not in row["scope"].split() or self.quirks.get("userinfo_refuses")):
                return Response(json.dumps({"error": "insufficient_scope"}), 403, mimetype="application/json")(environ, start_response)
        if path == "/authentication/v2/token":
            return self.token(environ)(environ, start_response)
        return self.inner(environ, start_response)

    def discovery(self, path: str) -> Response:
        doc = Client(self.inner).get("/.well-known/openid-configuration").get_json()
        if path.endswith("oauth-authorization-server") and not self.quirks.get("rfc8414"):
            return Response("not found", 404)
        if path.endswith("openid-configuration") and self.quirks.get("hide_revocation"):
            del doc["revocation_endpoint"]
        return Response(json.dumps(doc), mimetype="application/json")

    def token(self, environ) -> Response:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        form = dict(parse_qsl(body.decode()))
        app_iter, status, headers = run_wsgi_app(self.inner, environ)
        reply = Response(b"".join(app_iter), status, headers)
        if form.get("grant_type") != "refresh_token" or reply.status_code != 200:
            return reply
        issued = reply.get_json()
        with self.store.transaction() as conn:
            sub = conn.execute(select(access_tokens.c.sub).where(access_tokens.c.token_hash == digest(issued["access_token"]))).scalar_one()
            if self.quirks.get("narrow_grant") and form.get("scope"):
                conn.execute(update(refresh_tokens).where(refresh_tokens.c.token_hash == digest(issued["refresh_token"])).values(scope=form["scope"]))
            if self.quirks.get("kill_previous_access"):
                earlier = (access_tokens.c.sub == sub) & (access_tokens.c.token_hash != digest(issued["access_token"]))
                conn.execute(delete(access_tokens).where(earlier))
        return reply


@pytest.fixture
def quirky_oidc(request, tmp_path):
    """A separate OIDC provider over real HTTP with the quirks the test names (indirect parameter)."""
    quirks = getattr(request, "param", {})
    with standin_over_http(tmp_path, lambda provider: Quirks(provider, **quirks)) as (issuer, store, served):
        yield issuer, store, served.quirks


def oidc_app(app_factory, issuer, **settings):
    return app_factory(OAUTH_PROVIDER="oidc", OAUTH_ISSUER=issuer, OAUTH_CLIENT_ID="oidc-client", OAUTH_CLIENT_SECRET="oidc-secret", **settings)


def oidc_sign_in(client) -> None:
    """Sign Oda in at the separate provider, through its consent form."""
    consent = requests.post(client.get("/auth/login").headers["Location"], data={"name": "Oda"}, allow_redirects=False, timeout=10)
    back = urlsplit(consent.headers["Location"])
    assert client.get(back.path, query_string=back.query).status_code == 302


def sign_in_and_out(app) -> str:
    """Sign Oda in at the separate provider, sign her out, and return the refresh token the app held."""
    client = app.test_client()
    oidc_sign_in(client)
    refresh_token = stored_user(app, "Oda").refresh_token
    csrf = client.get("/").get_data(as_text=True).split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    assert client.post("/auth/logout", data={"csrf_token": csrf}).status_code == 302
    return refresh_token


HIDDEN_REVOCATION = [{"hide_revocation": True, "rfc8414": True}, {"hide_revocation": True}]


@pytest.mark.parametrize("quirky_oidc", HIDDEN_REVOCATION, ids=["rfc8414", "nowhere"], indirect=True)
def test_sign_out_revokes_at_a_provider_that_lists_revocation_only_in_rfc8414_metadata(app_factory, quirky_oidc, caplog):
    issuer, store, quirks = quirky_oidc
    rfc8414 = quirks.get("rfc8414")
    with caplog.at_level(logging.WARNING, logger="provider"):
        app = oidc_app(app_factory, issuer)
    warnings = [r.getMessage() for r in caplog.records if "cannot revoke" in r.getMessage()]
    if rfc8414:
        assert app.extensions["provider"].endpoints.revoke == f"{issuer}/authentication/v2/revoke"
        assert warnings == []
        assert store.refresh_token(sign_in_and_out(app))["status"] == "revoked"
    else:
        # Nowhere to revoke: say so once at start-up, naming the setting that fixes it.
        assert app.extensions["provider"].endpoints.revoke is None
        assert len(warnings) == 1 and "OAUTH_REVOCATION_URL" in warnings[0]
        assert store.refresh_token(sign_in_and_out(app))["status"] == "active"


@pytest.mark.parametrize("quirky_oidc", HIDDEN_REVOCATION[1:], indirect=True)
def test_revocation_url_setting_makes_sign_out_revoke(app_factory, quirky_oidc, caplog):
    issuer, store, _ = quirky_oidc
    with caplog.at_level(logging.WARNING, logger="provider"):
        app = oidc_app(app_factory, issuer, OAUTH_REVOCATION_URL=f"{issuer}/authentication/v2/revoke")
    assert not [r for r in caplog.records if "cannot revoke" in r.getMessage()]
    assert store.refresh_token(sign_in_and_out(app))["status"] == "revoked"


def test_offline_access_is_asked_with_prompt_consent(app_factory, quirky_oidc):
    """OpenID Connect Core §11: without prompt=consent, oidc-provider drops offline_access and issues no refresh token."""
    issuer, _, _ = quirky_oidc
    location = oidc_app(app_factory, issuer, OAUTH_SCOPES="openid profile offline_access").test_client().get("/auth/login").headers["Location"]
    assert "prompt=consent" in location
    location = oidc_app(app_factory, issuer, OAUTH_SCOPES="openid profile").test_client().get("/auth/login").headers["Location"]
    assert "prompt=" not in location


DOT_LIKE = {"narrow_grant": True, "kill_previous_access": True, "userinfo_needs_openid": True}


@pytest.fixture
def dot_like_app(app_factory, quirky_oidc):
    """The app against a provider that narrows the whole grant and kills earlier access tokens at each refresh.

    Made before the test runs: the migrations reconfigure logging, which would drop caplog's handler.
    """
    return oidc_app(app_factory, quirky_oidc[0], OAUTH_SCOPES="openid data:read viewables:read")


@pytest.mark.parametrize("quirky_oidc", [DOT_LIKE], indirect=True)
def test_provider_that_narrows_the_whole_grant_costs_one_sign_in_and_no_more_downscoping(dot_like_app, quirky_oidc, monkeypatch, caplog):
    app, store = dot_like_app, quirky_oidc[1]
    client = app.test_client()
    oidc_sign_in(client)  # the viewer prefetch narrows the whole grant at this provider
    expire_access_token(app, name="Oda")

    with caplog.at_level(logging.WARNING, logger="tokens"):
        page = client.get("/session")
    # One page that says what happened, with one way back through sign-in to the same page.
    assert page.status_code == 401
    text = page.get_data(as_text=True)
    assert "narrowed your whole sign-in" in text and 'href="/auth/login?next=/session"' in text
    assert len([r for r in caplog.records if "narrowed a whole grant" in r.getMessage()]) == 1
    assert client.get("/api/session").status_code == 401
    with store.engine.connect() as conn:  # the narrowed grant is revoked, not left lying around
        assert conn.execute(select(refresh_tokens.c.status).where(refresh_tokens.c.status == "active")).first() is None

    calls = count_refresh_calls(app, monkeypatch)
    oidc_sign_in(client)
    assert calls == []  # no viewer prefetch any more: the new grant stays whole
    assert client.get("/api/profile").get_json()["name"] == "Oda"
    expire_access_token(app, name="Oda")
    assert client.get("/api/profile").get_json()["name"] == "Oda"
    assert calls == [None]
    reply = client.get("/api/viewer-token")
    assert reply.status_code == 404 and reply.get_json()["error"] == "viewer_token_off"


def test_empty_viewer_scope_turns_the_viewer_token_off(app_factory, monkeypatch):
    """OAUTH_VIEWER_SCOPE= (empty) hands out no viewer token, and never a full-scope one instead."""
    app = app_factory(OAUTH_VIEWER_SCOPE="")
    client = app.test_client()
    calls = count_refresh_calls(app, monkeypatch)
    sign_in(client)
    assert calls == []
    reply = client.get("/api/viewer-token")
    assert reply.status_code == 404 and reply.get_json()["error"] == "viewer_token_off"
    assert calls == []


@pytest.fixture
def killing_app(app_factory, quirky_oidc):
    """The app, with the viewer scope in its grant, against a provider that kills earlier access tokens at each refresh."""
    return oidc_app(app_factory, quirky_oidc[0], OAUTH_SCOPES="openid data:read viewables:read")


@pytest.mark.parametrize("quirky_oidc", [{"kill_previous_access": True}], indirect=True)
def test_access_token_killed_at_a_rotation_is_refreshed_once_and_the_call_retried(killing_app, monkeypatch):
    """The viewer prefetch at sign-in killed the full-scope token: 12 concurrent calls share one refresh and all succeed."""
    app = killing_app
    client = app.test_client()
    oidc_sign_in(client)
    cookie = client.get_cookie("session").value
    calls = count_refresh_calls(app, monkeypatch)
    statuses, barrier = [], threading.Barrier(12)

    def call() -> None:
        browser = app.test_client()
        browser.set_cookie("session", cookie)
        barrier.wait()
        statuses.append(browser.get("/api/profile").status_code)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 12
    assert calls == [None]


def test_resource_server_refusing_the_token_is_a_clear_4xx_not_an_outage(app_factory, quirky_oidc):
    """A 403 insufficient_scope from the resource server names the cause and keeps the sign-in."""
    issuer, _, quirks = quirky_oidc
    app = oidc_app(app_factory, issuer)
    client = app.test_client()
    oidc_sign_in(client)
    quirks["userinfo_refuses"] = True
    reply = client.get("/api/profile")
    assert reply.status_code == 403
    assert reply.get_json()["error"] == "provider_refused" and reply.get_json()["cause"] == "insufficient_scope"
    assert client.get("/api/session").status_code == 200


def test_a_grant_narrowed_quietly_costs_one_sign_in_not_an_outage_forever(app_factory, monkeypatch):
    """The stand-in narrows the whole grant at the viewer's refresh and names no scope; userinfo then answers an empty 403 insufficient_scope."""
    app = app_factory(STANDIN_NARROWS_QUIETLY=True)
    client = app.test_client()
    sign_in(client)  # the viewer prefetch narrows the whole grant, and its reply does not say so
    expire_access_token(app)
    reply = client.get("/api/profile")  # the next full refresh gets a narrowed token, which userinfo refuses
    assert reply.status_code == 401
    assert reply.get_json()["error"] == "sign_in_required" and "narrowed your whole sign-in" in reply.get_json()["message"]
    assert stored_user(app).refresh_token is None

    calls = count_refresh_calls(app, monkeypatch)
    sign_in(client)
    assert calls == []  # no viewer prefetch any more: the new grant stays whole
    expire_access_token(app)
    assert client.get("/api/profile").get_json()["name"] == "Ada Lovelace"
    assert calls == [None]
    assert client.get("/api/viewer-token").get_json()["error"] == "viewer_token_off"


def test_insufficient_scope_with_an_empty_body_is_a_refusal_not_an_outage(app_factory):
    """A 403 with only a WWW-Authenticate: Bearer error names the cause (403), keeps the sign-in, and is no 503."""
    app = app_factory(STANDIN_NARROWS_QUIETLY=True)
    client = app.test_client()
    sign_in(client)
    with app.app_context():
        user = db.session.execute(select(User).where(User.name == "Ada Lovelace")).scalar_one()
        user.access_token = user.viewer_token  # as if a provider had handed out a narrower token for the whole grant
        db.session.commit()
    reply = client.get("/api/profile")
    assert reply.status_code == 403
    assert reply.get_json()["error"] == "provider_refused" and reply.get_json()["cause"] == "insufficient_scope"
    assert client.get("/api/session").status_code == 200


def test_introspection_that_calls_every_refresh_token_inactive_never_ends_a_sign_in_alone(app_factory):
    """A refresh whose reply was lost, at a provider that introspects access tokens only: the kept token still lives, and the sign-in with it."""
    app = app_factory(STANDIN_INTROSPECTS_ACCESS_ONLY=True)
    standin = app.extensions["standin"].extensions["standin_store"]
    client = app.test_client()
    sign_in(client)
    kept = stored_user(app).refresh_token
    standin.inject("hang", delay=3)  # longer than PROVIDER_REFRESH_TIMEOUT, and then nothing done
    expire_access_token(app)
    assert client.get("/api/profile").status_code == 503
    assert stored_user(app).refresh_token == kept
    reply = client.get("/api/profile")  # introspection says inactive: the refresh itself tells, and works
    assert reply.status_code == 200 and reply.get_json()["name"] == "Ada Lovelace"
    assert standin.refresh_token(kept)["status"] == "used" and standin.count("refresh_rejected") == 0


class SetsCookies:
    """Serve the stand-in, setting a cookie on every answer and noting the Cookie header of every request."""

    def __init__(self, inner):
        self.inner, self.received = inner, []

    def __call__(self, environ, start_response):
        self.received.append((environ["PATH_INFO"], environ.get("HTTP_COOKIE")))

        def with_cookie(status, headers, exc_info=None):
            return start_response(status, [*headers, ("Set-Cookie", "provider-affinity=first-caller; Path=/")], exc_info)

        return self.inner(environ, with_cookie)


def test_the_provider_client_keeps_no_cookies_between_people(app_factory, tmp_path):
    """A cookie the provider sets while answering for one person never goes with the calls made for the next."""
    with standin_over_http(tmp_path, SetsCookies) as (issuer, _, served):
        app = oidc_app(app_factory, issuer, OAUTH_SCOPES="openid profile")
        oidc_sign_in(app.test_client())  # token and userinfo answers set the cookie
        served.received.clear()
        client = app.test_client()
        consent = requests.post(client.get("/auth/login").headers["Location"], data={"name": "Bo"}, allow_redirects=False, timeout=10)
        back = urlsplit(consent.headers["Location"])
        assert client.get(back.path, query_string=back.query).status_code == 302
        assert client.get("/api/profile").get_json()["name"] == "Bo"
    calls = [(path, cookie) for path, cookie in served.received if not path.startswith("/authentication/v2/authorize")]
    assert {path for path, _ in calls} >= {"/authentication/v2/token", "/userinfo"}
    assert [cookie for _, cookie in calls] == [None] * len(calls)
