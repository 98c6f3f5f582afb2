"""The stand-in provider keeps APS Authentication v2's rules, one by one."""

import base64
import hashlib
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask
from sqlalchemy import update

import standin
from conftest import copy_private
from standin.inprocess import WSGIAdapter, mark_slept, slow_down
from standin.store import codes, refresh_tokens

ISSUER = "http://provider.test/standin"
REDIRECT = "http://app.test/auth/callback"
SCOPE = "user-profile:read data:read data:write viewables:read"
VERIFIER = "v" * 64
CHALLENGE = base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest()).rstrip(b"=").decode()


def basic(client_id: str = "app", secret: str = "s3cret") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


@pytest.fixture
def provider(tmp_path, standin_template):
    copy_private(standin_template, tmp_path / "standin.sqlite")
    app = standin.create_app(
        {
            "issuer": ISSUER,
            "clients": {"app": "s3cret", "other": "other-secret"},
            "redirect_uris": [REDIRECT],
            "database_url": f"sqlite:///{tmp_path / 'standin.sqlite'}",
            "access_ttl": 3599,
            "strict": False,
        }
    )
    app.store = app.extensions["standin_store"]
    return app


@pytest.fixture
def strict(provider):
    provider.config["STANDIN"]["strict"] = True
    return provider


