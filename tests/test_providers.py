"""Provider presets and configuration: APS endpoints, a generic OIDC provider, clear start-up errors."""

from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from app import create_app
from conftest import expire_access_token, make_config, standin_over_http


@pytest.fixture
def oidc_server(tmp_path):
    """Serve the stand-in over real HTTP as a separate OpenID Connect provider."""
    with standin_over_http(tmp_path) as (issuer, store, _):
        yield issuer, store


def test_oidc_provider_from_discovery_document(app_factory, oidc_server):
    issuer, store = oidc_server
    app = app_factory(
        OAUTH_PROVIDER="oidc",
        OAUTH_ISSUER=issuer,
        OAUTH_CLIENT_ID="oidc-client",
        OAUTH_CLIENT_SECRET="oidc-secret",
        OAUTH_SCOPES="openid profile email offline_access",
    )
    assert "standin" not in app.extensions  # nothing embedded: the provider is only known by its issuer
    client = app.test_client()

    location = client.get("/auth/login").headers["Location"]
    params = parse_qs(urlsplit(location).query)
    assert location.startswith(f"{issuer}/authentication/v2/authorize?")
    assert params["nonce"] and params["code_challenge_method"] == ["S256"]
    consent = requests.post(location, data={"name": "Oda"}, allow_redirects=False, timeout=10)
    back = urlsplit(consent.headers["Location"])
    assert client.get(back.path, query_string=back.query).status_code == 302

    assert client.get("/api/session").get_json()["user"]["name"] == "Oda"
    assert store.count("refresh") == 0  # the viewer scope is not in this grant: no downscoped refresh
    expire_access_token(app, name="Oda")
    assert client.get("/api/profile").get_json()["name"] == "Oda"
    assert store.count("refresh") == 1


def test_autodesk_preset_uses_aps_v2_endpoints(app_factory):
    app = app_factory(OAUTH_PROVIDER="autodesk", OAUTH_ISSUER="https://developer.api.autodesk.com", OAUTH_CLIENT_ID="aps-id", OAUTH_CLIENT_SECRET="aps-secret")
    endpoints = app.extensions["provider"].endpoints
    assert endpoints.authorize == "https://developer.api.autodesk.com/authentication/v2/authorize"
    assert endpoints.token == "https://developer.api.autodesk.com/authentication/v2/token"
    assert endpoints.revoke == "https://developer.api.autodesk.com/authentication/v2/revoke"
    assert endpoints.userinfo == "https://api.userprofile.autodesk.com/userinfo"
    location = app.test_client().get("/auth/login").headers["Location"]
    assert "nonce" not in parse_qs(urlsplit(location).query)  # only with openid


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("OAUTH_PROVIDER", "OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_ISSUER", "APS_CLIENT_ID", "APS_CLIENT_SECRET", "APS_CALLBACK_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SECRET_KEY", "x")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'c.sqlite'}")
    monkeypatch.setenv("STANDIN_DATABASE_URL", f"sqlite:///{tmp_path / 's.sqlite'}")
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEYS", "8dPAA3qIkpHyELgsyIDmxI0ZBvP5jsC5Ys2yLAOFb3g=")
    return monkeypatch


def test_aps_variable_names_are_accepted(clean_env):
    clean_env.setenv("OAUTH_PROVIDER", "autodesk")
    clean_env.setenv("APS_CLIENT_ID", "aps-id")
    clean_env.setenv("APS_CLIENT_SECRET", "aps-secret")
    clean_env.setenv("APS_CALLBACK_URL", "https://app.example/auth/callback")
    app = create_app()
    assert app.config["OAUTH_CLIENT_ID"] == "aps-id"
    assert app.config["OAUTH_REDIRECT_URI"] == "https://app.example/auth/callback"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"OAUTH_PROVIDER": "autodesk"}, "OAUTH_CLIENT_ID (or APS_CLIENT_ID)"),
        ({"OAUTH_PROVIDER": "oidc", "OAUTH_CLIENT_ID": "c", "OAUTH_CLIENT_SECRET": "s"}, "OAUTH_ISSUER"),
        ({"OAUTH_PROVIDER": "keycloak"}, "OAUTH_PROVIDER"),
        ({"OAUTH_ISSUER": "not a url"}, "OAUTH_ISSUER"),
        ({"OAUTH_REDIRECT_URI": "/relative"}, "OAUTH_REDIRECT_URI"),
        ({"TOKEN_REFRESH_LEEWAY": "soon"}, "TOKEN_REFRESH_LEEWAY"),
        ({"SESSION_COOKIE_SECURE": "maybe"}, "SESSION_COOKIE_SECURE"),
        ({"TOKEN_ENCRYPTION_KEYS": "short"}, "TOKEN_ENCRYPTION_KEYS"),
        ({"DATABASE_URL": "mysql://db/app"}, "DATABASE_URL"),
        # Nothing listens on port 9 (discard): discovery fails at start-up, not at the first sign-in.
        ({"OAUTH_PROVIDER": "oidc", "OAUTH_CLIENT_ID": "c", "OAUTH_CLIENT_SECRET": "s", "OAUTH_ISSUER": "http://127.0.0.1:9"}, "OAUTH_ISSUER"),
    ],
)
def test_bad_configuration_stops_start_up_with_one_sentence(clean_env, env, names):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        create_app()
    message = str(stopped.value)
    assert message.startswith("Configuration error: ") and names in message
    assert "\n" not in message and "Traceback" not in message


def test_standin_issuer_needs_a_path(tmp_path, database_url):
    with pytest.raises(SystemExit, match="OAUTH_ISSUER"):
        create_app(make_config(tmp_path, database_url, OAUTH_ISSUER="http://localhost"))
