"""Silent refresh: leeway, rotation, dead grants, provider faults, and waiters that re-read."""

import json
import logging
import threading
import time
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import sqlalchemy
from sqlalchemy import event, update

import tokens
from conftest import PG_ADMIN, expire_access_token, sign_in, stored_user
from models import RefreshEvent, User, UserSession, db, utcnow
from provider import ProviderUnavailable
from standin.store import refresh_tokens


def test_fresh_token_is_used_without_refresh(app, client, standin):
    sign_in(client)
    before = standin.count("refresh")
    assert client.get("/api/session").status_code == 200
    assert standin.count("refresh") == before


@pytest.mark.parametrize(("seconds_left", "refreshes"), [(59, 1), (61, 0)])
def test_leeway_boundary(app, client, standin, seconds_left, refreshes):
    sign_in(client)
    with app.app_context():
        user = db.session.execute(db.select(User)).scalar_one()
        user.access_expires_at = utcnow() + timedelta(seconds=seconds_left)
        db.session.commit()
    before = standin.count("refresh")
    assert client.get("/api/profile").status_code == 200
    assert standin.count("refresh") - before == refreshes


def test_expired_access_token_is_refreshed_and_rotation_persisted(app, client, standin):
    sign_in(client)
    old = stored_user(app)
    expire_access_token(app)
    assert client.get("/api/profile").get_json()["name"] == "Ada Lovelace"
    new = stored_user(app)
    assert new.refresh_token != old.refresh_token
    assert new.access_token != old.access_token
    assert new.refresh_rotations == old.refresh_rotations + 1
    assert new.access_expires_at > utcnow() + timedelta(minutes=50)
    # The provider agrees: the old refresh token is spent, the new one is live.
    assert standin.refresh_token(old.refresh_token)["status"] == "used"
    assert standin.refresh_token(new.refresh_token)["status"] == "active"


def test_dead_refresh_token_signs_out_page_back_to_same_page(app, client, standin):
    sign_in(client)
    standin.inject("invalid_grant")
    expire_access_token(app)
    page = client.get("/?tab=1")
    assert page.status_code == 302
    location = urlsplit(page.headers["Location"])
    assert location.path == "/auth/login"
    assert parse_qs(location.query) == {"next": ["/?tab=1"], "silent": ["1"]}
    user = stored_user(app)
    assert user.refresh_token is None and user.access_token is None
    with app.app_context():
        live = db.select(UserSession).where(UserSession.expires_at > utcnow())
        assert db.session.execute(live).first() is None


def test_dead_refresh_token_answers_401_json_for_api(app, client, standin):
    sign_in(client)
    # Expire the refresh token at the provider, as 15 days would.
    with standin.transaction() as conn:
        conn.execute(update(refresh_tokens).values(expires_at=0))
    expire_access_token(app)
    reply = client.get("/api/profile")
    assert reply.status_code == 401
    assert reply.get_json()["error"] == "sign_in_required"
    assert client.get("/api/session").status_code == 401  # the session is gone, not just this request


@pytest.mark.parametrize("fault", ["5xx", "hang"])
def test_provider_fault_answers_503_and_keeps_everything(app, client, standin, fault):
    """The provider failed without rotating (an error, or too slow and then nothing done): keep the token, retry later."""
    sign_in(client)
    before = stored_user(app)
    standin.inject(fault, delay=3)  # the app's refresh timeout is 2 s in tests
    expire_access_token(app)
    reply = client.get("/api/profile")
    assert reply.status_code == 503
    assert reply.get_json()["error"] == "provider_unavailable"
    after = stored_user(app)
    assert after.refresh_token == before.refresh_token
    assert after.refresh_unsure is False  # a lost "hang" reply was checked by introspection: the token still lives
    assert client.get("/api/profile").status_code == 200
    assert stored_user(app).refresh_token != before.refresh_token
    assert standin.count("refresh_rejected") == 0


