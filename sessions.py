"""Server-side browser sessions: the cookie holds only a signed random id, the table its hash."""

import hashlib
import secrets
import threading
import weakref
from datetime import datetime, timedelta

from flask import Response, current_app, g, request
from flask.sessions import SessionInterface
from itsdangerous import BadSignature, Signer
from sqlalchemy import Connection, Engine, bindparam, delete, func, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from models import RefreshEvent, User, UserSession, db, utcnow

# Write last-seen at most this often, so ordinary requests do not write.
TOUCH_INTERVAL = timedelta(minutes=1)
# Re-issue the cookie once the session's expiry has moved this far past what the browser was told.
SLIDE_AFTER = timedelta(days=1)
# The cookie outlives its session by this much, and ended rows are kept as long (housekeeping.py), so a
# browser whose grant died, even of 15 days' idleness, can be signed in again silently (auth.py).
RESUME_GRACE = timedelta(days=30)
MAX_COOKIE_LENGTH = 256


class NoFlaskSession(SessionInterface):
    """Leave flask.session unused and unread: any use of it fails loudly (NullSession) instead of costing every request."""

    def open_session(self, app, request) -> None:
        return None  # Flask then hands out its NullSession

    def save_session(self, app, session, response) -> None:
        pass


def cookie_name() -> str:
    # The __Host- prefix pins the cookie to this host and path, but browsers accept it only when Secure.
    return "__Host-session" if current_app.config["SESSION_COOKIE_SECURE"] else "session"


def _signer() -> Signer:
    return Signer(current_app.config["SECRET_KEY"], salt="session-id")


