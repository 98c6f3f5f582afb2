"""No sign-in lost: the cookie slides, rotations are stored durably, sign-out cannot wipe a new sign-in,
no orphan sessions, lost replies are found, dead grants resume silently, the database may restart."""

import contextlib
import random
import re
import threading
import time
from datetime import timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import event, select, text, update
from sqlalchemy.exc import OperationalError

from app import create_app
from conftest import close_databases, expire_access_token, make_config, migrate_fresh, sign_in, stored_user
from models import RefreshEvent, User, UserSession, db, utcnow
from pgbouncer import ON_POSTGRESQL, PgBouncer, pgbouncer_app_factory, pgbouncer_server  # noqa: F401 (fixtures used by name)
from standin.store import refresh_tokens


def _csrf_from_page(client) -> str:
    page = client.get("/").get_data(as_text=True)
    return page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


def _session_set_cookie(reply) -> dict | None:
    """Return the attributes of the session cookie this reply sets, if it sets one."""
    for header in reply.headers.getlist("Set-Cookie"):
        name, _, rest = header.partition("=")
        if name == "session":
            value, *attributes = rest.split("; ")
            fields = dict(a.partition("=")[::2] for a in attributes)
            return {"value": value, **{k.lower(): v for k, v in fields.items()}}
    return None


def _age_sign_in(app, days: int) -> None:
    """Rewrite the stored times as if the person signed in (and the cookie was set) days ago."""
    then = utcnow() + timedelta(days=15 - days)
    with app.app_context():
        db.session.execute(update(User).values(refresh_expires_at=then))
        values = {"expires_at": then}
        if "cookie_expires_at" in UserSession.__table__.c:
            values["cookie_expires_at"] = then
        db.session.execute(update(UserSession).values(**values))
        db.session.commit()


# 1. The cookie slides.


def test_cookie_follows_the_rotations(app, client):
    """Someone who uses the app daily is not signed out by their browser on day 15."""
    sign_in(client)
    _age_sign_in(app, days=14)
    expire_access_token(app)
    reply = client.get("/api/profile")
    assert reply.status_code == 200
    cookie = _session_set_cookie(reply)
    assert cookie is not None, "the cookie was not re-issued after the rotation moved the session on"
    assert parsedate_to_datetime(cookie["expires"]) > utcnow() + timedelta(days=14)
    assert cookie["value"] == client.get_cookie("session").value
    # Told once: the next answers leave the cookie alone until the expiry moves on again.
    assert _session_set_cookie(client.get("/api/session")) is None
    assert _session_set_cookie(client.get("/")) is None


def test_cookie_is_not_rewritten_on_every_request(app, client):
    sign_in(client)
    expire_access_token(app)
    assert _session_set_cookie(client.get("/api/profile")) is None  # moved by minutes, not a day


# 2. A rotation that is not stored is a sign-in lost.


def _keep_rotations(app) -> list:
    """Keep every reply of the provider's refresh, to compare with what was stored."""
    provider = app.extensions["provider"]
    rotated, refresh = [], provider.refresh
    provider.refresh = lambda *args, **kwargs: rotated.append(refresh(*args, **kwargs)) or rotated[-1]
    return rotated


def _access_refreshes(app) -> list:
    """Return the ids of the recorded successful access refreshes."""
    with app.app_context():
        return db.session.execute(select(RefreshEvent.id).where(RefreshEvent.kind == "access", RefreshEvent.outcome == "refreshed")).scalars().all()


def test_nul_in_the_path_when_the_token_is_due_loses_nothing(app, client, standin):
    """A cross-site link to /%00 carries the cookie; the refresh it triggers must still be stored."""
    sign_in(client)
    expire_access_token(app)
    reply = client.get("/%00")
    assert reply.status_code < 500
    assert client.get("/api/profile").status_code == 200
    expire_access_token(app)
    assert client.get("/api/profile").status_code == 200
    assert standin.count("refresh_rejected") == 0


