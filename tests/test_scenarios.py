"""The article's scenarios: a shareable viewer token by downscoped refresh, and several devices."""

import threading

import pytest

from conftest import expire_access_token, sign_in, stored_user


def _device(app, name: str = "Ada Lovelace"):
    client = app.test_client()
    sign_in(client, name=name)
    return client


def _csrf(client) -> str:
    """Read the CSRF token from the sign-out form on the home page."""
    page = client.get("/").get_data(as_text=True)
    return page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


def test_viewer_token_has_exactly_the_viewer_scope(app, client, standin):
    sign_in(client)
    body = client.get("/api/viewer-token").get_json()
    assert body["scope"] == "viewables:read"
    assert 3500 < body["expires_in"] <= 3599
    seen = app.extensions["provider"].introspect(body["access_token"])
    assert seen["active"] is True
    assert seen["scope"] == "viewables:read"
    # The refresh token it rotated to still carries the full grant (RFC 6749 §6).
    full = app.extensions["provider"].introspect(stored_user(app).refresh_token)
    assert set(full["scope"].split()) == set(app.config["OAUTH_SCOPES"].split())


def test_viewer_token_is_fetched_at_sign_in_and_reused(app, client, standin):
    sign_in(client)
    refreshes = standin.count("refresh")
    assert refreshes == 1  # the downscoped refresh right after sign-in
    first = client.get("/api/viewer-token").get_json()["access_token"]
    second = client.get("/api/viewer-token").get_json()["access_token"]
    assert first == second
    assert standin.count("refresh") == refreshes


def test_stale_viewer_token_is_renewed_and_full_scope_calls_still_work(app, client, standin):
    sign_in(client)
    first = client.get("/api/viewer-token").get_json()["access_token"]
    expire_access_token(app, field="viewer_expires_at")
    second = client.get("/api/viewer-token").get_json()["access_token"]
    assert second != first
    assert client.get("/api/profile").status_code == 200  # the full-scope token was not replaced
    assert "user-profile:read" in app.extensions["provider"].introspect(stored_user(app).access_token)["scope"]


