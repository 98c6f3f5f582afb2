"""A person's grant as stored: their tokens, changed only under their row lock.

The provider keeps one refresh token per person per app, so all the person's sessions share the
one on their row. A sign-in stores a new grant, a refresh its rotation, and a sign-out (of the
last session) or a dead grant forgets it; each holds the person's row lock (locking.py), so none
overwrites another: a refresh still in flight with the previous refresh token cannot overwrite a
sign-in's, and "was this the last session?" is decided in the transaction that forgets the grant.
"""

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import undefer_group

import locking
import sessions
from models import HandedToken, User, UserSession, db, utcnow
from provider import ProviderError, TokenResponse

log = logging.getLogger("tokens")

# APS v2 refresh tokens live 15 days unless the provider tells us otherwise.
REFRESH_TOKEN_LIFETIME = timedelta(days=15)
# How long a refused refresh looks for the new grant of a sign-in on another device (replaced_by_sign_in).
SIGN_IN_GRACE = 2.0


class SignInRequired(Exception):
    """The person's grant is dead: they must sign in again (notice: what to tell them about why)."""

    def __init__(self, reason: str = "", notice: str | None = None):
        super().__init__(reason)
        self.notice = notice


def _person(user_id: int):
    # Tokens included, and read afresh even when this session holds the person already.
    return select(User).where(User.id == user_id).options(undefer_group("tokens")).execution_options(populate_existing=True)


def read(user_id: int) -> User | None:
    """Read the person with their tokens, without a lock."""
    return db.session.execute(_person(user_id)).scalar_one_or_none()


def read_locked(user_id: int) -> User | None:
    """Read the person with their tokens under their row lock, in the current transaction."""
    return locking.read_locked(_person(user_id))


def lock(user_id: int) -> User | None:
    """Start a transaction holding the person's row lock, and read them under it."""
    locking.current().begin()
    return read_locked(user_id)


def save_sign_in(subject: str, name: str, email: str, tokens: TokenResponse) -> User:
    """Store a fresh sign-in's tokens under the person's row lock; they replace the old ones for all sessions."""
    user = _lock_subject(subject)
    now = utcnow()
    _set_aside_access_token(user)
    user.name, user.email = name, email
    user.access_token = tokens.access_token
    user.access_expires_at = now + timedelta(seconds=tokens.expires_in)
    user.refresh_token = tokens.refresh_token
    user.refresh_issued_at = user.signed_in_at = now
    user.refresh_expires_at = now + REFRESH_TOKEN_LIFETIME
    user.refresh_rotations = 0
    user.refresh_unsure = False
    # A viewer keeps the access token it holds, but the next one comes from the new grant.
    user.viewer_token = user.viewer_expires_at = None
    return user


def _lock_subject(subject: str) -> User:
    """Return the person with this subject, row-locked, creating them if they are new."""
    user_id = db.session.execute(select(User.id).where(User.subject == subject)).scalar_one_or_none()
    if user_id is None:
        db.session.add(User(subject=subject))
        try:
            db.session.commit()
        except IntegrityError:
            db.session.rollback()  # a concurrent first sign-in of the same person created the row
        user_id = db.session.execute(select(User.id).where(User.subject == subject)).scalar_one()
    user = lock(user_id)
    if user is None:
        raise SignInRequired("the person was removed during sign-in")
    return user


def store_rotation(user: User, kind: str, tokens: TokenResponse, scope: str | None) -> None:
    """Write a refresh's tokens to the locked person's row; when the refresh token rotated, their live sessions follow its expiry."""
    now = utcnow()
    expires_at = now + timedelta(seconds=tokens.expires_in)
    if kind == "viewer":
        user.viewer_token, user.viewer_expires_at, user.viewer_scope = tokens.access_token, expires_at, tokens.scope or scope
    else:
        _set_aside_access_token(user)
        user.access_token, user.access_expires_at = tokens.access_token, expires_at
    user.refresh_unsure = False
    if tokens.refresh_token:  # some OIDC providers do not rotate; APS always does
        user.refresh_token, user.refresh_issued_at = tokens.refresh_token, now
        user.refresh_expires_at = now + REFRESH_TOKEN_LIFETIME
        user.refresh_rotations += 1
        # Live sessions live as long as the refresh token that keeps them signed in; ended ones stay ended.
        live = update(UserSession).where(UserSession.user_id == user.id, UserSession.expires_at > now)
        db.session.execute(live.values(expires_at=user.refresh_expires_at))


def store_viewer_token(user: User, tokens: TokenResponse, scope: str) -> list[tuple[str, str]]:
    """Store the tokens of the viewer's own authorization, granted this scope, on the locked person's row; their grant stays as it is.

    Return the refresh token they replace, to revoke once stored. One that is the person's own is
    neither kept as the viewer's nor ever revoked as such.
    """
    replaced = user.viewer_refresh_token
    user.viewer_token, user.viewer_scope = tokens.access_token, scope
    user.viewer_expires_at = utcnow() + timedelta(seconds=tokens.expires_in)
    user.viewer_refresh_token = tokens.refresh_token if tokens.refresh_token != user.refresh_token else None
    return [(replaced, "refresh_token")] if replaced and replaced not in (user.viewer_refresh_token, user.refresh_token) else []