def hash_id(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def start(user: User, provider_sid: str | None = None) -> str:
    """Create a new session for the person and return the signed cookie value.

    provider_sid: the provider's session id (the ID token's sid), which its back-channel logout names.
    """
    session_id = secrets.token_urlsafe(32)
    expires_at = user.refresh_expires_at or utcnow() + timedelta(days=1)
    agent = request.headers.get("User-Agent", "")[:255]
    session = UserSession(id_hash=hash_id(session_id), user=user, user_agent=agent, expires_at=expires_at, cookie_expires_at=expires_at)
    session.provider_sid = provider_sid
    db.session.add(session)
    return _signer().sign(session_id).decode()


class Current:
    """This browser's session row as the hook reads it: plain values, no ORM object."""

    __slots__ = ("id_hash", "user_id", "expires_at", "cookie_expires_at", "last_seen_at")

    def __init__(self, row):
        self.id_hash, self.user_id, self.expires_at, self.cookie_expires_at, self.last_seen_at = row[:5]


class Person:
    """The signed-in person as the hook reads them: who they are, when their access token expires, their last refresh.

    That is all most requests need. Anything else (their tokens, their sessions, the lifecycle
    times) loads the full User on first use, once per request, and is read from it.
    """

    _full: User | None = None

    def __init__(self, row):
        self.id, self.name, self.email, self.access_expires_at, self.signed_in_at, self.last_refresh_at, self.last_refresh_outcome = row[5:]

    def __getattr__(self, name: str):
        if self._full is None:
            self._full = db.session.get(User, self.id)
        return getattr(self._full, name)


def load() -> tuple[Current, Person] | None:
    """Return this browser's session, live or ended, and its person; None for a missing or bad cookie."""
    value = request.cookies.get(cookie_name())
    if not value or len(value) > MAX_COOKIE_LENGTH:
        return None
    try:
        session_id = _signer().unsign(value).decode()
    except (BadSignature, UnicodeDecodeError):
        return None
    id_hash = hash_id(session_id)
    try:
        row = _read(id_hash)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        # A pooled connection died with its server (a restart). SQLAlchemy has now dropped every
        # connection as old as that one, so one retry gets a fresh one: cheaper than pinging the
        # database before every request (pool_pre_ping) for what happens once in months.
        row = _read(id_hash)
    return (Current(row), Person(row)) if row is not None else None


def issued_here() -> bool:
    """Tell whether this request's session cookie is one this app signed, whatever became of its session since."""
    value = request.cookies.get(cookie_name(), "")
    return 0 < len(value) <= MAX_COOKIE_LENGTH and _signer().validate(value)


def _read(id_hash: str):
    # Not through db.session: one statement needs no Session, no ORM and, on the "reads" engine
    # (autocommit, app.py), no BEGIN before it and no ROLLBACK after it.
    return _reader(db.engines["reads"]).execute(_BY_ID_HASH, {"id_hash": id_hash}).first()


class _Reader:
    """A thread's own connection for the hook's read, closed (back to the pool) when the thread ends.

    Its autobegun transaction refers back to it, so without the finalizer the connection would go
    back only when the garbage collector next looks for cycles.
    """

    __slots__ = ("connection", "__weakref__")

    def __init__(self, reads: Engine):
        self.connection = reads.connect()
        weakref.finalize(self, self.connection.close)


_thread = threading.local()


def _reader(reads: Engine) -> Connection:
    """Return this thread's own connection to the "reads" engine, kept from one request to the next.

    In autocommit there is nothing to end between requests, and taking a connection out of the
    pool and back for each one cost a sixth of the read on PostgreSQL and half of it on SQLite.
    gunicorn's threads live as long as their worker, so the engine holds one per thread (app.py).
    """
    held = getattr(_thread, "reader", None)
    if held is None or held.connection.engine is not reads or held.connection.invalidated:
        if held is not None:
            held.connection.invalidate()  # another app's (tests), or one a restart killed: never pooled again
        _thread.reader = held = _Reader(reads)
    return held.connection


def _by_id_hash():
    """Build the hook's one statement: the session, its person and their latest access refresh, and no token."""
    sessions, users, events = UserSession.__table__, User.__table__, RefreshEvent.__table__
    earlier = events.alias("earlier")
    latest = select(func.max(earlier.c.id)).where(earlier.c.user_id == users.c.id, earlier.c.kind == "access").correlate(users).scalar_subquery()
    return (
        select(
            sessions.c.id_hash,
            sessions.c.user_id,
            sessions.c.expires_at,
            sessions.c.cookie_expires_at,
            sessions.c.last_seen_at,
            users.c.id,
            users.c.name,
            users.c.email,
            users.c.access_expires_at,
            users.c.signed_in_at,
            events.c.at,
            events.c.outcome,
        )
        .join_from(sessions, users, sessions.c.user_id == users.c.id)
        .outerjoin(events, events.c.id == latest)
        .where(sessions.c.id_hash == bindparam("id_hash"))
    )


# Built once, not per request.
_BY_ID_HASH = _by_id_hash()


def touch(session: Current) -> None:
    """Record that the session was used, at most once a minute."""
    now = utcnow()
    if now - session.last_seen_at >= TOUCH_INTERVAL:
        db.session.execute(update(UserSession).where(UserSession.id_hash == session.id_hash).values(last_seen_at=now))
        db.session.commit()


def slide_cookie(response: Response) -> Response:
    """Re-issue this browser's cookie when its session now lives well past what the cookie says.

    Rotations move the session's expiry forward; a cookie that kept its first Expires would
    sign a daily user out on day 15 while the server still holds a live grant.
    """
    session = g.get("session")
    if session is None or g.get("passive") or g.get("session_cookie_written") or g.get("drop_session_cookie"):
        return response
    expires_at, told = session.expires_at, session.cookie_expires_at
    user = g.get("user")
    try:
        if isinstance(user, User) and user.refresh_expires_at and user.refresh_expires_at > expires_at:
            expires_at = user.refresh_expires_at  # this very request rotated the token: the session moved on with it
        if told is not None and expires_at - told < SLIDE_AFTER:
            return response
        db.session.execute(update(UserSession).where(UserSession.id_hash == session.id_hash).values(cookie_expires_at=expires_at))
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()  # the session ended during this request, or the database is away: keep the cookie as it is
        return response
    set_cookie(response, request.cookies[cookie_name()], expires_at)
    return response


def end(id_hash: str) -> None:
    db.session.execute(delete(UserSession).where(UserSession.id_hash == id_hash))


def expire(id_hash: str) -> None:
    """End one session whose grant died, keeping its row so the browser can resume silently."""
    db.session.execute(update(UserSession).where(UserSession.id_hash == id_hash, UserSession.expires_at > utcnow()).values(expires_at=utcnow()))


def expire_all(user_id: int) -> None:
    """End every session of the person because their grant died; the rows stay, so each browser can resume silently."""
    db.session.execute(update(UserSession).where(UserSession.user_id == user_id).values(expires_at=utcnow()))


def is_live(session: Current) -> bool:
    return session.expires_at > utcnow()


def remaining(user_id: int) -> int:
    """Count the person's live sessions."""
    query = select(UserSession.id_hash).where(UserSession.user_id == user_id, UserSession.expires_at > utcnow())
    return len(db.session.execute(query).all())


def cookie_attributes() -> dict:
    """Return what every cookie of this app is set and deleted with: HTTPS only (when configured), no script access, sent on top-level navigations."""
    return {"secure": current_app.config["SESSION_COOKIE_SECURE"], "httponly": True, "samesite": "Lax", "path": "/"}


def set_cookie(response: Response, value: str, expires_at: datetime) -> None:
    g.session_cookie_written = True
    response.set_cookie(cookie_name(), value, expires=expires_at + RESUME_GRACE, **cookie_attributes())


def clear_cookie(response: Response) -> None:
    g.session_cookie_written = True
    response.delete_cookie(cookie_name(), **cookie_attributes())
