"""Refresh ahead of expiry: a request near the leeway keeps its valid token, and the refresh runs after its response."""

import threading
from datetime import timedelta

import pytest

import ahead
import config
import locking
import tokens
from conftest import expire_access_token, sign_in, stored_user
from models import RefreshEvent, User, db, utcnow

# Within the default TOKEN_REFRESH_AHEAD (300 s) of counting as expired (the default leeway, 60 s, before expiry).
DUE_AHEAD = timedelta(seconds=60 + 120)


def due_ahead(app, name: str = "Ada Lovelace") -> None:
    """Make the stored access token still valid, but within TOKEN_REFRESH_AHEAD of counting as expired, as if most of its hour had passed."""
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.name == name)).scalar_one()
        user.access_expires_at = utcnow() + DUE_AHEAD
        user.signed_in_at = user.access_expires_at - timedelta(hours=1)
        db.session.commit()


def refresh_events(app) -> list[RefreshEvent]:
    with app.app_context():
        rows = list(db.session.execute(db.select(RefreshEvent).where(RefreshEvent.kind == "access").order_by(RefreshEvent.id)).scalars())
        db.session.expunge_all()
        return rows


def get_and_close(client, path: str):
    """Send a request and close its response, as a server does once the response is sent."""
    response = client.get(path, buffered=True)
    assert ahead.wait_idle(timeout=30)
    return response


def test_a_token_near_expiry_is_served_and_refreshed_after_the_response(app, client, standin):
    sign_in(client)
    due_ahead(app)
    old = stored_user(app)
    before = standin.count("refresh")

    served = client.get("/api/profile")  # the response is not closed yet: nothing has started
    assert served.status_code == 200
    assert standin.count("refresh") == before
    assert stored_user(app).access_token == old.access_token
    served.close()
    assert ahead.wait_idle(timeout=30)

    new = stored_user(app)
    assert standin.count("refresh") - before == 1
    assert new.access_token != old.access_token and new.refresh_token != old.refresh_token
    assert new.access_expires_at > utcnow() + timedelta(minutes=50)
    (event,) = [e for e in refresh_events(app) if e.outcome == "refreshed"]
    assert event.trigger == "GET /api/profile (ahead)"
    # The session page says which refresh ran ahead.
    assert "refreshed ahead of expiry" in client.get("/session").get_data(as_text=True)
    assert client.get("/api/lifecycle").get_json()["refreshes"][0]["ahead"] is True


def test_many_requests_near_expiry_refresh_once(app, client, standin):
    sign_in(client)
    due_ahead(app)
    before = standin.count("refresh")
    for _ in range(5):
        assert get_and_close(client, "/api/profile").status_code == 200
    assert standin.count("refresh") - before == 1


def test_a_token_past_the_leeway_still_refreshes_in_line(app, client, standin):
    sign_in(client)
    expire_access_token(app)
    before = standin.count("refresh")
    served = client.get("/api/profile")
    assert served.status_code == 200
    assert standin.count("refresh") - before == 1  # before the response, not after it
    assert [e.trigger for e in refresh_events(app) if e.outcome == "refreshed"] == ["GET /api/profile"]


def test_refresh_ahead_can_be_turned_off(app_factory):
    app = app_factory(TOKEN_REFRESH_AHEAD=0)
    client = app.test_client()
    sign_in(client)
    due_ahead(app)
    store = app.extensions["standin"].extensions["standin_store"]
    before = store.count("refresh")
    assert get_and_close(client, "/api/profile").status_code == 200
    assert store.count("refresh") == before


def test_a_short_lived_token_is_not_refreshed_on_every_request(app, client, standin):
    """A token that lives less than the window is refreshed ahead only in the second half of its usable life."""
    sign_in(client)
    with app.app_context():
        user = db.session.execute(db.select(User)).scalar_one()
        user.signed_in_at = utcnow() - timedelta(seconds=1)
        user.access_expires_at = user.signed_in_at + timedelta(seconds=60 + 30)  # 30 s usable: refresh ahead in the last 15
        db.session.commit()
    before = standin.count("refresh")
    assert get_and_close(client, "/api/profile").status_code == 200
    assert standin.count("refresh") == before


def test_no_refresh_ahead_after_sign_out(app, client, standin):
    """The person signs out between the request that saw the token near expiry and the refresh after it."""
    sign_in(client)
    due_ahead(app)
    seen = stored_user(app)
    csrf = client.get("/api/session").get_json()["csrf_token"]
    assert client.post("/auth/logout", data={"csrf_token": csrf}).status_code == 302
    before = standin.count("refresh")
    with app.app_context():
        tokens.refresh_ahead(seen.id, seen.access_expires_at, "GET /api/profile")
    assert standin.count("refresh") == before
    assert stored_user(app).refresh_token is None


def test_refresh_ahead_gives_way_to_a_request_holding_the_turn(app, client, standin):
    """It neither waits for the turn nor refreshes: the request holding it does."""
    sign_in(client)
    due_ahead(app)
    seen = stored_user(app)
    holding, release = threading.Event(), threading.Event()

    def hold_the_turn() -> None:
        with app.app_context():
            assert locking.current().take_turn(seen.id)
            holding.set()
            release.wait(30)
            db.session.rollback()

    holder = threading.Thread(target=hold_the_turn)
    holder.start()
    try:
        assert holding.wait(30)
        before = standin.count("refresh")
        with app.app_context():
            tokens.refresh_ahead(seen.id, seen.access_expires_at, "GET /api/profile")  # a wait would end in LockTimeout
        assert standin.count("refresh") == before
        assert holder.is_alive()  # still holding: it returned without waiting for the turn
    finally:
        release.set()
        holder.join()
    # The turn free again, the next request near expiry refreshes ahead.
    assert get_and_close(client, "/api/profile").status_code == 200
    assert standin.count("refresh") == before + 1


def test_a_failed_refresh_ahead_is_recorded_and_the_next_request_refreshes(app, client, standin):
    sign_in(client)
    due_ahead(app)
    old = stored_user(app)
    standin.inject("5xx")
    assert get_and_close(client, "/api/profile").status_code == 200  # served with the valid token all the same
    failed = [e for e in refresh_events(app) if e.trigger.endswith("(ahead)")]
    assert [e.outcome for e in failed] == ["unavailable"]
    assert stored_user(app).refresh_token == old.refresh_token  # nothing was consumed
    before = standin.count("refresh")
    assert get_and_close(client, "/api/profile").status_code == 200
    assert standin.count("refresh") - before == 1
    assert standin.count("refresh_rejected") == 0


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_a_bad_refresh_ahead_setting_stops_start_up(value, tmp_path):
    with pytest.raises(config.ConfigError, match="TOKEN_REFRESH_AHEAD"):
        config.load({"TOKEN_REFRESH_AHEAD": value}, str(tmp_path / "instance"))
