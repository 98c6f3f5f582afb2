"""The sign-in flow: login redirect, callback checks, sessions and sign-out."""

from urllib.parse import parse_qs, urlsplit

from conftest import sign_in, stored_user


def test_sign_in_round_trip_starts_a_session(client):
    done = sign_in(client, next_path="/api/session")
    assert done.status_code == 302
    assert done.headers["Location"] == "/api/session"
    me = client.get("/api/session").get_json()
    assert me["signed_in"] is True
    assert me["user"]["name"] == "Ada Lovelace"
    user = stored_user(client.application)
    assert user.access_token not in str(me) and user.refresh_token not in str(me) and user.viewer_token not in str(me)


def test_login_redirect_carries_state_and_pkce_s256(client):
    location = client.get("/auth/login").headers["Location"]
    params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43
    assert len(params["state"]) >= 32
    assert params["redirect_uri"] == "http://localhost/auth/callback"
    assert urlsplit(location).path == "/standin/authentication/v2/authorize"