def test_mixed_bursts_at_expiry_never_reuse_a_refresh_token(app, client, standin):
    sign_in(client)
    cookie = client.get_cookie("session")
    expire_access_token(app)
    expire_access_token(app, field="viewer_expires_at")
    before = standin.count("refresh")
    statuses = []
    barrier = threading.Barrier(40)

    def call(path: str) -> None:
        c = app.test_client()
        c.set_cookie(cookie.key, cookie.value)
        barrier.wait()
        statuses.append(c.get(path).status_code)

    threads = [threading.Thread(target=call, args=("/api/profile" if i % 2 else "/api/viewer-token",)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 40
    assert standin.count("refresh") - before == 2  # one access refresh, one viewer refresh, in turn
    assert standin.count("refresh_rejected") == 0


def test_second_device_sign_in_keeps_the_first_signed_in(app, standin):
    """APS keeps one refresh token per person: a per-browser store would sign device A out here."""
    a = _device(app)
    b = _device(app)  # replaces the refresh token at the provider (strict mode)
    expire_access_token(app)
    statuses = []
    threads = [threading.Thread(target=lambda c=c: statuses.append(c.get("/api/profile").status_code)) for c in (a, b) * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 10
    assert standin.count("refresh_rejected") == 0


def test_logout_ends_only_this_browser_and_revokes_with_the_last(app, standin):
    a, b = _device(app), _device(app)
    token = stored_user(app).refresh_token
    assert a.post("/auth/logout", data={"csrf_token": _csrf(a)}).status_code == 302
    assert a.get("/api/session").status_code == 401
    assert b.get("/api/session").status_code == 200
    assert standin.refresh_token(token)["status"] == "active"  # others still rely on it
    b.post("/auth/logout", data={"csrf_token": _csrf(b)})
    assert standin.refresh_token(token)["status"] == "revoked"
    assert stored_user(app).refresh_token is None


def test_logout_everywhere_ends_all_sessions_and_revokes(app, standin):
    a, b = _device(app), _device(app)
    token = stored_user(app).refresh_token
    assert a.post("/auth/logout-everywhere", data={"csrf_token": _csrf(a)}).status_code == 302
    assert a.get("/api/session").status_code == 401
    assert b.get("/api/session").status_code == 401
    assert standin.refresh_token(token)["status"] == "revoked"


def test_end_one_device_from_another(app):
    a, b = _device(app), _device(app)
    with app.app_context():
        from models import UserSession, db

        hashes = db.session.execute(db.select(UserSession.id_hash).order_by(UserSession.created_at)).scalars().all()
    reply = b.post("/auth/sessions/end", data={"csrf_token": _csrf(b), "session": hashes[0], "next": "/"})
    assert reply.status_code == 302
    assert a.get("/api/session").status_code == 401
    assert b.get("/api/session").status_code == 200


def test_cannot_end_another_persons_session(app):
    a = _device(app, "Ada Lovelace")
    b = _device(app, "Grace Hopper")
    with app.app_context():
        from models import User, UserSession, db

        ada = db.session.execute(db.select(UserSession.id_hash).join(User).where(User.name == "Ada Lovelace")).scalar_one()
    assert b.post("/auth/sessions/end", data={"csrf_token": _csrf(b), "session": ada}).status_code == 404
    assert a.get("/api/session").status_code == 200


@pytest.mark.parametrize("how", ["logout", "logout-everywhere"])
def test_sign_out_revokes_the_access_and_viewer_tokens_too(app, standin, how):
    """Tokens already handed out (the viewer's to the browser) stop working at sign-out, not at their expiry."""
    a = _device(app)
    viewer = a.get("/api/viewer-token").get_json()["access_token"]
    user = stored_user(app)
    assert standin.access_token(user.access_token) and standin.access_token(viewer)
    a.post(f"/auth/{how}", data={"csrf_token": _csrf(a)})
    assert standin.refresh_token(user.refresh_token)["status"] == "revoked"
    assert standin.access_token(user.access_token) is None
    assert standin.access_token(viewer) is None


def test_sign_out_of_one_device_keeps_the_tokens_the_others_use(app, standin):
    a, b = _device(app), _device(app)
    user = stored_user(app)
    a.post("/auth/logout", data={"csrf_token": _csrf(a)})
    assert standin.access_token(user.access_token) is not None
    assert b.get("/api/profile").status_code == 200


@pytest.mark.parametrize("how", ["logout", "logout-everywhere"])
def test_sign_out_revokes_every_viewer_token_handed_out_and_the_previous_access_token(app, standin, how):
    """A viewer token handed out before a newer one, or before another device's sign-in replaced it, stops at sign-out too."""
    a = _device(app)
    first_viewer = a.get("/api/viewer-token").get_json()["access_token"]
    first_access = stored_user(app).access_token
    expire_access_token(app, field="viewer_expires_at")
    second_viewer = a.get("/api/viewer-token").get_json()["access_token"]  # a newer one; the first still lives
    assert second_viewer != first_viewer
    b = _device(app)  # another device's sign-in replaces the stored tokens for both; the access token it replaced still lives
    assert stored_user(app).access_token != first_access
    b_viewer = b.get("/api/viewer-token").get_json()["access_token"]
    for token in (first_viewer, second_viewer, first_access, b_viewer):
        assert standin.access_token(token) is not None
    if how == "logout":
        a.post("/auth/logout", data={"csrf_token": _csrf(a)})
        b.post("/auth/logout", data={"csrf_token": _csrf(b)})  # the last session: everything still alive goes
    else:
        a.post("/auth/logout-everywhere", data={"csrf_token": _csrf(a)})
    for token in (first_viewer, second_viewer, first_access, b_viewer):
        assert standin.access_token(token) is None


def test_sign_out_of_one_device_revokes_the_viewer_tokens_only_it_was_handed(app, standin):
    a, b = _device(app), _device(app)
    shared = a.get("/api/viewer-token").get_json()["access_token"]
    assert b.get("/api/viewer-token").get_json()["access_token"] == shared  # the same token, handed to both
    expire_access_token(app, field="viewer_expires_at")
    a_only = a.get("/api/viewer-token").get_json()["access_token"]
    a.post("/auth/logout", data={"csrf_token": _csrf(a)})
    assert standin.access_token(a_only) is None  # this device's alone
    assert standin.access_token(shared) is not None  # b holds it too
    reply = b.get("/api/viewer-token").get_json()
    assert standin.access_token(reply["access_token"]) is not None  # b's viewer gets a live token, never the revoked one
    assert b.get("/api/profile").status_code == 200
