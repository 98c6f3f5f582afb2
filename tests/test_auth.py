"""The sign-in flow: login redirect, callback checks, sessions and sign-out."""

import html
import re
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


def test_sign_out_can_end_the_providers_session_too(app_factory):
    app = app_factory(OAUTH_LOGOUT_AT_PROVIDER=True)
    client = app.test_client()
    sign_in(client)
    csrf = client.get("/api/session").get_json()["csrf_token"]
    out = client.post("/auth/logout", data={"csrf_token": csrf})
    target = urlsplit(out.headers["Location"])
    assert target.path == "/standin/authentication/v2/logout"
    assert parse_qs(target.query) == {"post_logout_redirect_uri": ["http://localhost/"], "client_id": ["standin-client"]}
    assert client.get("/api/session").status_code == 401  # signed out here before the provider is asked
    back = client.get(target.path, query_string=target.query)
    assert back.status_code == 302 and back.headers["Location"] == "http://localhost/"
    # The provider forgot this browser too: a silent sign-in now needs its form.
    authorize = urlsplit(client.get("/auth/login").headers["Location"])
    answer = client.get(authorize.path, query_string=f"{authorize.query}&prompt=none")
    assert parse_qs(urlsplit(answer.headers["Location"]).query)["error"] == ["login_required"]


def test_sign_out_stays_here_unless_set_up_to_go_to_the_provider(client):
    sign_in(client)
    csrf = client.get("/api/session").get_json()["csrf_token"]
    assert client.post("/auth/logout", data={"csrf_token": csrf}).headers["Location"] == "/"


def test_aps_logout_has_no_redirect_back_unless_one_is_registered(app_factory):
    import auth

    app = app_factory(OAUTH_LOGOUT_AT_PROVIDER=True, OAUTH_PROVIDER="autodesk")
    with app.test_request_context():
        assert auth.provider_logout_url() == "http://localhost/standin/authentication/v2/logout"
        app.config["OAUTH_POST_LOGOUT_REDIRECT_URI"] = "https://app.example/bye"
        assert parse_qs(urlsplit(auth.provider_logout_url()).query)["post_logout_redirect_uri"] == ["https://app.example/bye"]


def test_sign_in_as_someone_else_asks_for_the_providers_form_and_signs_the_first_person_out(app, client, standin):
    sign_in(client)
    ada = stored_user(app)
    home = client.get("/").get_data(as_text=True)
    assert 'href="/auth/login?prompt=login"' in home
    login = client.get("/auth/login?prompt=login")
    authorize = urlsplit(login.headers["Location"])
    assert parse_qs(authorize.query)["prompt"] == ["login"]
    # The provider remembers Ada's browser, but shows its form rather than signing her in again.
    assert b"Your name" in client.get(authorize.path, query_string=authorize.query).data
    consent = client.post(authorize.path, query_string=authorize.query, data={"name": "Grace Hopper"})
    back = urlsplit(consent.headers["Location"])
    assert client.get(back.path, query_string=back.query).status_code == 302
    assert client.get("/api/session").get_json()["user"]["name"] == "Grace Hopper"
    # This was Ada's only session: her grant is forgotten here and revoked at the provider.
    assert stored_user(app).refresh_token is None
    assert standin.refresh_token(ada.refresh_token)["status"] == "revoked"


def start(client, next_path: str) -> tuple[str, dict]:
    """Start a sign-in towards next_path and consent at the stand-in; return the callback path and its parameters."""
    login = client.get("/auth/login", query_string={"next": next_path})
    authorize = urlsplit(login.headers["Location"])
    consent = client.post(authorize.path, query_string=authorize.query, data={"name": "Ada Lovelace"})
    back = urlsplit(consent.headers["Location"])
    return back.path, {k: v[0] for k, v in parse_qs(back.query).items()}


def try_again_link(reply) -> str:
    link = re.search(r'<a class="button primary" href="([^"]+)">Try again</a>', reply.get_data(as_text=True))
    assert link, reply.get_data(as_text=True)
    return html.unescape(link.group(1))


def test_reloaded_callback_while_signed_in_goes_to_the_page_it_led_to(client):
    path, params = start(client, "/devices")
    assert client.get(path, query_string=params).headers["Location"] == "/devices"
    again = client.get(path, query_string=params)  # the person reloads the callback URL
    assert again.status_code == 302
    assert again.headers["Location"] == "/devices"