def authorize(provider, name="Ada", client_id="app", redirect_uri=REDIRECT, challenge=CHALLENGE, scope=SCOPE) -> str:
    """Sign in at the stand-in's page and return the authorization code."""
    params = {
        "client_id": client_id,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": "xyz",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    client = provider.test_client()
    assert b"Stand-in provider" in client.get("/authentication/v2/authorize", query_string=params).data
    reply = client.post("/authentication/v2/authorize", query_string=params, data={"name": name})
    query = parse_qs(urlsplit(reply.headers["Location"]).query)
    assert query["state"] == ["xyz"] and query["iss"] == [ISSUER]
    return query["code"][0]


def token(provider, form: dict, headers: dict | None = None):
    return provider.test_client().post("/authentication/v2/token", data=form, headers=headers if headers is not None else basic())


def exchange(provider, code: str, verifier: str = VERIFIER, redirect_uri: str = REDIRECT, headers=None):
    return token(provider, {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier}, headers)


def signed_in(provider, name="Ada") -> dict:
    reply = exchange(provider, authorize(provider, name))
    assert reply.status_code == 200, reply.json
    return reply.json


def refresh(provider, refresh_token: str, scope: str | None = None):
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if scope:
        form["scope"] = scope
    return token(provider, form)


def test_discovery_document_names_the_aps_v2_endpoints(provider):
    doc = provider.test_client().get("/.well-known/openid-configuration").json
    assert doc["issuer"] == ISSUER
    assert doc["authorization_endpoint"] == f"{ISSUER}/authentication/v2/authorize"
    assert doc["token_endpoint"] == f"{ISSUER}/authentication/v2/token"
    assert doc["revocation_endpoint"].endswith("/authentication/v2/revoke")
    assert doc["introspection_endpoint"].endswith("/authentication/v2/introspect")
    assert doc["code_challenge_methods_supported"] == ["S256"]


def test_code_exchange_returns_aps_shaped_tokens(provider):
    body = signed_in(provider)
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3599
    assert body["access_token"] and body["refresh_token"]


def test_code_is_single_use(provider):
    code = authorize(provider)
    assert exchange(provider, code).status_code == 200
    again = exchange(provider, code)
    assert again.status_code == 400 and again.json["error"] == "invalid_grant"


def test_code_is_bound_to_client(provider):
    code = authorize(provider)
    assert exchange(provider, code, headers=basic("other", "other-secret")).json["error"] == "invalid_grant"


def test_code_is_bound_to_redirect_uri(provider):
    code = authorize(provider)
    assert exchange(provider, code, redirect_uri="http://app.test/elsewhere").json["error"] == "invalid_grant"


def test_code_is_bound_to_pkce_challenge(provider):
    code = authorize(provider)
    assert exchange(provider, code, verifier="w" * 64).json["error"] == "invalid_grant"


def test_code_expires_after_five_minutes(provider):
    code = authorize(provider)
    with provider.store.transaction() as conn:
        conn.execute(update(codes).values(expires_at=time.time() - 1))
    assert exchange(provider, code).json["error"] == "invalid_grant"


def test_unregistered_redirect_uri_gets_a_page_not_a_redirect(provider):
    reply = provider.test_client().get(
        "/authentication/v2/authorize",
        query_string={"client_id": "app", "redirect_uri": "http://evil.test/cb", "scope": SCOPE, "code_challenge": CHALLENGE, "code_challenge_method": "S256"},
    )
    assert reply.status_code == 400 and "Location" not in reply.headers


def test_pkce_s256_is_required(provider):
    reply = provider.test_client().get(
        "/authentication/v2/authorize", query_string={"client_id": "app", "redirect_uri": REDIRECT, "scope": SCOPE, "state": "s"}
    )
    assert parse_qs(urlsplit(reply.headers["Location"]).query)["error"] == ["invalid_request"]


def test_cancel_sends_access_denied(provider):
    params = {"client_id": "app", "redirect_uri": REDIRECT, "scope": SCOPE, "state": "s", "code_challenge": CHALLENGE, "code_challenge_method": "S256"}
    reply = provider.test_client().post("/authentication/v2/authorize", query_string=params, data={"cancel": "1"})
    assert parse_qs(urlsplit(reply.headers["Location"]).query)["error"] == ["access_denied"]


def test_access_token_lifetime_is_configurable(provider):
    provider.config["STANDIN"]["access_ttl"] = 30
    assert signed_in(provider)["expires_in"] == 30


def test_refresh_rotates_and_old_token_is_single_use(provider):
    first = signed_in(provider)["refresh_token"]
    second = refresh(provider, first).json
    assert second["refresh_token"] != first
    replay = refresh(provider, first)
    assert replay.status_code == 400 and replay.json["error"] == "invalid_grant"
    assert refresh(provider, second["refresh_token"]).status_code == 200  # lenient: the current one survives


def test_strict_replay_revokes_the_current_refresh_token(strict):
    first = signed_in(strict)["refresh_token"]
    current = refresh(strict, first).json["refresh_token"]
    assert refresh(strict, first).json["error"] == "invalid_grant"
    assert refresh(strict, current).json["error"] == "invalid_grant"


def test_refresh_token_lives_fifteen_days(provider):
    body = signed_in(provider)
    row = provider.store.refresh_token(body["refresh_token"])
    assert row["expires_at"] - time.time() == pytest.approx(15 * 24 * 3600, abs=60)
    with provider.store.transaction() as conn:
        conn.execute(update(refresh_tokens).values(expires_at=time.time() - 1))
    assert refresh(provider, body["refresh_token"]).json["error"] == "invalid_grant"


def test_new_sign_in_invalidates_the_previous_refresh_token(provider):
    first = signed_in(provider)
    second = signed_in(provider)
    assert refresh(provider, first["refresh_token"]).json["error"] == "invalid_grant"
    assert refresh(provider, second["refresh_token"]).status_code == 200
    # Access tokens stay valid until they expire.
    assert provider.test_client().get("/userinfo", headers={"Authorization": f"Bearer {first['access_token']}"}).status_code == 200


def test_with_a_grant_per_authorization_a_new_sign_in_leaves_the_previous_refresh_token_alone(provider):
    """STANDIN_GRANT_PER_AUTHORIZATION: as OpenID providers keep them, not APS's one refresh token per person per app."""
    provider.config["STANDIN"]["grant_per_authorization"] = True
    first = signed_in(provider)
    second = signed_in(provider)
    assert refresh(provider, first["refresh_token"]).status_code == 200
    assert refresh(provider, second["refresh_token"]).status_code == 200


def test_narrowed_refresh_keeps_full_scope_in_the_new_refresh_token(provider):
    body = signed_in(provider)
    narrowed = refresh(provider, body["refresh_token"], scope="viewables:read").json
    assert narrowed["scope"] == "viewables:read"
    seen = provider.test_client().post("/authentication/v2/introspect", data={"token": narrowed["access_token"]}, headers=basic()).json
    assert seen["scope"] == "viewables:read"
    full = refresh(provider, narrowed["refresh_token"]).json
    assert set(full["scope"].split()) == set(SCOPE.split())


def test_refresh_scope_beyond_the_grant_is_invalid_scope_and_consumes_nothing(provider):
    body = signed_in(provider)
    wider = refresh(provider, body["refresh_token"], scope="data:read bucket:delete")
    assert wider.status_code == 400 and wider.json["error"] == "invalid_scope"
    assert refresh(provider, body["refresh_token"]).status_code == 200


def test_client_must_authenticate_by_basic_header_only(provider):
    code = authorize(provider)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": VERIFIER}
    assert token(provider, form, headers={}).status_code == 401
    assert token(provider, form, headers=basic(secret="wrong")).json["error"] == "invalid_client"
    both = token(provider, form | {"client_id": "app", "client_secret": "s3cret"})
    assert both.status_code == 400 and both.json["error"] == "invalid_request"


def test_errors_are_rfc6749_json(provider):
    reply = token(provider, {"grant_type": "password"})
    assert reply.status_code == 400
    assert reply.json["error"] == "unsupported_grant_type" and "error_description" in reply.json


def test_revoke_kills_a_refresh_token(provider):
    body = signed_in(provider)
    reply = provider.test_client().post("/authentication/v2/revoke", data={"token": body["refresh_token"], "token_type_hint": "refresh_token"}, headers=basic())
    assert reply.status_code == 200
    assert refresh(provider, body["refresh_token"]).json["error"] == "invalid_grant"


def test_userinfo_needs_a_live_access_token(provider):
    body = signed_in(provider, "Grace Hopper")
    me = provider.test_client().get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"}).json
    assert me["name"] == "Grace Hopper" and me["sub"] and me["email"]
    assert provider.test_client().get("/userinfo", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_state_survives_a_restart(provider, tmp_path):
    body = signed_in(provider)
    again = standin.create_app(provider.config["STANDIN"])
    reply = again.test_client().post("/authentication/v2/token", data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}, headers=basic())
    assert reply.status_code == 200


@pytest.mark.parametrize("kind", ["5xx", "invalid_grant"])
def test_injected_faults_hit_the_next_token_request_only(provider, kind):
    body = signed_in(provider)
    provider.store.inject(kind)
    assert refresh(provider, body["refresh_token"]).status_code in (400, 503)
    assert refresh(provider, body["refresh_token"]).status_code == 200  # the fault did not consume the token


# --- As strict as APS where a browser is involved: redirects, framing, scopes ----------------------------


@pytest.fixture
def embedded(tmp_path, standin_template):
    """The stand-in as the app embeds it without OAUTH_REDIRECT_URI: no redirect URI registered."""
    copy_private(standin_template, tmp_path / "standin.sqlite")
    app = standin.create_app(
        {
            "issuer": "http://localhost/standin",
            "clients": {"app": "s3cret"},
            "redirect_uris": [],
            "database_url": f"sqlite:///{tmp_path / 'standin.sqlite'}",
            "access_ttl": 3599,
            "strict": False,
        }
    )
    app.store = app.extensions["standin_store"]
    return app


def authorize_params(redirect_uri: str, **extra: str) -> dict:
    return {
        "client_id": "app",
        "redirect_uri": redirect_uri,
        "scope": SCOPE,
        "state": "s",
        "code_challenge": CHALLENGE,
        "code_challenge_method": "S256",
    } | extra


def logout(provider, target: str):
    return provider.test_client().get("/authentication/v2/logout", query_string={"post_logout_redirect_uri": target})


UNSAFE_LOGOUT_TARGETS = [
    "javascript:alert(document.domain)",
    "data:text/html,<script>alert(1)</script>",
    "http://evil.example/phish",
    "http://app.test@evil.example/phish",
    "http://app.test:80@evil.example/phish",
    "http://app.test:x@evil.example/phish",
    "http://app.test.evil.example/phish",
    "https://app.test/",  # another origin: the scheme differs
    "http://app.test:8080/",
    "//evil.example/phish",
    "/\\evil.example/phish",
    "http://app.test\\@evil.example/",
    "http://app.test:99999/",
    "http://app.test:port/",
    " http://evil.example/",
    "http://app.test/\n",
]


@pytest.mark.parametrize("target", UNSAFE_LOGOUT_TARGETS)
def test_logout_redirects_only_to_a_registered_origin(provider, target):
    reply = logout(provider, target)
    assert reply.status_code == 200 and "Location" not in reply.headers
    assert b"Signed out" in reply.data


@pytest.mark.parametrize(
    "target", ["javascript:alert(document.domain)", "http://evil.example/phish", "http://localhost@evil.example/", "http://localhost:99999/"]
)
def test_logout_without_registered_uris_redirects_only_to_its_own_origin(embedded, target):
    reply = logout(embedded, target)
    assert reply.status_code == 200 and "Location" not in reply.headers


@pytest.mark.parametrize("target", ["http://app.test/", "http://app.test/signed-out?from=standin", "http://APP.test:80/"])
def test_logout_redirects_to_the_client_s_own_origin(provider, target):
    reply = logout(provider, target)
    assert reply.status_code == 302 and reply.headers["Location"].lower() == target.lower()


def test_logout_without_registered_uris_redirects_to_its_own_origin(embedded):
    assert logout(embedded, "http://localhost/").headers["Location"] == "http://localhost/"


@pytest.mark.parametrize(
    "uri",
    [
        "http://evil.example/auth/callback",
        "http://localhost/elsewhere",
        "http://localhost:8080/auth/callback",
        "https://localhost/auth/callback",
        "http://localhost@evil.example/auth/callback",
        "javascript:alert(1)",
    ],
)
def test_authorize_without_registered_uris_never_redirects_elsewhere(embedded, uri):
    """Errors included: an unregistered redirect_uri gets a page, whatever else is wrong with the request."""
    client = embedded.test_client()
    for params in (authorize_params(uri), authorize_params(uri, response_type="token"), authorize_params(uri, code_challenge_method="plain")):
        reply = client.get("/authentication/v2/authorize", query_string=params)
        assert reply.status_code == 400 and "Location" not in reply.headers, params
    reply = client.post("/authentication/v2/authorize", query_string=authorize_params(uri), data={"name": "Ada"})
    assert reply.status_code == 400 and "Location" not in reply.headers


@pytest.mark.parametrize("uri", ["http://localhost/auth/callback", "http://127.0.0.1/auth/callback"])
def test_authorize_without_registered_uris_accepts_the_app_on_its_own_origin(embedded, uri):
    """Reached as localhost, its loopback aliases count as its own origin: the demo opened as 127.0.0.1 still signs in."""
    client = embedded.test_client()
    params = authorize_params(uri)
    assert client.get("/authentication/v2/authorize", query_string=params).status_code == 200
    reply = client.post("/authentication/v2/authorize", query_string=params, data={"name": "Ada"})
    assert reply.headers["Location"].startswith(f"{uri}?code=")


@pytest.mark.parametrize("uri", ["http://localhost:99999/auth/callback", "http://localhost:port/auth/callback", "http://[::1/auth/callback"])
def test_malformed_redirect_uri_gets_a_400_not_a_500(embedded, uri):
    client = embedded.test_client()
    for params in (authorize_params(uri), authorize_params(uri, response_type="token")):
        reply = client.get("/authentication/v2/authorize", query_string=params)
        assert reply.status_code == 400 and "Location" not in reply.headers
    assert logout(embedded, uri).status_code == 200


def test_pages_cannot_be_framed_and_leak_no_referrer(provider):
    client = provider.test_client()
    pages = [
        client.get("/authentication/v2/authorize", query_string=authorize_params(REDIRECT)),
        client.get("/authentication/v2/logout"),
        client.get("/authentication/v2/authorize", query_string=authorize_params("http://evil.test/cb")),
    ]
    for reply in pages:
        csp = reply.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "base-uri 'none'" in csp
        assert "unsafe-inline" not in csp and "script-src" not in csp
        assert reply.headers["X-Frame-Options"] == "DENY"
        assert reply.headers["Referrer-Policy"] == "no-referrer"
    sign_in_page = pages[0]
    assert "form-action 'self' http://app.test;" in sign_in_page.headers["Content-Security-Policy"] + ";"
    assert b"<style" not in sign_in_page.data  # the styles come from a file the CSP allows
    stylesheet = client.get("/static/standin.css")
    assert stylesheet.status_code == 200 and b"font-family" in stylesheet.data
    stylesheet.close()


def test_userinfo_needs_the_user_profile_read_scope(provider):
    """APS answers userinfo only for user-profile:read; the viewer's narrowed token is refused."""
    body = signed_in(provider)
    viewer = refresh(provider, body["refresh_token"], scope="viewables:read").json
    reply = provider.test_client().get("/userinfo", headers={"Authorization": f"Bearer {viewer['access_token']}"})
    assert reply.status_code == 403 and reply.json["error"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in reply.headers["WWW-Authenticate"]
    full = refresh(provider, viewer["refresh_token"]).json
    assert provider.test_client().get("/userinfo", headers={"Authorization": f"Bearer {full['access_token']}"}).status_code == 200


@pytest.mark.parametrize("scope", ["admin:everything", "data:read admin:everything", "data:read data:read:all", "user-profile:read\x00"])
def test_authorize_grants_only_the_scopes_it_advertises(provider, scope):
    client = provider.test_client()
    params = authorize_params(REDIRECT, scope=scope)
    for reply in (
        client.get("/authentication/v2/authorize", query_string=params),
        client.post("/authentication/v2/authorize", query_string=params, data={"name": "Ada"}),
    ):
        query = parse_qs(urlsplit(reply.headers["Location"]).query)
        assert query["error"] == ["invalid_scope"] and "code" not in query
    advertised = client.get("/.well-known/openid-configuration").json["scopes_supported"]
    assert "admin:everything" not in advertised and set(SCOPE.split()) <= set(advertised)


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://attacker.test"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://sub.provider.test"},
        {"Origin": "http://attacker.test"},
        {"Origin": "null"},
    ],
)
def test_sign_in_form_posted_from_another_site_is_refused(provider, headers):
    """Another site auto-posting the form with its own name would sign the victim's browser in as the attacker (login CSRF)."""
    params = authorize_params(REDIRECT)
    reply = provider.test_client().post("/authentication/v2/authorize", query_string=params, data={"name": "Attacker"}, headers=headers)
    assert reply.status_code == 403
    assert "Location" not in reply.headers and "standin_session" not in reply.headers.get("Set-Cookie", "")