@pytest.mark.parametrize("fault", ["timeout", "drop"])
def test_lost_refresh_reply_is_a_lost_rotation_found_without_a_replay(app, client, standin, fault, caplog):
    """The provider rotated but its reply was lost: introspection says so at once; no replay, no 500."""
    sign_in(client)
    standin.inject(fault, delay=3)
    expire_access_token(app)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tokens"):
        reply = client.get("/api/profile")
    assert reply.status_code == 401
    assert reply.get_json()["error"] == "sign_in_required"
    assert standin.count("refresh_rejected") == 0  # the spent token was never replayed
    outcomes = [json.loads(r.getMessage())["outcome"] for r in caplog.records if r.name == "tokens"]
    assert outcomes == ["lost_rotation"]
    with app.app_context():
        assert db.session.execute(db.select(RefreshEvent.outcome).order_by(RefreshEvent.id.desc())).scalars().first() == "lost_rotation"
    assert client.get("/").status_code == 302  # the page resumes through the provider, silently
    assert sign_in(client).status_code == 302
    assert client.get("/api/session").status_code == 200


def test_lost_reply_without_an_answer_from_introspection_stays_unsure_until_checked(app, client, standin):
    """While the provider cannot say whether it rotated, keep the token marked unsure; the next attempt asks first."""
    sign_in(client)
    before = stored_user(app)
    standin.inject("drop")
    standin.inject("5xx", count=0)
    expire_access_token(app)
    introspect = app.extensions["provider"].introspect

    def down(token):
        raise ProviderUnavailable("introspection down")

    app.extensions["provider"].introspect = down
    assert client.get("/api/profile").status_code == 503
    assert stored_user(app).refresh_unsure is True
    assert stored_user(app).refresh_token == before.refresh_token
    app.extensions["provider"].introspect = introspect
    assert client.get("/api/profile").status_code == 401  # now it can say: rotated, and the reply lost
    assert standin.count("refresh_rejected") == 0


def test_provider_down_page_is_503_and_session_survives(app, client, standin):
    sign_in(client)
    standin.inject("5xx")
    expire_access_token(app)
    page = client.get("/")
    assert page.status_code == 503
    assert "try again" in page.get_data(as_text=True).lower()
    assert client.get("/").status_code == 200


def test_waiter_rereads_after_lock_and_does_not_refresh(app, client, standin):
    """A request that read a stale token before the lock finds it fresh after: no second refresh."""
    sign_in(client)
    expire_access_token(app)
    with app.test_request_context():
        stale = db.session.execute(db.select(User)).scalar_one()
        assert tokens.is_stale(stale.access_expires_at)
        # Another request (its own thread, so its own app context) refreshes while this one holds its stale copy.
        other = app.test_client()
        other.set_cookie(*_session_cookie(client))
        statuses = []
        worker = threading.Thread(target=lambda: statuses.append(other.get("/api/profile").status_code))
        worker.start()
        worker.join()
        assert statuses == [200]
        assert tokens.is_stale(stale.access_expires_at)  # still the copy read before
        before = standin.count("refresh")
        fresh = tokens.ensure_fresh_access_token(stale, trigger="test")
        assert standin.count("refresh") == before
        assert not tokens.is_stale(fresh.access_expires_at)


def test_waiters_write_nothing_and_the_refresher_records_how_many_waited(app, client, standin, monkeypatch):
    """Requests behind a refresh only read its result; on PostgreSQL the refresher counts them on its event."""
    sign_in(client)
    expire_access_token(app)
    cookie = _session_cookie(client)
    at_provider, answer, _ = _held_at_provider(app, monkeypatch)
    turns = _turns_taken(app, monkeypatch)

    def request_profile(statuses: list) -> None:
        browser = app.test_client()
        browser.set_cookie(*cookie)
        statuses.append(browser.get("/api/profile").status_code)

    statuses: list[int] = []
    refresher = threading.Thread(target=request_profile, args=(statuses,))
    refresher.start()
    assert at_provider.wait(timeout=10)  # the refresher holds the turn, at the provider
    with app.app_context():
        engine = db.engine
    writes: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        if not statement.lstrip().upper().startswith(("SELECT", "SET", "BEGIN")):
            writes.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    waiters = [threading.Thread(target=request_profile, args=(statuses,)) for _ in range(4)]
    try:
        for thread in waiters:
            thread.start()
        assert turns.wait_for(5)  # the refresher's and the four waiters'
        if engine.dialect.name == "postgresql":
            _until_postgresql_shows_waiting(4)
        answer.set()
        for thread in [refresher, *waiters]:
            thread.join(timeout=30)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert statuses == [200] * 5
    assert standin.count("refresh") == 2  # the viewer token's at sign-in, and this one
    with app.app_context():
        recorded = db.session.execute(db.select(RefreshEvent).where(RefreshEvent.kind == "access")).scalar_one()
        assert recorded.outcome == "refreshed"
        # The waiters wrote nothing: only the refresher's rotation and event (and last-seen) were written.
        assert all("refresh_events" not in statement or "INSERT" in statement.upper() for statement in writes), writes
        assert recorded.waiters == (4 if engine.dialect.name == "postgresql" else 0)