def test_failed_commit_after_rotation_is_retried_and_the_person_stays_signed_in(app, client, standin):
    """The first commit after the provider rotated fails (a restart, a deadlock): retried on a fresh connection."""
    sign_in(client)
    expire_access_token(app)
    rotated = _keep_rotations(app)
    failed = []

    def fail_first_commit_after_rotation(conn):
        if rotated and not failed:
            failed.append(True)
            raise OperationalError("COMMIT", {}, Exception("injected: the connection dropped during COMMIT"))

    with app.app_context():
        engine = db.engine
    event.listen(engine, "commit", fail_first_commit_after_rotation)
    try:
        reply = client.get("/api/profile")
    finally:
        event.remove(engine, "commit", fail_first_commit_after_rotation)
    assert failed, "the fault was never injected"
    assert reply.status_code == 200
    assert stored_user(app).refresh_token == rotated[0].refresh_token
    assert len(_access_refreshes(app)) == 1  # stored with the tokens' retry, on its own
    expire_access_token(app)
    assert client.get("/api/profile").status_code == 200
    assert standin.count("refresh_rejected") == 0


# The database refuses every "refreshed" event row: SQLite by a trigger, PostgreSQL by a check constraint.
REFUSE_REFRESHED_EVENTS = {
    "sqlite": "CREATE TRIGGER refuse_refreshed BEFORE INSERT ON refresh_events WHEN NEW.outcome = 'refreshed' BEGIN SELECT RAISE(ABORT, 'refused'); END",
    "postgresql": "ALTER TABLE refresh_events ADD CONSTRAINT refuse_refreshed CHECK (outcome <> 'refreshed') NOT VALID",
}


def test_a_refused_refresh_event_does_not_take_the_rotated_tokens_down(app, client, standin, caplog):
    """The event rides in the commit that stores the rotation; if the database refuses it, the tokens are stored alone."""
    sign_in(client)
    with app.app_context():
        db.session.execute(text(REFUSE_REFRESHED_EVENTS[db.engine.dialect.name]))
        db.session.commit()
    rotated = _keep_rotations(app)
    expire_access_token(app)
    assert client.get("/api/profile").status_code == 200
    assert stored_user(app).refresh_token == rotated[0].refresh_token
    expire_access_token(app)
    assert client.get("/api/profile").status_code == 200
    assert standin.count("refresh_rejected") == 0
    assert _access_refreshes(app) == []  # the fault was there: the events were refused, the tokens were not
    assert "refresh_event_not_recorded" in caplog.text  # and it says so


# 3. Sign-out racing a sign-in on another device.


def _callback_url(client) -> str:
    """Walk a new browser through the stand-in's form up to the callback link, without following it."""
    login = client.get("/auth/login")
    authorize = urlsplit(login.headers["Location"])
    consent = client.post(authorize.path, query_string=authorize.query, data={"name": "Ada Lovelace"})
    return consent.headers["Location"]


