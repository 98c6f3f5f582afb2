"""`flask purge` deletes expired sessions and long-gone people, and keeps everyone still signed in."""

from datetime import timedelta

from sqlalchemy import func, select, text, update

from conftest import sign_in
from models import RefreshEvent, User, UserSession, db, utcnow


def set_user(app, name: str, **values) -> None:
    with app.app_context():
        db.session.execute(update(User).where(User.name == name).values(**values))
        db.session.commit()


def set_sessions(app, name: str, expires_at) -> None:
    with app.app_context():
        user_id = db.session.execute(select(User.id).where(User.name == name)).scalar_one()
        db.session.execute(update(UserSession).where(UserSession.user_id == user_id).values(expires_at=expires_at))
        db.session.commit()


def add_events(app, name: str, count: int) -> None:
    with app.app_context():
        user = db.session.execute(select(User).where(User.name == name)).scalar_one()
        db.session.add_all(RefreshEvent(user_id=user.id, kind="access", outcome="refreshed") for _ in range(count))
        db.session.commit()


def events_of(app, name: str) -> int:
    with app.app_context():
        query = select(func.count()).select_from(RefreshEvent).join(User, RefreshEvent.user_id == User.id).where(User.name == name)
        return db.session.execute(query).scalar_one()


def counts(app) -> dict:
    with app.app_context():
        return {
            "people": set(db.session.execute(select(User.name)).scalars()),
            "sessions": db.session.execute(select(func.count()).select_from(UserSession)).scalar_one(),
            "events": db.session.execute(select(func.count()).select_from(RefreshEvent)).scalar_one(),
        }


def test_purge_deletes_expired_sessions_and_long_gone_people(app):
    now = utcnow()
    browsers = {name: app.test_client() for name in ("Ada", "Bob", "Cleo", "Dan", "Eve")}
    for name, browser in browsers.items():
        assert sign_in(browser, name).status_code == 302
    sign_in(app.test_client(), "Bob")  # Bob's second browser
    with app.app_context():
        bob = db.session.execute(select(User.id).where(User.name == "Bob")).scalar_one()
        first = db.session.execute(select(UserSession.id_hash).where(UserSession.user_id == bob).limit(1)).scalar_one()
        db.session.execute(update(UserSession).where(UserSession.id_hash == first).values(expires_at=now - timedelta(minutes=1)))
        db.session.commit()
    # Cleo's grant ended 31 days ago; Dan's 10 days ago; Eve signed out 40 days ago (no grant left).
    set_user(app, "Cleo", refresh_expires_at=now - timedelta(days=31))
    set_sessions(app, "Cleo", now - timedelta(days=31))
    set_user(app, "Dan", refresh_expires_at=now - timedelta(days=10))
    set_sessions(app, "Dan", now - timedelta(days=10))
    set_user(app, "Eve", refresh_token=None, refresh_expires_at=None, signed_in_at=now - timedelta(days=40))
    set_sessions(app, "Eve", now - timedelta(days=40))
    add_events(app, "Cleo", 3)
    add_events(app, "Eve", 2)
    before = counts(app)
    gone_events = events_of(app, "Cleo") + events_of(app, "Eve")
    assert gone_events >= 5  # the ones added, and any that sign-in recorded

    result = app.test_cli_runner().invoke(args=["purge"])

    assert result.exit_code == 0, result.output
    # Ended more than 30 days ago: Cleo's and Eve's. People: Cleo and Eve, with all their events.
    assert result.output.strip() == f"Deleted 2 expired sessions, 2 people and {gone_events} refresh events."
    after = counts(app)
    assert after["people"] == {"Ada", "Bob", "Dan"}
    # Ada's and Bob's live ones; Bob's first browser and Dan's ended recently and may still resume silently.
    assert after["sessions"] == 4
    assert after["events"] == before["events"] - gone_events > 0
    assert browsers["Ada"].get("/api/session").status_code == 200

    again = app.test_cli_runner().invoke(args=["purge"])
    assert again.output.strip() == "Deleted 0 expired sessions, 0 people and 0 refresh events."

    shorter = app.test_cli_runner().invoke(args=["purge", "--grace-days", "0"])
    assert shorter.output.strip().startswith("Deleted 0 expired sessions, 1 people")
    assert counts(app)["people"] == {"Ada", "Bob"}


def test_purge_keeps_a_person_with_a_live_session(app):
    """A live session outlasts the grace: the person is not deleted under a signed-in browser."""
    browser = app.test_client()
    sign_in(browser, "Ada")
    set_user(app, "Ada", refresh_token=None, refresh_expires_at=None, signed_in_at=utcnow() - timedelta(days=90))
    result = app.test_cli_runner().invoke(args=["purge"])
    assert result.output.strip() == "Deleted 0 expired sessions, 0 people and 0 refresh events."
    assert counts(app)["people"] == {"Ada"}


def test_purge_rejects_a_negative_grace(app):
    result = app.test_cli_runner().invoke(args=["purge", "--grace-days", "-1"])
    assert result.exit_code != 0
    assert "--grace-days" in result.output


def plan(conn, statement: str, **params) -> str:
    if conn.dialect.name == "sqlite":
        rows = conn.execute(text(f"EXPLAIN QUERY PLAN {statement}"), params).all()
        return " | ".join(str(row[-1]) for row in rows)
    # With sequential scans priced out, PostgreSQL shows an index scan exactly when an index can serve it.
    conn.execute(text("SET LOCAL enable_seqscan = off"))
    return " | ".join(row[0] for row in conn.execute(text(f"EXPLAIN {statement}"), params))


def test_session_lookups_and_the_purge_use_indexes(app):
    with app.app_context(), db.engine.begin() as conn:
        # sqlite3's own datetime adapter is deprecated since Python 3.12: give it the text SQLAlchemy would.
        now = utcnow().isoformat(" ") if conn.dialect.name == "sqlite" else utcnow()
        lookup = plan(conn, "SELECT * FROM user_sessions WHERE id_hash = :h AND expires_at > :now", h="x" * 64, now=now)
        expired = plan(conn, "SELECT id_hash FROM user_sessions WHERE expires_at <= :now", now=now)
        per_person = plan(conn, "SELECT id_hash FROM user_sessions WHERE user_id = :u", u=1)
        events = plan(conn, "SELECT id FROM refresh_events WHERE user_id = :u", u=1)
    if conn.dialect.name == "sqlite":
        assert "USING INDEX sqlite_autoindex_user_sessions_1 (id_hash=?)" in lookup
        assert "ix_user_sessions_expires_at" in expired
    else:
        assert "user_sessions_pkey" in lookup
        assert "ix_user_sessions_expires_at" in expired
    assert "ix_user_sessions_user_id" in per_person
    assert "ix_refresh_events_user_id" in events