class _Count:
    """A count that threads raise and a test waits for, on a condition instead of sleeps."""

    def __init__(self):
        self.value, self.changed = 0, threading.Condition()

    def add(self) -> None:
        with self.changed:
            self.value += 1
            self.changed.notify_all()

    def wait_for(self, value: int, timeout: float = 10) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.value >= value, timeout)


def _held_at_provider(app, monkeypatch) -> tuple[threading.Event, threading.Event, list]:
    """Hold the provider's next refresh, once there, until the test lets it answer; list each refresh's scope."""
    provider = app.extensions["provider"]
    real, at_provider, answer, scopes = provider.refresh, threading.Event(), threading.Event(), []

    def held(*args, **kwargs):
        scopes.append(kwargs.get("scope"))
        if not at_provider.is_set():
            at_provider.set()
            assert answer.wait(timeout=10)
        return real(*args, **kwargs)

    monkeypatch.setattr(provider, "refresh", held)
    return at_provider, answer, scopes


def _turns_taken(app, monkeypatch) -> _Count:
    """Count the requests that go for a refresh turn (each then holds it, or waits for it)."""
    locks, turns = app.extensions["locks"], _Count()
    real = locks.take_turn

    def counted(user_id: int, **how) -> bool:
        turns.add()
        return real(user_id, **how)

    monkeypatch.setattr(locks, "take_turn", counted)
    return turns


def _until_postgresql_shows_waiting(count: int) -> None:
    """Wait until PostgreSQL has that many requests queued for an advisory lock: only the database knows when one is."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute("SET lock_timeout = 0")
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        deadline = time.monotonic() + 10
        while admin.execute(waiting).fetchone()[0] < count:
            assert time.monotonic() < deadline, "the waiters never queued"
            admin.execute("SELECT pg_sleep(0.01)")


def test_a_refresh_waits_for_a_held_lock_only_as_long_as_a_refresh_may_take(app_factory, database_url):
    """A lock held too long (a stuck sign-in's) ends the wait with a 503 after PROVIDER_REFRESH_TIMEOUT + 2 x PROVIDER_TIMEOUT."""
    app = app_factory(PROVIDER_TIMEOUT=1, PROVIDER_REFRESH_TIMEOUT=1)  # waits at most 3 s
    client = app.test_client()
    sign_in(client)
    expire_access_token(app)
    store = app.extensions["standin"].extensions["standin_store"]
    before = store.count("refresh")
    holder = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.pool.NullPool)
    locked, done = threading.Event(), threading.Event()

    def hold() -> None:
        # Another connection holds what a refresh must take: the person's row lock, or SQLite's write lock,
        # until the request is answered (at most 10 s, so a wait without a timeout fails instead of hanging).
        with holder.connect() as conn:
            if holder.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.execute(sqlalchemy.text("SELECT id FROM users FOR UPDATE"))
            locked.set()
            done.wait(timeout=10)
            conn.rollback()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert locked.wait(timeout=10)
        started = time.monotonic()
        reply = client.get("/api/profile")
        waited = time.monotonic() - started
    finally:
        done.set()
        thread.join()
        holder.dispose()
    assert reply.status_code == 503
    assert 2.5 < waited < 10
    assert store.count("refresh") == before  # the provider was never asked: nothing was consumed
    assert client.get("/api/profile").status_code == 200