def test_expired_callback_while_signed_in_goes_home(client):
    sign_in(client)
    client.delete_cookie("signin")  # ten minutes later, the pre-sign-in cookie is gone
    reply = client.get("/auth/callback", query_string={"state": "old-state", "code": "old-code"})
    assert reply.status_code == 302
    assert urlsplit(reply.headers["Location"]).path == "/"


def test_two_sign_ins_at_once_in_one_browser_both_work(client):
    """Two tabs start signing in; each finishes, in any order, and lands where it was going."""
    first = start(client, "/session")
    second = start(client, "/devices")
    assert client.get(second[0], query_string=second[1]).headers["Location"] == "/devices"
    finished = client.get(first[0], query_string=first[1])
    assert finished.status_code == 302, finished.get_data(as_text=True)
    assert finished.headers["Location"] == "/session"
    assert client.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"


def test_try_again_keeps_where_the_sign_in_was_going(client, standin):
    path, params = start(client, "/devices")
    cancelled = client.get(path, query_string={"state": params["state"], "error": "access_denied"})
    assert cancelled.status_code == 400
    assert try_again_link(cancelled) == "/auth/login?next=/devices"

    path, params = start(client, "/viewer")
    standin.inject("5xx")
    failed = client.get(path, query_string=params)
    assert failed.status_code == 503
    assert try_again_link(failed) == "/auth/login?next=/viewer"


def test_logout_address_typed_in_shows_the_sign_out_button(client):
    signed_out = client.get("/auth/logout")
    assert signed_out.status_code == 200
    assert "You are signed out" in signed_out.get_data(as_text=True)
    sign_in(client)
    page = client.get("/auth/logout")
    assert page.status_code == 200
    form = re.search(r'<form method="post" action="/auth/logout"[^>]*>(.*?)</form>', page.get_data(as_text=True).split("<main", 1)[1], re.S)
    assert form and re.search(r'name="csrf_token" value="[0-9a-f]{64}"', form.group(1))
    assert '<button type="submit" class="primary">Sign out</button>' in form.group(1)
    assert client.get("/api/session").status_code == 200  # looking at the page signs nobody out


def test_a_link_to_silent_sign_in_after_a_sign_out_shows_the_providers_form(client):
    """A sign-out is never undone silently: ?silent=1 from a link is honoured only for a session that ended without the person's say."""
    sign_in(client)  # the provider now remembers this browser
    csrf = client.get("/api/session").get_json()["csrf_token"]
    client.post("/auth/logout", data={"csrf_token": csrf})
    login = client.get("/auth/login", query_string={"silent": "1", "next": "/browse"})
    authorize = urlsplit(login.headers["Location"])
    assert "prompt" not in parse_qs(authorize.query)
    page = client.get(authorize.path, query_string=authorize.query)
    assert page.status_code == 200 and 'name="name"' in page.get_data(as_text=True)
    assert client.get("/api/session").status_code == 401


def test_a_link_to_silent_sign_in_never_swaps_a_live_session_for_the_providers_person(client):
    """Login CSRF: the provider's cookie names someone else (an attacker posted its form); a live session here is not replaced silently."""
    sign_in(client, name="Victim")
    sign_in_at_provider_only(client, name="Attacker")
    login = client.get("/auth/login", query_string={"silent": "1"})
    assert "prompt" not in parse_qs(urlsplit(login.headers["Location"]).query)
    assert client.get("/api/session").get_json()["user"]["name"] == "Victim"


def test_a_link_to_silent_sign_in_from_a_stranger_browser_shows_the_form(client):
    """A browser that never signed in here has no ended session to resume: no silent sign-in for it either."""
    sign_in_at_provider_only(client, name="Attacker")
    login = client.get("/auth/login", query_string={"silent": "1"})
    assert "prompt" not in parse_qs(urlsplit(login.headers["Location"]).query)


def sign_in_at_provider_only(client, name: str) -> None:
    """Sign in at the stand-in's form and never come back to the app (as a form another site auto-posted would)."""
    authorize = urlsplit(client.get("/auth/login").headers["Location"])
    assert client.post(authorize.path, query_string=authorize.query, data={"name": name}).status_code == 302
