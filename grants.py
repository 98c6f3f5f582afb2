"""A person's grant as stored: their tokens, changed only under their row lock.

The provider keeps one refresh token per person per app, so all the person's sessions share the
one on their row. A sign-in stores a new grant, a refresh its rotation, and a sign-out (of the
last session) or a dead grant forgets it; each holds the person's row lock (locking.py), so none
overwrites another: a refresh still in flight with the previous refresh token cannot overwrite a
sign-in's, and "was this the last session?" is decided in the transaction that forgets the grant.
"""

import json
import logging
import time
from collections.abc import Iterable
from datetime import timedelta

from flask import current_app
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import undefer_group

import locking
import sessions
from models import User, UserSession, db, utcnow
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
        user.access_token, user.access_expires_at = tokens.access_token, expires_at
    user.refresh_unsure = False
    if tokens.refresh_token:  # some OIDC providers do not rotate; APS always does
        user.refresh_token, user.refresh_issued_at = tokens.refresh_token, now
        user.refresh_expires_at = now + REFRESH_TOKEN_LIFETIME
        user.refresh_rotations += 1
        # Live sessions live as long as the refresh token that keeps them signed in; ended ones stay ended.
        live = update(UserSession).where(UserSession.user_id == user.id, UserSession.expires_at > now)
        db.session.execute(live.values(expires_at=user.refresh_expires_at))


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
    revocable = _forget_tokens(user) if sessions.remaining(user_id) == 0 else []
    db.session.commit()
    return revocable


def _forget_tokens(user: User) -> list[tuple[str, str]]:
    revocable = [(user.refresh_token, "refresh_token"), (user.access_token, "access_token"), (user.viewer_token, "access_token")]
    user.clear_tokens()
    return [(token, hint) for token, hint in revocable if token]


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
