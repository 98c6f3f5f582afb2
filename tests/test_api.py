"""GET /api/session for front ends: freshness, sign-out URL and CSRF token, and it never keeps a session alive."""

from datetime import datetime, timedelta

from sqlalchemy import select, update

from conftest import expire_access_token, sign_in
from models import UserSession, db, utcnow


def session_row(app) -> UserSession:
    with app.app_context():
        row = db.session.execute(select(UserSession)).scalar_one()
        db.session.expunge(row)
        return row


def test_session_gives_freshness_the_sign_out_url_and_the_csrf_token(client):
    sign_in(client)
    me = client.get("/api/session").get_json()
    assert me["signed_in"] is True and me["user"]["name"] == "Ada Lovelace"
    assert me["access_token_fresh"] is True
    assert datetime.fromisoformat(me["access_token_refreshed_at"]) > utcnow() - timedelta(minutes=1)  # issued at sign-in
    assert me["last_refresh"] is None and me["last_refresh_failed"] is False
    assert datetime.fromisoformat(me["session_expires_at"]) > utcnow() + timedelta(days=14)
    assert me["sign_out_url"] == "/auth/logout"
    # What a script needs to sign out: the URL and the token, sent back in a header.
    out = client.post(me["sign_out_url"], headers={"X-CSRF-Token": me["csrf_token"], "Sec-Fetch-Site": "same-origin"})
    assert out.status_code == 302
    assert client.get("/api/session").status_code == 401


def test_polling_the_session_never_keeps_it_alive(app, client, standin):
    """A tab left open that polls /api/session: no refresh, no last-seen write, no new cookie; a page does all three."""
    sign_in(client)
    long_ago = utcnow() - timedelta(hours=2)
    with app.app_context():
        # The person left two hours ago; their session ends tomorrow and the cookie was told so.
        tomorrow = utcnow() + timedelta(days=1)
        db.session.execute(update(UserSession).values(last_seen_at=long_ago, expires_at=tomorrow, cookie_expires_at=tomorrow))
        db.session.commit()
    expire_access_token(app)
    before, refreshes = session_row(app), standin.count("refresh")
    for _ in range(5):
        reply = client.get("/api/session")
        assert reply.status_code == 200
        assert reply.get_json()["access_token_fresh"] is False
        assert "Set-Cookie" not in reply.headers
    after = session_row(app)
    assert standin.count("refresh") == refreshes
    assert (after.last_seen_at, after.expires_at, after.cookie_expires_at) == (before.last_seen_at, before.expires_at, before.cookie_expires_at)

    # The person comes back: the page refreshes the token, and the session and the cookie move on.
    assert client.get("/").status_code == 200
    back = session_row(app)
    assert standin.count("refresh") == refreshes + 1
    assert back.last_seen_at > long_ago + timedelta(hours=1)
    assert back.expires_at > utcnow() + timedelta(days=14)
    assert client.get("/api/session").get_json()["access_token_fresh"] is True


def test_session_says_when_the_last_refresh_failed(app, client, standin):
    sign_in(client)
    standin.inject("5xx")
    expire_access_token(app)
    assert client.get("/api/profile").status_code == 503
    me = client.get("/api/session").get_json()
    assert me["last_refresh_failed"] is True and me["last_refresh"]["outcome"] == "unavailable"
    assert me["access_token_fresh"] is False
    assert client.get("/api/profile").status_code == 200
    again = client.get("/api/session").get_json()
    assert again["last_refresh_failed"] is False and again["last_refresh"]["outcome"] == "refreshed"
    assert again["access_token_refreshed_at"] > me["access_token_refreshed_at"]