def _race(leaving, arriving, callback: str, delay: float) -> None:
    """Sign out the last session of one browser while another browser's callback signs the person in."""
    token = _csrf_from_page(leaving)
    back = urlsplit(callback)
    barrier = threading.Barrier(2)

    def sign_out():
        barrier.wait()
        time.sleep(delay)
        leaving.post("/auth/logout", data={"csrf_token": token})

    def sign_in_there():
        barrier.wait()
        arriving.get(back.path, query_string=back.query)

    threads = [threading.Thread(target=sign_out), threading.Thread(target=sign_in_there)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_sign_out_racing_a_sign_in_elsewhere_never_wipes_the_new_sign_in(app_factory):
    _sign_out_races_a_sign_in_elsewhere(app_factory(SIGNIN_RATE_LIMIT="off"))


@ON_POSTGRESQL
def test_sign_out_racing_a_sign_in_elsewhere_through_pgbouncer(pgbouncer_app_factory):  # noqa: F811 (the fixture)
    """The same race when each transaction may run on another server connection of a transaction-mode pooler."""
    _sign_out_races_a_sign_in_elsewhere(pgbouncer_app_factory(SIGNIN_RATE_LIMIT="off"))


def _sign_out_races_a_sign_in_elsewhere(app) -> None:
    standin = app.extensions["standin"].extensions["standin_store"]
    leaving = app.test_client()
    sign_in(leaving)
    rng = random.Random(7)
    for attempt in range(25):
        arriving = app.test_client()
        _race(leaving, arriving, _callback_url(arriving), rng.uniform(0, 0.03))
        assert arriving.get("/api/session").status_code == 200, f"attempt {attempt}: the new sign-in was wiped"
        stored = stored_user(app).refresh_token
        assert stored is not None and standin.refresh_token(stored)["status"] == "active", f"attempt {attempt}"
        leaving = arriving


def test_sign_in_elsewhere_during_a_refresh_keeps_the_first_device_signed_in(app, standin, monkeypatch):
    """B's code exchange revokes A's refresh token before B stores the new grant; A's refresh in between must not end A."""
    a, b = app.test_client(), app.test_client()
    sign_in(a)
    expire_access_token(app)
    back = urlsplit(_callback_url(b))
    provider = app.extensions["provider"]
    exchanged, answered = threading.Event(), threading.Event()
    userinfo = provider.userinfo

    def held_userinfo(token):
        exchanged.set()
        answered.wait(10)  # B holds the new grant but has not stored it until A has its reply
        return userinfo(token)

    monkeypatch.setattr(provider, "userinfo", held_userinfo)
    arriving = threading.Thread(target=lambda: b.get(back.path, query_string=back.query))
    arriving.start()
    assert exchanged.wait(10)
    reply = a.get("/api/session")  # A's token is due: it refreshes with the token B's exchange revoked
    answered.set()
    arriving.join(10)
    assert reply.status_code == 200
    assert a.get("/api/session").status_code == 200 and b.get("/api/session").status_code == 200


# 4. No orphans after sign_in_required.


def test_session_answered_sign_in_required_no_longer_counts_as_signed_in(app, client, standin):
    """A session whose grant is gone ends with its answer; a later sign-out then revokes the new grant."""
    sign_in(client)
    with app.app_context():  # the grant was wiped (as the sign-out race did), the session row left behind
        db.session.execute(update(User).values(refresh_token=None, access_token=None, access_expires_at=None))
        db.session.commit()
    assert client.get("/api/profile").status_code == 401
    other = app.test_client()
    sign_in(other)
    token = stored_user(app).refresh_token
    other.post("/auth/logout", data={"csrf_token": _csrf_from_page(other)})
    assert standin.refresh_token(token)["status"] == "revoked"


# 5. A lost reply after the provider rotated.


def test_refresh_waits_longer_than_other_calls_for_its_reply(app_factory):
    """A slow refresh (3 s) is not cut off by the 2 s timeout of other calls: its reply carries the new token."""
    app = app_factory(PROVIDER_TIMEOUT=2, PROVIDER_REFRESH_TIMEOUT=5)
    client = app.test_client()
    sign_in(client)
    store = app.extensions["standin"].extensions["standin_store"]
    store.inject("timeout", delay=3)
    expire_access_token(app)
    assert client.get("/api/profile").status_code == 200
    assert store.count("refresh_rejected") == 0


def test_lost_rotation_shows_on_the_session_page(app, client, standin):
    sign_in(client)
    standin.inject("drop")
    expire_access_token(app)
    assert client.get("/api/profile").status_code == 401
    sign_in(client)
    outcomes = [e["outcome"] for e in client.get("/api/lifecycle").get_json()["refreshes"]]
    assert "lost_rotation" in outcomes
    assert "lost_rotation" in client.get("/session").get_data(as_text=True)


# 6. Silent re-sign-in.


def _follow(client, reply, limit: int = 10) -> tuple[object, list[str]]:
    """Follow redirects by hand; return the final reply and every path visited on the way."""
    visited = []
    while reply.status_code in (301, 302, 303) and limit:
        target = urlsplit(reply.headers["Location"])
        visited.append(target.path)
        reply = client.get(target.path, query_string=target.query)
        limit -= 1
    return reply, visited


def _kill_grant_at_provider(app, standin) -> None:
    with standin.transaction() as conn:
        conn.execute(update(refresh_tokens).values(status="revoked"))
    expire_access_token(app)


def test_dead_grant_resumes_silently_on_the_same_page(app, client, standin):
    _dead_grant_resumes_silently(app, client, standin)


@ON_POSTGRESQL
def test_dead_grant_resumes_silently_through_pgbouncer(pgbouncer_app_factory, standin_for):  # noqa: F811 (the fixture)
    app = pgbouncer_app_factory()
    _dead_grant_resumes_silently(app, app.test_client(), standin_for(app))


def _dead_grant_resumes_silently(app, client, standin) -> None:
    sign_in(client)
    _kill_grant_at_provider(app, standin)
    final, visited = _follow(client, client.get("/session?tab=2"))
    assert final.status_code == 200
    assert visited[-1] == "/session"
    assert "/standin/authentication/v2/authorize" in visited  # through the provider, which showed no form
    assert 'name="name"' not in final.get_data(as_text=True)
    assert client.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"


def test_dead_grant_seen_by_an_api_call_resumes_at_the_next_page(app, client, standin):
    sign_in(client)
    _kill_grant_at_provider(app, standin)
    assert client.get("/api/profile").status_code == 401
    final, visited = _follow(client, client.get("/devices"))
    assert final.status_code == 200 and visited[-1] == "/devices"
    assert client.get("/api/session").status_code == 200


def test_silent_sign_in_falls_back_to_the_form_with_a_notice(app, client, standin):
    sign_in(client)
    client.get("/standin/authentication/v2/logout")  # the provider's own session ends too
    _kill_grant_at_provider(app, standin)
    final, visited = _follow(client, client.get("/session"))
    assert visited[-1] == "/auth/callback"
    page = final.get_data(as_text=True)
    assert "sign in again" in page.lower()
    assert "/auth/login?next=/session" in page.replace("%2F", "/")
    # No loop: the next visit is a plain signed-out page.
    assert client.get("/").status_code == 200


def test_silent_sign_in_that_meets_a_provider_hiccup_tries_again_silently(app, client, standin):
    """The silent sign-in's own code exchange loses its reply: Try again stays silent and keeps the page."""
    sign_in(client)
    expire_access_token(app)
    standin.inject("drop", count=2)  # the refresh's reply, then the silent sign-in's code exchange reply
    final, visited = _follow(client, client.get("/session"))
    assert visited[-1] == "/auth/callback" and final.status_code == 503
    again = urlsplit(re.search(r'href="([^"]+)">Try again<', final.get_data(as_text=True))[1].replace("&amp;", "&"))
    final, visited = _follow(client, client.get(again.path, query_string=again.query))
    assert visited[-1] == "/session" and final.status_code == 200
    assert 'name="name"' not in final.get_data(as_text=True)


def test_api_calls_never_redirect_to_a_silent_sign_in(app, client, standin):
    sign_in(client)
    _kill_grant_at_provider(app, standin)
    reply = client.get("/api/profile")
    assert reply.status_code == 401 and reply.get_json()["error"] == "sign_in_required"
    assert client.get("/api/session").status_code == 401


def test_every_api_route_answers_401_json_after_a_grant_died_and_keeps_the_cookie_that_resumes_it(app, client, standin):
    """The session page polls /api/lifecycle: a redirect there would drop the cookie the next page load needs to resume silently."""
    sign_in(client)
    _kill_grant_at_provider(app, standin)
    assert client.get("/api/profile").status_code == 401  # the refresh finds the grant dead and ends the session
    samples = {"path": "project/v1/hubs"}
    routes = [rule for rule in app.url_map.iter_rules() if rule.rule.startswith("/api/") and "GET" in rule.methods]
    assert {"/api/lifecycle", "/api/session", "/api/profile", "/api/viewer-token"} <= {rule.rule for rule in routes}
    for rule in routes:
        path = rule.build({name: samples[name] for name in rule.arguments})[1]
        reply = client.get(path)
        assert (reply.status_code, reply.is_json) == (401, True), path
        assert "Set-Cookie" not in reply.headers, path
    final, visited = _follow(client, client.get("/session"))
    assert final.status_code == 200 and visited[-1] == "/session"
    assert "/standin/authentication/v2/authorize" in visited and 'name="name"' not in final.get_data(as_text=True)


def test_sign_out_elsewhere_is_not_undone_by_a_silent_sign_in(app, standin):
    here, there = app.test_client(), app.test_client()
    sign_in(here)
    sign_in(there)
    there.post("/auth/logout-everywhere", data={"csrf_token": _csrf_from_page(there)})
    page = here.get("/session")
    # The app's own page says so, and its "Sign in again" is a sign-in the person asks for, never a silent one.
    assert page.status_code == 401 and "Location" not in page.headers
    again = re.search(r'href="([^"]+)">Sign in again<', page.get_data(as_text=True))[1].replace("&amp;", "&")
    assert urlsplit(again).path == "/auth/login" and parse_qs(urlsplit(again).query).get("silent") is None
    assert here.get("/api/session").status_code == 401


def test_silent_sign_in_can_be_turned_off(app_factory):
    app = app_factory(SILENT_SIGN_IN=False)
    client = app.test_client()
    sign_in(client)
    _kill_grant_at_provider(app, app.extensions["standin"].extensions["standin_store"])
    page = client.get("/session")
    assert "silent" not in page.headers["Location"]


# 7. The database restarts.


@contextlib.contextmanager
def reached(server, through: str):
    """The URL of the test's own PostgreSQL, directly or through a PgBouncer in front of it."""
    if through == "postgresql":
        yield server.url
        return
    pooler = PgBouncer(upstream=f"127.0.0.1:{server.port}").start()
    try:
        yield pooler.url_for(server.url)
    finally:
        pooler.stop()


@pytest.mark.parametrize("through", ["postgresql", "pgbouncer"])
def test_database_restart_is_not_a_500_and_keeps_the_sign_in(own_postgres, tmp_path, through):
    with reached(own_postgres, through) as url:
        _restart_keeps_the_sign_in(own_postgres, create_app(make_config(tmp_path, url)))


def _restart_keeps_the_sign_in(own_postgres, app) -> None:
    migrate_fresh(app)
    client = app.test_client()
    sign_in(client)
    assert client.get("/api/session").status_code == 200  # a pooled connection exists now
    own_postgres.restart()
    reply = client.get("/api/session")
    assert reply.status_code == 200
    assert reply.get_json()["user"]["name"] == "Ada Lovelace"
    expire_access_token(app)
    assert client.get("/api/profile").status_code == 200
    with app.app_context():
        assert db.session.execute(text("SELECT count(*) FROM refresh_events")).scalar() >= 1
    close_databases(app)


def test_first_sign_in_after_a_database_restart_succeeds(own_postgres, tmp_path):
    """A sign-in callback whose first database use meets a connection killed by the restart still signs in: no 503."""
    app = create_app(make_config(tmp_path, own_postgres.url))
    migrate_fresh(app)
    sign_in(app.test_client())  # the pools now hold connections that the restart will kill
    own_postgres.restart()
    newcomer = app.test_client()
    back = sign_in(newcomer, "Grace Hopper")
    assert back.status_code == 302, back.status_code
    assert newcomer.get("/api/session").get_json()["user"]["name"] == "Grace Hopper"
    close_databases(app)


def test_database_down_is_a_503_and_loses_nothing(own_postgres, tmp_path):
    app = create_app(make_config(tmp_path, own_postgres.url))
    migrate_fresh(app)
    client = app.test_client()
    sign_in(client)
    own_postgres.stop()
    try:
        assert client.get("/api/session").status_code == 503
        assert client.get("/session").status_code == 503
    finally:
        own_postgres.start()
    assert client.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    close_databases(app)


def test_refresh_events_record_the_outcome_of_each_refresh(app, client):
    sign_in(client)
    expire_access_token(app)
    client.get("/api/session")
    with app.app_context():
        assert db.session.execute(db.select(RefreshEvent.outcome).order_by(RefreshEvent.id.desc())).scalars().first() == "refreshed"
