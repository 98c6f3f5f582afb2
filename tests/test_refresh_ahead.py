"""Refresh ahead of expiry: a request near the leeway keeps its valid token, and the refresh runs after its response."""

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest
import requests
import sqlalchemy

import after_response
import config
import locking
import tokens
from conftest import expire_access_token, sign_in, stored_user
from models import RefreshEvent, User, db, utcnow
from servers import Gunicorn, burst, expire_access_token_in, http_sign_in, instances

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
    assert after_response.wait_idle(timeout=30)
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
    assert after_response.wait_idle(timeout=30)

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


@contextlib.contextmanager
def held_elsewhere(app, take: Callable[[], object]) -> Iterator[tuple[threading.Thread, threading.Event]]:
    """Hold a lock (take) in another thread until the block ends or the yielded event is set; yield that thread and event."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with app.app_context():
            take()
            holding.set()
            release.wait(30)
            db.session.rollback()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        yield holder, release
    finally:
        release.set()
        holder.join()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # SQLite's turn is its write lock: the next test
def test_refresh_ahead_gives_way_to_a_request_holding_the_turn(app, client, standin):
    """It neither waits for the turn nor refreshes: the request holding it does."""
    sign_in(client)
    due_ahead(app)
    seen = stored_user(app)
    with held_elsewhere(app, lambda: locking.current().take_turn(seen.id)) as (holder, _):
        before = standin.count("refresh")
        with app.app_context():
            tokens.refresh_ahead(seen.id, seen.access_expires_at, "GET /api/profile")  # a wait would end in LockTimeout
        assert standin.count("refresh") == before
        assert holder.is_alive()  # still holding: it returned without waiting for the turn
    # The turn free again, the next request near expiry refreshes ahead.
    assert get_and_close(client, "/api/profile").status_code == 200
    assert standin.count("refresh") == before + 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_on_sqlite_a_refresh_ahead_waits_for_the_write_lock_and_refreshes(app, client, standin):
    """The write lock is everyone's: held by another person's refresh, a refresh ahead waits for it instead of giving way."""
    sign_in(client)
    due_ahead(app)
    seen = stored_user(app)
    # As another person's refresh, sign-in or sign-out holds it.
    with held_elsewhere(app, lambda: locking.current().begin()) as (_, release):
        before = standin.count("refresh")
        threading.Timer(0.5, release.set).start()
        with app.app_context():
            tokens.refresh_ahead(seen.id, seen.access_expires_at, "GET /api/profile")
    assert standin.count("refresh") == before + 1
    assert stored_user(app).access_expires_at != seen.access_expires_at
    assert [e.trigger.endswith("(ahead)") for e in refresh_events(app) if e.outcome == "refreshed"][-1:] == [True]


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


# --- Real gunicorn workers and instances, the stand-in answering refreshes late ----------------------

LEEWAY = 60
# Access tokens live 70 s and count as expired 60 s early: a new expiry every 10 seconds, refreshed
# ahead in the second half of those 10 (half the usable life, less than TOKEN_REFRESH_AHEAD).
TTL = 70


@pytest.fixture
def instance(tmp_path, database_url):
    """Start app instances on this test's database, all sharing one stand-in provider that answers refreshes late."""
    late = {"STANDIN_REFRESH_DELAY_MS": "1000", "TOKEN_REFRESH_AHEAD": "300"}
    with instances(tmp_path, database_url, STANDIN_ACCESS_TOKEN_TTL=str(TTL), TOKEN_REFRESH_LEEWAY=str(LEEWAY), **late) as start:
        start.database_url = database_url
        yield start


def wait_until_due_ahead(browser: requests.Session, base_url: str) -> float:
    """Sleep until the person's access token is due ahead (and 3 s from counting as expired); return its expiry."""
    expires = datetime.fromisoformat(browser.get(f"{base_url}/api/session", timeout=30).json()["access_token_expires_at"]).timestamp()
    # The expiry comes in whole seconds, rounded down: the window (expiry - 65 s, expiry - 60 s) starts at most 1 s later.
    time.sleep(max(0.0, expires - LEEWAY - 3 - time.time()))
    return expires