@pytest.mark.parametrize(
    "headers",
    [{"Sec-Fetch-Site": "same-origin", "Origin": "http://provider.test"}, {"Sec-Fetch-Site": "same-origin", "Origin": "null"}, {}],
)
def test_sign_in_form_posted_from_its_own_page_signs_in(provider, headers):
    params = authorize_params(REDIRECT)
    reply = provider.test_client().post(
        "/authentication/v2/authorize", query_string=params, data={"name": "Ada"}, headers=headers, base_url="http://provider.test"
    )
    assert reply.status_code == 302 and "code=" in reply.headers["Location"]


def test_in_process_a_reply_times_out_when_the_provider_was_told_to_be_slow_not_when_the_machine_is():
    """A loaded machine can keep an in-process reply waiting for a core; only slow_down is the provider's slowness."""
    provider = Flask(__name__)
    provider.after_request(mark_slept)
    provider.add_url_rule("/busy", "busy", lambda: time.sleep(0.3) or "done")  # the machine's time, not the provider's
    provider.add_url_rule("/slow", "slow", lambda: slow_down(0.3) or "done")
    http = requests.Session()
    http.mount("http://provider.test/", WSGIAdapter(provider, "http://provider.test"))
    assert http.get("http://provider.test/busy", timeout=0.1).text == "done"
    with pytest.raises(requests.ReadTimeout):
        http.get("http://provider.test/slow", timeout=0.1)
    assert http.get("http://provider.test/slow", timeout=1).text == "done"