def test_refresh_logs_one_structured_line_without_tokens(app, client, caplog):
    sign_in(client)
    expire_access_token(app)
    user = stored_user(app)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tokens"):
        client.get("/api/profile")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tokens"]
    assert [line["outcome"] for line in lines] == ["refreshed"]
    assert {"user_id", "duration_ms", "waited", "trigger", "lock_wait_ms"} <= lines[0].keys()
    after = stored_user(app)
    text = caplog.text
    for secret in (user.refresh_token, user.access_token, after.refresh_token, after.access_token):
        assert secret not in text


def test_restart_keeps_person_signed_in(app_factory, tmp_path):
    first = app_factory()
    client = first.test_client()
    sign_in(client)
    cookie = _session_cookie(client)
    second = app_factory()  # a new process on the same databases
    again = second.test_client()
    again.set_cookie(*cookie)
    assert again.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    expire_access_token(second)
    assert again.get("/api/profile").status_code == 200


def test_concurrent_requests_refresh_once(app, client, standin):
    """50 requests of one person at expiry, in real threads: all 200, one refresh at the provider."""
    sign_in(client)
    cookie = _session_cookie(client)
    expire_access_token(app)
    before = standin.count("refresh")
    results = []
    barrier = threading.Barrier(50)

    def call():
        c = app.test_client()
        c.set_cookie(*cookie)
        barrier.wait()
        results.append(c.get("/api/profile").status_code)

    threads = [threading.Thread(target=call) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 50
    assert standin.count("refresh") - before == 1
    assert standin.count("refresh_rejected") == 0


def _session_cookie(client) -> tuple[str, str]:
    cookie = client.get_cookie("session")
    return cookie.key, cookie.value


def test_signed_in_request_reads_one_row_and_decrypts_no_token(app, client):
    """Knowing who is signed in costs one SELECT and no decryption; tokens are decrypted where they are used."""
    sign_in(client)
    client.get("/")  # past the once-a-minute last-seen write
    statements, decrypted = [], []
    cipher = app.extensions["token_cipher"]
    decrypt = cipher.decrypt
    cipher.decrypt = lambda token, *args: decrypted.append(1) or decrypt(token, *args)
    with app.app_context():
        engines = list(db.engines.values())  # the hook's "reads" engine too

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    for engine in engines:
        event.listen(engine, "before_cursor_execute", count)
    try:
        assert client.get("/").status_code == 200
        assert (statements, decrypted) == ([statements[0]], [])
        assert statements[0].lstrip().upper().startswith("SELECT")
        statements.clear()
        # The session status comes with the same row, its last refresh included: still one SELECT.
        assert client.get("/api/session").get_json()["last_refresh"] is None
        assert (len(statements), decrypted) == (1, [])
        statements.clear()
        assert client.get("/api/profile").status_code == 200  # uses the access token: decrypted now
        assert decrypted
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", count)
        cipher.decrypt = decrypt


def test_the_hook_reads_through_its_threads_own_connection_and_gives_it_back_when_the_thread_ends(app, client):
    """No request takes a connection out of the pool for the hook's read; an ended thread's goes back."""
    with app.app_context():
        reads = db.engines["reads"]
    sign_in(client)
    checkouts = []

    def count(*args):
        checkouts.append(1)

    event.listen(reads, "checkout", count)
    try:
        for _ in range(5):
            assert client.get("/api/session").status_code == 200
        assert len(checkouts) <= 1  # the first request of this thread (on this app) may take it
        cookie = _session_cookie(client)
        seen = []

        def browse():
            other = app.test_client()
            other.set_cookie(*cookie)
            seen.append(other.get("/api/session").status_code)

        thread = threading.Thread(target=browse)
        thread.start()
        thread.join()
        assert seen == [200]
        assert reads.pool.checkedout() == 1  # this thread's: the ended thread's went back as it ended
        assert client.get("/api/session").status_code == 200
    finally:
        event.remove(reads, "checkout", count)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_pooled_connection_is_used_without_a_ping_and_replaced_when_its_server_hung_up(app, client):
    """A refresh on a live pooled connection costs no ping round trip; one whose server ended it while idle is replaced, not a 503."""
    with app.app_context():
        engine = db.engine
    pings = []
    ping = engine.dialect.do_ping

    def counted_ping(dbapi_connection):
        pings.append(1)
        return ping(dbapi_connection)

    sign_in(client)
    engine.dialect.do_ping = counted_ping
    try:
        expire_access_token(app)
        assert client.get("/api/profile").status_code == 200
        assert pings == []
        expire_access_token(app)
        # End every connection of this app's database while it sits in a pool, as a restart would.
        database = engine.url.database
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            # With a timeout, pg_terminate_backend waits until the backend has gone.
            admin.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s", (database,))
            assert admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()[0] == 0
        assert client.get("/api/profile").status_code == 200
        assert pings  # the hung-up connection was noticed and pinged, then replaced
    finally:
        engine.dialect.do_ping = ping


def test_a_refresh_stores_the_tokens_the_sessions_expiry_and_its_event_in_one_locked_transaction(app, client):
    """Read under the lock, write the rotation, the event in a savepoint of its own, then one commit: a crash loses all or nothing."""
    with app.app_context():
        engine = db.engine
    sign_in(client)
    expire_access_token(app)
    statements: list[str] = []

    def note(conn, cursor, statement, *args) -> None:
        statements.append(" ".join(statement.split()))

    def note_commit(conn) -> None:
        statements.append("COMMIT")

    event.listen(engine, "before_cursor_execute", note)
    event.listen(engine, "commit", note_commit)
    try:
        assert client.get("/api/profile").status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", note)
        event.remove(engine, "commit", note_commit)
    locked = next(i for i, s in enumerate(statements) if "FOR UPDATE" in s or s == "BEGIN IMMEDIATE")
    rotation = [s.split()[:3] for s in statements[locked : statements.index("COMMIT", locked)] if not s.startswith("BEGIN")]
    assert [words[0] for words in rotation[1:]] == ["SELECT", "UPDATE", "UPDATE", "SAVEPOINT", "INSERT", "RELEASE"], rotation
    assert [rotation[2][1], rotation[3][1], rotation[5][2]] == ["users", "user_sessions", "refresh_events"]


def test_requests_queued_behind_a_refused_refresh_take_its_answer_without_asking_again(app_factory, standin, monkeypatch):
    """A refresh fails (503) with two requests waiting; the first of them is refused; the second reads that refusal and does not ask."""
    # The viewer scope is not part of the grant: the stand-in refuses that refresh with invalid_scope.
    app = app_factory(OAUTH_VIEWER_SCOPE="data:create")
    client = app.test_client()
    sign_in(client)
    at_provider, answer, calls = _held_at_provider(app, monkeypatch)
    turns = _turns_taken(app, monkeypatch)
    standin.inject("5xx")  # the first refresh fails for a reason that leaves the next request to try
    cookie = _session_cookie(client)
    statuses: list[int] = []

    def request_viewer_token() -> None:
        browser = app.test_client()
        browser.set_cookie(*cookie)
        statuses.append(browser.get("/api/viewer-token").status_code)

    first = threading.Thread(target=request_viewer_token)
    first.start()
    assert at_provider.wait(timeout=10)  # the first request is at the provider, holding the turn
    queued = [threading.Thread(target=request_viewer_token) for _ in range(2)]
    for thread in queued:
        thread.start()
    assert turns.wait_for(3)  # the other two go for the turn while the first holds it
    answer.set()
    for thread in [first, *queued]:
        thread.join(timeout=30)
    assert sorted(statuses) == [403, 403, 503]
    assert calls == ["data:create", "data:create"]  # the 503, then one refusal: never the same question twice


def test_postgresql_connections_keep_no_session_state_a_transaction_pooler_would_lose(app):
    """No startup options and no server-side prepared statements: PgBouncer in transaction mode refuses the one and mixes up the other."""
    with app.app_context():
        if db.engine.dialect.name != "postgresql":
            pytest.skip("a PostgreSQL connection setting")
        for engine in db.engines.values():  # the session's and the hook's
            with engine.connect() as conn:
                for _ in range(10):  # psycopg prepares a statement on its fifth execution unless told not to
                    conn.execute(sqlalchemy.select(User.id).where(User.id == 1)).all()
                assert conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar() == 0
                assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "0"
                conn.rollback()
