"""What real providers do differently from APS (issue 12), each found by tests/test_interop.py or seen elsewhere.

These run in-process against the stand-in, with `responses` only where a provider quirk must be faked.
"""

import json
import logging
import threading
from urllib.parse import urlsplit

import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.test import Client
from werkzeug.wrappers import Response

import standin
from conftest import sign_in, stored_user


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


class DiscoveryQuirks:
    """Serve the stand-in with its openid-configuration stripped of a revocation endpoint, optionally listed in RFC 8414 metadata instead."""

    def __init__(self, inner, rfc8414: bool):
        self.inner, self.rfc8414 = inner, rfc8414

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
            doc = Client(self.inner).get("/.well-known/openid-configuration").get_json()
            if path.endswith("openid-configuration"):
                del doc["revocation_endpoint"]
            elif not self.rfc8414:
                return Response("not found", 404)(environ, start_response)
            return Response(json.dumps(doc), mimetype="application/json")(environ, start_response)
        return self.inner(environ, start_response)


@pytest.fixture(params=[True, False], ids=["rfc8414", "nowhere"])
def quirky_oidc(request, tmp_path):
    """A separate OIDC provider over real HTTP whose discovery document names no revocation endpoint."""
    server = make_server("127.0.0.1", 0, None, threaded=True)
    issuer = f"http://127.0.0.1:{server.server_port}"
    inner = standin.create_app(
        {
            "issuer": issuer,
            "clients": {"oidc-client": "oidc-secret"},
            "redirect_uris": ["http://localhost/auth/callback"],
            "database_url": f"sqlite:///{tmp_path / 'oidc.sqlite'}",
            "access_ttl": 3599,
            "strict": True,
        }
    )
    server.app = DiscoveryQuirks(inner, rfc8414=request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield issuer, inner.extensions["standin_store"], request.param
    server.shutdown()
    thread.join()


def oidc_app(app_factory, issuer, **settings):
    return app_factory(OAUTH_PROVIDER="oidc", OAUTH_ISSUER=issuer, OAUTH_CLIENT_ID="oidc-client", OAUTH_CLIENT_SECRET="oidc-secret", **settings)


def sign_in_and_out(app) -> str:
    """Sign Oda in at the separate provider, sign her out, and return the refresh token the app held."""
    client = app.test_client()
    consent = requests.post(client.get("/auth/login").headers["Location"], data={"name": "Oda"}, allow_redirects=False, timeout=10)
    back = urlsplit(consent.headers["Location"])
    assert client.get(back.path, query_string=back.query).status_code == 302
    refresh_token = stored_user(app, "Oda").refresh_token
    csrf = client.get("/").get_data(as_text=True).split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    assert client.post("/auth/logout", data={"csrf_token": csrf}).status_code == 302
    return refresh_token


def test_sign_out_revokes_at_a_provider_that_lists_revocation_only_in_rfc8414_metadata(app_factory, quirky_oidc, caplog):
    issuer, store, rfc8414 = quirky_oidc
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
