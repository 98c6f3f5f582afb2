"""The token lifecycle: a fresh access token for the current person, refreshed one at a time.

The provider's refresh tokens are single-use: every refresh returns a new one and kills the
old one, and strict providers revoke the whole grant when a used one is replayed. So a
refresh must never run twice with the same token, whichever thread, worker or instance
asks. The database is the one thing they all share, so the person's row is the lock:

1. Take the row lock (SELECT ... FOR UPDATE on PostgreSQL; BEGIN IMMEDIATE on SQLite).
2. Re-read the tokens under the lock: a waiter usually finds that the holder already
   refreshed them, and uses the result instead of refreshing again.
3. Refresh at the provider (one round trip, bounded by PROVIDER_TIMEOUT) and store the
   rotated refresh token in the same transaction, before the new access token is used.
"""

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError

import downscope
import sessions
from models import RefreshEvent, User, UserSession, db, utcnow
from provider import InvalidGrant, ProviderError, ProviderRejected, TokenResponse

log = logging.getLogger("tokens")

# APS v2 refresh tokens live 15 days unless the provider tells us otherwise.
REFRESH_TOKEN_LIFETIME = timedelta(days=15)
# A provider that refused a refresh (invalid_scope...) is not asked the same again for this long.
REFUSAL_BACKOFF = timedelta(minutes=5)


class SignInRequired(Exception):
    """The person's refresh token is dead: they must sign in again (notice: what to tell them about why)."""

    def __init__(self, reason: str = "", notice: str | None = None):
        super().__init__(reason)
        self.notice = notice


class RefreshUnavailable(Exception):
    """A refresh could not be done now (provider down, or the lock wait timed out); nothing was lost."""


class RefreshRefused(Exception):
    """The provider refused the refresh for a reason other than a dead grant (invalid_scope...); the sign-in stands."""

    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


@dataclass(frozen=True)
class ViewerToken:
    access_token: str
    expires_at: datetime
    scope: str


def is_stale(expires_at: datetime | None, token: str | None = None) -> bool:
    """Tell whether a token is missing or expires within TOKEN_REFRESH_LEEWAY seconds."""
    if token is None or expires_at is None:
        return True
    leeway = timedelta(seconds=current_app.config["TOKEN_REFRESH_LEEWAY"])
    return expires_at - leeway <= utcnow()


def save_sign_in(subject: str, name: str, email: str, tokens: TokenResponse) -> User:
    """Store a fresh sign-in's tokens under the person's row lock; they replace the old ones for all sessions.

    The lock matters: a refresh still in flight with the previous refresh token must not
    overwrite the new one when it finishes.
    """
    user = _lock_subject(subject)
    now = utcnow()
    user.name, user.email = name, email
    user.access_token = tokens.access_token
    user.access_expires_at = now + timedelta(seconds=tokens.expires_in)
    user.refresh_token = tokens.refresh_token
    user.refresh_issued_at = user.signed_in_at = now
    user.refresh_expires_at = now + REFRESH_TOKEN_LIFETIME
    user.refresh_rotations = 0
    # A viewer keeps the access token it holds, but the next one comes from the new grant.
    user.viewer_token = user.viewer_expires_at = None
    return user


def forget_grant(user_id: int) -> str | None:
    """Clear the person's tokens under their row lock and return the refresh token to revoke."""
    user = _lock_user(user_id)
    if user is None:
        return None
    refresh_token = user.refresh_token
    user.clear_tokens()
    return refresh_token


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
    user = _lock_user(user_id)
    if user is None:
        raise SignInRequired("person was removed during sign-in")
    return user


def ensure_fresh_access_token(user: User, trigger: str, rejected: str | None = None) -> User:
    """Return the person with an access token that outlives the leeway, refreshing it if needed.

    rejected: an access token the provider just refused; it counts as stale even if unexpired.
    """
    if not is_stale(user.access_expires_at, user.access_token) and user.access_token != rejected:
        return user
    return _refresh(user.id, "access", trigger, rejected)


def viewer_token(user: User, trigger: str) -> ViewerToken:
    """Return the viewer-scoped access token, refreshing with the narrower scope when it is stale."""
    if is_stale(user.viewer_expires_at, user.viewer_token):
        user = _refresh(user.id, "viewer", trigger)
    return ViewerToken(user.viewer_token, user.viewer_expires_at, user.viewer_scope or "")