def forget(user: User) -> list[tuple[str, str]]:
    """Forget a dead grant: clear the person's tokens and end every session that relied on them.

    The sessions' rows stay, ended, so each browser can resume silently (auth.py). Return the
    tokens to revoke at the provider, as (token, token_type_hint) pairs.
    """
    revocable = _forget_tokens(user)
    sessions.expire_all(user.id)
    return revocable


def end_sessions(user_id: int, id_hashes: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """End some of the person's sessions (all when id_hashes is None); with the last one, forget the grant.

    Return the tokens to revoke at the provider. A sign-out deletes the rows: nothing resumes it.
    """
    user = lock(user_id)
    if user is None:
        db.session.rollback()
        return []
    ended = delete(UserSession).where(UserSession.user_id == user_id)
    if id_hashes is not None:
        ended = ended.where(UserSession.id_hash.in_(list(id_hashes)))
    db.session.execute(ended)
    last = sessions.remaining(user_id) == 0
    revocable = _forget_tokens(user) if last else _revocable_of_devices(user, list(id_hashes or []))
    db.session.commit()
    return revocable


def _forget_tokens(user: User) -> list[tuple[str, str]]:
    """Clear the person's tokens; return them, and every access token handed out and still alive, to revoke."""
    revocable = [(user.refresh_token, "refresh_token"), (user.access_token, "access_token"), (user.viewer_token, "access_token")]
    revocable.append((user.viewer_refresh_token, "refresh_token"))
    handed = db.session.execute(select(HandedToken.token).where(HandedToken.user_id == user.id, HandedToken.expires_at > utcnow())).scalars()
    revocable += [(token, "access_token") for token in dict.fromkeys(handed) if token not in (user.access_token, user.viewer_token)]
    db.session.execute(delete(HandedToken).where(HandedToken.user_id == user.id))
    user.clear_tokens()
    return [(token, hint) for token, hint in revocable if token]


def hand_out(user: User, session_hash: str, token: str, expires_at: datetime) -> None:
    """Remember that this session's browser holds this access token (the viewer's), so its sign-out can revoke it."""
    token_hash = _digest(token)
    known = select(HandedToken.id).where(HandedToken.token_hash == token_hash, HandedToken.session_hash == session_hash)
    if db.session.execute(known).first() is None:
        db.session.add(HandedToken(user_id=user.id, session_hash=session_hash, token_hash=token_hash, token=token, expires_at=expires_at))
        db.session.commit()


def _set_aside_access_token(user: User) -> None:
    """Remember the locked person's access token before a newer one replaces it: it lives on until it expires."""
    if user.access_token and user.access_expires_at and user.access_expires_at > utcnow():
        token_hash = _digest(user.access_token)
        db.session.add(HandedToken(user_id=user.id, session_hash=None, token_hash=token_hash, token=user.access_token, expires_at=user.access_expires_at))


def _revocable_of_devices(user: User, id_hashes: list[str]) -> list[tuple[str, str]]:
    """Return the alive tokens handed only to these sessions (no other device holds them), and forget what they were handed."""
    mine = select(HandedToken).where(HandedToken.user_id == user.id, HandedToken.session_hash.in_(id_hashes))
    rows = list(db.session.execute(mine).scalars())
    others = select(HandedToken.token_hash).where(
        HandedToken.user_id == user.id, HandedToken.session_hash.is_not(None), HandedToken.session_hash.not_in(id_hashes)
    )
    shared = set(db.session.execute(others).scalars())
    alive = {row.token_hash: row.token for row in rows if row.expires_at > utcnow() and row.token_hash not in shared}
    db.session.execute(delete(HandedToken).where(HandedToken.id.in_([row.id for row in rows])))
    if user.viewer_token is not None and _digest(user.viewer_token) in alive:
        user.viewer_token = user.viewer_expires_at = None  # revoked: the next viewer gets a new one
    return [(token, "access_token") for token in alive.values()]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def replaced_by_sign_in(user_id: int, used: str) -> bool:
    """Tell whether a sign-in on another device stored a new grant within SIGN_IN_GRACE of our refresh being refused.

    That sign-in's code exchange made the provider revoke the token we hold (one refresh token
    per person per app) before it could store the new one under the row lock we hold: let go of
    the locks and look for its grant for a moment, rather than end every session of the person.
    """
    db.session.commit()
    deadline = time.monotonic() + SIGN_IN_GRACE
    while time.monotonic() < deadline:
        time.sleep(0.1)
        stored = db.session.execute(select(User.refresh_token).where(User.id == user_id)).scalar_one_or_none()
        db.session.commit()
        if stored != used:
            return True
    return False


def revoke(revocable: list[tuple[str, str]]) -> None:
    """Revoke forgotten tokens at the provider, best effort: we no longer hold them anyway."""
    provider = current_app.extensions["provider"]
    for token, hint in revocable:
        try:
            provider.revoke(token, hint)
        except ProviderError:
            log.warning(json.dumps({"event": "revoke_failed", "token_type": hint}))
