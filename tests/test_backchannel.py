"""POST /auth/backchannel-logout (OpenID Connect Back-Channel Logout 1.0), in-process against a provider over real HTTP.

The provider is the stand-in served as an OpenID provider whose discovery names a JWKS holding this
test's key, so the test can sign logout tokens good and bad. tests/test_interop.py has the end-to-end
test, where panva's oidc-provider signs and sends the logout token itself.
"""

import json
import time
import uuid

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, update
from werkzeug.test import Client
from werkzeug.wrappers import Response

from conftest import standin_over_http, stored_user
from models import UserSession, db
from standin.store import digest

EVENT = {"http://schemas.openid.net/event/backchannel-logout": {}}
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ODA = digest("oda")[:24]  # the stand-in's subject for the name Oda


class WithKeys:
    """The stand-in, with a jwks_uri in its discovery document that serves this test's public key."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/.well-known/openid-configuration":
            doc = Client(self.inner).get(path).get_json() | {"jwks_uri": f"{self.inner.config['STANDIN']['issuer']}/jwks"}
            return Response(json.dumps(doc), mimetype="application/json")(environ, start_response)
        if path == "/jwks":
            public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())) | {"kid": "test-key", "use": "sig"}
            return Response(json.dumps({"keys": [public]}), mimetype="application/json")(environ, start_response)
        return self.inner(environ, start_response)


@pytest.fixture
def oidc(tmp_path):
    with standin_over_http(tmp_path, WithKeys) as (issuer, store, _):
        yield issuer, store


@pytest.fixture
def app(app_factory, oidc):
    issuer, _ = oidc
    return app_factory(OAUTH_PROVIDER="oidc", OAUTH_ISSUER=issuer, OAUTH_CLIENT_ID="oidc-client", OAUTH_CLIENT_SECRET="oidc-secret")


def sign_in(app):
    """Sign Oda in at the provider; return her browser."""
    client = app.test_client()
    consent = requests.post(client.get("/auth/login").headers["Location"], data={"name": "Oda"}, allow_redirects=False, timeout=10)
    back = requests.utils.urlparse(consent.headers["Location"])
    assert client.get(back.path, query_string=back.query).status_code == 302
    return client


def logout_token(issuer: str, key=KEY, headers: dict | None = None, algorithm: str = "RS256", **claims) -> str:
    body = {"iss": issuer, "aud": "oidc-client", "iat": int(time.time()), "jti": uuid.uuid4().hex, "sub": ODA, "events": EVENT}
    body = {k: v for k, v in (body | claims).items() if v is not None}
    return jwt.encode(body, key, algorithm=algorithm, headers={"kid": "test-key", "typ": "logout+jwt"} | (headers or {}))


def post(app, token: str):
    # As the provider sends it: a form post from a server, no cookie, no Origin, no CSRF token.
    return app.test_client().post("/auth/backchannel-logout", data={"logout_token": token})


def test_a_valid_logout_token_ends_the_persons_sessions_and_revokes_the_grant(app, oidc):
    issuer, store = oidc
    browser = sign_in(app)
    refresh_token = stored_user(app, "Oda").refresh_token
    token = logout_token(issuer)
    reply = post(app, token)
    assert reply.status_code == 200 and reply.headers["Cache-Control"] == "no-store"
    assert browser.get("/api/session").status_code == 401
    assert browser.get("/").status_code == 200  # signed out, not sent through a silent sign-in
    assert stored_user(app, "Oda").refresh_token is None
    assert store.refresh_token(refresh_token)["status"] == "revoked"
    # The same token again is a replay.
    again = post(app, token)
    assert again.status_code == 400 and "already used" in again.get_json()["error_description"]


def test_a_sid_ends_only_that_provider_sessions_browser(app, oidc):
    issuer, _ = oidc
    laptop, phone = sign_in(app), sign_in(app)
    with app.app_context():
        rows = db.session.execute(select(UserSession.id_hash).order_by(UserSession.created_at)).scalars().all()
        for id_hash, sid in zip(rows, ("sid-laptop", "sid-phone"), strict=True):
            db.session.execute(update(UserSession).where(UserSession.id_hash == id_hash).values(provider_sid=sid))
        db.session.commit()
    assert post(app, logout_token(issuer, sub=None, sid="sid-unknown")).status_code == 200  # nothing of ours: nothing ends
    assert laptop.get("/api/session").status_code == 200
    assert post(app, logout_token(issuer, sid="sid-laptop")).status_code == 200
    assert laptop.get("/api/session").status_code == 401
    assert phone.get("/api/session").status_code == 200
    assert stored_user(app, "Oda").refresh_token is not None  # the phone still holds the grant


def _token_without_signature(issuer):
    return jwt.encode({"iss": issuer, "aud": "oidc-client", "iat": int(time.time()), "jti": "x", "sub": ODA, "events": EVENT}, None, algorithm="none")


REFUSED = {
    "missing": lambda issuer: "",
    "not a JWT": lambda issuer: "not.a.jwt",
    "alg none": _token_without_signature,
    "HMAC": lambda issuer: logout_token(issuer, key="oidc-secret-" + "x" * 32, algorithm="HS256"),
    "another key": lambda issuer: logout_token(issuer, key=OTHER_KEY),
    "unknown kid": lambda issuer: logout_token(issuer, headers={"kid": "rotated-away"}),
    "another issuer": lambda issuer: logout_token("https://evil.example"),
    "another audience": lambda issuer: logout_token(issuer, aud="someone-else"),
    "no iat": lambda issuer: logout_token(issuer, iat=None),
    "too old": lambda issuer: logout_token(issuer, iat=int(time.time()) - 3600),
    "from the future": lambda issuer: logout_token(issuer, iat=int(time.time()) + 3600),
    "expired": lambda issuer: logout_token(issuer, exp=int(time.time()) - 120),
    "no jti": lambda issuer: logout_token(issuer, jti=None),
    "no event": lambda issuer: logout_token(issuer, events=None),
    "another event": lambda issuer: logout_token(issuer, events={"http://schemas.openid.net/event/other": {}}),
    "event not an object": lambda issuer: logout_token(issuer, events={"http://schemas.openid.net/event/backchannel-logout": "yes"}),
    "nonce": lambda issuer: logout_token(issuer, nonce="n-0S6_WzA2Mj"),
    "neither sub nor sid": lambda issuer: logout_token(issuer, sub=None),
    "sub not a string": lambda issuer: logout_token(issuer, sub=42),
    "an access token": lambda issuer: logout_token(issuer, headers={"typ": "at+jwt"}),
    # PostgreSQL refuses NUL in text, and no encoding holds a lone surrogate (JSON's "\\ud800").
    "NUL in sub": lambda issuer: logout_token(issuer, sub=ODA + "\x00"),
    "NUL in sid": lambda issuer: logout_token(issuer, sub=None, sid="sid\x00"),
    "lone surrogate in sid": lambda issuer: logout_token(issuer, sid="sid\ud800"),
    "lone surrogate in jti": lambda issuer: logout_token(issuer, jti="jti\ud800"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_bad_logout_token_is_400_and_ends_nothing(app, oidc, case):
    issuer, _ = oidc
    browser = sign_in(app)
    reply = post(app, REFUSED[case](issuer))
    assert reply.status_code == 400, reply.get_data(as_text=True)
    assert reply.get_json()["error"] == "invalid_request"
    assert browser.get("/api/session").status_code == 200


def test_it_needs_no_csrf_token_but_is_rate_limited(app_factory, oidc):
    issuer, _ = oidc
    app = app_factory(
        OAUTH_PROVIDER="oidc", OAUTH_ISSUER=issuer, OAUTH_CLIENT_ID="oidc-client", OAUTH_CLIENT_SECRET="oidc-secret", BACKCHANNEL_LOGOUT_RATE_LIMIT="3/minute"
    )
    sign_in(app)
    provider = app.test_client()
    headers = {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "cross-site"}  # whatever a provider's HTTP client might send
    statuses = [provider.post("/auth/backchannel-logout", data={"logout_token": logout_token(issuer)}, headers=headers).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


def test_providers_without_back_channel_logout_refuse_it(client):
    reply = client.post("/auth/backchannel-logout", data={"logout_token": "x"})
    assert reply.status_code == 400 and reply.get_json()["error"] == "invalid_request"


def test_a_signed_token_with_an_absurd_iat_is_400_not_500(app, oidc):
    issuer, _ = oidc
    sign_in(app)
    assert post(app, logout_token(issuer, iat=10**20)).status_code == 400