def _refresh(user_id: int, kind: str, trigger: str, rejected: str | None = None) -> User:
    """Refresh the person's access (or viewer) token, holding their row lock."""
    started = time.monotonic()
    user = _lock_user(user_id)
    locked = time.monotonic()
    if user is None:
        db.session.rollback()
        raise SignInRequired("person no longer exists")

    token, expires_at = (user.access_token, user.access_expires_at) if kind == "access" else (user.viewer_token, user.viewer_expires_at)
    if not is_stale(expires_at, token) and token != rejected:
        # Another request refreshed while we waited for the lock: use its result. Release the lock
        # before counting ourselves, so the waiters behind us do not queue for our bookkeeping.
        db.session.commit()
        _count_waiter(user_id)
        db.session.commit()
        _log(user_id, kind, "used_fresh", started, locked, waited=True, trigger=trigger)
        return user
    if not user.refresh_token:
        db.session.rollback()
        raise SignInRequired("no refresh token stored")
    refused = _recent_refusal(user, kind)
    if refused:
        db.session.rollback()
        raise RefreshRefused(refused)

    scope = current_app.config["OAUTH_VIEWER_SCOPE"] if kind == "viewer" else None
    provider = current_app.extensions["provider"]
    try:
        tokens = provider.refresh(user.refresh_token, scope=scope)
    except InvalidGrant:
        _forget(user, kind, trigger, started)
        raise SignInRequired("refresh token expired, revoked or replaced") from None
    except ProviderRejected as exc:
        # A refusal is an answer, not an outage: the token was not consumed, and asking again gets the same answer.
        db.session.rollback()
        _record(user_id, kind, f"refused:{exc.error}"[:32], trigger, started)
        db.session.commit()
        _log(user_id, kind, "refused", started, locked, waited=locked - started > 0.05, trigger=trigger, reason=str(exc))
        raise RefreshRefused(exc.error) from None
    except ProviderError as exc:
        # The refresh token was not consumed, or we cannot know: keep it and let a later request retry.
        db.session.rollback()
        _record(user_id, kind, "unavailable", trigger, started)
        db.session.commit()
        _log(user_id, kind, "unavailable", started, locked, waited=locked - started > 0.05, trigger=trigger, reason=str(exc))
        raise RefreshUnavailable(str(exc)) from None

    if kind == "access" and downscope.narrowed_grant(tokens.scope):
        _forget(user, kind, trigger, started, outcome=downscope.NARROWED)
        downscope.note_narrowed_grant(user_id, tokens)
        raise SignInRequired("the provider narrowed the whole grant", notice=downscope.NOTICE)
    _store_refresh(user, kind, tokens, scope)
    _record(user_id, kind, "refreshed", trigger, started)
    db.session.commit()
    _log(user_id, kind, "refreshed", started, locked, waited=locked - started > 0.05, trigger=trigger)
    return user


def _lock_user(user_id: int) -> User | None:
    """Start a new transaction holding the person's row lock, and re-read the row under it."""
    db.session.commit()  # the lock must be the first thing of its own transaction
    query = select(User).where(User.id == user_id).execution_options(populate_existing=True)
    try:
        if db.engine.dialect.name == "sqlite":
            # SQLite has no row locks: take the database write lock up front (waits up to the busy timeout).
            db.session.execute(text("BEGIN IMMEDIATE"))
        else:
            # Wait at most a few provider round trips for another request's refresh.
            db.session.execute(text(f"SET LOCAL lock_timeout = '{_lock_wait_ms()}ms'"))
            query = query.with_for_update()
        return db.session.execute(query).scalar_one_or_none()
    except OperationalError as exc:
        db.session.rollback()
        raise RefreshUnavailable("timed out waiting for another refresh of this person") from exc


def _lock_wait_ms() -> int:
    return int(current_app.config["PROVIDER_TIMEOUT"] * 3 * 1000)


def _store_refresh(user: User, kind: str, tokens: TokenResponse, scope: str | None) -> None:
    now = utcnow()
    expires_at = now + timedelta(seconds=tokens.expires_in)
    if kind == "viewer":
        user.viewer_token, user.viewer_expires_at = tokens.access_token, expires_at
        user.viewer_scope = tokens.scope or scope
    else:
        user.access_token, user.access_expires_at = tokens.access_token, expires_at
    if tokens.refresh_token:  # some OIDC providers do not rotate; APS always does
        user.refresh_token = tokens.refresh_token
        user.refresh_issued_at = now
        user.refresh_expires_at = now + REFRESH_TOKEN_LIFETIME
        user.refresh_rotations += 1
        # Sessions live as long as the refresh token that keeps them signed in.
        db.session.execute(update(UserSession).where(UserSession.user_id == user.id).values(expires_at=user.refresh_expires_at))


def _forget(user: User, kind: str, trigger: str, started: float, outcome: str = "invalid_grant") -> None:
    """Clear a dead grant: the person's tokens and every session that relied on them."""
    user.clear_tokens()
    sessions.end_all(user.id)
    _record(user.id, kind, outcome, trigger, started)
    db.session.commit()
    _log(user.id, kind, outcome, started, started, waited=False, trigger=trigger)


def _record(user_id: int, kind: str, outcome: str, trigger: str, started: float) -> None:
    """Add the refresh event to the current transaction; the caller commits."""
    db.session.add(RefreshEvent(user_id=user_id, kind=kind, outcome=outcome, trigger=trigger[:255], duration_ms=_ms(started)))


def _recent_refusal(user: User, kind: str) -> str | None:
    """Return the error of a refusal of this kind of refresh since the person's sign-in and within the backoff, if it is the latest outcome."""
    latest = db.session.execute(
        select(RefreshEvent.outcome, RefreshEvent.at)
        .where(RefreshEvent.user_id == user.id, RefreshEvent.kind == kind)
        .order_by(RefreshEvent.id.desc())
        .limit(1)
    ).first()
    if latest is None or not latest.outcome.startswith("refused:"):
        return None
    since = max(utcnow() - REFUSAL_BACKOFF, user.signed_in_at or utcnow())
    return latest.outcome.removeprefix("refused:") if latest.at >= since else None


def _count_waiter(user_id: int) -> None:
    latest = select(RefreshEvent.id).where(RefreshEvent.user_id == user_id).order_by(RefreshEvent.id.desc()).limit(1).scalar_subquery()
    db.session.execute(update(RefreshEvent).where(RefreshEvent.id == latest).values(waiters=RefreshEvent.waiters + 1))


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _log(user_id: int, kind: str, outcome: str, started: float, locked: float, *, waited: bool, trigger: str, reason: str = "") -> None:
    """Write one structured line per refresh; never a token."""
    fields = {
        "event": "token_refresh",
        "user_id": user_id,
        "kind": kind,
        "outcome": outcome,
        "duration_ms": _ms(started),
        "lock_wait_ms": int((locked - started) * 1000),
        "waited": waited,
        "trigger": trigger,
    }
    if reason:
        fields["reason"] = reason
    log.info(json.dumps(fields))
