"""Cross-site request forgery: every state-changing route wants our token and a same-origin request."""

import re

import pytest

from conftest import sign_in, stored_user
from models import UserSession, db

# Each way a forged request can arrive, as headers and a form token ("good" = this session's token).
FORGERIES = {
    "cross-site fetch metadata": ({"Sec-Fetch-Site": "cross-site"}, "good"),
    "same-site sibling subdomain": ({"Sec-Fetch-Site": "same-site"}, "good"),
    "foreign origin": ({"Origin": "https://evil.example"}, "good"),
    "opaque origin": ({"Origin": "null"}, "good"),
    "origin on another port": ({"Origin": "http://localhost:8080"}, "good"),
    "missing token": ({}, None),
    "empty token": ({}, ""),
    "wrong token": ({}, "0" * 64),
    "non-ascii token": ({}, "é" * 64),
    "token of another session": ({}, "other"),
}


def post_routes(app) -> list[str]:
    """Every route a browser could be made to POST to (or send another unsafe method), found in the URL map.

    Not the back-channel logout: the provider's server calls it with a signed token, no cookie (test_backchannel.py).
    """
    unsafe = {"POST", "PUT", "PATCH", "DELETE"}
    exempt = {"/auth/backchannel-logout"}
    return sorted(rule.rule for rule in app.url_map.iter_rules() if rule.methods & unsafe and not rule.arguments and rule.rule not in exempt)


def session_hashes(app) -> list[str]:
    with app.app_context():
        return list(db.session.execute(db.select(UserSession.id_hash).order_by(UserSession.id_hash)).scalars())


def csrf_token(client) -> str:
    page = client.get("/").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page).group(1)


def test_the_known_state_changing_routes_are_all_found(app):
    assert {"/auth/logout", "/auth/logout-everywhere", "/auth/sessions/end"} <= set(post_routes(app))


@pytest.mark.parametrize("forgery", FORGERIES)
def test_forged_post_is_refused_on_every_route_and_changes_nothing(app, client, forgery):
    sign_in(client)
    headers, token = FORGERIES[forgery]
    if token == "good":
        token = csrf_token(client)
    elif token == "other":
        other = app.test_client()
        sign_in(other, "Grace Hopper")
        token = csrf_token(other)
    user, before = stored_user(app), session_hashes(app)
    for route in post_routes(app):
        form = {"session": before[0], "next": "/"}
        if token is not None:
            form["csrf_token"] = token
        reply = client.post(route, data=form, headers=headers)
        assert reply.status_code == 403, (route, reply.status_code)
    assert client.get("/api/session").status_code == 200
    assert stored_user(app).refresh_token == user.refresh_token
    assert session_hashes(app) == before


def test_same_origin_post_with_token_works(app, client):
    sign_in(client)
    token = csrf_token(client)
    reply = client.post("/auth/logout", data={"csrf_token": token}, headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"})
    assert reply.status_code == 302
    assert client.get("/api/session").status_code == 401


def test_token_in_header_works_for_scripts(app, client):
    sign_in(client)
    reply = client.post("/auth/logout-everywhere", headers={"X-CSRF-Token": csrf_token(client)})
    assert reply.status_code == 302
    assert stored_user(app).refresh_token is None


def test_cross_site_post_is_refused_even_when_signed_out(client):
    assert client.post("/auth/logout", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403


def test_http_origin_is_refused_when_the_site_is_https(app_factory):
    app = app_factory(SESSION_COOKIE_SECURE=True)
    client = app.test_client()
    client.environ_base["wsgi.url_scheme"] = "https"
    sign_in(client)
    token = csrf_token(client)
    assert client.post("/auth/logout", data={"csrf_token": token}, headers={"Origin": "http://localhost"}).status_code == 403
    assert client.post("/auth/logout", data={"csrf_token": token}, headers={"Origin": "https://localhost"}).status_code == 302


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/api/viewer-token", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"}),
        ("/api/session", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}),
        ("/", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}),
        ("/auth/login", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}),
    ],
)
def test_cross_site_subresource_requests_get_nothing(app, client, path, headers):
    sign_in(client)
    reply = client.get(path, headers=headers)
    assert reply.status_code == 403
    assert b"access_token" not in reply.data


def test_cross_site_navigation_is_welcome(app, client):
    sign_in(client)
    navigate = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert client.get("/", headers=navigate).status_code == 200
    # The provider's redirect back to the callback is a cross-site navigation too.
    assert client.get("/auth/login", headers=navigate).status_code == 302