def access_events(database_url: str) -> list[tuple[str, str, int]]:
    """Return the app's access refresh events as (outcome, trigger, waiters)."""
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as conn:
            query = "SELECT outcome, trigger, waiters FROM refresh_events WHERE kind = 'access' ORDER BY id"
            return [tuple(row) for row in conn.execute(sqlalchemy.text(query))]
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_person_browsing_never_waits_for_the_provider(instance):
    """A request every 250 ms across two expiries, the provider taking 1 s: every refresh ran ahead, none in line."""
    server = instance()
    store = instance.store
    browser = http_sign_in(server.url)
    before = store.count("refresh")
    statuses = []
    deadline = time.monotonic() + 2 * (TTL - LEEWAY) + 1
    while time.monotonic() < deadline:
        statuses.append(browser.get(f"{server.url}/api/profile", timeout=30).status_code)
        time.sleep(0.25)
    assert set(statuses) == {200}
    refreshed = [(trigger, waiters) for outcome, trigger, waiters in access_events(instance.database_url) if outcome == "refreshed"]
    assert len(refreshed) == store.count("refresh") - before >= 2
    assert all(trigger.endswith("(ahead)") and waiters == 0 for trigger, waiters in refreshed), refreshed
    assert store.count("refresh_rejected") == 0


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # instances on several machines share PostgreSQL
def test_workers_and_instances_refresh_ahead_once_per_expiry(instance):
    """50 requests at once while the token is due ahead, over 2 instances x 3 workers: one refresh, after the responses."""
    first, second = instance(), instance()
    store = instance.store
    browser = http_sign_in(first.url)
    start = store.count("refresh")
    for expiry in (1, 2):
        wait_until_due_ahead(browser, first.url)
        assert store.count("refresh") - start == expiry - 1  # the token before was refreshed once, no more
        assert burst(browser, [f"{first.url}/api/profile", f"{second.url}/api/profile"]) == [200] * 50
        # Every worker that served one scheduled a refresh ahead; the first to take the turn did it, the rest gave way.
        deadline = time.monotonic() + 30
        while store.count("refresh") - start < expiry and time.monotonic() < deadline:
            time.sleep(0.1)
    wait_until_due_ahead(browser, first.url)
    assert store.count("refresh") - start == 2
    assert store.count("refresh_rejected") == 0


def refresh_ahead_in_flight(instance, server: Gunicorn, delay: float) -> tuple[requests.Session, int, int]:
    """Sign in, send a request while the token is due ahead with the provider hanging for delay seconds.

    Return the browser, the worker refreshing, and the provider's count of refreshes before it.
    """
    store = instance.store
    browser = http_sign_in(server.url)
    before = store.count("refresh")  # the sign-in's own (the viewer token's) counted
    expire_access_token_in(instance.database_url, LEEWAY + 3, lifetime=TTL)  # due ahead, as wait_until_due_ahead leaves it
    store.inject("timeout", delay=delay)  # the next refresh: the one ahead
    assert browser.get(f"{server.url}/api/profile", timeout=30).status_code == 200
    deadline = time.monotonic() + 20
    while not store.fault_takers() and time.monotonic() < deadline:
        time.sleep(0.05)
    (refresher,) = store.fault_takers()
    return browser, refresher, before


@pytest.mark.slow
def test_a_graceful_stop_finishes_a_refresh_ahead(instance):
    server = instance(workers=1)
    store = instance.store
    browser, _, before = refresh_ahead_in_flight(instance, server, delay=3)
    server.stop()  # SIGTERM while the provider is still answering
    # The refresh finished at the provider and its rotation was stored: the restarted server goes on with it.
    assert store.count("refresh") - before == 1
    assert [(o, t.endswith("(ahead)")) for o, t, _ in access_events(instance.database_url)] == [("refreshed", True)]
    restarted = instance(port=server.port, workers=1)
    expire_access_token_in(instance.database_url, LEEWAY - 1)  # past the leeway: this request refreshes in line, with the rotation the stopped worker stored
    assert browser.get(f"{restarted.url}/api/profile", timeout=30).status_code == 200
    assert store.count("refresh") - before == 2
    assert store.count("refresh_rejected") == 0


@pytest.mark.slow
def test_a_worker_killed_during_a_refresh_ahead_costs_no_sign_in(instance):
    server = instance(PROVIDER_TIMEOUT="20")
    store = instance.store
    browser, refresher, before = refresh_ahead_in_flight(instance, server, delay=8)
    assert refresher in server.workers()
    os.kill(refresher, signal.SIGKILL)
    browser.close()  # its kept-alive connection may have been to the killed worker
    # The provider never rotated in the dead worker, and the database let go of its locks: the others carry on.
    statuses = []
    deadline = time.monotonic() + 5  # past the leeway, not yet into the next token's window
    while time.monotonic() < deadline:
        statuses.append(browser.get(f"{server.url}/api/profile", timeout=30).status_code)
        time.sleep(0.25)
    assert set(statuses) == {200}
    deadline = time.monotonic() + 20
    while store.count("refresh") == before and time.monotonic() < deadline:
        time.sleep(0.1)  # the last refresh ahead may still be at the provider
    assert store.count("refresh") - before == 1
    assert store.count("refresh_rejected") == 0
