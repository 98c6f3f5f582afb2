"""Server-side browser sessions: the cookie holds only a signed random id, the table its hash."""

import hashlib
import secrets
from datetime import datetime, timedelta

from flask import Response, current_app, request
from itsdangerous import BadSignature, Signer
from sqlalchemy import delete, select, update
from sqlalchemy.orm import contains_eager

from models import User, UserSession, db, utcnow

# Write last-seen at most this often, so ordinary requests do not write.
TOUCH_INTERVAL = timedelta(minutes=1)
MAX_COOKIE_LENGTH = 256


def cookie_name() -> str:
    # The __Host- prefix pins the cookie to this host and path, but browsers accept it only when Secure.
    return "__Host-session" if current_app.config["SESSION_COOKIE_SECURE"] else "session"


def _signer() -> Signer:
    return Signer(current_app.config["SECRET_KEY"], salt="session-id")


def hash_id(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def start(user: User) -> str:
    """Create a new session for the person and return the signed cookie value."""
    session_id = secrets.token_urlsafe(32)
    expires_at = user.refresh_expires_at or utcnow() + timedelta(days=1)
    agent = request.headers.get("User-Agent", "")[:255]
    db.session.add(UserSession(id_hash=hash_id(session_id), user=user, user_agent=agent, expires_at=expires_at))
    return _signer().sign(session_id).decode()


def load() -> UserSession | None:
    """Return this browser's live session with its person, or None for a missing, bad or expired cookie."""
    value = request.cookies.get(cookie_name())
    if not value or len(value) > MAX_COOKIE_LENGTH:
        return None
    try:
        session_id = _signer().unsign(value).decode()
    except (BadSignature, UnicodeDecodeError):
        return None
    # contains_eager fills session.user from the join: without it the hook lazy-loads the person
    # with a second query, because the identity map holds only weak references to row[1].
    query = (
        select(UserSession)
        .join(UserSession.user)
        .options(contains_eager(UserSession.user))
        .where(UserSession.id_hash == hash_id(session_id), UserSession.expires_at > utcnow())
    )
    return db.session.execute(query).scalars().first()


def touch(session: UserSession) -> None:
    """Record that the session was used, at most once a minute."""
    now = utcnow()
    if now - session.last_seen_at >= TOUCH_INTERVAL:
        db.session.execute(update(UserSession).where(UserSession.id_hash == session.id_hash).values(last_seen_at=now))
        db.session.commit()


def end(id_hash: str) -> None:
    db.session.execute(delete(UserSession).where(UserSession.id_hash == id_hash))


def end_all(user_id: int) -> None:
    db.session.execute(delete(UserSession).where(UserSession.user_id == user_id))


def remaining(user_id: int) -> int:
    """Count the person's live sessions."""
    query = select(UserSession.id_hash).where(UserSession.user_id == user_id, UserSession.expires_at > utcnow())
    return len(db.session.execute(query).all())


def set_cookie(response: Response, value: str, expires_at: datetime) -> None:
    response.set_cookie(
        cookie_name(),
        value,
        expires=expires_at,
        secure=current_app.config["SESSION_COOKIE_SECURE"],
        httponly=True,
        samesite="Lax",
        path="/",
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(cookie_name(), secure=current_app.config["SESSION_COOKIE_SECURE"], httponly=True, samesite="Lax", path="/")
