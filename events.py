"""Refresh events: what became of each attempt to get a fresh token, recorded, logged and counted in one place.

The refresh_events table keeps them for the session page and for the refresh protocol itself
(tokens.py reads the latest refusal); each also makes one structured log line, never a token.
"""

import enum
import json
import logging
import time
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import func, insert, select
from sqlalchemy.exc import SQLAlchemyError

import locking
import metrics
from models import RefreshEvent, User, db, utcnow

log = logging.getLogger("tokens")

# Marks the viewer token's refresh at sign-in, so the session page can say why a fresh sign-in shows one rotation.
AT_SIGN_IN = "(sign-in)"
# Marks a refresh ahead of expiry, which ran after the response of the request that asked (tokens.refresh_ahead).
AHEAD = "(ahead)"


class Attempt(Protocol):
    """What an event tells of one request's attempt to get a fresh token (tokens.Attempt)."""

    user_id: int
    kind: str
    trigger: str
    started: float  # time.monotonic()
    lock_wait: float  # seconds
    waited: bool  # for another request's refresh
    holds_turn: bool
    provider_ms: float | None


class Outcome(enum.StrEnum):
    """What became of one request's attempt to get a fresh token."""

    REFRESHED = "refreshed"  # the provider rotated the grant; the new tokens are stored
    USED_FRESH = "used_fresh"  # another request had just refreshed it: its result was used
    REFUSED = "refused"  # the provider refused this refresh (invalid_scope...); the grant stands
    STILL_REFUSED = "still_refused"  # refused lately: not asked again within the backoff
    UNAVAILABLE = "unavailable"  # the provider did not answer, or a lock was held too long; nothing was lost
    INVALID_GRANT = "invalid_grant"  # the grant is dead: expired, revoked or replaced
    LOST_ROTATION = "lost_rotation"  # the provider rotated, but its reply (or our store of it) was lost
    GRANT_NARROWED = "grant_narrowed"  # a narrowed refresh narrowed the whole grant (downscope.py)
    TOKEN_REJECTED = "token_rejected"  # a resource server refuses even a fresh access token (bearer.py)
    AUTHORIZED = "authorized"  # the viewer's token came from an authorization of its own (viewer_authorization.py)


def record(attempt: Attempt, outcome: Outcome, *, cause: str | None = None, reason: str = "", write: bool = True) -> None:
    """Record what became of an attempt: the event row, the commit (the locks go with it), one log line.

    The row is written in a savepoint, so a refused row never takes the rest of the transaction
    (a rotation) down with it. write=False keeps no row: an attempt that asked no one writes
    nothing, so no one queues behind it; one that holds no lock either (a waiter) keeps the person
    it read loaded, uncommitted. A commit that fails raises, and nothing is logged.
    """
    seconds = time.monotonic() - attempt.started
    if write:
        _write(attempt, outcome, cause, seconds)
    if write or attempt.holds_turn:
        db.session.commit()
    _log(attempt, outcome, seconds, cause, reason)
    # The refresh histogram takes the refresher's whole refresh, so only attempts that asked the provider.
    metrics.count_refresh(attempt.kind, outcome.value, seconds if attempt.provider_ms is not None else None)
    if attempt.waited:
        metrics.observe_wait(attempt.lock_wait)


def _write(attempt: Attempt, outcome: Outcome, cause: str | None, seconds: float) -> None:
    row = {
        "user_id": attempt.user_id,
        "at": utcnow(),
        "kind": attempt.kind,
        "outcome": outcome.value,
        "cause": cause[:64] if cause else None,
        "trigger": _clean(attempt.trigger),
        "duration_ms": round(seconds * 1000),
        # The requests waiting for this refresh, counted as the row is written, just before the commit lets them go.
        "waiters": locking.current().waiting(attempt.user_id) if attempt.holds_turn else 0,
    }
    try:
        with db.session.begin_nested():
            db.session.execute(insert(RefreshEvent).values(row))
    except SQLAlchemyError as exc:
        log.warning(json.dumps({"event": "refresh_event_not_recorded", "user_id": attempt.user_id, "reason": type(exc).__name__}))


def _log(attempt: Attempt, outcome: Outcome, seconds: float, cause: str | None, reason: str) -> None:
    """Write one structured line per attempt; never a token."""
    fields = {
        "event": "token_refresh",
        "user_id": attempt.user_id,
        "kind": attempt.kind,
        "outcome": outcome.value,
        "duration_ms": round(seconds * 1000, 1),
        "lock_wait_ms": round(attempt.lock_wait * 1000, 1),
        "waited": attempt.waited,
        "trigger": attempt.trigger,
    }
    if attempt.provider_ms is not None:
        fields["provider_ms"] = attempt.provider_ms  # the rest of duration_ms is this app's own work
    if cause:
        fields["cause"] = cause
    if reason:
        fields["reason"] = reason
    (log.warning if outcome is Outcome.LOST_ROTATION else log.info)(json.dumps(fields))


def _clean(trigger: str) -> str:
    """Keep a client-chosen request line storable: no NUL or other control characters, at most 255 characters."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in trigger)[:255]


def latest(user_id: int, kind: str) -> RefreshEvent | None:
    """Return the person's latest refresh event of this kind."""
    query = select(RefreshEvent).where(RefreshEvent.user_id == user_id, RefreshEvent.kind == kind).order_by(RefreshEvent.id.desc()).limit(1)
    return db.session.execute(query).scalar_one_or_none()


def recent(user_id: int, count: int) -> list[RefreshEvent]:
    """Return the person's latest refresh events, newest first."""
    query = select(RefreshEvent).where(RefreshEvent.user_id == user_id).order_by(RefreshEvent.id.desc()).limit(count)
    return list(db.session.execute(query).scalars())


def last_issued(user: User, kind: str) -> datetime | None:
    """Return when the person's access (or viewer) token was last issued: by a refresh (or the viewer's authorization), or by their sign-in after it."""
    issued = (Outcome.REFRESHED, Outcome.AUTHORIZED)
    query = select(func.max(RefreshEvent.at)).where(RefreshEvent.user_id == user.id, RefreshEvent.kind == kind, RefreshEvent.outcome.in_(issued))
    latest = db.session.execute(query).scalar_one_or_none()
    if latest is not None and latest.tzinfo is None:
        latest = latest.replace(tzinfo=UTC)  # SQLite's max() bypasses the column type
    if latest is None or (user.signed_in_at and user.signed_in_at > latest):
        return user.signed_in_at
    return latest


def at_sign_in(event: RefreshEvent) -> bool:
    """Tell whether this is the viewer token's refresh that a sign-in makes."""
    return event.kind == "viewer" and event.trigger.endswith(AT_SIGN_IN)


def ahead(event: RefreshEvent) -> bool:
    """Tell whether this refresh ran ahead of expiry, after a response."""
    return event.trigger.endswith(AHEAD)
